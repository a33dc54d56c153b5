"""Image grids and labelled-example figures."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from helpers.plots import image_grid, labelled_examples

IMAGES = [np.full((64, 64, 3), value, np.uint8) for value in (0, 80, 160, 240, 255)]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_image_grid_layout():
    fig = image_grid(IMAGES, [f"prompt {index}" for index in range(5)], ncols=3)

    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6
    assert len(shown) == 5
    assert shown[4].get_title() == "prompt 4"


def test_image_grid_saves_png(tmp_path):
    path = tmp_path / "figures" / "images.png"

    image_grid(IMAGES[:2], ["a", "b"], ncols=2, path=path)

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_grid_wraps_long_titles():
    fig = image_grid(IMAGES[:1], ["a photo of a white box in the centre, at medium distance"], 1)

    assert "\n" in fig.axes[0].get_title()


def test_image_grid_rejects_title_count():
    with pytest.raises(ValueError, match="one title per image"):
        image_grid(IMAGES[:2], ["only one"], ncols=2)


def test_labelled_examples_rows():
    depth = [np.random.default_rng(0).random((64, 64), np.float32)] * 2
    saliency = [np.zeros((64, 64), np.float32)] * 2

    fig = labelled_examples(IMAGES[:2], depth, saliency, ["a", "b"])

    assert len(fig.axes) == 6
    assert fig.axes[0].get_ylabel() == "image"


def test_labelled_examples_rejects_missing_labels():
    with pytest.raises(ValueError, match="one of each per image"):
        labelled_examples(IMAGES[:2], [np.zeros((64, 64))], [np.zeros((64, 64))] * 2, ["a", "b"])

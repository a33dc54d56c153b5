"""Figures of generated images and their labels (matplotlib).

Each function returns the Figure and, given a ``path``, also saves it there (PNG at 150 dpi).
The caller shows it (``plt.show()`` in a notebook) or closes it.
"""

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from helpers.run_folder import RunFolder

TITLE_WIDTH = 24  # characters per title line
TITLE_FONT_SIZE = 7
PANEL_INCHES = 2.0
SAVE_DPI = 150


def image_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    ncols: int,
    path: str | Path | None = None,
) -> Figure:
    """Lay out images in a grid of ``ncols`` columns, each under its wrapped title."""
    if len(images) != len(titles):
        raise ValueError(
            f"Got {len(images)} images but {len(titles)} titles: pass one title per image."
        )
    if not images:
        raise ValueError("No images to plot: pass at least one image.")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}.")

    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(PANEL_INCHES * ncols, (PANEL_INCHES + 0.6) * nrows), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(textwrap.fill(title, TITLE_WIDTH), fontsize=TITLE_FONT_SIZE)
    fig.tight_layout()
    _save(fig, path)
    return fig


def labelled_examples(
    images: Sequence[np.ndarray],
    depth: Sequence[np.ndarray],
    saliency: Sequence[np.ndarray],
    titles: Sequence[str],
    path: str | Path | None = None,
) -> Figure:
    """Show each image in a column above its depth label and its saliency label.

    Depth is relative inverse depth, drawn with each image's own colour range because its
    scale is unknown (brighter is nearer). Saliency is the salient-object probability, 0 to 1.
    """
    count = len(images)
    if not count or not len(depth) == len(saliency) == len(titles) == count:
        raise ValueError(
            f"Got {count} images, {len(depth)} depth maps, {len(saliency)} saliency maps and "
            f"{len(titles)} titles: pass at least one image and one of each per image."
        )
    fig, axes = plt.subplots(
        3, count, figsize=(PANEL_INCHES * count, 3 * PANEL_INCHES + 0.6), squeeze=False
    )
    for column in range(count):
        axes[0, column].imshow(images[column], interpolation="nearest")
        axes[0, column].set_title(
            textwrap.fill(titles[column], TITLE_WIDTH), fontsize=TITLE_FONT_SIZE
        )
        axes[1, column].imshow(depth[column], cmap="magma")
        axes[2, column].imshow(saliency[column], cmap="gray", vmin=0.0, vmax=1.0)
    for row, label in enumerate(["image", "depth (relative inverse)", "saliency"]):
        axes[row, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_run_images(run: RunFolder, count: int = 12, ncols: int = 6) -> Figure:
    """Grid of a run's first ``count`` generated images with their prompts, saved to
    ``figures/images.png`` in the run folder."""
    image_ids = run.completed_ids()[:count]
    if not image_ids:
        raise ValueError(f"The run {run.path} has no generated image yet: run generate_run first.")
    images = [run.load_image(image_id) for image_id in image_ids]
    titles = [_image_title(run, image_id) for image_id in image_ids]
    return image_grid(images, titles, ncols, path=run.figures_dir / "images.png")


def plot_labelled_examples(run: RunFolder, count: int = 6) -> Figure:
    """Images of a run beside their depth and saliency labels, saved to
    ``figures/labelled_examples.png`` in the run folder."""
    image_ids = [
        image_id
        for image_id in run.completed_ids()
        if all(run.label_path(kind, image_id).is_file() for kind in ("depth", "saliency"))
    ][:count]
    if not image_ids:
        raise ValueError(f"The run {run.path} has no labelled image yet: run label_run first.")
    return labelled_examples(
        [run.load_image(image_id) for image_id in image_ids],
        [run.load_label("depth", image_id) for image_id in image_ids],
        [run.load_label("saliency", image_id) for image_id in image_ids],
        [_image_title(run, image_id) for image_id in image_ids],
        path=run.figures_dir / "labelled_examples.png",
    )


def _image_title(run: RunFolder, image_id: int) -> str:
    row = run.row(image_id)
    return f"{image_id} ({row['split'] or 'no split'}): {row['prompt']}"


def _save(fig: Figure, path: str | Path | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=SAVE_DPI)

"""Pseudo-labelers: the toy estimators and the transformers code path, with bad inputs."""

import numpy as np
import pytest
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

from helpers.labels import (
    TransformersDepthLabeler,
    load_depth_labeler,
    load_saliency_labeler,
)
from helpers.toyworld.render import render


@pytest.fixture(scope="module")
def toy_depth():
    return load_depth_labeler("toy")


@pytest.fixture(scope="module")
def toy_saliency():
    return load_saliency_labeler("toy")


@pytest.fixture(scope="module")
def tiny_dpt():
    """DPT (the MiDaS architecture) built from a small config with random weights."""
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        reassemble_factors=[4, 2, 1, 0.5],
        is_hybrid=False,
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return TransformersDepthLabeler("dpt-test", DPTForDepthEstimation(config), processor)


def test_toy_labelers_have_names_and_image_sized_output(toy_depth, toy_saliency):
    images = np.stack([render(900_000_000 + i).image for i in range(3)])
    depth, saliency = toy_depth(images), toy_saliency(images)
    assert toy_depth.name == "toy-depth"
    assert toy_saliency.name == "toy-saliency"
    assert depth.shape == saliency.shape == (3, 64, 64)
    assert depth.dtype == saliency.dtype == np.float32
    assert saliency.min() >= 0.0
    assert saliency.max() <= 1.0


def test_saliency_on_black_image_is_empty(toy_saliency):
    saliency = toy_saliency(np.zeros((64, 64, 3), np.uint8))
    assert not np.isnan(saliency).any()
    assert not (saliency > 0.5).any()


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((64, 64, 3), np.uint8),
        np.full((64, 64, 3), 0.5, np.float32),
        np.full((64, 64), 200, np.uint8),
        np.zeros((64, 64, 4), np.uint8),
        np.zeros((48, 80, 3), np.uint8),
    ],
    ids=["black", "grey", "grayscale", "rgba", "other-size"],
)
def test_labelers_never_return_nan(toy_depth, toy_saliency, tiny_dpt, image):
    for labeler in (toy_depth, toy_saliency, tiny_dpt):
        output = labeler(image)
        assert output.shape == (1, *image.shape[:2])
        assert np.isfinite(output).all()


def test_transformers_depth_labeler_resizes_to_image(tiny_dpt):
    output = tiny_dpt(np.random.default_rng(0).integers(0, 255, (2, 64, 48, 3), dtype=np.uint8))
    assert output.shape == (2, 64, 48)


def test_unknown_labeler_names_choices():
    with pytest.raises(ValueError, match="dpt-large"):
        load_depth_labeler("midas-v9")
    with pytest.raises(ValueError, match="birefnet"):
        load_saliency_labeler("tracer")


def test_toy_depth_correlates_with_truth_on_renders(toy_depth):
    from helpers.metrics import spearman

    scenes = [render(900_000_100 + i) for i in range(8)]
    predicted = toy_depth(np.stack([s.image for s in scenes]))
    scores = [spearman(p, s.relative_inverse_depth) for p, s in zip(predicted, scenes, strict=True)]
    assert np.mean(scores) > 0.9

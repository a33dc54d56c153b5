"""Linear probes on synthetic activations with known solutions."""

import numpy as np
import pytest
import torch

from helpers.probes import (
    LinearProbe,
    ProbeFitSettings,
    StreamingLeastSquares,
    fit_depth_probe,
    fit_depth_probe_gradient,
    fit_saliency_probe,
    score_probe,
    upsample_nearest,
)

GRID, WIDTH, SIZE = 8, 24, 32


def synthetic_data(images: int, seed: int, linear: bool = True):
    """Tokens on an 8x8 grid whose label is a linear function of the activation."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=WIDTH)
    activations = rng.normal(size=(images, GRID * GRID, WIDTH)).astype(np.float32)
    scores = activations @ truth if linear else rng.normal(size=(images, GRID * GRID))
    scores_grid = scores.reshape(images, GRID, GRID)
    # Labels are constant over each token's 4x4 pixel patch, so pooling recovers them.
    depth = np.repeat(np.repeat(scores_grid, SIZE // GRID, 1), SIZE // GRID, 2).astype(np.float32)
    masks = depth > 0
    if not linear:  # labels independent of the activations
        activations = rng.normal(size=activations.shape).astype(np.float32)
    return torch.from_numpy(activations), depth, masks


def test_depth_probe_recovers_linear_map():
    train, depth, _ = synthetic_data(20, 0)
    test, test_depth, _ = synthetic_data(10, 0)
    # The probe has no bias, so the labels are centred at 0 rather than at their sample mean.
    probe = fit_depth_probe(train, depth, 0.0, float(depth.std()), ridge=1e-8)
    scores = score_probe(probe, test, test_depth)
    assert scores["rmse"] < 1e-3
    assert scores["spearman"] > 0.999


def test_saliency_probe_recovers_linear_boundary():
    train, _, masks = synthetic_data(20, 1)
    test, _, test_masks = synthetic_data(10, 1)
    for method in ("gradient", "closed_form"):
        probe = fit_saliency_probe(train, masks, ProbeFitSettings(saliency_method=method))
        assert score_probe(probe, test, test_masks)["dice"] > 0.95, method


def test_probes_on_noise_score_near_chance():
    train, depth, masks = synthetic_data(20, 2, linear=False)
    test, test_depth, test_masks = synthetic_data(10, 3, linear=False)
    depth_probe = fit_depth_probe(train, depth, float(depth.mean()), float(depth.std()))
    scores = score_probe(depth_probe, test, test_depth)
    assert scores["rmse"] > 0.9  # predicting the mean scores about 1 standard deviation
    assert abs(scores["spearman"]) < 0.1

    saliency_probe = fit_saliency_probe(train, masks)
    # A random half of the pixels is foreground; a chance predictor scores Dice near 0.5.
    assert score_probe(saliency_probe, test, test_masks)["dice"] < 0.6


def test_gradient_depth_probe_matches_closed_form():
    train, depth, _ = synthetic_data(20, 4)
    mean, std = float(depth.mean()), float(depth.std())
    closed = fit_depth_probe(train, depth, mean, std)
    gradient = fit_depth_probe_gradient(train, depth, mean, std, iterations=400)
    assert torch.allclose(closed.weight, gradient.weight, atol=0.05)


def test_streaming_statistics_equal_one_batch():
    activations, depth, _ = synthetic_data(6, 5)
    targets = torch.from_numpy(depth[:, ::4, ::4].reshape(6, -1))
    whole = StreamingLeastSquares(WIDTH)
    whole.update(activations, targets)
    streamed = StreamingLeastSquares(WIDTH)
    for index in range(6):
        streamed.update(activations[index], targets[index])
    assert torch.allclose(whole.solve(), streamed.solve(), atol=1e-5)


def test_nearest_upsampling_stays_binary():
    prediction = torch.from_numpy(np.random.default_rng(0).random((3, 16, 16)) > 0.5)
    upsampled = upsample_nearest(prediction, (64, 64))
    assert upsampled.dtype == bool
    assert upsampled.shape == (3, 64, 64)
    assert np.array_equal(upsampled[:, ::4, ::4], prediction.numpy())
    assert set(np.unique(upsampled.astype(np.uint8))) <= {0, 1}


def test_probe_rejects_other_width():
    probe = LinearProbe("saliency", torch.zeros(2, 320), grid=8)
    with pytest.raises(ValueError, match="320-wide"):
        probe.predict_grid(torch.zeros(1, 64, 640))
    with pytest.raises(ValueError, match="8x8 grid"):
        probe.predict_grid(torch.zeros(1, 16, 320))


def test_probe_weight_shape_checked():
    with pytest.raises(ValueError, match=r"shape \(2, width\)"):
        LinearProbe("saliency", torch.zeros(1, 32), grid=4)

"""Counterfactual targets, closed-form edits and GIF writing."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.animation import back_and_forth_path, write_gif
from helpers.intervention import (
    InterventionSettings,
    closed_form_depth_edit,
    closed_form_saliency_edit,
    gradient_edit,
    translate_depth,
    translate_mask,
)
from helpers.probes import LinearProbe


def test_translate_mask_moves_centroid_without_wrapping():
    mask = np.zeros((48, 64), dtype=bool)  # 64 wide, 48 high
    mask[20:30, 10:22] = True
    moved = translate_mask(mask, 5, -3)
    rows, columns = np.nonzero(mask)
    new_rows, new_columns = np.nonzero(moved)
    assert moved.dtype == bool
    assert new_columns.mean() - columns.mean() == pytest.approx(5.0)
    assert new_rows.mean() - rows.mean() == pytest.approx(-3.0)
    assert moved.sum() == mask.sum()


def test_translate_mask_past_border_loses_content():
    mask = np.zeros((48, 64), dtype=bool)
    mask[:, 60:] = True
    moved = translate_mask(mask, 5, 0)
    assert not moved[:, :5].any(), "content must not wrap around to the left edge"
    assert moved.sum() == 0


def test_translate_depth_fills_from_edge():
    depth = np.tile(np.arange(8, dtype=np.float32), (4, 1))
    moved = translate_depth(depth, 2, 0)
    assert np.array_equal(moved[:, 2:], depth[:, :-2])
    assert (moved[:, :2] == 0.0).all()  # the left edge value, replicated


def test_closed_form_saliency_edit_reaches_margin_minimally():
    torch.manual_seed(0)
    probe = LinearProbe("saliency", torch.randn(2, 16), grid=2)
    activation = torch.randn(1, 4, 16)
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    edited = closed_form_saliency_edit(activation, probe, target, torch.tensor(2.0))
    u = probe.weight[1] - probe.weight[0]
    margins = (edited @ u) * (target * 2 - 1)
    assert (margins >= 2.0 - 1e-4).all()
    # Each token's change is parallel to u, the direction of least norm.
    change = (edited - activation)[0]
    for token_change in change:
        if token_change.norm() > 0:
            cosine = torch.nn.functional.cosine_similarity(token_change, u, dim=0).abs()
            assert cosine == pytest.approx(1.0, abs=1e-5)


def test_closed_form_depth_edit_hits_target_exactly():
    torch.manual_seed(1)
    probe = LinearProbe("depth", torch.randn(1, 8), grid=2)
    activation = torch.randn(2, 4, 8)
    target = torch.randn(2, 4)
    edited = closed_form_depth_edit(activation, probe, target)
    assert torch.allclose(edited @ probe.weight[0], target, atol=1e-5)


def test_gradient_edit_moves_prediction_to_target():
    torch.manual_seed(2)
    probe = LinearProbe("saliency", torch.randn(2, 16), grid=2)
    activation = torch.randn(1, 4, 16)
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    edited = gradient_edit(activation, probe, target, iterations=400, learning_rate=5e-2)
    predicted = (edited @ probe.weight.T).argmax(-1)
    assert torch.equal(predicted, target.long())


def test_intervention_settings_defaults_follow_method():
    saliency = InterventionSettings()
    assert saliency.default_steps() == [0, 1, 2, 3, 4]
    layers = ["down_blocks.0.a.attn1", "mid_block.a.attn1", "up_blocks.1.a.attn1"]
    assert saliency.default_layers(layers) == ["up_blocks.1.a.attn1"]
    depth = InterventionSettings(task="depth")
    assert depth.default_steps() == [0, 1, 2]
    assert depth.default_layers(layers) == layers
    with pytest.raises(ValueError, match="method"):
        InterventionSettings(method="magic")


def test_gif_reopens_with_duration_and_loop(tmp_path):
    frames = [np.full((16, 16, 3), value, np.uint8) for value in (0, 120, 240)]
    path = write_gif(frames, tmp_path / "moving.gif", duration_ms=100, loop=0)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
        assert gif.info["loop"] == 0
        for index in range(3):
            gif.seek(index)
            assert gif.info["duration"] == 100


def test_gif_rejects_mixed_shapes(tmp_path):
    with pytest.raises(ValueError, match="one shape"):
        write_gif([np.zeros((8, 8, 3)), np.zeros((9, 8, 3))], tmp_path / "bad.gif")


def test_back_and_forth_path_returns_to_start():
    path = back_and_forth_path(-10, 10, 8)
    assert len(path) == 8
    assert path[0] == -10
    assert max(path) == 10
    assert path[-1] > path[0]

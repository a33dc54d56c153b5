"""Tests for helpers.original_probes on files written in the released probes' layout."""

import logging

import pytest
import torch
from diffusers import UNet2DConditionModel

from helpers.hooks import LayerInfo, find_self_attention_layers
from helpers.models import SD_V1_UNET_CONFIG
from helpers.original_probes import (
    ORIGINAL_DEPTH_MEAN,
    ORIGINAL_DEPTH_STD,
    ORIGINAL_MODEL,
    convert_original_probes,
    diffusers_layer_name,
    find_original_probes,
    original_layer_names,
    original_timesteps,
)
from helpers.probe_checkpoints import ProbeCheckpoint, load_probe

UP_1_FIRST = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def write_probe(folder, step: int, name: str, outputs: int, width: int, seed: int, bias=False):
    generator = torch.Generator().manual_seed(seed)
    state = {"dense1.weight": torch.randn(outputs, width, generator=generator)}
    if bias:
        state["dense1.bias"] = torch.zeros(outputs)
    path = folder / f"at_step_{step}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state["dense1.weight"]


@pytest.fixture
def released(tmp_path):
    """Two steps of up_1 and mid probes, best and final, plus files to skip."""
    folder = tmp_path / "probe_checkpoints"
    weights = {}
    for step in (0, 7):
        weights[("saliency", "up_1", step)] = write_probe(
            folder, step, "segmentation_probe_up_1_attn1_out_0.pth", 2, 1280, step
        )
        write_probe(folder, step, "segmentation_probe_up_1_attn1_out_0_final.pth", 2, 1280, 99)
        weights[("depth", "up_1", step)] = write_probe(
            folder, step, "regression_probe_up_1_attn1_out_0_linear_no_bias.pth", 1, 1280, 10
        )
        weights[("depth", "mid", step)] = write_probe(
            folder, step, "regression_probe_mid_0_attn1_out_0_linear_no_bias.pth", 1, 1280, 11
        )
        # A probe with a bias and a shading probe have no LinearProbe equivalent.
        write_probe(folder, step, "regression_probe_up_1_attn1_out_0.pth", 1, 1280, 12, bias=True)
        write_probe(
            folder,
            step,
            "regression_probe_up_3_attn1_out_0_final_linear_no_bias_unsmoothed_lr0.01.pth",
            1,
            320,
            13,
        )
    return folder, weights


def test_layer_names_match_sd_unet():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_V1_UNET_CONFIG)
    names = [name for name, _ in find_self_attention_layers(unet)]
    assert list(original_layer_names()) == names


def test_layer_name_mapping():
    assert diffusers_layer_name("up", 1, 0) == UP_1_FIRST
    assert diffusers_layer_name("down", 2, 1) == (
        "down_blocks.2.attentions.1.transformer_blocks.0.attn1"
    )
    assert diffusers_layer_name("mid", 0, 0) == "mid_block.attentions.0.transformer_blocks.0.attn1"


def test_converter_writes_both_tasks(released, tmp_path):
    folder, weights = released
    written = convert_original_probes(folder, tmp_path / "converted")
    assert sorted(written) == ["depth", "saliency"]

    saliency = ProbeCheckpoint.load(written["saliency"])
    assert saliency.model == ORIGINAL_MODEL
    assert saliency.layers == [UP_1_FIRST]
    assert saliency.steps == [0, 7]
    entry = saliency.entries[f"{UP_1_FIRST}@7"]
    assert entry.grid == (16, 16)
    assert entry.width == 1280
    assert entry.timestep == original_timesteps()[7]

    depth = ProbeCheckpoint.load(written["depth"])
    assert set(depth.layers) == {UP_1_FIRST, "mid_block.attentions.0.transformer_blocks.0.attn1"}
    assert depth.entries[f"{UP_1_FIRST}@0"].depth_mean == ORIGINAL_DEPTH_MEAN
    assert depth.entries[f"{UP_1_FIRST}@0"].depth_std == ORIGINAL_DEPTH_STD


def test_converted_probe_predicts_like_original(released, tmp_path):
    folder, weights = released
    written = convert_original_probes(folder, tmp_path / "converted")
    layer = LayerInfo(UP_1_FIRST, "up_1", 1280, (16, 16))
    probe = load_probe(written["saliency"], layer, 7, model=ORIGINAL_MODEL)
    activations = torch.randn(2, 256, 1280, generator=torch.Generator().manual_seed(3))

    # probeLinearDense: dense1 (no bias) per token, argmax over the 2 logits.
    expected = (activations @ weights[("saliency", "up_1", 7)].T).argmax(-1).bool()
    assert torch.equal(probe.predict_grid(activations).reshape(2, -1), expected)


def test_final_weights_selectable(released, tmp_path):
    folder, _ = released
    files = find_original_probes(folder, final=True)
    assert {file.path.name for file in files} == {"segmentation_probe_up_1_attn1_out_0_final.pth"}


def test_unconvertible_files_logged(released, caplog):
    folder, _ = released
    with caplog.at_level(logging.WARNING, logger="helpers.original_probes"):
        files = find_original_probes(folder)
    assert len(files) == 6
    assert "not linear attn1 probes without bias" in caplog.text


def test_ambiguous_depth_suffix_fails(released):
    folder, _ = released
    write_probe(
        folder, 0, "regression_probe_up_1_attn1_out_0_linear_no_bias_unsmoothed.pth", 1, 1280, 5
    )
    with pytest.raises(ValueError, match="depth_suffix="):
        find_original_probes(folder)
    files = find_original_probes(folder, depth_suffix="_linear_no_bias_unsmoothed")
    assert [file.step for file in files if file.task == "depth"] == [0]


def test_wrong_width_for_block_fails(tmp_path):
    folder = tmp_path / "released"
    write_probe(folder, 0, "segmentation_probe_down_0_attn1_out_0.pth", 2, 640, 0)
    with pytest.raises(ValueError, match="attn1 layers of down_0 in SD v1.x are 320 wide"):
        convert_original_probes(folder, tmp_path / "converted")


def test_empty_folder_fails(tmp_path):
    (tmp_path / "at_step_0").mkdir()
    with pytest.raises(FileNotFoundError, match="segmentation_probe_up_1_attn1_out_0.pth"):
        find_original_probes(tmp_path)


def test_missing_folder_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="at_step_N"):
        find_original_probes(tmp_path / "missing")

"""Tests for helpers.probe_checkpoints: round trips and the checks applied on load."""

import pytest
import torch
from safetensors.torch import save_file

from helpers.hooks import LayerInfo
from helpers.probe_checkpoints import (
    ProbeCheckpoint,
    ProbeEntry,
    ProbeMismatchError,
    load_probe,
    probe_from_state_dict,
    probe_state_dict,
)
from helpers.probes import LinearProbe

MODEL = "CompVis/stable-diffusion-v1-4"
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
WIDE_LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
GRID = 8


def random_probe(task: str, width: int = 320, seed: int = 0) -> LinearProbe:
    generator = torch.Generator().manual_seed(seed)
    outputs = 2 if task == "saliency" else 1
    return LinearProbe(task, torch.randn(outputs, width, generator=generator), GRID, 1.5, 2.0)


def activations(width: int = 320, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, GRID * GRID, width, generator=generator)


def checkpoint_with(probe: LinearProbe, step: int = 4) -> ProbeCheckpoint:
    checkpoint = ProbeCheckpoint(model=MODEL, task=probe.task)
    entry = ProbeEntry(
        layer=LAYER,
        step=step,
        timestep=601.0,
        width=probe.width,
        grid=(GRID, GRID),
        depth_mean=probe.depth_mean,
        depth_std=probe.depth_std,
        metrics={"rmse": 0.5} if probe.task == "depth" else {"dice": 0.8},
    )
    checkpoint.add(entry, probe)
    return checkpoint


@pytest.mark.parametrize("task", ["saliency", "depth"])
def test_safetensors_round_trip_predicts_identically(tmp_path, task):
    probe = random_probe(task)
    path = checkpoint_with(probe).save(tmp_path / f"{task}.safetensors")
    layer = LayerInfo(LAYER, "down_0", 320, (GRID, GRID))
    loaded = load_probe(path, layer, 4, model=MODEL)
    assert torch.equal(loaded.predict_grid(activations()), probe.predict_grid(activations()))
    assert loaded.depth_mean == probe.depth_mean
    assert loaded.depth_std == probe.depth_std


def test_metadata_survives_round_trip(tmp_path):
    probe = random_probe("depth")
    path = checkpoint_with(probe).save(tmp_path / "depth.safetensors")
    loaded = ProbeCheckpoint.load(path)
    entry = loaded.entries[f"{LAYER}@4"]
    assert loaded.model == MODEL
    assert loaded.task == "depth"
    assert loaded.unet_variant == "original"
    assert entry.timestep == 601.0
    assert entry.grid == (GRID, GRID)
    assert entry.metrics == {"rmse": 0.5}
    assert loaded.layers == [LAYER]
    assert loaded.steps == [4]


def test_torch_state_dict_round_trip(tmp_path):
    probe = random_probe("saliency")
    path = tmp_path / "probe.pth"
    torch.save(probe_state_dict(probe), path)
    state = torch.load(path)  # weights_only=True is the default since torch 2.6
    loaded = probe_from_state_dict(state, "saliency", GRID)
    assert torch.equal(loaded.weight, probe.weight)
    assert torch.equal(loaded.predict_grid(activations()), probe.predict_grid(activations()))


def test_state_dict_with_bias_rejected():
    state = {"dense1.weight": torch.zeros(1, 8), "dense1.bias": torch.zeros(1)}
    with pytest.raises(ValueError, match="without bias"):
        probe_from_state_dict(state, "depth", 2)


def test_narrow_probe_on_wide_layer_fails(tmp_path):
    path = checkpoint_with(random_probe("saliency", width=320)).save(tmp_path / "s.safetensors")
    layer = LayerInfo(LAYER, "down_0", 640, (GRID, GRID))
    with pytest.raises(
        ProbeMismatchError, match="reads 320-wide activations, but the layer is 640"
    ):
        load_probe(path, layer, 4, model=MODEL)


def test_probe_of_other_model_fails(tmp_path):
    path = checkpoint_with(random_probe("depth")).save(tmp_path / "d.safetensors")
    layer = LayerInfo(LAYER, "down_0", 320, (GRID, GRID))
    with pytest.raises(ProbeMismatchError, match="fitted on model 'CompVis.*not on 'toy'"):
        load_probe(path, layer, 4, model="toy")


def test_probe_of_other_variant_fails(tmp_path):
    path = checkpoint_with(random_probe("depth")).save(tmp_path / "d.safetensors")
    layer = LayerInfo(LAYER, "down_0", 320, (GRID, GRID))
    with pytest.raises(ProbeMismatchError, match="'shuffled' variant"):
        load_probe(path, layer, 4, model=MODEL, unet_variant="shuffled")


def test_probe_on_other_grid_fails(tmp_path):
    path = checkpoint_with(random_probe("depth")).save(tmp_path / "d.safetensors")
    layer = LayerInfo(LAYER, "down_0", 320, (16, 16))
    with pytest.raises(ProbeMismatchError, match="8x8 grid, but the layer has a 16x16"):
        load_probe(path, layer, 4, model=MODEL)


def test_missing_layer_or_step_lists_available(tmp_path):
    path = checkpoint_with(random_probe("depth")).save(tmp_path / "d.safetensors")
    with pytest.raises(ProbeMismatchError, match=r"at steps \[4\]"):
        load_probe(path, LayerInfo(LAYER, "down_0", 320, (GRID, GRID)), 5, model=MODEL)
    with pytest.raises(ProbeMismatchError, match="No depth probe for layer"):
        load_probe(path, LayerInfo(WIDE_LAYER, "down_1", 640, (4, 4)), 4, model=MODEL)


def test_foreign_safetensors_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a probe checkpoint"):
        ProbeCheckpoint.load(path)


def test_missing_file_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep_run"):
        ProbeCheckpoint.load(tmp_path / "missing.safetensors")


def test_add_rejects_other_task():
    checkpoint = ProbeCheckpoint(model=MODEL, task="depth")
    entry = ProbeEntry(layer=LAYER, step=0, timestep=None, width=320, grid=(GRID, GRID))
    with pytest.raises(ValueError, match="one checkpoint per task"):
        checkpoint.add(entry, random_probe("saliency"))


def test_save_empty_checkpoint_fails(tmp_path):
    with pytest.raises(ValueError, match="no probes"):
        ProbeCheckpoint(model=MODEL, task="depth").save(tmp_path / "empty.safetensors")

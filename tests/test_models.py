"""Tests for helpers.models: loading, the shuffled-UNet control and the random SD builders."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from helpers import models
from helpers.models import (
    ModelNotFoundError,
    build_toy_pipeline_random,
    load_ldm,
    pipeline_with_unet,
    shuffled_unet,
    validate_device_and_dtype,
)
from helpers.toyworld.architecture import build_unet


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    """A random-weight toy pipeline saved in diffusers layout."""
    folder = tmp_path_factory.mktemp("toy_ldm")
    build_toy_pipeline_random(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def toy_unet():
    torch.manual_seed(0)
    return build_unet().eval()


def test_load_local_folder(toy_folder):
    pipe = load_ldm(toy_folder)

    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32
    assert pipe.unet.device.type == "cpu"
    assert not pipe.unet.training


def test_load_folder_keeps_weights(toy_folder):
    saved = build_toy_pipeline_random(seed=0)
    loaded = load_ldm(str(toy_folder))

    for name, parameter in saved.unet.state_dict().items():
        assert torch.equal(parameter, loaded.unet.state_dict()[name]), name


def test_load_toy_uses_toy_folder(toy_folder, monkeypatch):
    monkeypatch.setattr(models, "toy_ldm_dir", lambda: toy_folder)

    pipe = load_ldm("toy")

    assert isinstance(pipe, StableDiffusionPipeline)


def test_load_toy_missing(tmp_path, monkeypatch):
    missing = tmp_path / "toy_ldm"
    monkeypatch.setattr(models, "toy_ldm_dir", lambda: missing)

    with pytest.raises(ModelNotFoundError, match="toy LDM was not found") as error:
        load_ldm("toy")

    assert str(missing) in str(error.value)


def test_load_folder_without_model_index(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_ldm(tmp_path)


def test_load_file_rejected(toy_folder):
    with pytest.raises(ModelNotFoundError, match="is a file"):
        load_ldm(toy_folder / "model_index.json")


def test_load_missing_path():
    with pytest.raises(ModelNotFoundError, match="neither an existing folder"):
        load_ldm("./no/such/folder")


def test_load_hub_id_offline():
    model_id = "no-such-owner-x7q/no-such-model-x7q"

    with pytest.raises(ModelNotFoundError) as error:
        load_ldm(model_id, local_files_only=True)

    message = str(error.value)
    assert model_id in message
    assert "huggingface-cli login" in message
    assert "model='toy'" in message
    assert error.value.__cause__ is not None


def test_model_not_found_is_value_error():
    assert issubclass(ModelNotFoundError, ValueError)


def test_float16_on_cpu_rejected():
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        load_ldm("toy", device="cpu", dtype=torch.float16)


def test_invalid_device_rejected():
    with pytest.raises(ValueError, match="Invalid device"):
        validate_device_and_dtype("gpu0", torch.float32)


def test_unsupported_dtype_rejected():
    with pytest.raises(ValueError, match="Unsupported dtype"):
        validate_device_and_dtype("cpu", torch.int8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_rejected():
    with pytest.raises(ValueError, match="CUDA is not available"):
        validate_device_and_dtype("cuda", torch.float32)


def test_shuffle_keeps_each_tensor_distribution(toy_unet):
    shuffled = shuffled_unet(toy_unet, seed=0)
    original = dict(toy_unet.named_parameters())

    changed = 0
    for name, parameter in shuffled.named_parameters():
        values, _ = parameter.detach().flatten().sort()
        original_values, _ = original[name].detach().flatten().sort()
        assert torch.equal(values, original_values), name
        assert parameter.shape == original[name].shape, name
        changed += not torch.equal(parameter, original[name])
    assert changed > len(original) // 2


def test_shuffle_leaves_original_unchanged(toy_unet):
    before = {name: tensor.clone() for name, tensor in toy_unet.state_dict().items()}

    shuffled_unet(toy_unet, seed=0)

    for name, tensor in toy_unet.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_shuffle_depends_only_on_seed(toy_unet):
    first = shuffled_unet(toy_unet, seed=3).state_dict()
    second = shuffled_unet(toy_unet, seed=3).state_dict()
    other = shuffled_unet(toy_unet, seed=4).state_dict()

    weight = "down_blocks.0.resnets.0.conv1.weight"
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first[weight], other[weight])


def test_reinit_builds_fresh_weights(toy_unet):
    # The fixture was initialised from seed 0, which reinit would reproduce exactly.
    fresh = shuffled_unet(toy_unet, seed=5, mode="reinit")
    again = shuffled_unet(toy_unet, seed=5, mode="reinit")

    weight = "down_blocks.0.resnets.0.conv1.weight"
    assert isinstance(fresh, UNet2DConditionModel)
    assert dict(fresh.config) == dict(toy_unet.config)
    assert not torch.equal(fresh.state_dict()[weight], toy_unet.state_dict()[weight])
    assert torch.equal(fresh.state_dict()[weight], again.state_dict()[weight])
    assert fresh.training == toy_unet.training


def test_reinit_rejects_plain_module():
    with pytest.raises(TypeError, match="mode='shuffle'"):
        shuffled_unet(torch.nn.Linear(2, 2), mode="reinit")


def test_unknown_mode_rejected(toy_unet):
    with pytest.raises(ValueError, match="Unknown mode"):
        shuffled_unet(toy_unet, mode="zero")


def test_pipeline_with_unet_swaps_only_unet(toy_folder, toy_unet):
    pipe = load_ldm(toy_folder)

    swapped = pipeline_with_unet(pipe, toy_unet)

    assert swapped.unet is toy_unet
    assert swapped.vae is pipe.vae
    assert swapped.text_encoder is pipe.text_encoder
    assert pipe.unet is not toy_unet


def test_weights_digest_equal_for_copies(toy_unet):
    copy = models.shuffled_unet(toy_unet, seed=0, mode="reinit")
    copy.load_state_dict(toy_unet.state_dict())

    assert models.weights_digest(copy) == models.weights_digest(toy_unet)


def test_weights_digest_changes_with_weights(toy_unet):
    shuffled = models.shuffled_unet(toy_unet, seed=0)

    assert models.weights_digest(shuffled) != models.weights_digest(toy_unet)


def test_weights_digest_accepts_bfloat16():
    layer = torch.nn.Linear(3, 2).to(torch.bfloat16)

    assert len(models.weights_digest(layer, length=12)) == 12

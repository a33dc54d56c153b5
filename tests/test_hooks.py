"""Tests for helpers.hooks on the toy UNet and on the full-size SD v1.x UNet (random weights)."""

import pytest
import torch

from helpers.hooks import (
    ActivationStore,
    edit_activations,
    find_self_attention_layers,
    find_vae_decoder_self_attention,
    layer_infos,
    record_activations,
    vae_decoder_attention_output,
)
from helpers.models import SD_V1_UNET_CONFIG, build_sd_unet_random
from helpers.toyworld.architecture import LATENT_SIZE, TEXT_WIDTH, build_unet, build_vae


@pytest.fixture(scope="module")
def toy_unet():
    torch.manual_seed(0)
    return build_unet().eval()


@pytest.fixture(scope="module")
def sd_unet():
    return build_sd_unet_random(sample_size=64, seed=0)


@pytest.fixture(scope="module")
def unet_inputs():
    """Latents and text embeddings for a batch [unconditional; conditional] of two images."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    text = torch.randn(4, 24, TEXT_WIDTH, generator=generator)
    return latents, text


def run_unet(unet, inputs, timestep=500):
    latents, text = inputs
    with torch.no_grad():
        return unet(latents, timestep, encoder_hidden_states=text).sample


def hook_count(unet):
    count = len(unet._forward_pre_hooks) + len(unet._forward_hooks)
    for _, module in find_self_attention_layers(unet):
        count += len(module._forward_hooks) + len(module._forward_pre_hooks)
    return count


def test_toy_layer_names_and_order(toy_unet):
    names = [name for name, _ in find_self_attention_layers(toy_unet)]

    assert names == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn1",
    ]


def test_toy_layer_infos(toy_unet):
    infos = layer_infos(toy_unet, LATENT_SIZE)

    assert [info.block for info in infos] == [
        "down_0",
        "down_1",
        "mid",
        "up_1",
        "up_1",
        "up_2",
        "up_2",
    ]
    assert [info.width for info in infos] == [32, 64, 64, 64, 64, 32, 32]
    assert [info.grid[0] for info in infos] == [16, 8, 4, 8, 8, 16, 16]
    assert all(info.grid[0] == info.grid[1] for info in infos)
    assert infos[0].tokens == 256


@pytest.mark.slow
def test_sd_unet_matches_published_config(sd_unet):
    assert tuple(sd_unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert sd_unet.config.cross_attention_dim == 768
    assert tuple(sd_unet.config.down_block_types) == SD_V1_UNET_CONFIG["down_block_types"]
    # Stable Diffusion v1.x's UNet has 859,520,964 parameters.
    assert sum(parameter.numel() for parameter in sd_unet.parameters()) == 859_520_964


@pytest.mark.slow
def test_sd_layer_names(sd_unet):
    names = [name for name, _ in find_self_attention_layers(sd_unet)]

    assert len(names) == 16
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert names[6] == "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert names[-1] == "up_blocks.3.attentions.2.transformer_blocks.0.attn1"


@pytest.mark.slow
def test_sd_layer_infos_at_latent_64(sd_unet):
    infos = layer_infos(sd_unet, 64)

    blocks = [info.block for info in infos]
    assert blocks == ["down_0"] * 2 + ["down_1"] * 2 + ["down_2"] * 2 + ["mid"] + (
        ["up_1"] * 3 + ["up_2"] * 3 + ["up_3"] * 3
    )
    widths = [info.width for info in infos]
    assert widths == [320, 320, 640, 640, 1280, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3
    grids = [info.grid for info in infos]
    expected_sides = [64, 64, 32, 32, 16, 16, 8] + [16] * 3 + [32] * 3 + [64] * 3
    assert grids == [(side, side) for side in expected_sides]


@pytest.mark.slow
def test_sd_layer_infos_at_latent_8(sd_unet):
    grids = {info.block: info.grid for info in layer_infos(sd_unet, 8)}

    assert grids == {
        "down_0": (8, 8),
        "down_1": (4, 4),
        "down_2": (2, 2),
        "mid": (1, 1),
        "up_1": (2, 2),
        "up_2": (4, 4),
        "up_3": (8, 8),
    }


def test_no_self_attention_raises():
    with pytest.raises(ValueError, match="No self-attention"):
        find_self_attention_layers(torch.nn.Linear(2, 2))


def test_vae_decoder_attention_found():
    name, module = find_vae_decoder_self_attention(build_vae())

    assert name == "decoder.mid_block.attentions.0"
    assert module.to_out[0].out_features == 64


def test_vae_decoder_attention_output_matches_decode():
    torch.manual_seed(0)
    vae = build_vae().eval()
    latents = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE)
    _, attention = find_vae_decoder_self_attention(vae)
    seen = []
    handle = attention.register_forward_hook(lambda module, args, output: seen.append(output))

    with torch.no_grad():
        early = vae_decoder_attention_output(vae, latents)
        hooks_after_call = len(attention._forward_hooks)
        vae.decode(latents / vae.config.scaling_factor)
    handle.remove()

    assert early.shape == (2, LATENT_SIZE * LATENT_SIZE, 64)
    full = seen[-1].flatten(2).transpose(1, 2)
    assert torch.equal(early, full)
    assert hooks_after_call == 1


def test_recording_calls_in_network_order(toy_unet, unet_inputs):
    with record_activations(toy_unet, guidance_batches=2) as store:
        run_unet(toy_unet, unet_inputs)

    assert store.layers == [name for name, _ in find_self_attention_layers(toy_unet)]
    assert store.steps == [0]


def test_recording_keeps_outputs(toy_unet, unet_inputs):
    expected = run_unet(toy_unet, unet_inputs)

    with record_activations(toy_unet, guidance_batches=2):
        recorded = run_unet(toy_unet, unet_inputs)

    assert torch.equal(recorded, expected)


def test_hooks_removed_after_context(toy_unet, unet_inputs):
    before = hook_count(toy_unet)

    with record_activations(toy_unet, guidance_batches=2):
        assert hook_count(toy_unet) == before + 8
        run_unet(toy_unet, unet_inputs)

    assert hook_count(toy_unet) == before


def test_hooks_removed_after_exception(toy_unet, unet_inputs):
    before = hook_count(toy_unet)

    with pytest.raises(KeyError, match="inside"):
        with record_activations(toy_unet, guidance_batches=2):
            run_unet(toy_unet, unet_inputs)
            raise KeyError("inside")

    assert hook_count(toy_unet) == before


def test_recording_keeps_conditional_half(toy_unet, unet_inputs):
    with record_activations(toy_unet, guidance_batches=1) as whole:
        run_unet(toy_unet, unet_inputs)
    with record_activations(toy_unet, guidance_batches=2) as conditional:
        run_unet(toy_unet, unet_inputs)

    for key in whole:
        assert conditional[key].shape[0] == 2
        assert torch.equal(conditional[key], whole[key][2:]), key


def test_recorded_shape_is_batch_tokens_width(toy_unet, unet_inputs):
    with record_activations(toy_unet, guidance_batches=2, dtype=torch.float16) as store:
        run_unet(toy_unet, unet_inputs)

    for info in layer_infos(toy_unet, LATENT_SIZE):
        activation = store[(info.name, 0)]
        assert activation.shape == (2, info.tokens, info.width), info.name
        assert activation.dtype == torch.float16
        assert activation.device.type == "cpu"


def test_step_index_counts_unet_calls(toy_unet, unet_inputs):
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"

    with record_activations(toy_unet, guidance_batches=2, layers=[layer], steps=[1, 2]) as store:
        for timestep in (900, 500, 100):
            run_unet(toy_unet, unet_inputs, timestep)

    assert sorted(store) == [(layer, 1), (layer, 2)]
    assert store.stack_steps(layer).shape == (2, 2, 16, 64)


def test_zero_layers_rejected(toy_unet):
    with pytest.raises(ValueError, match="selects no layer"):
        with record_activations(toy_unet, guidance_batches=2, layers=[]):
            pass


def test_unknown_layer_rejected(toy_unet):
    with pytest.raises(ValueError, match="Unknown self-attention layers"):
        with record_activations(toy_unet, guidance_batches=2, layers=["down_blocks.9.attn1"]):
            pass


def test_nothing_recorded_raises(toy_unet):
    with pytest.raises(RuntimeError, match="No activation was recorded in 0 UNet calls"):
        with record_activations(toy_unet, guidance_batches=2):
            pass


def test_invalid_guidance_batches_rejected(toy_unet):
    with pytest.raises(ValueError, match="guidance_batches"):
        with record_activations(toy_unet, guidance_batches=3):
            pass


def test_odd_batch_with_guidance_raises(toy_unet, unet_inputs):
    latents, text = unet_inputs

    with pytest.raises(RuntimeError, match="guidance halves"):
        with record_activations(toy_unet, guidance_batches=2):
            run_unet(toy_unet, (latents[:3], text[:3]))


def test_edit_nothing_selected_is_identity(toy_unet, unet_inputs):
    expected = run_unet(toy_unet, unet_inputs)
    before = hook_count(toy_unet)

    def fail(layer, step, activation):
        raise AssertionError("edit_fn must not be called")

    for layers, steps in (([], [0]), (["mid_block.attentions.0.transformer_blocks.0.attn1"], [])):
        with edit_activations(
            toy_unet, fail, layers=layers, steps=steps, guidance_batches=2
        ) as edited:
            assert hook_count(toy_unet) == before
            output = run_unet(toy_unet, unet_inputs)
        assert torch.equal(output, expected)
        assert edited == []


def test_edit_replaces_conditional_half(toy_unet, unet_inputs):
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    expected = run_unet(toy_unet, unet_inputs)
    with record_activations(toy_unet, guidance_batches=1, layers=[layer]) as original:
        run_unet(toy_unet, unet_inputs)

    def zero(layer, step, activation):
        assert activation.shape == (2, 64, 64)
        return torch.zeros_like(activation)

    with edit_activations(toy_unet, zero, layers=[layer], steps=[0], guidance_batches=2) as edited:
        with record_activations(toy_unet, guidance_batches=1, layers=[layer]) as seen:
            output = run_unet(toy_unet, unet_inputs)

    assert edited == [(layer, 0)]
    assert torch.equal(seen[(layer, 0)][:2], original[(layer, 0)][:2])
    assert torch.count_nonzero(seen[(layer, 0)][2:]) == 0
    assert not torch.equal(output[2:], expected[2:])
    assert hook_count(toy_unet) == 0


def test_edit_skips_unselected_steps(toy_unet, unet_inputs):
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    calls = []

    def keep(layer, step, activation):
        calls.append(step)
        return activation

    with edit_activations(toy_unet, keep, layers=[layer], steps=[1], guidance_batches=2):
        for timestep in (900, 500, 100):
            run_unet(toy_unet, unet_inputs, timestep)

    assert calls == [1]


def test_edit_wrong_shape_raises(toy_unet, unet_inputs):
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"

    with pytest.raises(RuntimeError, match="return a tensor of the activation's shape"):
        with edit_activations(
            toy_unet, lambda *args: torch.zeros(1), layers=[layer], steps=[0], guidance_batches=2
        ):
            run_unet(toy_unet, unet_inputs)
    assert hook_count(toy_unet) == 0


def test_edit_never_applied_raises(toy_unet):
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"

    with pytest.raises(RuntimeError, match="No activation was edited"):
        with edit_activations(
            toy_unet, lambda *args: args[2], layers=[layer], steps=[0], guidance_batches=2
        ):
            pass


def test_store_concatenates_batches():
    first, second = ActivationStore(), ActivationStore()
    first.add("layer", 0, torch.zeros(2, 4, 3))
    second.add("layer", 0, torch.ones(1, 4, 3))

    joined = ActivationStore.concatenate([first, second])

    assert joined[("layer", 0)].shape == (3, 4, 3)
    assert torch.equal(joined[("layer", 0)][2], torch.ones(4, 3))


def test_store_rejects_duplicate_key():
    store = ActivationStore()
    store.add("layer", 0, torch.zeros(1))

    with pytest.raises(RuntimeError, match="recorded twice"):
        store.add("layer", 0, torch.zeros(1))

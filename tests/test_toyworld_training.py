"""Training of the toy LDM: loss weighting, the position heads, checkpoints, resume, export."""

import copy
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from helpers.paths import TOY_LDM_DIR
from helpers.toyworld.architecture import (
    build_text_encoder,
    build_training_scheduler,
    build_unet,
)
from helpers.toyworld.position_loss import PositionHeads, coordinate_maps
from helpers.toyworld.tokenizer import save_tokenizer
from helpers.toyworld.train import main as train_main
from helpers.toyworld.train_ldm import (
    CLEAN_LATENT_WEIGHT_FLOOR,
    MIN_SNR_GAMMA,
    NOISY_HALF_START,
    export_pipeline,
    loss_weights,
    noisy_biased_timesteps,
    train_ldm,
)
from helpers.toyworld.training_state import load_model_weights, save_training_state


def test_coordinate_maps_span_image():
    maps = coordinate_maps(torch.zeros(2, 5, 4, 8))

    assert maps.shape == (2, 2, 4, 8)
    columns, rows = maps[0]
    assert columns[0, 0] == -1.0
    assert columns[0, -1] == 1.0
    assert torch.all(columns[:, 1:] > columns[:, :-1])
    assert rows[0, 0] == -1.0
    assert rows[-1, 0] == 1.0
    assert torch.all(rows[1:] > rows[:-1])


def test_position_heads_train_unet():
    torch.manual_seed(0)
    unet = build_unet()
    heads = PositionHeads(unet)
    assert len(heads.block_names) == 7  # 2 down, 1 mid and 4 up attention blocks
    assert all(
        name.split(".")[0] in {"down_blocks", "mid_block", "up_blocks"}
        for name in heads.block_names
    )

    latents = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 6, unet.config.cross_attention_dim)
    unet(latents, torch.tensor([10, 900]), text)
    loss = heads.loss()
    loss.backward()

    assert torch.isfinite(loss)
    assert loss > 0
    # The loss reaches the UNet's own weights, not only the heads.
    assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="forward pass"):
        heads.loss()

    heads.remove()
    unet(latents, torch.tensor([10, 900]), text)
    with pytest.raises(RuntimeError, match="forward pass"):
        heads.loss()


def test_loss_weights_add_a_floor_to_min_snr():
    snr = build_training_scheduler().alphas_cumprod
    snr = snr / (1.0 - snr)
    weights = loss_weights(snr)

    expected = (torch.clamp(snr, max=MIN_SNR_GAMMA) + CLEAN_LATENT_WEIGHT_FLOOR) / snr
    torch.testing.assert_close(weights, expected)
    # Min-SNR down-weights the least noisy step, and the floor lifts the noisiest one above 1.
    assert weights[0] < 0.1
    assert weights[-1] > 10.0


def test_noisy_biased_timesteps_halves():
    generator = torch.Generator().manual_seed(0)
    timesteps = noisy_biased_timesteps(4000, 1000, generator)

    assert timesteps.shape == (4000,)
    assert timesteps.min() >= 0
    assert timesteps.max() < 1000
    assert timesteps[2000:].min() >= NOISY_HALF_START
    assert (timesteps[:2000] < NOISY_HALF_START).float().mean() == pytest.approx(0.5, abs=0.05)


def checkpoint_step(path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.metadata()["step"])


def test_training_resumes_and_exports(tmp_path):
    vae_dir = TOY_LDM_DIR / "vae"
    ldm_dir = tmp_path / "ldm"
    options = {"scene_count": 6, "batch_size": 2, "checkpoint_every": 1}

    checkpoint = train_ldm(ldm_dir, vae_dir, steps=1, **options)
    assert checkpoint_step(checkpoint) == 1
    assert (ldm_dir / "samples_00001.png").exists()
    first = {key: value.clone() for key, value in build_loaded_unet(checkpoint).items()}

    train_ldm(ldm_dir, vae_dir, steps=2, **options)
    assert checkpoint_step(checkpoint) == 2
    second = build_loaded_unet(checkpoint)
    assert any(not torch.equal(first[key], second[key]) for key in first)

    exported = export_pipeline(ldm_dir, vae_dir, tmp_path / "pipeline")
    pipeline = StableDiffusionPipeline.from_pretrained(exported)
    # The position heads are a training aid only; the exported UNet has the stock layout.
    assert not any("position" in key for key in pipeline.unet.state_dict())
    image = pipeline(
        "a red sphere on the left, nearby",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)


def build_loaded_unet(checkpoint) -> dict:
    unet = build_unet()
    load_model_weights(checkpoint, {"unet": unet})
    return unet.state_dict()


def test_resume_adds_missing_position_heads(tmp_path, caplog):
    # A checkpoint written before the position heads existed: models and optimizer only.
    ldm_dir = tmp_path / "ldm"
    tokenizer = save_tokenizer(tmp_path / "tokenizer")
    unet = build_unet()
    text_encoder = build_text_encoder(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    )
    optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()])
    # One real step, so the saved optimizer state contains moments to restore.
    text = text_encoder(torch.tensor([[0, 1]])).last_hidden_state
    prediction = unet(torch.randn(1, 4, 16, 16), 500, text).sample
    prediction.square().mean().backward()
    optimizer.step()
    modules = {
        "unet": unet,
        "text": text_encoder,
        "unet_ema": copy.deepcopy(unet),
        "text_ema": copy.deepcopy(text_encoder),
    }
    checkpoint = ldm_dir / "checkpoint.safetensors"
    save_training_state(checkpoint, modules, optimizer, step=1)

    with caplog.at_level(logging.INFO, logger="helpers.toyworld"):
        train_ldm(
            ldm_dir, TOY_LDM_DIR / "vae", steps=2, scene_count=6, batch_size=2, checkpoint_every=1
        )

    assert "Resumed diffusion training at step 1" in caplog.text
    assert "position_heads" in caplog.text
    assert checkpoint_step(checkpoint) == 2
    with safe_open(str(checkpoint), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(key.startswith("model.position_heads.") for key in keys)


def test_checkpoint_of_other_model_raises(tmp_path):
    other = torch.nn.Linear(2, 2)
    path = tmp_path / "checkpoint.safetensors"
    save_training_state(path, {"unet": other}, torch.optim.AdamW(other.parameters()), step=1)

    with pytest.raises(ValueError, match="does not fit the 'unet' model"):
        load_model_weights(path, {"unet": build_unet()})


def test_damaged_checkpoint_raises_with_fix(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"not a safetensors file at all")

    with pytest.raises(ValueError, match="damaged or not a safetensors file"):
        load_model_weights(path, {"unet": build_unet()})


@pytest.mark.parametrize(
    "arguments",
    [
        ["ldm", "--steps", "0"],
        ["ldm", "--batch-size", "-1"],
        ["ldm", "--scenes", "0"],
        ["ldm", "--threads", "0"],
        ["ldm", "--learning-rate", "-0.001"],
    ],
)
def test_train_cli_rejects_nonpositive_values(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(arguments)

    assert exit_info.value.code == 2
    assert "must be a positive" in capsys.readouterr().err


def test_ldm_stage_without_autoencoder_names_vae_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the vae stage first"):
        train_main(["ldm", "--work-dir", str(tmp_path), "--steps", "1"])


def test_export_without_checkpoint_names_ldm_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the ldm stage first"):
        train_main(["export", "--work-dir", str(tmp_path), "--output", str(tmp_path / "out")])

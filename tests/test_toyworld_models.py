"""The embedded toy LDM and estimators: offline loading, layout and bad inputs."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from helpers.paths import TOY_ESTIMATORS_DIR, TOY_LDM_DIR
from helpers.toyworld.estimators import ToyEstimator, validate_images
from helpers.toyworld.render import render
from helpers.toyworld.scene import caption_vocabulary
from helpers.toyworld.tokenizer import save_tokenizer


@pytest.fixture(scope="module")
def toy_pipeline():
    pipeline = StableDiffusionPipeline.from_pretrained(TOY_LDM_DIR, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def estimator():
    return ToyEstimator.from_pretrained(TOY_ESTIMATORS_DIR)


def test_toy_ldm_folder_layout_and_size():
    index = json.loads((TOY_LDM_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for component in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (TOY_LDM_DIR / component).is_dir()
    assert index["safety_checker"] == [None, None]
    weights = list(TOY_LDM_DIR.rglob("*.safetensors"))
    assert len(weights) == 3
    assert not list(TOY_LDM_DIR.rglob("*.bin"))
    total = sum(path.stat().st_size for path in TOY_LDM_DIR.rglob("*") if path.is_file())
    assert total < 30 * 2**20


def test_toy_ldm_matches_stable_diffusion_structure(toy_pipeline):
    unet = toy_pipeline.unet
    names = [name for name, _ in unet.named_modules() if name.endswith("attn1")]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in names
    assert "mid_block.attentions.0.transformer_blocks.0.attn1" in names
    assert "up_blocks.2.attentions.0.transformer_blocks.0.attn1" in names
    assert toy_pipeline.vae_scale_factor == 4
    assert unet.config.sample_size == 16
    assert toy_pipeline.scheduler.config.clip_sample is False


def test_toy_ldm_generates_offline(toy_pipeline):
    generator = torch.Generator("cpu").manual_seed(0)
    image = toy_pipeline(
        "a red sphere on the left, close to the camera",
        num_inference_steps=4,
        generator=generator,
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05


def test_tokenizer_keeps_caption_words_whole(tmp_path):
    tokenizer = save_tokenizer(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for word in caption_vocabulary():
        ids = reloaded(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} split into {reloaded.convert_ids_to_tokens(ids)}"
    assert len(reloaded) == len(tokenizer)
    # A word outside the vocabulary falls back to characters instead of failing.
    assert len(reloaded("zebra", add_special_tokens=False).input_ids) > 1


def test_shipped_tokenizer_matches_vocabulary(toy_pipeline):
    for word in caption_vocabulary():
        assert len(toy_pipeline.tokenizer(word, add_special_tokens=False).input_ids) == 1


def test_estimator_recovers_render_labels(estimator):
    scenes = [render(900_000_000 + i) for i in range(16)]
    output = estimator.predict(np.stack([s.image for s in scenes]))
    assert output.mask.shape == (16, 64, 64)
    overlap = [
        (m & s.salient_mask).sum() / max(s.salient_mask.sum(), 1)
        for m, s in zip(output.mask, scenes, strict=True)
    ]
    assert np.mean(overlap) > 0.8
    sky = ~np.isfinite(scenes[0].depth)
    assert (output.relative_inverse_depth[0][sky] < 0.05).mean() > 0.95


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((64, 64, 3), np.uint8),
        np.full((64, 64, 3), 128, np.uint8),
        np.zeros((64, 64, 3), np.float32),
    ],
    ids=["black", "grey", "black-float"],
)
def test_estimator_on_uniform_image_gives_empty_mask(estimator, image):
    output = estimator.predict(image)
    assert output.uniform[0]
    assert not output.mask.any()
    assert np.isfinite(output.relative_inverse_depth).all()
    assert np.isfinite(output.saliency).all()


def test_estimator_accepts_grayscale_rgba_and_other_sizes(estimator):
    image = render(5).image
    grey = image.mean(axis=2).astype(np.uint8)
    rgba = np.concatenate([image, np.full((64, 64, 1), 255, np.uint8)], axis=2)
    for variant in (grey, grey[..., None], rgba):
        output = estimator.predict(variant)
        assert output.mask.shape == (1, 64, 64)
    larger = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)[:100, :120]
    output = estimator.predict(larger)
    assert output.relative_inverse_depth.shape == (1, 100, 120)
    assert np.isfinite(output.relative_inverse_depth).all()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((64, 64, 5), np.uint8), "channels"),
        (np.zeros((2, 3, 64, 64, 3), np.uint8), "shape"),
        (np.zeros((64, 64, 3), np.int64), "dtype"),
        (np.full((64, 64, 3), 3.0, np.float32), r"\[0, 1\]"),
        (np.full((64, 64, 3), np.nan, np.float32), "NaN"),
        (np.zeros((4, 4, 3), np.uint8), "at least 8x8"),
    ],
)
def test_estimator_input_errors_name_the_fix(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_images(bad)


def test_missing_estimator_weights_raise_with_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="helpers.toyworld.train estimators"):
        ToyEstimator.from_pretrained(tmp_path)

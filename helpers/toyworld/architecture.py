"""Configurations of the toy latent diffusion model, built from Stable Diffusion's classes.

The toy model keeps Stable Diffusion v1.x's structure at a fraction of its size: a diffusers
``AutoencoderKL`` maps 64x64 RGB images to a 16x16x4 latent, a ``UNet2DConditionModel`` with
cross-attention down and up blocks denoises the latent, and a transformers ``CLIPTextModel``
encodes the caption. Its self-attention layers carry Stable Diffusion's module names
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1`` and so on) on 16x16, 8x8 and 4x4
grids.
"""

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

IMAGE_SIZE = 64
LATENT_SIZE = 16
LATENT_CHANNELS = 4
TEXT_WIDTH = 64
MAX_CAPTION_TOKENS = 24

# Stable Diffusion v1.x's noise schedule, with clipping of the predicted sample switched off:
# clipping to [-1, 1] suits pixel-space models but squashes unit-variance latents.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_text_encoder(vocab_size: int, pad_token_id: int, eos_token_id: int, bos_token_id: int):
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_CAPTION_TOKENS,
        projection_dim=TEXT_WIDTH,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return CLIPTextModel(config)


def build_training_scheduler() -> DDPMScheduler:
    config = {k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"}
    return DDPMScheduler(**config)


def build_sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)

"""Training of the toy UNet and text encoder on latents of rendered scenes, and export.

The autoencoder is trained first and frozen. Each scene is encoded once, and every step draws
a fresh latent from the encoder's Gaussian posterior. Captions are recomposed from the scene's
attributes with a random phrasing at every step, so the text encoder learns the attributes
rather than one fixed sentence per image. One caption in ten is dropped (empty string) so
classifier-free guidance works at sampling time.
"""

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTokenizer

from .architecture import (
    build_sampling_scheduler,
    build_text_encoder,
    build_training_scheduler,
    build_unet,
)
from .dataset import DISTANCES, SIDES, render_training_set
from .position_loss import PositionHeads
from .scene import COLORS, SHAPES, compose_caption
from .tokenizer import save_tokenizer
from .train_vae import cosine_learning_rate, images_to_tensor
from .training_state import load_model_weights, load_training_state, save_training_state

logger = logging.getLogger(__name__)

CAPTION_DROPOUT = 0.1
# Min-SNR loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
# Weighting Strategy"): caps the weight of low-noise timesteps so they do not dominate.
MIN_SNR_GAMMA = 5.0
# The object's place is decided in the noisiest steps. There the epsilon loss weighs an
# error in the clean latent by the tiny signal-to-noise ratio (0.005 at the last timestep),
# so a caption's position words barely pull on the weights. Two measures give those steps
# more weight. Every error in the clean latent gets this much weight on top of min-SNR's
# (1.0 matches what v-prediction and EDM give the noisiest steps). And half of each batch
# draws its timesteps from the noisier half of the schedule.
CLEAN_LATENT_WEIGHT_FLOOR = 1.0
NOISY_HALF_START = 500
# Weight of the auxiliary loss that makes attention inputs carry their image coordinates.
POSITION_LOSS_WEIGHT = 0.1
PREVIEW_PROMPTS = (
    "a red sphere on the left, close to the camera",
    "a blue cube on the right, far away",
    "a yellow cone in the centre, at medium distance",
    "a green cylinder on the left, far away",
    "a purple sphere on the right, nearby",
    "a white cube in the middle, up close",
    "an orange cone on the right, at medium distance",
    "a blue cylinder in the centre, close to the camera",
)


def encode_scenes(
    vae: AutoencoderKL, images: np.ndarray, cache: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Return the posterior mean and standard deviation of every image, cached on disk."""
    if cache.exists():
        with np.load(cache, allow_pickle=False) as archive:
            return archive["mean"], archive["std"]
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            posterior = vae.encode(images_to_tensor(images[start : start + 256])).latent_dist
            means.append(posterior.mean.numpy())
            stds.append(posterior.std.numpy())
    mean, std = np.concatenate(means), np.concatenate(stds)
    partial = cache.with_suffix(".partial.npz")
    np.savez(partial, mean=mean, std=std)
    partial.replace(cache)
    return mean, std


def random_captions(data: dict, index: np.ndarray, rng: np.random.Generator) -> list[str]:
    colors, sides = list(COLORS), SIDES
    captions = []
    for i in index:
        if rng.random() < CAPTION_DROPOUT:
            captions.append("")
            continue
        captions.append(
            compose_caption(
                colors[data["color"][i]],
                SHAPES[data["shape"][i]],
                sides[data["side"][i]],
                DISTANCES[data["distance"][i]],
                phrasing=int(rng.integers(1 << 30)),
            )
        )
    return captions


def require_vae(vae_dir: str | Path) -> Path:
    """Return the trained autoencoder's folder, or raise naming the stage that writes it."""
    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"No trained autoencoder in {vae_dir}; run the vae stage first "
            "(python -m helpers.toyworld.train vae) with the same --work-dir."
        )
    return vae_dir


def noisy_biased_timesteps(count: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """Draw half of the timesteps from the whole schedule and half from its noisy half."""
    uniform = torch.randint(0, total, (count - count // 2,), generator=generator)
    noisy = torch.randint(NOISY_HALF_START, total, (count // 2,), generator=generator)
    return torch.cat([uniform, noisy])


def loss_weights(snr: torch.Tensor) -> torch.Tensor:
    """Weights of the epsilon errors: min-SNR, plus a floor on the weight of clean-latent errors.

    An epsilon error equals the clean-latent error times sqrt(SNR), so a weight w on the
    epsilon error is a weight w * SNR on the clean-latent error. Min-SNR gives it
    min(SNR, gamma); the floor adds CLEAN_LATENT_WEIGHT_FLOOR to it, so noisy steps still count.
    """
    return (torch.clamp(snr, max=MIN_SNR_GAMMA) + CLEAN_LATENT_WEIGHT_FLOOR) / snr


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


@torch.no_grad()
def update_ema(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for averaged, current in zip(average.parameters(), model.parameters(), strict=True):
        averaged.lerp_(current, 1.0 - decay)


def save_preview(vae, unet, text_encoder, tokenizer, path: Path, device) -> None:
    """Sample the preview prompts with 15 DDIM steps and write them as one image row."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=build_sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(PREVIEW_PROMPTS))]
    images = pipeline(
        list(PREVIEW_PROMPTS),
        num_inference_steps=15,
        guidance_scale=4.0,
        generator=generators,
        output_type="np",
    ).images
    row = (np.concatenate(list(images), axis=1) * 255 + 0.5).astype(np.uint8)
    Image.fromarray(row).resize((row.shape[1] * 3, row.shape[0] * 3), Image.NEAREST).save(path)


def train_ldm(
    output_dir: str | Path,
    vae_dir: str | Path,
    steps: int = 3000,
    batch_size: int = 64,
    learning_rate: float = 6e-4,
    scene_count: int = 30000,
    checkpoint_every: int = 250,
    ema_decay: float = 0.999,
    max_minutes: float | None = None,
    device: str | None = None,
) -> Path:
    """Train the UNet and text encoder, resuming from output_dir/checkpoint.safetensors."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    # 1. Frozen autoencoder, scene latents and the caption tokenizer.
    vae = AutoencoderKL.from_pretrained(require_vae(vae_dir)).eval()
    data = render_training_set(scene_count, output_dir.parent)
    latent_mean, latent_std = encode_scenes(
        vae, data["images"], output_dir / f"latents_{scene_count}.npz"
    )
    latent_mean = torch.from_numpy(latent_mean)
    latent_std = torch.from_numpy(latent_std)
    scaling = vae.config.scaling_factor
    tokenizer = save_tokenizer(output_dir / "tokenizer")

    # 2. Models, their moving averages and the optimizer.
    torch.manual_seed(0)
    unet = build_unet().to(device)
    text_encoder = build_text_encoder(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    ).to(device)
    unet_average = copy.deepcopy(unet).requires_grad_(False)
    text_average = copy.deepcopy(text_encoder).requires_grad_(False)
    # Attached after the copies, so the averaged UNet carries no hooks.
    position_heads = PositionHeads(unet).to(device)
    parameters = [*unet.parameters(), *text_encoder.parameters(), *position_heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    modules = {
        "unet": unet,
        "text": text_encoder,
        "unet_ema": unet_average,
        "text_ema": text_average,
        "position_heads": position_heads,
    }
    checkpoint = output_dir / "checkpoint.safetensors"
    step = 0
    if checkpoint.exists():
        step, _ = load_training_state(checkpoint, modules, optimizer, optional={"position_heads"})
        logger.info("Resumed diffusion training at step %d", step)
    if step >= steps:
        logger.warning(
            "The checkpoint is already at step %d of %d; pass a larger --steps to train on",
            step,
            steps,
        )

    scheduler = build_training_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    signal_to_noise = alphas_cumprod / (1.0 - alphas_cumprod)
    rng = np.random.default_rng(step)
    generator = torch.Generator("cpu").manual_seed(step)
    started = time.time()
    losses = []
    while step < steps:
        # 3. A batch of latents z_0 ~ q(z | x), scaled to unit variance, and fresh captions.
        index = rng.integers(0, len(latent_mean), size=batch_size)
        noise_for_posterior = torch.randn(latent_mean[index].shape, generator=generator)
        latents = (latent_mean[index] + latent_std[index] * noise_for_posterior) * scaling
        latents = latents.to(device)
        token_ids = tokenize(tokenizer, random_captions(data, index, rng), device)

        # 4. Forward diffusion: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) epsilon.
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = noisy_biased_timesteps(
            batch_size, scheduler.config.num_train_timesteps, generator
        ).to(device)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)

        # 5. Predict epsilon and weight each sample's error (see loss_weights); add the
        # auxiliary loss that keeps image coordinates in the attention inputs.
        text_embeddings = text_encoder(token_ids).last_hidden_state
        noise_prediction = unet(noisy_latents, timesteps, text_embeddings).sample
        weights = loss_weights(signal_to_noise[timesteps])
        per_sample = (noise_prediction - noise).pow(2).mean(dim=(1, 2, 3))
        diffusion_loss = (weights * per_sample).mean()
        position_loss = position_heads.loss()
        loss = diffusion_loss + POSITION_LOSS_WEIGHT * position_loss

        for group in optimizer.param_groups:
            group["lr"] = cosine_learning_rate(step, steps, learning_rate, warmup=200)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step += 1

        # 6. Exponential moving average, with a short warm-up so early averages are not stale.
        decay = min(ema_decay, (1 + step) / (10 + step))
        update_ema(unet_average, unet, decay)
        update_ema(text_average, text_encoder, decay)
        losses.append((diffusion_loss.item(), position_loss.item()))

        if step % 50 == 0:
            recent = np.mean(losses[-50:], axis=0)
            logger.info(
                "ldm step %d loss %.4f position loss %.4f (%.1f s)",
                step,
                recent[0],
                recent[1],
                time.time() - started,
            )
        out_of_time = max_minutes is not None and time.time() - started > max_minutes * 60
        if step % checkpoint_every == 0 or step == steps or out_of_time:
            save_training_state(checkpoint, modules, optimizer, step)
            save_preview(
                vae,
                unet_average.eval(),
                text_average.eval(),
                tokenizer,
                output_dir / f"samples_{step:05d}.png",
                device,
            )
        if out_of_time:
            logger.info("Stopped at step %d; run again to resume", step)
            break
    return checkpoint


def export_pipeline(ldm_dir: str | Path, vae_dir: str | Path, output: str | Path) -> Path:
    """Write the averaged UNet and text encoder with the autoencoder as a pipeline folder."""
    ldm_dir = Path(ldm_dir)
    if not (ldm_dir / "checkpoint.safetensors").is_file():
        raise FileNotFoundError(
            f"No diffusion training checkpoint in {ldm_dir}; run the ldm stage first "
            "(python -m helpers.toyworld.train ldm) with the same --work-dir."
        )
    tokenizer = CLIPTokenizer.from_pretrained(ldm_dir / "tokenizer")
    unet = build_unet()
    text_encoder = build_text_encoder(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    )
    modules = {"unet_ema": unet, "text_ema": text_encoder}
    load_model_weights(ldm_dir / "checkpoint.safetensors", modules)

    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(require_vae(vae_dir)),
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=build_sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(output, safe_serialization=True)
    logger.info("Exported the toy pipeline to %s", output)
    return Path(output)

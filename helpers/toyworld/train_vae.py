"""Training of the toy autoencoder (diffusers AutoencoderKL) on rendered scenes."""

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .architecture import build_vae
from .dataset import render_training_set
from .training_state import load_training_state, save_training_state

logger = logging.getLogger(__name__)

# Weight of object pixels in the reconstruction loss, relative to background pixels.
# Objects cover a few percent of the image, and without the extra weight a small autoencoder
# trades their colours for a sharper ground texture.
OBJECT_WEIGHT = 5.0
KL_WEIGHT = 1e-6


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert uint8 images (N, H, W, 3) to floats in [-1, 1], shape (N, 3, H, W)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(tensor: torch.Tensor) -> np.ndarray:
    return ((tensor.clamp(-1, 1) + 1.0) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).cpu().numpy()


def cosine_learning_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def save_reconstructions(vae, images: np.ndarray, path: Path) -> None:
    """Write originals (top row) above reconstructions (bottom row), magnified 3x."""
    with torch.no_grad():
        batch = images_to_tensor(images)
        reconstructed = vae.decode(vae.encode(batch).latent_dist.mode()).sample
    top = np.concatenate(list(images), axis=1)
    bottom = np.concatenate(list(tensor_to_images(reconstructed)), axis=1)
    grid = np.concatenate([top, bottom], axis=0)
    image = Image.fromarray(grid)
    image.resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def train_vae(
    output_dir: str | Path,
    steps: int = 2000,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    scene_count: int = 12000,
    checkpoint_every: int = 250,
    max_minutes: float | None = None,
    device: str | None = None,
) -> Path:
    """Train the autoencoder, resuming from output_dir/checkpoint.safetensors if present.

    Returns the folder of the finished model, output_dir/final, in diffusers layout, with
    ``scaling_factor`` set to 1 / std of the latents so they have unit variance.
    """
    output_dir = Path(output_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = render_training_set(scene_count, output_dir.parent)
    images = data["images"]
    weights_map = 1.0 + (OBJECT_WEIGHT - 1.0) * data["object_masks_any"].astype(np.float32)

    torch.manual_seed(0)
    vae = build_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    checkpoint = output_dir / "checkpoint.safetensors"
    step = 0
    if checkpoint.exists():
        step, _ = load_training_state(checkpoint, {"vae": vae}, optimizer)
        logger.info("Resumed autoencoder training at step %d", step)

    rng = np.random.default_rng(step)
    preview = images[-8:]
    started = time.time()
    while step < steps:
        # 1. A random batch, flipped left-right at random (the world has no preferred side,
        #    but the flip must not reach captions, so the autoencoder alone uses it).
        index = rng.integers(0, len(images) - 8, size=batch_size)
        batch = images_to_tensor(images[index]).to(device)
        weights = torch.from_numpy(weights_map[index]).to(device)[:, None]
        if rng.random() < 0.5:
            batch, weights = batch.flip(-1), weights.flip(-1)

        # 2. Weighted L1 + MSE reconstruction and a small KL term, as in Stable Diffusion.
        posterior = vae.encode(batch).latent_dist
        reconstructed = vae.decode(posterior.sample()).sample
        error = reconstructed - batch
        reconstruction = (weights * (error.abs() + error.pow(2))).mean()
        loss = reconstruction + KL_WEIGHT * posterior.kl().mean()

        for group in optimizer.param_groups:
            group["lr"] = cosine_learning_rate(step, steps, learning_rate)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1

        if step % 50 == 0:
            logger.info("vae step %d loss %.4f (%.1f s)", step, loss.item(), time.time() - started)
        out_of_time = max_minutes is not None and time.time() - started > max_minutes * 60
        if step % checkpoint_every == 0 or step == steps or out_of_time:
            save_training_state(checkpoint, {"vae": vae}, optimizer, step)
            vae.eval()
            save_reconstructions(vae, preview, output_dir / f"reconstructions_{step:05d}.png")
            vae.train()
        if out_of_time:
            logger.info(
                "Stopped at step %d after %.1f minutes; run again to resume", step, max_minutes
            )
            return output_dir

    # Measure the latent scale on 1024 training images, so the diffusion model trains on
    # unit-variance latents.
    vae.eval()
    with torch.no_grad():
        sample = images_to_tensor(images[:1024]).to(device)
        latents = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in sample.split(128)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    final = output_dir / "final"
    vae.to("cpu").save_pretrained(final, safe_serialization=True)
    logger.info(
        "Saved the autoencoder to %s, scaling factor %.4f", final, vae.config.scaling_factor
    )
    return final

"""Training of the toy depth and saliency estimators on rendered scenes."""

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..metrics import mean_correlations, mean_dice
from .dataset import HELD_OUT_SEED_START, render_training_set
from .estimators import DepthSaliencyNet, ToyEstimator
from .render import render
from .train_vae import cosine_learning_rate, images_to_tensor
from .training_state import load_training_state, save_training_state

logger = logging.getLogger(__name__)

# Target for sky pixels: below the clamp at zero, so the clamped prediction ties there
# exactly, as the true inverse depth of the sky does.
SKY_TARGET = -0.2
# Share of each batch replaced by uniform images (black, grey, any colour) with empty masks.
UNIFORM_SHARE = 0.06


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur and noise some images, so generated (softer, noisier) images are labelled well."""
    count = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    strength = torch.rand(count, 1, 1, 1, generator=generator)
    images = images + strength * (blurred - images)
    noise_level = 0.05 * torch.rand(count, 1, 1, 1, generator=generator)
    return images + noise_level * torch.randn(images.shape, generator=generator)


def evaluate_estimator(estimator: ToyEstimator, count: int = 500) -> dict[str, float]:
    """Score on held-out renders: saliency Dice and per-image depth correlations."""
    scenes = [render(HELD_OUT_SEED_START + i) for i in range(count)]
    output = estimator.predict(np.stack([s.image for s in scenes]))
    correlations = mean_correlations(
        output.relative_inverse_depth, np.stack([s.relative_inverse_depth for s in scenes])
    )
    return {
        "saliency_dice": mean_dice(output.mask, np.stack([s.salient_mask for s in scenes])),
        "depth_spearman": correlations["spearman"],
        "depth_pearson": correlations["pearson"],
        "held_out_scenes": count,
    }


def train_estimators(
    work_dir: str | Path,
    output: str | Path,
    steps: int = 2500,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    scene_count: int = 12000,
    checkpoint_every: int = 250,
    max_minutes: float | None = None,
    device: str | None = None,
) -> Path:
    """Train the estimator network and save it with its held-out scores to output."""
    work_dir = Path(work_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = render_training_set(scene_count, work_dir.parent)
    images, masks = data["images"], data["salient_masks"]
    depth = data["relative_inverse_depth"]

    torch.manual_seed(0)
    network = DepthSaliencyNet().to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    checkpoint = work_dir / "checkpoint.safetensors"
    step = 0
    if checkpoint.exists():
        step, _ = load_training_state(checkpoint, {"network": network}, optimizer)
        logger.info("Resumed estimator training at step %d", step)

    rng = np.random.default_rng(step)
    generator = torch.Generator("cpu").manual_seed(step)
    started = time.time()
    while step < steps:
        # 1. A batch with random flips; a few images become uniform with empty masks.
        index = rng.integers(0, len(images), size=batch_size)
        batch = images_to_tensor(images[index])
        mask = torch.from_numpy(masks[index]).float()
        inverse_depth = torch.from_numpy(depth[index])
        has_depth = torch.ones(batch_size, 1, 1)
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        batch[flip] = batch[flip].flip(-1)
        mask[flip] = mask[flip].flip(-1)
        inverse_depth[flip] = inverse_depth[flip].flip(-1)
        batch = _augment(batch, generator)
        uniform = torch.from_numpy(rng.random(batch_size) < UNIFORM_SHARE)
        if uniform.any():
            colours = torch.rand(int(uniform.sum()), 3, 1, 1, generator=generator) * 2 - 1
            colours[: max(1, len(colours) // 2)] = -1.0  # half of them all black
            batch[uniform] = colours.expand(-1, -1, *batch.shape[-2:])
            mask[uniform] = 0.0
            has_depth[uniform] = 0.0
        target_depth = torch.where(inverse_depth > 0, inverse_depth, torch.tensor(SKY_TARGET))

        # 2. L1 on inverse depth (skipped for uniform images), BCE plus soft Dice on the mask.
        prediction = network(batch.to(device))
        depth_loss = (
            has_depth.to(device) * (prediction[:, 0] - target_depth.to(device)).abs()
        ).mean()
        logits = prediction[:, 1]
        mask = mask.to(device)
        bce = F.binary_cross_entropy_with_logits(logits, mask)
        probability = torch.sigmoid(logits)
        soft_dice = 1 - (2 * (probability * mask).sum((1, 2)) + 1) / (
            probability.sum((1, 2)) + mask.sum((1, 2)) + 1
        )
        loss = 2.0 * depth_loss + bce + 0.5 * soft_dice.mean()

        for group in optimizer.param_groups:
            group["lr"] = cosine_learning_rate(step, steps, learning_rate)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1

        if step % 50 == 0:
            logger.info(
                "estimator step %d loss %.4f (%.1f s)", step, loss.item(), time.time() - started
            )
        out_of_time = max_minutes is not None and time.time() - started > max_minutes * 60
        if step % checkpoint_every == 0 or step == steps or out_of_time:
            save_training_state(checkpoint, {"network": network}, optimizer, step)
        if out_of_time:
            logger.info("Stopped at step %d; run again to resume", step)
            return checkpoint

    estimator = ToyEstimator(network.cpu(), "cpu")
    metrics = evaluate_estimator(estimator)
    logger.info("Held-out scores: %s", metrics)
    estimator.save_pretrained(output, metrics)
    return Path(output)

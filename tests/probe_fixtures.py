"""Small run folders written by hand in the format of helpers.run_folder, for probe tests.

Each image is a 32x32 scene: a square object (the salient mask) nearer than a sloping
background (the depth). The informative layer encodes each token's pooled depth and mask
share linearly in its first channels plus noise, the noise layer is pure noise, so probes on
the first must score well and probes on the second near chance.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers.probes import pool_to_grid
from helpers.run_folder import INDEX_COLUMNS, RunFolder, write_index

IMAGE_SIZE = 32
LATENT_GRID = 8
INFORMATIVE_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
NOISE_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"
VAE_MODULE = "decoder.mid_block.attentions.0"
LAYERS = [
    {"name": INFORMATIVE_LAYER, "block": "down_0", "width": 8, "grid": [8, 8]},
    {"name": NOISE_LAYER, "block": "mid", "width": 16, "grid": [4, 4]},
]
VAE_LAYER = {
    "name": "vae_decoder",
    "block": "vae_decoder_mid",
    "width": 8,
    "grid": [LATENT_GRID, LATENT_GRID],
    "module": VAE_MODULE,
}


def scene_labels(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return one scene's relative inverse depth and saliency probability, (32, 32) each."""
    rows = np.linspace(0.0, 1.0, IMAGE_SIZE, dtype=np.float32)[:, None]
    depth = np.repeat(1.0 + 2.0 * rows, IMAGE_SIZE, axis=1)  # nearer towards the bottom
    # Edges on multiples of 4 pixels, the token size of the 8x8 grid, so that each token is
    # all object or all background there.
    side = 4 * int(rng.integers(2, 5))
    top, left = 4 * rng.integers(0, (IMAGE_SIZE - side) // 4 + 1, size=2)
    saliency = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    saliency[top : top + side, left : left + side] = 0.9
    depth = depth + 3.0 * (saliency > 0.5)
    return depth.astype(np.float32), saliency


def encode(depth: np.ndarray, saliency: np.ndarray, grid: int, width: int, rng) -> torch.Tensor:
    """Tokens (grid * grid, width) whose first channels are linear in the labels."""
    pooled_depth = pool_to_grid(depth[None], grid)[0].numpy()
    share = pool_to_grid((saliency > 0.5)[None].astype(np.float32), grid)[0].numpy()
    tokens = rng.normal(scale=0.05, size=(grid * grid, width)).astype(np.float32)
    tokens[:, 0] += pooled_depth
    tokens[:, 1] += 2.0 * share - 1.0
    tokens[:, 2] += 1.0
    return torch.from_numpy(tokens)


def write_synthetic_run(
    path: Path,
    *,
    images: int = 12,
    steps: int = 2,
    unet_variant: str = "original",
    labels: bool = True,
    seed: int = 0,
    storage: str = "stored",
) -> RunFolder:
    """Write a run folder with ``images`` images, half train and half test."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": 1,
        "model": "synthetic",
        "scheduler": "ddim",
        "num_steps": steps,
        "guidance_scale": 4.0,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "timesteps": [float(999 - 500 * step) for step in range(steps)],
        "activation_storage": storage,
        "activation_dtype": "float16",
        "layers": LAYERS,
        "vae_layer": VAE_LAYER,
        "prompt_file": "synthetic.csv",
        "unet_variant": unet_variant,
        "shuffle_seed": None if unet_variant == "original" else 0,
    }
    (path / "run.json").write_text(json.dumps(config))
    rows = [
        {
            "image_id": image_id,
            "file": f"images/{image_id:06d}.png",
            "prompt": f"scene {image_id}",
            "seed": image_id,
            "split": "train" if image_id < images // 2 else "test",
        }
        for image_id in range(images)
    ]
    write_index(path / "index.csv", rows, [])
    assert list(rows[0]) == list(INDEX_COLUMNS)

    # The labels are a function of the image id only, so a control run written with another
    # seed has the same scenes but other activations.
    for folder in ("images", "activations", "labels/depth", "labels/saliency"):
        (path / folder).mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed + 1000)
    for image_id in range(images):
        depth, saliency = scene_labels(np.random.default_rng(image_id))
        if labels:
            np.save(path / "labels" / "depth" / f"{image_id:06d}.npy", depth)
            np.save(path / "labels" / "saliency" / f"{image_id:06d}.npy", saliency)
        if storage == "stored":
            tensors = {}
            for step in range(steps):
                informative = encode(depth, saliency, 8, 8, noise)
                if unet_variant != "original":
                    informative = torch.from_numpy(
                        noise.normal(size=informative.shape).astype(np.float32)
                    )
                tensors[f"{INFORMATIVE_LAYER}@{step}"] = informative
                tensors[f"{NOISE_LAYER}@{step}"] = torch.from_numpy(
                    noise.normal(size=(16, 16)).astype(np.float32)
                )
                tensors[f"vae_decoder@{step}"] = torch.from_numpy(
                    noise.normal(size=(64, 8)).astype(np.float32)
                )
                tensors[f"latent@{step}"] = encode(depth, saliency, LATENT_GRID, 4, noise)
            tensors = {key: value.half().contiguous() for key, value in tensors.items()}
            save_file(tensors, str(path / "activations" / f"{image_id:06d}.safetensors"))
        image = (np.clip(depth / depth.max(), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(np.stack([image] * 3, axis=-1)).save(
            path / "images" / f"{image_id:06d}.png"
        )
    if labels:
        labelers = {"depth": {"name": "synthetic"}, "saliency": {"name": "synthetic"}}
        (path / "labels" / "labels.json").write_text(json.dumps(labelers))
    return RunFolder(path)

"""Rendered training sets of the toy world, cached as NumPy archives."""

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .render import render
from .scene import COLORS, SHAPES

logger = logging.getLogger(__name__)

# Seeds at or above this value are never used for training, so benchmarks can use them.
HELD_OUT_SEED_START = 900_000_000

SIDES = ("left", "centre", "right")
DISTANCES = ("near", "middle", "far")


def render_training_set(count: int, cache_dir: str | Path, start_seed: int = 0) -> dict:
    """Render seeds start_seed .. start_seed + count - 1, or load them from the cache.

    Returns a dict of arrays: ``images`` (N, 64, 64, 3) uint8, ``salient_masks`` (N, 64, 64)
    bool, ``object_masks_any`` (N, 64, 64) bool, ``relative_inverse_depth`` (N, 64, 64)
    float32, ``captions`` (N,) str, and the salient object's attributes as integer codes
    ``color``, ``shape``, ``side``, ``distance`` indexing COLORS, SHAPES, SIDES, DISTANCES.
    """
    if start_seed + count > HELD_OUT_SEED_START:
        raise ValueError(
            f"Seeds {start_seed}..{start_seed + count - 1} reach the held-out range starting at "
            f"{HELD_OUT_SEED_START}; use fewer scenes or a lower start_seed."
        )
    cache = Path(cache_dir) / f"scenes_{start_seed}_{count}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}

    columns: dict[str, list] = {
        key: []
        for key in (
            "images",
            "salient_masks",
            "object_masks_any",
            "relative_inverse_depth",
            "captions",
            "color",
            "shape",
            "side",
            "distance",
        )
    }
    for seed in tqdm(range(start_seed, start_seed + count), desc="render scenes", mininterval=5):
        scene = render(seed)
        columns["images"].append(scene.image)
        columns["salient_masks"].append(scene.salient_mask)
        columns["object_masks_any"].append(scene.object_masks.any(axis=0))
        columns["relative_inverse_depth"].append(scene.relative_inverse_depth)
        columns["captions"].append(scene.caption)
        columns["color"].append(list(COLORS).index(scene.color))
        columns["shape"].append(SHAPES.index(scene.shape))
        columns["side"].append(SIDES.index(scene.side))
        columns["distance"].append(DISTANCES.index(scene.distance))
    arrays = {key: np.asarray(values) for key, values in columns.items()}

    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(cache)
    logger.info("Rendered %d scenes into %s", count, cache)
    return arrays

"""The toy model's prompt list: captions of held-out scenes with sampling seeds and splits."""

import csv
from pathlib import Path

import numpy as np

from .dataset import HELD_OUT_SEED_START
from .render import render

# The prompt list draws its scenes from here on, apart from the benchmarks' held-out scenes.
PROMPT_SCENE_START = HELD_OUT_SEED_START + 100_000


def write_prompt_list(
    path: str | Path, count: int = 617, train_count: int = 246, seed: int = 0
) -> Path:
    """Write a CSV of prompt, seed, split and the scene's attributes.

    The default sizes mirror the Stable Diffusion probing set of Chen et al. (2023): 617
    prompts, 246 for training the probes and 371 for testing them.
    """
    if not 0 < train_count < count:
        raise ValueError(f"train_count must lie between 0 and count={count}, got {train_count}.")
    rng = np.random.default_rng(seed)
    splits = np.array(["train"] * train_count + ["test"] * (count - train_count))
    rng.shuffle(splits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["prompt", "seed", "split", "scene_seed", "color", "shape", "side", "distance"]
        )
        for i in range(count):
            scene = render(PROMPT_SCENE_START + i)
            writer.writerow(
                [
                    scene.caption,
                    i,
                    splits[i],
                    PROMPT_SCENE_START + i,
                    scene.color,
                    scene.shape,
                    scene.side,
                    scene.distance,
                ]
            )
    return path


if __name__ == "__main__":
    from ..paths import DATA_DIR

    print(write_prompt_list(DATA_DIR / "toy_prompts.csv"))

"""Time edited generation against plain generation on the toy model.

Prints ``name=value`` lines: milliseconds per plain and per edited generation, their ratio for
each edit method, and ``edit_over_generation`` for the default method (closed form). Each
edited generation edits the up-block layers during the first 5 of 15 steps.

    python benchmarks/intervention.py [--checkpoint PATH] [--images 5]
"""

import argparse
import time

import numpy as np

from helpers.intervention import (
    InterventionSettings,
    generate_edited,
    probes_for_intervention,
    translate_mask,
)
from helpers.intervention_eval import random_shifts
from helpers.labels import load_saliency_labeler
from helpers.models import load_ldm
from helpers.paths import DATA_DIR, REPO_ROOT
from helpers.probe_checkpoints import ProbeCheckpoint
from helpers.prompt_lists import load_prompt_list
from helpers.sampling import SamplingConfig, generate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="probe_checkpoints/toy/model_saliency.safetensors")
    parser.add_argument("--images", type=int, default=5, help="test prompts timed per method")
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()

    pipe = load_ldm("toy")
    config = SamplingConfig(scheduler="lms", num_steps=15, guidance_scale=args.guidance)
    checkpoint = ProbeCheckpoint.load(REPO_ROOT / args.checkpoint)
    labeler = load_saliency_labeler("toy")
    rows = [
        row for row in load_prompt_list(DATA_DIR / "toy_prompts.csv").rows if row["split"] == "test"
    ]
    rows = rows[: args.images]
    shifts = random_shifts(len(rows), 10, 16, seed=0)

    # Targets come from the unedited images, as in the notebook; their cost is not timed.
    originals = [
        generate(pipe, [r["prompt"]], [r["seed"]], config, progress=False).images[0] for r in rows
    ]
    masks = [labeler(image)[0] > 0.5 for image in originals]
    targets = [translate_mask(mask, dx, dy) for mask, (dx, dy) in zip(masks, shifts, strict=True)]

    # Warm-up: the first calls pay for allocations and kernel selection.
    for row in rows[:2]:
        generate(pipe, [row["prompt"]], [row["seed"]], config, progress=False)
    start = time.perf_counter()
    for row in rows:
        generate(pipe, [row["prompt"]], [row["seed"]], config, progress=False)
    plain = (time.perf_counter() - start) / len(rows)
    print(f"plain_generation_ms={plain * 1000:.1f}")

    ratios = {}
    for method in ("closed_form", "gradient"):
        settings = InterventionSettings(task="saliency", method=method)
        probes = probes_for_intervention(checkpoint, pipe, "toy", settings)
        start = time.perf_counter()
        for row, target in zip(rows, targets, strict=True):
            generate_edited(pipe, row["prompt"], row["seed"], probes, target, settings, config)
        edited = (time.perf_counter() - start) / len(rows)
        ratios[method] = edited / plain
        print(f"{method}_edit_ms={edited * 1000:.1f}")
        print(f"{method}_edit_over_generation={ratios[method]:.2f}")
    print(f"edit_over_generation={ratios['closed_form']:.2f}")
    print(f"images={len(rows)}")
    print(f"objects_found={int(np.sum([mask.any() for mask in masks]))}")


if __name__ == "__main__":
    main()

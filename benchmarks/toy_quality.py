"""Measure how often the toy LDM draws the prompted colour and horizontal position.

Prompts and seeds come from held-out scenes (never used for training). Each image is sampled
with 15 steps; the toy saliency estimator finds the object and the colour and position are
read off it. The same reading on the held-out renders themselves is printed as
``reader_color_accuracy`` and ``reader_position_accuracy``, the ceiling of the measurement.

    python benchmarks/toy_quality.py [--count 64] [--scheduler ddim] [--guidance 4]
"""

import argparse

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from helpers.paths import TOY_ESTIMATORS_DIR, TOY_LDM_DIR
from helpers.toyworld.dataset import HELD_OUT_SEED_START
from helpers.toyworld.estimators import ToyEstimator
from helpers.toyworld.quality import describe_salient_object
from helpers.toyworld.render import render


def match_fractions(readings, scenes) -> dict[str, float]:
    """Fraction of images whose read colour and side match the scene's; no object misses."""
    fractions = {}
    for attribute in ("color", "side"):
        matches = [
            reading is not None and reading[attribute] == getattr(scene, attribute)
            for reading, scene in zip(readings, scenes, strict=True)
        ]
        fractions[attribute] = float(np.mean(matches))
    return fractions


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=64, help="number of held-out prompts")
    parser.add_argument("--steps", type=int, default=15, help="denoising steps")
    parser.add_argument(
        "--guidance", type=float, default=4.0, help="classifier-free guidance scale"
    )
    parser.add_argument("--save", help="write a grid of the samples to this PNG path")
    args = parser.parse_args()

    scenes = [render(HELD_OUT_SEED_START + 10_000 + i) for i in range(args.count)]
    prompts = [scene.caption for scene in scenes]
    estimator = ToyEstimator.from_pretrained(TOY_ESTIMATORS_DIR)

    # The reader's own accuracy on renders, where the truth is known.
    masks = estimator.predict(np.stack([s.image for s in scenes])).mask
    readings = [describe_salient_object(s.image, m) for s, m in zip(scenes, masks, strict=True)]
    reader = match_fractions(readings, scenes)
    print(f"reader_color_accuracy={reader['color']:.3f}")
    print(f"reader_position_accuracy={reader['side']:.3f}")

    pipeline = StableDiffusionPipeline.from_pretrained(TOY_LDM_DIR)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(args.count)]
    images = pipeline(
        prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=generators,
        output_type="np",
    ).images
    masks = estimator.predict(images).mask
    readings = [describe_salient_object(im, m) for im, m in zip(images, masks, strict=True)]
    generated = match_fractions(readings, scenes)
    print(f"images={args.count}")
    print(f"color_match={generated['color']:.3f}")
    print(f"position_match={generated['side']:.3f}")

    if args.save:
        from PIL import Image

        rows = [
            np.concatenate(list(images[i : i + 8]), axis=1) for i in range(0, len(images) - 7, 8)
        ]
        Image.fromarray((np.concatenate(rows) * 255 + 0.5).astype(np.uint8)).save(args.save)


if __name__ == "__main__":
    main()

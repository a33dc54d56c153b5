"""Measure how much the toy model's self-attention outputs control where the object goes.

This bounds what an edit of the conditional half of the self-attention outputs can do, as
the interventions make it. The prompt pairs differ only in the side word ("on the left"
against "on the right"). The outputs recorded while generating the left image replace
(patch) those of the right image, same seed, in the conditional half of the guided batch.
The unconditional half keeps its own. If the layout lived in these outputs, the patched
object would move to the left image's place.

Prints ``name=value`` lines: for each patched set of layers and steps, the mean fraction of
the distance between the two objects' centroids that the patch covers. 0 means the object
stays right, 1 that it moves all the way left; values outside [0, 1] overshoot either way.
A patched image in which the labeler finds no object counts as 0.

    python benchmarks/attention_patching.py [--pairs 8]
"""

import argparse

import numpy as np

from helpers.hooks import edit_activations, find_self_attention_layers
from helpers.labels import load_saliency_labeler
from helpers.models import load_ldm
from helpers.sampling import SamplingConfig, generate
from helpers.toyworld.scene import COLORS, SHAPES, compose_caption

# Pairs whose unpatched objects lie closer than this (pixels) are skipped: nothing to move.
MIN_CENTROID_GAP = 16.0


def mask_centroid_x(labeler, image: np.ndarray) -> float | None:
    mask = labeler(image)[0] > 0.5
    return float(np.nonzero(mask)[1].mean()) if mask.any() else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=8, help="prompt pairs to patch")
    args = parser.parse_args()

    pipe = load_ldm("toy")
    pipe.set_progress_bar_config(disable=True)
    labeler = load_saliency_labeler("toy")
    config = SamplingConfig(scheduler="lms", num_steps=15, guidance_scale=4.0)
    layers = [name for name, _ in find_self_attention_layers(pipe.unet)]
    up_layers = [name for name in layers if name.startswith("up_blocks")]
    patch_sets = {
        "up_steps_0_4": (up_layers, range(5)),
        "all_steps_0_4": (layers, range(5)),
        "all_steps_0_14": (layers, range(15)),
    }

    rng = np.random.default_rng(0)
    fractions: dict[str, list[float]] = {name: [] for name in patch_sets}
    skipped = 0
    for seed in range(args.pairs):
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        left = compose_caption(color, shape, "left", "middle")
        right = compose_caption(color, shape, "right", "middle")

        # 1. The left image, recording every self-attention output at every step.
        recorded = {}

        def record(layer, step, activation, recorded=recorded):
            recorded[(layer, step)] = activation.clone()
            return activation

        with edit_activations(
            pipe.unet,
            record,
            layers=layers,
            steps=range(15),
            guidance_batches=config.guidance_batches,
        ):
            left_image = generate(pipe, [left], [seed], config, progress=False).images[0]
        right_image = generate(pipe, [right], [seed], config, progress=False).images[0]
        left_x = mask_centroid_x(labeler, left_image)
        right_x = mask_centroid_x(labeler, right_image)
        if left_x is None or right_x is None or right_x - left_x < MIN_CENTROID_GAP:
            skipped += 1
            continue

        # 2. The right image again, with the left image's outputs patched in.
        def patch(layer, step, activation, recorded=recorded):
            return recorded[(layer, step)]

        for name, (patch_layers, patch_steps) in patch_sets.items():
            with edit_activations(
                pipe.unet,
                patch,
                layers=patch_layers,
                steps=patch_steps,
                guidance_batches=config.guidance_batches,
            ):
                patched = generate(pipe, [right], [seed], config, progress=False).images[0]
            patched_x = mask_centroid_x(labeler, patched)
            moved = 0.0 if patched_x is None else (right_x - patched_x) / (right_x - left_x)
            fractions[name].append(moved)

    print(f"pairs={args.pairs}")
    print(f"pairs_skipped={skipped}")
    for name, values in fractions.items():
        print(
            f"moved_fraction_{name}={np.mean(values):.3f}"
            if values
            else f"moved_fraction_{name}=nan"
        )


if __name__ == "__main__":
    main()

"""Train the embedded toy models: ``python -m helpers.toyworld.train STAGE [options]``.

Stages, run in this order:

- ``vae``: the autoencoder, on rendered scenes.
- ``ldm``: the UNet and the text encoder, on latents of rendered scenes; needs ``vae``.
- ``export``: write the UNet's averaged weights and the rest as a diffusers pipeline folder.
- ``estimators``: the depth and saliency estimators, on rendered scenes.

Each training stage writes checkpoints under ``--work-dir`` and resumes from them when run
again, so training can be stopped at any time (``--max-minutes`` stops it cleanly). It uses a
GPU when one is present and runs unchanged on the CPU. ``export`` and ``estimators`` write
into data/ by default and so replace the shipped weights; pass ``--output`` to keep them.
Options left out take each stage's defaults (see train_vae, train_ldm, train_estimators).
"""

import argparse
import logging

import torch

from ..paths import RUNS_DIR, TOY_ESTIMATORS_DIR, TOY_LDM_DIR

DEFAULT_WORK_DIR = RUNS_DIR / "toy_training"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.toyworld.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=("vae", "ldm", "export", "estimators"))
    parser.add_argument(
        "--work-dir", default=DEFAULT_WORK_DIR, help="folder for caches and checkpoints"
    )
    parser.add_argument(
        "--steps", type=positive_int, help="total optimizer steps (learning-rate schedule length)"
    )
    parser.add_argument("--batch-size", type=positive_int, help="images per optimizer step")
    parser.add_argument(
        "--learning-rate", type=positive_float, help="peak learning rate of the cosine schedule"
    )
    parser.add_argument("--scenes", type=positive_int, help="number of rendered training scenes")
    parser.add_argument(
        "--max-minutes", type=positive_float, help="stop cleanly after this many minutes"
    )
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    parser.add_argument(
        "--output",
        help=(
            f"export: pipeline folder (default {TOY_LDM_DIR}); estimators: weights folder "
            f"(default {TOY_ESTIMATORS_DIR})"
        ),
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    options = {
        key: value
        for key, value in (
            ("steps", args.steps),
            ("batch_size", args.batch_size),
            ("learning_rate", args.learning_rate),
            ("scene_count", args.scenes),
            ("max_minutes", args.max_minutes),
        )
        if value is not None
    }
    if args.stage == "vae":
        from .train_vae import train_vae

        train_vae(f"{args.work_dir}/vae", **options)
    elif args.stage == "ldm":
        from .train_ldm import train_ldm

        train_ldm(f"{args.work_dir}/ldm", vae_dir=f"{args.work_dir}/vae/final", **options)
    elif args.stage == "export":
        from .train_ldm import export_pipeline

        export_pipeline(
            f"{args.work_dir}/ldm", f"{args.work_dir}/vae/final", args.output or TOY_LDM_DIR
        )
    else:
        from .train_estimators import train_estimators

        train_estimators(
            f"{args.work_dir}/estimators", args.output or TOY_ESTIMATORS_DIR, **options
        )


if __name__ == "__main__":
    main()

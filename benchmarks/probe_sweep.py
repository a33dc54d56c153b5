"""Measure what the probe sweep costs next to sampling, and its memory as the dataset grows.

Prints ``name=value`` lines:

- ``unet_calls``, ``unet_passes_per_image``: UNet forward calls counted by a hook while
  ``generate`` samples the toy images in one batch and records every attn1 layer, the VAE
  control and the latent at every step. Each call runs all images of the batch, so the passes
  per image equal the calls. ``unet_passes_floor`` is one pass per step.
  ``sd_original_method_passes_per_image`` is what the original study's code spends on
  Stable Diffusion: it samples each image again for every (block, step), up to that step,
  7 blocks x (1 + 2 + ... + 15) = 840.
- ``sweep_over_generation``: wall time of (sampling with recording + fitting and scoring
  both probes on every cell with the default settings, labels given) / wall time of plain
  sampling of the same images, on the toy model (``data/toy_ldm`` if it exists, otherwise
  its architecture with random weights). Both samplings are timed ``--repeats`` times,
  alternating, and the fastest of each counts. ``sweep_cross_entropy_over_generation`` is
  the same with the cross-entropy saliency fit instead of the closed form.
- ``control_sweep_over_generation``: the same for the shuffled-weight control (its own
  sampling with recording, fitted against the main run's labels), over the plain sampling
  of the original model. Shuffling the weights once is printed apart as
  ``control_shuffle_seconds``.
- ``fit_peak_mb_images_<n>``: growth of the peak resident memory of a process that fits
  probes from streamed activations (``StreamingProbeFitter``, closed form) for n images of
  the full-size Stable Diffusion v1.x UNet with random weights at 64x64 pixels (latent 8x8),
  and ``inmemory_fit_peak_mb_images_<n>`` for the in-memory fit, which stacks a cell's
  activations over all images. ``fit_state_mb_images_<n>`` is the size of the streamed statistics.

Peak memory is the peak resident set size ``VmHWM`` from ``/proc/self/status`` (Linux). Each
fit runs in a fresh child process that reads the activations image by image from files
written beforehand, and the script prints the growth of the peak from just before the first
image to the end of fitting and scoring. Neither ``tracemalloc`` nor ``resource`` measures this:
tracemalloc only sees allocations made through Python's allocators, and torch allocates
tensor memory with its own C++ allocator, invisible to it. ``resource.getrusage``'s
``ru_maxrss`` counts torch's memory, but on Linux a child process inherits its parent's value
through fork and exec, so a child of this script (which holds the SD pipeline) reported a
growth of 0.

Labels are synthetic and given: depth is each image's brightness and the saliency mask its
pixels above the median brightness. Times are single wall-clock runs, so they move with the
machine's load.

    python benchmarks/probe_sweep.py [--images 8] [--steps 15] [--sd-images 4 12]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from helpers.models import build_sd_pipeline_random, build_toy_pipeline_random, load_ldm
from helpers.paths import TOY_LDM_DIR
from helpers.probe_streaming import StreamingProbeFitter, StreamingProbeScorer
from helpers.probe_sweep import SweepLabels, fit_cell
from helpers.probes import ProbeFitSettings
from helpers.run_generation import build_run_config, control_pipeline, image_activations
from helpers.sampling import RecordingConfig, SamplingConfig, generate
from helpers.toyworld.scene import compose_caption

TOY_PROMPTS = [
    compose_caption("red", "cube", "left", "near"),
    compose_caption("green", "sphere", "right", "far"),
    compose_caption("blue", "cone", "centre", "middle"),
    compose_caption("red", "cylinder", "right", "near"),
]


def brightness_labels(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return depth = brightness and saliency = brighter than the median, (N, H, W) each."""
    brightness = images.mean(axis=-1).astype(np.float32)
    median = np.median(brightness.reshape(len(images), -1), axis=1)[:, None, None]
    return brightness, (brightness > median).astype(np.float32)


def sample(pipe, prompts, seeds, config, record: bool):
    """Sample once, recording every layer, the VAE control and the latents if ``record``."""
    recording = RecordingConfig(dtype=torch.float16, vae_decoder=True) if record else None
    return generate(
        pipe, prompts, seeds, config, recording=recording, keep_step_latents=record, progress=False
    )


def fit_all_cells(result, run_config, labels: SweepLabels, settings, train: int) -> int:
    """Fit and score both probes on every cell of a recorded result and count the cells."""
    per_image = [
        image_activations(result, index, run_config) for index in range(len(result.images))
    ]
    cells = 0
    for key in per_image[0]:
        stacked = torch.stack([activations[key] for activations in per_image]).float()
        fit_cell(stacked[:train], stacked[train:], labels, settings)
        cells += 1
    return cells


def toy_ratios(args) -> None:
    if (TOY_LDM_DIR / "model_index.json").is_file():
        pipe, model = load_ldm("toy"), "toy"
    else:
        pipe, model = build_toy_pipeline_random(seed=0), "toy-random"
    config = SamplingConfig(scheduler="ddim", num_steps=args.steps, guidance_scale=4.0)
    prompts = [TOY_PROMPTS[index % len(TOY_PROMPTS)] for index in range(args.images)]
    seeds = list(range(args.images))
    train = args.images // 2
    run_config = build_run_config(
        pipe,
        config,
        model,
        store_activations=True,
        unet_variant="original",
        shuffle_seed=None,
        prompt_file="",
    )
    print(f"model={model}")
    print(f"images={args.images}")
    print(f"steps={args.steps}")

    # 1. Plain sampling and sampling with recording, alternated ``repeats`` times, keeping
    # the fastest of each, so that a burst of load on the machine hits neither alone.
    plain_seconds, record_seconds = float("inf"), float("inf")
    calls: list[int] = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain = sample(pipe, prompts, seeds, config, record=False)
        plain_seconds = min(plain_seconds, time.perf_counter() - start)

        calls.clear()
        handle = pipe.unet.register_forward_pre_hook(lambda module, inputs: calls.append(1))
        start = time.perf_counter()
        try:
            recorded = sample(pipe, prompts, seeds, config, record=True)
        finally:
            handle.remove()
        record_seconds = min(record_seconds, time.perf_counter() - start)
    print(f"generation_seconds={plain_seconds:.2f}")
    print(f"recorded_generation_seconds={record_seconds:.2f}")

    # All images share one batch, so every call is one pass for each image.
    print(f"unet_calls={len(calls)}")
    print(f"unet_passes_per_image={len(calls)}")
    print(f"unet_passes_floor={args.steps}")
    print(f"sd_original_method_passes_per_image={7 * sum(step + 1 for step in range(15))}")

    # 2. The fits, on labels taken from the plain images.
    depth, saliency = brightness_labels(plain.images)
    labels = SweepLabels.from_arrays(
        depth[:train], depth[train:], saliency[:train], saliency[train:]
    )
    for name, settings in (
        ("sweep", ProbeFitSettings()),
        ("sweep_cross_entropy", ProbeFitSettings(saliency_method="gradient")),
    ):
        start = time.perf_counter()
        cells = fit_all_cells(recorded, run_config, labels, settings, train)
        fit_seconds = time.perf_counter() - start
        print(f"{name}_cells={cells}")
        print(f"{name}_fit_seconds={fit_seconds:.2f}")
        print(f"{name}_over_generation={(record_seconds + fit_seconds) / plain_seconds:.3f}")

    # 3. The shuffled control: its own trajectory, the main run's labels.
    start = time.perf_counter()
    control = control_pipeline(pipe, "shuffled", shuffle_seed=0)
    print(f"control_shuffle_seconds={time.perf_counter() - start:.2f}")
    start = time.perf_counter()
    recorded = sample(control, prompts, seeds, config, record=True)
    fit_all_cells(recorded, run_config, labels, ProbeFitSettings(), train)
    control_seconds = time.perf_counter() - start
    print(f"control_sweep_over_generation={control_seconds / plain_seconds:.3f}")


def write_sd_activations(folder: Path, count: int, steps: int) -> None:
    """Sample ``count`` 64x64 images with SD's UNet (random weights) and write one file each."""
    pipe = build_sd_pipeline_random(sample_size=8, seed=0)
    config = SamplingConfig(scheduler="lms", num_steps=steps, guidance_scale=7.5)
    run_config = build_run_config(
        pipe,
        config,
        "sd-random",
        store_activations=True,
        unet_variant="original",
        shuffle_seed=None,
        prompt_file="",
    )
    prompts = [TOY_PROMPTS[index % len(TOY_PROMPTS)] for index in range(count)]
    for start in range(0, count, 4):
        result = sample(
            pipe, prompts[start : start + 4], list(range(start, start + 4)), config, True
        )
        depth, saliency = brightness_labels(result.images)
        for index in range(len(result.images)):
            tensors = image_activations(result, index, run_config)
            tensors["label_depth"] = torch.from_numpy(depth[index])
            tensors["label_saliency"] = torch.from_numpy(saliency[index])
            save_file(tensors, str(folder / f"{start + index:06d}.safetensors"))


# glibc raises its mmap threshold after large blocks are freed, so later blocks of that size
# come from the heap and often stay resident after they are freed. The peak of the same fit
# then varied from 340 to 770 MB between runs. A fixed threshold of 64 KiB returns every
# freed large block to the operating system, so the peak follows the live tensors.
CHILD_ENVIRONMENT = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_kib() -> int:
    """Return this process's peak resident set size in KiB (VmHWM, Linux only)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        raise RuntimeError("Peak memory is read from /proc/self/status, which needs Linux.")
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line to read the peak memory from.")


def fit_child(folder: Path, count: int, mode: str) -> None:
    """Fit on the first half of ``count`` image files, score on the rest, and print JSON."""
    files = sorted(folder.glob("*.safetensors"))[:count]
    train = count // 2
    settings = ProbeFitSettings(saliency_method="closed_form")
    before = peak_kib()

    def read(path):
        tensors = load_file(str(path))
        depth = tensors.pop("label_depth").numpy()
        saliency = tensors.pop("label_saliency").numpy()
        return tensors, depth, saliency

    state_bytes = 0
    if mode == "streamed":
        fitter = StreamingProbeFitter(settings)
        for path in files[:train]:
            fitter.add_image(*read(path))
        state_bytes = fitter.nbytes
        scorer = StreamingProbeScorer(fitter.fit())
        for path in files[train:]:
            scorer.add_image(*read(path))
        scorer.scored_fits()
    else:
        images = [read(path) for path in files]
        labels = SweepLabels.from_arrays(
            np.stack([image[1] for image in images[:train]]),
            np.stack([image[1] for image in images[train:]]),
            np.stack([image[2] for image in images[:train]]),
            np.stack([image[2] for image in images[train:]]),
        )
        keys = list(images[0][0])
        del images
        # As RunFolder.load_cell does: one cell at a time, stacked over all images.
        for key in keys:
            stacked = torch.stack([load_file(str(path))[key] for path in files]).float()
            fit_cell(stacked[:train], stacked[train:], labels, settings)
    print(json.dumps({"peak_growth_kib": peak_kib() - before, "state_bytes": state_bytes}))


def sd_memory(args) -> None:
    counts = sorted(args.sd_images)
    with tempfile.TemporaryDirectory() as folder:
        write_sd_activations(Path(folder), counts[-1], args.sd_steps)
        print(f"sd_image_size=64 sd_steps={args.sd_steps}")
        for mode, prefix in (("streamed", "fit_peak_mb"), ("inmemory", "inmemory_fit_peak_mb")):
            for count in counts:
                command = [sys.executable, __file__, "--fit-child", folder, str(count), mode]
                output = subprocess.run(
                    command, check=True, capture_output=True, text=True, env=CHILD_ENVIRONMENT
                )
                measured = json.loads(output.stdout.strip().splitlines()[-1])
                print(f"{prefix}_images_{count}={measured['peak_growth_kib'] / 1024:.0f}")
                if mode == "streamed":
                    print(f"fit_state_mb_images_{count}={measured['state_bytes'] / 2**20:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8, help="toy images, half train half test")
    parser.add_argument("--steps", type=int, default=15, help="toy denoising steps")
    parser.add_argument(
        "--repeats", type=int, default=2, help="toy samplings timed per kind; the fastest counts"
    )
    parser.add_argument(
        "--sd-images", type=int, nargs="+", default=[4, 12], help="SD dataset sizes to fit"
    )
    parser.add_argument("--sd-steps", type=int, default=3, help="SD denoising steps")
    parser.add_argument("--skip-toy", action="store_true", help="only measure SD memory")
    parser.add_argument("--skip-sd", action="store_true", help="only measure the toy ratios")
    parser.add_argument("--fit-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.fit_child:
        folder, count, mode = args.fit_child
        fit_child(Path(folder), int(count), mode)
        return
    if not args.skip_toy:
        toy_ratios(args)
    if not args.skip_sd:
        sd_memory(args)


if __name__ == "__main__":
    main()

"""Figure of probe predictions at each denoising step beside what the UNet saw at that step.

For each chosen test image, three rows over the steps:

1. the noisy latent z_t that the UNet received at the step, scaled by the scheduler's
   ``scale_model_input`` (a no-op for DDIM, division by sqrt(sigma^2 + 1) for LMS and Euler)
   and decoded by the VAE. This is the partly denoised input, not the model's prediction of
   the clean image, so early steps look like noise even where the probes already see the
   scene;
2. the saliency probe's mask;
3. the depth probe's prediction, in standard deviations of the training depth;

and a last column with the final image, the saliency label and the standardised depth label.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from .probe_checkpoints import ProbeCheckpoint
from .probe_sweep import SALIENCY_THRESHOLD
from .probe_table import source_name
from .probes import LinearProbe, standardise_depth
from .sampling import decode_latents, make_scheduler, vae_scale_factor


def decode_step_inputs(pipe, run, image_id: int, steps: Sequence[int]) -> np.ndarray:
    """Decode the UNet input of each step from the run's stored ``latent@{step}``.

    Returns float32 images in [0, 1], (steps, H, W, 3).
    """
    config = run.config
    factor = vae_scale_factor(pipe.vae)
    rows, cols = int(config["height"]) // factor, int(config["width"]) // factor
    keys = [f"latent@{step}" for step in steps]
    activations = run.load_activations(image_id, keys=keys)
    images = []
    for step, key in zip(steps, keys, strict=True):
        tokens = activations[key].float()  # (tokens, channels), row-major over the latent grid
        if tokens.shape[0] != rows * cols:
            raise ValueError(
                f"{key} of image {image_id} has {tokens.shape[0]} tokens, but a "
                f"{config['height']}x{config['width']} image has a {rows}x{cols} latent with "
                "this VAE: pass the pipeline of the run's model."
            )
        latent = tokens.T.reshape(1, tokens.shape[1], rows, cols)
        # A fresh scheduler per step, because LMS keeps its step index as state.
        scheduler = make_scheduler(config["scheduler"], pipe.scheduler.config)
        scheduler.set_timesteps(int(config["num_steps"]))
        scaled = scheduler.scale_model_input(latent, scheduler.timesteps[step])
        with torch.no_grad():
            images.append(decode_latents(pipe, scaled.to(pipe.vae.device))[0])
    return np.stack(images)


def run_probe(run, task: str, layer: str, step: int) -> LinearProbe:
    """Load the run's fitted probe for ``layer`` at ``step``, checked against run.json."""
    config = run.config
    variant = config.get("unet_variant", "original")
    path = Path(run.path) / "probes" / f"{source_name(variant, 'unet')}_{task}.safetensors"
    matches = [entry for entry in config["layers"] if entry["name"] == layer]
    if not matches:
        names = [entry["name"] for entry in config["layers"]]
        raise ValueError(f"Layer {layer!r} is not in this run, whose layers are {names}.")
    checkpoint = ProbeCheckpoint.load(path)
    return checkpoint.probe(
        layer,
        step,
        model=str(config["model"]),
        width=int(matches[0]["width"]),
        grid=tuple(matches[0]["grid"]),
        unet_variant=variant,
    )


def plot_step_predictions(
    pipe,
    run,
    image_ids: Sequence[int],
    layer: str,
    *,
    labels_run=None,
    steps: Sequence[int] | None = None,
) -> Figure:
    """Plot each image's decoded UNet input and both probes' predictions at every step.

    ``pipe`` provides the VAE that decodes the latents, and ``labels_run`` (``run`` by
    default) the labels of the last column.
    """
    labels_run = run if labels_run is None else labels_run
    steps = list(range(int(run.config["num_steps"]))) if steps is None else list(steps)
    probes = {
        task: [run_probe(run, task, layer, step) for step in steps]
        for task in ("saliency", "depth")
    }
    columns = len(steps) + 1
    figure, axes = plt.subplots(
        3 * len(image_ids),
        columns,
        figsize=(1.1 * columns, 3.4 * len(image_ids)),
        squeeze=False,
        layout="constrained",
    )
    for image_number, image_id in enumerate(image_ids):
        top = 3 * image_number
        decoded = decode_step_inputs(pipe, run, image_id, steps)
        keys = [f"{layer}@{step}" for step in steps]
        activations = run.load_activations(image_id, keys=keys)
        depth_label = labels_run.load_label("depth", image_id)
        saliency_label = labels_run.load_label("saliency", image_id)
        size = depth_label.shape
        depth_probe = probes["depth"][0]
        depth_target = standardise_depth(
            depth_label[None], depth_probe.depth_mean, depth_probe.depth_std
        )[0]
        low, high = float(depth_target.min()), float(depth_target.max())

        for column, (step, key) in enumerate(zip(steps, keys, strict=True)):
            batch = activations[key][None].float()
            mask = probes["saliency"][column].predict_image(batch, size)[0]
            depth = probes["depth"][column].predict_image(batch, size)[0]
            axes[top, column].imshow(decoded[column])
            axes[top, column].set_title(f"step {step}", fontsize=8)
            axes[top + 1, column].imshow(mask, cmap="gray", vmin=0, vmax=1)
            axes[top + 2, column].imshow(depth, cmap="magma", vmin=low, vmax=high)

        axes[top, -1].imshow(np.asarray(run.load_image(image_id)))
        axes[top, -1].set_title("final", fontsize=8)
        axes[top + 1, -1].imshow(saliency_label > SALIENCY_THRESHOLD, cmap="gray", vmin=0, vmax=1)
        axes[top + 2, -1].imshow(depth_target, cmap="magma", vmin=low, vmax=high)
        for row, name in enumerate(("UNet input", "saliency", "depth")):
            axes[top + row, 0].set_ylabel(f"{image_id}: {name}", fontsize=8)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"Probes on {layer}; last column: final image and labels", fontsize=9)
    return figure

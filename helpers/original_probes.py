"""Convert the probes released with Chen, Viégas and Wattenberg (2023) into probe checkpoints.

The study's code (github.com/yc015/scene-representation-diffusion-model) saves each probe with
``torch.save(probe.state_dict(), ...)`` of a ``probeLinearDense``: one ``dense1.weight``
tensor (outputs, width), no bias for the probes converted here. Files sit in one folder per
step, ``at_step_N`` with N the 0-based step index of 15 LMS steps on Stable Diffusion v1.4 at
512x512, and are named::

    segmentation_probe_{layer}[_final].pth                    saliency, 2 logits
    regression_probe_{layer}[_final]_linear_no_bias[_unsmoothed].pth   depth, 1 output

Files without ``_final`` hold the weights with the lowest test loss over training, files with
it the weights after the last epoch. ``{layer}`` is ``{block}_{block_index}_attn1_out_{index}``
and maps to a diffusers module path as follows (the study hooks
``{block}_blocks.{block_index}.attentions.{index}.transformer_blocks.0.attn1.to_out.0``, the
output projection of the self-attention, whose output equals the ``attn1`` output because the
dropout after it is off in evaluation)::

    down_{i}_attn1_out_{j}  ->  down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1
    mid_0_attn1_out_{j}     ->  mid_block.attentions.{j}.transformer_blocks.0.attn1
    up_{i}_attn1_out_{j}    ->  up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1

The study's tokens are in row-major order of the grid and its saliency logit 1 is the salient
object, the same conventions as ``helpers.probes.LinearProbe``. Files are read with
``torch.load(weights_only=True)`` only, which never unpickles code.
"""

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import SD_V1_LMS_SCHEDULER_CONFIG
from .probe_checkpoints import ProbeCheckpoint, ProbeEntry, probe_from_state_dict
from .sampling import make_scheduler

logger = logging.getLogger(__name__)

ORIGINAL_MODEL = "CompVis/stable-diffusion-v1-4"
ORIGINAL_IMAGE_SIZE = 512
ORIGINAL_NUM_STEPS = 15

# Label normalisation of the study's depth probes: MiDaS relative inverse depth minus this mean,
# divided by this std, from scale_and_norm in probe_src/probe_depth_datasets.py of the study's
# code.
ORIGINAL_DEPTH_MEAN = 15.740597
ORIGINAL_DEPTH_STD = 9.281932

# Width and downsampling (relative to the latent) of each block's attn1 layers in SD v1.x, from
# input_dims_dict and scale_dict of the study's probing scripts (scale_dict gives the factor
# relative to the 512x512 image, 8 times the factor below).
BLOCK_WIDTH = {"down_0": 320, "down_1": 640, "down_2": 1280, "mid_0": 1280}
BLOCK_WIDTH |= {"up_1": 1280, "up_2": 640, "up_3": 320}
BLOCK_DOWNSAMPLING = {"down_0": 1, "down_1": 2, "down_2": 4, "mid_0": 8}
BLOCK_DOWNSAMPLING |= {"up_1": 4, "up_2": 2, "up_3": 1}

_FILE_PATTERN = re.compile(
    r"^(?P<kind>segmentation|regression)_probe_"
    r"(?P<block>down|mid|up)_(?P<block_index>\d+)_attn1_out_(?P<index>\d+)"
    r"(?P<final>_final)?(?P<suffix>.*)\.pth$"
)
_STEP_FOLDER = re.compile(r"^at_step_(?P<step>\d+)$")
DEPTH_SUFFIXES = ("_linear_no_bias", "_linear_no_bias_unsmoothed")


@dataclass(frozen=True)
class OriginalProbeFile:
    """One released probe file, parsed from its name and folder."""

    path: Path
    task: str
    layer: str
    block: str
    step: int
    final: bool
    suffix: str


def diffusers_layer_name(block: str, block_index: int, index: int) -> str:
    """Map the study's ``{block}_{block_index}_attn1_out_{index}`` to a diffusers module path.

    NOTE: the study's scripts take the hooked module as a command-line argument
    (``--layer_name``), and the file name records only ``attn1_out``. The mapping assumes it
    was ``transformer_blocks.0.attn1.to_out.0``, the value in the study's visualisation
    script. A probe trained on another module would load without error but read the wrong
    layer.
    """
    if block == "mid":
        return f"mid_block.attentions.{index}.transformer_blocks.0.attn1"
    return f"{block}_blocks.{block_index}.attentions.{index}.transformer_blocks.0.attn1"


def parse_original_probe_file(path: Path) -> OriginalProbeFile | None:
    """Parse a released probe's path, or return None for files that are not attn1 probes."""
    folder = _STEP_FOLDER.match(path.parent.name)
    name = _FILE_PATTERN.match(path.name)
    if folder is None or name is None:
        return None
    block = name["block"]
    block_index = int(name["block_index"])
    return OriginalProbeFile(
        path=path,
        task="saliency" if name["kind"] == "segmentation" else "depth",
        layer=diffusers_layer_name(block, block_index, int(name["index"])),
        block=f"{block}_{block_index}",
        step=int(folder["step"]),
        final=name["final"] is not None,
        suffix=name["suffix"],
    )


def original_timesteps(num_steps: int = ORIGINAL_NUM_STEPS) -> list[float]:
    """Timesteps of SD v1.4's LMS schedule for ``num_steps`` steps.

    NOTE: computed with diffusers 0.42's LMSDiscreteScheduler, but the study ran a modified
    copy of an older diffusers whose timestep spacing may differ slightly.
    """
    scheduler = make_scheduler("lms", SD_V1_LMS_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    return [float(timestep) for timestep in scheduler.timesteps]


def find_original_probes(
    folder: str | Path, *, final: bool = False, depth_suffix: str | None = None
) -> list[OriginalProbeFile]:
    """List the released attn1 probe files under ``folder``/at_step_N/ to convert.

    ``final`` picks the weights after the last epoch instead of the lowest-test-loss ones.
    ``depth_suffix`` picks between the smoothed (``_linear_no_bias``) and unsmoothed
    (``_linear_no_bias_unsmoothed``) depth probes when both exist; None accepts either as
    long as each layer and step has only one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No folder {folder}: pass the folder that contains the at_step_N folders of the "
            "released probes."
        )
    if depth_suffix is not None and depth_suffix not in DEPTH_SUFFIXES:
        raise ValueError(f"depth_suffix must be one of {DEPTH_SUFFIXES}, got {depth_suffix!r}.")

    selected: dict[tuple[str, str, int], OriginalProbeFile] = {}
    skipped = []
    for path in sorted(folder.glob("at_step_*/*.pth")):
        parsed = parse_original_probe_file(path)
        if parsed is None:
            skipped.append(path)
            continue
        if parsed.final != final:
            continue
        if parsed.step >= ORIGINAL_NUM_STEPS:
            raise ValueError(
                f"{path} is in a folder for step {parsed.step}, but the study sampled "
                f"{ORIGINAL_NUM_STEPS} steps (at_step_0 to at_step_{ORIGINAL_NUM_STEPS - 1}): "
                "remove folders of other runs."
            )
        if parsed.task == "saliency" and parsed.suffix:
            skipped.append(path)
            continue
        if parsed.task == "depth":
            allowed = DEPTH_SUFFIXES if depth_suffix is None else (depth_suffix,)
            if parsed.suffix not in allowed:
                skipped.append(path)
                continue
        key = (parsed.task, parsed.layer, parsed.step)
        if key in selected:
            raise ValueError(
                f"Two depth probes for layer {parsed.layer!r} at step {parsed.step}: "
                f"{selected[key].path.name} and {path.name}. Pass depth_suffix="
                f"'{selected[key].suffix}' or '{parsed.suffix}' to pick one."
            )
        selected[key] = parsed
    if skipped:
        # Probes with a bias, non-linear probes and other tasks (such as shading) have no
        # LinearProbe equivalent.
        logger.warning(
            "Skipped %d files that are not linear attn1 probes without bias: %s",
            len(skipped),
            ", ".join(path.name for path in skipped[:5]),
        )
    if not selected:
        kind = "_final" if final else "non-final (lowest test loss)"
        raise FileNotFoundError(
            f"No {kind} saliency or depth probe files found under {folder}/at_step_N/: "
            "expected names such as segmentation_probe_up_1_attn1_out_0.pth."
        )
    return list(selected.values())


def convert_original_probes(
    folder: str | Path,
    output_dir: str | Path,
    *,
    model: str = ORIGINAL_MODEL,
    image_size: int = ORIGINAL_IMAGE_SIZE,
    final: bool = False,
    depth_suffix: str | None = None,
) -> dict[str, Path]:
    """Convert released probes into ``output_dir``/{saliency,depth}.safetensors.

    Returns the written file per task. ``image_size`` sets the token grids (64x64 for
    down_0 at 512 pixels), which the probe files themselves do not record.
    """
    if image_size <= 0 or image_size % 64:
        raise ValueError(
            f"image_size must be a positive multiple of 64 (the VAE's factor 8 times the UNet's "
            f"three 2x downsamplings), got {image_size}."
        )
    files = find_original_probes(folder, final=final, depth_suffix=depth_suffix)
    latent_size = image_size // 8
    timesteps = original_timesteps()

    checkpoints: dict[str, ProbeCheckpoint] = {}
    for probe_file in sorted(files, key=lambda item: (item.task, item.step, item.layer)):
        state = torch.load(probe_file.path, weights_only=True, map_location="cpu")
        grid = latent_size // BLOCK_DOWNSAMPLING[probe_file.block]
        width = BLOCK_WIDTH[probe_file.block]
        depth_mean, depth_std = (0.0, 1.0)
        if probe_file.task == "depth":
            depth_mean, depth_std = ORIGINAL_DEPTH_MEAN, ORIGINAL_DEPTH_STD
        probe = probe_from_state_dict(state, probe_file.task, grid, depth_mean, depth_std)
        if probe.width != width:
            raise ValueError(
                f"{probe_file.path} contains a {probe.width}-wide probe, but the attn1 layers of "
                f"{probe_file.block} in SD v1.x are {width} wide: the file does not belong to "
                "this block."
            )
        entry = ProbeEntry(
            layer=probe_file.layer,
            step=probe_file.step,
            timestep=timesteps[probe_file.step],
            width=width,
            grid=(grid, grid),
            depth_mean=depth_mean,
            depth_std=depth_std,
        )
        if probe_file.task not in checkpoints:
            checkpoints[probe_file.task] = ProbeCheckpoint(model=model, task=probe_file.task)
        checkpoints[probe_file.task].add(entry, probe)

    output_dir = Path(output_dir)
    return {
        task: checkpoint.save(output_dir / f"{task}.safetensors")
        for task, checkpoint in checkpoints.items()
    }


def original_layer_names() -> Sequence[str]:
    """List the 16 diffusers layer names that the study's file names map to, in network order."""
    names = [diffusers_layer_name("down", i, j) for i in range(3) for j in range(2)]
    names.append(diffusers_layer_name("mid", 0, 0))
    names += [diffusers_layer_name("up", i, j) for i in range(1, 4) for j in range(3)]
    return names

"""Save and load fitted probes as safetensors files with metadata that is checked on load.

Layout: one file per (model, source, task), such as ``probes/model_saliency.safetensors``,
holding one tensor per (layer, step) under the key ``"{layer}@{step}"``: the probe weight W,
(outputs, width) in float32, 2 outputs for saliency and 1 for depth. One file per task keeps
the 16 x 15 probes of a Stable Diffusion sweep in one file (1.5 MB for saliency).

The safetensors header metadata (string to string) holds:

- ``format``: ``FORMAT``, to reject files of another layout
- ``model``: the model id the probes were fitted on (``"toy"``, a hub id or a folder)
- ``unet_variant``: ``original``, ``shuffled`` or ``reinit``
- ``source``: the metrics table's source label (``model``, ``vae_decoder``, ``latent`` ...)
- ``task``: ``saliency`` or ``depth``
- ``probes``: JSON mapping each key to ``layer``, ``step``, ``timestep``, ``width``,
  ``grid`` [rows, cols], ``depth_mean`` and ``depth_std`` (the label normalisation of depth
  probes, 0 and 1 for saliency) and ``metrics`` (test scores, possibly empty)

``ProbeCheckpoint.probe`` checks the model id, layer, width and grid against the layer that a
probe is about to read and raises ``ProbeMismatchError`` naming the mismatch and the fix.
"""

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .hooks import LayerInfo
from .probes import TASKS, LinearProbe

logger = logging.getLogger(__name__)

FORMAT = "ldm-scene-probes/probes-v1"
STATE_DICT_WEIGHT = "dense1.weight"


class ProbeMismatchError(ValueError):
    """Raised when a saved probe does not fit the model or layer it is applied to."""


@dataclass(frozen=True)
class ProbeEntry:
    """Metadata of one saved probe."""

    layer: str
    """Layer name (module path, ``vae_decoder`` key prefix or ``latent``)."""
    step: int
    """Index of the denoising step, 0 for the noisiest."""
    timestep: float | None
    """Scheduler timestep of that step, None where unknown."""
    width: int
    """Channels of the activations the probe reads."""
    grid: tuple[int, int]
    """Rows and columns of the token grid it was fitted on."""
    depth_mean: float = 0.0
    """Mean of the training depth labels. Predictions are in standard deviations from it."""
    depth_std: float = 1.0
    """Standard deviation of the training depth labels."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Test scores (dice, or rmse / spearman / pearson), empty where unknown."""

    @property
    def key(self) -> str:
        return probe_key(self.layer, self.step)


def probe_key(layer: str, step: int) -> str:
    return f"{layer}@{step}"


def probe_state_dict(probe: LinearProbe) -> dict[str, torch.Tensor]:
    """Return the probe weight as a state dict of the original study's ``probeLinearDense``.

    The dict contains plain tensors only, so ``torch.load`` reads it with its default
    ``weights_only=True``.
    """
    return {STATE_DICT_WEIGHT: probe.weight.detach().clone().contiguous()}


def probe_from_state_dict(
    state: Mapping[str, torch.Tensor],
    task: str,
    grid: int,
    depth_mean: float = 0.0,
    depth_std: float = 1.0,
) -> LinearProbe:
    """Build a LinearProbe from a state dict with one ``dense1.weight`` (outputs, width)."""
    keys = sorted(state)
    if keys != [STATE_DICT_WEIGHT]:
        raise ValueError(
            f"Expected a state dict with the single key {STATE_DICT_WEIGHT!r} of a linear probe "
            f"without bias, got keys {keys}: probes with a bias or hidden layers cannot be loaded."
        )
    weight = state[STATE_DICT_WEIGHT].detach().float().clone()
    return LinearProbe(task, weight, grid, depth_mean, depth_std)


@dataclass
class ProbeCheckpoint:
    """All probes of one task fitted on one model, keyed by ``"{layer}@{step}"``."""

    model: str
    task: str
    unet_variant: str = "original"
    source: str = "model"
    entries: dict[str, ProbeEntry] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}.")

    def add(self, entry: ProbeEntry, probe: LinearProbe) -> None:
        """Add a fitted probe, whose task, width and grid must agree with ``entry``."""
        if probe.task != self.task:
            raise ValueError(
                f"Cannot add a {probe.task} probe to a {self.task} checkpoint: keep one "
                "checkpoint per task."
            )
        if probe.width != entry.width or (probe.grid, probe.grid) != tuple(entry.grid):
            raise ValueError(
                f"Probe for {entry.key} has width {probe.width} on a {probe.grid}x{probe.grid} "
                f"grid, but its entry says width {entry.width} on grid {entry.grid}."
            )
        self.entries[entry.key] = entry
        self.weights[entry.key] = probe.weight.detach().float().contiguous()

    @property
    def layers(self) -> list[str]:
        """Layers in the order they were added."""
        return list(dict.fromkeys(entry.layer for entry in self.entries.values()))

    @property
    def steps(self) -> list[int]:
        return sorted({entry.step for entry in self.entries.values()})

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint as one safetensors file with metadata."""
        if not self.entries:
            raise ValueError("The checkpoint has no probes: add() fitted probes before save().")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        probes = {key: asdict(entry) for key, entry in self.entries.items()}
        metadata = {
            "format": FORMAT,
            "model": self.model,
            "unet_variant": self.unet_variant,
            "source": self.source,
            "task": self.task,
            "probes": json.dumps(probes),
        }
        save_file(dict(self.weights), str(path), metadata=metadata)
        logger.info("Saved %d %s probes to %s", len(self.entries), self.task, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ProbeCheckpoint":
        """Read a checkpoint written by ``save``, raising on a missing file or another format."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No probe checkpoint at {path}: fit probes with helpers.probe_sweep.sweep_run, "
                "or convert released ones with helpers.original_probes.convert_original_probes."
            )
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(
                    f"{path} is not a probe checkpoint of format {FORMAT!r} (its format field is "
                    f"{metadata.get('format')!r}): save probes with ProbeCheckpoint.save."
                )
            weights = {key: handle.get_tensor(key) for key in handle.keys()}
        entries = {}
        for key, values in json.loads(metadata["probes"]).items():
            values["grid"] = tuple(values["grid"])
            entries[key] = ProbeEntry(**values)
        missing = sorted(set(entries) ^ set(weights))
        if missing:
            raise ValueError(
                f"{path} is inconsistent: keys {missing} have metadata or a tensor but not both. "
                "Save the checkpoint again."
            )
        return cls(
            model=metadata["model"],
            task=metadata["task"],
            unet_variant=metadata.get("unet_variant", "original"),
            source=metadata.get("source", "model"),
            entries=entries,
            weights=weights,
        )

    def probe(
        self,
        layer: str,
        step: int,
        *,
        model: str,
        width: int,
        grid: tuple[int, int],
        unet_variant: str = "original",
    ) -> LinearProbe:
        """Return the probe of ``layer`` at ``step`` after checking that it fits.

        ``model``, ``width`` and ``grid`` describe the model and layer the probe will read.

        Raises:
            ProbeMismatchError: the model id, UNet variant, width or grid differ, or the
                checkpoint has no probe for this layer and step.
        """
        if model != self.model:
            raise ProbeMismatchError(
                f"These {self.task} probes were fitted on model {self.model!r}, not on "
                f"{model!r}: fit probes for {model!r} (notebook 03) or load the checkpoint "
                f"of {model!r}."
            )
        if unet_variant != self.unet_variant:
            raise ProbeMismatchError(
                f"These {self.task} probes were fitted on the {self.unet_variant!r} UNet of "
                f"{model!r}, not on its {unet_variant!r} variant: load the checkpoint of that "
                "variant's run."
            )
        key = probe_key(layer, step)
        if key not in self.entries:
            raise ProbeMismatchError(
                f"No {self.task} probe for layer {layer!r} at step {step}: this checkpoint has "
                f"layers {self.layers} at steps {self.steps}."
            )
        entry = self.entries[key]
        if width != entry.width:
            raise ProbeMismatchError(
                f"The {self.task} probe for layer {layer!r} reads {entry.width}-wide "
                f"activations, but the layer is {width} wide: load the probe fitted for this "
                "layer of this model."
            )
        if tuple(grid) != tuple(entry.grid):
            raise ProbeMismatchError(
                f"The {self.task} probe for layer {layer!r} was fitted on a "
                f"{entry.grid[0]}x{entry.grid[1]} grid, but the layer has a {grid[0]}x{grid[1]} "
                "grid: generate at the image size the probe was fitted at, or fit new probes."
            )
        if grid[0] != grid[1]:
            raise ProbeMismatchError(
                f"Layer {layer!r} has a non-square {grid[0]}x{grid[1]} grid, which LinearProbe "
                "does not support: use square images."
            )
        return LinearProbe(
            self.task, self.weights[key].clone(), grid[0], entry.depth_mean, entry.depth_std
        )

    def probe_for_layer(
        self, layer: LayerInfo, step: int, *, model: str, unet_variant: str = "original"
    ) -> LinearProbe:
        """Return the probe for a layer described by ``hooks.layer_infos``, checked as in
        ``probe``."""
        return self.probe(
            layer.name,
            step,
            model=model,
            width=layer.width,
            grid=layer.grid,
            unet_variant=unet_variant,
        )


def load_probe(
    path: str | Path,
    layer: LayerInfo,
    step: int,
    *,
    model: str,
    unet_variant: str = "original",
) -> LinearProbe:
    """Load one probe from a checkpoint file, checked against ``model`` and ``layer``."""
    checkpoint = ProbeCheckpoint.load(path)
    return checkpoint.probe_for_layer(layer, step, model=model, unet_variant=unet_variant)

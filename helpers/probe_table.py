"""Probe cells of a run and the metrics table that the sweeps write, one row per probe.

A *cell* is one activation source at one step: a UNet self-attention layer, the VAE decoder's
mid-block self-attention (``vae_decoder``) or the noisy latent itself (``latent``). Its
activations are stored under ``"{key_prefix}@{step}"`` in a run folder's activation files.

The table is a list of dicts with the columns in ``METRIC_COLUMNS``. Saliency rows fill
``dice`` and leave the depth scores empty, and depth rows do the opposite. On disk it is a CSV
file, ``{run}/probes/metrics.csv``, where an empty field means "not applicable".
"""

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .run_folder import LATENT_KEY, UNET_VARIANTS, VAE_DECODER_KEY

METRIC_COLUMNS = (
    "source",
    "task",
    "layer",
    "block",
    "grid",
    "width",
    "step",
    "timestep",
    "dice",
    "rmse",
    "spearman",
    "pearson",
    "method",
    "fit_seconds",
    "train_images",
    "test_images",
)
INT_COLUMNS = ("width", "step", "train_images", "test_images")
FLOAT_COLUMNS = ("timestep", "dice", "rmse", "spearman", "pearson", "fit_seconds")

# Sources of the controls, named as the key prefixes of a run folder's activation files.
VAE_SOURCE = VAE_DECODER_KEY
LATENT_SOURCE = LATENT_KEY


@dataclass(frozen=True)
class ProbeCell:
    """One activation source that gets a probe at each step."""

    source: str
    """Table label: ``model``, ``shuffled`` or ``reinit`` for UNet layers, ``vae_decoder`` and
    ``latent`` for the controls of the original model, prefixed by the variant otherwise."""
    key_prefix: str
    """Layer name in the activation files' keys ``"{key_prefix}@{step}"``."""
    layer: str
    """Module path of the layer (of the VAE for ``vae_decoder``), or ``latent``."""
    block: str
    """``down_0``, ``mid``, ``up_1`` ... for UNet layers, the VAE layer's block from run.json
    (``vae_decoder_mid``) or ``latent``."""
    grid: tuple[int, int]
    """Rows and columns of the token grid."""
    width: int
    """Channels of each token."""

    @property
    def label(self) -> str:
        """Axis label such as ``down_0 16x16``."""
        return f"{self.block} {format_grid(self.grid)}"

    def key(self, step: int) -> str:
        return f"{self.key_prefix}@{step}"


def format_grid(grid: Sequence[int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def source_name(unet_variant: str, kind: str) -> str:
    """Table label of a source: ``kind`` is ``unet``, ``vae_decoder`` or ``latent``."""
    if unet_variant not in UNET_VARIANTS:
        raise ValueError(
            f"Unknown unet_variant {unet_variant!r} in run.json: expected one of "
            f"{list(UNET_VARIANTS)}."
        )
    if kind == "unet":
        return "model" if unet_variant == "original" else unet_variant
    return kind if unet_variant == "original" else f"{unet_variant}_{kind}"


def run_cells(
    config: Mapping, latent_grid: tuple[int, int], *, include_vae: bool = True
) -> list[ProbeCell]:
    """List the probe cells of a run from its ``run.json`` config, in network order.

    UNet layers come first in the order of ``config["layers"]``, then the VAE decoder's
    self-attention (when recorded and ``include_vae``), then the noisy latent (always, with 4
    channels on ``latent_grid``).
    """
    variant = config.get("unet_variant", "original")
    cells = []
    for layer in config["layers"]:
        cells.append(
            ProbeCell(
                source=source_name(variant, "unet"),
                key_prefix=layer["name"],
                layer=layer["name"],
                block=layer["block"],
                grid=tuple(layer["grid"]),
                width=int(layer["width"]),
            )
        )
    vae_layer = config.get("vae_layer")
    if include_vae and vae_layer:
        cells.append(
            ProbeCell(
                source=source_name(variant, VAE_SOURCE),
                key_prefix=VAE_DECODER_KEY,
                layer=vae_layer["module"],
                block=vae_layer["block"],
                grid=tuple(vae_layer["grid"]),
                width=int(vae_layer["width"]),
            )
        )
    cells.append(
        ProbeCell(
            source=source_name(variant, LATENT_SOURCE),
            key_prefix=LATENT_KEY,
            layer=LATENT_KEY,
            block=LATENT_KEY,
            grid=latent_grid,
            width=4,
        )
    )
    return cells


def metric_row(
    cell: ProbeCell,
    task: str,
    step: int,
    timestep: float,
    scores: Mapping[str, float],
    *,
    method: str,
    fit_seconds: float,
    train_images: int,
    test_images: int,
) -> dict:
    """Build one table row, with None for the scores that the task does not have."""
    row = {column: None for column in METRIC_COLUMNS}
    row.update(
        source=cell.source,
        task=task,
        layer=cell.layer,
        block=cell.block,
        grid=format_grid(cell.grid),
        width=cell.width,
        step=step,
        timestep=float(timestep),
        method=method,
        fit_seconds=float(fit_seconds),
        train_images=train_images,
        test_images=test_images,
    )
    unknown = set(scores) - set(METRIC_COLUMNS)
    if unknown:
        raise ValueError(f"Scores {sorted(unknown)} have no column in METRIC_COLUMNS.")
    row.update({name: float(value) for name, value in scores.items()})
    return row


def write_metrics_csv(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Write rows to a CSV file with the columns of ``METRIC_COLUMNS``, None as empty fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return path


def read_metrics_csv(path: str | Path) -> list[dict]:
    """Read a table written by ``write_metrics_csv``, parsing numbers and empty fields as None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No metrics table at {path}: run the probe sweep (helpers.probe_sweep.sweep_run) "
            "for this run folder first."
        )
    rows = []
    with path.open(newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict = {}
            for key, value in raw.items():
                if value == "":
                    row[key] = None
                elif key in INT_COLUMNS:
                    row[key] = int(value)
                elif key in FLOAT_COLUMNS:
                    row[key] = float(value)
                else:
                    row[key] = value
            rows.append(row)
    return rows


def is_missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_table(rows: Sequence[Mapping], columns: Sequence[str], digits: int = 3) -> str:
    """Format rows as a Markdown table with ``digits`` decimals per float and None as empty."""

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines)

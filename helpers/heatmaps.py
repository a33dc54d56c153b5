"""Heatmaps of probe scores over layer x step, and the best cell per task and source.

Input is the metrics table of ``helpers.probe_sweep`` (rows as dicts, from ``sweep_run`` or
``helpers.probe_table.read_metrics_csv``). Tables of several runs, such as the main run and
its shuffled control, are concatenated before plotting: each row carries its ``source``.

Layers appear in network order (the order of their first row, which the sweeps write in
network order) and are labelled by block and grid, such as ``down_0 16x16``. Blocks with
several layers number them in order: ``up_1.0 16x16``, ``up_1.1 16x16``.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from .probe_table import is_missing

TASK_METRIC = {"saliency": "dice", "depth": "rmse"}
"""Headline metric of each task: Dice of the salient-object mask, RMSE of standardised depth."""
HIGHER_IS_BETTER = {"dice": True, "rmse": False, "spearman": True, "pearson": True}


@dataclass
class MetricGrid:
    """One metric of one source and task as a (layers, steps) array, NaN where not fitted."""

    source: str
    task: str
    metric: str
    layers: list[str]
    labels: list[str]
    """Row labels, block and grid, such as ``down_0 16x16``."""
    steps: list[int]
    values: np.ndarray


def sources_of(rows: Sequence[Mapping]) -> list[str]:
    """Sources in the table, in the order of their first row."""
    return list(dict.fromkeys(row["source"] for row in rows))


def metric_grid(
    rows: Sequence[Mapping], source: str, task: str, metric: str | None = None
) -> MetricGrid:
    """Arrange one source's scores for ``task`` as a layers x steps grid."""
    metric = metric or TASK_METRIC[task]
    selected = [row for row in rows if row["source"] == source and row["task"] == task]
    if not selected:
        raise ValueError(
            f"No {task} rows for source {source!r}: the table has sources {sources_of(rows)}."
        )
    layers = list(dict.fromkeys(row["layer"] for row in selected))
    labels = _layer_labels(selected, layers)
    steps = sorted({int(row["step"]) for row in selected})
    values = np.full((len(layers), len(steps)), np.nan)
    for row in selected:
        value = row.get(metric)
        if not is_missing(value):
            values[layers.index(row["layer"]), steps.index(int(row["step"]))] = value
    row_labels = [labels[layer] for layer in layers]
    return MetricGrid(source, task, metric, layers, row_labels, steps, values)


def _layer_labels(rows: Sequence[Mapping], layers: Sequence[str]) -> dict[str, str]:
    """Label layers by block and grid, numbering the layers of blocks that have several."""
    block_of = {row["layer"]: row["block"] for row in rows}
    grid_of = {row["layer"]: row["grid"] for row in rows}
    per_block: dict[str, list[str]] = {}
    for layer in layers:
        per_block.setdefault(block_of[layer], []).append(layer)
    labels = {}
    for block, members in per_block.items():
        for position, layer in enumerate(members):
            name = block if len(members) == 1 else f"{block}.{position}"
            labels[layer] = f"{name} {grid_of[layer]}"
    return labels


def difference_grid(grid: MetricGrid, control: MetricGrid) -> MetricGrid:
    """Return ``grid - control`` per cell.

    A control with a single row (the VAE decoder, the latent) is compared with every layer at
    the same step. Otherwise the layers must match.
    """
    if control.steps != grid.steps:
        raise ValueError(
            f"Steps differ: {grid.source} has {grid.steps}, {control.source} {control.steps}."
        )
    if len(control.layers) == 1:
        values = grid.values - control.values
    elif control.labels == grid.labels:
        values = grid.values - control.values
    else:
        raise ValueError(
            f"Layers of {grid.source} ({len(grid.layers)}) and {control.source} "
            f"({len(control.layers)}) differ: compare runs of the same architecture."
        )
    return MetricGrid(
        f"{grid.source} - {control.source}",
        grid.task,
        grid.metric,
        grid.layers,
        grid.labels,
        grid.steps,
        values,
    )


def plot_metric_heatmaps(
    rows: Sequence[Mapping],
    task: str,
    metric: str | None = None,
    *,
    sources: Sequence[str] | None = None,
    reference: str = "model",
    controls: Sequence[str] = ("shuffled",),
) -> Figure:
    """Plot one heatmap per source, then the improvement of ``reference`` over each control.

    Sources share one colour scale so their panels compare directly. For RMSE, where lower
    is better, the colour map is reversed so that better cells are always brighter. Controls
    missing from the table are left out.
    """
    metric = metric or TASK_METRIC[task]
    sources = list(sources) if sources is not None else sources_of(rows)
    grids = [metric_grid(rows, source, task, metric) for source in sources]
    by_source = {grid.source: grid for grid in grids}
    present = [control for control in controls if control in by_source and reference in by_source]
    differences = [difference_grid(by_source[reference], by_source[c]) for c in present]
    panels = grids + differences
    heights = [len(grid.layers) + 1.5 for grid in panels]
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(1.2 + 0.45 * len(grids[0].steps) + 2.5, 0.28 * sum(heights) + 0.8),
        height_ratios=heights,
        squeeze=False,
        layout="constrained",
    )
    axes = axes[:, 0]

    values = np.concatenate([grid.values.ravel() for grid in grids])
    low, high = np.nanmin(values), np.nanmax(values)
    colours = "viridis" if HIGHER_IS_BETTER.get(metric, True) else "viridis_r"
    image = None
    for axis, grid in zip(axes, grids, strict=False):
        image = _draw_grid(axis, grid, colours, low, high)
    figure.colorbar(image, ax=list(axes[: len(grids)]), label=metric, shrink=0.8)

    if differences:
        # Shown as the reference's improvement, so red means "reference better" for either
        # direction of the metric: the difference for Dice, its negative for RMSE.
        sign = 1 if HIGHER_IS_BETTER.get(metric, True) else -1
        largest = np.nanmax([np.nanmax(np.abs(grid.values)) for grid in differences])
        largest = largest if math.isfinite(largest) and largest > 0 else 1.0
        for axis, grid, control in zip(axes[len(grids) :], differences, present, strict=True):
            improvement = MetricGrid(**{**grid.__dict__, "values": sign * grid.values})
            diff_image = _draw_grid(axis, improvement, "RdBu_r", -largest, largest)
            axis.set_title(f"{reference} improvement over {control}", fontsize=9)
        figure.colorbar(
            diff_image, ax=list(axes[len(grids) :]), label=f"{metric} improvement", shrink=0.8
        )
    axes[-1].set_xlabel("step")
    figure.suptitle(f"{task} probes: {metric} per layer and step")
    return figure


def _draw_grid(axis, grid: MetricGrid, colours: str, low: float, high: float):
    image = axis.imshow(grid.values, cmap=colours, vmin=low, vmax=high, aspect="auto")
    axis.set_yticks(range(len(grid.labels)), grid.labels, fontsize=7)
    axis.set_xticks(range(len(grid.steps)), grid.steps, fontsize=7)
    axis.set_title(grid.source, fontsize=9)
    return image


def best_cells(
    rows: Sequence[Mapping],
    *,
    metrics: Mapping[str, str] | None = None,
    reference: str = "model",
) -> list[dict]:
    """Return the best cell per (task, source): its score, layer, block, grid and step.

    ``metrics`` maps task to metric (``TASK_METRIC`` by default), and the best cell has the
    highest Dice or the lowest RMSE. ``reference_minus_source`` is the reference's best score
    minus this source's best, so a positive value for Dice, and a negative one for RMSE,
    means the reference beats the control.
    """
    metrics = dict(metrics or TASK_METRIC)
    table = []
    for task, metric in metrics.items():
        higher = HIGHER_IS_BETTER.get(metric, True)
        best_by_source = {}
        for source in sources_of(rows):
            candidates = [
                row
                for row in rows
                if row["source"] == source and row["task"] == task and not is_missing(row[metric])
            ]
            if not candidates:
                continue
            pick = max if higher else min
            best_by_source[source] = pick(candidates, key=lambda row: row[metric])
        reference_best = best_by_source.get(reference)
        for source, row in best_by_source.items():
            difference = None
            if reference_best is not None and source != reference:
                difference = reference_best[metric] - row[metric]
            table.append(
                {
                    "task": task,
                    "source": source,
                    "metric": metric,
                    "value": row[metric],
                    "block": row["block"],
                    "grid": row["grid"],
                    "step": row["step"],
                    "timestep": row["timestep"],
                    "layer": row["layer"],
                    "reference_minus_source": difference,
                }
            )
    return table

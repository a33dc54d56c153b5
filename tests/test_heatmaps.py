"""Tests for helpers.heatmaps on small hand-made metrics tables."""

import numpy as np
import pytest
from matplotlib import pyplot as plt

from helpers.heatmaps import (
    best_cells,
    difference_grid,
    metric_grid,
    plot_metric_heatmaps,
)

LAYERS = [("down_blocks.0.a", "down_0", "16x16"), ("mid_block.a", "mid", "4x4")]


def make_rows(source, dice, rmse, layers=LAYERS):
    """Rows for ``layers`` x 3 steps; ``dice`` and ``rmse`` are (layers, steps) arrays."""
    rows = []
    for layer_index, (layer, block, grid) in enumerate(layers):
        for step in range(3):
            common = {"source": source, "layer": layer, "block": block, "grid": grid}
            common |= {"step": step, "timestep": 999.0 - 333 * step}
            rows.append(
                common
                | {"task": "saliency", "dice": dice[layer_index][step], "rmse": None}
                | {"spearman": None, "pearson": None}
            )
            rows.append(
                common
                | {"task": "depth", "dice": None, "rmse": rmse[layer_index][step]}
                | {"spearman": 0.5, "pearson": 0.5}
            )
    return rows


MODEL_ROWS = make_rows("model", [[0.5, 0.7, 0.9], [0.4, 0.6, 0.8]], [[0.9, 0.6, 0.3], [1, 1, 1]])
SHUFFLED_ROWS = make_rows("shuffled", [[0.3] * 3, [0.2] * 3], [[1.0] * 3, [0.95] * 3])
LATENT_ROWS = make_rows(
    "latent", [[0.4, 0.5, 0.6]], [[0.9, 0.8, 0.7]], layers=[("latent", "latent", "16x16")]
)
ROWS = MODEL_ROWS + SHUFFLED_ROWS + LATENT_ROWS


def test_grid_in_network_order_with_labels():
    grid = metric_grid(ROWS, "model", "saliency")
    assert grid.metric == "dice"
    assert grid.labels == ["down_0 16x16", "mid 4x4"]
    assert grid.steps == [0, 1, 2]
    np.testing.assert_allclose(grid.values, [[0.5, 0.7, 0.9], [0.4, 0.6, 0.8]])


def test_layers_of_one_block_numbered():
    layers = [("up_blocks.1.a0", "up_1", "8x8"), ("up_blocks.1.a1", "up_1", "8x8")]
    rows = make_rows("model", [[0.1] * 3, [0.2] * 3], [[1.0] * 3, [1.0] * 3], layers=layers)
    assert metric_grid(rows, "model", "depth").labels == ["up_1.0 8x8", "up_1.1 8x8"]


def test_grid_of_unknown_source_fails():
    with pytest.raises(ValueError, match="sources"):
        metric_grid(ROWS, "reinit", "depth")


def test_difference_to_layered_control():
    difference = difference_grid(
        metric_grid(ROWS, "model", "saliency"), metric_grid(ROWS, "shuffled", "saliency")
    )
    assert difference.source == "model - shuffled"
    np.testing.assert_allclose(difference.values, [[0.2, 0.4, 0.6], [0.2, 0.4, 0.6]])


def test_difference_to_single_row_control_broadcasts():
    difference = difference_grid(
        metric_grid(ROWS, "model", "depth"), metric_grid(ROWS, "latent", "depth")
    )
    np.testing.assert_allclose(difference.values, [[0.0, -0.2, -0.4], [0.1, 0.2, 0.3]])


def test_heatmap_figure_has_source_and_difference_panels():
    figure = plot_metric_heatmaps(ROWS, "depth", controls=("shuffled", "latent"))
    titles = [axis.get_title() for axis in figure.axes]
    assert "model" in titles
    assert "shuffled" in titles
    assert "latent" in titles
    assert "model improvement over shuffled" in titles
    assert "model improvement over latent" in titles
    heatmap = figure.axes[0]
    assert [label.get_text() for label in heatmap.get_yticklabels()] == ["down_0 16x16", "mid 4x4"]
    plt.close(figure)


def test_best_cells_per_task_and_source():
    table = best_cells(ROWS)
    best = {(row["task"], row["source"]): row for row in table}
    sources = ("model", "shuffled", "latent")
    assert set(best) == {(task, source) for task in ("saliency", "depth") for source in sources}
    model_saliency = best[("saliency", "model")]
    assert model_saliency["value"] == 0.9
    assert (model_saliency["block"], model_saliency["grid"], model_saliency["step"]) == (
        "down_0",
        "16x16",
        2,
    )
    assert model_saliency["reference_minus_source"] is None
    assert best[("saliency", "shuffled")]["reference_minus_source"] == pytest.approx(0.6)
    model_depth = best[("depth", "model")]
    assert model_depth["value"] == 0.3
    assert best[("depth", "latent")]["reference_minus_source"] == pytest.approx(0.3 - 0.7)

"""Tests for helpers.probe_sweep and helpers.probe_table on hand-written run folders."""

import pytest
from probe_fixtures import (
    INFORMATIVE_LAYER,
    LAYERS,
    NOISE_LAYER,
    VAE_MODULE,
    write_synthetic_run,
)

from helpers.probe_checkpoints import ProbeCheckpoint
from helpers.probe_sweep import compare_depth_fits, sweep_run
from helpers.probe_table import METRIC_COLUMNS, format_table, read_metrics_csv
from helpers.probes import ProbeFitSettings, score_probe
from helpers.run_folder import RunFolderError

CLOSED_FORM = ProbeFitSettings(saliency_method="closed_form")


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("main"))


@pytest.fixture(scope="module")
def main_rows(main_run):
    return sweep_run(main_run, settings=CLOSED_FORM, progress=False)


def row_of(rows, source, task, layer, step=0):
    matches = [
        row
        for row in rows
        if (row["source"], row["task"], row["layer"], row["step"]) == (source, task, layer, step)
    ]
    assert len(matches) == 1, (source, task, layer, step)
    return matches[0]


def test_sweep_covers_every_cell(main_rows):
    # 2 UNet layers + VAE decoder + latent, 2 steps, 2 tasks.
    assert len(main_rows) == 4 * 2 * 2
    sources = {row["source"] for row in main_rows}
    assert sources == {"model", "vae_decoder", "latent"}
    layers = {row["layer"] for row in main_rows}
    assert layers == {INFORMATIVE_LAYER, NOISE_LAYER, VAE_MODULE, "latent"}


def test_sweep_rows_have_all_columns(main_rows):
    for row in main_rows:
        assert tuple(row) == METRIC_COLUMNS
    saliency = row_of(main_rows, "model", "saliency", INFORMATIVE_LAYER)
    assert saliency["rmse"] is None
    assert saliency["method"] == "closed_form"
    assert saliency["grid"] == "8x8"
    assert saliency["block"] == "down_0"
    assert saliency["width"] == 8
    assert saliency["train_images"] == 6
    assert saliency["test_images"] == 6
    depth = row_of(main_rows, "model", "depth", NOISE_LAYER, step=1)
    assert depth["dice"] is None
    assert depth["timestep"] == 499.0


def test_informative_layer_beats_noise(main_rows):
    informative = row_of(main_rows, "model", "saliency", INFORMATIVE_LAYER)
    noise = row_of(main_rows, "model", "saliency", NOISE_LAYER)
    assert informative["dice"] > 0.9
    assert noise["dice"] < 0.7

    informative = row_of(main_rows, "model", "depth", INFORMATIVE_LAYER)
    noise = row_of(main_rows, "model", "depth", NOISE_LAYER)
    assert informative["rmse"] < 0.2
    assert informative["spearman"] > 0.9
    assert noise["rmse"] > 0.8


def test_metrics_csv_round_trip(main_run, main_rows):
    read = read_metrics_csv(main_run.path / "probes" / "metrics.csv")
    assert len(read) == len(main_rows)
    for written, loaded in zip(main_rows, read, strict=True):
        assert loaded.keys() == written.keys()
        for column, value in written.items():
            if isinstance(value, float):
                assert loaded[column] == pytest.approx(value, rel=1e-12)
            else:
                assert loaded[column] == value


def test_missing_metrics_csv_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep_run"):
        read_metrics_csv(tmp_path / "metrics.csv")


def test_saved_probes_reproduce_scores(main_run, main_rows):
    checkpoint = ProbeCheckpoint.load(main_run.path / "probes" / "model_depth.safetensors")
    layer = LAYERS[0]
    probe = checkpoint.probe(
        INFORMATIVE_LAYER, 0, model="synthetic", width=layer["width"], grid=tuple(layer["grid"])
    )
    scores = score_probe(
        probe,
        main_run.load_cell(INFORMATIVE_LAYER, 0, "test"),
        main_run.load_labels("depth", "test"),
    )
    row = row_of(main_rows, "model", "depth", INFORMATIVE_LAYER)
    assert scores["rmse"] == pytest.approx(row["rmse"])
    assert checkpoint.entries[f"{INFORMATIVE_LAYER}@0"].metrics["rmse"] == pytest.approx(
        row["rmse"]
    )


def test_depth_standardised_by_train_split(main_run, main_rows):
    train_depth = main_run.load_labels("depth", "train")
    checkpoint = ProbeCheckpoint.load(main_run.path / "probes" / "latent_depth.safetensors")
    entry = checkpoint.entries["latent@0"]
    assert entry.depth_mean == pytest.approx(float(train_depth.mean()), rel=1e-6)
    assert entry.depth_std == pytest.approx(float(train_depth.std()), rel=1e-6)


def test_control_uses_main_labels(tmp_path, main_run):
    control = write_synthetic_run(
        tmp_path / "shuffled", unet_variant="shuffled", labels=False, seed=7
    )
    rows = sweep_run(control, main_run, CLOSED_FORM, progress=False)
    sources = {row["source"] for row in rows}
    assert sources == {"shuffled", "shuffled_vae_decoder", "shuffled_latent"}
    # The control's informative layer is noise, so its probe scores near chance.
    assert row_of(rows, "shuffled", "saliency", INFORMATIVE_LAYER)["dice"] < 0.7
    assert (control.path / "probes" / "shuffled_saliency.safetensors").is_file()


def test_control_without_labels_run_fails(tmp_path):
    control = write_synthetic_run(tmp_path / "shuffled", unet_variant="shuffled", labels=False)
    with pytest.raises(FileNotFoundError, match="pass the main run as labels_run"):
        sweep_run(control, settings=CLOSED_FORM, progress=False)


def test_control_with_other_images_fails(tmp_path, main_run):
    control = write_synthetic_run(tmp_path / "other", images=8, labels=False)
    with pytest.raises(RunFolderError, match="differs"):
        sweep_run(control, main_run, CLOSED_FORM, progress=False)


def test_streamed_run_rejected(tmp_path):
    run = write_synthetic_run(tmp_path / "streamed", storage="streamed")
    with pytest.raises(ValueError, match="sweep_streamed"):
        sweep_run(run, settings=CLOSED_FORM, progress=False)


def test_closed_form_saliency_default(tmp_path):
    run = write_synthetic_run(tmp_path / "run", images=6, steps=1)
    rows = sweep_run(run, settings=ProbeFitSettings(), progress=False)
    saliency = [row for row in rows if row["task"] == "saliency"]
    assert {row["method"] for row in saliency} == {"closed_form"}
    assert row_of(rows, "model", "saliency", INFORMATIVE_LAYER)["dice"] > 0.9


def test_gradient_saliency_sweep(tmp_path):
    run = write_synthetic_run(tmp_path / "run", images=6, steps=1)
    settings = ProbeFitSettings(saliency_method="gradient", gradient_iterations=10)
    rows = sweep_run(run, settings=settings, progress=False)
    saliency = [row for row in rows if row["task"] == "saliency"]
    assert {row["method"] for row in saliency} == {"gradient"}
    assert row_of(rows, "model", "saliency", INFORMATIVE_LAYER)["dice"] > 0.9


def test_depth_fit_comparison(main_run):
    rows = compare_depth_fits(main_run, main_run, [(INFORMATIVE_LAYER, 0)], iterations=300)
    assert [row["method"] for row in rows] == ["closed_form", "gradient"]
    closed, gradient = rows
    assert closed["rmse"] < 0.2
    assert gradient["rmse"] < 1.0
    assert closed["fit_seconds"] >= 0
    assert "rmse" in format_table(rows, ["layer", "method", "rmse", "fit_seconds"])


def test_format_table_markdown():
    text = format_table([{"a": 1, "b": 0.12345, "c": None}], ["a", "b", "c"])
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.123 |  |"]

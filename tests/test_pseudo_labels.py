"""Labelling run folders and scoring labelers on rendered scenes, with untrained estimators.

The estimators here have random weights, so the tests check files, shapes, resuming and the
handling of blank images. Scores are checked with an oracle labeler that returns the exact
rendered labels.
"""

import json

import numpy as np
import pytest
import torch

from helpers.labels import Labeler, ToyDepthLabeler, ToySaliencyLabeler
from helpers.models import build_toy_pipeline_random
from helpers.paths import DATA_DIR
from helpers.prompt_lists import read_prompt_table
from helpers.pseudo_labels import label_run, score_labels_on_renders, summarize_labels
from helpers.run_folder import (
    TEMPORARY_SUFFIX,
    RunFolder,
    RunFolderError,
    write_png_atomically,
)
from helpers.run_generation import generate_run
from helpers.sampling import SamplingConfig
from helpers.toyworld.dataset import HELD_OUT_SEED_START
from helpers.toyworld.estimators import DepthSaliencyNet, ToyEstimator
from helpers.toyworld.render import render

ONE_STEP = SamplingConfig(num_steps=1, guidance_scale=4.0)
IMAGE_COUNT = 4
BLACK_IMAGE_ID = 0


@pytest.fixture(scope="module")
def estimator():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ToyEstimator(DepthSaliencyNet())


@pytest.fixture(scope="module")
def depth_labeler(estimator):
    return ToyDepthLabeler(estimator)


@pytest.fixture(scope="module")
def saliency_labeler(estimator):
    return ToySaliencyLabeler(estimator)


@pytest.fixture(scope="module")
def image_run_dir(tmp_path_factory):
    """A streamed run of four images whose image 0 is replaced by an all-black image."""
    table = read_prompt_table(DATA_DIR / "toy_prompts.csv").head(IMAGE_COUNT)
    folder = tmp_path_factory.mktemp("runs") / "toy"
    pipe = build_toy_pipeline_random(seed=0)
    run = generate_run(
        pipe, table, folder, ONE_STEP, "toy-random", store_activations=False, progress=False
    )
    write_png_atomically(run.image_path(BLACK_IMAGE_ID), np.zeros((64, 64, 3), np.uint8))
    return folder


@pytest.fixture
def run_dir(image_run_dir, tmp_path):
    """A fresh, unlabelled copy of the module's run folder."""
    import shutil

    copy = tmp_path / "toy"
    shutil.copytree(image_run_dir, copy)
    return copy


@pytest.fixture(scope="module")
def labelled_run(image_run_dir, depth_labeler, saliency_labeler, tmp_path_factory):
    import shutil

    copy = tmp_path_factory.mktemp("labelled") / "toy"
    shutil.copytree(image_run_dir, copy)
    return label_run(copy, depth_labeler, saliency_labeler, progress=False)


class OracleLabeler(Labeler):
    """Returns the exact labels of the scenes rendered from consecutive seeds."""

    def __init__(self, kind: str, first_seed: int):
        super().__init__(f"oracle-{kind}", "1")
        self.kind = kind
        self.first_seed = first_seed

    def _predict(self, images):
        scenes = [render(self.first_seed + index) for index in range(len(images))]
        if self.kind == "depth":
            return np.stack([scene.relative_inverse_depth for scene in scenes])
        return np.stack([scene.salient_mask for scene in scenes]).astype(np.float32)


# label_run


def test_label_files_shape_and_dtype(labelled_run):
    for kind in ("depth", "saliency"):
        for image_id in labelled_run.image_ids():
            label = labelled_run.load_label(kind, image_id)
            assert label.shape == (64, 64), (kind, image_id)
            assert label.dtype == np.float32, (kind, image_id)


def test_labels_json_names_labelers(labelled_run, depth_labeler, saliency_labeler):
    record = json.loads((labelled_run.path / "labels" / "labels.json").read_text())

    assert record == {
        "depth": {"name": "toy-depth", "version": depth_labeler.version},
        "saliency": {"name": "toy-saliency", "version": saliency_labeler.version},
    }


def test_toy_labeler_version_tracks_weights(estimator):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        retrained = ToyEstimator(DepthSaliencyNet())

    assert ToyDepthLabeler(estimator).version.startswith("1+")
    assert ToyDepthLabeler(estimator).version == ToySaliencyLabeler(estimator).version
    assert ToyDepthLabeler(retrained).version != ToyDepthLabeler(estimator).version


def test_has_labels_after_labelling(labelled_run):
    assert labelled_run.has_labels("depth")
    assert labelled_run.has_labels("saliency")


def test_load_labels_stacks_split(labelled_run):
    assert labelled_run.load_labels("depth", "train").shape == (2, 64, 64)
    assert labelled_run.load_labels("saliency", "test").shape == (2, 64, 64)
    assert labelled_run.load_labels("saliency", None).dtype == np.float32


def test_labels_equal_labeler_output(labelled_run, depth_labeler):
    image = labelled_run.load_image(2)

    # label_run labels a batch of four images. CPU kernels block their sums by batch size,
    # so the image labelled alone differs in the last bits.
    np.testing.assert_allclose(
        labelled_run.load_label("depth", 2), depth_labeler(image)[0], rtol=0, atol=1e-5
    )


def test_black_image_label_has_empty_mask(labelled_run):
    saliency = labelled_run.load_label("saliency", BLACK_IMAGE_ID)

    assert not np.isnan(saliency).any()
    assert not (saliency > 0.5).any()


def test_black_image_depth_has_no_nan(labelled_run):
    depth = labelled_run.load_label("depth", BLACK_IMAGE_ID)

    assert np.isfinite(depth).all()


def test_saliency_on_black_64x64_image_is_empty(saliency_labeler):
    saliency = saliency_labeler(np.zeros((64, 64, 3), np.uint8))

    assert saliency.shape == (1, 64, 64)
    assert not np.isnan(saliency).any()
    assert not (saliency > 0.5).any()


def test_unlabelled_run_has_no_labels(run_dir):
    run = RunFolder(run_dir)

    assert not run.has_labels("depth")
    with pytest.raises(RunFolderError, match="label_run"):
        run.load_labels("depth", "train")


def test_label_run_resumes(run_dir, depth_labeler, saliency_labeler):
    run = label_run(run_dir, depth_labeler, saliency_labeler, progress=False)
    run.label_path("saliency", 3).unlink()
    leftover = run_dir / "labels" / "depth" / f".000003.npy.4242{TEMPORARY_SUFFIX}"
    leftover.write_bytes(b"partial")
    untouched = [
        run.label_path(kind, image_id) for kind in ("depth", "saliency") for image_id in (0, 1, 2)
    ]
    before = {path: path.stat().st_mtime_ns for path in untouched}

    label_run(run_dir, depth_labeler, saliency_labeler, progress=False)

    assert {path: path.stat().st_mtime_ns for path in untouched} == before
    assert run.label_path("saliency", 3).is_file()
    assert not leftover.exists()
    assert run.has_labels("saliency")


def test_label_run_rejects_other_labeler(run_dir, depth_labeler, saliency_labeler, estimator):
    label_run(run_dir, depth_labeler, saliency_labeler, progress=False)
    other = ToyDepthLabeler(estimator)
    other.version = "2"

    with pytest.raises(RunFolderError, match="delete .*labels"):
        label_run(run_dir, other, saliency_labeler, progress=False)


def test_label_run_skips_images_not_generated(run_dir, depth_labeler, saliency_labeler, caplog):
    RunFolder(run_dir).image_path(3).unlink()

    run = label_run(run_dir, depth_labeler, saliency_labeler, progress=False)

    assert "not generated yet" in caplog.text
    assert not run.label_path("depth", 3).exists()
    assert not run.has_labels("depth")


def test_label_run_rejects_wrong_label_shape(run_dir, saliency_labeler):
    class CroppingLabeler(Labeler):
        def _predict(self, images):
            return np.zeros((len(images), 32, 32), np.float32)

    with pytest.raises(RuntimeError, match="returned shape"):
        label_run(run_dir, CroppingLabeler("crop", "1"), saliency_labeler, progress=False)


def test_summarize_labels_counts_images(labelled_run):
    summary = summarize_labels(labelled_run)

    assert "toy-depth" in summary
    assert "train: 2 images" in summary
    assert "test: 2 images" in summary


# score_labels_on_renders


def test_oracle_labelers_score_perfectly():
    first_seed = HELD_OUT_SEED_START
    scores = score_labels_on_renders(
        OracleLabeler("depth", first_seed), OracleLabeler("saliency", first_seed), 4
    )

    assert scores["scenes"] == 4
    assert scores["saliency_dice"] == pytest.approx(1.0)
    assert scores["depth_spearman"] == pytest.approx(1.0)
    assert scores["depth_pearson"] == pytest.approx(1.0)


def test_untrained_labelers_score_in_range(depth_labeler, saliency_labeler):
    scores = score_labels_on_renders(depth_labeler, saliency_labeler, 4)

    assert 0.0 <= scores["saliency_dice"] <= 1.0
    assert -1.0 <= scores["depth_spearman"] <= 1.0
    assert -1.0 <= scores["depth_pearson"] <= 1.0


def test_score_rejects_zero_scenes(depth_labeler, saliency_labeler):
    with pytest.raises(ValueError, match="positive number of scenes"):
        score_labels_on_renders(depth_labeler, saliency_labeler, 0)


@pytest.mark.skipif(
    not (DATA_DIR / "toy_estimators" / "estimator.safetensors").exists(),
    reason="needs the trained toy estimators in data/toy_estimators",
)
def test_trained_toy_labelers_score_well():
    from helpers.labels import load_depth_labeler, load_saliency_labeler

    scores = score_labels_on_renders(load_depth_labeler("toy"), load_saliency_labeler("toy"), 32)

    # The estimators' scores on 500 held-out scenes are in data/toy_estimators/config.json
    # (Dice 0.95, Spearman 0.99 for the shipped weights). The first 32 of those scenes scored
    # Dice 0.93 and Spearman 0.997, so these bounds leave room for retrained weights.
    assert scores["saliency_dice"] > 0.85
    assert scores["depth_spearman"] > 0.95

"""Tests for helpers.probe_streaming: streamed fits equal in-memory fits on the same data."""

import numpy as np
import pytest
import torch
from probe_fixtures import INFORMATIVE_LAYER, NOISE_LAYER, write_synthetic_run

from helpers.probe_streaming import (
    StreamingProbeFitter,
    StreamingProbeScorer,
    TokenReservoir,
    sweep_streamed,
)
from helpers.probe_sweep import load_sweep_labels
from helpers.probes import (
    ProbeFitSettings,
    fit_depth_probe,
    fit_saliency_probe,
    score_probe,
)

CLOSED_FORM = ProbeFitSettings(saliency_method="closed_form")
KEYS = [f"{INFORMATIVE_LAYER}@0", f"{NOISE_LAYER}@1", "latent@0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("run"), images=12, steps=2)


@pytest.fixture(scope="module")
def labels(run):
    return load_sweep_labels(run)


def images_of(run, split):
    """Yield (activations, depth, saliency) per image of a split, as a stream would."""
    for image_id in run.image_ids(split):
        activations = run.load_activations(image_id, keys=KEYS)
        depth = run.load_label("depth", image_id)
        saliency = run.load_label("saliency", image_id)
        yield activations, depth, saliency


def fitted(run, settings, reservoir_tokens=None):
    fitter = StreamingProbeFitter(settings, reservoir_tokens=reservoir_tokens)
    for activations, depth, saliency in images_of(run, "train"):
        fitter.add_image(activations, depth, saliency)
    return fitter, fitter.fit()


def by_task(fits):
    return {fit.task: fit for fit in fits}


@pytest.mark.parametrize("key", KEYS)
def test_streamed_closed_form_equals_in_memory(run, labels, key):
    fitter, fits = fitted(run, CLOSED_FORM)
    prefix, step = key.rsplit("@", 1)
    train = run.load_cell(prefix, int(step), "train")
    depth = fit_depth_probe(
        train, labels.depth_train, labels.depth_mean, labels.depth_std, CLOSED_FORM.ridge
    )
    saliency = fit_saliency_probe(train, labels.saliency_train, CLOSED_FORM)

    streamed = by_task(fits[key])
    assert fitter.depth_mean == pytest.approx(labels.depth_mean, rel=1e-9)
    assert fitter.depth_std == pytest.approx(labels.depth_std, rel=1e-6)
    torch.testing.assert_close(streamed["depth"].probe.weight, depth.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        streamed["saliency"].probe.weight, saliency.weight, rtol=1e-4, atol=1e-5
    )
    assert streamed["depth"].probe.grid == depth.grid


def test_streamed_gradient_equals_in_memory(run, labels):
    settings = ProbeFitSettings(gradient_iterations=20)
    # 6 train images x 64 tokens fit in the reservoir, so it keeps every token in order.
    _, fits = fitted(run, settings, reservoir_tokens=6 * 64)
    train = run.load_cell(INFORMATIVE_LAYER, 0, "train")
    in_memory = fit_saliency_probe(train, labels.saliency_train, settings)
    streamed = by_task(fits[f"{INFORMATIVE_LAYER}@0"])["saliency"].probe
    torch.testing.assert_close(streamed.weight, in_memory.weight, rtol=1e-3, atol=1e-3)


def test_streamed_scores_equal_batch_scores(run, labels):
    _, fits = fitted(run, CLOSED_FORM)
    scorer = StreamingProbeScorer(fits)
    for activations, depth, saliency in images_of(run, "test"):
        scorer.add_image(activations, depth, saliency)
    scored = scorer.scored_fits()

    test = run.load_cell(INFORMATIVE_LAYER, 0, "test")
    for fit in scored[f"{INFORMATIVE_LAYER}@0"]:
        labels_test = labels.depth_test if fit.task == "depth" else labels.saliency_test
        expected = score_probe(fit.probe, test, labels_test)
        assert fit.scores.keys() == expected.keys()
        for name, value in expected.items():
            assert fit.scores[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_sweep_streamed_orders_train_before_test(run):
    fits = sweep_streamed(images_of(run, "train"), images_of(run, "test"), CLOSED_FORM)
    assert set(fits) == set(KEYS)
    saliency = by_task(fits[f"{INFORMATIVE_LAYER}@0"])["saliency"]
    assert saliency.scores["dice"] > 0.9


def test_fitter_memory_does_not_grow_with_images(run):
    fitter = StreamingProbeFitter(CLOSED_FORM, reservoir_tokens=100)
    stream = list(images_of(run, "train"))
    fitter.add_image(*stream[0])
    first = fitter.nbytes
    for image in stream[1:]:
        fitter.add_image(*image)
    assert fitter.nbytes == first
    assert fitter.images == len(stream)


def test_gradient_without_reservoir_fails():
    with pytest.raises(ValueError, match="reservoir_tokens"):
        StreamingProbeFitter(ProbeFitSettings(saliency_method="gradient"))


def test_fit_before_images_fails():
    with pytest.raises(ValueError, match="add_image"):
        StreamingProbeFitter(CLOSED_FORM).fit()


def test_changed_keys_fail(run):
    fitter = StreamingProbeFitter(CLOSED_FORM)
    stream = images_of(run, "train")
    fitter.add_image(*next(stream))
    activations, depth, saliency = next(stream)
    del activations["latent@0"]
    with pytest.raises(ValueError, match=r"missing \['latent@0'\]"):
        fitter.add_image(activations, depth, saliency)


def test_batched_activations_rejected():
    fitter = StreamingProbeFitter(CLOSED_FORM)
    depth = np.ones((8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"one image's \(tokens, width\)"):
        fitter.add_image({"latent@0": torch.zeros(2, 16, 4)}, depth, depth)


def test_reservoir_keeps_arrival_order_until_full():
    reservoir = TokenReservoir(capacity=10, width=2, dtype=torch.float32)
    inputs = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    reservoir.add(inputs, torch.linspace(0, 1, 6))
    sample, fraction = reservoir.sample()
    assert torch.equal(sample, inputs)
    assert torch.equal(fraction, torch.linspace(0, 1, 6))


def test_reservoir_sample_is_uniform():
    # Each of 1000 tokens, streamed in chunks, ends in a 100-token sample with probability 0.1.
    counts = torch.zeros(1000)
    for seed in range(200):
        reservoir = TokenReservoir(capacity=100, width=1, dtype=torch.float32, seed=seed)
        tokens = torch.arange(1000, dtype=torch.float32)[:, None]
        for chunk in tokens.split(64):
            reservoir.add(chunk, torch.zeros(len(chunk)))
        sample, _ = reservoir.sample()
        assert len(sample) == 100
        assert len(sample.unique()) == 100
        counts[sample[:, 0].long()] += 1
    first, last = counts[:500].mean() / 200, counts[500:].mean() / 200
    assert first == pytest.approx(0.1, abs=0.01)
    assert last == pytest.approx(0.1, abs=0.01)

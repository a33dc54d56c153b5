"""Fit probes from activations streamed image by image, for runs that cannot store them.

Stable Diffusion's 16 attn1 layers produce about 23 MB per image per step in float16, so a
full run does not keep its activations. ``StreamingProbeFitter`` takes one image's
activations and labels at a time and keeps, per (layer, step):

- the least-squares statistics of ``helpers.probes.StreamingLeastSquares``: A^T A (width x
  width, float64) and A^T [p, s, 1], where p is the token's mean depth, s = 2 f - 1 for the
  object's share f of the token (the +-1 target of saliency's closed form) and 1 the column
  sums. Depth targets are (p - mean) / std with the train split's mean and std. Those are only
  known at the end, so the depth moment is formed at solve time as (A^T p - mean A^T 1) / std,
  which equals A^T of the standardised targets.
- optionally a reservoir of at most ``reservoir_tokens`` tokens with their f, a uniform sample
  of all tokens seen, on which the cross-entropy saliency probe is refined.

Memory is therefore bounded by the number of cells, their widths and the reservoir size, and
does not grow with the number of images. Train images must all come before test images,
because scoring needs the fitted probes: ``sweep_streamed`` takes two iterables for that.
``sweep_streamed_run`` regenerates a run's images (one sampling pass per image, recording
every layer at every step) and feeds both.
"""

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .hooks import layer_infos
from .probe_sweep import (
    DEPTH_METHOD,
    SALIENCY_THRESHOLD,
    CellFit,
    SweepResults,
    bar_options,
)
from .probe_table import ProbeCell, run_cells
from .probes import (
    LinearProbe,
    ProbeFitSettings,
    StreamingLeastSquares,
    grid_of,
    pool_to_grid,
    refine_saliency_probe,
    score_probe,
)
from .progress import progress as progress_bar
from .run_folder import LATENT_KEY
from .run_generation import control_pipeline, image_activations
from .sampling import RecordingConfig, SamplingConfig, generate, vae_scale_factor

logger = logging.getLogger(__name__)

# Columns of the least-squares targets: token mean depth p, saliency target 2 f - 1, and 1.
_DEPTH, _SALIENCY, _ONES = 0, 1, 2


class TokenReservoir:
    """A uniform random sample of at most ``capacity`` tokens from a stream (Algorithm R).

    Until ``capacity`` tokens have been seen it contains all of them in arrival order.
    """

    def __init__(self, capacity: int, width: int, dtype: torch.dtype, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"Reservoir capacity must be at least 1 token, got {capacity}.")
        self.capacity = capacity
        self.inputs = torch.empty(capacity, width, dtype=dtype)
        self.fraction = torch.empty(capacity, dtype=torch.float32)
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, inputs: torch.Tensor, fraction: torch.Tensor) -> None:
        """Offer tokens (n, width) with their object share (n,) to the sample."""
        count = len(inputs)
        positions = torch.arange(self.seen, self.seen + count)

        # 1. Fill free slots in arrival order.
        free = positions < self.capacity
        self.inputs[positions[free]] = inputs[free].to(self.inputs.dtype)
        self.fraction[positions[free]] = fraction[free].float()

        # 2. Token number i (0-based) past the capacity replaces slot j ~ U{0..i} if j fits.
        later = (~free).nonzero().flatten()
        if len(later):
            draws = torch.rand(len(later), generator=self.generator, dtype=torch.float64)
            slots = (draws * (positions[later] + 1).double()).long()
            keep = slots < self.capacity
            later, slots = later[keep], slots[keep]
            # Where two tokens of this batch draw the same slot, the later one wins, as it
            # would when they arrive one by one.
            order = torch.arange(len(slots))
            winner = torch.full((self.capacity,), -1, dtype=torch.long)
            winner.scatter_reduce_(0, slots, order, reduce="amax")
            slot_index = (winner >= 0).nonzero().flatten()
            token_index = later[winner[slot_index]]
            self.inputs[slot_index] = inputs[token_index].to(self.inputs.dtype)
            self.fraction[slot_index] = fraction[token_index].float()
        self.seen += count

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the sampled tokens (k, width) as float32 and their object shares (k,)."""
        size = min(self.seen, self.capacity)
        return self.inputs[:size].float(), self.fraction[:size]

    @property
    def nbytes(self) -> int:
        return self.inputs.nbytes + self.fraction.nbytes


class StreamingProbeFitter:
    """Accumulate per-(layer, step) statistics from train images, then solve both probes.

    ``add_image`` takes a mapping from activation keys ``"{layer}@{step}"`` to one image's
    activations (tokens, width), the image's relative inverse depth (H, W) and its saliency
    probability or mask (H, W), thresholded at 0.5. Every image must have the same keys.
    """

    def __init__(
        self,
        settings: ProbeFitSettings | None = None,
        *,
        reservoir_tokens: int | None = None,
        seed: int = 0,
    ):
        self.settings = settings or ProbeFitSettings()
        if self.settings.saliency_method == "gradient" and reservoir_tokens is None:
            raise ValueError(
                "saliency_method='gradient' refines the probe on a token sample: pass "
                "reservoir_tokens (such as 50_000), or use "
                "ProbeFitSettings(saliency_method='closed_form')."
            )
        self.reservoir_tokens = reservoir_tokens
        self.seed = seed
        self.solvers: dict[str, StreamingLeastSquares] = {}
        self.reservoirs: dict[str, TokenReservoir] = {}
        self.seconds: dict[str, float] = {}
        self.images = 0
        self._depth_sum = 0.0
        self._depth_square_sum = 0.0
        self._depth_pixels = 0

    def add_image(
        self, activations: Mapping[str, torch.Tensor], depth: np.ndarray, saliency: np.ndarray
    ) -> None:
        """Add one train image's activations and labels to the statistics."""
        self._check_keys(activations)
        depth = np.asarray(depth, dtype=np.float32)
        mask = (np.asarray(saliency) > SALIENCY_THRESHOLD).astype(np.float32)
        if depth.shape != mask.shape or depth.ndim != 2:
            raise ValueError(
                f"Depth {depth.shape} and saliency {mask.shape} must both be (H, W) arrays of "
                "one image."
            )
        self._depth_sum += float(depth.sum(dtype=np.float64))
        self._depth_square_sum += float(np.square(depth, dtype=np.float64).sum())
        self._depth_pixels += depth.size

        pooled_by_grid: dict[int, torch.Tensor] = {}
        for key, activation in activations.items():
            start = time.perf_counter()
            grid = grid_of(activation.shape[0])
            if grid not in pooled_by_grid:
                pooled_depth = pool_to_grid(depth[None], grid)[0]
                fraction = pool_to_grid(mask[None], grid)[0]
                pooled_by_grid[grid] = torch.stack(
                    [pooled_depth, 2.0 * fraction - 1.0, torch.ones_like(fraction)], dim=1
                )
            targets = pooled_by_grid[grid]
            self._statistics(key, activation).update(activation.float(), targets)
            if self.reservoir_tokens is not None:
                fraction = (targets[:, _SALIENCY] + 1.0) / 2.0
                self.reservoirs[key].add(activation, fraction)
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        self.images += 1

    def _check_keys(self, activations: Mapping[str, torch.Tensor]) -> None:
        if not activations:
            raise ValueError("add_image got no activations: pass a dict {'layer@step': tensor}.")
        if self.solvers and set(activations) != set(self.solvers):
            missing = sorted(set(self.solvers) - set(activations))
            extra = sorted(set(activations) - set(self.solvers))
            raise ValueError(
                f"Image {self.images} has other activation keys than the first image: missing "
                f"{missing[:3]}, unexpected {extra[:3]}. Record the same layers and steps for "
                "every image."
            )
        for key, activation in activations.items():
            if activation.ndim != 2:
                raise ValueError(
                    f"Activations {key!r} must be one image's (tokens, width), got shape "
                    f"{tuple(activation.shape)}."
                )

    def _statistics(self, key: str, activation: torch.Tensor) -> StreamingLeastSquares:
        if key not in self.solvers:
            width = activation.shape[1]
            self.solvers[key] = StreamingLeastSquares(width, outputs=3)
            if self.reservoir_tokens is not None:
                # One seed per key, so each reservoir draws independently and reproducibly.
                seed = self.seed + len(self.reservoirs)
                self.reservoirs[key] = TokenReservoir(
                    self.reservoir_tokens, width, activation.dtype, seed
                )
        return self.solvers[key]

    @property
    def depth_mean(self) -> float:
        """Mean of all train depth pixels seen so far."""
        self._require_images()
        return self._depth_sum / self._depth_pixels

    @property
    def depth_std(self) -> float:
        """Standard deviation (population, as numpy's default) of all train depth pixels."""
        mean = self.depth_mean
        variance = self._depth_square_sum / self._depth_pixels - mean * mean
        return float(np.sqrt(max(variance, 0.0)))

    def _require_images(self) -> None:
        if self.images == 0:
            raise ValueError("No train image was added: call add_image() before fit().")

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics and reservoirs, the memory that fitting keeps."""
        total = sum(solver.gram.nbytes + solver.moment.nbytes for solver in self.solvers.values())
        return total + sum(reservoir.nbytes for reservoir in self.reservoirs.values())

    def fit(self) -> dict[str, list[CellFit]]:
        """Solve the saliency and depth probe of every key, with empty scores until scoring."""
        self._require_images()
        mean, std = self.depth_mean, self.depth_std
        if not std > 0:
            raise ValueError(
                f"The train depth labels are constant (std {std}): check the depth labeler."
            )
        fits = {}
        for key, solver in self.solvers.items():
            start = time.perf_counter()
            grid = grid_of(solver.count // self.images)
            weights = solver.solve(self.settings.ridge)

            # 1. Depth: W_depth = (W_p - mean W_1) / std, since the solve is linear in A^T y.
            depth_weight = (weights[_DEPTH] - mean * weights[_ONES]) / std
            depth = LinearProbe("depth", depth_weight[None], grid, mean, std)

            # 2. Saliency: least squares on +-1 targets, refined on the reservoir if asked.
            direction = weights[_SALIENCY]
            start_weight = torch.stack([-direction / 2, direction / 2])
            if self.settings.saliency_method == "closed_form":
                saliency = LinearProbe("saliency", start_weight, grid)
            else:
                inputs, fraction = self.reservoirs[key].sample()
                saliency = refine_saliency_probe(
                    inputs, fraction, start_weight, grid, self.settings
                )
            seconds = self.seconds[key] + time.perf_counter() - start
            fits[key] = [
                CellFit("saliency", saliency, {}, self.settings.saliency_method, seconds),
                CellFit("depth", depth, {}, DEPTH_METHOD, seconds),
            ]
        return fits


class StreamingProbeScorer:
    """Score fitted probes on test images streamed one at a time.

    Dice and the correlations are averaged over images and RMSE is taken over all pixels,
    which gives the same numbers as ``helpers.probes.score_probe`` on the whole test split
    because all images have the same size.
    """

    def __init__(self, fits: Mapping[str, Sequence[CellFit]]):
        self.fits = fits
        self.per_image: dict[tuple[str, str], list[dict[str, float]]] = {}
        self.images = 0

    def add_image(
        self, activations: Mapping[str, torch.Tensor], depth: np.ndarray, saliency: np.ndarray
    ) -> None:
        missing = sorted(set(self.fits) - set(activations))
        if missing:
            raise ValueError(
                f"Test image {self.images} lacks activations {missing[:3]} that probes were "
                "fitted for: record the same layers and steps for test images."
            )
        labels = {
            "depth": np.asarray(depth, dtype=np.float32)[None],
            "saliency": (np.asarray(saliency) > SALIENCY_THRESHOLD)[None],
        }
        for key, fits in self.fits.items():
            batch = activations[key][None]
            for fit in fits:
                scores = score_probe(fit.probe, batch, labels[fit.task])
                self.per_image.setdefault((key, fit.task), []).append(scores)
        self.images += 1

    def scored_fits(self) -> dict[str, list[CellFit]]:
        """Return the fits with their test scores filled in."""
        if self.images == 0:
            raise ValueError("No test image was scored: call add_image() on test images first.")
        scored = {}
        for key, fits in self.fits.items():
            scored[key] = []
            for fit in fits:
                per_image = self.per_image[(key, fit.task)]
                scores = {
                    name: float(np.mean([image[name] for image in per_image]))
                    for name in per_image[0]
                }
                if "rmse" in scores:
                    squares = [image["rmse"] ** 2 for image in per_image]
                    scores["rmse"] = float(np.sqrt(np.mean(squares)))
                scored[key].append(
                    CellFit(fit.task, fit.probe, scores, fit.method, fit.fit_seconds)
                )
        return scored


StreamedImage = tuple[Mapping[str, torch.Tensor], np.ndarray, np.ndarray]
"""One image: activations {"layer@step": (tokens, width)}, depth (H, W), saliency (H, W)."""


def sweep_streamed(
    train_images: Iterable[StreamedImage],
    test_images: Iterable[StreamedImage],
    settings: ProbeFitSettings | None = None,
    *,
    reservoir_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, list[CellFit]]:
    """Fit on all train images, then score on the test images, and return the fits per key."""
    fitter = StreamingProbeFitter(settings, reservoir_tokens=reservoir_tokens, seed=seed)
    for activations, depth, saliency in train_images:
        fitter.add_image(activations, depth, saliency)
    scorer = StreamingProbeScorer(fitter.fit())
    for activations, depth, saliency in test_images:
        scorer.add_image(activations, depth, saliency)
    return scorer.scored_fits()


def regenerate_activations(
    pipe,
    run,
    split: str,
    *,
    batch_size: int = 1,
    progress: bool | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Sample the run's images of one split again, recording every layer at every step.

    ``pipe`` is the original model's pipeline. For a control run, its UNet is shuffled or
    re-initialised again from run.json's ``unet_variant`` and ``shuffle_seed``, which gives
    the same weights as when the run was generated.

    Yields (image id, activations) per image in index order. Each batch costs one UNet call
    per step, and only one batch of activations is in memory at a time.
    """
    config = run.config
    sampling = SamplingConfig(
        scheduler=config["scheduler"],
        num_steps=int(config["num_steps"]),
        guidance_scale=float(config["guidance_scale"]),
        height=int(config["height"]),
        width=int(config["width"]),
    )
    variant = config.get("unet_variant", "original")
    pipe = control_pipeline(pipe, variant, config.get("shuffle_seed") or 0)
    check_pipeline_matches(pipe, config)
    dtype = getattr(torch, str(config["activation_dtype"]))
    # The VAE control reads the predicted clean latent (RecordingConfig's default), as in
    # run folders written by helpers.run_generation.
    recording = RecordingConfig(dtype=dtype, vae_decoder=bool(config.get("vae_layer")))
    rows = [run.row(image_id) for image_id in run.image_ids(split)]
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    for batch in progress_bar(batches, desc=f"Sampling {split} images", **bar_options(progress)):
        result = generate(
            pipe,
            [row["prompt"] for row in batch],
            [row["seed"] for row in batch],
            sampling,
            recording=recording,
            keep_step_latents=True,
            progress=False,
        )
        for index, row in enumerate(batch):
            yield row["image_id"], image_activations(result, index, config)


def check_pipeline_matches(pipe, config: Mapping) -> None:
    """Raise unless the pipeline's attn1 layers have the names and widths in run.json."""
    latent_size = (
        int(config["height"]) // vae_scale_factor(pipe.vae),
        int(config["width"]) // vae_scale_factor(pipe.vae),
    )
    found = [(info.name, info.width) for info in layer_infos(pipe.unet, latent_size)]
    expected = [(layer["name"], int(layer["width"])) for layer in config["layers"]]
    if found != expected:
        raise ValueError(
            f"The pipeline's attn1 layers {found[:2]}... differ from the run's {expected[:2]}...: "
            f"load the model the run was sampled with ({config['model']!r})."
        )


def sweep_streamed_run(
    pipe,
    run,
    labels_run=None,
    settings: ProbeFitSettings | None = None,
    *,
    reservoir_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool | None = None,
    save_probes: bool = True,
) -> list[dict]:
    """Sweep a run whose activations are not stored, by sampling its images once more.

    Train images are sampled first and only feed the statistics, then test images are
    sampled and scored. Writes the same ``probes/metrics.csv`` and checkpoints as
    ``helpers.probe_sweep.sweep_run``. ``pipe`` is the pipeline of the run's model with its
    original UNet, also for control runs (see ``regenerate_activations``); ``labels_run``
    defaults to ``run``.
    """
    labels_run = run if labels_run is None else labels_run
    config = run.config

    def images(split: str) -> Iterator[StreamedImage]:
        for image_id, activations in regenerate_activations(
            pipe, run, split, batch_size=batch_size, progress=progress
        ):
            depth = labels_run.load_label("depth", image_id)
            saliency = labels_run.load_label("saliency", image_id)
            yield activations, depth, saliency

    fits = sweep_streamed(
        images("train"), images("test"), settings, reservoir_tokens=reservoir_tokens
    )

    first_latent = next(key for key in fits if key.startswith(f"{LATENT_KEY}@"))
    latent_grid = fits[first_latent][0].probe.grid
    cells = {cell.key_prefix: cell for cell in run_cells(config, (latent_grid, latent_grid))}
    train_images, test_images = len(run.image_ids("train")), len(run.image_ids("test"))
    results = SweepResults(str(config["model"]), config.get("unet_variant", "original"))
    for key, cell_fits in fits.items():
        key_prefix, step = key.rsplit("@", 1)
        step = int(step)
        for fit in cell_fits:
            cell: ProbeCell = cells[key_prefix]
            timestep = config["timesteps"][step]
            results.add(cell, step, timestep, fit, train_images, test_images)
    return results.write(run.path, save_probes=save_probes)

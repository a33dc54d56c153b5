"""Linear probes on self-attention activations: fitting, prediction and scores.

A probe reads one layer at one denoising step. Each token (one cell of the layer's grid) is
mapped linearly, with no bias, to two logits (salient object or background) or to relative
inverse depth. Labels are pooled to the layer's grid for fitting; predictions are upsampled
to image size by nearest-neighbour interpolation for scoring, as in Chen et al. (2023).

Legend (names in the code, symbols of the method):

- ``activations``: A, shape (images, tokens, width), tokens = grid * grid in row-major order
- ``weight``: W, shape (outputs, width); a probe predicts A W^T
- ``gram``: A^T A summed over tokens, ``moment``: A^T y, the sufficient statistics of least
  squares, so depth probes can be fitted from a stream without keeping the activations.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .metrics import mean_correlations, mean_dice, rmse

logger = logging.getLogger(__name__)

TASKS = ("saliency", "depth")


@dataclass
class ProbeFitSettings:
    """Settings of probe fitting."""

    ridge: float = 1e-3
    """L2 penalty of least squares, relative to the mean diagonal of the Gram matrix."""

    saliency_method: str = "closed_form"
    """"closed_form" (least squares on +-1 targets) or "gradient" (cross-entropy, L-BFGS).

    The closed form is the default: on the toy model (96 images) its best Dice was 0.632
    against 0.644 for cross-entropy, while the whole sweep cost 1.4 instead of 3.9 times
    plain generation (benchmarks/probe_sweep.py)."""

    gradient_iterations: int = 60
    """L-BFGS iterations for the cross-entropy fit."""

    def __post_init__(self):
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}.")
        if self.saliency_method not in ("gradient", "closed_form"):
            raise ValueError(
                "saliency_method must be 'gradient' or 'closed_form', "
                f"got {self.saliency_method!r}."
            )
        if self.gradient_iterations < 1:
            raise ValueError(f"gradient_iterations must be >= 1, got {self.gradient_iterations}.")


def grid_of(tokens: int) -> int:
    """Return the side of a square token grid, or raise if tokens is not a square."""
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{tokens} tokens do not form a square grid.")
    return grid


def pool_to_grid(labels: np.ndarray | torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool per-pixel labels (N, H, W) to (N, grid * grid) tokens in row-major order."""
    tensor = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    pooled = F.adaptive_avg_pool2d(tensor[:, None], grid)
    return pooled.reshape(len(tensor), grid * grid)


def upsample_nearest(predictions: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upsample per-token predictions (N, grid, grid) to (N, H, W) by nearest neighbour."""
    tensor = torch.as_tensor(np.asarray(predictions))
    dtype = tensor.dtype
    upsampled = F.interpolate(tensor[:, None].float(), size=size, mode="nearest")[:, 0]
    return upsampled.to(dtype).numpy()


class StreamingLeastSquares:
    """Accumulate A^T A and A^T y over batches, then solve the ridge regression."""

    def __init__(self, width: int, outputs: int = 1):
        self.gram = torch.zeros(width, width, dtype=torch.float64)
        self.moment = torch.zeros(width, outputs, dtype=torch.float64)
        self.count = 0

    def update(self, activations: torch.Tensor, targets: torch.Tensor) -> None:
        """Add tokens: activations (..., width) and targets (..., outputs) or (...)."""
        a = activations.reshape(-1, self.gram.shape[0]).double()
        y = targets.reshape(len(a), -1).double()
        self.gram += a.T @ a
        self.moment += a.T @ y
        self.count += len(a)

    def solve(self, ridge: float = 1e-3) -> torch.Tensor:
        """Return W (outputs, width) minimising |A W^T - y|^2 + lambda |W|^2."""
        if self.count == 0:
            raise ValueError("No tokens were added; call update() before solve().")
        scale = self.gram.diagonal().mean().clamp(min=1e-12)
        regularised = self.gram + ridge * scale * torch.eye(len(self.gram), dtype=torch.float64)
        return torch.linalg.solve(regularised, self.moment).T.float()


@dataclass
class LinearProbe:
    """A fitted probe: W (outputs, width), for one task at one layer and step."""

    task: str
    weight: torch.Tensor
    grid: int
    depth_mean: float = 0.0  # label normalisation of depth probes
    depth_std: float = 1.0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}.")
        outputs = 2 if self.task == "saliency" else 1
        if self.weight.ndim != 2 or self.weight.shape[0] != outputs:
            raise ValueError(
                f"A {self.task} probe needs a weight of shape ({outputs}, width), "
                f"got {tuple(self.weight.shape)}."
            )

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])

    def check_input(self, activations: torch.Tensor) -> None:
        tokens, width = activations.shape[-2:]
        if width != self.width:
            raise ValueError(
                f"This probe reads {self.width}-wide activations but got {width}-wide ones; "
                "load the probe trained for this layer and model."
            )
        if tokens != self.grid * self.grid:
            raise ValueError(
                f"This probe was fitted on a {self.grid}x{self.grid} grid but got {tokens} tokens; "
                "use the same image size as when it was fitted."
            )

    def logits(self, activations: torch.Tensor) -> torch.Tensor:
        """Map activations (N, tokens, width) to outputs (N, tokens, outputs)."""
        self.check_input(activations)
        return activations.float() @ self.weight.T

    def predict_grid(self, activations: torch.Tensor) -> torch.Tensor:
        """Saliency: boolean mask; depth: standardised depth; shape (N, grid, grid)."""
        outputs = self.logits(activations)
        if self.task == "saliency":
            prediction = outputs[..., 1] > outputs[..., 0]
        else:
            prediction = outputs[..., 0]
        return prediction.reshape(len(activations), self.grid, self.grid)

    def predict_image(self, activations: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Predictions upsampled to image size (N, H, W) by nearest neighbour."""
        return upsample_nearest(self.predict_grid(activations), size)


def standardise_depth(depth: np.ndarray, mean: float, std: float) -> np.ndarray:
    return (np.asarray(depth, dtype=np.float32) - mean) / std


def fit_depth_probe(
    activations: torch.Tensor, depth: np.ndarray, mean: float, std: float, ridge: float = 1e-3
) -> LinearProbe:
    """Least-squares depth probe on depth standardised by the training mean and std."""
    grid = grid_of(activations.shape[1])
    targets = pool_to_grid(standardise_depth(depth, mean, std), grid)
    solver = StreamingLeastSquares(activations.shape[-1])
    solver.update(activations.float(), targets)
    return LinearProbe("depth", solver.solve(ridge), grid, mean, std)


def fit_depth_probe_gradient(
    activations: torch.Tensor, depth: np.ndarray, mean: float, std: float, iterations: int = 200
) -> LinearProbe:
    """Fit the same depth probe by gradient descent (Adam on MSE), for comparison."""
    grid = grid_of(activations.shape[1])
    targets = pool_to_grid(standardise_depth(depth, mean, std), grid).reshape(-1)
    inputs = activations.float().reshape(-1, activations.shape[-1])
    inputs_scale = inputs.std().clamp(min=1e-6)
    weight = torch.zeros(1, inputs.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=1e-2)
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = ((inputs / inputs_scale) @ weight.T - targets[:, None]).pow(2).mean()
        loss.backward()
        optimizer.step()
    return LinearProbe("depth", (weight.detach() / inputs_scale), grid, mean, std)


def fit_saliency_probe(
    activations: torch.Tensor, masks: np.ndarray, settings: ProbeFitSettings | None = None
) -> LinearProbe:
    """Two-logit saliency probe, no bias, trained against per-token majority labels."""
    settings = settings or ProbeFitSettings()
    grid = grid_of(activations.shape[1])
    fraction = pool_to_grid(np.asarray(masks, dtype=np.float32), grid).reshape(-1)
    inputs = activations.float().reshape(-1, activations.shape[-1])

    # Least squares on +-1 targets is the closed form, and the start point of the gradient fit.
    solver = StreamingLeastSquares(inputs.shape[1])
    solver.update(inputs, 2.0 * fraction - 1.0)
    direction = solver.solve(settings.ridge)[0]
    start = torch.stack([-direction / 2, direction / 2])
    if settings.saliency_method == "closed_form":
        return LinearProbe("saliency", start, grid)
    return refine_saliency_probe(inputs, fraction, start, grid, settings)


def refine_saliency_probe(
    inputs: torch.Tensor,
    fraction: torch.Tensor,
    start: torch.Tensor,
    grid: int,
    settings: ProbeFitSettings,
) -> LinearProbe:
    """Fit the saliency probe's cross-entropy by full-batch L-BFGS from the weight ``start``.

    ``inputs`` are tokens (tokens, width), ``fraction`` the object's share of each token
    (tokens,), and ``start`` a (2, width) weight, usually the least-squares closed form.
    """
    # Cross-entropy with soft targets (the object's share of each token), full-batch L-BFGS.
    targets = torch.stack([1.0 - fraction, fraction], dim=1)
    weight = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight], max_iter=settings.gradient_iterations, line_search_fn="strong_wolfe"
    )
    penalty = settings.ridge * inputs.pow(2).mean()

    def closure():
        optimizer.zero_grad()
        logits = inputs @ weight.T
        loss = F.cross_entropy(logits, targets) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe("saliency", weight.detach(), grid)


def score_probe(
    probe: LinearProbe, activations: torch.Tensor, labels: np.ndarray
) -> dict[str, float]:
    """Score on held-out images at full label resolution.

    Saliency: mean foreground Dice. Depth: RMSE in standard deviations of the training
    depth, and per-image Spearman and Pearson correlations, averaged.
    """
    size = tuple(np.asarray(labels).shape[1:3])
    prediction = probe.predict_image(activations, size)
    if probe.task == "saliency":
        return {"dice": mean_dice(prediction.astype(bool), np.asarray(labels) > 0.5)}
    target = standardise_depth(labels, probe.depth_mean, probe.depth_std)
    return {"rmse": rmse(prediction, target), **mean_correlations(prediction, target)}

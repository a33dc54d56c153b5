"""Interventions on the scene representation: counterfactual targets and activation edits.

If a probe reads a real representation, editing a layer's activations so that the probe
predicts a moved object should move the object in the generated image. Following Chen et al.
(2023), saliency edits act on the up-block self-attention layers during the first 5 of 15
steps, and depth edits on all layers during the first 3 steps.

Direction convention for translations: positive ``dx`` moves content right (towards larger
column indices) and positive ``dy`` moves it down (towards larger row indices).

Legend (names in the code, symbols of the method):

- ``activation``: a, one token's self-attention output, width channels
- ``weight``: W of the probe; for saliency u = W[1] - W[0] gives the logit margin u . a
- ``margin``: m, the logit margin the edited token must reach, signed by the target class
"""

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from .hooks import edit_activations
from .metrics import dice, pearson, spearman
from .probes import LinearProbe, pool_to_grid
from .sampling import SamplingConfig, SamplingResult, generate

logger = logging.getLogger(__name__)

EDIT_METHODS = ("closed_form", "gradient")


def translate_mask(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shift a binary mask by (dx, dy) pixels; uncovered pixels become background.

    Nothing wraps around: content moved past the border is lost.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"translate_mask expects one (H, W) mask, got shape {mask.shape}.")
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(
        mask.astype(np.uint8),
        matrix,
        (mask.shape[1], mask.shape[0]),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return moved.astype(bool)


def translate_depth(depth: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shift a depth map by (dx, dy) pixels, filling the uncovered border from the edge."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"translate_depth expects one (H, W) map, got shape {depth.shape}.")
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(
        depth,
        matrix,
        (depth.shape[1], depth.shape[0]),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_REPLICATE,
    )


def closed_form_saliency_edit(
    activation: torch.Tensor, probe: LinearProbe, target: torch.Tensor, margin: torch.Tensor
) -> torch.Tensor:
    """Smallest L2 change per token that gives the target class a logit margin of ``margin``.

    activation: (batch, tokens, width); target: (batch, tokens) in {0, 1}; margin: scalar or
    (batch, 1). A token already on the right side by the margin is left unchanged; any other
    token moves along u = W[1] - W[0] by exactly the missing amount, which is the projection
    onto the half-space {a : sign * u . a >= margin}.
    """
    u = (probe.weight[1] - probe.weight[0]).to(activation)
    sign = target.to(activation) * 2.0 - 1.0
    current = activation @ u
    shortfall = torch.clamp(margin - sign * current, min=0.0)
    return activation + (sign * shortfall / u.dot(u))[..., None] * u


def closed_form_depth_edit(
    activation: torch.Tensor, probe: LinearProbe, target: torch.Tensor
) -> torch.Tensor:
    """Smallest L2 change per token that makes the depth probe output exactly ``target``."""
    w = probe.weight[0].to(activation)
    shortfall = target.to(activation) - activation @ w
    return activation + (shortfall / w.dot(w))[..., None] * w


def gradient_edit(
    activation: torch.Tensor,
    probe: LinearProbe,
    target: torch.Tensor,
    iterations: int = 128,
    learning_rate: float = 5e-3,
) -> torch.Tensor:
    """Adam on the activation against the probe's loss: cross-entropy or Huber for depth.

    The learning rate is relative to the activation's standard deviation, so the step size
    means the same at every layer width and scale.
    """
    scale = activation.float().std().clamp(min=1e-6)
    start = activation.detach().float() / scale
    edited = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([edited], lr=learning_rate)
    weight = probe.weight.float() * scale
    with torch.enable_grad():
        for _ in range(iterations):
            optimizer.zero_grad()
            outputs = edited @ weight.T
            if probe.task == "saliency":
                loss = F.cross_entropy(outputs.reshape(-1, 2), target.reshape(-1).long())
            else:
                loss = F.huber_loss(outputs[..., 0], target.float())
            loss.backward()
            optimizer.step()
    return (edited.detach() * scale).to(activation.dtype)


@dataclass
class InterventionSettings:
    """Settings of an activation edit: task, method, layers, steps and strength."""

    task: str = "saliency"
    """"saliency" (move the salient object) or "depth" (shift the depth map)."""

    method: str = "closed_form"
    """"closed_form" (minimal-norm edit per token) or "gradient" (Adam on the probe loss)."""

    layers: Collection[str] | None = None
    """Layers to edit; None picks the default of the task: up blocks (saliency), all (depth)."""

    steps: Collection[int] | None = None
    """Step indices to edit; None picks 0-4 (saliency) or 0-2 (depth)."""

    margin_quantile: float = 0.9
    """Closed-form saliency: the target margin is this quantile of |u . a| over the tokens."""

    margin_scale: float = 1.0
    """Closed-form saliency: multiplier of that margin; larger values push harder."""

    iterations: int = 128
    """Gradient method: Adam iterations per (layer, step)."""

    learning_rate: float = 5e-3
    """Gradient method: Adam learning rate, relative to the activation's scale."""

    def __post_init__(self):
        if self.task not in ("saliency", "depth"):
            raise ValueError(f"task must be 'saliency' or 'depth', got {self.task!r}.")
        if self.method not in EDIT_METHODS:
            raise ValueError(f"method must be one of {EDIT_METHODS}, got {self.method!r}.")
        if not 0.0 < self.margin_quantile < 1.0:
            raise ValueError(f"margin_quantile must lie in (0, 1), got {self.margin_quantile}.")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}.")

    def default_steps(self) -> list[int]:
        return (
            list(self.steps)
            if self.steps is not None
            else list(range(5 if self.task == "saliency" else 3))
        )

    def default_layers(self, available: Collection[str]) -> list[str]:
        if self.layers is not None:
            return list(self.layers)
        if self.task == "saliency":
            return [layer for layer in available if layer.startswith("up_blocks")]
        return list(available)


def make_edit_function(
    probes: Mapping[tuple[str, int], LinearProbe],
    target: np.ndarray,
    settings: InterventionSettings,
) -> Callable[[str, int, torch.Tensor], torch.Tensor]:
    """Build the hook callback that edits (layer, step) so its probe predicts ``target``.

    target: the counterfactual at image size, a boolean mask (saliency) or standardised depth.
    """
    targets_by_grid: dict[int, torch.Tensor] = {}

    def target_tokens(grid: int) -> torch.Tensor:
        if grid not in targets_by_grid:
            pooled = pool_to_grid(np.asarray(target, dtype=np.float32)[None], grid)[0]
            targets_by_grid[grid] = (
                (pooled > 0.5).float() if settings.task == "saliency" else pooled
            )
        return targets_by_grid[grid]

    def edit(layer: str, step: int, activation: torch.Tensor) -> torch.Tensor:
        probe = probes.get((layer, step))
        if probe is None:
            raise KeyError(
                f"No {settings.task} probe for layer {layer!r} at step {step}; "
                "fit or load one first."
            )
        probe.check_input(activation)
        tokens = target_tokens(probe.grid).to(activation.device).expand(activation.shape[0], -1)
        if settings.method == "gradient":
            return gradient_edit(
                activation, probe, tokens, settings.iterations, settings.learning_rate
            )
        if settings.task == "depth":
            return closed_form_depth_edit(activation.float(), probe, tokens).to(activation.dtype)
        u = (probe.weight[1] - probe.weight[0]).to(activation.device)
        current = (activation.float() @ u).abs()
        margin = (
            torch.quantile(current, settings.margin_quantile, dim=-1, keepdim=True)
            * settings.margin_scale
        )
        return closed_form_saliency_edit(activation.float(), probe, tokens, margin).to(
            activation.dtype
        )

    return edit


def generate_edited(
    pipe,
    prompt: str,
    seed: int,
    probes: Mapping[tuple[str, int], LinearProbe],
    target: np.ndarray,
    settings: InterventionSettings | None = None,
    config: SamplingConfig | None = None,
    progress: bool | None = False,
) -> SamplingResult:
    """Generate one image while editing the chosen layers and steps towards ``target``."""
    settings = settings or InterventionSettings()
    config = config or SamplingConfig()
    available = sorted({layer for layer, _ in probes})
    layers = settings.default_layers(available)
    steps = settings.default_steps()
    missing = [(layer, step) for layer in layers for step in steps if (layer, step) not in probes]
    if missing:
        raise KeyError(
            f"No probe for {len(missing)} of the (layer, step) cells to edit, e.g. {missing[0]}; "
            "fit probes for these layers and steps or choose other layers and steps."
        )
    edit = make_edit_function(probes, target, settings)
    with edit_activations(
        pipe.unet, edit, layers=layers, steps=steps, guidance_batches=config.guidance_batches
    ):
        return generate(pipe, [prompt], [seed], config, progress=progress)


def saliency_success(
    edited_mask: np.ndarray, original_mask: np.ndarray, target_mask: np.ndarray
) -> dict:
    """Dice of the edited image's mask against the target, and the no-edit baseline."""
    return {
        "edited_dice": dice(edited_mask, target_mask),
        "baseline_dice": dice(original_mask, target_mask),
    }


def depth_success(
    edited_depth: np.ndarray, original_depth: np.ndarray, target_depth: np.ndarray
) -> dict:
    """Correlation of the edited image's depth with the target, and the no-edit baseline."""
    return {
        "edited_spearman": spearman(edited_depth, target_depth),
        "baseline_spearman": spearman(original_depth, target_depth),
        "edited_pearson": pearson(edited_depth, target_depth),
        "baseline_pearson": pearson(original_depth, target_depth),
    }


def probes_for_intervention(
    checkpoint,
    pipe,
    model: str,
    settings: InterventionSettings,
    height: int | None = None,
) -> dict[tuple[str, int], LinearProbe]:
    """Load the probes an intervention edits, each checked against its layer of ``pipe``.

    checkpoint: a ``helpers.probe_checkpoints.ProbeCheckpoint`` of the settings' task.
    height: image height the edits run at; None uses the model's default size.
    """
    from .hooks import layer_infos
    from .sampling import vae_scale_factor

    if checkpoint.task != settings.task:
        raise ValueError(
            f"The checkpoint contains {checkpoint.task} probes but the intervention edits "
            f"{settings.task}: load the {settings.task} checkpoint."
        )
    scale = vae_scale_factor(pipe.vae)
    height = height or pipe.unet.config.sample_size * scale
    infos = {info.name: info for info in layer_infos(pipe.unet, height // scale)}
    layers = settings.default_layers(list(infos))
    unknown = [layer for layer in layers if layer not in infos]
    if unknown:
        raise ValueError(f"Layers {unknown} are not self-attention layers of this UNet.")
    return {
        (layer, step): checkpoint.probe_for_layer(infos[layer], step, model=model)
        for layer in layers
        for step in settings.default_steps()
    }

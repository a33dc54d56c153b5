"""Find the UNet's self-attention layers and record or edit their outputs per denoising step.

Vocabulary: a *layer* is an ``attn1`` module, named by its module path. A *step* is the index
(0, 1, ...) of a denoising step, which the hooks count as the index of the UNet call inside
their context manager. The scheduler's *timestep* value is not used here. An activation is
stored as
``(batch, tokens, width)``: ``tokens`` are the cells of the layer's ``grid`` in row-major
order and ``width`` is its number of channels.

Classifier-free guidance runs the UNet on the batch ``[unconditional; conditional]``
(diffusers' order). With ``guidance_batches=2`` the hooks read and edit the conditional
half only. ``guidance_batches=1`` means the batch has no unconditional half, as when the
guidance scale is 1, so the whole batch is used.
"""

import logging
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

logger = logging.getLogger(__name__)

SUPPORTED_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Called as edit_fn(layer, step, activation) with the conditional half (batch, tokens, width);
# returns the replacement, of the same shape.
EditFunction = Callable[[str, int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerInfo:
    """Position and shape of one self-attention layer for a given latent size."""

    name: str
    """Module path, such as ``down_blocks.0.attentions.0.transformer_blocks.0.attn1``."""
    block: str
    """UNet block that contains the layer: ``down_0``, ``mid``, ``up_1`` and so on."""
    width: int
    """Channels of each output token."""
    grid: tuple[int, int]
    """Rows and columns of the token grid."""

    @property
    def tokens(self) -> int:
        """Number of output tokens per image."""
        return self.grid[0] * self.grid[1]


def find_self_attention_layers(unet: torch.nn.Module) -> list[tuple[str, Attention]]:
    """List every ``attn1`` self-attention layer of the UNet in network order.

    A layer is the ``attn1`` of a diffusers ``BasicTransformerBlock`` that attends to its own
    tokens (``is_cross_attention`` is False). Network order is down blocks, mid block, then
    up blocks, each in module order, which ``named_modules`` does not give because diffusers
    registers the mid block last.
    """
    layers = []
    for block_name, block in unet.named_modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        attention = block.attn1
        if not isinstance(attention, Attention) or attention.is_cross_attention:
            logger.debug("Skipping %s.attn1, which is not self-attention", block_name)
            continue
        layers.append((f"{block_name}.attn1", attention))

    if not layers:
        raise ValueError(
            f"No self-attention (attn1) layer found in {type(unet).__name__}: pass a diffusers "
            "UNet2DConditionModel with cross-attention blocks."
        )
    order = {name: position for position, (name, _) in enumerate(layers)}
    return sorted(layers, key=lambda item: (*_block_position(item[0]), order[item[0]]))


def _block_position(layer: str) -> tuple[int, int]:
    """Sort key (down 0 / mid 1 / up 2, block index) of a layer's enclosing UNet block."""
    parts = layer.split(".")
    if parts[0] == "down_blocks":
        return 0, int(parts[1])
    if parts[0] == "mid_block":
        return 1, 0
    if parts[0] == "up_blocks":
        return 2, int(parts[1])
    raise ValueError(
        f"Layer {layer!r} is outside down_blocks, mid_block and up_blocks: the layer order "
        "is only known for diffusers' UNet2DConditionModel."
    )


def _block_label(layer: str) -> str:
    kind, index = _block_position(layer)
    if kind == 1:
        return "mid"
    return f"down_{index}" if kind == 0 else f"up_{index}"


def layer_infos(unet: torch.nn.Module, latent_size: int | tuple[int, int]) -> list[LayerInfo]:
    """Describe each self-attention layer (block, width, grid) for a latent of ``latent_size``.

    ``latent_size`` is the latent's side, or its (rows, columns): the image size divided by
    the VAE's downsampling factor (64 for Stable Diffusion at 512x512). Each down block works
    on the grid it receives and then halves it, rounding up as SD's stride-2 convolution with
    padding 1 does. Each up block works on the grid of the down block it mirrors.
    """
    rows, columns = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    down_grids = []
    grid = (rows, columns)
    for block in unet.down_blocks:
        down_grids.append(grid)
        if getattr(block, "downsamplers", None):
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
    mid_grid = grid

    infos = []
    for name, attention in find_self_attention_layers(unet):
        kind, index = _block_position(name)
        if kind == 0:
            layer_grid = down_grids[index]
        elif kind == 1:
            layer_grid = mid_grid
        else:
            layer_grid = down_grids[len(down_grids) - 1 - index]
        width = attention.to_out[0].out_features
        infos.append(LayerInfo(name, _block_label(name), width, layer_grid))
    return infos


def find_vae_decoder_self_attention(vae: torch.nn.Module) -> tuple[str, Attention]:
    """Return the name and module of the self-attention layer in the VAE decoder's mid block."""
    attentions = getattr(getattr(vae.decoder, "mid_block", None), "attentions", None)
    if not attentions or attentions[0] is None:
        raise ValueError(
            f"The VAE decoder of {type(vae).__name__} has no mid-block self-attention: use an "
            "AutoencoderKL built with mid_block_add_attention=True (the default)."
        )
    return "decoder.mid_block.attentions.0", attentions[0]


def to_tokens(activation: torch.Tensor) -> torch.Tensor:
    """Return an attention output as (batch, tokens, width).

    A (batch, width, rows, columns) map, as the VAE's attention outputs, is flattened in
    row-major order, the token order of diffusers' transformer blocks.
    """
    if activation.ndim == 3:
        return activation
    if activation.ndim == 4:
        return activation.flatten(2).transpose(1, 2)
    raise RuntimeError(
        f"Expected an attention output of 3 or 4 dimensions, got shape {tuple(activation.shape)}."
    )


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the output it needs is captured."""


def vae_decoder_attention_output(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Run the VAE decoder on diffusion latents up to its mid-block self-attention.

    ``latents`` are in the UNet's scale and are divided by ``vae.config.scaling_factor`` first,
    as for decoding. The decoder stops right after that layer, so no pixels are computed.
    Returns the layer's output as ``(batch, tokens, width)``, tokens in row-major order.
    """
    _, attention = find_vae_decoder_self_attention(vae)
    captured: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured.append(output)
        raise _StopForward

    # The decoder is called directly, not through vae.decode, whose slicing and tiling would
    # split the batch and stop after the first part.
    vae_latents = latents / vae.config.scaling_factor
    handle = attention.register_forward_hook(capture)
    try:
        if getattr(vae, "post_quant_conv", None) is not None:
            vae_latents = vae.post_quant_conv(vae_latents)
        vae.decoder(vae_latents)
    except _StopForward:
        pass
    finally:
        handle.remove()

    if not captured:
        raise RuntimeError(
            f"The VAE decoder of {type(vae).__name__} never called its mid-block attention: "
            "pass an AutoencoderKL."
        )
    return to_tokens(captured[0])


class ActivationStore(Mapping[tuple[str, int], torch.Tensor]):
    """Recorded activations keyed by (layer, step), each ``(batch, tokens, width)``."""

    def __init__(self) -> None:
        self._tensors: dict[tuple[str, int], torch.Tensor] = {}

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def add(self, layer: str, step: int, activation: torch.Tensor) -> None:
        """Store ``activation`` for (layer, step), raising if that key is already stored."""
        if (layer, step) in self._tensors:
            raise RuntimeError(
                f"Activation of layer {layer!r} at step {step} was recorded twice: record "
                "one sampling run per context."
            )
        self._tensors[(layer, step)] = activation

    @property
    def layers(self) -> list[str]:
        """Recorded layers in the order of their first recording."""
        return list(dict.fromkeys(layer for layer, _ in self._tensors))

    @property
    def steps(self) -> list[int]:
        """Recorded step indices in ascending order."""
        return sorted({step for _, step in self._tensors})

    def stack_steps(self, layer: str) -> torch.Tensor:
        """Stack the layer's activations over its recorded steps: (steps, batch, tokens, width)."""
        steps = [step for step in self.steps if (layer, step) in self._tensors]
        if not steps:
            raise KeyError(f"Layer {layer!r} was not recorded; recorded layers: {self.layers}")
        return torch.stack([self._tensors[(layer, step)] for step in steps])

    @classmethod
    def concatenate(cls, stores: Sequence["ActivationStore"]) -> "ActivationStore":
        """Join stores of consecutive batches along the batch dimension."""
        if not stores:
            raise ValueError("No stores to concatenate: pass at least one ActivationStore.")
        keys = list(stores[0])
        for position, store in enumerate(stores[1:], start=1):
            if set(store) != set(keys):
                raise ValueError(
                    f"Store {position} contains different (layer, step) keys than store 0: "
                    "concatenate only recordings of the same layers and steps."
                )
        joined = cls()
        for layer, step in keys:
            joined.add(layer, step, torch.cat([store[(layer, step)] for store in stores]))
        return joined


class _UNetCallCounter:
    """Forward pre-hook on the UNet that numbers its calls, which are the denoising steps."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1

    @property
    def step(self) -> int:
        return self.calls - 1


def _validate_guidance_batches(guidance_batches: int) -> None:
    if guidance_batches not in (1, 2):
        raise ValueError(
            f"guidance_batches must be 2 (batch is [unconditional; conditional]) or 1 (no "
            f"classifier-free guidance), got {guidance_batches!r}."
        )


def _select_layers(
    unet: torch.nn.Module, layers: Collection[str] | None
) -> list[tuple[str, Attention]]:
    """Return the requested layers in network order, all of them for ``None``."""
    available = find_self_attention_layers(unet)
    if layers is None:
        return available
    if isinstance(layers, str):
        raise TypeError(f"layers must be a collection of layer names, got the string {layers!r}.")
    unknown = sorted(set(layers) - {name for name, _ in available})
    if unknown:
        raise ValueError(
            f"Unknown self-attention layers {unknown}: choose from "
            f"{[name for name, _ in available]}."
        )
    return [(name, module) for name, module in available if name in set(layers)]


def _validate_steps(steps: Collection[int] | None) -> frozenset[int] | None:
    if steps is None:
        return None
    invalid = [step for step in steps if isinstance(step, bool) or not isinstance(step, int)]
    invalid += [step for step in steps if isinstance(step, int) and step < 0]
    if invalid:
        raise ValueError(f"steps must be step indices 0, 1, ..., got invalid entries {invalid}.")
    return frozenset(steps)


def _conditional_part(output: torch.Tensor, guidance_batches: int, layer: str) -> torch.Tensor:
    """Return the conditional half of ``output``, or all of it for ``guidance_batches=1``."""
    if output.shape[0] % guidance_batches != 0:
        raise RuntimeError(
            f"Layer {layer!r} output a batch of {output.shape[0]}, which cannot be split into "
            f"{guidance_batches} guidance halves: set guidance_batches=1 when the UNet runs "
            "without classifier-free guidance."
        )
    batch = output.shape[0] // guidance_batches
    return output[output.shape[0] - batch :]


def _remove_hooks(handles: list, description: str) -> None:
    for handle in handles:
        handle.remove()
    logger.debug("Removed %d %s hooks", len(handles), description)


@contextmanager
def record_activations(
    unet: torch.nn.Module,
    *,
    guidance_batches: int,
    layers: Collection[str] | None = None,
    steps: Collection[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[ActivationStore]:
    """Record self-attention outputs at every UNet call made inside the context.

    Yields an ActivationStore that fills as the UNet runs: one ``(batch, tokens, width)``
    CPU tensor in ``dtype`` per (layer, step), where step is the index of the UNet call inside
    the context, so one sampling run per context. Hooks return nothing, so outputs are
    unchanged, and they are removed on exit, also after an exception.

    Args:
        unet: the UNet that the sampler will call. Hooks on another UNet record nothing.
        guidance_batches: 2 to keep the conditional half of a classifier-free guidance batch
            ``[unconditional; conditional]``, 1 to keep the whole batch.
        layers: names from ``find_self_attention_layers``; None records all of them.
        steps: step indices to record; None records every step.
        dtype: storage type, float16 halves the memory.

    Raises:
        RuntimeError: on exit, if the context ended without recording anything.
    """
    _validate_guidance_batches(guidance_batches)
    if dtype not in SUPPORTED_ACTIVATION_DTYPES:
        raise ValueError(
            f"Unsupported activation dtype {dtype!r}: use torch.float32, float16 or bfloat16."
        )
    selected = _select_layers(unet, layers)
    if not selected:
        raise ValueError("layers selects no layer to record: pass None for all layers.")
    selected_steps = _validate_steps(steps)

    store = ActivationStore()
    counter = _UNetCallCounter()

    def make_hook(layer: str):
        def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if selected_steps is not None and counter.step not in selected_steps:
                return
            conditional = _conditional_part(output, guidance_batches, layer)
            activation = to_tokens(conditional.detach()).to(
                device="cpu", dtype=dtype, copy=True, memory_format=torch.contiguous_format
            )
            store.add(layer, counter.step, activation)

        return record

    handles = [unet.register_forward_pre_hook(counter)]
    try:
        for layer, module in selected:
            handles.append(module.register_forward_hook(make_hook(layer)))
        logger.debug("Attached recording hooks to %d layers", len(selected))
        yield store
    finally:
        _remove_hooks(handles, "recording")

    if not store:
        raise RuntimeError(
            f"No activation was recorded in {counter.calls} UNet calls: run the sampler inside "
            "the context, on the same UNet object the hooks were attached to (a shuffled copy "
            "or another pipeline's UNet is a different object), with steps that it reaches."
        )
    if selected_steps is not None and not selected_steps <= set(store.steps):
        missing = sorted(selected_steps - set(store.steps))
        logger.warning(
            "Steps %s were requested but never reached in %d UNet calls", missing, counter.calls
        )


@contextmanager
def edit_activations(
    unet: torch.nn.Module,
    edit_fn: EditFunction,
    *,
    layers: Collection[str],
    steps: Collection[int],
    guidance_batches: int,
) -> Iterator[list[tuple[str, int]]]:
    """Replace the conditional half of chosen layers' outputs at chosen steps.

    For each selected (layer, step), ``edit_fn(layer, step, activation)`` receives the
    conditional part of the output, ``(batch, tokens, width)``, and returns its replacement of
    the same shape. The unconditional half passes through. The sampler runs under
    ``torch.no_grad``, so an ``edit_fn`` that optimises must open ``torch.enable_grad()``
    itself. With no layer or no step selected, no hook is attached and outputs stay
    bit-identical. Yields the list of (layer, step) pairs edited so far.

    Forward hooks run in registration order, so a recorder entered after this context records
    the edited outputs and one entered before records the originals.

    Raises:
        RuntimeError: on exit, if layers and steps were selected but nothing was edited.
    """
    _validate_guidance_batches(guidance_batches)
    selected = _select_layers(unet, layers)
    selected_steps = _validate_steps(steps)
    edited: list[tuple[str, int]] = []
    if not selected or not selected_steps:
        logger.debug("No layer or step selected for editing; attaching no hooks")
        yield edited
        return

    counter = _UNetCallCounter()

    def make_hook(layer: str):
        def edit(module: torch.nn.Module, args: tuple, output: torch.Tensor):
            step = counter.step
            if step not in selected_steps:
                return None
            conditional = _conditional_part(output, guidance_batches, layer)
            replacement = edit_fn(layer, step, conditional)
            if not isinstance(replacement, torch.Tensor) or replacement.shape != conditional.shape:
                shape = getattr(replacement, "shape", type(replacement).__name__)
                raise RuntimeError(
                    f"edit_fn returned {shape} for layer {layer!r} at step {step}: return a "
                    f"tensor of the activation's shape {tuple(conditional.shape)}."
                )
            replacement = replacement.to(device=output.device, dtype=output.dtype)
            edited.append((layer, step))
            if guidance_batches == 1:
                return replacement
            unconditional = output[: output.shape[0] - conditional.shape[0]]
            return torch.cat([unconditional, replacement])

        return edit

    handles = [unet.register_forward_pre_hook(counter)]
    try:
        for layer, module in selected:
            handles.append(module.register_forward_hook(make_hook(layer)))
        logger.debug(
            "Attached editing hooks to %d layers at steps %s", len(selected), sorted(selected_steps)
        )
        yield edited
    finally:
        _remove_hooks(handles, "editing")

    if not edited:
        raise RuntimeError(
            f"No activation was edited in {counter.calls} UNet calls: run the sampler inside "
            "the context, on the same UNet object the hooks were attached to, with steps "
            "that it reaches."
        )

"""An auxiliary training loss that teaches the toy UNet where each feature sits in the image.

A convolutional UNet has no positional embedding: it can only infer a token's place from the
zero padding at the borders, a faint cue it has no reason to learn while nothing in the data
rewards it. Without that cue a cross-attention query cannot tell a left token from a right
one, so the caption's position words cannot steer the layout (the unconditional layout is
left-right symmetric, and the colour words need no position at all).

During training, a 1x1 convolution on the input of every attention block predicts the
token's column and row, both scaled to [-1, 1]. Its error is added to the diffusion loss, so
the features entering each attention block carry their coordinates, which cross-attention
can then combine with the caption. The heads are dropped at export: the shipped UNet keeps
Stable Diffusion's architecture exactly.
"""

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from torch.nn import functional as F


class PositionHeads(nn.Module):
    """One coordinate head per attention block of a UNet, fed through forward pre-hooks."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.block_names = [
            name for name, module in unet.named_modules() if isinstance(module, Transformer2DModel)
        ]
        if not self.block_names:
            raise ValueError("The UNet has no attention blocks to attach position heads to.")
        blocks = dict(unet.named_modules())
        self.heads = nn.ModuleDict(
            {
                self._key(name): nn.Conv2d(blocks[name].config.in_channels, 2, kernel_size=1)
                for name in self.block_names
            }
        )
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles = [
            blocks[name].register_forward_pre_hook(self._capture(name), with_kwargs=True)
            for name in self.block_names
        ]

    @staticmethod
    def _key(name: str) -> str:
        # ModuleDict keys may not contain dots.
        return name.replace(".", "_")

    def _capture(self, name: str):
        def hook(module, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            self._inputs[name] = hidden_states

        return hook

    def loss(self) -> torch.Tensor:
        """Return the mean squared coordinate error over the blocks of the last UNet pass."""
        if len(self._inputs) != len(self.block_names):
            raise RuntimeError("Run the UNet forward pass before asking for the position loss.")
        errors = []
        for name in self.block_names:
            features = self._inputs[name]
            prediction = self.heads[self._key(name)](features)
            errors.append(F.mse_loss(prediction, coordinate_maps(features)))
        self._inputs.clear()
        return torch.stack(errors).mean()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def coordinate_maps(features: torch.Tensor) -> torch.Tensor:
    """Return the column and row of each position of (batch, channels, H, W) features."""
    # Both run from -1 at the left or top edge to 1 at the right or bottom edge.
    batch, _, height, width = features.shape
    rows = torch.linspace(-1.0, 1.0, height, device=features.device, dtype=features.dtype)
    columns = torch.linspace(-1.0, 1.0, width, device=features.device, dtype=features.dtype)
    grid_rows, grid_columns = torch.meshgrid(rows, columns, indexing="ij")
    return torch.stack([grid_columns, grid_rows]).expand(batch, -1, -1, -1)

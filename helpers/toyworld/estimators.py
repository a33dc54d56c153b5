"""The toy world's monocular depth and salient-object estimators.

They stand in for MiDaS (depth) and TRACER (salient object) on toy-world images: one small
convolutional encoder-decoder reads an RGB image and predicts, per pixel, relative inverse
depth (the MiDaS convention: larger is nearer, 0 for the sky) and the logit of the salient
object mask. The salient object is the object with the largest visible area, the one the
toy captions name.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

WEIGHTS_FILE = "estimator.safetensors"
CONFIG_FILE = "config.json"
# Images whose pixel standard deviation is below this (on a 0-1 scale) have no content to
# label: an all-black or uniform image gets an empty mask and is flagged.
UNIFORM_IMAGE_STD = 1e-3


def _light_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Build one convolution without normalisation, for the full-resolution stages.

    Those stages dominate the cost on a CPU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.SiLU())


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
    )


class DepthSaliencyNet(nn.Module):
    """Encoder-decoder with skip connections; output channels: inverse depth, mask logit."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        self.widths = tuple(widths)
        self.encoders = nn.ModuleList()
        in_channels = 3
        for index, width in enumerate(widths):
            block = _light_block if index == 0 else _block
            self.encoders.append(block(in_channels, width))
            in_channels = width
        self.decoders = nn.ModuleList(
            (_light_block if i == 0 else _block)(widths[i + 1] + widths[i], widths[i])
            for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], 2, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map images (N, 3, H, W) in [-1, 1] to (N, 2, H, W); H and W divisible by 8."""
        skips = []
        features = images
        for index, encoder in enumerate(self.encoders):
            if index > 0:
                features = F.avg_pool2d(features, 2)
            features = encoder(features)
            skips.append(features)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            features = F.interpolate(features, scale_factor=2, mode="nearest")
            features = decoder(torch.cat([features, skip], dim=1))
        return self.head(features)


@dataclass
class EstimatorOutput:
    """Per-pixel predictions for a batch of images."""

    relative_inverse_depth: np.ndarray  # (N, H, W) float32, >= 0, larger is nearer
    saliency: np.ndarray  # (N, H, W) float32 probability of the salient object
    mask: np.ndarray  # (N, H, W) bool, saliency > 0.5
    uniform: np.ndarray  # (N,) bool, images with no content; their masks are empty


def validate_images(images) -> np.ndarray:
    """Return images as float32 (N, H, W, 3) in [0, 1], or raise a ValueError naming the fix.

    Accepts uint8 in [0, 255] or floats in [0, 1], one image (H, W, C) or a batch (N, H, W, C),
    with 1 (grayscale), 3 (RGB) or 4 (RGBA, alpha dropped) channels, or one grayscale (H, W).
    """
    array = np.asarray(images)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("Images contain NaN or infinite values; pass finite pixel values.")
        if array.size and (array.min() < -1e-3 or array.max() > 1.0 + 1e-3):
            raise ValueError(
                f"Float images must lie in [0, 1], got values in [{array.min():.3g}, "
                f"{array.max():.3g}]; divide uint8 images by 255 or pass them as uint8."
            )
        array = np.clip(array, 0.0, 1.0)
    else:
        raise ValueError(f"Images must be uint8 or float, got dtype {array.dtype}.")

    # A 3-D array is one (H, W, C) image; a batch of grayscale images is (N, H, W, 1).
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Images must have shape (H, W, C) or (N, H, W, C) with C = 1, 3 or 4 channels, "
            f"got {np.asarray(images).shape}."
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        array = array[..., :3]
    if array.shape[1] < 8 or array.shape[2] < 8:
        raise ValueError(
            f"Images must be at least 8x8 pixels, got {array.shape[1]}x{array.shape[2]}."
        )
    return array


class ToyEstimator:
    """Loaded estimator network with input checks; see ``predict``."""

    def __init__(self, network: DepthSaliencyNet, device: str = "cpu"):
        self.network = network.to(device).eval()
        self.device = device

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "ToyEstimator":
        folder = Path(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.exists():
            raise FileNotFoundError(
                f"No toy estimator weights at {weights}; train them with "
                "`python -m helpers.toyworld.train estimators`."
            )
        config = json.loads((folder / CONFIG_FILE).read_text())
        network = DepthSaliencyNet(tuple(config["widths"]))
        network.load_state_dict(load_file(str(weights)))
        return cls(network, device)

    def save_pretrained(self, folder: str | Path, metrics: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        config = {"widths": list(self.network.widths), "metrics": metrics or {}}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @torch.no_grad()
    def predict(self, images, batch_size: int = 64) -> EstimatorOutput:
        """Predict depth and saliency; images are resized to a multiple of 8 and back."""
        array = validate_images(images)
        count, height, width = array.shape[:3]
        uniform = array.reshape(count, -1).std(axis=1) < UNIFORM_IMAGE_STD

        tensor = torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0
        network_size = (max(8, round(height / 8) * 8), max(8, round(width / 8) * 8))
        outputs = []
        for chunk in tensor.split(batch_size):
            chunk = chunk.to(self.device)
            if chunk.shape[-2:] != network_size:
                chunk = F.interpolate(
                    chunk, size=network_size, mode="bilinear", align_corners=False
                )
            prediction = self.network(chunk)
            if prediction.shape[-2:] != (height, width):
                prediction = F.interpolate(
                    prediction, size=(height, width), mode="bilinear", align_corners=False
                )
            outputs.append(prediction.float().cpu())
        prediction = torch.cat(outputs)

        # The sky is trained towards negative values, so clamping gives it exactly zero.
        depth = prediction[:, 0].clamp(min=0.0).numpy()
        saliency = torch.sigmoid(prediction[:, 1]).numpy()
        saliency[uniform] = 0.0
        return EstimatorOutput(
            relative_inverse_depth=depth.astype(np.float32),
            saliency=saliency.astype(np.float32),
            mask=saliency > 0.5,
            uniform=uniform,
        )

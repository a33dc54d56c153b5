"""Depth and salient-object pseudo-labelers behind one interface.

Every labeler is called on a batch of images (uint8 or floats in [0, 1], (N, H, W, C) or one
(H, W, C) image, grayscale and RGBA accepted) and returns float32 arrays at image size:

- depth labelers return relative inverse depth, the MiDaS convention: larger values are
  nearer, the scale and shift are unknown and differ between images, the sky is near 0;
- saliency labelers return the probability (0 to 1) that a pixel belongs to the salient
  object. Threshold at 0.5 for a mask.

Each labeler has a ``name`` and a ``version`` that the run folder records next to the labels.

Labelers:

| name                | kind     | model                                          | licence      |
|---------------------|----------|------------------------------------------------|--------------|
| ``toy``             | both     | the embedded toy estimator (data/toy_estimators) | this project |
| ``dpt-large``       | depth    | MiDaS DPT-Large, ``Intel/dpt-large``           | Apache-2.0   |
| ``depth-anything``  | depth    | ``depth-anything/Depth-Anything-V2-Small-hf``  | Apache-2.0   |
| ``birefnet``        | saliency | BiRefNet, ``ZhengPeng7/BiRefNet`` (remote code)  | MIT          |

The Hugging Face models download on first use and need network access then.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .models import weights_digest
from .toyworld.estimators import UNIFORM_IMAGE_STD, ToyEstimator, validate_images

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Labeler:
    """Base of all labelers: a name, a version and a call on a batch of images."""

    name: str
    version: str

    def __call__(self, images) -> np.ndarray:
        array = validate_images(images)
        result = self._predict(array)
        return np.nan_to_num(result.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)

    def _predict(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _uniform_images(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).std(axis=1) < UNIFORM_IMAGE_STD


def _toy_version(estimator: ToyEstimator) -> str:
    # The weights' digest distinguishes retrained and untrained estimators in labels.json.
    return f"1+{weights_digest(estimator.network, length=12)}"


class ToyDepthLabeler(Labeler):
    def __init__(self, estimator: ToyEstimator):
        super().__init__("toy-depth", _toy_version(estimator))
        self.estimator = estimator

    def _predict(self, images):
        return self.estimator.predict(images).relative_inverse_depth


class ToySaliencyLabeler(Labeler):
    def __init__(self, estimator: ToyEstimator):
        super().__init__("toy-saliency", _toy_version(estimator))
        self.estimator = estimator

    def _predict(self, images):
        return self.estimator.predict(images).saliency


class TransformersDepthLabeler(Labeler):
    """A transformers depth-estimation model (DPT, Depth Anything) that predicts disparity."""

    def __init__(self, name: str, model, processor, device: str = "cpu"):
        super().__init__(name, getattr(model.config, "_name_or_path", "") or name)
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    @torch.no_grad()
    def _predict(self, images):
        outputs = []
        for image in images:
            inputs = self.processor(
                images=(image * 255).round().astype(np.uint8), return_tensors="pt"
            )
            inputs = {key: value.to(self.device) for key, value in inputs.items()}
            predicted = self.model(**inputs).predicted_depth  # (1, h, w), relative inverse depth
            resized = F.interpolate(
                predicted[:, None].float(),
                size=image.shape[:2],
                mode="bicubic",
                align_corners=False,
            )
            outputs.append(resized[0, 0].cpu().numpy())
        return np.stack(outputs)


class BiRefNetSaliencyLabeler(Labeler):
    """BiRefNet dichotomous segmentation as a salient-object detector (1024x1024 input)."""

    def __init__(self, model, device: str = "cpu", input_size: int = 1024):
        super().__init__("birefnet", getattr(model.config, "_name_or_path", "") or "birefnet")
        self.model = model.to(device).eval()
        self.device = device
        self.input_size = input_size

    @torch.no_grad()
    def _predict(self, images):
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
        tensor = F.interpolate(
            tensor, size=(self.input_size,) * 2, mode="bilinear", align_corners=False
        )
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        dtype = next(self.model.parameters()).dtype
        logits = self.model(((tensor - mean) / std).to(self.device, dtype))[-1]
        probability = torch.sigmoid(logits.float())
        probability = F.interpolate(
            probability, size=images.shape[1:3], mode="bilinear", align_corners=False
        )
        result = probability[:, 0].cpu().numpy()
        result[_uniform_images(images)] = 0.0
        return result


def _load_pretrained(model_id: str, loader):
    from huggingface_hub.errors import HFValidationError

    try:
        return loader()
    except (OSError, HFValidationError, ValueError) as error:
        raise RuntimeError(
            f"Could not load the labeler model {model_id!r}: {error}. It downloads from the "
            "Hugging Face hub on first use, so connect to the network once (and log in with "
            "`huggingface-cli login` if the model is gated), or use the labeler 'toy'."
        ) from error


DEPTH_MODEL_IDS = {
    "dpt-large": "Intel/dpt-large",
    "depth-anything": "depth-anything/Depth-Anything-V2-Small-hf",
}
SALIENCY_MODEL_IDS = {"birefnet": "ZhengPeng7/BiRefNet"}


def load_depth_labeler(name: str = "toy", device: str = "cpu") -> Labeler:
    """Load a depth labeler by name: "toy", "dpt-large" or "depth-anything"."""
    if name == "toy":
        from .paths import TOY_ESTIMATORS_DIR

        return ToyDepthLabeler(ToyEstimator.from_pretrained(TOY_ESTIMATORS_DIR, device))
    if name not in DEPTH_MODEL_IDS:
        raise ValueError(
            f"Unknown depth labeler {name!r}; choose one of {['toy', *DEPTH_MODEL_IDS]}."
        )
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model_id = DEPTH_MODEL_IDS[name]
    model = _load_pretrained(
        model_id, lambda: AutoModelForDepthEstimation.from_pretrained(model_id)
    )
    processor = _load_pretrained(model_id, lambda: AutoImageProcessor.from_pretrained(model_id))
    return TransformersDepthLabeler(name, model, processor, device)


def load_saliency_labeler(name: str = "toy", device: str = "cpu") -> Labeler:
    """Load a saliency labeler by name: "toy" or "birefnet"."""
    if name == "toy":
        from .paths import TOY_ESTIMATORS_DIR

        return ToySaliencyLabeler(ToyEstimator.from_pretrained(TOY_ESTIMATORS_DIR, device))
    if name not in SALIENCY_MODEL_IDS:
        raise ValueError(
            f"Unknown saliency labeler {name!r}; choose one of {['toy', *SALIENCY_MODEL_IDS]}."
        )
    from transformers import AutoModelForImageSegmentation

    model_id = SALIENCY_MODEL_IDS[name]
    model = _load_pretrained(
        model_id,
        lambda: AutoModelForImageSegmentation.from_pretrained(model_id, trust_remote_code=True),
    )
    return BiRefNetSaliencyLabeler(model, device)

"""Checks that a generated toy image shows what its caption requests.

The salient object is found with the toy saliency estimator; its colour is the palette colour
nearest to the object's lit pixels, and its horizontal position is the image third holding the
mask's centroid, as the captions define it.
"""

import numpy as np

from .scene import COLORS, horizontal_position

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES])


def classify_color(pixels: np.ndarray) -> str:
    """Name the palette colour of an object from its pixels (K, 3) in [0, 1].

    Shading scales an object's colour, so the brighter half of its pixels is compared with the
    palette after both are divided by their largest channel, which removes the brightness.
    """
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 3)
    if len(pixels) == 0:
        raise ValueError("No pixels to classify; the object mask is empty.")
    brightness = pixels.max(axis=1)
    lit = pixels[brightness >= np.median(brightness)]
    colour = np.median(lit, axis=0)
    normalised = colour / max(colour.max(), 1e-6)
    palette = _PALETTE / _PALETTE.max(axis=1, keepdims=True)
    return _PALETTE_NAMES[int(np.argmin(((palette - normalised) ** 2).sum(axis=1)))]


def describe_salient_object(image: np.ndarray, mask: np.ndarray) -> dict[str, str] | None:
    """Return the colour and side of the masked object, or None for an empty mask."""
    if not mask.any():
        return None
    image = np.asarray(image, dtype=np.float64)
    if image.max() > 1.0:
        image = image / 255.0
    return {"color": classify_color(image[mask]), "side": horizontal_position(mask)}

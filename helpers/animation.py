"""GIF writing for interventions: one edited generation per frame."""

from pathlib import Path

import imageio.v2 as imageio
import numpy as np


def to_uint8_frames(frames) -> list[np.ndarray]:
    """Convert frames (floats in [0, 1] or uint8, (H, W, 3)) to a list of uint8 arrays."""
    converted = []
    for index, frame in enumerate(frames):
        array = np.asarray(frame)
        if array.dtype != np.uint8:
            if not np.isfinite(array).all():
                raise ValueError(f"Frame {index} contains NaN or infinite values.")
            array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"Frame {index} must be (H, W, 3) or (H, W, 4), got {array.shape}.")
        converted.append(array)
    if not converted:
        raise ValueError("No frames to write; pass at least one frame.")
    shapes = {frame.shape for frame in converted}
    if len(shapes) > 1:
        raise ValueError(f"All frames must have one shape, got {sorted(shapes)}.")
    return converted


def write_gif(
    frames, path: str | Path, duration_ms: int = 100, loop: int = 0, scale: int = 1
) -> Path:
    """Write frames as a GIF shown for ``duration_ms`` milliseconds each.

    ``loop=0`` repeats forever. ``scale`` magnifies each pixel (nearest neighbour), which
    keeps 64x64 toy images readable in a browser.
    """
    if duration_ms <= 0:
        raise ValueError(f"duration_ms must be positive, got {duration_ms}.")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}.")
    images = to_uint8_frames(frames)
    if scale > 1:
        images = [np.repeat(np.repeat(image, scale, axis=0), scale, axis=1) for image in images]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # imageio's Pillow plugin takes the GIF frame duration in milliseconds.
    imageio.mimsave(path, images, format="GIF", duration=duration_ms, loop=loop)
    return path


def back_and_forth_path(start: int, stop: int, frames: int) -> list[int]:
    """Offsets going from start to stop and back, ``frames`` in all, for a looping GIF."""
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}.")
    forward = np.linspace(start, stop, frames // 2 + 1).round().astype(int).tolist()
    backward = forward[-2:0:-1]
    return (forward + backward)[:frames]

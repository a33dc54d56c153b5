"""Move the salient object interactively: an intervention session and sliders."""

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .intervention import InterventionSettings, generate_edited, saliency_success, translate_mask
from .probes import LinearProbe
from .sampling import SamplingConfig, generate

logger = logging.getLogger(__name__)


@dataclass
class InterventionFrame:
    """One edited generation with what it was asked to do and how well it did."""

    prompt: str
    seed: int
    dx: int
    dy: int
    original: np.ndarray  # (H, W, 3) floats in [0, 1]
    original_mask: np.ndarray  # (H, W) bool, the labeler's mask of the original image
    target_mask: np.ndarray  # (H, W) bool, original_mask moved by (dx, dy)
    edited: np.ndarray  # (H, W, 3)
    edited_mask: np.ndarray  # (H, W) bool, the labeler's mask of the edited image
    seconds: float  # wall time of the edited generation
    scores: dict


class InterventionSession:
    """Cache the unedited generation per (prompt, seed) and render edited frames on request."""

    def __init__(
        self,
        pipe,
        probes: Mapping[tuple[str, int], LinearProbe],
        saliency_labeler,
        settings: InterventionSettings | None = None,
        config: SamplingConfig | None = None,
    ):
        self.pipe = pipe
        self.probes = probes
        self.labeler = saliency_labeler
        self.settings = settings or InterventionSettings()
        self.config = config or SamplingConfig()
        self._originals: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def original(self, prompt: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the unedited image and its salient-object mask, generating them once."""
        key = (prompt, int(seed))
        if key not in self._originals:
            image = generate(self.pipe, [prompt], [int(seed)], self.config, progress=False).images[
                0
            ]
            mask = self.labeler(image)[0] > 0.5
            if not mask.any():
                logger.warning("The labeler found no salient object for %r (seed %d)", prompt, seed)
            self._originals[key] = (image, mask)
        return self._originals[key]

    def frame(self, prompt: str, seed: int, dx: int, dy: int) -> InterventionFrame:
        """Generate the image with the salient object moved by (dx, dy) pixels."""
        original, original_mask = self.original(prompt, seed)
        if not original_mask.any():
            raise ValueError(
                f"No salient object was found in the image for {prompt!r} with seed {seed}, so "
                "there is nothing to move; try another seed or prompt."
            )
        target = translate_mask(original_mask, int(dx), int(dy))
        started = time.perf_counter()
        edited = generate_edited(
            self.pipe, prompt, int(seed), self.probes, target, self.settings, self.config
        ).images[0]
        seconds = time.perf_counter() - started
        edited_mask = self.labeler(edited)[0] > 0.5
        return InterventionFrame(
            prompt,
            int(seed),
            int(dx),
            int(dy),
            original,
            original_mask,
            target,
            edited,
            edited_mask,
            seconds,
            saliency_success(edited_mask, original_mask, target),
        )


def show_frame(frame: InterventionFrame, axes=None):
    """Draw original, target mask, edited image and its mask side by side."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 4, figsize=(10, 2.8))
    panels = [
        (frame.original, "original"),
        (frame.target_mask, f"target (dx={frame.dx}, dy={frame.dy})"),
        (frame.edited, f"edited ({frame.seconds * 1000:.0f} ms)"),
        (frame.edited_mask, f"edited mask, Dice {frame.scores['edited_dice']:.2f}"),
    ]
    for axis, (image, title) in zip(axes, panels, strict=True):
        axis.clear()
        axis.imshow(
            image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest"
        )
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    return axes


def intervention_sliders(session: InterventionSession, prompt: str, seed: int, max_shift: int = 24):
    """Show dx and dy sliders with a prompt and seed box that re-render the edited image.

    The first frame is always drawn as a static figure, so the cell shows a result where no
    widget front end exists (a plain script, nbval, a static notebook viewer).
    """
    import matplotlib.pyplot as plt
    from IPython.display import display

    first = session.frame(prompt, seed, 0, 0)
    show_frame(first)
    plt.show()
    try:
        import ipywidgets as widgets
    except ImportError:
        logger.info("ipywidgets is not installed; showing the static frame only")
        return None

    dx = widgets.IntSlider(value=0, min=-max_shift, max=max_shift, step=2, description="dx (px)")
    dy = widgets.IntSlider(value=0, min=-max_shift, max=max_shift, step=2, description="dy (px)")
    prompt_box = widgets.Text(
        value=prompt, description="prompt", layout=widgets.Layout(width="60%")
    )
    seed_box = widgets.IntText(value=seed, description="seed")
    output = widgets.Output()

    def render(_change=None):
        with output:
            output.clear_output(wait=True)
            try:
                frame = session.frame(prompt_box.value, seed_box.value, dx.value, dy.value)
            except (ValueError, KeyError) as error:
                print(error)
                return
            show_frame(frame)
            plt.show()

    for control in (dx, dy, prompt_box, seed_box):
        control.observe(render, names="value")
    panel = widgets.VBox([widgets.HBox([prompt_box, seed_box]), widgets.HBox([dx, dy]), output])
    display(panel)
    return panel

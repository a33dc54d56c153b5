"""Score interventions over many prompts and random shifts against the no-edit baseline."""

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from .interactive import InterventionSession
from .intervention import InterventionSettings
from .probes import LinearProbe
from .progress import progress as progress_bar
from .sampling import SamplingConfig

logger = logging.getLogger(__name__)


def random_shifts(count: int, low: int, high: int, seed: int = 0) -> list[tuple[int, int]]:
    """Draw (dx, dy) pairs whose larger component has a magnitude in [low, high] pixels."""
    if not 0 <= low <= high:
        raise ValueError(f"Need 0 <= low <= high, got low={low}, high={high}.")
    rng = np.random.default_rng(seed)
    shifts = []
    for _ in range(count):
        magnitude = int(rng.integers(low, high + 1))
        sign = int(rng.choice([-1, 1]))
        other = int(rng.integers(-magnitude // 2, magnitude // 2 + 1))
        shifts.append(
            (sign * magnitude, other) if rng.random() < 0.5 else (other, sign * magnitude)
        )
    return shifts


def evaluate_saliency_interventions(
    pipe,
    probes: Mapping[tuple[str, int], LinearProbe],
    saliency_labeler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    shifts: Sequence[tuple[int, int]],
    settings: InterventionSettings | None = None,
    config: SamplingConfig | None = None,
    progress: bool | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """Move each prompt's salient object by its shift and score the edited image.

    Returns one row per prompt (prompt, seed, dx, dy, edited_dice, baseline_dice, seconds) and
    a summary with the mean Dice of edited images and of the unedited baseline against the
    same targets. Prompts whose original image has no salient object are skipped and counted.
    """
    if not len(prompts) == len(seeds) == len(shifts):
        raise ValueError(
            f"prompts, seeds and shifts must have one entry per edit, got {len(prompts)}, "
            f"{len(seeds)} and {len(shifts)}."
        )
    session = InterventionSession(pipe, probes, saliency_labeler, settings, config)
    rows, skipped = [], 0
    cases = list(zip(prompts, seeds, shifts, strict=True))
    for prompt, seed, (dx, dy) in progress_bar(
        cases, desc="interventions", **({} if progress is None else {"disable": not progress})
    ):
        _, original_mask = session.original(prompt, int(seed))
        if not original_mask.any():
            skipped += 1
            continue
        frame = session.frame(prompt, int(seed), dx, dy)
        rows.append(
            {
                "prompt": prompt,
                "seed": int(seed),
                "dx": dx,
                "dy": dy,
                "seconds": frame.seconds,
                **frame.scores,
            }
        )
    if not rows:
        raise ValueError("No prompt produced an image with a salient object; nothing was scored.")
    summary = {
        "edited_dice": float(np.mean([row["edited_dice"] for row in rows])),
        "baseline_dice": float(np.mean([row["baseline_dice"] for row in rows])),
        "edits": len(rows),
        "skipped_without_object": skipped,
        "seconds_per_edit": float(np.mean([row["seconds"] for row in rows])),
    }
    return rows, summary

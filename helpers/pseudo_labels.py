"""Pseudo-label a run folder's images with depth and saliency labelers, and score labelers.

``label_run`` writes ``labels/depth`` and ``labels/saliency`` (one float32 array per image)
and ``labels/labels.json`` into a run folder, resuming where an interrupted run stopped.
``score_labels_on_renders`` checks labelers against the exact depth and salient-object masks
of rendered toy-world scenes, the ground truth that generated images lack.
"""

import logging
from pathlib import Path

import numpy as np

from helpers.labels import Labeler
from helpers.metrics import mean_correlations, mean_dice
from helpers.progress import progress as progress_bar
from helpers.run_folder import (
    LABEL_KINDS,
    LABELS_DIR,
    LABELS_FILE,
    RunFolder,
    RunFolderError,
    remove_temporary_files,
    write_json_atomically,
    write_npy_atomically,
)
from helpers.toyworld.dataset import HELD_OUT_SEED_START
from helpers.toyworld.render import render

logger = logging.getLogger(__name__)

# Saliency labels are probabilities; a pixel belongs to the salient-object mask above this.
SALIENCY_MASK_THRESHOLD = 0.5


def labeler_record(labeler: Labeler) -> dict:
    """Describe a labeler for labels.json: its name and version."""
    return {"name": labeler.name, "version": labeler.version}


def label_run(
    run_dir: RunFolder | str | Path,
    depth_labeler: Labeler,
    saliency_labeler: Labeler,
    *,
    batch_size: int = 32,
    progress: bool | None = None,
) -> RunFolder:
    """Label every generated image of a run folder with depth and saliency; return the folder.

    ``run_dir`` is the folder's path or a RunFolder.

    Images that already have both label files are skipped, and every file is written
    atomically, so an interrupted call resumes. Images that are not generated yet are left
    unlabelled with a warning. Labels from another labeler (name or version in labels.json)
    raise RunFolderError instead of being mixed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    run = RunFolder(run_dir.path if isinstance(run_dir, RunFolder) else run_dir)
    labelers = {"depth": depth_labeler, "saliency": saliency_labeler}

    # 1. labels.json: written before any label, so every label file has a known source.
    records = {kind: labeler_record(labeler) for kind, labeler in labelers.items()}
    existing = run.labelers()
    for kind, record in records.items():
        if kind in existing and existing[kind] != record:
            raise RunFolderError(
                f"The {kind} labels in {run.path / LABELS_DIR} come from {existing[kind]}, not "
                f"from {record}: delete {run.path / LABELS_DIR} to label the run again with "
                "the new labeler, or use the original one."
            )
    for kind in LABEL_KINDS:
        (run.path / LABELS_DIR / kind).mkdir(parents=True, exist_ok=True)
    remove_temporary_files(run.path / LABELS_DIR)
    write_json_atomically(run.path / LABELS_DIR / LABELS_FILE, {**existing, **records})

    # 2. Which images need labels.
    completed = run.completed_ids()
    not_generated = len(run.image_ids()) - len(completed)
    if not_generated:
        logger.warning(
            "%d images of %s are not generated yet and stay unlabelled: finish generate_run, "
            "then call label_run again",
            not_generated,
            run.path,
        )
    pending = [
        image_id
        for image_id in completed
        if not all(run.label_path(kind, image_id).is_file() for kind in LABEL_KINDS)
    ]
    logger.info(
        "%s: %d images to label, %d already labelled",
        run.path,
        len(pending),
        len(completed) - len(pending),
    )

    # 3. Label in batches and write each image's arrays.
    bar = progress_bar(
        total=len(completed),
        initial=len(completed) - len(pending),
        desc=f"Labelling {run.path.name}",
        unit="image",
        **({} if progress is None else {"disable": not progress}),
    )
    try:
        for start in range(0, len(pending), batch_size):
            batch_ids = pending[start : start + batch_size]
            images = np.stack([run.load_image(image_id) for image_id in batch_ids])
            for kind, labeler in labelers.items():
                labels = _checked_labels(labeler, images, kind)
                for image_id, label in zip(batch_ids, labels, strict=True):
                    write_npy_atomically(run.label_path(kind, image_id), label)
            bar.update(len(batch_ids))
    finally:
        bar.close()
    return run


def _checked_labels(labeler: Labeler, images: np.ndarray, kind: str) -> np.ndarray:
    """Run a labeler and check that it returned finite float32 (images, height, width)."""
    labels = np.asarray(labeler(images))
    expected = images.shape[:3]
    if labels.shape != expected:
        raise RuntimeError(
            f"The {kind} labeler {labeler.name!r} returned shape {labels.shape} for images "
            f"{images.shape}: a labeler must return one (height, width) map per image, "
            f"here {expected}."
        )
    if not np.isfinite(labels).all():
        raise RuntimeError(
            f"The {kind} labeler {labeler.name!r} returned NaN or infinite values: fix the "
            "labeler, which must replace them (helpers.labels.Labeler does)."
        )
    return labels.astype(np.float32)


def score_labels_on_renders(
    depth_labeler: Labeler,
    saliency_labeler: Labeler,
    count: int = 64,
    *,
    first_seed: int = HELD_OUT_SEED_START,
    image_size: int = 64,
) -> dict[str, float]:
    """Score labelers against the exact labels of ``count`` rendered toy-world scenes.

    Scenes use the seeds ``first_seed``, ``first_seed + 1``, ...; the default range is never
    used to train the toy estimators. Returns the mean per-image saliency Dice (mask above
    0.5 against the exact salient-object mask) and the mean per-image Spearman and Pearson
    correlations of predicted against exact relative inverse depth. Both correlations ignore
    the unknown scale of relative depth, and Spearman its unknown monotone distortion too.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive number of scenes, got {count!r}.")
    scenes = [render(first_seed + index, image_size) for index in range(count)]
    images = np.stack([scene.image for scene in scenes])

    depth = _checked_labels(depth_labeler, images, "depth")
    saliency = _checked_labels(saliency_labeler, images, "saliency")
    correlations = mean_correlations(
        depth, np.stack([scene.relative_inverse_depth for scene in scenes])
    )
    return {
        "scenes": count,
        "saliency_dice": mean_dice(
            saliency > SALIENCY_MASK_THRESHOLD, np.stack([scene.salient_mask for scene in scenes])
        ),
        "depth_spearman": correlations["spearman"],
        "depth_pearson": correlations["pearson"],
    }


def summarize_labels(run: RunFolder) -> str:
    """Describe a labelled run per split: images, salient area, empty masks, depth range."""
    labelers = run.labelers()
    sources = [
        f"{kind} from {labelers[kind]['name']} (version {labelers[kind]['version']})"
        if kind in labelers
        else f"no {kind} labeler"
        for kind in LABEL_KINDS
    ]
    lines = [f"Labels of {run.path}: {', '.join(sources)}"]
    for split in ("train", "test"):
        if not run.image_ids(split):
            lines.append(f"  {split}: no images")
            continue
        masks = run.load_labels("saliency", split) > SALIENCY_MASK_THRESHOLD
        depth = run.load_labels("depth", split)
        areas = masks.reshape(len(masks), -1).mean(axis=1)
        lines.append(
            f"  {split}: {len(masks)} images, salient object covers {areas.mean():.1%} of an "
            f"image on average, {int((areas == 0).sum())} empty masks, depth from "
            f"{depth.min():.3g} to {depth.max():.3g}"
        )
    return "\n".join(lines)

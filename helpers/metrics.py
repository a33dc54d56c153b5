"""Scores shared by the estimators, the probes and the interventions."""

import numpy as np
from scipy.stats import rankdata


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Foreground Dice coefficient 2|P & T| / (|P| + |T|) of two boolean masks.

    Two empty masks agree perfectly and score 1.
    """
    prediction = np.asarray(prediction, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if prediction.shape != target.shape:
        raise ValueError(
            f"Mask shapes differ: prediction {prediction.shape}, target {target.shape}."
        )
    total = prediction.sum() + target.sum()
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(prediction, target).sum() / total)


def mean_dice(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Average per-image Dice over a batch of masks (N, H, W)."""
    return float(np.mean([dice(p, t) for p, t in zip(predictions, targets, strict=True)]))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays, 0 where either is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks), 0 where either is constant."""
    return pearson(rankdata(np.ravel(a)), rankdata(np.ravel(b)))


def mean_correlations(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Per-image Spearman and Pearson correlations, averaged over the batch (N, H, W)."""
    pairs = list(zip(predictions, targets, strict=True))
    return {
        "spearman": float(np.mean([spearman(p, t) for p, t in pairs])),
        "pearson": float(np.mean([pearson(p, t) for p, t in pairs])),
    }


def rmse(prediction: np.ndarray, target: np.ndarray) -> float:
    difference = np.asarray(prediction, dtype=np.float64) - np.asarray(target, dtype=np.float64)
    return float(np.sqrt(np.mean(difference * difference)))

"""Classification metrics shared by training and ``neuron evaluate``."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean()) if len(labels) else math.nan


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence over equal-width bins (Guo et al. 2017)."""
    if not len(labels):
        return math.nan
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def per_class_auc(probs: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, float]:
    """One-vs-rest ROC AUC per class (NaN where the set lacks positives or negatives of that class)."""
    one_hot = (np.asarray(labels)[:, None] == np.arange(len(class_names))[None, :]).astype(np.float64)
    return multilabel_auc(probs, one_hot, class_names)


def multilabel_auc(probs: np.ndarray, targets: np.ndarray, class_names: tuple[str, ...]) -> dict[str, float]:
    """Per-label ROC AUC for multi-label targets (N, K) in {0, 1, NaN = unknown}."""
    out = {}
    for k, name in enumerate(class_names):
        known = ~np.isnan(targets[:, k])
        t = targets[known, k]
        out[name] = float(roc_auc_score(t, probs[known, k])) if known.any() and 0 < t.sum() < len(t) else math.nan
    return out


def mean_defined(values: dict[str, float]) -> float:
    defined = [v for v in values.values() if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan

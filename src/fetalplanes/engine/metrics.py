"""Classification and calibration metrics from probabilities (pure numpy + scikit-learn)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the true class (the 'loss')."""
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.log(p).mean())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin confidence, accuracy and count for reliability diagrams."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    out: dict[str, list[float]] = {
        "lower": [],
        "upper": [],
        "confidence": [],
        "accuracy": [],
        "count": [],
    }
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        out["lower"].append(float(lo))
        out["upper"].append(float(hi))
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else 0.0)
        out["accuracy"].append(float(correct[m].mean()) if m.any() else 0.0)
    return out


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score (mean squared error to the one-hot label)."""
    onehot = np.eye(probs.shape[1])[y]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def classification_metrics(
    probs: np.ndarray, y: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """All headline metrics for (N, C) probabilities and integer labels."""
    labels = list(range(len(classes)))
    pred = probs.argmax(axis=1)
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = {
        c: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(sup[i]),
        }
        for i, c in enumerate(classes)
    }
    metrics: dict[str, Any] = {
        "n_images": len(y),
        "classes": list(classes),
        "loss": nll(probs, y),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else 0.0,
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "cohen_kappa": _safe(lambda: cohen_kappa_score(y, pred, labels=labels)),
        "macro_auroc": _macro_auroc(probs, y, len(classes)),
        "ece": expected_calibration_error(probs, y),
        "brier": brier_score(probs, y),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }
    return metrics


def _safe(fn: Any) -> float | None:
    try:
        v = float(fn())
    except (ValueError, ZeroDivisionError):
        return None
    return None if np.isnan(v) else v


def _macro_auroc(probs: np.ndarray, y: np.ndarray, n: int) -> float | None:
    """One-vs-rest AUROC averaged over the classes present."""
    present = [c for c in range(n) if 0 < (y == c).sum() < len(y)]
    if not present:
        return None
    scores = [roc_auc_score(y == c, probs[:, c]) for c in present]
    return float(np.mean(scores))


def binary_auroc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """AUROC of telling positives (higher score) from negatives."""
    y = np.r_[np.ones(len(scores_pos)), np.zeros(len(scores_neg))]
    return float(roc_auc_score(y, np.r_[scores_pos, scores_neg]))

"""Temperature scaling and the 'not a target plane' rejection rule.

Both are fitted on validation patients at the end of training and stored in the
sidecar, so every inference path (torch, ONNX, server) applies the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T > 0 minimising validation NLL of softmax(logits / T)."""
    if len(y) == 0:
        return 1.0

    def loss(log_t: float) -> float:
        lp = log_softmax(logits / np.exp(log_t), axis=1)
        return float(-lp[np.arange(len(y)), y].mean())

    res = minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(res.x))


def calibrated_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(logits / temperature, axis=1)


SCORES = ("energy", "msp")


def ood_score(logits: np.ndarray, temperature: float = 1.0, method: str = "energy") -> np.ndarray:
    """In-distribution score: higher means more like the trained planes.

    energy = T * logsumexp(logits / T) (Liu et al. 2020); msp = max calibrated prob.
    """
    if method == "energy":
        return temperature * logsumexp(logits / temperature, axis=1)
    if method == "msp":
        return calibrated_probs(logits, temperature).max(axis=1)
    raise ValueError(f"unknown rejection score {method!r}; choose {', '.join(SCORES)}")


def fit_rejection(
    logits: np.ndarray, temperature: float, recall: float = 0.95, method: str = "energy"
) -> dict[str, Any]:
    """Threshold keeping `recall` of validation (in-distribution) images."""
    if len(logits) == 0:
        return {}
    scores = ood_score(logits, temperature, method)
    threshold = float(np.quantile(scores, 1 - recall))
    return {
        "method": method,
        "threshold": threshold,
        "target_recall": recall,
        "fitted_on": "validation patients",
        "n": len(scores),
    }


def is_not_target(logits: np.ndarray, temperature: float, rejection: dict[str, Any]) -> np.ndarray:
    """Boolean per image: rejected as none of the trained planes."""
    if not rejection or "threshold" not in rejection:
        return np.zeros(len(logits), dtype=bool)
    return ood_score(logits, temperature, rejection["method"]) < rejection["threshold"]

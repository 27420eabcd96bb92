"""Temperature scaling and not-target rejection: the mechanism on controlled logits, then a
trained model on unseen synthetic patients, photos, noise and a plane it never saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalplanes.calibration import (
    SCORES,
    calibrated_probs,
    fit_rejection,
    fit_temperature,
    is_not_target,
    ood_score,
    rejection_margin,
)
from fetalplanes.metrics import expected_calibration_error

SMALL = (180, 266)


def sample_logits(n: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (so z is perfectly calibrated); a model reporting
    scale * z is over- (scale > 1) or under-confident (scale < 1) by a known amount."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, (n, 4))
    z[np.arange(n), rng.integers(0, 4, n)] += 3.0
    p = calibrated_probs(z)
    y = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return scale * z, y


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_temperature_scaling_fixes_miscalibration(scale: float) -> None:
    val_logits, val_y = sample_logits(1000, scale, seed=1)
    test_logits, test_y = sample_logits(4000, scale, seed=2)
    t = fit_temperature(val_logits, val_y)
    assert t == pytest.approx(scale, rel=0.1)
    before = expected_calibration_error(calibrated_probs(test_logits), test_y)
    after = expected_calibration_error(calibrated_probs(test_logits, t), test_y)
    assert after <= 0.03 and after < before
    assert before > 0.05


def test_temperature_stays_finite_on_separable_validation() -> None:
    """All validation images right with a margin: plain NLL would drive T to its bound."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 21)
    z = rng.normal(0, 1, (21, 4))
    z[np.arange(21), y] += 3
    assert 0.2 < fit_temperature(z, y) < 1.0
    assert fit_temperature(np.zeros((0, 4)), np.zeros(0, int)) == 1.0


@pytest.mark.parametrize("method", SCORES)
def test_rejection_keeps_the_target_recall(method: str) -> None:
    val_logits, _ = sample_logits(2000, 2.0, seed=3)
    test_logits, _ = sample_logits(4000, 2.0, seed=4)
    rule = fit_rejection(val_logits, 1.5, recall=0.95, method=method)
    assert rule["method"] == method and rule["scale"] > 0 and rule["n"] == 2000
    kept = 1 - is_not_target(test_logits, 1.5, rule).mean()
    assert kept == pytest.approx(0.95, abs=0.015)
    margin = rejection_margin(test_logits, 1.5, rule)
    np.testing.assert_array_equal(margin < 0, is_not_target(test_logits, 1.5, rule))
    far = np.full((5, 4), -3.0)  # uniformly low logits: nothing like a trained plane
    if method != "msp":
        assert is_not_target(far, 1.5, rule).all()


def test_rejection_edge_cases() -> None:
    assert fit_rejection(np.zeros((0, 4)), 1.0) == {}
    assert not is_not_target(np.zeros((3, 4)), 1.0, {}).any()
    with pytest.raises(ValueError, match="unknown rejection score"):
        ood_score(np.zeros((1, 4)), 1.0, "entropy")
    with pytest.raises(ValueError, match="recall"):
        fit_rejection(np.zeros((3, 4)), 1.0, recall=0.0)

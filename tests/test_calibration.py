"""Temperature scaling and not-target rejection: the mechanism on controlled logits, then a
trained model on unseen synthetic patients, photos, noise and a plane it never saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, make_data
from PIL import Image

from fetalplanes.engine.metrics import expected_calibration_error
from fetalplanes.inference.calibration import (
    SCORES,
    calibrated_probs,
    fit_rejection,
    fit_temperature,
    is_not_target,
    ood_score,
    rejection_margin,
)
from fetalplanes.inference.outputs import Outputs


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


def _with_feature_column(logits: np.ndarray) -> np.ndarray:
    """Outputs as a run with a feature bank gives them: logits and the knn score (here a
    stand-in: the max logit)."""
    return Outputs(logits, logits.max(axis=1))


@pytest.mark.parametrize("method", SCORES)
def test_rejection_keeps_the_target_recall(method: str) -> None:
    val_logits, _ = sample_logits(2000, 2.0, seed=3)
    test_logits, _ = sample_logits(4000, 2.0, seed=4)
    far = np.full((5, 4), -3.0)  # uniformly low logits: nothing like a trained plane
    wrap = _with_feature_column if method == "knn" else Outputs
    val_out, test_out, far_out = map(wrap, (val_logits, test_logits, far))
    rule = fit_rejection(val_out, 1.5, recall=0.95, method=method)
    assert rule["method"] == method and rule["scale"] > 0 and rule["n"] == 2000
    rejected = is_not_target(test_out, 1.5, rule)
    assert 1 - rejected.mean() == pytest.approx(0.95, abs=0.015)
    margin = rejection_margin(test_out, 1.5, rule)
    np.testing.assert_array_equal(margin < 0, rejected)
    if method != "msp":
        assert is_not_target(far_out, 1.5, rule).all()


def test_outputs_split_into_logits_and_feature_score() -> None:
    logits, _ = sample_logits(10, 1.0, seed=0)
    outputs = _with_feature_column(logits)
    for method in ("energy", "msp", "maxlogit"):  # the model's score never leaks into these
        np.testing.assert_allclose(
            ood_score(outputs, 1.3, method), ood_score(Outputs(logits), 1.3, method)
        )
    np.testing.assert_allclose(ood_score(outputs, 1.0, "knn"), logits.max(axis=1))
    with pytest.raises(ValueError, match="model that computes it"):
        ood_score(Outputs(logits), 1.0, "knn")
    with pytest.raises(ValueError, match="scores for"):
        Outputs(logits, np.zeros(3))


def test_rejection_edge_cases() -> None:
    assert fit_rejection(Outputs(np.zeros((0, 4))), 1.0) == {}
    assert not is_not_target(Outputs(np.zeros((3, 4))), 1.0, {}).any()
    with pytest.raises(ValueError, match="unknown rejection score"):
        ood_score(Outputs(np.zeros((1, 4))), 1.0, "entropy")
    with pytest.raises(ValueError, match="recall"):
        fit_rejection(Outputs(np.zeros((3, 4))), 1.0, recall=0.0)


# ---------------------------------------------------------------- a trained model

#: Lite0 at 128 px, 6 epochs on 60 synthetic images per plane (~90 s of one CPU core):
#: the smallest setting measured that is accurate enough (~97% on new patients) for
#: calibration and rejection to be judged; 64-96 px models stay near 75-88%.
CALIB = dict(
    model="efficientnet_lite0",
    img_size=(128, 128),
    epochs=6,
    batch_size=32,
    lr=2e-3,
    seed=0,
    cache=True,
    workers=0,
    val_fraction=0.25,
    test_fraction=0.1,
)


@pytest.fixture(scope="module")
def calib_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fetalplanes.engine.train import TrainConfig, train

    # 120 per plane: with 60, validation held ~56 images and ECE after scaling ranged
    # 0.020-0.042 over training seeds; with 120 it was 0.009-0.016 (docs/trust.md)
    data = make_data(tmp_path_factory, "calibdata", size=SMALL, fmt="seed", per_class=120, seed=3)
    out = tmp_path_factory.mktemp("calib") / "run"
    train(data, config=TrainConfig(**CALIB), out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 images of new synthetic patients (another seed): ECE needs a few hundred."""
    return make_data(tmp_path_factory, "unseen", size=SMALL, fmt="seed", per_class=80, seed=11)


#: Every 2-D sample image bundled with scikit-image 0.2x (no download; `cat` is `chelsea`).
SKIMAGE_SAMPLES = (
    "astronaut", "brick", "camera", "cell", "checkerboard", "chelsea", "clock", "coffee",
    "coins", "colorwheel", "grass", "gravel", "horse", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "text",
)  # fmt: skip


@pytest.fixture(scope="module")
def not_ultrasound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's bundled sample images and uniform noise of several sizes."""
    data = pytest.importorskip("skimage.data")
    from fetalplanes.data.crop import to_gray

    folder = tmp_path_factory.mktemp("photos")
    for name in SKIMAGE_SAMPLES:
        Image.fromarray(to_gray(getattr(data, name)())).save(folder / f"{name}.png")
    rng = np.random.default_rng(5)
    for i, shape in enumerate([(180, 266), (256, 256), (300, 400), (128, 128), (540, 800)]):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"noise{i}.png")
    return folder


def _phantoms(folder: Path, plane: str, n: int, seed: int) -> Path:
    from fetalplanes.data.synth import render_phantom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(render_phantom(plane, rng, size=SMALL)).save(folder / f"{i:03d}.png")
    return folder


def test_calibration_on_unseen_patients(calib_run: Path, unseen: Path, tmp_path: Path) -> None:
    from fetalplanes.engine.evaluate import evaluate

    m = evaluate(calib_run, unseen, out=tmp_path / "ev", progress=False).metrics
    print(
        f"unseen: accuracy {m['accuracy']:.4f}, ECE {m['ece_uncalibrated']:.4f} -> "
        f"{m['ece']:.4f} (T={m['temperature']:.3f}), Brier {m['brier']:.4f}"
    )
    # measured 0.063 -> 0.015 (seeds 1 and 2: 0.016, 0.015; on 1,600 images 0.009-0.012)
    assert m["ece"] < m["ece_uncalibrated"] and m["ece"] <= 0.03
    assert m["loss"] <= m["loss_uncalibrated"]
    assert (tmp_path / "ev" / "reliability.png").is_file()
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"ece", "ece_uncalibrated", "brier"} <= set(saved)


def test_rejection_of_photos_noise_and_unseen_planes(
    calib_run: Path, unseen: Path, not_ultrasound: Path, tmp_path: Path
) -> None:
    from fetalplanes.engine.ood import evaluate_ood, folder_outputs
    from fetalplanes.inference.predictor import Predictor

    predictor = Predictor.from_run(calib_run, device="cpu")
    assert predictor.card.rejection["method"] == "knn"
    in_logits, _ = folder_outputs(predictor, unseen)
    cervix = _phantoms(tmp_path / "cervix", "Maternal cervix", 30, seed=7)
    other = _phantoms(tmp_path / "other", "Other", 30, seed=8)
    found = {}
    for name, folder in (("photos+noise", not_ultrasound), ("cervix", cervix), ("other", other)):
        found[name] = evaluate_ood(predictor, in_logits, folder)
        assert 0 <= found[name]["false_accept_rate"] <= 1 and found[name]["n_ood"] > 0
    print({k: (round(v["auroc"], 4), round(v["false_accept_rate"], 3)) for k, v in found.items()})
    assert found["photos+noise"]["auroc"] >= 0.95
    assert found["cervix"]["auroc"] >= 0.95
    assert found["other"]["auroc"] >= 0.85  # measured 0.92: limbs, cord, kidney look fetal
    recall = found["cervix"]["in_distribution_recall"]
    assert recall >= 0.9  # threshold fitted for 95% recall on validation patients
    assert set(found["cervix"]["by_score"]) == set(SCORES)


def test_sort_sends_rejected_images_to_not_target(
    calib_run: Path, not_ultrasound: Path, tmp_path: Path
) -> None:
    from fetalplanes.inference.predictor import Predictor

    preds = Predictor.from_run(calib_run, device="cpu").predict([not_ultrasound])
    rejected = [p for p in preds if p.not_target]
    assert all(p.label == "not_target" and p.rejection_score is not None for p in rejected)

"""Penultimate features and the kNN not-target score, for every model family and backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import onnx_predictor

from fetalplanes.data.synth import SEED4, render_phantom
from fetalplanes.errors import CheckpointError
from fetalplanes.inference.rejection import (
    BANK_FILE,
    FeatureTap,
    KnnScore,
    feature_dim,
    feature_module,
    knn_scores,
    load_knn,
    make_bank,
    save_bank,
    stored_bank,
)
from fetalplanes.models import create_model, get_spec
from fetalplanes.models.checkpoint import ModelCard, load_checkpoint, save_checkpoint

FAMILIES = {"seed-cnn": (64, 64), "efficientnet_lite0": (64, 64), "sononet16": (64, 80)}


def _model(arch: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    torch.manual_seed(0)
    size = FAMILIES[arch]
    return create_model(arch, len(SEED4), pretrained=False, input_size=size).eval(), size


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_feature_tap_gives_one_vector_per_image(arch: str) -> None:
    model, size = _model(arch)
    tap = FeatureTap(model)
    with torch.no_grad():
        logits = model(torch.rand(3, 1, *size))
    feats = tap.features()
    tap.remove()
    assert logits.shape == (3, len(SEED4)) and feats.dim() == 2 and feats.shape[0] == 3
    expected = {"seed-cnn": 128, "efficientnet_lite0": 1280}.get(arch)
    if expected:
        assert feats.shape[1] == expected
    assert not feature_module(model)._forward_pre_hooks  # removed again


def test_knn_score_is_similarity_to_the_kth_neighbour() -> None:
    rng = np.random.default_rng(0)
    bank = make_bank(rng.normal(size=(50, 8)))
    assert np.allclose(np.linalg.norm(bank, axis=1), 1)
    # a bank entry's own nearest neighbour is itself (similarity 1) ...
    assert np.allclose(knn_scores(bank[:5] * 3.0, bank, k=1), 1.0, atol=1e-6)
    # ... and larger k looks further away, never closer
    s1, s5 = knn_scores(bank[:5], bank, 1), knn_scores(bank[:5], bank, 5)
    assert (s5 <= s1 + 1e-6).all()
    assert KnnScore(torch.from_numpy(bank), k=500).k == 50  # k capped at the bank size
    assert len(make_bank(rng.normal(size=(30, 4)), limit=10)) == 10


def _knn_run(folder: Path, arch: str) -> Path:
    """A run with a random model, a bank of features of phantoms and a knn rule."""
    model, size = _model(arch)
    pp = get_spec(arch).preprocess.with_(size=size)
    card = ModelCard(arch, list(SEED4), pp, temperature=1.3)
    save_checkpoint(folder, model, card)
    rng = np.random.default_rng(1)
    bank = make_bank(rng.normal(size=(40, feature_dim(model, size))))
    save_bank(folder, bank)
    card.rejection = {"method": "knn", "k": 3, "bank": BANK_FILE, "threshold": 0.0, "scale": 1}
    save_checkpoint(folder, model, card)
    return folder


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_torch_and_onnx_give_the_same_knn_score(arch: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from fetalplanes.inference.predictor import Predictor

    run = _knn_run(tmp_path / "run", arch)
    rng = np.random.default_rng(2)
    images = [render_phantom(SEED4[i % 4], rng, size=(135, 200)) for i in range(4)]
    a = Predictor.from_run(run, device="cpu").predict_arrays(images)
    b = onnx_predictor(run, backend="onnx").predict_arrays(images)
    for x, y in zip(a, b, strict=True):
        assert x.rejection_score is not None and y.rejection_score is not None
        assert abs(x.rejection_score - y.rejection_score) < 1e-4
        assert max(abs(x.probs[k] - y.probs[k]) for k in x.probs) < 1e-4
        assert -1.0 <= x.rejection_score <= 1.0  # a cosine similarity


def test_bank_round_trip_and_missing_bank(tmp_path: Path) -> None:
    bank = make_bank(np.random.default_rng(0).normal(size=(20, 16)))
    save_bank(tmp_path, bank)
    knn = load_knn(tmp_path, {"method": "knn", "k": 2})
    assert knn is not None and knn.k == 2
    assert np.allclose(knn.bank.numpy(), stored_bank(bank), atol=1e-3)
    assert load_knn(tmp_path, {"method": "energy"}) is None
    with pytest.raises(CheckpointError, match="feature bank missing"):
        load_knn(tmp_path / "elsewhere", {"method": "knn"})


def test_trained_run_stores_its_bank(trained_run: Path) -> None:
    _, card = load_checkpoint(trained_run)
    rule = card.rejection
    assert rule["method"] == "knn" and (trained_run / rule["bank"]).is_file()
    assert rule["bank_size"] > 0 and rule["feature_dim"] == 1280 and rule["k"] >= 1
    assert 0.0 < rule["threshold"] <= 1.0

"""Checkpoints: safetensors + JSON sidecar round trip; no pickles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fetalplanes.errors import CheckpointError
from fetalplanes.models import create_model, get_spec
from fetalplanes.models.checkpoint import (
    ModelCard,
    load_card,
    load_checkpoint,
    save_checkpoint,
)
from fetalplanes.models.weights import load_weights_file


def _card() -> ModelCard:
    return ModelCard("seed-cnn", ["Fetal femur", "Fetal abdomen"],
                     get_spec("seed-cnn").preprocess.with_(size=(128, 128)), temperature=1.5,
                     split={"train": ["P1"], "val": ["P2"], "test": ["P3"]})


def test_roundtrip(tmp_path: Path) -> None:
    model = create_model("seed-cnn", 2, pretrained=False, input_size=(128, 128))
    save_checkpoint(tmp_path, model, _card())
    assert (tmp_path / "weights.safetensors").is_file()
    side = json.loads((tmp_path / "model.json").read_text())
    assert side["classes"] == ["Fetal femur", "Fetal abdomen"]
    assert side["architecture"]["name"] == "seed-cnn"
    assert side["preprocess"]["size"] == [128, 128]
    assert side["calibration"]["temperature"] == 1.5
    loaded, card = load_checkpoint(tmp_path)
    assert card.classes == ["Fetal femur", "Fetal abdomen"]
    x = torch.rand(1, 1, 128, 128)
    model.eval()
    assert torch.allclose(loaded(x), model(x))


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"model\.json"):
        load_card(tmp_path)
    (tmp_path / "model.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_card(tmp_path)


def test_weights_only_refuses_pickled_objects(tmp_path: Path) -> None:
    p = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, p)  # a pickled non-tensor object
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        load_weights_file(p)
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pth")
    assert torch.equal(load_weights_file(tmp_path / "ok.pth")["w"], torch.ones(2))


def test_run_files_follow_the_umask(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; run files must be readable by colleagues (umask 022)."""
    import os

    from fetalplanes.data.preprocess import Preprocess
    from fetalplanes.models.card import ModelCard, save_card
    from fetalplanes.models.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        card = ModelCard("seed-cnn", ["a", "b"], Preprocess(size=(32, 32)))
        save_card(tmp_path, card)
        save_checkpoint(tmp_path / "run", torch.nn.Linear(2, 2), card)
    finally:
        os.umask(old)
    assert (tmp_path / "model.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run" / "weights.safetensors").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))

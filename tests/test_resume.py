"""Training as an object: Trainer epochs, a checkpoint after each, resume after a stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fetalplanes.engine.train import RESUME_DIR, TrainConfig, Trainer
from fetalplanes.errors import FetalPlanesError


def test_img_size_accepts_an_int_like_the_cli() -> None:
    assert TrainConfig(img_size=96).img_size == (96, 96)
    assert TrainConfig(img_size=[64, 80]).img_size == (64, 80)
    assert TrainConfig.from_dict(TrainConfig(img_size=96).to_dict()).img_size == (96, 96)


@pytest.mark.slow
def test_resume_continues_from_the_last_finished_epoch(seed_data: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="seed-cnn", img_size=48, epochs=3, batch_size=32, seed=0,
                      cache=False, workers=0)
    first = Trainer(seed_data, config=cfg, out=tmp_path / "run", progress=False).setup()
    first.epoch()  # then the process "dies"
    assert (tmp_path / "run" / RESUME_DIR / "state.json").is_file()
    assert (tmp_path / "run" / "weights.safetensors").is_file()
    resumed = Trainer.resume(tmp_path / "run", progress=False)
    assert resumed.epoch_no == 1 and len(resumed.history) == 1
    result = resumed.fit()
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3 and result.card.temperature > 0
    assert not (tmp_path / "run" / RESUME_DIR).exists()
    side = json.loads((tmp_path / "run" / "model.json").read_text())
    assert side["split"] == first.split.to_dict()
    with pytest.raises(FetalPlanesError, match="has finished"):
        Trainer.resume(tmp_path / "run")


def test_resume_without_state_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FetalPlanesError, match="cannot resume"):
        Trainer.resume(tmp_path)

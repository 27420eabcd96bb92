"""Shipped training recipes: valid TrainConfigs, selectable by name, each trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.data.datasets import PRESETS
from fetalplanes.engine.train import TrainConfig
from fetalplanes.errors import FetalPlanesError
from fetalplanes.models import get_spec
from fetalplanes.recipes import FOLDER, RECIPES, choose_preset, read_config


def test_every_shipped_file_is_a_recipe_and_a_train_config() -> None:
    assert {p.stem for p in FOLDER.glob("*.json")} == set(RECIPES)
    assert {"fpdb6-lite0", "fpdb6-sononet16", "brain3-lite0"} <= set(RECIPES)
    for name, recipe in RECIPES.items():
        values, found = read_config(name)
        assert found is recipe
        cfg = TrainConfig.from_dict(values)  # rejects anything that is not a field
        assert recipe.preset in PRESETS
        assert get_spec(cfg.model).name == cfg.model
        assert recipe.command.startswith("fetalplanes train ") and name in recipe.command
        assert tuple(cfg.img_size or ()) == get_spec(cfg.model).preprocess.size


def test_sononet_recipe_starts_from_published_weights() -> None:
    cfg = TrainConfig.from_dict(read_config("fpdb6-sononet16")[0])
    assert cfg.model == "sononet16" and cfg.pretrained and cfg.freeze_epochs > 0
    assert get_spec("sononet16").bundled_weights() is not None
    assert "--weights" in RECIPES["fpdb6-sononet16"].command


def test_a_file_wins_over_a_name_and_errors_are_one_line(tmp_path: Path) -> None:
    own = tmp_path / "mine.json"
    own.write_text('{"epochs": 3}')
    assert read_config(own) == ({"epochs": 3}, None)
    with pytest.raises(FetalPlanesError, match="no such config file or recipe; recipes: fpdb6"):
        read_config("fpdb7-lite0")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(FetalPlanesError, match="JSON object"):
        read_config(bad)


def test_preset_comes_from_the_recipe_unless_given(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = RECIPES["brain3-lite0"]
    assert choose_preset(None, recipe) == "brain3"
    assert choose_preset(None, None) == "seed4"
    assert choose_preset("brain3", recipe) == "brain3" and capsys.readouterr().err == ""
    assert choose_preset("fpdb6", recipe) == "fpdb6"
    assert "recipe brain3-lite0 is for preset brain3" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_one_epoch_by_name(name: str, fpdb_data: Path, tmp_path: Path) -> None:
    """`train DATA --config NAME` on tiny synthetic FETAL_PLANES_DB data: the preset comes
    from the recipe, flags override its epochs and size."""
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [
        "train", str(fpdb_data), "--config", name, "--epochs", "1", "--img-size", "64",
        "--batch-size", "16", "--out", str(out), "--quiet",
    ])
    assert r.exit_code == 0, r.output
    recipe = RECIPES[name]
    card = json.loads((out / "model.json").read_text())
    assert card["preset"] == recipe.preset
    assert card["classes"] == list(PRESETS[recipe.preset].classes)
    used = json.loads((out / "train_config.json").read_text())
    shipped = json.loads(recipe.path.read_text())
    changed = {k for k in shipped if used[k] != shipped[k]}
    assert changed == {"epochs", "img_size", "batch_size"}
    assert used["epochs"] == 1 and used["img_size"] == [64, 64]

"""Training recipes that ship with fetalplanes: `fetalplanes train DATA --config NAME`.

Each recipe is a JSON file beside this module holding `TrainConfig` fields only, so a
copy of it works as `--config FILE` and flags still override it. What is not a training
option is recorded here: the label preset the recipe is for (used when `--preset` is not
given) and the command line to run it with (docs/results.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetalplanes.console import warn
from fetalplanes.errors import FetalPlanesError

FOLDER = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """A shipped training config and what it is for."""

    name: str
    preset: str
    summary: str
    command: str

    @property
    def path(self) -> Path:
        return FOLDER / f"{self.name}.json"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "fpdb6-lite0",
            "fpdb6",
            "EfficientNet-Lite0 from ImageNet, fine-tuned on the six FETAL_PLANES_DB planes "
            "at 224 px",
            "fetalplanes train fpdb --config fpdb6-lite0",
        ),
        Recipe(
            "fpdb6-sononet16",
            "fpdb6",
            "SonoNet-16 from its published fetal-plane weights (bundled; or --weights "
            "SonoNet16.pth from `fetalplanes download sononet16`), new 6-class layer, "
            "2 head-only epochs, at 224 x 288",
            "fetalplanes train fpdb --config fpdb6-sononet16 --weights weights/SonoNet16.pth",
        ),
        Recipe(
            "brain3-lite0",
            "brain3",
            "EfficientNet-Lite0 from ImageNet on the three brain sub-planes of the "
            "Fetal brain images at 224 px",
            "fetalplanes train fpdb --config brain3-lite0",
        ),
    )
}


def read_config(value: str | Path) -> tuple[dict[str, Any], Recipe | None]:
    """The training options of `--config VALUE`: a JSON file, else a recipe by name."""
    path, recipe = Path(value), None
    if not path.is_file():
        recipe = RECIPES.get(str(value))
        if recipe is None:
            raise FetalPlanesError(
                f"{value}: no such config file or recipe; recipes: {', '.join(RECIPES)}"
            )
        path = recipe.path
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FetalPlanesError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(values, dict):
        raise FetalPlanesError(f"{path}: a config is a JSON object of training options")
    return values, recipe


def choose_preset(given: str | None, recipe: Recipe | None) -> str:
    """`--preset` when given (with a warning if the recipe was made for another), else the
    recipe's preset, else seed4."""
    if given is None:
        return recipe.preset if recipe is not None else "seed4"
    if recipe is not None and given != recipe.preset:
        warn(f"recipe {recipe.name} is for preset {recipe.preset}; training with {given}")
    return given

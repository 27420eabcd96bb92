"""Model cards: the bundled SonoNet-16's (shipped data, shown by `models --card`) and the
MODEL_CARD.md every trained run writes from what it knows."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.models.card import load_card
from fetalplanes.models.model_card import (
    MODEL_CARD_MD,
    bundled_card,
    card_for,
    render_markdown,
    run_card,
)

runner = CliRunner()


def test_bundled_card_says_what_the_model_is_and_is_not():
    card = bundled_card("sononet16")
    assert card is not None and bundled_card("seed-cnn") is None
    for key in ("intended_use", "training_data", "folding", "accuracy", "failure_modes",
                "not_medical_device"):
        assert card[key], key
    assert "not a medical device" in card["not_medical_device"]
    assert any("Background" in f for f in card["failure_modes"])
    measured = {a["what"].split(" (")[0]: a for a in card["accuracy"]}
    assert "scripts/model_card_accuracy.py" in json.dumps(measured)
    assert len(card["accuracy"]) == 2 and all(a["measured"] for a in card["accuracy"])


def test_models_card_prints_the_markdown():
    r = runner.invoke(app, ["models", "--card", "sononet16"], catch_exceptions=False)
    assert r.exit_code == 0
    assert r.output.startswith("# Model card: SonoNet-16")
    for heading in ("## Intended use", "## Training data", "## Classes and folding",
                    "## Measured accuracy", "## Known failure modes"):
        assert heading in r.output
    assert "Research software, not a medical device" in r.output
    bad = runner.invoke(app, ["models", "--card", "no-such-model"])
    assert bad.exit_code == 2 and "no model card" in bad.output


def test_trained_run_writes_its_model_card(trained_run: Path):
    text = (trained_run / MODEL_CARD_MD).read_text()
    card = load_card(trained_run)
    assert text.startswith("# Model card: efficientnet_lite0")
    assert "Research software, not a medical device" in text
    assert f"{card.data['n_images']} images of {card.data['n_patients']} patients" in text
    assert "split by patient" in text and "no patient on two sides" in text
    assert "## Per class (validation)" in text
    for name in card.classes:
        assert f"| {name} |" in text
    assert f"temperature {card.temperature:.3f}" in text
    assert "accepts 95% of validation images" in text  # rejection coverage
    assert "Small data" in text  # limits known from the data
    r = runner.invoke(app, ["models", "--card", str(trained_run)], catch_exceptions=False)
    assert r.output == text


def test_run_card_shows_per_site_groups(trained_run: Path):
    card = load_card(trained_run)
    groups = {"by_site": {"Site A": {"n_images": 10, "n_patients": 3, "accuracy": 0.9,
                                     "balanced_accuracy": 0.85}}}
    text = render_markdown(run_card(card, "run", groups=groups))
    assert "## Validation by site" in text and "| Site A | 10 | 3 | 0.900 | 0.850 |" in text
    assert card_for(card)["summary"].startswith(card.architecture)

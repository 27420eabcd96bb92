"""Model cards for people: what a model is, what it was trained on, how well it did on what,
and what it is not (a medical device). Torch-free.

The bundled SonoNet-16 has a hand-written card shipped beside its weights
(`pretrained/sononet16.card.json`, its accuracy measured by `scripts/model_card_accuracy.py`);
a trained run's card is built from its sidecar (`models.card.ModelCard`) and the
validation metrics, and written as `RUN/MODEL_CARD.md` at the end of training. The audit
report, the web page and `fetalplanes models --card NAME` show the same card.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fetalplanes.models.card import ModelCard, atomic_write_text
from fetalplanes.models.registry import bundled_file

MODEL_CARD_MD = "MODEL_CARD.md"
NOT_MEDICAL_DEVICE = (
    "Research software, not a medical device: no regulatory clearance and no clinical "
    "validation; it must not be used for diagnosis or any clinical decision."
)
#: name -> the card file shipped in models/pretrained/
BUNDLED_CARDS: dict[str, str] = {"sononet16": "sononet16.card.json"}


def bundled_card(name: str) -> dict[str, Any] | None:
    """The shipped card of a bundled model, or None (unknown name or file not installed)."""
    path = bundled_file(BUNDLED_CARDS.get(name, ""))
    if path is None:
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def card_for(card: ModelCard, name: str = "", zero_shot: bool = False) -> dict[str, Any]:
    """The people's card of a loaded model: the bundled card for a zero-shot bundled model
    (with the preset it is folded to), else one built from the sidecar."""
    shipped = bundled_card(card.architecture) if zero_shot else None
    if shipped is not None:
        return shipped | {"preset": card.preset}
    return run_card(card, name)


def run_card(card: ModelCard, name: str = "", val: Mapping[str, Any] | None = None,
             groups: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A card from what a run knows: its sidecar, and (at the end of training) the full
    validation metrics `val` (per class) and per site/machine/operator `groups`."""
    data, split, metrics = card.data, card.split, card.metrics
    h, w = card.preprocess.size
    val = dict(val or metrics.get("val") or {})
    n_patients = {k: len(v) for k, v in split.items() if isinstance(v, list)}
    accuracy = []
    if val.get("accuracy") is not None:
        accuracy.append({
            "what": f"validation patients ({val.get('n_images', '?')} images)",
            "result": f"accuracy {val['accuracy']:.3f}, balanced accuracy "
                      f"{val.get('balanced_accuracy', float('nan')):.3f}, macro F1 "
                      f"{val.get('macro_f1', float('nan')):.3f}",
            "how": "end of training; these patients also chose the best epoch and the "
                   "temperature, so the figures are optimistic: `fetalplanes evaluate RUN` "
                   "scores the test patients"})
    rejection = card.rejection
    return {
        "name": name or card.architecture,
        "title": f"{card.architecture} trained with fetalplanes {card.version}".strip(),
        "summary": f"{card.architecture} classifying single 2D frames ({h} x {w} pixels, one "
                   f"grey channel) into {', '.join(card.classes)} (preset {card.preset}).",
        "intended_use": "Research: classifying and sorting 2D fetal ultrasound frames like "
                        "those it was trained on. Not for diagnosis or clinical decisions.",
        "training_data": _data_text(data, n_patients),
        "folding": "Its own classes; a frame the rejection rule refuses is not_target.",
        "accuracy": accuracy,
        "per_class": val.get("per_class") or {},
        "groups": dict(groups or {}),
        "calibration": f"temperature {card.temperature:.3f} fitted on the validation patients"
                       if card.temperature != 1.0 else "temperature 1.0 (none fitted)",
        "rejection": _rejection_text(rejection),
        "ece": val.get("ece"),
        "failure_modes": [
            "Untested outside the training data's scanners, sites and gestational ages.",
            "A frame showing none of the classes may still get one with high confidence "
            "when the rejection rule misses it.",
        ],
        "limits": _limits(data, n_patients),
        "not_medical_device": NOT_MEDICAL_DEVICE,
        "training": {k: card.training.get(k) for k in ("model", "epochs", "img_size", "seed")
                     if k in card.training},
        "created": card.created,
    }


def _data_text(data: Mapping[str, Any], n_patients: Mapping[str, int]) -> str:
    if not data:
        return "Not recorded in the run's sidecar."
    root = Path(str(data.get("root", ""))).name or "?"
    split = ", ".join(f"{k} {v}" for k, v in n_patients.items())
    return (f"{data.get('n_images', '?')} images of {data.get('n_patients', '?')} patients "
            f"(folder {root}, layout {data.get('layout', '?')}, fingerprint "
            f"{data.get('fingerprint', '?')}); split by patient ({split} patients), no "
            "patient on two sides.")


def _rejection_text(rejection: Mapping[str, Any]) -> str:
    if not rejection or "threshold" not in rejection:
        return "No rejection rule: every frame gets one of the classes."
    recall = rejection.get("target_recall")
    cover = f"; accepts {recall:.0%} of validation images by construction" if recall else ""
    return (f"{rejection.get('method')} score below {rejection['threshold']:.4g} -> "
            f"not_target (fitted on {rejection.get('fitted_on', 'validation')}{cover}).")


def _limits(data: Mapping[str, Any], n_patients: Mapping[str, int]) -> list[str]:
    limits = [
        "Validation metrics come from the patients that picked the epoch and fitted the "
        "temperature; report test or external metrics (`fetalplanes evaluate`).",
        "Single frames only: no temporal context, no measurement, no anomaly detection.",
    ]
    if int(data.get("n_patients") or 0) < 100:
        limits.append(f"Small data: {data.get('n_patients', '?')} patients in all.")
    return limits


# ------------------------------------------------------------------ markdown
def render_markdown(card: Mapping[str, Any]) -> str:
    """MODEL_CARD.md (and `fetalplanes models --card`): every section the card has."""
    lines = [f"# Model card: {card.get('title') or card.get('name')}", ""]
    lines += [f"> {card.get('not_medical_device') or NOT_MEDICAL_DEVICE}", ""]
    for key, title in (("summary", "Model"), ("intended_use", "Intended use"),
                       ("out_of_scope", "Out of scope"), ("training_data", "Training data"),
                       ("folding", "Classes and folding"), ("preprocessing", "Preprocessing"),
                       ("calibration", "Calibration"), ("rejection", "Rejection")):
        if card.get(key):
            lines += [f"## {title}", "", str(card[key]), ""]
    if card.get("preset"):
        lines += [f"Folded to preset: `{card['preset']}`.", ""]
    if card.get("accuracy"):
        lines += ["## Measured accuracy", "", "| on | result | how |", "| --- | --- | --- |"]
        lines += [f"| {_cell(a.get('what'))} | {_cell(a.get('result'))} | "
                  f"{_cell(a.get('how'))} |" for a in card["accuracy"]]
        if card.get("accuracy_note"):
            lines += ["", str(card["accuracy_note"])]
        lines.append("")
    if card.get("ece") is not None:
        lines += [f"Expected calibration error on validation: {card['ece']:.3f}.", ""]
    if card.get("per_class"):
        lines += ["## Per class (validation)", "",
                  "| class | precision | recall | F1 | images |", "| --- | --- | --- | --- | --- |"]
        for name, m in card["per_class"].items():
            lines.append(f"| {_cell(name)} | {m['precision']:.3f} | {m['recall']:.3f} | "
                         f"{m['f1']:.3f} | {m['support']} |")
        lines.append("")
    for group, values in (card.get("groups") or {}).items():
        lines += [f"## Validation {group.replace('_', ' ')}", "",
                  "| group | images | patients | accuracy | balanced accuracy |",
                  "| --- | --- | --- | --- | --- |"]
        for name, m in values.items():
            lines.append(f"| {_cell(name)} | {m['n_images']} | {m.get('n_patients', '')} | "
                         f"{m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} |")
        lines.append("")
    for key, title in (("failure_modes", "Known failure modes"), ("limits", "Limits")):
        if card.get(key):
            lines += [f"## {title}", ""] + [f"- {x}" for x in card[key]] + [""]
    for key, title in (("license", "License"), ("citation", "Cite")):
        if card.get(key):
            lines += [f"## {title}", "", str(card[key]), ""]
    return "\n".join(lines).rstrip() + "\n"


def _cell(value: Any) -> str:
    return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")


def write_model_card(run: str | Path, card: ModelCard, val: Mapping[str, Any] | None = None,
                     groups: Mapping[str, Any] | None = None) -> Path:
    """RUN/MODEL_CARD.md from what the run knows (called at the end of training)."""
    path = Path(run) / MODEL_CARD_MD
    atomic_write_text(path, render_markdown(run_card(card, Path(run).name, val, groups)))
    return path

"""Ensembles of trained runs (e.g. the K fold runs of `crossval`) behind one `Predictor`.

Probabilities: the mean of the members' *calibrated* probabilities (each member applies
its own temperature), which is itself well calibrated; the card's temperature is 1.

Rejection: a member's validation patients were training patients of other fold members,
so no held-out set is left to re-fit a threshold for the ensemble. Instead each member
turns its own stored rule into a margin, (score - threshold) / scale (scale = the
interquartile range of its validation scores; 1 for runs that predate it), and the
ensemble accepts an image when the *mean margin* is >= 0. A member at its threshold
contributes 0, so the rule keeps roughly each member's 95% validation recall, and
members with larger logits do not dominate.

The ensemble declares its own rule: its backend returns `Outputs(log mean probability,
score=mean margin)` and its card stores `{"method": "margin", "threshold": 0}`, so
predict, sort, evaluate and serve need no ensemble code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.backends import TorchBackend, load_run_backend
from fetalplanes.inference.calibration import calibrated_probs, rejection_margin
from fetalplanes.inference.outputs import Outputs
from fetalplanes.models.card import SIDECAR, ModelCard

_TINY = 1e-12


def member_runs(folder: str | Path) -> list[Path]:
    """Sub-folders of `folder` that are run folders (fold-1, fold-2, ...), in natural order."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    runs = [p for p in folder.iterdir() if p.is_dir() and (p / SIDECAR).is_file()]
    return sorted(runs, key=lambda p: (len(p.name), p.name))


def is_ensemble_dir(path: str | Path) -> bool:
    """True for a folder that is not a run itself but holds at least two runs (crossval OUT)."""
    path = Path(path)
    return path.is_dir() and not (path / SIDECAR).is_file() and len(member_runs(path)) >= 2


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders from a mix of run folders and folders of runs."""
    runs: list[Path] = []
    for p in map(Path, paths):
        runs.extend(member_runs(p) if is_ensemble_dir(p) else [p])
    return runs


class EnsembleBackend:
    """Average of members' calibrated probabilities; score = their mean rejection margin."""

    def __init__(self, members: Sequence[tuple[TorchBackend, ModelCard]]):
        if len(members) < 2:
            raise FetalPlanesError("an ensemble needs at least two runs")
        self.members = list(members)
        self.rejects = all(c.rejection.get("threshold") is not None for _, c in members)

    def outputs(self, pixels: np.ndarray) -> Outputs:
        """(N,H,W) uint8 -> log mean probability, plus the mean margin as the score."""
        probs, margins = [], []
        for backend, card in self.members:
            out = backend.outputs(pixels)
            probs.append(calibrated_probs(out.logits, card.temperature))
            if self.rejects:
                margins.append(rejection_margin(out, card.temperature, card.rejection))
        logp = np.log(np.clip(np.mean(probs, axis=0), _TINY, 1.0))
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))  # rows sum to 1 exactly
        return Outputs(logp, np.mean(margins, axis=0) if self.rejects else None)


def _check_compatible(cards: Sequence[ModelCard], runs: Sequence[Path]) -> None:
    first = cards[0]
    for card, run in zip(cards[1:], runs[1:], strict=True):
        if list(card.classes) != list(first.classes):
            raise FetalPlanesError(
                f"{run}: classes {card.classes} differ from {runs[0]}'s {first.classes}"
            )
        if card.preprocess != first.preprocess:
            raise FetalPlanesError(
                f"{run}: preprocessing differs from {runs[0]}'s; ensemble runs must share "
                "input size and crop"
            )


def ensemble_card(cards: Sequence[ModelCard], runs: Sequence[Path], rejects: bool) -> ModelCard:
    """Sidecar of the ensemble. It keeps a test split only when all members share it: fold
    members saw each other's test patients in training, so they must be evaluated elsewhere."""
    first = cards[0]
    archs = sorted({c.architecture for c in cards})
    same_split = all(c.split == first.split for c in cards)
    rejection = (
        {
            "method": "margin",
            "threshold": 0.0,
            "scale": 1.0,
            "rule": "mean of members' (score - threshold) / scale >= 0",
            "member_scores": sorted({str(c.rejection.get("method")) for c in cards}),
            "target_recall": first.rejection.get("target_recall"),
            "fitted_on": "members' validation patients",
        }
        if rejects
        else {}
    )
    return ModelCard(
        architecture=f"ensemble({len(cards)}x {'+'.join(archs)})",
        classes=list(first.classes),
        preprocess=first.preprocess,
        preset=first.preset,
        temperature=1.0,
        rejection=rejection,
        split=dict(first.split) if same_split else {},
        data=dict(first.data) if same_split else {},
        metrics={"members": [str(r) for r in runs]},
        training={"ensemble": [str(r) for r in runs]},
    )


def load_ensemble(
    runs: Sequence[str | Path], device: str = "auto", tta: bool = False
) -> tuple[EnsembleBackend, ModelCard]:
    """Backend and card of an ensemble of runs (or folders of runs, e.g. a crossval OUT)."""
    paths = expand_runs(runs)
    if len(paths) < 2:
        raise FetalPlanesError(
            f"an ensemble needs at least two runs; got {', '.join(map(str, runs)) or 'none'}"
        )
    members = [load_run_backend(p, device, tta) for p in paths]
    cards = [c for _, c in members]
    _check_compatible(cards, paths)
    backend = EnsembleBackend(members)
    return backend, ensemble_card(cards, paths, backend.rejects)

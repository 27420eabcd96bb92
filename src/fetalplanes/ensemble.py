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

Both travel through the ordinary `Predictor` untouched: the backend returns
`log(mean probability) + mean margin` as "logits". Softmax ignores a per-row constant, so
`calibrated_probs(logits, 1)` is exactly the mean probability, while the energy score
`logsumexp(logits)` equals the mean margin; the card stores the energy rule with
threshold 0. predict, sort, evaluate and serve need no ensemble code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.calibration import calibrated_probs, rejection_margin
from fetalplanes.checkpoint import SIDECAR, ModelCard
from fetalplanes.errors import FetalPlanesError

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
    """Average of member predictors' calibrated probabilities, plus their mean margin."""

    def __init__(self, members: Sequence[Any]):
        if len(members) < 2:
            raise FetalPlanesError("an ensemble needs at least two runs")
        self.members = list(members)
        self.rejects = all(m.card.rejection.get("threshold") is not None for m in members)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(N,H,W) uint8 -> (N,C) 'logits' = log mean probability + mean rejection margin."""
        probs, margins = [], []
        for m in self.members:
            raw = m.backend.logits(pixels)
            n = len(m.classes)
            probs.append(calibrated_probs(raw[:, :n], m.card.temperature))
            if self.rejects:
                rej = m.card.rejection
                margins.append(rejection_margin(raw, m.card.temperature, rej, n))
        out = np.log(np.clip(np.mean(probs, axis=0), _TINY, 1.0))
        out -= np.log(np.exp(out).sum(axis=1, keepdims=True))  # rows sum to 1 exactly
        if self.rejects:
            out += np.mean(margins, axis=0)[:, None]
        return out.astype(np.float32)


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
            "method": "energy",
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


def ensemble_predictor(
    runs: Sequence[str | Path],
    device: str = "auto",
    tta: bool = False,
    min_confidence: float = 0.0,
) -> Any:
    """One `Predictor` for several runs (or folders of runs, e.g. a crossval OUT)."""
    from fetalplanes.inference import Predictor

    paths = expand_runs(runs)
    members = [Predictor.from_run(p, device=device, tta=tta) for p in paths]
    if len(members) < 2:
        raise FetalPlanesError(
            f"an ensemble needs at least two runs; got {', '.join(map(str, runs)) or 'none'}"
        )
    _check_compatible([m.card for m in members], paths)
    backend = EnsembleBackend(members)
    card = ensemble_card([m.card for m in members], paths, backend.rejects)
    return Predictor(backend, card, min_confidence)

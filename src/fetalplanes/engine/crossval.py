"""K-fold cross-validation grouped by patient: how much does a score move with the split?

One split's test metrics on a few dozen patients can be off by several points; K folds
give every patient one turn in a test set, and the spread of the K scores says how much
to trust a single number. Fold k tests on patient group k of `data.kfold_by_patient`;
its validation patients (early stopping, temperature, rejection threshold) are carved
from the other groups, so no test patient ever influences its fold's model.
The K fold runs together form an ensemble (`ensemble.ensemble_predictor(OUT)`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.console import info
from fetalplanes.data.datasets import (
    LabelledData,
    Sample,
    Split,
    kfold_by_patient,
    load_dataset,
    split_by_patient,
)
from fetalplanes.engine.evaluate import HEADLINE_METRICS
from fetalplanes.errors import FetalPlanesError

SUMMARY = "cv_summary.json"
#: Metrics summarised across folds (from each fold's evaluate metrics.json).
CV_METRICS = HEADLINE_METRICS


@dataclass
class CVResult:
    out: Path
    runs: list[Path]
    per_fold: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]


def fold_splits(
    samples: list[Sample], folds: int, seed: int = 0, val_fraction: float = 0.15
) -> list[Split]:
    """One patient split per fold: test = group k, validation carved from the rest."""
    groups = kfold_by_patient(samples, folds, seed)
    if any(not g for g in groups):
        n = len({s.patient for s in samples})
        raise FetalPlanesError(f"{folds} folds need at least {folds} patients; the data has {n}")
    rel_val = min(0.5, val_fraction / (1 - 1 / folds))
    splits = []
    for k, test in enumerate(groups):
        held = set(test)
        # the FETAL_PLANES_DB Train column would fix the test set; CV chooses it instead
        rest = [dataclasses.replace(s, subset=None) for s in samples if s.patient not in held]
        inner = split_by_patient(rest, rel_val, 0.0, seed + k)
        splits.append(Split(inner.train, inner.val, tuple(test)))
    return splits


def summarize(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) of each metric over the folds."""
    out = {}
    for key in CV_METRICS:
        values = [m[key] for m in per_fold if m.get(key) is not None]
        if values:
            arr = np.asarray(values, dtype=float)
            sd = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
            out[key] = {"mean": float(arr.mean()), "sd": sd, "n_folds": len(arr)}
    return out


def cross_validate(
    data_root: str | Path | None,
    config: Any = None,
    folds: int = 5,
    out: str | Path | None = None,
    *,
    labels: str | Path | None = None,
    preset: str = "seed4",
    data: LabelledData | None = None,
    progress: bool = True,
) -> CVResult:
    """Train and evaluate `folds` patient-grouped folds into OUT/fold-1..K; write cv_summary."""
    from fetalplanes.engine.evaluate import evaluate
    from fetalplanes.engine.train import TrainConfig, resolve_run_dir, train

    cfg = config or TrainConfig()
    if data is None:
        if data_root is None:
            raise FetalPlanesError("crossval needs a data folder")
        data = load_dataset(data_root, labels, preset)
    out_dir = resolve_run_dir(out, f"{cfg.model}-cv{folds}")
    splits = fold_splits(data.samples, folds, cfg.seed, cfg.val_fraction)
    runs, per_fold = [], []
    for k, split in enumerate(splits, start=1):
        info(f"fold {k}/{folds}: {len(split.test)} test patients")
        run = out_dir / f"fold-{k}"
        train(data=data, split=split, config=cfg, out=run, progress=progress)
        metrics = evaluate(run, split="test", progress=progress).metrics
        runs.append(run)
        per_fold.append({"fold": k, "run": str(run), **_fold_row(metrics)})
    summary = summarize(per_fold)
    _write_summary(out_dir, data, cfg, splits, per_fold, summary)
    print_summary(per_fold, summary, out_dir)
    return CVResult(out_dir, runs, per_fold, summary)


def _fold_row(metrics: dict[str, Any]) -> dict[str, Any]:
    row = {k: metrics.get(k) for k in CV_METRICS}
    row |= {"n_images": metrics["n_images"], "n_patients": metrics["n_patients"]}
    return row


def _write_summary(
    out: Path,
    data: LabelledData,
    cfg: Any,
    splits: list[Split],
    per_fold: list[dict[str, Any]],
    summary: dict[str, dict[str, float]],
) -> None:
    record = {
        "folds": len(splits),
        "data": str(Path(data.root).resolve()),
        "preset": data.preset,
        "config": cfg.to_dict(),
        "summary": summary,
        "per_fold": per_fold,
        "test_patients": [list(s.test) for s in splits],
        "ensemble": f"fetalplanes evaluate {out} OTHER_DATA (the fold runs as one ensemble)",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).write_text(json.dumps(record, indent=2) + "\n")


def print_summary(
    per_fold: list[dict[str, Any]], summary: dict[str, dict[str, float]], out: Path
) -> None:
    """Table of mean +/- sd and each fold's value on stderr."""
    from rich.table import Table

    from fetalplanes.console import err

    t = Table("metric", "mean ± sd", *(f"fold {r['fold']}" for r in per_fold))
    for key, s in summary.items():
        t.add_row(
            key,
            f"{s['mean']:.4f} ± {s['sd']:.4f}",
            *(_cell(r.get(key)) for r in per_fold),
        )
    err.print(t)
    info(f"cross-validation summary written to {out / SUMMARY}")


def _cell(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"

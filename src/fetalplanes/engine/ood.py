"""How well does the 'not a target plane' rule reject images the model was never meant to see?

`evaluate --ood DIR` scores a folder of out-of-distribution images (photos, other organs,
other planes) against the in-distribution test images with the score and threshold
stored in the run's sidecar, and reports AUROC, the false-accept rate at the stored
threshold and the in-distribution recall there. The other scores of
`calibration.SCORES` are reported beside it, so a better default is a measurement away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.console import report_failures
from fetalplanes.data.images import list_images
from fetalplanes.engine.metrics import binary_auroc
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.calibration import (
    DEFAULT_SCORE,
    MODEL_SCORES,
    available_scores,
    ood_score,
)
from fetalplanes.inference.outputs import Outputs


def folder_outputs(
    predictor: Any, folder: str | Path, progress: bool = False
) -> tuple[Outputs, list[str]]:
    """Raw outputs of every readable image under `folder` (the one streaming path), and
    the unreadable ones' messages."""
    paths = list_images([Path(folder)])
    if not paths:
        raise FetalPlanesError(f"{folder}: no images found for --ood")
    parts, failures = [], []
    for p in predictor.predict_paths(
        paths, progress=progress, keep_outputs=True, desc="scoring OOD images"
    ):
        if p.ok:
            parts.append(p.outputs)
        else:
            failures.append(p.error or "unreadable")
    if failures:
        report_failures(failures)
    if not parts:
        raise FetalPlanesError(f"{folder}: no readable images for --ood")
    return Outputs.concat(parts), failures


def fpr_at_recall(in_scores: np.ndarray, ood_scores: np.ndarray, recall: float = 0.95) -> float:
    """Share of OOD images accepted by the threshold that keeps `recall` of in-distribution."""
    threshold = np.quantile(in_scores, 1 - recall)
    return float((ood_scores >= threshold).mean())


def compare_scores(
    in_out: Outputs, ood_out: Outputs, temperature: float
) -> dict[str, dict[str, float]]:
    """AUROC and FPR at 95% in-distribution recall for every score (threshold-free view)."""
    out = {}
    for method in available_scores(in_out):
        s_in = ood_score(in_out, temperature, method)
        s_ood = ood_score(ood_out, temperature, method)
        out[method] = {
            "auroc": binary_auroc(s_in, s_ood),
            "fpr_at_95_recall": fpr_at_recall(s_in, s_ood),
        }
    return out


def rejection_report(
    in_out: Outputs, ood_out: Outputs, temperature: float, rejection: dict[str, Any]
) -> dict[str, Any]:
    """AUROC of the stored score and, with a stored threshold, its false-accept rate."""
    method = rejection.get("method", DEFAULT_SCORE)
    if method in MODEL_SCORES and in_out.score is None:
        method = "energy"  # a run saved without its feature bank
    s_in = ood_score(in_out, temperature, method)
    s_ood = ood_score(ood_out, temperature, method)
    report: dict[str, Any] = {
        "score": method,
        "auroc": binary_auroc(s_in, s_ood),
        "n_in": len(s_in),
        "n_ood": len(s_ood),
    }
    if "threshold" in rejection:
        thr = float(rejection["threshold"])
        report |= {
            "threshold": thr,
            "false_accept_rate": float((s_ood >= thr).mean()),
            "in_distribution_recall": float((s_in >= thr).mean()),
            "target_recall": rejection.get("target_recall"),
        }
    else:
        report["note"] = "this model stores no rejection threshold; AUROC only"
    report["by_score"] = compare_scores(in_out, ood_out, temperature)
    return report


def evaluate_ood(
    predictor: Any, in_out: Outputs, ood_dir: str | Path, progress: bool = False
) -> dict[str, Any]:
    """Score the images under `ood_dir` against in-distribution outputs (metrics.json `ood`)."""
    if len(in_out) == 0:
        raise FetalPlanesError("no in-distribution images to compare the OOD folder with")
    ood_out, failures = folder_outputs(predictor, ood_dir, progress)
    card = predictor.card
    report = rejection_report(in_out, ood_out, card.temperature, card.rejection)
    return {"folder": str(ood_dir), **report, "unreadable": failures}


def report_lines(ood: dict[str, Any]) -> list[str]:
    """Markdown lines for report.md."""
    lines = [
        "",
        f"## Out-of-distribution rejection ({ood['n_ood']} images of {ood['folder']})",
        "",
        f"Stored score `{ood['score']}`: AUROC {ood['auroc']:.4f}.",
    ]
    if "threshold" in ood:
        lines.append(
            f"At the stored threshold {ood['threshold']:.4f}: false-accept rate "
            f"{ood['false_accept_rate']:.4f}, in-distribution recall "
            f"{ood['in_distribution_recall']:.4f}."
        )
    lines += ["", "| score | AUROC | FPR at 95% recall |", "| --- | --- | --- |"]
    for name, v in ood["by_score"].items():
        lines.append(f"| {name} | {v['auroc']:.4f} | {v['fpr_at_95_recall']:.4f} |")
    return [*lines, ""]


def summary_line(ood: dict[str, Any]) -> str:
    """One console line."""
    line = f"OOD ({ood['n_ood']} images): {ood['score']} AUROC {ood['auroc']:.4f}"
    if "threshold" in ood:
        line += (
            f" | false-accept {ood['false_accept_rate']:.4f} at in-distribution recall "
            f"{ood['in_distribution_recall']:.4f}"
        )
    return line

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

from fetalplanes.calibration import DEFAULT_SCORE, available_scores, ood_score
from fetalplanes.console import report_failures
from fetalplanes.errors import FetalPlanesError
from fetalplanes.images import list_images
from fetalplanes.loading import iter_batches
from fetalplanes.metrics import binary_auroc


def folder_logits(
    predictor: Any, folder: str | Path, progress: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Logits of every readable image under `folder`, and the unreadable ones' messages."""
    from tqdm import tqdm

    paths = list_images([Path(folder)])
    if not paths:
        raise FetalPlanesError(f"{folder}: no images found for --ood")
    parts, failures = [], []
    bar = tqdm(total=len(paths), desc="scoring OOD images", unit="img", disable=not progress)
    for batch in iter_batches(paths, predictor.pp, batch_size=64):
        failures.extend(m for _, m in batch.failures)
        if batch.indices:
            parts.append(predictor.backend.logits(batch.arrays))
        bar.update(len(batch.indices) + len(batch.failures))
    bar.close()
    if failures:
        report_failures(failures)
    if not parts:
        raise FetalPlanesError(f"{folder}: no readable images for --ood")
    return np.concatenate(parts), failures


def fpr_at_recall(in_scores: np.ndarray, ood_scores: np.ndarray, recall: float = 0.95) -> float:
    """Share of OOD images accepted by the threshold that keeps `recall` of in-distribution."""
    threshold = np.quantile(in_scores, 1 - recall)
    return float((ood_scores >= threshold).mean())


def compare_scores(
    in_logits: np.ndarray,
    ood_logits: np.ndarray,
    temperature: float,
    n_classes: int | None = None,
) -> dict[str, dict[str, float]]:
    """AUROC and FPR at 95% in-distribution recall for every score (threshold-free view).

    `in_logits`/`ood_logits` are raw outputs (see `calibration.split_outputs`)."""
    out = {}
    for method in available_scores(in_logits, n_classes):
        s_in = ood_score(in_logits, temperature, method, n_classes)
        s_ood = ood_score(ood_logits, temperature, method, n_classes)
        out[method] = {
            "auroc": binary_auroc(s_in, s_ood),
            "fpr_at_95_recall": fpr_at_recall(s_in, s_ood),
        }
    return out


def rejection_report(
    in_logits: np.ndarray,
    ood_logits: np.ndarray,
    temperature: float,
    rejection: dict[str, Any],
    n_classes: int | None = None,
) -> dict[str, Any]:
    """AUROC of the stored score and, with a stored threshold, its false-accept rate."""
    method = rejection.get("method", DEFAULT_SCORE)
    if method not in available_scores(in_logits, n_classes):
        method = "energy"
    s_in = ood_score(in_logits, temperature, method, n_classes)
    s_ood = ood_score(ood_logits, temperature, method, n_classes)
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
    report["by_score"] = compare_scores(in_logits, ood_logits, temperature, n_classes)
    return report


def evaluate_ood(
    predictor: Any, in_logits: np.ndarray, ood_dir: str | Path, progress: bool = False
) -> dict[str, Any]:
    """Score the images under `ood_dir` against in-distribution logits (metrics.json `ood`)."""
    if len(in_logits) == 0:
        raise FetalPlanesError("no in-distribution images to compare the OOD folder with")
    ood_logits, failures = folder_logits(predictor, ood_dir, progress)
    card = predictor.card
    report = rejection_report(
        in_logits, ood_logits, card.temperature, card.rejection, len(predictor.classes)
    )
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

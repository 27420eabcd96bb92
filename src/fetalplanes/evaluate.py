"""Evaluation on held-out patients: metrics.json, confusion matrix, reliability diagram, report.

By default a run is evaluated on the test patients its sidecar recorded, read
from the data folder it was trained on; another data folder is evaluated whole.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.calibration import calibrated_probs
from fetalplanes.console import info, report_failures, warn
from fetalplanes.data import LabelledData, Sample, Split, load_dataset
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference import Predictor
from fetalplanes.loading import iter_batches
from fetalplanes.metrics import classification_metrics, reliability_bins
from fetalplanes.plots import confusion_matrix_plot, reliability_diagram

#: Scalar metrics shown in reports and summarised across cross-validation folds.
HEADLINE_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "weighted_f1",
    "cohen_kappa",
    "macro_auroc",
    "loss",
    "ece",
    "ece_uncalibrated",
    "brier",
)


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    out: Path | None


def select_samples(
    predictor: Predictor, data_root: str | Path | None, split: str, labels: str | Path | None = None
) -> tuple[list[Sample], LabelledData, str]:
    """The images to evaluate and a description of where they came from."""
    card = predictor.card
    recorded = card.data.get("root")
    same = data_root is None or (
        recorded is not None and Path(data_root).resolve() == Path(recorded)
    )
    root = data_root if data_root is not None else recorded
    if root is None:
        raise FetalPlanesError("this run records no data folder; pass DATA")
    if not Path(root).exists():
        raise FetalPlanesError(f"{root}: data folder not found (recorded in the run); pass DATA")
    lab = labels if labels is not None else (card.data.get("labels_file") if same else None)
    data = load_dataset(root, lab, card.preset or "seed4")
    _check_classes(data, predictor)
    if split == "all" or not same:
        if split not in ("all", "test") and not same:
            warn(f"--split {split} applies to the training data only; evaluating all of {root}")
        return data.samples, data, f"all {len(data.samples)} images of {root}"
    if data.fingerprint() != card.data.get("fingerprint"):
        warn(
            f"{root} changed since training (fingerprint differs); the recorded split still "
            "applies by patient id"
        )
    patients = Split.from_dict(card.split).of(split)
    samples = data.subset(patients)
    if not samples:
        raise FetalPlanesError(f"no images of the {split} patients found in {root}")
    return samples, data, f"{split} split: {len(patients)} held-out patients of {root}"


def _check_classes(data: LabelledData, predictor: Predictor) -> None:
    if list(data.classes) != list(predictor.classes):
        raise FetalPlanesError(
            f"data classes {data.classes} differ from the model's {predictor.classes}"
        )


def collect_logits(
    predictor: Predictor, samples: list[Sample], progress: bool
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Logits for the readable samples, their indices, and the failures."""
    from tqdm import tqdm

    parts, ok, failures = [], [], []
    paths = [s.path for s in samples]
    bar = tqdm(total=len(paths), desc="evaluating", unit="img", disable=not progress)
    for batch in iter_batches(paths, predictor.pp, batch_size=64):
        failures.extend(batch.failures)
        if batch.indices:
            parts.append(predictor.backend.logits(batch.arrays))
            ok.extend(batch.indices)
        bar.update(len(batch.indices) + len(batch.failures))
    bar.close()
    logits = np.concatenate(parts) if parts else np.zeros((0, len(predictor.classes)))
    return logits, ok, failures


def evaluate(
    run: str | Path,
    data_root: str | Path | None = None,
    *,
    split: str = "test",
    out: str | Path | None = None,
    labels: str | Path | None = None,
    backend: str = "torch",
    tta: bool = False,
    progress: bool = True,
    predictor: Predictor | None = None,
    ood: str | Path | None = None,
) -> EvalResult:
    """Compute and write metrics for a run on held-out patients (or another data set).

    `ood`: a folder of out-of-distribution images; metrics.json gets `ood` with the AUROC
    and false-accept rate of the stored not-target rule against the evaluated images.
    """
    predictor = predictor or Predictor.from_run(run, backend=backend, tta=tta)
    samples, data, where = select_samples(predictor, data_root, split, labels)
    logits, ok, failures = collect_logits(predictor, samples, progress)
    if failures:
        report_failures(failures)
    if not ok:
        raise FetalPlanesError("no readable images to evaluate")
    y = np.array([data.classes.index(samples[i].label) for i in ok])
    card = predictor.card
    n = len(card.classes)
    probs = calibrated_probs(logits[:, :n], card.temperature)
    raw = calibrated_probs(logits[:, :n], 1.0)
    metrics = classification_metrics(probs, y, card.classes)
    metrics |= {
        "evaluated_on": where,
        "split": split,
        "n_patients": len({samples[i].patient for i in ok}),
        "unreadable": [m for _, m in failures],
        "temperature": card.temperature,
        "ece_uncalibrated": classification_metrics(raw, y, card.classes)["ece"],
        "loss_uncalibrated": classification_metrics(raw, y, card.classes)["loss"],
        "architecture": card.architecture,
        "tta": tta,
    }
    if ood is not None:
        from fetalplanes.ood import evaluate_ood

        metrics["ood"] = evaluate_ood(predictor, logits, ood, progress)
    out_dir = Path(out) if out is not None else Path(run) / f"eval-{split}"
    write_outputs(out_dir, metrics, probs, raw, y, [samples[i] for i in ok], card.classes)
    print_summary(metrics, out_dir)
    return EvalResult(metrics, out_dir)


def write_outputs(
    out: Path,
    metrics: dict[str, Any],
    probs: np.ndarray,
    raw: np.ndarray,
    y: np.ndarray,
    samples: list[Sample],
    classes: list[str],
) -> None:
    """metrics.json, predictions.csv, confusion_matrix.png, reliability.png, report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "true", "predicted", "confidence", *classes])
        for s, p in zip(samples, probs, strict=True):
            w.writerow(
                [
                    s.path,
                    s.patient,
                    s.label,
                    classes[int(p.argmax())],
                    f"{p.max():.6f}",
                    *(f"{v:.6f}" for v in p),
                ]
            )
    confusion_matrix_plot(
        metrics["confusion_matrix"],
        classes,
        out / "confusion_matrix.png",
        title=f"confusion matrix ({metrics['evaluated_on']})"[:90],
    )
    reliability_diagram(
        reliability_bins(raw, y),
        reliability_bins(probs, y),
        out / "reliability.png",
        metrics["ece_uncalibrated"],
        metrics["ece"],
    )
    (out / "report.md").write_text(markdown_report(metrics))


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def markdown_report(m: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation of {m['architecture']}",
        "",
        f"Evaluated on: {m['evaluated_on']} ({m['n_images']} images, {m['n_patients']} patients).",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key in (*HEADLINE_METRICS, "temperature"):
        lines.append(f"| {key} | {_fmt(m.get(key))} |")
    lines += [
        "",
        "| class | precision | recall | f1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c, v in m["per_class"].items():
        lines.append(
            f"| {c} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
        )
    lines += [
        "",
        "Confusion matrix (rows true, columns predicted): `confusion_matrix.png`.",
        "Reliability diagram: `reliability.png`.",
        "",
    ]
    if m.get("unreadable"):
        lines += [f"Unreadable files skipped: {len(m['unreadable'])}.", ""]
    if m.get("ood"):
        from fetalplanes.ood import report_lines

        lines += report_lines(m["ood"])
    return "\n".join(lines)


def print_summary(m: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    from fetalplanes.console import err

    info(f"evaluated on {m['evaluated_on']}: {m['n_images']} images")
    t = Table("class", "precision", "recall", "f1", "support")
    for c, v in m["per_class"].items():
        t.add_row(
            c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])
        )
    err.print(t)
    info(
        f"accuracy {m['accuracy']:.4f} | balanced accuracy {m['balanced_accuracy']:.4f} | "
        f"macro F1 {m['macro_f1']:.4f} | loss {m['loss']:.4f} | ECE {m['ece']:.4f} "
        f"(uncalibrated {m['ece_uncalibrated']:.4f})"
    )
    if m.get("ood"):
        from fetalplanes.ood import summary_line

        info(summary_line(m["ood"]))
    info(f"written to {out}/ (metrics.json, report.md, confusion_matrix.png, reliability.png)")

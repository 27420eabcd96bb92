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

from fetalplanes.console import info, report_failures, warn
from fetalplanes.data.datasets import LabelledData, Sample, Split, load_dataset
from fetalplanes.engine.metrics import classification_metrics, reliability_bins
from fetalplanes.engine.plots import confusion_matrix_plot, reliability_diagram, risk_coverage_plot
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.calibration import calibrated_probs
from fetalplanes.inference.outputs import Outputs
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import Prediction, columns
from fetalplanes.models.card import SIDECAR, load_card, save_card

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
) -> tuple[list[Sample], LabelledData, str, bool]:
    """The images to evaluate, their data set, where they came from, and whether that is
    the run's own training data."""
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
        return data.samples, data, f"all {len(data.samples)} images of {root}", same
    if data.fingerprint() != card.data.get("fingerprint"):
        warn(
            f"{root} changed since training (fingerprint differs); the recorded split still "
            "applies by patient id"
        )
    patients = Split.from_dict(card.split).of(split)
    samples = data.subset(patients)
    if not samples:
        raise FetalPlanesError(f"no images of the {split} patients found in {root}")
    return samples, data, f"{split} split: {len(patients)} held-out patients of {root}", True


def _check_classes(data: LabelledData, predictor: Predictor) -> None:
    if list(data.classes) != list(predictor.classes):
        raise FetalPlanesError(
            f"data classes {data.classes} differ from the model's {predictor.classes}"
        )


@dataclass
class Collected:
    """The readable samples' predictions (with raw outputs), and the unreadable ones."""

    predictions: list[Prediction]
    outputs: Outputs
    ok: list[int]
    failures: list[tuple[int, str]]


def collect(predictor: Predictor, samples: list[Sample], progress: bool) -> Collected:
    """Predict every sample through the one streaming path, keeping the raw outputs."""
    preds, ok, failures = [], [], []
    stream = predictor.predict_paths(
        [s.path for s in samples], progress=progress, keep_outputs=True, desc="evaluating"
    )
    for i, p in enumerate(stream):
        if p.ok:
            preds.append(p)
            ok.append(i)
        else:
            failures.append((i, p.error or "unreadable"))
    outputs = Outputs.concat([p.outputs for p in preds], len(predictor.classes))
    return Collected(preds, outputs, ok, failures)


def rejection_metrics(preds: list[Prediction], probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """How often the model abstains (not_target) at the stored threshold, and how good it is
    on what it accepts. `risk_coverage` sorts by confidence for the selective-risk curve."""
    accepted = np.array([not p.not_target for p in preds], bool)
    correct = probs.argmax(axis=1) == y
    n_acc = int(accepted.sum())
    order = np.argsort(-probs.max(axis=1), kind="stable")
    cum = np.cumsum(correct[order])
    n = np.arange(1, len(order) + 1)
    return {
        "rejection_rate": float(1 - accepted.mean()) if len(y) else 0.0,
        "coverage": float(accepted.mean()) if len(y) else 0.0,
        "accuracy_accepted": float(correct[accepted].mean()) if n_acc else None,
        "n_rejected": int(len(y) - n_acc),
        "uncertain_rate": float(np.mean([p.uncertain for p in preds])) if preds else 0.0,
        "risk_coverage": {
            "coverage": [round(float(v), 6) for v in n / len(order)],
            "risk": [round(float(v), 6) for v in 1 - cum / n],
        },
    }


def default_out(run: Path, split: str, data_root: str | Path | None, same: bool) -> Path:
    """RUN/eval-SPLIT for the run's own data; RUN/eval-<data name>[-N] for other data,
    never an existing folder, so an evaluation is never replaced by another."""
    if same:
        return run / f"eval-{split}"
    name = Path(data_root or "data").resolve().name or "data"
    for i in range(1, 10_000):
        p = run / (f"eval-{name}" if i == 1 else f"eval-{name}-{i}")
        if not p.exists():
            return p
    raise FetalPlanesError(f"{run}: too many evaluations of {name}")


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
    samples, data, where, same = select_samples(predictor, data_root, split, labels)
    got = collect(predictor, samples, progress)
    failures = got.failures
    if failures:
        report_failures(failures)
    if not got.ok:
        raise FetalPlanesError("no readable images to evaluate")
    ok = got.ok
    y = np.array([data.classes.index(samples[i].label) for i in ok])
    card = predictor.card
    probs = calibrated_probs(got.outputs.logits, card.temperature)
    raw = calibrated_probs(got.outputs.logits, 1.0)
    metrics = classification_metrics(probs, y, card.classes)
    metrics["rejection"] = rejection_metrics(got.predictions, probs, y)
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
        from fetalplanes.engine.ood import evaluate_ood

        metrics["ood"] = evaluate_ood(predictor, got.outputs, ood, progress)
    out_dir = Path(out) if out is not None else default_out(Path(run), split, data_root, same)
    write_outputs(out_dir, metrics, probs, raw, y, [samples[i] for i in ok], got.predictions,
                  card.classes)
    if same and split == "test" and out is None and (Path(run) / SIDECAR).is_file():
        record_test_metrics(Path(run), metrics)
    print_summary(metrics, out_dir)
    return EvalResult(metrics, out_dir)


def record_test_metrics(run: Path, metrics: dict[str, Any]) -> None:
    """Keep the held-out test headline in the sidecar, so the server and `models` show the
    number that matters rather than the validation one."""
    card = load_card(run)
    card.metrics["test"] = {
        k: metrics[k]
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "n_images", "n_patients")
        if k in metrics
    } | {"coverage": metrics["rejection"]["coverage"]}
    save_card(run, card)


def write_outputs(
    out: Path,
    metrics: dict[str, Any],
    probs: np.ndarray,
    raw: np.ndarray,
    y: np.ndarray,
    samples: list[Sample],
    preds: list[Prediction],
    classes: list[str],
) -> None:
    """metrics.json, predictions.csv, confusion_matrix.png, reliability.png,
    risk_coverage.png, report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["true_label", "patient", *columns(classes)])
        w.writeheader()
        for s, p in zip(samples, preds, strict=True):
            w.writerow({"true_label": s.label, "patient": s.patient, **p.to_row(classes)})
    rc = metrics["rejection"]["risk_coverage"]
    risk_coverage_plot(rc["coverage"], rc["risk"], metrics["rejection"]["coverage"],
                       out / "risk_coverage.png")
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
        *rejection_lines(m["rejection"]),
    ]
    if m.get("unreadable"):
        lines += [f"Unreadable files skipped: {len(m['unreadable'])}.", ""]
    if m.get("ood"):
        from fetalplanes.engine.ood import report_lines

        lines += report_lines(m["ood"])
    return "\n".join(lines)


def rejection_lines(r: dict[str, Any]) -> list[str]:
    """Markdown lines: abstention at the stored threshold and accuracy on what is kept."""
    acc = "n/a" if r["accuracy_accepted"] is None else f"{r['accuracy_accepted']:.4f}"
    return [
        "## Rejection at the stored threshold",
        "",
        f"Rejected as not a target plane: {r['n_rejected']} ({r['rejection_rate']:.2%}); "
        f"coverage {r['coverage']:.4f}; accuracy on accepted images {acc}. "
        "Risk-coverage curve: `risk_coverage.png`.",
        "",
    ]


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
    r = m["rejection"]
    acc = "n/a" if r["accuracy_accepted"] is None else f"{r['accuracy_accepted']:.4f}"
    info(
        f"rejected {r['n_rejected']} as not a target plane (coverage {r['coverage']:.4f}); "
        f"accuracy on accepted {acc}"
    )
    if m.get("ood"):
        from fetalplanes.engine.ood import summary_line

        info(summary_line(m["ood"]))
    info(f"written to {out}/ (metrics.json, report.md, predictions.csv and figures)")

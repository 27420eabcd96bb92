"""Evaluation on held-out patients: metrics.json, confusion matrix, reliability diagram, report.

By default a run is evaluated on the test patients its sidecar recorded, read
from the data folder it was trained on; another data folder is evaluated whole
(external validation): its classes are matched to the run's by name, and when its
label file records sites, machines or operators the metrics are broken down by them.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from fetalplanes.console import info, report_failures, warn
from fetalplanes.data.datasets import (
    META_KEYS,
    LabelledData,
    Sample,
    Split,
    canonical_plane,
    load_dataset,
)
from fetalplanes.engine.metrics import (
    classification_metrics,
    expected_calibration_error,
    nll,
    reliability_bins,
)
from fetalplanes.engine.plots import confusion_matrix_plot, reliability_diagram, risk_coverage_plot
from fetalplanes.errors import FetalPlanesError, NoInputError
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
    predictor: Predictor,
    data_root: str | Path | None,
    split: str,
    labels: str | Path | None = None,
    preset: str | None = None,
) -> tuple[list[Sample], LabelledData, str, bool]:
    """The images to evaluate, their data set, where they came from, and whether that is
    the run's own training data. `preset` reads the data under another preset than the
    run's."""
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
    data = load_dataset(root, lab, preset or card.preset or "seed4")
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
        raise NoInputError(f"no images of the {split} patients found in {root}")
    return samples, data, f"{split} split: {len(patients)} held-out patients of {root}", True


@dataclass(frozen=True)
class ClassMap:
    """The classes evaluated (the data's) and the model output of each, matched by name.

    The model may have more classes than the data (a 6-class fpdb6 run on the 4-class
    African data); predicting one of those is an error, counted in `predicted_outside_data`.
    """

    data_classes: list[str]
    run_classes: list[str]
    run_index: dict[str, int]  # data class -> index of the model's output

    @property
    def identical(self) -> bool:
        return self.data_classes == self.run_classes

    @property
    def outside(self) -> list[int]:
        """Indices of the model's classes that the data lacks."""
        inside = set(self.run_index.values())
        return [i for i in range(len(self.run_classes)) if i not in inside]


def map_classes(
    data: LabelledData, run_classes: list[str], samples: list[Sample], same: bool
) -> ClassMap:
    """Match the data's classes to the model's by name (ignoring case and common aliases).

    The run's own data is evaluated on all its classes; other data on the classes it
    holds, so a class it has no image of does not dilute macro averages. A data class
    the model cannot predict is an error naming it.
    """
    run_classes = list(run_classes)
    present = {s.label for s in samples}
    data_classes = [c for c in data.classes if same or c in present]
    index: dict[str, int] = {}
    lacking: list[str] = []
    for c in data_classes:
        match = canonical_plane(c, run_classes)
        if match is None:
            lacking.append(c)
        else:
            index[c] = run_classes.index(match)
    if lacking:
        raise FetalPlanesError(
            f"{data.root}: data class(es) {', '.join(lacking)} are not among the model's "
            f"classes ({', '.join(run_classes)}); read the data with --preset so that they match"
        )
    return ClassMap(data_classes, run_classes, index)


def evaluation_metrics(probs: np.ndarray, y: np.ndarray, cmap: ClassMap) -> dict[str, Any]:
    """Headline metrics over the data's classes; `y` indexes the model's classes.

    Loss, ECE, Brier and AUROC use the model's full probabilities. Accuracy counts a
    prediction of a class the data lacks as wrong; per-class scores, balanced accuracy,
    macro/weighted F1 and the confusion matrix cover the data's classes only.
    """
    if cmap.identical:
        return classification_metrics(probs, y, cmap.run_classes)
    with warnings.catch_warnings():  # balanced accuracy is recomputed below
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        m = classification_metrics(probs, y, cmap.run_classes)
    idx = [cmap.run_index[c] for c in cmap.data_classes]
    pred = probs.argmax(axis=1)
    per_class = {c: m["per_class"][cmap.run_classes[i]] for c, i in zip(
        cmap.data_classes, idx, strict=True)}
    support = np.array([v["support"] for v in per_class.values()], dtype=float)
    f1 = np.array([v["f1"] for v in per_class.values()])
    recall = np.array([v["recall"] for v in per_class.values()])
    cm = np.asarray(m["confusion_matrix"])
    m |= {
        "classes": list(cmap.data_classes),
        "model_classes": list(cmap.run_classes),
        "per_class": per_class,
        "balanced_accuracy": float(recall[support > 0].mean()) if support.any() else 0.0,
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.any() else 0.0,
        "confusion_matrix": cm[np.ix_(idx, idx)].tolist(),
        "predicted_outside_data": {
            cmap.run_classes[j]: int((pred == j).sum()) for j in cmap.outside
        },
    }
    return m


#: Sample metadata key -> metrics.json key of its breakdown.
GROUP_KEYS: dict[str, str] = {k: f"by_{k}" for k in META_KEYS}
NOT_RECORDED = "(not recorded)"


def group_metrics(
    samples: list[Sample], pred: np.ndarray, y: np.ndarray
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per site/machine/operator: images, patients, accuracy, balanced accuracy, macro F1.

    A group's balanced accuracy and macro F1 average over the classes it holds (a centre
    without thorax images is not scored on thorax recall); predicting a class the group
    lacks still counts as an error.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, name in GROUP_KEYS.items():
        values = [s.meta.get(key, NOT_RECORDED) for s in samples]
        if all(v == NOT_RECORDED for v in values):
            continue
        groups: dict[str, dict[str, Any]] = {}
        for value in sorted(set(values)):
            mask = np.array([v == value for v in values])
            patients = {s.patient for s, keep in zip(samples, mask, strict=True) if keep}
            groups[value] = _group_scores(y[mask], pred[mask]) | {"n_patients": len(patients)}
        out[name] = groups
    return out


def _group_scores(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    present = sorted(set(y.tolist()))
    recalls = [float((pred[y == c] == c).mean()) for c in present]
    return {
        "n_images": len(y),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "macro_f1": float(
            f1_score(y, pred, labels=present, average="macro", zero_division=0)
        ) if present else 0.0,
        "classes_present": len(present),
    }


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
    """RUN/eval-SPLIT for the run's own data; RUN/eval-<data name>[-N] for other data;
    runs/eval/<model>-<data name>[-N] for a model that is not a run folder (a pretrained
    name, an .onnx file). Never an existing folder: no evaluation replaces another."""
    if same:
        return run / f"eval-{split}"
    name = Path(data_root or "data").resolve().name or "data"
    folder, prefix = (run, "eval-") if run.is_dir() else (Path("runs") / "eval", f"{run.stem}-")
    for i in range(1, 10_000):
        p = folder / (f"{prefix}{name}" if i == 1 else f"{prefix}{name}-{i}")
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
    preset: str | None = None,
) -> EvalResult:
    """Compute and write metrics for a run on held-out patients (or another data set).

    Other data is evaluated on its own classes, matched to the model's by name (see
    `map_classes`); `preset` reads it under another preset than the run's. Samples with
    site/machine/operator metadata give metrics.json `by_site`/`by_machine`/`by_operator`.
    `ood`: a folder of out-of-distribution images; metrics.json gets `ood` with the AUROC
    and false-accept rate of the stored not-target rule against the evaluated images.
    """
    predictor = predictor or Predictor.from_run(run, backend=backend, tta=tta)
    samples, data, where, same = select_samples(predictor, data_root, split, labels, preset)
    classes = predictor.output_classes  # a zero-shot model's folded planes
    cmap = map_classes(data, classes, samples, same)
    got = collect(predictor, samples, progress)
    failures = got.failures
    if failures:
        report_failures(failures)
    if not got.ok:
        raise FetalPlanesError("no readable images to evaluate")
    ok = got.ok
    evaluated = [samples[i] for i in ok]
    y = np.array([cmap.run_index[s.label] for s in evaluated], dtype=np.int64)
    card = predictor.card
    probs = output_probs(predictor, got.outputs.logits, card.temperature)
    raw = output_probs(predictor, got.outputs.logits, 1.0)
    metrics = evaluation_metrics(probs, y, cmap)
    metrics["rejection"] = rejection_metrics(got.predictions, probs, y)
    metrics |= group_metrics(evaluated, probs.argmax(axis=1), y)
    metrics |= {
        "evaluated_on": where,
        "split": split,
        "n_patients": len({s.patient for s in evaluated}),
        "unreadable": [m for _, m in failures],
        "temperature": card.temperature,
        "ece_uncalibrated": expected_calibration_error(raw, y),
        "loss_uncalibrated": nll(raw, y),
        "architecture": card.architecture,
        "tta": tta,
    }
    if ood is not None:
        from fetalplanes.engine.ood import evaluate_ood

        metrics["ood"] = evaluate_ood(predictor, got.outputs, ood, progress)
    out_dir = Path(out) if out is not None else default_out(Path(run), split, data_root, same)
    write_outputs(out_dir, metrics, probs, raw, y, evaluated, got.predictions, classes)
    if same and split == "test" and out is None and (Path(run) / SIDECAR).is_file():
        record_test_metrics(Path(run), metrics)
    print_summary(metrics, out_dir)
    return EvalResult(metrics, out_dir)


def output_probs(predictor: Predictor, logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities over `predictor.output_classes` (folded for zero-shot)."""
    probs = calibrated_probs(logits, temperature)
    return probs if predictor.fold is None else predictor.fold(probs)[0]


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
    risk_coverage.png, report.md. `classes` are the model's (the probability columns)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    meta = [k for k in META_KEYS if any(k in s.meta for s in samples)]
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["true_label", "patient", *meta, *columns(classes)])
        w.writeheader()
        for s, p in zip(samples, preds, strict=True):
            lead = {"true_label": s.label, "patient": s.patient}
            lead |= {k: s.meta.get(k, "") for k in meta}
            w.writerow(lead | p.to_row(classes))
    rc = metrics["rejection"]["risk_coverage"]
    risk_coverage_plot(rc["coverage"], rc["risk"], metrics["rejection"]["coverage"],
                       out / "risk_coverage.png")
    confusion_matrix_plot(
        metrics["confusion_matrix"],
        metrics["classes"],
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
    if m.get("predicted_outside_data") is not None:
        lines += outside_lines(m)
    for key, name in GROUP_KEYS.items():
        if m.get(name):
            lines += group_table(key, m[name])
    if m.get("unreadable"):
        lines += [f"Unreadable files skipped: {len(m['unreadable'])}.", ""]
    if m.get("ood"):
        from fetalplanes.engine.ood import report_lines

        lines += report_lines(m["ood"])
    return "\n".join(lines)


def outside_lines(m: dict[str, Any]) -> list[str]:
    """Markdown lines: the model's classes the data lacks, and how often they were predicted."""
    counts = m["predicted_outside_data"]
    total = sum(counts.values())
    listed = ", ".join(f"{c} {n}" for c, n in counts.items())
    return [
        "## Classes the data lacks",
        "",
        f"The model has {len(m['model_classes'])} classes; the data {len(m['classes'])}. "
        f"Predictions of the others count as errors: {total} of {m['n_images']} images "
        f"({listed}).",
        "",
    ]


def group_table(key: str, groups: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown table of one breakdown (by site, machine or operator)."""
    lines = [
        f"## By {key}",
        "",
        f"| {key} | images | patients | accuracy | balanced accuracy | macro F1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for value, g in groups.items():
        lines.append(
            f"| {value} | {g['n_images']} | {g['n_patients']} | {g['accuracy']:.4f} | "
            f"{g['balanced_accuracy']:.4f} | {g['macro_f1']:.4f} |"
        )
    lines += [
        "",
        "Balanced accuracy and macro F1 average over the classes each group holds.",
        "",
    ]
    return lines


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
    outside = m.get("predicted_outside_data")
    if outside is not None:
        info(
            f"predicted as classes the data lacks (errors): {sum(outside.values())} "
            f"({', '.join(f'{c} {n}' for c, n in outside.items())})"
        )
    for key, name in GROUP_KEYS.items():
        if m.get(name):
            g = Table(key, "images", "accuracy", "balanced acc.", "macro F1")
            for value, v in m[name].items():
                g.add_row(value, str(v["n_images"]), f"{v['accuracy']:.3f}",
                          f"{v['balanced_accuracy']:.3f}", f"{v['macro_f1']:.3f}")
            err.print(g)
    if m.get("ood"):
        from fetalplanes.engine.ood import summary_line

        info(summary_line(m["ood"]))
    info(f"written to {out}/ (metrics.json, report.md, predictions.csv and figures)")

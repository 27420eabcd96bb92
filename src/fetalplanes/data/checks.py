"""`fetalplanes data check`: what a data set holds and what is wrong with it."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fetalplanes.console import progress as progress_bar
from fetalplanes.data.datasets import (
    META_KEYS,
    LabelledData,
    Split,
    split_by_patient,
    split_counts,
)
from fetalplanes.data.loading import PathDataset
from fetalplanes.data.preprocess import Preprocess


@dataclass
class CheckReport:
    data: LabelledData
    split: Split
    counts: dict[str, dict[str, int]]
    unreadable: list[str] = field(default_factory=list)
    duplicate_files: list[list[str]] = field(default_factory=list)  # groups of identical files

    @property
    def ok(self) -> bool:
        d = self.data
        return not (
            self.unreadable or self.duplicate_files or d.missing or d.unknown or d.duplicate_rows
            or self.design_problems
        )

    @property
    def design_problems(self) -> list[str]:
        """What stops the data from giving an honest model, whatever the files' state: one
        class (nothing to tell apart) or no validation/test patients (nothing held out)."""
        return design_problems(self.data, self.split)

    @property
    def groups(self) -> dict[str, dict[str, int]]:
        """Images per site, machine and operator, for the label files that record them."""
        return group_counts(self.data)

    def to_dict(self) -> dict[str, Any]:
        d = self.data
        return {
            "root": str(d.root),
            "layout": d.layout,
            "labels_file": str(d.labels_file) if d.labels_file else None,
            "preset": d.preset,
            "classes": d.classes,
            "n_images": len(d.samples),
            "n_patients": len(d.patients),
            "patients_per_split": {k: len(self.split.of(k)) for k in ("train", "val", "test")},
            "images_per_class_and_split": self.counts,
            "design_problems": self.design_problems,
            "images_per_group": self.groups,
            "dropped": d.dropped,
            "unknown": d.unknown,
            "missing": d.missing,
            "duplicate_rows": d.duplicate_rows,
            "unreadable": self.unreadable,
            "duplicate_files": self.duplicate_files,
        }


def group_counts(data: LabelledData) -> dict[str, dict[str, int]]:
    """{"site": {"DZA": 90, ...}, ...} for each metadata key any sample carries."""
    out: dict[str, dict[str, int]] = {}
    for key in META_KEYS:
        counts = Counter(s.meta[key] for s in data.samples if key in s.meta)
        if counts:
            out[key] = dict(sorted(counts.items()))
    return out


def design_problems(data: LabelledData, split: Split) -> list[str]:
    """One line per reason the data cannot give an honestly evaluated classifier."""
    problems = []
    present = sorted({s.label for s in data.samples})
    if len(present) < 2:
        only = present[0] if present else "none"
        problems.append(f"only one class has images ({only}); a classifier needs two or more")
    for name, why in (("val", "to choose the epoch and calibrate"),
                      ("test", "to measure the model on held-out patients")):
        if data.samples and not split.of(name):
            problems.append(
                f"no {name} patients ({len(data.patients)} patients in all): nothing is held out "
                f"{why}; add patients"
            )
    return problems


def check_dataset(
    data: LabelledData, seed: int = 0, decode: bool = True, progress: bool = True
) -> CheckReport:
    """Split summary plus unreadable and byte-identical files (decodes every image once)."""
    split = split_by_patient(data.samples, seed=seed)
    report = CheckReport(data, split, split_counts(data, split))
    if not decode:
        return report
    ds = PathDataset([s.path for s in data.samples], Preprocess(size=(8, 8), crop=False))
    groups: dict[str, list[str]] = defaultdict(list)
    for i in progress_bar(range(len(ds)), desc="checking images", unit="img",
                          disable=not progress):
        item = ds[i]
        if item.error:
            report.unreadable.append(item.error)
        if item.digest:
            groups[item.digest].append(str(Path(data.samples[i].path)))
    report.duplicate_files = [g for g in groups.values() if len(g) > 1]
    return report

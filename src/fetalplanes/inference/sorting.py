"""Sort images into one folder per predicted plane, safely.

Guarantees: inputs are only ever read; nothing existing is overwritten (a name
collision with different content gets a `-1`, `-2` ... suffix); each copy appears
atomically (temp file + hard link, so a crash never leaves a half file under a
final name); `predictions.csv` is appended and flushed per image (fsynced at most
every `FSYNC_SECONDS`), and a second run skips images already recorded, so an
interrupted run resumes losslessly: a copy whose journal line was lost to a power
cut is found identical and reused, never duplicated.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fetalplanes.console import info, report_failures
from fetalplanes.data.images import list_images
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import Prediction, columns

JOURNAL = "predictions.csv"
FSYNC_SECONDS = 0.5  # a disk flush per image would cost ~10 ms on a spinning disk
#: The journal is the result schema (`results.columns`) plus where the copy went.
DEST_COLUMN = "destination"


@dataclass
class SortSummary:
    out: Path
    counts: Counter[str] = field(default_factory=Counter)
    copied: int = 0
    skipped_done: int = 0
    failures: list[str] = field(default_factory=list)


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_content(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and _digest(a) == _digest(b)


def safe_copy(src: Path, folder: Path) -> Path:
    """Copy src into folder without overwriting; reuse an identical earlier copy."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = src.stem, src.suffix
    for i in range(100_000):
        dest = folder / (src.name if i == 0 else f"{stem}-{i}{suffix}")
        if dest.exists():
            if _same_content(src, dest):
                return dest  # done by an earlier, interrupted run
            continue
        tmp = folder / f".{dest.name}.{os.getpid()}.partial"
        shutil.copy2(src, tmp)
        try:
            os.link(tmp, dest)  # fails if dest appeared meanwhile: never overwrites
        except FileExistsError:
            continue
        except OSError:  # file systems without hard links
            if dest.exists():
                continue
            os.rename(tmp, dest)
            return dest
        finally:
            if tmp.exists():
                tmp.unlink()
        return dest
    raise FetalPlanesError(f"{folder}: too many files named like {src.name}")


def journal_columns(classes: list[str]) -> list[str]:
    return [*columns(classes), DEST_COLUMN]


def _read_journal(path: Path) -> set[str]:
    """Sources already sorted (journals of 0.1 named the column `source`)."""
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        return {
            row.get("path") or row.get("source") or ""
            for row in csv.DictReader(f)
            if not row.get("error")
        }


def _check_folders(inp: Path, out: Path) -> None:
    if not inp.is_dir():
        raise FetalPlanesError(f"{inp}: input folder not found")
    if inp.resolve() == out.resolve():
        raise FetalPlanesError(f"{out}: output folder must differ from the input folder")
    if inp.resolve() in out.resolve().parents:
        info(f"note: {out} is inside {inp}; its files are excluded from the input")


def sort_images(
    predictor: Predictor,
    input_dir: str | Path,
    out_dir: str | Path,
    min_confidence: float | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
) -> SortSummary:
    """Copy every image under input_dir into out_dir/<predicted plane>/ (see module doc)."""
    inp, out = Path(input_dir), Path(out_dir)
    _check_folders(inp, out)
    if min_confidence is not None:
        predictor.min_confidence = min_confidence
    out_res = out.resolve()
    files = [f for f in list_images([inp]) if out_res not in f.resolve().parents]
    journal = out / JOURNAL
    done = _read_journal(journal)
    todo = [f for f in files if str(f.resolve()) not in done]
    summary = SortSummary(out, skipped_done=len(files) - len(todo))
    if summary.skipped_done:
        info(f"{summary.skipped_done} images already sorted in {out} (skipped)")
    out.mkdir(parents=True, exist_ok=True)
    classes = predictor.output_classes
    new_file = not journal.is_file()
    with open(journal, "a", newline="") as f:
        writer = csv.DictWriter(f, journal_columns(classes), extrasaction="ignore")
        if new_file:
            writer.writeheader()
        synced = time.monotonic()
        for p in predictor.predict_paths(todo, batch_size, workers, progress):
            writer.writerow(_journal_row(p, out, summary, classes))
            f.flush()
            if time.monotonic() - synced > FSYNC_SECONDS:
                os.fsync(f.fileno())
                synced = time.monotonic()
        os.fsync(f.fileno())
    report_failures(summary.failures)
    return summary


def _journal_row(
    p: Prediction, out: Path, summary: SortSummary, classes: list[str]
) -> dict[str, str]:
    """Copy a readable image to its folder; the journal row records source and copy."""
    src = Path(p.path)
    p.path = str(src.resolve())
    if not p.ok:
        summary.failures.append(p.error or "unknown error")
        return p.to_row(classes) | {DEST_COLUMN: ""}
    folder = p.destination
    dest = safe_copy(src, out / folder)
    summary.counts[folder] += 1
    summary.copied += 1
    return p.to_row(classes) | {DEST_COLUMN: str(dest.relative_to(out))}

"""`fetalplanes audit`: which standard views each study holds, its best frames, what is missing.

Inputs (files and folders) are grouped into studies (`group_studies`: DICOM files by their
StudyInstanceUID, each video alone, other images by the folder they were given in; or as
`--study-by` says), every study is classified (`_classify_study`, the one place that calls
the inference API, so the engine behind it can be swapped), its observations fill the
checklist (`workflows.checklist.evaluate_checklist`, pure), and each study gets
`checklist.json`, `report.html` and `best/<item>.png`; the department summary
(`department.json`, `department.html`, `studies.csv`) gives completeness per view and per
operator, machine and site.

Privacy: DICOM headers are read for the study UID, operator, machine and site only; those
are written as salted HMAC-SHA256 pseudonyms (`Pseudonyms`), never as names or UIDs.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes._version import __version__
from fetalplanes.console import info, plural
from fetalplanes.data.images import IMAGE_EXTENSIONS, opencv
from fetalplanes.data.sources import mark_output
from fetalplanes.data.video import natural_key
from fetalplanes.errors import FetalPlanesError, ImageError, NoInputError
from fetalplanes.workflows.checklist import (
    NOT_ASSESSED,
    PRESENT,
    Checklist,
    ChecklistResult,
    Observation,
    check_checklist_fits,
    evaluate_checklist,
    model_views,
)
from fetalplanes.workflows.checklist import (  # moved there (shared); still importable here
    predictor_for_preset as predictor_for_preset,
)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".wmv", ".webm", ".mpg", ".mpeg"}
)
STUDY_BY = ("auto", "folder", "file", "one")
"""auto: DICOM by StudyInstanceUID, each video alone, other images by the folder given;
folder: each folder given (loose files: their folder) is one study, whatever is inside;
file: each file is a study; one: all inputs are one study."""
SALT_ENV = "FETALPLANES_AUDIT_SALT"
SALT_FILE = "salt.txt"
RESEARCH_USE = (
    "Research software, not a medical device: it does not diagnose and must not be used for "
    "clinical decisions. A view marked present means the model recognised it in a frame, not "
    "that the anatomy is normal or the image adequate for measurement."
)
NOT_RECORDED = "not recorded"
UPLOAD_BATCH = 16
"""Uploaded images per network call."""
THUMB_KEEP = 640
"""Longest side of an uploaded image kept in memory for its thumbnail."""
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ------------------------------------------------------------------ pseudonyms
_PREFIX = {"operator": "op", "machine": "mc", "site": "site", "study": "study"}


class Pseudonyms:
    """Salted HMAC-SHA256 of operator, machine and site: the same value gives the same
    pseudonym with the same salt, and nobody without the salt can test a guess."""

    def __init__(self, salt: bytes):
        if len(salt) < 16:
            raise FetalPlanesError("the pseudonym salt must have at least 16 bytes")
        self._salt = salt

    def __call__(self, kind: str, value: str | None) -> str | None:
        text = " ".join((value or "").split()).upper()
        if not text:
            return None
        digest = hmac.new(self._salt, f"{kind}\0{text}".encode(), hashlib.sha256).hexdigest()
        return f"{_PREFIX[kind]}-{digest[:10]}"


def resolve_salt(salt_file: Path | None, out: Path) -> tuple[bytes, str]:
    """The salt and where it came from: `--salt-file` (created with a random salt when it
    does not exist), else $FETALPLANES_AUDIT_SALT, else a new random salt kept in
    OUT/salt.txt (readable by the owner only) for the next audit to reuse."""
    if salt_file is not None:
        if salt_file.exists():
            salt = salt_file.read_bytes().strip()
            return salt, f"from {salt_file}"
        _write_private(salt_file, secrets.token_hex(32))
        return salt_file.read_bytes().strip(), f"new, written to {salt_file}"
    env = os.environ.get(SALT_ENV, "")
    if env:
        return env.encode(), f"from ${SALT_ENV}"
    path = out / SALT_FILE
    _write_private(path, secrets.token_hex(32))
    return path.read_bytes().strip(), f"random, kept in {path} (pass it as --salt-file next time)"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


# ------------------------------------------------------------------ finding inputs
@dataclass
class SourceFile:
    """One input file of a study: a still image, a DICOM (still or cine) or a video.
    `data` holds an upload's bytes (never written to disk); `header` the few DICOM values
    the audit uses (kept in memory only, never written)."""

    name: str
    kind: str  # image | dicom | cine | video
    root: str  # the input it was found under (a folder or the file itself)
    path: Path | None = None
    data: bytes | None = None
    header: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def recording(self) -> bool:
        return self.kind in ("cine", "video")


def _dicom_facts(source: bytes | Path, name: str) -> tuple[int, dict[str, str]]:
    """(frames, {uid, operator, machine, site}) from a DICOM header; nothing else is kept."""
    from fetalplanes.data.dicom import read_header

    ds = read_header(source, name)

    def text(*keywords: str) -> str:
        parts = [str(ds.get(k, "") or "").strip() for k in keywords]
        return " | ".join(p for p in parts if p)

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    operator = text("OperatorsName") or text("PerformingPhysicianName")
    machine = text("Manufacturer", "ManufacturerModelName") or ""
    unit = text("DeviceSerialNumber") or text("StationName")
    header = {
        "uid": text("StudyInstanceUID"),
        "operator": operator,
        "machine": f"{machine} | {unit}" if machine and unit else machine or unit,
        "site": text("InstitutionName"),
    }
    return frames, header


def classify_file(path: Path, root: str, name: str | None = None) -> SourceFile | None:
    """What an input file is (None: not something the audit reads)."""
    label = name or str(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return SourceFile(label, "video", root, path=path)
    from fetalplanes.data.dicom import is_dicom

    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if is_dicom(head, path.name):
        frames, header = _dicom_facts(path, label)
        return SourceFile(label, "cine" if frames > 1 else "dicom", root, path=path,
                          header=header)
    if suffix in IMAGE_EXTENSIONS:
        return SourceFile(label, "image", root, path=path)
    return None


def classify_upload(name: str, data: bytes) -> SourceFile:
    """An uploaded file (kept in memory) as a source: DICOM and video are sniffed, anything
    else is taken as an image (its decoder says when it is not one)."""
    from fetalplanes.data.dicom import is_dicom

    if not data:
        raise ImageError(f"{name}: empty file")
    if is_dicom(data[:4096], name):
        frames, header = _dicom_facts(data, name)
        return SourceFile(name, "cine" if frames > 1 else "dicom", "upload", data=data,
                          header=header)
    if Path(name).suffix.lower() in VIDEO_EXTENSIONS or _looks_like_video(data):
        return SourceFile(name, "video", "upload", data=data)
    return SourceFile(name, "image", "upload", data=data)


def _looks_like_video(data: bytes) -> bool:
    """MP4/MOV (an ftyp or moov box), AVI (RIFF....AVI ) or Matroska/WebM (EBML)."""
    return (data[4:8] in (b"ftyp", b"moov") or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")
            or data[:4] == b"\x1a\x45\xdf\xa3")


def find_sources(inputs: Sequence[str | Path]) -> tuple[list[SourceFile], list[str]]:
    """Every readable study file under `inputs` (folders recursively, natural order,
    hidden files skipped; a file given twice counts once) and one line per input that
    could not be read."""
    sources: list[SourceFile] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for raw in inputs:
        top = Path(raw)
        if top.is_dir():
            for path in _walk(top, problems):
                if _first_time(path, seen):
                    _add(sources, problems, path, str(top))
        elif top.is_file():
            if _first_time(top, seen):
                _add(sources, problems, top, str(top.parent), str(top))
        elif not top.exists():
            problems.append(f"{top}: file not found")
        else:
            problems.append(f"{top}: not a regular file or folder")
    return sources, problems


def _first_time(path: Path, seen: set[Path]) -> bool:
    key = path.resolve()
    if key in seen:
        return False
    seen.add(key)
    return True


def _add(sources: list[SourceFile], problems: list[str], path: Path, root: str,
         name: str | None = None) -> None:
    try:
        found = classify_file(path, root, name)
    except FetalPlanesError as exc:
        problems.append(str(exc))
        return
    if found is not None:
        sources.append(found)


def _walk(top: Path, problems: list[str]) -> Iterator[Path]:
    def failed(exc: OSError) -> None:
        problems.append(f"{exc.filename}: cannot list ({exc.strerror or exc})")

    for folder, dirs, files in os.walk(top, onerror=failed):
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")),
                         key=lambda d: natural_key(Path(d)))
        for name in sorted((f for f in files if not f.startswith(".")),
                           key=lambda f: natural_key(Path(f))):
            path = Path(folder) / name
            if path.is_file():
                yield path


# ------------------------------------------------------------------ studies
@dataclass
class Study:
    """Files examined together. `label` names it in outputs (a pseudonym for a DICOM
    study); operator, machine and site are pseudonyms or None."""

    label: str
    grouping: str
    files: list[SourceFile]
    operator: str | None = None
    machine: str | None = None
    site: str | None = None

    def describe(self) -> str:
        stills = sum(not f.recording for f in self.files)
        recordings = sum(f.recording for f in self.files)
        parts = [plural(stills, "image")] if stills else []
        parts += [plural(recordings, "recording")] if recordings else []
        return ", ".join(parts) or "no files"


def group_studies(sources: Sequence[SourceFile], study_by: str,
                  pseudonyms: Pseudonyms) -> list[Study]:
    """Group source files into studies (see `STUDY_BY`), in the order they were found."""
    if study_by not in STUDY_BY:
        raise FetalPlanesError(f"--study-by must be one of {', '.join(STUDY_BY)} "
                               f"(got {study_by})")
    groups: dict[tuple[str, str], list[SourceFile]] = {}
    for src in sources:
        groups.setdefault(_study_key(src, study_by), []).append(src)
    studies: list[Study] = []
    taken: set[str] = set()
    for (how, key), files in groups.items():
        base = label = _label(how, key, pseudonyms)
        n = 1
        while label in taken:
            n += 1
            label = f"{base}-{n}"
        taken.add(label)
        studies.append(Study(label, _GROUPING[how], files, *_context(files, pseudonyms)))
    return studies


_GROUPING = {
    "uid": "DICOM StudyInstanceUID", "video": "one recording", "folder": "one folder",
    "file": "one file", "one": "all inputs",
}


def _study_key(src: SourceFile, study_by: str) -> tuple[str, str]:
    if study_by == "one":
        return "one", "study"
    if study_by == "file":
        return "file", src.name
    if study_by == "folder":
        return "folder", src.root
    if src.header.get("uid"):
        return "uid", src.header["uid"]
    if src.kind == "video":
        return "video", src.name
    return "folder", src.root


def _label(how: str, key: str, pseudonyms: Pseudonyms) -> str:
    if how == "uid":
        return pseudonyms("study", key) or "study"
    if how == "one":
        return "study"
    stem = Path(key).stem if how in ("file", "video") else Path(key).name
    return _SAFE.sub("_", stem).strip("._") or "study"


def _context(files: Sequence[SourceFile],
             pseudonyms: Pseudonyms) -> tuple[str | None, str | None, str | None]:
    """The most common operator, machine and site of a study's DICOM files, pseudonymised."""
    out = []
    for kind in ("operator", "machine", "site"):
        values = Counter(f.header.get(kind, "") for f in files if f.header.get(kind))
        out.append(pseudonyms(kind, values.most_common(1)[0][0]) if values else None)
    return out[0], out[1], out[2]


# ------------------------------------------------------------------ classification
@dataclass(frozen=True)
class AuditOptions:
    """How recordings are scanned (the meaning of `fetalplanes scan`'s options)."""

    every: int = 1
    window: int = 5
    batch_size: int = 8
    fps: float | None = None
    max_frames: int | None = None
    workers: int | None = None  # decode processes (0: in this process, as a server does)


@dataclass
class Recording:
    """What the report needs of one scanned recording."""

    source: str
    kind: str
    fps: float
    every: int
    frames_scanned: int
    duration_s: float


@dataclass
class StudyScan:
    """A study's classification: observations in input order and what the report shows."""

    observations: list[Observation]
    model_views: list[str]
    recordings: list[Recording] = field(default_factory=list)
    thumbs: dict[tuple[str, int | None], np.ndarray] = field(default_factory=dict, repr=False)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def frames(self) -> int:
        return len(self.observations)


def _classify_study(predictor: Any, study: Study, options: AuditOptions,
                    progress: bool = False) -> StudyScan:
    """Classify a study through the one engine (`Predictor.stream`): still images (files or
    uploads; a single-frame DICOM cropped to its declared region by the engine's rule) as
    items, recordings (video, DICOM cine) through `workflows.scan`, whose smoothed labels
    become the observations. Returns observations in input order, the recordings' facts
    and the pixels of candidate best frames (a still on disk is re-read later; an upload's
    frame and a recording's best frames are kept)."""
    from contextlib import ExitStack

    from fetalplanes.data.sources import file_source, iter_items, load, open_source, upload_source
    from fetalplanes.workflows.scan import scan

    start = time.perf_counter()
    out = StudyScan([], model_views(predictor))
    stills = [f for f in study.files if not f.recording]
    with ExitStack() as stack:
        sources = [upload_source(f.data, f.name, stack) if f.data is not None
                   else file_source(f.path, f.name) for f in stills]
        stream = predictor.stream(iter_items(sources), batch_size=UPLOAD_BATCH,
                                  workers=options.workers, expected=len(sources),
                                  progress=progress, desc=f"{study.label}: images")
        for f, result in zip(stills, stream, strict=True):
            _still(out, f.name, result.prediction)
            if f.data is not None and result.prediction.ok:  # no file to re-read later
                out.thumbs[(f.name, None)] = _shrink(load(result.item).cropped(), THUMB_KEEP)
        for f in (f for f in study.files if f.recording):
            try:
                source = (stack.enter_context(_upload(f)) if f.data is not None
                          else open_source(f.path, options.fps))
                result = _scan(scan, predictor, source, options, progress)
            except ImageError as exc:
                out.failures.append(str(exc))
                continue
            out.recordings.append(Recording(f.name, result.kind, result.fps, result.every,
                                            len(result.rows), result.duration_s))
            for row in result.rows:
                out.observations.append(Observation(
                    f.name, row.label,
                    float(row.prediction.probs.get(row.label, row.confidence)),
                    frame=row.frame, time_s=row.time_s, not_target=row.not_target,
                    uncertain=row.uncertain, frame_rejected=row.prediction.not_target))
            for best in result.best.values():
                out.thumbs[(f.name, best.frame)] = best.pixels
    out.seconds = time.perf_counter() - start
    return out


def _upload(f: SourceFile) -> Any:
    from fetalplanes.data.sources import open_upload

    return open_upload(f.data or b"", f.name)


def _scan(scan: Any, predictor: Any, source: Any, options: AuditOptions, progress: bool) -> Any:
    return scan(predictor, source, every=options.every, window=options.window,
                batch_size=options.batch_size, max_frames=options.max_frames,
                progress=progress, workers=options.workers)


def _still(out: StudyScan, name: str, pred: Any) -> None:
    if pred.error:
        out.failures.append(pred.error)
        return
    out.observations.append(Observation(name, pred.label, float(pred.confidence),
                                        not_target=pred.not_target, uncertain=pred.uncertain,
                                        frame_rejected=pred.not_target))


def _shrink(gray: np.ndarray, max_side: int) -> np.ndarray:
    """A smaller copy for keeping in memory (an upload's frame, kept for its thumbnail)."""
    if max(gray.shape[:2]) <= max_side:
        return gray
    cv2 = opencv()
    scale = max_side / max(gray.shape[:2])
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def _decode(data: bytes, name: str) -> np.ndarray:
    from fetalplanes.data.images import decode_image

    return decode_image(data, name)


# ------------------------------------------------------------------ one study
@dataclass
class StudyAudit:
    """A study, its classification and its filled checklist."""

    study: Study
    scan: StudyScan
    result: ChecklistResult

    def to_dict(self, model: dict[str, Any] | None = None,
                settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """checklist.json (and the API's answer)."""
        s = self.study
        sources = [{"name": f.name, "kind": f.kind} for f in s.files]
        scanned = {r.source: r for r in self.scan.recordings}
        for src in sources:
            rec = scanned.get(src["name"])
            if rec is not None:
                src |= {"fps": rec.fps, "every": rec.every, "frames_scanned": rec.frames_scanned,
                        "duration_s": round(rec.duration_s, 3)}
        seconds = self.scan.seconds
        return {
            "fetalplanes_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "research_use": RESEARCH_USE,
            "study": {"id": s.label, "grouped_by": s.grouping, "sources": sources,
                      "operator": s.operator, "machine": s.machine, "site": s.site},
            "model": model or {},
            "settings": settings or {},
            **self.result.to_dict(),
            "failures": list(self.scan.failures),
            "timing": {"seconds": round(seconds, 3), "observations": self.scan.frames,
                       "frames_per_second": round(self.scan.frames / seconds, 2)
                       if seconds > 0 else None},
        }


def audit_study(predictor: Any, study: Study, checklist: Checklist,
                options: AuditOptions = AuditOptions(), progress: bool = False) -> StudyAudit:
    """Classify a study and fill the checklist."""
    scan = _classify_study(predictor, study, options, progress)
    return StudyAudit(study, scan, evaluate_checklist(checklist, scan.observations,
                                                      scan.model_views))


def best_pixels(audit: StudyAudit) -> dict[str, np.ndarray]:
    """item id -> the grey pixels of its best frame: a still is re-read from its file, a
    recording's frame comes from the scan (re-read from the file only in the rare case the
    checklist's choice differs from the scan's)."""
    wanted: dict[tuple[str, int | None], list[str]] = {}
    for r in audit.result.items:
        if r.best is not None:
            wanted.setdefault((r.best.source, r.best.frame), []).append(r.item.id)
    files = {f.name: f for f in audit.study.files}
    out: dict[str, np.ndarray] = {}
    missing: dict[str, set[int]] = {}
    for (source, frame), ids in wanted.items():
        gray = audit.scan.thumbs.get((source, frame))
        if gray is None and frame is None and files[source].path is not None:
            gray = _read_still(files[source])
        if gray is None and frame is not None:
            missing.setdefault(source, set()).add(frame)
            continue
        if gray is not None:
            out |= dict.fromkeys(ids, gray)
    for source, frames in missing.items():
        for frame, gray in _read_frames(files[source], frames).items():
            out |= dict.fromkeys(wanted[(source, frame)], gray)
    return out


def _read_still(src: SourceFile) -> np.ndarray | None:
    from fetalplanes.data.loading import read_item

    try:
        return read_item(str(src.path))[0]
    except ImageError:
        return None


def _read_frames(src: SourceFile, frames: set[int]) -> dict[int, np.ndarray]:
    """Frames of a recording on disk, in one pass up to the last one wanted."""
    from fetalplanes.data.sources import open_source

    if src.path is None:
        return {}
    got: dict[int, np.ndarray] = {}
    try:
        for index, _, gray in open_source(src.path).frames():
            if index in frames:
                got[index] = gray
            if index >= max(frames):
                break
    except ImageError:
        pass
    return got


# ------------------------------------------------------------------ writing
def study_folder_name(label: str) -> str:
    return _SAFE.sub("_", label).strip("._") or "study"


def png_bytes(gray: np.ndarray, max_side: int | None = None) -> bytes:
    """PNG of a grey frame, scaled down to `max_side` pixels when given (thumbnails)."""
    if max_side is not None:
        gray = _shrink(gray, max_side)
    ok, buf = opencv().imencode(".png", gray)
    if not ok:
        raise FetalPlanesError("cannot encode a best frame as PNG")
    return buf.tobytes()


def write_study(audit: StudyAudit, folder: Path, model: dict[str, Any],
                settings: dict[str, Any]) -> dict[str, Path]:
    """checklist.json, report.html and best/<item id>.png for one study in `folder`."""
    from fetalplanes.workflows.report import study_report

    folder.mkdir(parents=True, exist_ok=False)
    pixels = best_pixels(audit)
    files: dict[str, Path] = {}
    if pixels:
        (folder / "best").mkdir()
    for item_id, gray in pixels.items():
        path = folder / "best" / f"{study_folder_name(item_id)}.png"
        path.write_bytes(png_bytes(gray))
        files[item_id] = path
    data = audit.to_dict(model, settings)
    for item in data["items"]:
        if item["id"] in files:
            item["best"]["file"] = f"best/{files[item['id']].name}"
    (folder / "checklist.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    thumbs = {k: png_bytes(v, 320) for k, v in pixels.items()}
    html = study_report(data, audit.scan.observations, thumbs)
    (folder / "report.html").write_text(html, encoding="utf-8")
    return {"checklist.json": folder / "checklist.json", "report.html": folder / "report.html",
            **files}


def department_summary(audits: Sequence[StudyAudit], checklist: Checklist) -> dict[str, Any]:
    """Completeness per checklist item over all studies, and per operator, machine and
    site (pseudonyms; studies without that DICOM attribute grouped as 'not recorded')."""
    per_item = []
    for item in checklist.items:
        results = [a.result.item(item.id) for a in audits]
        assessed = [r for r in results if r.status != NOT_ASSESSED]
        present = sum(r.status == PRESENT for r in assessed)
        per_item.append({
            "id": item.id, "section": item.section, "name": item.name,
            "assessed_studies": len(assessed), "present": present,
            "rate": round(present / len(assessed), 4) if assessed else None,
        })
    groups = {kind: _groups(audits, kind) for kind in ("operator", "machine", "site")}
    return {
        "fetalplanes_version": __version__,
        "research_use": RESEARCH_USE,
        "checklist": {"name": checklist.name, "title": checklist.title,
                      "source": checklist.source},
        "studies": len(audits),
        "complete_studies": sum(a.result.assessed > 0 and not a.result.missing
                                for a in audits),
        "completeness": _mean([a.result.completeness for a in audits]),
        "per_item": per_item,
        "per_study": [_study_row(a) for a in audits],
        "by": groups,
    }


def _mean(values: Iterable[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(sum(got) / len(got), 4) if got else None


def _study_row(a: StudyAudit) -> dict[str, Any]:
    s, r = a.study, a.result
    return {"study": s.label, "grouped_by": s.grouping, "files": len(s.files),
            "observations": a.scan.frames, "assessed": r.assessed, "present": len(r.present),
            "missing": r.missing, "completeness": None if r.completeness is None
            else round(r.completeness, 4),
            "operator": s.operator, "machine": s.machine, "site": s.site,
            "report": f"{study_folder_name(s.label)}/report.html"}


def _groups(audits: Sequence[StudyAudit], kind: str) -> list[dict[str, Any]]:
    by: dict[str, list[StudyAudit]] = {}
    for a in audits:
        by.setdefault(getattr(a.study, kind) or NOT_RECORDED, []).append(a)
    rows = []
    for key, members in sorted(by.items(), key=lambda kv: (kv[0] == NOT_RECORDED, kv[0])):
        rates: dict[str, float | None] = {}
        for item in members[0].result.items:
            got = [m.result.item(item.item.id) for m in members]
            assessed = [g for g in got if g.status != NOT_ASSESSED]
            if assessed:
                rates[item.item.id] = round(
                    sum(g.status == PRESENT for g in assessed) / len(assessed), 4)
        rows.append({"id": key, "studies": len(members),
                     "complete_studies": sum(m.result.assessed > 0 and not m.result.missing
                                             for m in members),
                     "completeness": _mean([m.result.completeness for m in members]),
                     "per_item": rates})
    return rows


def write_department(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    """department.json, department.html and studies.csv in `out`."""
    from fetalplanes.inference.results import safe_cell
    from fetalplanes.workflows.report import department_report

    paths = {name: out / name for name in ("department.json", "department.html", "studies.csv")}
    paths["department.json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    paths["department.html"].write_text(department_report(summary), encoding="utf-8")
    cols = ["study", "grouped_by", "files", "observations", "assessed", "present", "missing",
            "completeness", "operator", "machine", "site", "report"]
    with paths["studies.csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, cols)
        writer.writeheader()
        for row in summary["per_study"]:
            cells = {k: row[k] for k in cols} | {"missing": "; ".join(row["missing"])}
            writer.writerow({k: "" if v is None else safe_cell(str(v)) for k, v in cells.items()})
    return paths


# ------------------------------------------------------------------ the whole audit
@dataclass
class AuditRun:
    """What `run_audit` did: per-study audits, the summary and where everything is."""

    out: Path
    audits: list[StudyAudit]
    summary: dict[str, Any]
    problems: list[str]
    salt: str
    seconds: float


def run_audit(
    inputs: Sequence[str | Path],
    out: Path,
    predictor: Any,
    checklist: Checklist,
    *,
    study_by: str = "auto",
    options: AuditOptions = AuditOptions(),
    salt_file: Path | None = None,
    model: dict[str, Any] | None = None,
    progress: bool = False,
) -> AuditRun:
    """Audit every study under `inputs` into `out` (a new or empty folder) with `predictor`
    as it is (see `predictor_for_preset` to fold a zero-shot model to the checklist's)."""
    start = time.perf_counter()
    check_checklist_fits(checklist, model_views(predictor),
                         str((model or {}).get("name", "the model")))
    sources, problems = find_sources(inputs)
    if not sources:
        raise NoInputError(f"{', '.join(map(str, inputs))}: no images, DICOM files or "
                           "videos found" + (f" ({problems[0]})" if problems else ""))
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "audit")  # input listings skip it
    salt, salt_how = resolve_salt(salt_file, out)
    studies = group_studies(sources, study_by, Pseudonyms(salt))
    settings = {"study_by": study_by, "every": options.every, "window": options.window,
                "min_confidence": predictor.min_confidence,
                "preset": predictor.card.preset if predictor.fold is not None else None}
    audits = []
    for n, study in enumerate(studies, 1):
        info(f"study {n}/{len(studies)}: {study.label} ({study.describe()})")
        audit = audit_study(predictor, study, checklist, options, progress)
        write_study(audit, out / study_folder_name(study.label), model or {}, settings)
        problems += audit.scan.failures
        audits.append(audit)
    summary = department_summary(audits, checklist) | {"salt": salt_how}
    write_department(summary, out)
    return AuditRun(out, audits, summary, problems, salt_how, time.perf_counter() - start)


# ------------------------------------------------------------------ uploads (HTTP API)
def audit_uploads(predictor: Any, files: Sequence[tuple[str, bytes]], checklist: Checklist,
                  options: AuditOptions = AuditOptions(),
                  model: dict[str, Any] | None = None) -> dict[str, Any]:
    """One study from uploaded files (held in memory, never written): the checklist.json
    dict plus what a page draws: `thumbnails` (item id -> base64 PNG of its best frame),
    `timelines` (per recording: runs of equal smoothed labels) and `stills` (per image).
    Operator, machine and site are not reported (the server keeps no salt)."""
    import base64

    sources, failures = [], []
    for name, data in files:
        try:
            sources.append(classify_upload(name, data))
        except ImageError as exc:
            failures.append(str(exc))
    study = Study("upload", "one request", sources)
    audit = audit_study(predictor, study, checklist, options)
    audit.scan.failures[:0] = failures
    settings = {"every": options.every, "window": options.window,
                "min_confidence": predictor.min_confidence}
    out = audit.to_dict(model, settings)
    out["thumbnails"] = {k: base64.b64encode(png_bytes(v, 320)).decode("ascii")
                         for k, v in best_pixels(audit).items()}
    out["timelines"] = timeline_runs(audit)
    out["stills"] = [{"source": o.source, "label": o.label, "confidence": round(o.confidence, 6),
                      "not_target": o.not_target, "uncertain": o.uncertain}
                     for o in audit.scan.observations if o.frame is None]
    return out


def timeline_runs(audit: StudyAudit) -> list[dict[str, Any]]:
    """Per recording: its duration and the runs of equal smoothed labels
    (start_s, end_s, label, status: view | uncertain | not_target)."""
    from fetalplanes.workflows.report import label_runs

    out = []
    for rec in audit.scan.recordings:
        obs = [o for o in audit.scan.observations if o.source == rec.source]
        runs = [{"start_s": round(a, 4), "end_s": round(b, 4), "label": label, "status": st}
                for a, b, label, st in label_runs(obs)]
        out.append({"source": rec.source, "duration_s": round(rec.duration_s, 4),
                    "frames": rec.frames_scanned, "runs": runs})
    return out

"""Labelled data sets: reading the layouts, label presets, patient ids, sites and splits.

Every command goes through `load_dataset`, so a data set is interpreted the same
way everywhere, and `split_by_patient` guarantees that no patient's images end up
on both sides of a split (the origin notebook's leakage bug).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fetalplanes.console import warn
from fetalplanes.data.images import IMAGE_EXTENSIONS, is_image_path, read_file
from fetalplanes.errors import LabelFileError

PLANES: tuple[str, ...] = (
    "Fetal abdomen",
    "Fetal brain",
    "Fetal femur",
    "Fetal thorax",
    "Maternal cervix",
    "Other",
)
BRAIN_PLANES: tuple[str, ...] = ("Trans-thalamic", "Trans-cerebellum", "Trans-ventricular")
#: The 13 standard views of the mid-trimester scan that SonoNet-16 recognises, named as a
#: clinician reads them, in the order of an examination (head, face, spine, heart, abdomen,
#: limb). `models.sononet_classes.SONONET_TO_VIEW` maps SonoNet's labels onto them.
VIEWS13: tuple[str, ...] = (
    "Trans-ventricular plane",
    "Trans-cerebellar plane",
    "Lips (coronal)",
    "Facial profile (mid-sagittal)",
    "Spine (sagittal)",
    "Spine (coronal)",
    "Four-chamber view",
    "Left ventricular outflow tract",
    "Right ventricular outflow tract",
    "Three-vessel view",
    "Abdominal circumference plane",
    "Kidneys",
    "Femur length plane",
)
BRAIN_PLANE_VALUES: tuple[str, ...] = (*BRAIN_PLANES, "Other", "Not A Brain")
FPDB_CSV = "FETAL_PLANES_DB_data.csv"
SEED_CSV = "image_label.csv"
#: The African fetal planes data set (Sendra-Balcells et al. 2023, Zenodo 7540448).
AFRICAN_CSV = "African_planes_database.csv"
#: Its file names end `plane0`..`plane3`, in this order.
AFRICAN_PLANES: tuple[str, ...] = PLANES[:4]
PATIENT_RE = re.compile(r"^(Patient\d+)_", re.IGNORECASE)
_PLANE_CODE = re.compile(r"(?:plane)?\s*([0-9])", re.IGNORECASE)
_PLANE_SUFFIX = re.compile(r"plane([0-9])$", re.IGNORECASE)
_AFRICAN_NAME = re.compile(r"^patient0*([0-9]+)_([A-Za-z]+)_", re.IGNORECASE)
#: Label-file columns kept per image (site, machine, operator) for per-group results.
META_COLUMNS: dict[str, str] = {"Center": "site", "US_Machine": "machine", "Operator": "operator"}
META_KEYS: tuple[str, ...] = ("site", "machine", "operator")

# Folder names and spellings users commonly have, mapped to canonical plane names.
_ALIASES: dict[str, str] = {
    "abdomen": "Fetal abdomen",
    "brain": "Fetal brain",
    "head": "Fetal brain",
    "femur": "Fetal femur",
    "thorax": "Fetal thorax",
    "heart": "Fetal thorax",
    "cervix": "Maternal cervix",
    "other": "Other",
}


@dataclass(frozen=True)
class Preset:
    """Which classes to learn and from which label column."""

    name: str
    classes: tuple[str, ...]
    column: str = "Plane"
    only_plane: str | None = None  # keep only rows whose Plane is this (brain3)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "seed4": Preset("seed4", PLANES[:4], description="the four fetal planes of the origin"),
    "fpdb6": Preset("fpdb6", PLANES, description="all six FETAL_PLANES_DB planes"),
    "brain3": Preset(
        "brain3",
        BRAIN_PLANES,
        column="Brain_plane",
        only_plane="Fetal brain",
        description="brain sub-planes of Fetal brain images",
    ),
    "views13": Preset(
        "views13",
        VIEWS13,
        description="the 13 mid-trimester standard views SonoNet-16 recognises (zero-shot "
        "with the bundled model; its Background class is not_target)",
    ),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name with an error listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise LabelFileError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


@dataclass(frozen=True)
class Sample:
    """One labelled image. `meta` holds what the label file says about where it was taken
    (`site`, `machine`, `operator`), so results can be broken down by site."""

    path: Path
    label: str
    patient: str
    subset: str | None = None  # "train"/"test" from FETAL_PLANES_DB's Train column
    meta: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass
class LabelledData:
    """A data set read from disk, with everything that was dropped or wrong in it."""

    root: Path
    layout: str
    labels_file: Path | None
    preset: str
    classes: list[str]
    samples: list[Sample]
    dropped: dict[str, int] = field(default_factory=dict)  # known planes outside the preset
    unknown: dict[str, int] = field(default_factory=dict)  # label values we don't know
    missing: list[str] = field(default_factory=list)  # rows whose file doesn't exist
    duplicate_rows: list[str] = field(default_factory=list)  # names listed twice

    @property
    def patients(self) -> list[str]:
        return sorted({s.patient for s in self.samples})

    def class_counts(self, samples: Sequence[Sample] | None = None) -> dict[str, int]:
        counts = Counter(s.label for s in (self.samples if samples is None else samples))
        return {c: counts.get(c, 0) for c in self.classes}

    def fingerprint(self) -> str:
        """Hash of names, sizes, labels and patients: detects a changed data set cheaply."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: str(s.path)):
            try:
                size = s.path.stat().st_size
            except OSError:
                size = -1
            rel = s.path.relative_to(self.root) if s.path.is_relative_to(self.root) else s.path
            h.update(f"{rel}|{size}|{s.label}|{s.patient}\n".encode())
        return h.hexdigest()[:16]

    def subset(self, patients: set[str] | Sequence[str]) -> list[Sample]:
        keep = set(patients)
        return [s for s in self.samples if s.patient in keep]


def canonical_plane(value: str, known: Sequence[str]) -> str | None:
    """Match a label value to a known name, ignoring case, spaces and common aliases."""
    v = " ".join(value.strip().split())
    low = v.lower()
    for k in known:
        if k.lower() == low:
            return k
    alias = _ALIASES.get(low) or _ALIASES.get(low.removeprefix("fetal ").strip())
    if alias in known:
        return alias
    return None


def patient_from_name(name: str) -> str | None:
    """Parse `PatientNNNNN` from FETAL_PLANES_DB style names."""
    m = PATIENT_RE.match(Path(name).name)
    return m.group(1).capitalize() if m else None


# ---------------------------------------------------------------- layouts


def detect_layout(root: Path, labels: Path | None = None) -> tuple[str, Path | None]:
    """Return (layout, label file) for a data folder, or raise naming what was looked for."""
    if not root.exists():
        raise LabelFileError(f"{root}: data folder not found")
    if not root.is_dir():
        raise LabelFileError(f"{root}: expected a data folder, got a file")
    if labels is not None:
        if not labels.is_file():
            if os.path.lexists(labels):  # a folder, FIFO or device: say which, never open it
                read_file(labels, MAX_LABEL_BYTES, LabelFileError)
            raise LabelFileError(f"{labels}: label file not found")
        return _layout_of(labels), labels
    for name, layout in ((FPDB_CSV, "fpdb"), (AFRICAN_CSV, "african"), (SEED_CSV, "csv")):
        if (root / name).is_file():
            return layout, root / name
    csvs = sorted(root.glob("*.csv"))
    if len(csvs) == 1:
        return _layout_of(csvs[0]), csvs[0]
    if len(csvs) > 1:
        names = ", ".join(c.name for c in csvs)
        raise LabelFileError(f"{root}: several CSV files ({names}); pick one with --labels")
    # An archive extracted by hand keeps its top folder: DATA/Zenodo_dataset/<known CSV>.
    nested = sorted(p for n in (FPDB_CSV, AFRICAN_CSV) for p in root.glob(f"*/{n}"))
    if len(nested) == 1:
        return _layout_of(nested[0]), nested[0]
    if any(d.is_dir() and any(is_image_path(f) for f in d.iterdir()) for d in root.iterdir()):
        return "folders", None
    raise LabelFileError(
        f"{root}: no label file ({SEED_CSV}, {FPDB_CSV}, {AFRICAN_CSV} or --labels CSV) "
        "and no class sub-folders with images"
    )


#: A label CSV of 100,000 rows is a few MB; anything far larger is not one.
MAX_LABEL_BYTES = 256 * 1024**2


def read_label_text(path: Path, quiet: bool = False) -> str:
    """A label file's text. Spreadsheets export UTF-8 (with or without BOM), UTF-16 or a
    legacy 8-bit code page, so try them in that order: Windows-1252 (what Excel writes on
    Western Windows: the euro sign and en dash of file names live at 0x80-0x9F, where
    Latin-1 has invisible control codes), then Latin-1. A legacy code page gets one warning
    naming it; a binary file is refused in one line naming it. Read through
    `images.read_file`, so a FIFO or device named as the label file is refused, not waited on.
    """
    raw = read_file(path, MAX_LABEL_BYTES, LabelFileError)
    utf16 = _utf16_codec(raw)
    if utf16 is not None:
        try:
            return raw.decode(utf16).removeprefix("\ufeff")
        except UnicodeDecodeError:
            raise LabelFileError(f"{path}: not a text CSV file (broken UTF-16)") from None
    if _looks_binary(raw):
        raise LabelFileError(f"{path}: not a text CSV file (binary content)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text, name = raw.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are not Windows-1252
        text, name = raw.decode("latin-1"), "Latin-1"
    if not quiet:
        warn(f"{path}: not UTF-8 or UTF-16; read as {name} (check accented names)")
    return text


def _utf16_codec(raw: bytes) -> str | None:
    """'utf-16' for a BOM, the byte order when every other byte is zero (ASCII text), else
    None."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    head = raw[:4096]
    half = len(head) // 2
    if half < 2:
        return None
    if head[1::2].count(0) > 0.9 * half and head[0::2].count(0) < 0.1 * half:
        return "utf-16-le"
    if head[0::2].count(0) > 0.9 * half and head[1::2].count(0) < 0.1 * half:
        return "utf-16-be"
    return None


def _looks_binary(raw: bytes) -> bool:
    """NUL bytes or many control characters: an image, a zip or an .xlsx, not a CSV."""
    head = raw[:4096]
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return b"\x00" in head or controls > 0.05 * max(len(head), 1)


def _delimiter(text: str) -> str:
    head = text.split("\n", 1)[0]
    return ";" if head.count(";") > head.count(",") else ","


def _layout_of(path: Path) -> str:
    """fpdb (semicolons), african (a `Filename` column) or csv, from the header line."""
    text = read_label_text(path, quiet=True)
    delim = _delimiter(text)
    header = {h.strip() for h in text.split("\n", 1)[0].split(delim)}
    if "Filename" in header and "Image_name" not in header:
        return "african"
    return "fpdb" if delim == ";" else "csv"


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    text = read_label_text(path)
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
        header = [h.strip() for h in next(reader, [])]
        rows = [
            {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
            for row in reader
            if any(cell.strip() for cell in row)
        ]
    except csv.Error as exc:
        raise LabelFileError(f"{path}: cannot parse as CSV ({exc})") from None
    return header, rows


def _image_dir(root: Path, labels_file: Path, names: Sequence[str]) -> Path:
    """The folder that holds the most of the CSV's listed images.

    Candidates, in order of preference on a tie: Images/ or images/ in DATA or beside the
    CSV, DATA itself, the CSV's folder, then any sub-folder of DATA up to two levels deep
    (so `train train_test --labels image_label.csv` and `train .` both find the images).
    """
    candidates: list[Path] = []
    for base in (root, labels_file.parent):
        candidates += [base / "Images", base / "images"]
    candidates += [root, labels_file.parent]
    candidates += sorted(d for d in root.glob("*/") if d.is_dir())
    candidates += sorted(d for d in root.glob("*/*/") if d.is_dir())
    wanted = {n for name in names[:500] for n in (name, Path(name).name, Path(name).stem)}
    best, best_hits = labels_file.parent, 0
    seen: set[Path] = set()
    for folder in candidates:
        if folder in seen or not folder.is_dir():
            continue
        seen.add(folder)
        hits = sum(1 for k in _index_folder(folder) if k in wanted)
        if hits > best_hits:
            best, best_hits = folder, hits
    return best


def _index_folder(folder: Path) -> dict[str, Path]:
    """Map both 'name.ext' and 'name' to files, so CSV names may lack the extension."""
    index: dict[str, Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # unreadable folder: nothing found there
        return index
    for f in entries:
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            index.setdefault(f.name, f)
            index.setdefault(f.stem, f)
    return index


def _index_tree(*tops: Path) -> dict[str, Path]:
    """Like `_index_folder`, over every sub-folder: for layouts whose image folders are not
    known in advance (the African archive). The first file of a name in sorted order wins."""
    index: dict[str, Path] = {}
    seen: set[Path] = set()
    for top in tops:
        for folder, dirs, files in os.walk(top):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if here.resolve() in seen:
                dirs[:] = []
                continue
            seen.add(here.resolve())
            for name in sorted(files):
                f = here / name
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    index.setdefault(f.name, f)
                    index.setdefault(f.stem, f)
    return index


def _required(header: list[str], needed: Sequence[str], path: Path) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise LabelFileError(
            f"{path}: missing column(s) {', '.join(missing)}; expected "
            f"{', '.join(needed)}, found {', '.join(header) or 'no header'}"
        )


def _label_of(row: dict[str, str], preset: Preset) -> tuple[str | None, str]:
    """(class or None, raw value) for a row under a preset."""
    if preset.only_plane is not None:
        plane = canonical_plane(row.get("Plane", ""), PLANES)
        if plane != preset.only_plane:
            return None, row.get("Plane", "")
    raw = row.get(preset.column, "")
    return canonical_plane(raw, preset.classes), raw


def african_plane(value: str, name: str = "") -> str | None:
    """The plane of an African-data row: its Plane value as a name ("Fetal brain",
    "abdomen"), as `planeK`/`K`, or when empty the `planeK` suffix of the file name."""
    value = value.strip()
    if value:
        named = canonical_plane(value, PLANES)
        if named is not None:
            return named
        m = _PLANE_CODE.fullmatch(value)
    else:
        m = _PLANE_SUFFIX.search(Path(name.strip()).stem)
    k = int(m.group(1)) if m else -1
    return AFRICAN_PLANES[k] if 0 <= k < len(AFRICAN_PLANES) else None


def _african_label(row: dict[str, str], name: str, preset: Preset) -> tuple[str | None, str]:
    raw = row.get("Plane", "")
    plane = african_plane(raw, name)
    shown = raw or Path(name).stem.rsplit("_", 1)[-1]
    return (plane if plane in preset.classes else None), (plane or shown)


def _known_values(preset: Preset) -> tuple[str, ...]:
    return BRAIN_PLANE_VALUES if preset.column == "Brain_plane" else PLANES


def _layout_classes(preset: Preset, layout: str) -> list[str]:
    """The preset's classes this layout can hold: the African data has four planes, so
    under fpdb6 it is a four-class data set (evaluate maps classes by name)."""
    if layout == "african":
        return [c for c in preset.classes if c in AFRICAN_PLANES]
    return list(preset.classes)


def _name_key(name: str) -> str:
    """A listed name without its image extension: `a.png` and `a` are the same image."""
    p = Path(name.strip())
    return str(p.with_suffix("")) if p.suffix.lower() in IMAGE_EXTENSIONS else name.strip()


def _read_csv_layout(root: Path, labels_file: Path, preset: Preset, layout: str) -> LabelledData:
    header, rows = _read_rows(labels_file)
    african = layout == "african"
    name_col = "Filename" if african else "Image_name"
    needed = [name_col, "Plane"] + ([preset.column] if preset.column != "Plane" else [])
    _required(header, needed, labels_file)
    if african:
        index = _index_tree(root, *([labels_file.parent] if not _within(labels_file, root)
                                    else []))
    else:
        index = _index_folder(_image_dir(root, labels_file, [r[name_col] for r in rows]))
    classes = _layout_classes(preset, layout)
    data = LabelledData(root, layout, labels_file, preset.name, classes, [])
    seen: set[str] = set()
    used: set[Path] = set()
    dropped: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    for row in rows:
        name = row[name_col]
        if _name_key(name) in seen:
            data.duplicate_rows.append(name)
            continue
        seen.add(_name_key(name))
        label, raw = _african_label(row, name, preset) if african else _label_of(row, preset)
        if label is None or label not in classes:
            if canonical_plane(raw, _known_values(preset)) is not None or preset.only_plane:
                dropped[raw] += 1
            else:
                unknown[raw or "<empty>"] += 1
            continue
        path = index.get(name) or index.get(Path(name).name)
        if path is None:
            data.missing.append(name)
            continue
        if path in used:  # the same file under another spelling (sub-folder, extension)
            data.duplicate_rows.append(name)
            continue
        used.add(path)
        patient = _african_patient(row, name) if african else _patient_of(row, name)
        data.samples.append(Sample(path, label, patient, _subset_of(row), _meta_of(row)))
    data.dropped, data.unknown = dict(dropped), dict(unknown)
    return data


def _within(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _patient_of(row: dict[str, str], name: str) -> str:
    num = row.get("Patient_num", "").strip()
    if num:
        return f"Patient{int(num):05d}" if _ascii_digits(num) else num
    return patient_from_name(name) or Path(name).stem


def _ascii_digits(value: str) -> bool:
    """'0042' yes; '²' or '٣' no (str.isdigit says yes, int() then fails or surprises)."""
    return value.isascii() and value.isdigit()


def _african_patient(row: dict[str, str], name: str) -> str:
    """`<Center>-<Patient_num>`: the African data numbers patients per centre, so the number
    alone would merge different women of different centres into one patient."""
    m = _AFRICAN_NAME.match(Path(name.strip()).name)
    num = row.get("Patient_num", "").strip() or (m.group(1) if m else "")
    center = row.get("Center", "").strip() or (m.group(2) if m else "")
    if not num:
        return f"{center}-{Path(name).stem}" if center else Path(name).stem
    num = str(int(num)) if _ascii_digits(num) else num
    return f"{center}-{num}" if center else f"Patient{num}"


def _meta_of(row: dict[str, str]) -> dict[str, str]:
    return {key: row[col] for col, key in META_COLUMNS.items() if row.get(col, "").strip()}


def _subset_of(row: dict[str, str]) -> str | None:
    value = row.get("Train", "").strip()
    if value in ("1", "0"):
        return "train" if value == "1" else "test"
    return None


def _read_folders(root: Path, preset: Preset) -> LabelledData:
    data = LabelledData(root, "folders", None, preset.name, list(preset.classes), [])
    unknown: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.is_file() and is_image_path(f))
        if not files:
            continue
        label = canonical_plane(d.name, preset.classes)
        if label is None:
            known = canonical_plane(d.name, _known_values(preset)) is not None
            (dropped if known else unknown)[d.name] += len(files)
            continue
        for f in files:
            data.samples.append(Sample(f, label, patient_from_name(f.name) or f.stem))
    data.dropped, data.unknown = dict(dropped), dict(unknown)
    return data


def load_dataset(
    root: str | Path, labels: str | Path | None = None, preset: str = "seed4"
) -> LabelledData:
    """Read a labelled data set in any supported layout under a label preset.

    Layouts: seed CSV, FETAL_PLANES_DB, the African planes CSV, one folder per class.
    Rows of known planes outside the preset are counted in `dropped`; label values
    that are not planes at all are counted in `unknown` (callers report both).
    """
    root = Path(root)
    p = get_preset(preset)
    layout, labels_file = detect_layout(root, Path(labels) if labels else None)
    if layout == "folders":
        if p.column != "Plane":
            raise LabelFileError(f"{root}: preset {preset} needs a label file with {p.column}")
        data = _read_folders(root, p)
    else:
        assert labels_file is not None
        data = _read_csv_layout(root, labels_file, p, layout)
    if not data.samples:
        raise LabelFileError(_empty_message(data))
    return data


def _empty_message(data: LabelledData) -> str:
    where = data.labels_file or data.root
    parts = [f"{where}: no usable images for preset {data.preset}"]
    if data.unknown:
        parts.append(f"unknown labels {sorted(data.unknown)}")
    if data.missing:
        parts.append(f"{len(data.missing)} listed files not found (e.g. {data.missing[0]})")
    if data.dropped:
        parts.append(f"dropped planes {sorted(data.dropped)}")
    return "; ".join(parts)


# ---------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Patient ids per split. No patient is in two splits."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[str]]) -> Split:
        return cls(tuple(d.get("train", ())), tuple(d.get("val", ())), tuple(d.get("test", ())))

    def of(self, name: str) -> tuple[str, ...]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)


def _patient_labels(samples: Sequence[Sample]) -> tuple[list[str], list[str]]:
    """One stratification label per patient: their most frequent class."""
    per: dict[str, Counter[str]] = {}
    for s in samples:
        per.setdefault(s.patient, Counter())[s.label] += 1
    patients = sorted(per)
    return patients, [per[p].most_common(1)[0][0] for p in patients]


def _carve(
    patients: list[str], labels: list[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split patients into (rest, carved) with ~fraction carved, stratified by label."""
    if fraction <= 0 or len(patients) < 2:
        return patients, []
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {}
    for p, lab in zip(patients, labels, strict=True):
        by_label.setdefault(lab, []).append(p)
    carved: list[str] = []
    for lab in sorted(by_label):
        group = sorted(by_label[lab])
        rng.shuffle(group)
        n = round(len(group) * fraction)
        if n == 0 and len(group) >= 3 and rng.random() < len(group) * fraction:
            n = 1
        carved.extend(group[:n])
    if not carved:  # tiny data: take at least one patient
        carved = [patients[int(rng.integers(len(patients)))]]
    chosen = set(carved)
    return [p for p in patients if p not in chosen], sorted(chosen)


def split_by_patient(
    samples: Sequence[Sample],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Split:
    """Stratified, patient-grouped, deterministic split.

    When the samples carry FETAL_PLANES_DB's Train column, its test part is the
    test split and validation patients are carved from its train part.
    """
    if any(s.subset is not None for s in samples):
        test = sorted({s.patient for s in samples if s.subset == "test"})
        train_samples = [s for s in samples if s.subset != "test"]
        patients, labels = _patient_labels(train_samples)
        patients_left = [p for p in patients if p not in set(test)]
        labels_left = [lab for p, lab in zip(patients, labels, strict=True) if p not in set(test)]
        train, val = _carve(patients_left, labels_left, val_fraction, seed)
        return Split(tuple(train), tuple(val), tuple(test))
    patients, labels = _patient_labels(samples)
    rest, test = _carve(patients, labels, test_fraction, seed)
    lab_of = dict(zip(patients, labels, strict=True))
    rel_val = val_fraction / max(1e-9, 1 - test_fraction)
    train, val = _carve(rest, [lab_of[p] for p in rest], rel_val, seed + 1)
    return Split(tuple(train), tuple(val), tuple(test))


def split_counts(data: LabelledData, split: Split) -> dict[str, dict[str, int]]:
    """Images per class in each split (for reports)."""
    return {
        name: data.class_counts(data.subset(split.of(name))) for name in ("train", "val", "test")
    }


def kfold_by_patient(samples: Sequence[Sample], k: int, seed: int = 0) -> list[tuple[str, ...]]:
    """Partition patients into k stratified groups (for cross-validation)."""
    if k < 2:
        raise ValueError("folds must be at least 2")
    patients, labels = _patient_labels(samples)
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {}
    for p, lab in zip(patients, labels, strict=True):
        by_label.setdefault(lab, []).append(p)
    folds: list[list[str]] = [[] for _ in range(k)]
    offset = 0
    for lab in sorted(by_label):
        group = sorted(by_label[lab])
        rng.shuffle(group)
        for i, p in enumerate(group):
            folds[(i + offset) % k].append(p)
        offset += len(group)
    return [tuple(sorted(f)) for f in folds]

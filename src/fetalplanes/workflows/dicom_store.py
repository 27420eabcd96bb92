"""The DICOM node's output folder: durable files and the journal they form.

``instances/STUDY/SOP.dcm`` (received, written durably before Success is answered),
``results/STUDY/SOP.json`` (classified, one record per instance in the result schema),
``reports/STUDY/{sr,kos}.dcm`` (the study's DICOM results), ``state.json`` (per study,
written atomically), ``forwarded.log`` (what the forward peer accepted), ``stats.json``
(the last run's counters) and ``.incoming/`` (temporary files, removed at start: a file
there is an association or write that never finished). Folder and file names are UIDs,
checked to be digits and dots, so a sender cannot write outside the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fetalplanes.inference.results import Prediction

ULTRASOUND = "1.2.840.10008.5.1.4.1.1.6.1"
ULTRASOUND_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
VERIFICATION = "1.2.840.10008.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
#: Storage SOP classes accepted (the images fetalplanes classifies).
STORAGE_CLASSES = (ULTRASOUND, ULTRASOUND_MULTIFRAME, SECONDARY_CAPTURE)
#: Transfer syntaxes accepted when their decoder is installed (uncompressed ones always).
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(uid: str) -> bool:
    """A DICOM UID (digits and dots, at most 64 characters): safe as a file name."""
    return 0 < len(uid) <= 64 and _UID.match(uid) is not None


def prediction_from_dict(d: dict[str, Any]) -> Prediction:
    """Inverse of `Prediction.to_dict` for what the study results need."""
    return Prediction(
        path=str(d.get("path", "")),
        label=str(d.get("label", "")),
        confidence=float(d.get("confidence") or 0.0),
        probs={str(k): float(v or 0.0) for k, v in (d.get("probabilities") or {}).items()},
        not_target=bool(d.get("not_target", False)),
        uncertain=bool(d.get("uncertain", False)),
        rejection_score=d.get("rejection_score"),
        frame=d.get("frame"),
        error=d.get("error"),
    )


class OutputFolder:
    """The listen output folder and its journal (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.instances = self.root / "instances"
        self.results = self.root / "results"
        self.reports = self.root / "reports"
        self.incoming = self.root / ".incoming"
        self.state_file = self.root / "state.json"
        self.forward_log = self.root / "forwarded.log"
        for folder in (self.instances, self.results, self.reports, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.instances / study_uid / f"{sop_uid}.dcm"

    def result_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.results / study_uid / f"{sop_uid}.json"

    def report_paths(self, study_uid: str) -> tuple[Path, Path]:
        folder = self.reports / study_uid
        return folder / "sr.dcm", folder / "kos.dcm"

    def clean_incoming(self) -> int:
        """Remove partial files of associations that never finished (killed mid-write)."""
        n = 0
        for part in self.incoming.iterdir():
            with contextlib.suppress(OSError):
                part.unlink()
                n += 1
        return n

    def stored(self) -> Iterable[tuple[str, str, Path]]:
        """(study UID, SOP instance UID, path) of every stored instance."""
        for study in sorted(self.instances.iterdir()):
            if study.is_dir() and valid_uid(study.name):
                for f in sorted(study.glob("*.dcm")):
                    if valid_uid(f.stem):
                        yield study.name, f.stem, f

    def read_result(self, study_uid: str, sop_uid: str) -> dict[str, Any] | None:
        """An instance's result record, or None when missing or unreadable (classify again)."""
        try:
            return json.loads(self.result_path(study_uid, sop_uid).read_text())
        except (OSError, ValueError):
            return None

    def load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def forwarded(self) -> set[str]:
        """SOP instance UIDs already accepted by the forward peer (a torn last line is
        ignored: that instance is sent again, which a PACS treats as the same object)."""
        try:
            lines = self.forward_log.read_text().splitlines()
        except OSError:
            return set()
        return {line.split()[0] for line in lines if line.strip() and valid_uid(line.split()[0])}

    def mark_forwarded(self, uids: Iterable[str]) -> None:
        with open(self.forward_log, "a") as f:
            f.writelines(f"{uid}\n" for uid in uids)
            f.flush()
            os.fsync(f.fileno())

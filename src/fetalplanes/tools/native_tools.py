"""Find compiled reference tools (dcmtk, dicom3tools) on PATH.

pynetdicom installs Python scripts named like dcmtk's (``storescu``, ``echoscu`` …) into the
virtual environment's ``bin``; with that folder first on PATH, ``shutil.which("storescu")``
returns pynetdicom's, which takes other options. The benches and tests want dcmtk's, the
second implementation, so a candidate that is a script (starts with ``#!``) is passed over.
"""

from __future__ import annotations

import os
from pathlib import Path


def _is_native(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(2) != b"#!"
    except OSError:
        return False


def native_tool(name: str) -> str | None:
    """Path of the first compiled executable ``name`` on PATH (scripts skipped), or None."""
    for folder in os.get_exec_path():
        candidate = Path(folder or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK) and _is_native(candidate):
            return str(candidate)
    return None

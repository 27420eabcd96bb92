"""Item names: a file, or one frame of a multi-frame file (`file.dcm#frame=N`).

Kept apart from `data.dicom` so naming and parsing items never imports pydicom.
"""

from __future__ import annotations

import re

_FRAME_RE = re.compile(r"^(?P<path>.*)#frame=(?P<index>\d+)$")


def frame_name(path: str, index: int) -> str:
    """Name one frame of a multi-frame file the way fetalplanes names items."""
    return f"{path}#frame={index}"


def parse_frame_name(name: str) -> tuple[str, int | None]:
    """Split ``file.dcm#frame=N`` into (path, N); a plain path gives (path, None)."""
    match = _FRAME_RE.match(name)
    if match is None:
        return name, None
    return match["path"], int(match["index"])

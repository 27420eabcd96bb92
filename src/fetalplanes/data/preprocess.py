"""How an image becomes network input: decode -> optional ultrasound crop -> resize -> uint8.

Torch-free on purpose: ONNX-only inference (predict, sort, serve, scan) prepares images
with exactly this code and never imports torch. Stored in every checkpoint sidecar.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.data.images import opencv, read_image

cv2 = opencv()


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes network input; stored in every checkpoint sidecar."""

    size: tuple[int, int] = (224, 224)  # (height, width)
    crop: bool = True  # find the ultrasound region and drop margins/UI first
    normalize: str = "fixed"  # "fixed" (mean/std on [0,1]) or "per_image" (standardise)
    mean: float = 0.0
    std: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {k: d[k] for k in ("size", "crop", "normalize", "mean", "std") if k in d}
        if "size" in known:
            known["size"] = tuple(int(v) for v in known["size"])
        return cls(**known)

    def with_(self, **changes: Any) -> Preprocess:
        return replace(self, **changes)

    def cache_key(self) -> str:
        """Only what changes the cached uint8 pixels."""
        # bump the suffix whenever decoding, cropping or resizing changes pixels
        return f"{self.size[0]}x{self.size[1]}-crop{int(self.crop)}-v2"

    def prepare_frame(self, frame: Any) -> np.ndarray:
        """The one crop rule, for every way in: a frame's declared ultrasound region when it
        has one (`sources.Frame`), else the guessed crop (when this preprocessing crops);
        then the resize. Returns uint8 (H, W)."""
        if frame.region is not None:
            return self.resize(frame.cropped())
        return self.prepare_array(frame.gray)

    def prepare_array(self, gray: np.ndarray) -> np.ndarray:
        """Crop (optionally) and resize a decoded grayscale image to uint8 (H, W)."""
        if self.crop:
            from fetalplanes.data.crop import crop_ultrasound

            gray = crop_ultrasound(gray)
        return self.resize(gray)

    def resize(self, gray: np.ndarray) -> np.ndarray:
        """Resize to the network's input size (area when shrinking), uint8 (H, W)."""
        h, w = self.size
        if gray.shape != (h, w):
            shrinking = gray.shape[0] > h or gray.shape[1] > w
            interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            gray = cv2.resize(gray, (w, h), interpolation=interp)
        return np.ascontiguousarray(gray, dtype=np.uint8)

    def prepare(self, path: str | Path) -> np.ndarray:
        """Read a file and prepare it; raises ImageError naming the file."""
        return self.prepare_array(read_image(path))

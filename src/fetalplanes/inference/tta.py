"""Test-time augmentation on prepared pixels, the same for every backend (numpy + OpenCV).

Views: the image, its horizontal mirror and a 90% centre zoom; their logits (and model
scores) are averaged. Done on the pixels rather than inside a framework, so torch and
ONNX Runtime see identical inputs and the ONNX path needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fetalplanes.data.images import opencv
from fetalplanes.inference.outputs import Outputs


def views(pixels: np.ndarray) -> list[np.ndarray]:
    """(N,H,W) pixels -> [plain, mirrored, zoomed] as float32 arrays of the same shape."""
    x = np.asarray(pixels, dtype=np.float32)
    h, w = x.shape[-2:]
    dh, dw = int(h * 0.05), int(w * 0.05)
    cv2 = opencv()
    zoomed = np.stack(
        [cv2.resize(im[dh : h - dh, dw : w - dw], (w, h), interpolation=cv2.INTER_LINEAR)
         for im in x]
    ) if len(x) else x.copy()
    return [x, np.ascontiguousarray(x[..., ::-1]), zoomed]


def mean_outputs(parts: list[Outputs]) -> Outputs:
    """Average logits (and scores) over views of the same images."""
    logits = np.mean([p.logits for p in parts], axis=0)
    if any(p.score is None for p in parts):
        return Outputs(logits)
    return Outputs(logits, np.mean([p.score for p in parts], axis=0))


def with_tta(run: Callable[[np.ndarray], Outputs], pixels: np.ndarray) -> Outputs:
    """`run` over every view of `pixels`, averaged."""
    return mean_outputs([run(v) for v in views(pixels)])

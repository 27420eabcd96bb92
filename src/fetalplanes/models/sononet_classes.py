"""SonoNet's 14 classes and how they fold into fetalplanes' planes (torch-free).

Kept apart from the network so ONNX-only inference of the bundled SonoNet-16 can fold
its outputs without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SONONET_LABELS: tuple[str, ...] = (
    "3VV",
    "4CH",
    "Abdominal",
    "Background",
    "Brain (Cb.)",
    "Brain (Tv.)",
    "Femur",
    "Kidneys",
    "Lips",
    "LVOT",
    "Profile",
    "RVOT",
    "Spine (cor.)",
    "Spine (sag.)",
)

NOT_TARGET = "not_target"
SONONET_TO_SEED4: dict[str, str] = {
    "3VV": "Fetal thorax",
    "4CH": "Fetal thorax",
    "LVOT": "Fetal thorax",
    "RVOT": "Fetal thorax",
    "Abdominal": "Fetal abdomen",
    "Brain (Cb.)": "Fetal brain",
    "Brain (Tv.)": "Fetal brain",
    "Femur": "Fetal femur",
    "Background": NOT_TARGET,
    "Kidneys": NOT_TARGET,
    "Lips": NOT_TARGET,
    "Profile": NOT_TARGET,
    "Spine (cor.)": NOT_TARGET,
    "Spine (sag.)": NOT_TARGET,
}


def fold_probabilities(probs14: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Fold (N, 14) SonoNet probabilities into ``classes`` plus a final ``not_target``.

    Each SonoNet label is summed into its :data:`SONONET_TO_SEED4` class when that class is
    in ``classes`` and into ``not_target`` otherwise, so rows still sum to 1 and a model
    trained on fewer planes can be compared with SonoNet.  Returns
    ``(probs, list(classes) + ["not_target"])``.
    """
    probs14 = np.asarray(probs14)
    if probs14.ndim != 2 or probs14.shape[1] != len(SONONET_LABELS):
        raise ValueError(f"expected (N, {len(SONONET_LABELS)}) probabilities, got {probs14.shape}")
    names = list(classes)
    if NOT_TARGET in names or len(set(names)) != len(names):
        raise ValueError(f"classes must be unique and exclude {NOT_TARGET!r}: {names}")
    names.append(NOT_TARGET)
    column = {name: i for i, name in enumerate(names)}
    target = [column.get(SONONET_TO_SEED4[label], len(names) - 1) for label in SONONET_LABELS]
    folding = np.zeros((len(SONONET_LABELS), len(names)), dtype=probs14.dtype)
    folding[np.arange(len(SONONET_LABELS)), target] = 1
    return probs14 @ folding, names

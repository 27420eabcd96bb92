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

#: SonoNet's labels as the views of the `views13` preset (`data.datasets.VIEWS13`): the
#: clinician's names; Background (frames that show no standard plane) is not a view.
SONONET_TO_VIEW: dict[str, str] = {
    "3VV": "Three-vessel view",
    "4CH": "Four-chamber view",
    "Abdominal": "Abdominal circumference plane",
    "Background": NOT_TARGET,
    "Brain (Cb.)": "Trans-cerebellar plane",
    "Brain (Tv.)": "Trans-ventricular plane",
    "Femur": "Femur length plane",
    "Kidneys": "Kidneys",
    "Lips": "Lips (coronal)",
    "LVOT": "Left ventricular outflow tract",
    "Profile": "Facial profile (mid-sagittal)",
    "RVOT": "Right ventricular outflow tract",
    "Spine (cor.)": "Spine (coronal)",
    "Spine (sag.)": "Spine (sagittal)",
}


def fold_target(label: str, classes: Sequence[str]) -> str:
    """The class of ``classes`` a SonoNet label folds into: its seed plane when that is one
    of ``classes`` (seed4, fpdb6), else its view name (views13), else ``not_target``."""
    for name in (SONONET_TO_SEED4[label], SONONET_TO_VIEW[label]):
        if name != NOT_TARGET and name in classes:
            return name
    return NOT_TARGET


def fold_probabilities(probs14: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Fold (N, 14) SonoNet probabilities into ``classes`` plus a final ``not_target``.

    Each SonoNet label is summed into its :func:`fold_target` class (its
    :data:`SONONET_TO_SEED4` plane or its :data:`SONONET_TO_VIEW` view when that is in
    ``classes``, ``not_target`` otherwise), so rows still sum to 1 and a model trained on
    fewer planes can be compared with SonoNet.  Returns
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
    target = [column[fold_target(label, names[:-1])] for label in SONONET_LABELS]
    folding = np.zeros((len(SONONET_LABELS), len(names)), dtype=probs14.dtype)
    folding[np.arange(len(SONONET_LABELS)), target] = 1
    return probs14 @ folding, names

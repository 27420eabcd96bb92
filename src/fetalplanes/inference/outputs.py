"""What a backend returns for a batch: logits and, when the model has one, its feature score.

Why a named value: the feature-space (kNN) score and an ensemble's rejection margin used
to ride as an extra "logits" column that every consumer had to slice off by class count.
Naming them keeps the logits pure, so softmax, metrics and export never see the score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Outputs:
    """`logits` (N, C) float32; `score` (N,) from the model itself, or None.

    `score` is the in-distribution score the model computes beside its logits: the kNN
    feature similarity of a run with a feature bank, or an ensemble's mean margin.
    """

    logits: np.ndarray
    score: np.ndarray | None = None

    def __post_init__(self) -> None:
        logits = np.asarray(self.logits, dtype=np.float32)
        if logits.ndim != 2:
            raise ValueError(f"logits must be (N, C), got shape {logits.shape}")
        object.__setattr__(self, "logits", logits)
        if self.score is not None:
            score = np.asarray(self.score, dtype=np.float32).reshape(-1)
            if len(score) != len(logits):
                raise ValueError(f"{len(score)} scores for {len(logits)} rows of logits")
            object.__setattr__(self, "score", score)

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, index: slice | int | np.ndarray | list[int]) -> Outputs:
        """Rows of the batch (an int gives a one-row batch)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Outputs(self.logits[index], None if self.score is None else self.score[index])

    @staticmethod
    def empty(n_classes: int, with_score: bool = False) -> Outputs:
        return Outputs(
            np.zeros((0, n_classes), np.float32), np.zeros(0, np.float32) if with_score else None
        )

    @staticmethod
    def concat(parts: Sequence[Outputs], n_classes: int = 0) -> Outputs:
        """Stack batches (all with a score or all without)."""
        if not parts:
            return Outputs.empty(n_classes)
        logits = np.concatenate([p.logits for p in parts])
        if any(p.score is None for p in parts):
            return Outputs(logits)
        return Outputs(logits, np.concatenate([p.score for p in parts]))  # type: ignore[misc]


class Backend(Protocol):
    """Anything that turns prepared pixels into outputs (torch, ONNX Runtime, ensembles)."""

    def outputs(self, pixels: np.ndarray) -> Outputs:
        """(N,H,W) uint8 -> logits (N,C) and the model's own score, if any."""
        ...

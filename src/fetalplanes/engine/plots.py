"""Figures written into run and evaluation folders (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def training_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy per epoch for train and validation."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        val = [h.get(f"val_{key}") for h in history]
        if any(v is not None for v in val):
            ax.plot(epochs, val, "o-", label="validation (unseen patients)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix_plot(
    cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "confusion matrix"
) -> Path:
    """Counts with row-normalised colour (recall per true class)."""
    m = np.asarray(cm, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.1 * n + 2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=35, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability_diagram(
    bins_before: dict[str, list[float]],
    bins_after: dict[str, list[float]],
    path: Path,
    ece_before: float,
    ece_after: float,
) -> Path:
    """Accuracy vs confidence before and after temperature scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, bins, name, ece in (
        (axes[0], bins_before, "uncalibrated", ece_before),
        (axes[1], bins_after, "temperature-scaled", ece_after),
    ):
        centers = [(lo + hi) / 2 for lo, hi in zip(bins["lower"], bins["upper"], strict=True)]
        width = bins["upper"][0] - bins["lower"][0]
        acc = [a if c else 0 for a, c in zip(bins["accuracy"], bins["count"], strict=True)]
        ax.bar(centers, acc, width=width * 0.95, color="#4c72b0", label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_title(f"{name} (ECE {ece:.3f})")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def risk_coverage_plot(
    coverage: Sequence[float], risk: Sequence[float], stored_coverage: float, path: Path
) -> Path:
    """Error rate among the most confident images as coverage grows (selective risk), with
    the coverage the stored rejection threshold gives."""
    fig, ax = plt.subplots(figsize=(5.2, 4))
    ax.plot(coverage, risk, color="#4c72b0", label="error on the most confident share")
    ax.axvline(stored_coverage, color="#c44e52", ls="--", lw=1,
               label=f"coverage at the stored threshold ({stored_coverage:.2f})")
    ax.set_xlabel("coverage (share of images accepted)")
    ax.set_ylabel("risk (error rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.05, max(risk, default=0) * 1.1))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

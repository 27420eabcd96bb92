"""Penultimate features and the k-nearest-neighbour 'not a target plane' score.

Why: logit scores (energy, max probability) see only how strongly an image votes for
the trained planes, and a photo or an untrained plane can vote strongly. Distances in
the network's feature space see how unlike every training image it is, which separates
such images far better (Sun et al. 2022, "Out-of-distribution detection with deep
nearest neighbors"; measured in docs/trust.md).

The score is the cosine similarity of an image's L2-normalised penultimate features to
its k-th nearest training image (higher = more like the training data). The training
features ("bank") are stored beside the weights (`feature_bank.safetensors`) and the
score is computed inside `InferenceModel`, so the torch backend, the exported ONNX
graph, ensembles and the server all compute it the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fetalplanes.errors import CheckpointError
from fetalplanes.models.card import BANK_FILE, SIDECAR, bank_path_problem, umask_mode
from fetalplanes.models.weights import check_readable

DEFAULT_K = 1
#: Training images kept as neighbours (a seeded random subset beyond this). Every image
#: scored reads the whole bank (2,000 x 1,280 float32 = 10 MB for EfficientNet-Lite0):
#: measured +0.6 ms per image at batch 4 and +1.4 ms at batch 1 on 2 CPU cores, against
#: +1.6 / +3.7 ms for 7,000 rows; Sun et al. found subsampled banks nearly as good.
MAX_BANK = 2_000


def auto_k(bank_size: int) -> int:
    """k as the same share of the bank as Sun et al.'s k = 50 of 50,000 images.

    1 up to 1,500 bank rows, 2 for a full bank. On small synthetic sets k = 1 separated
    photos and untrained planes as well as or better than 5 or 20 (docs/trust.md).
    """
    return max(1, round(bank_size / 1000))


def feature_module(model: nn.Module) -> nn.Module:
    """The module whose input is the network's penultimate representation.

    timm models: their classifier; SeedCNN: its last Linear; SonoNet: the adaption
    head (its input is the last feature map, average-pooled by `FeatureTap`).
    """
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module):
            return head
    for name in ("classifier", "head", "adaption"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Sequential):
            linear = [m for m in head if isinstance(m, nn.Linear)]
            return linear[-1] if linear else head
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__}: no classifier head to take features from")


class FeatureTap:
    """Records the input of `feature_module(model)` on every forward pass."""

    def __init__(self, model: nn.Module):
        self.last: Tensor | None = None
        self.handle = feature_module(model).register_forward_pre_hook(self._keep)

    def _keep(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self.last = args[0]

    def features(self) -> Tensor:
        """(N, D) features of the last forward pass (spatial maps average-pooled)."""
        if self.last is None:
            raise RuntimeError("no forward pass recorded")
        f = self.last
        return (f.mean(dim=(2, 3)) if f.dim() == 4 else f).flatten(1)

    def remove(self) -> None:
        self.handle.remove()


def feature_dim(model: nn.Module, size: tuple[int, int]) -> int:
    """Length of the feature vector `FeatureTap` gives for (H, W) = `size` inputs."""
    tap = FeatureTap(model)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 1, *size))
        return int(tap.features().shape[1])
    finally:
        tap.remove()


class KnnScore(nn.Module):
    """(N, D) features -> (N,) cosine similarity to the k-th nearest bank entry."""

    def __init__(self, bank: Tensor, k: int = DEFAULT_K):
        super().__init__()
        self.register_buffer("bank", F.normalize(bank.float(), dim=1))
        self.k = max(1, min(int(k), len(bank)))

    def forward(self, features: Tensor) -> Tensor:
        sim = F.normalize(features.float(), dim=1) @ self.bank.T
        return sim.topk(self.k, dim=1).values[:, -1]


def collect_features(
    model: nn.Module, batches: Callable[[], Any], forward: Callable[[Tensor], Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) over `batches()` (uint8 batches fed to `forward`), in eval mode."""
    tap = FeatureTap(model)
    logits, feats = [], []
    try:
        model.eval()
        with torch.no_grad():
            for x in batches():
                logits.append(forward(x).float().cpu())
                feats.append(tap.features().float().cpu())
    finally:
        tap.remove()
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def make_bank(features: np.ndarray, seed: int = 0, limit: int = MAX_BANK) -> np.ndarray:
    """Normalised training features, at most `limit` of them (a seeded random subset)."""
    if len(features) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), limit, replace=False))
        features = features[keep]
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def knn_scores(features: np.ndarray, bank: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """The score `KnnScore` computes, for fitting the threshold at the end of training."""
    with torch.no_grad():
        return KnnScore(torch.from_numpy(bank), k)(torch.from_numpy(features)).numpy()


def save_bank(run: Path, bank: np.ndarray) -> None:
    """Store the bank as float16 (half the size; both backends read the same values)."""
    tmp = Path(run) / f".{BANK_FILE}.tmp"
    save_file({"bank": torch.from_numpy(bank).half().contiguous()}, str(tmp))
    umask_mode(tmp)
    tmp.replace(Path(run) / BANK_FILE)


def stored_bank(bank: np.ndarray) -> np.ndarray:
    """The bank as inference will read it back (float16 round trip)."""
    return bank.astype(np.float16).astype(np.float32)


def load_knn(run: str | Path, rejection: dict[str, Any]) -> KnnScore | None:
    """The run's kNN scorer when its rejection rule uses one, else None."""
    if rejection.get("method") != "knn":
        return None
    name = rejection.get("bank", BANK_FILE)
    unsafe = bank_path_problem(name)
    if unsafe:  # a sidecar must never make inference read files outside its run folder
        raise CheckpointError(f"{Path(run) / SIDECAR}: {unsafe}")
    path = Path(run) / name
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: feature bank missing (needed by the knn rejection rule)")
    check_readable(path, "feature bank")
    try:
        bank = load_file(str(path))["bank"]
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable feature bank ({exc})") from None
    return KnnScore(bank.float(), int(rejection.get("k", DEFAULT_K)))

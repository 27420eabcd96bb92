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
from safetensors.torch import save_file
from torch import Tensor, nn

from fetalplanes.errors import CheckpointError
from fetalplanes.models.card import BANK_FILE, SIDECAR, bank_path_problem, umask_mode
from fetalplanes.models.weights import check_finite, check_readable, load_safetensors

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
    """(N, D) features -> (N,) cosine similarity to the k-th nearest bank entry.

    `source` names the bank file in the one-line error a model with features of another
    length gets (instead of a matrix-shape traceback)."""

    def __init__(self, bank: Tensor, k: int = DEFAULT_K, source: str = "feature bank"):
        super().__init__()
        self.register_buffer("bank", F.normalize(bank.float(), dim=1))
        self.k = max(1, min(int(k), len(bank)))
        self.source = source

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[-1] != self.bank.shape[1]:
            raise CheckpointError(_dim_problem(self.source, self.bank.shape[1], features.shape[-1]))
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


#: Bounds of a bank file read back (training writes at most MAX_BANK rows).
MAX_BANK_ROWS, MAX_FEATURE_DIM = 100_000, 65_536


def _dim_problem(source: str, bank_dim: int, model_dim: int) -> str:
    return (
        f"{source}: feature bank rows have {bank_dim} values, but the model gives "
        f"{model_dim}-value features (a bank of another model?); retrain, or remove the knn "
        "rejection rule from model.json"
    )


def _bank_shape(path: Path) -> list[int]:
    """The bank tensor's shape from the safetensors header alone (nothing else is read), so
    a huge or malformed bank is refused before it is loaded."""
    from safetensors import safe_open

    from fetalplanes.data.images import fd_path, open_file

    fd = open_file(path, os.O_RDONLY, CheckpointError)
    try:
        with safe_open(fd_path(fd, path), framework="pt") as f:
            if "bank" not in f.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
                raise CheckpointError(f"{path}: not a feature bank (no 'bank' tensor)")
            return list(f.get_slice("bank").get_shape())
    finally:
        os.close(fd)


def load_knn(
    run: str | Path,
    rejection: dict[str, Any],
    model: nn.Module | None = None,
    size: tuple[int, int] | None = None,
) -> KnnScore | None:
    """The run's kNN scorer when its rejection rule uses one, else None.

    The bank is checked before it is loaded (2-D, at most `MAX_BANK_ROWS` rows) and its
    row length against the model's feature length: the sidecar's `feature_dim` (written by
    training), and `model` itself when given (`size`: its input (H, W)). Loaded values must
    be finite. Each problem is one CheckpointError naming the bank file."""
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
        shape = _bank_shape(path)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable feature bank ({_first_line(exc)})") from None
    if len(shape) != 2 or not (0 < shape[0] <= MAX_BANK_ROWS and 0 < shape[1] <= MAX_FEATURE_DIM):
        raise CheckpointError(
            f"{path}: feature bank of shape {tuple(shape)}; expected rows of features "
            f"(at most {MAX_BANK_ROWS:,} x {MAX_FEATURE_DIM:,})"
        )
    expected = rejection.get("feature_dim")
    if model is not None:
        expected = feature_dim(model, size or (224, 224))
    if isinstance(expected, int) and not isinstance(expected, bool) and expected != shape[1]:
        raise CheckpointError(_dim_problem(str(path), shape[1], expected))
    bank = load_safetensors(path, "feature bank")["bank"]
    check_finite({"bank": bank}, path, "feature bank")
    return KnnScore(bank.float(), int(rejection.get("k", DEFAULT_K)), str(path))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__

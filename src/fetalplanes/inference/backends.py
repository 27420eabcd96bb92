"""Backends: prepared uint8 pixels in, `Outputs` out.

Torch runs here; ONNX Runtime in `inference.onnx`; ensembles in `inference.ensemble`.
Every backend takes (N, H, W) uint8 images already decoded, cropped and resized by the
run's `Preprocess`, so they differ only in how the network is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fetalplanes.data.datasets import get_preset
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.data.transforms import normalize
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.outputs import Outputs
from fetalplanes.inference.rejection import FeatureTap, KnnScore, load_knn
from fetalplanes.inference.tta import with_tta
from fetalplanes.models.card import ModelCard, run_folder
from fetalplanes.models.checkpoint import load_checkpoint
from fetalplanes.models.devices import pick_device
from fetalplanes.models.registry import create_model, get_spec
from fetalplanes.models.sononet_classes import SONONET_LABELS, fold_probabilities

#: Names of the exported graph's input and outputs (the ONNX file has both outputs when
#: the run has a feature bank, else `logits` only).
INPUT_NAME = "pixels"
LOGITS_NAME = "logits"
SCORE_NAME = "knn_score"


class InferenceModel(nn.Module):
    """Network plus its normalisation: takes (N,1,H,W) float pixels in [0,255].

    Folding normalisation in makes exported ONNX graphs self-contained. With a `knn`
    scorer it returns `(logits, knn_score)`, else the logits alone.
    """

    def __init__(self, model: nn.Module, pp: Preprocess, knn: KnnScore | None = None):
        super().__init__()
        self.model = model
        self.pp = pp
        self.knn = knn
        self._tap = FeatureTap(model) if knn is not None else None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        logits = self.model(normalize(x, self.pp))
        if self.knn is None or self._tap is None:
            return logits
        return logits, self.knn(self._tap.features()).to(logits.dtype)


def as_pair(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
    """(logits, score or None) of an `InferenceModel`-like forward result."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def to_outputs(out: Tensor | tuple[Tensor, ...]) -> Outputs:
    logits, score = as_pair(out)
    return Outputs(
        logits.float().cpu().numpy(), None if score is None else score.float().cpu().numpy()
    )


class TorchBackend:
    """Eager PyTorch on CPU or CUDA (channels_last: ~1.6x faster on CPU too), optional TTA."""

    def __init__(
        self,
        model: nn.Module,
        pp: Preprocess,
        device: torch.device,
        tta: bool = False,
        knn: KnnScore | None = None,
    ):
        self.net = InferenceModel(model, pp, knn).to(device).eval()
        self.net = self.net.to(memory_format=torch.channels_last)
        self.device = device
        self.tta = tta

    def outputs(self, pixels: np.ndarray) -> Outputs:
        return with_tta(self._run, pixels) if self.tta else self._run(pixels)

    @torch.inference_mode()
    def _run(self, pixels: np.ndarray) -> Outputs:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(1).to(self.device).float()
        return to_outputs(self.net(x.contiguous(memory_format=torch.channels_last)))


def load_run_backend(
    run: str | Path, device: str = "auto", tta: bool = False
) -> tuple[TorchBackend, ModelCard]:
    """Torch backend and card of a run folder (weights, sidecar and feature bank)."""
    model, card = load_checkpoint(run)
    knn = load_knn(run_folder(run), card.rejection)
    return TorchBackend(model, card.preprocess, pick_device(device), tta, knn), card


def load_pretrained_backend(
    model: str,
    weights: str | Path | None = None,
    preset: str = "seed4",
    device: str = "auto",
    tta: bool = False,
    crop: bool | None = None,
) -> tuple[TorchBackend, ModelCard, Callable[[np.ndarray], tuple[np.ndarray, list[str]]]]:
    """Torch backend, card and class folding of a zero-shot model (SonoNet weights)."""
    spec = get_spec(model)
    if spec.family != "sononet":
        raise FetalPlanesError(
            f"--model {model} without a run folder works only for SonoNet weights; "
            "train a run first for other models"
        )
    if weights is None and spec.bundled_weights() is None:
        raise FetalPlanesError(f"{model}: no bundled weights; pass --weights PATH")
    net = create_model(model, len(SONONET_LABELS), pretrained=True, weights=weights)
    pp = spec.preprocess if crop is None else spec.preprocess.with_(crop=crop)
    card = ModelCard(model, list(SONONET_LABELS), pp, preset=preset)
    classes = list(get_preset(preset).classes)

    def fold(probs: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return fold_probabilities(probs, classes)

    return TorchBackend(net.eval(), pp, pick_device(device), tta), card, fold

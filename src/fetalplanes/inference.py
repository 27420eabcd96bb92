"""Inference: one `Predictor` behind predict, sort, evaluate and serve.

Class names come only from the checkpoint sidecar. Probabilities are calibrated
with the stored temperature, and the stored rejection rule marks `not_target`
images. Backends (torch, ONNX Runtime) differ only in how logits are computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from fetalplanes.calibration import calibrated_probs, is_not_target, ood_score
from fetalplanes.checkpoint import ModelCard, load_checkpoint
from fetalplanes.errors import FetalPlanesError, ImageError
from fetalplanes.features import FeatureTap, KnnScore, load_knn
from fetalplanes.images import decode_image, list_images
from fetalplanes.loading import default_workers, iter_batches
from fetalplanes.transforms import Preprocess, normalize

NOT_TARGET = "not_target"
UNCERTAIN = "uncertain"
#: Images per model call when the model runs in the decode workers: single-threaded
#: ONNX Runtime is as fast per image at batch 1-4 as at 64, and small chunks keep
#: every worker busy and the results in order.
WORKER_BATCH = 4


class InferenceModel(nn.Module):
    """Network plus its normalisation: takes (N,1,H,W) float pixels in [0,255].

    Folding normalisation in makes exported ONNX graphs self-contained. With a `knn`
    scorer the output gains one last column, the feature-space score of
    `features.KnnScore` (see `calibration.split_outputs`).
    """

    def __init__(self, model: nn.Module, pp: Preprocess, knn: KnnScore | None = None):
        super().__init__()
        self.model = model
        self.pp = pp
        self.knn = knn
        self._tap = FeatureTap(model) if knn is not None else None

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(normalize(x, self.pp))
        if self.knn is None or self._tap is None:
            return logits
        score = self.knn(self._tap.features())
        return torch.cat([logits, score[:, None].to(logits.dtype)], dim=1)


class Backend(Protocol):
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(N,H,W) uint8 -> (N,C) float32 logits."""
        ...


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

    @torch.inference_mode()
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(1).to(self.device).float()
        x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        if self.tta:
            out = tta_logits(self.net, x, out)
        return out.float().cpu().numpy()


def tta_logits(net: nn.Module, x: Tensor, plain: Tensor) -> Tensor:
    """Average logits over identity, horizontal flip and a 90% centre zoom."""
    flipped = net(torch.flip(x, dims=[3]))
    h, w = x.shape[-2:]
    dh, dw = int(h * 0.05), int(w * 0.05)
    zoomed = torch.nn.functional.interpolate(
        x[..., dh : h - dh, dw : w - dw], size=(h, w), mode="bilinear", align_corners=False
    )
    return (plain + flipped + net(zoomed)) / 3


@dataclass
class Prediction:
    """One image's result. `label` may be `not_target`; `probs` are by class name."""

    path: str
    label: str
    confidence: float
    probs: dict[str, float]
    not_target: bool = False
    uncertain: bool = False
    score: float | None = None  # in-distribution score used for rejection
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path}
        if self.error:
            d["error"] = self.error
            return d
        d |= {
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "uncertain": self.uncertain,
            "not_target": self.not_target,
            "probabilities": {k: round(v, 6) for k, v in self.probs.items()},
        }
        d |= self.extra
        return d


def failed(path: str, message: str) -> Prediction:
    return Prediction(path, "", 0.0, {}, error=message)


class Predictor:
    """Load once, predict many: arrays, bytes, files or whole folders (streaming)."""

    def __init__(
        self, backend: Backend, card: ModelCard, min_confidence: float = 0.0, fold: Any = None
    ):
        self.backend = backend
        self.card = card
        self.classes = list(card.classes)
        self.pp = card.preprocess
        self.min_confidence = min_confidence
        self.fold = fold  # optional (probs)->(probs, names, extra) for zero-shot models

    # ------------------------------------------------------------ construction
    @classmethod
    def from_run(
        cls,
        run: str | Path,
        backend: str = "torch",
        device: str = "auto",
        tta: bool = False,
        min_confidence: float = 0.0,
    ) -> Predictor:
        """Predictor for a run folder (or a folder of fold runs -> ensemble)."""
        from fetalplanes.ensemble import ensemble_predictor, is_ensemble_dir
        from fetalplanes.train import pick_device

        run = Path(run)
        if is_ensemble_dir(run):
            if backend != "torch":
                raise FetalPlanesError(f"{run}: ensembles run on the torch backend only")
            return ensemble_predictor([run], device, tta, min_confidence)
        if backend in ("onnx", "onnx-int8"):
            from fetalplanes.export import OnnxBackend, load_onnx_card

            int8 = backend == "onnx-int8"
            card = load_onnx_card(run, int8)
            return cls(OnnxBackend.from_run(run, tta=tta, int8=int8), card, min_confidence)
        if backend != "torch":
            raise FetalPlanesError(
                f"unknown backend {backend!r}; choose torch, onnx or onnx-int8"
            )
        model, card = load_checkpoint(run)
        knn = load_knn(run, card.rejection)
        backend = TorchBackend(model, card.preprocess, pick_device(device), tta, knn)
        return cls(backend, card, min_confidence)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        weights: str | Path,
        preset: str = "seed4",
        device: str = "auto",
        tta: bool = False,
        min_confidence: float = 0.0,
        crop: bool | None = None,
    ) -> Predictor:
        """Zero-shot predictor from published weights (SonoNet), folded into a preset.

        `crop` overrides the model's ultrasound-crop default (to show its effect).
        """
        from fetalplanes.data import get_preset
        from fetalplanes.models import create_model, get_spec
        from fetalplanes.train import pick_device

        spec = get_spec(model)
        if spec.family != "sononet":
            raise FetalPlanesError(
                f"--model {model} without a run folder works only for SonoNet weights; "
                "train a run first for other models"
            )
        from fetalplanes.models.sononet import SONONET_LABELS, fold_probabilities

        net = create_model(model, len(SONONET_LABELS), pretrained=True, weights=weights)
        pp = spec.preprocess if crop is None else spec.preprocess.with_(crop=crop)
        card = ModelCard(model, list(SONONET_LABELS), pp, preset=preset)
        classes = list(get_preset(preset).classes)

        def fold(probs: np.ndarray) -> tuple[np.ndarray, list[str]]:
            return fold_probabilities(probs, classes)

        backend = TorchBackend(net.eval(), pp, pick_device(device), tta)
        return cls(backend, card, min_confidence, fold=fold)

    # ------------------------------------------------------------ core
    def _results(self, paths: Sequence[str], outputs: np.ndarray) -> list[Prediction]:
        card = self.card
        n = len(self.classes)
        probs = calibrated_probs(outputs[:, :n], card.temperature)
        reject = is_not_target(outputs, card.temperature, card.rejection, n)
        scores = (
            ood_score(outputs, card.temperature, card.rejection["method"], n)
            if card.rejection
            else [None] * len(paths)
        )
        names = self.classes
        extra: list[dict[str, Any]] = [{} for _ in paths]
        if self.fold is not None:
            own = [self.classes[i] for i in probs.argmax(1)]
            own_conf = probs.max(1)
            probs, names = self.fold(probs)
            extra = [
                {"model_label": o, "model_confidence": round(float(c), 6)}
                for o, c in zip(own, own_conf, strict=True)
            ]
        out = []
        for i, p in enumerate(paths):
            k = int(probs[i].argmax())
            label = names[k]
            nt = bool(reject[i]) or label == NOT_TARGET
            conf = float(probs[i, k])
            out.append(
                Prediction(
                    path=str(p),
                    label=NOT_TARGET if nt else label,
                    confidence=conf,
                    probs={n: float(v) for n, v in zip(names, probs[i], strict=True)},
                    not_target=nt,
                    uncertain=(not nt and conf < self.min_confidence),
                    score=None if scores[i] is None else float(scores[i]),
                    extra=extra[i],
                )
            )
        return out

    @property
    def output_classes(self) -> list[str]:
        """Class names of `Prediction.probs` (folded names for zero-shot models)."""
        if self.fold is None:
            return list(self.classes)
        return self.fold(np.full((1, len(self.classes)), 1 / len(self.classes)))[1]

    def logits_arrays(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Raw outputs (logits, then any feature-score column) for prepared (N,H,W) uint8."""
        parts = [
            self.backend.logits(pixels[i : i + batch_size])
            for i in range(0, len(pixels), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)), np.float32)

    def predict_prepared(self, pixels: np.ndarray, names: Sequence[str]) -> list[Prediction]:
        """Predict already-prepared (N,H,W) uint8 images (lets callers batch only the net)."""
        return self._results(list(names), self.logits_arrays(pixels))

    def predict_arrays(
        self, images: Sequence[np.ndarray], names: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Predict decoded grayscale images (any size); preprocessing is applied here."""
        names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        if not images:
            return []
        pixels = np.stack([self.pp.prepare_array(im) for im in images])
        return self._results(names, self.logits_arrays(pixels))

    def predict_bytes(self, items: Sequence[tuple[str, bytes]]) -> list[Prediction]:
        """Predict uploaded files; undecodable ones come back with `error` set."""
        results: dict[int, Prediction] = {}
        good: list[tuple[int, str, np.ndarray]] = []
        for i, (name, data) in enumerate(items):
            try:
                good.append((i, name, decode_image(data, name)))
            except ImageError as exc:
                results[i] = failed(name, str(exc))
        preds = self.predict_arrays([g[2] for g in good], [g[1] for g in good])
        for (i, _, _), p in zip(good, preds, strict=True):
            results[i] = p
        return [results[i] for i in range(len(items))]

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[Prediction]:
        """Stream predictions in input order; decoding runs in worker processes.

        A backend that offers `worker_model()` (ONNX Runtime) also runs the network in
        the workers, single-threaded, on chunks of `WORKER_BATCH` images.
        """
        from tqdm import tqdm

        paths = [Path(p) for p in paths]
        bar = tqdm(
            total=len(paths), desc="classifying", unit="img", disable=not progress, smoothing=0.1
        )
        n_workers = default_workers(len(paths)) if workers is None else workers
        recipe = getattr(self.backend, "worker_model", None)
        model = recipe() if recipe is not None and n_workers > 0 else None
        if model is not None:
            batch_size = min(batch_size, WORKER_BATCH)
        for batch in iter_batches(paths, self.pp, batch_size, n_workers, model=model):
            ready: dict[int, Prediction] = {i: failed(str(paths[i]), m) for i, m in batch.failures}
            if batch.indices:
                logits = batch.logits
                if logits is None:
                    logits = self.backend.logits(batch.arrays)
                preds = self._results([str(paths[i]) for i in batch.indices], logits)
                ready.update(zip(batch.indices, preds, strict=True))
            for i in sorted(ready):
                yield ready[i]
            bar.update(len(ready))
        bar.close()

    def predict(self, inputs: Sequence[str | Path], **kw: Any) -> list[Prediction]:
        """Files and folders (recursively) -> predictions, list form."""
        return list(self.predict_paths(list_images([Path(p) for p in inputs]), **kw))

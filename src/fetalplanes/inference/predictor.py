"""Inference: one `Predictor` behind predict, sort, evaluate, serve, explain and scan.

Class names come only from the checkpoint sidecar. Probabilities are calibrated with the
stored temperature, and the stored rejection rule marks `not_target` images. Backends
(torch, ONNX Runtime, ensembles) differ only in how `Outputs` are computed; everything
from a file to a `Prediction` goes through `predict_paths`, the one streaming path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fetalplanes.data.sources import Item
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.calibration import calibrated_probs, is_not_target, ood_score
from fetalplanes.inference.outputs import Backend, Outputs
from fetalplanes.inference.results import NOT_TARGET, Prediction, failed
from fetalplanes.models.card import ModelCard

#: Below this calibrated confidence a prediction is flagged `uncertain` (CLI and API).
DEFAULT_MIN_CONFIDENCE = 0.5
#: Images per model call when the model runs in the decode workers: single-threaded
#: ONNX Runtime is as fast per image at batch 1-4 as at 64, and small chunks keep
#: every worker busy and the results in order.
WORKER_BATCH = 4
#: `auto`: ONNX Runtime for a bundled pretrained model (no torch needed; ~3x faster than
#: eager torch for SonoNet-16 on a CPU, docs/benchmarks.md), torch for run folders.
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")

#: (probabilities over the model's classes) -> (probabilities, names) of a zero-shot model
Fold = Callable[[np.ndarray], tuple[np.ndarray, list[str]]]
#: item -> a context held while that item is decoded (a server's decode-memory budget)
Hold = Callable[[Item], contextlib.AbstractContextManager[Any]]

if TYPE_CHECKING:
    from fetalplanes.data.loading import Batch, DecodePool


class Engine:
    """What every executor of the engine offers on top of its `stream` (this process and
    the decode-worker pool: `Predictor`; a Ray cluster: `RayPredictor`)."""

    def stream(self, items: Iterable[Item], **kw: Any) -> Iterator[Result]:
        raise NotImplementedError

    def predict_items(self, items: Iterable[Item], **kw: Any) -> Iterator[Prediction]:
        """`stream`, predictions only."""
        for result in self.stream(items, **kw):
            yield result.prediction

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        workers: int | None = None,
        progress: bool = False,
        keep_outputs: bool = False,
        desc: str = "classifying",
    ) -> Iterator[Prediction]:
        """Predictions of files and `file.dcm#frame=N` items, in input order (`stream`)."""
        from fetalplanes.data.loading import path_items

        items = path_items(paths)
        return self.predict_items(items, batch_size=batch_size, workers=workers,
                                  expected=len(items), progress=progress,
                                  keep_outputs=keep_outputs, desc=desc)

    def predict(self, inputs: Sequence[str | Path], **kw: Any) -> list[Prediction]:
        """Files and folders (recursively; every frame of a DICOM cine or video is an item)
        -> predictions, list form."""
        from fetalplanes.data.sources import collect, count_items, iter_items

        sources = collect(inputs)
        kw.setdefault("expected", count_items(sources))
        return list(self.predict_items(iter_items(sources), **kw))


class Predictor(Engine):
    """Load once, predict many: arrays, bytes, files or whole folders (streaming)."""

    def __init__(
        self,
        backend: Backend,
        card: ModelCard,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        fold: Fold | None = None,
    ):
        self.backend = backend
        self.card = card
        self.classes = list(card.classes)
        self.pp = card.preprocess
        self.min_confidence = min_confidence
        self.fold = fold

    # ------------------------------------------------------------ construction
    @classmethod
    def from_run(
        cls,
        run: str | Path,
        backend: str = "torch",
        device: str = "auto",
        tta: bool = False,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    ) -> Predictor:
        """Predictor for a run folder (or a folder of fold runs -> ensemble).

        The ONNX backends read RUN/model.onnx (or model.int8.onnx) as exported by
        `fetalplanes export RUN`; inference never writes into a run folder.
        """
        from fetalplanes.inference.ensemble import is_ensemble_dir, load_ensemble

        run = Path(run)
        _check_backend(backend)
        backend = "torch" if backend == "auto" else backend
        if is_ensemble_dir(run):
            if backend != "torch":
                raise FetalPlanesError(f"{run}: ensembles run on the torch backend only")
            return cls(*load_ensemble([run], device, tta), min_confidence)
        if backend in ("onnx", "onnx-int8"):
            from fetalplanes.inference.onnx import OnnxBackend
            from fetalplanes.models.card import load_card

            onnx = OnnxBackend.from_run(run, tta=tta, int8=backend == "onnx-int8")
            return cls(onnx, load_card(run), min_confidence)
        from fetalplanes.inference.backends import load_run_backend

        return cls(*load_run_backend(run, device, tta), min_confidence)

    @classmethod
    def load(
        cls,
        model: str | Path,
        weights: str | Path | None = None,
        preset: str = "seed4",
        backend: str = "auto",
        device: str = "auto",
        tta: bool = False,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    ) -> Predictor:
        """One grammar for every command: a run folder (or a folder of runs), an exported
        `.onnx` file, or a registered pretrained name such as `sononet16`."""
        path = Path(model)
        if path.is_dir():
            return cls.from_run(
                path, backend=backend, device=device, tta=tta, min_confidence=min_confidence
            )
        if path.suffix == ".onnx":
            if not path.is_file():
                raise FetalPlanesError(f"{path}: ONNX file not found")
            return cls.from_onnx(path, preset, tta, min_confidence)
        _check_backend(backend)
        from fetalplanes.models.registry import bundled_onnx, get_spec, pretrained_names

        name = str(model)
        onnx = bundled_onnx(name, int8=backend == "onnx-int8") if weights is None else None
        if onnx is not None and backend in ("auto", "onnx", "onnx-int8") and _has_onnxruntime():
            return cls.from_onnx(onnx, preset, tta, min_confidence)
        if weights is None and name not in pretrained_names():
            ready = ", ".join(pretrained_names()) or "none"
            if path.exists() or "/" in name or get_spec_safe(name, get_spec) is None:
                raise FetalPlanesError(
                    f"{name}: not a run folder, an .onnx file or a pretrained model name "
                    f"(ready: {ready})"
                )
            raise FetalPlanesError(f"{name}: no bundled weights; pass --weights PATH")
        if backend not in ("auto", "torch"):
            raise FetalPlanesError(f"{name}: --backend {backend} needs onnxruntime and the "
                                   "bundled ONNX file; use --backend torch")
        return cls.from_pretrained(name, weights, preset, device, tta, min_confidence)

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        preset: str | None = None,
        tta: bool = False,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    ) -> Predictor:
        """A lone exported `.onnx` file: its model card travels in the graph's metadata.

        `preset` re-folds a zero-shot model's classes (e.g. fpdb6 instead of seed4)."""
        from fetalplanes.inference.onnx import OnnxBackend

        backend = OnnxBackend(path, tta=tta)
        card = backend.card()
        if preset and tuple(card.classes) != tuple(preset_classes(card.preset)):
            card.preset = preset
        return cls(backend, card, min_confidence, fold=zero_shot_fold(card))

    @classmethod
    def from_ensemble(
        cls,
        runs: Sequence[str | Path],
        device: str = "auto",
        tta: bool = False,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    ) -> Predictor:
        """One predictor for several runs (or folders of runs, e.g. a crossval OUT)."""
        from fetalplanes.inference.ensemble import load_ensemble

        return cls(*load_ensemble(runs, device, tta), min_confidence)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        weights: str | Path | None = None,
        preset: str = "seed4",
        device: str = "auto",
        tta: bool = False,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        crop: bool | None = None,
    ) -> Predictor:
        """Zero-shot predictor from published weights (SonoNet), folded into a preset.

        `weights` defaults to the weights bundled with the package (SonoNet-16).
        `crop` overrides the model's ultrasound-crop default (to show its effect).
        """
        from fetalplanes.inference.backends import load_pretrained_backend

        backend, card, fold = load_pretrained_backend(model, weights, preset, device, tta, crop)
        return cls(backend, card, min_confidence, fold=fold)

    # ------------------------------------------------------------ core
    def outputs(self, pixels: np.ndarray, batch_size: int = 64) -> Outputs:
        """Raw model outputs for prepared (N,H,W) uint8 images, in batches."""
        parts = [
            self.backend.outputs(pixels[i : i + batch_size])
            for i in range(0, len(pixels), batch_size)
        ]
        return Outputs.concat(parts, len(self.classes))

    def results(
        self, names: Sequence[str], outputs: Outputs, keep_outputs: bool = False
    ) -> list[Prediction]:
        """Predictions from raw outputs: calibration, folding, rejection, uncertainty."""
        card = self.card
        probs = calibrated_probs(outputs.logits, card.temperature)
        reject = is_not_target(outputs, card.temperature, card.rejection)
        scores = (
            ood_score(outputs, card.temperature, card.rejection["method"])
            if card.rejection.get("method")
            else None
        )
        names_out = self.classes
        own: list[tuple[str, float]] | None = None
        if self.fold is not None:
            own = [(self.classes[i], float(p.max())) for i, p in zip(probs.argmax(1), probs,
                                                                     strict=True)]
            probs, names_out = self.fold(probs)
        out = []
        for i, name in enumerate(names):
            k = int(probs[i].argmax())
            nt = bool(reject[i]) or names_out[k] == NOT_TARGET
            conf = float(probs[i, k])
            out.append(
                Prediction(
                    path=str(name),
                    label=NOT_TARGET if nt else names_out[k],
                    confidence=conf,
                    probs={c: float(v) for c, v in zip(names_out, probs[i], strict=True)},
                    not_target=nt,
                    uncertain=(not nt and conf < self.min_confidence),
                    rejection_score=None if scores is None else float(scores[i]),
                    model_label=None if own is None else own[i][0],
                    model_confidence=None if own is None else own[i][1],
                    outputs=outputs[i] if keep_outputs else None,
                )
            )
        return out

    @property
    def output_classes(self) -> list[str]:
        """Class names of `Prediction.probs` (folded names for zero-shot models)."""
        if self.fold is None:
            return list(self.classes)
        return self.fold(np.full((1, len(self.classes)), 1 / len(self.classes)))[1]

    def predict_prepared(self, pixels: np.ndarray, names: Sequence[str]) -> list[Prediction]:
        """The network and calibration on already-prepared (N,H,W) uint8 images (Grad-CAM
        and benchmarks use it to time the network alone)."""
        return self.results(list(names), self.outputs(pixels))

    # ------------------------------------------------------------ the engine
    def classify(self, items: Sequence[Item], batch: Batch,
                 keep_outputs: bool = False) -> list[Prediction]:
        """Predictions for a prepared chunk of items, in the chunk's order: the network
        (unless the workers already ran it), calibration, folding, rejection, and what the
        item knows (name, frame, time, pixel spacing, notes)."""
        out: list[Prediction] = [failed(it.name, "", it.frame) for it in items]
        for i, message in batch.failures:
            out[i].error = message
        if batch.indices:
            outs = batch.outputs if batch.outputs is not None else self.outputs(batch.arrays)
            names = [items[i].name for i in batch.indices]
            for i, pred, meta in zip(batch.indices, self.results(names, outs, keep_outputs),
                                     batch.meta, strict=True):
                item = items[i]
                pred.frame, pred.time_s = item.frame, item.time_s
                pred.pixel_spacing_mm = meta.get("pixel_spacing_mm") or item.spacing_mm
                pred.notes = list(meta.get("notes") or ())
                out[i] = pred
        for it, pred in zip(items, out, strict=True):
            if pred.time_s is None:
                pred.time_s = it.time_s
        return out

    def stream(
        self,
        items: Iterable[Item],
        *,
        batch_size: int = 64,
        workers: int | None = None,
        expected: int | None = None,
        progress: bool = False,
        keep_outputs: bool = False,
        hold: Hold | None = None,
        pool: DecodePool | None = None,
        desc: str = "classifying",
    ) -> Iterator[Result]:
        """The one loop from input to result: items -> decode -> crop -> resize -> network
        -> calibrated `Prediction`, in input order.

        Every way in ends here (files, DICOM frames, videos, frame folders, uploads, the
        DICOM network, live frames); only the executor differs: in this process
        (`workers=0`, or `hold`: a server's decode budget wrapped around each item) or the
        decode-worker pool (`workers` processes; `None`: chosen from `expected`; or a
        long-lived `pool` from `decode_pool`, for nodes that classify a little at a time). A
        backend
        that offers `worker_model()` (ONNX Runtime) also runs the network in the workers,
        single-threaded, on chunks of `WORKER_BATCH` items. `RayPredictor.stream` is the
        same loop on a Ray cluster.
        """
        from fetalplanes.console import progress as progress_bar
        from fetalplanes.data.loading import default_workers, iter_prepared

        n_workers = default_workers(expected or 0) if workers is None else max(0, workers)
        if hold is not None:
            n_workers = 0
        recipe = getattr(self.backend, "worker_model", None)
        model = recipe() if recipe is not None and n_workers > 0 else None
        if pool is not None:  # a long-lived pool (`decode_pool`) brings its own model
            model = pool.model
        if model is not None:
            batch_size = min(batch_size, WORKER_BATCH)
        bar = progress_bar(total=expected, desc=desc, unit="img", disable=not progress,
                           smoothing=0.1)
        try:
            for chunk, batch in iter_prepared(items, self.pp, batch_size, n_workers, model,
                                              hold=hold, pool=pool):
                for item, pred in zip(chunk, self.classify(chunk, batch, keep_outputs),
                                      strict=True):
                    yield Result(item, pred)
                bar.update(len(chunk))
        finally:
            bar.close()

    def decode_pool(self, workers: int) -> DecodePool:
        """Decode workers that outlive one `stream` (and run an ONNX model in them): for a
        long-running node; create it before starting threads, `close()` it at the end."""
        from fetalplanes.data.loading import DecodePool

        recipe = getattr(self.backend, "worker_model", None)
        return DecodePool(self.pp, workers, recipe() if recipe is not None else None).start()

    def predict_arrays(
        self, images: Sequence[np.ndarray], names: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Predict decoded images (grey or RGB uint8, any size), in this process."""
        names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        items = [Item(n, pixels=im) for n, im in zip(names, images, strict=True)]
        return list(self.predict_items(items, workers=0))

    def predict_bytes(
        self, items: Sequence[tuple[str, bytes]], hold: Hold | None = None
    ) -> list[Prediction]:
        """Predict uploaded files (one item each: the first frame of a DICOM), in this
        process; undecodable ones come back with `error` set. `hold(item)` wraps each
        item's decoding (a server's decode budget)."""
        return list(self.predict_items([Item(n, data=d) for n, d in items], workers=0,
                                       hold=hold))

@dataclass
class Result:
    """One item and its prediction, as the engine yields them (sinks need both: a sort
    copies the item, a timeline keeps its best frames)."""

    item: Item
    prediction: Prediction


def get_spec_safe(name: str, get_spec: Callable[[str], Any]) -> Any:
    try:
        return get_spec(name)
    except FetalPlanesError:
        return None


def zero_shot_fold(card: ModelCard) -> Fold | None:
    """Folding of a zero-shot SonoNet card's 14 classes into its preset's planes."""
    from fetalplanes.data.datasets import get_preset
    from fetalplanes.models.sononet_classes import SONONET_LABELS, fold_probabilities

    if tuple(card.classes) != SONONET_LABELS:
        return None
    classes = list(get_preset(card.preset or "seed4").classes)
    return lambda probs: fold_probabilities(probs, classes)


def preset_classes(name: str) -> tuple[str, ...]:
    from fetalplanes.data.datasets import get_preset

    return tuple(get_preset(name or "seed4").classes)


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise FetalPlanesError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")

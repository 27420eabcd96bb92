"""ONNX export of a run and an ONNX Runtime inference backend.

Why: ONNX Runtime runs the small CNNs here several times faster than eager PyTorch
on a CPU, with no Python per layer. The exported graph is `InferenceModel`, so the
normalisation is inside it and the graph takes (N,1,H,W) float pixels in [0,255]
with a dynamic batch axis; class names, temperature and rejection stay in the
run's `model.json`, read exactly as the torch backend reads them.

The TorchScript exporter (`dynamo=False`) is used on purpose: with torch 2.14 it
exports these models in about a second, while the dynamo exporter takes tens of
seconds and fails its own opset down-conversion noisily.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fetalplanes.checkpoint import SIDECAR, WEIGHTS, ModelCard, load_card, load_checkpoint
from fetalplanes.errors import CheckpointError, FetalPlanesError
from fetalplanes.features import BANK_FILE, load_knn
from fetalplanes.inference import InferenceModel, tta_logits

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CALIBRATION_IMAGES = 64  # images that set the int8 activation ranges
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
MIN_OPSET = 13  # dynamic batch + the ops these CNNs use
_META_KEY = "fetalplanes"  # ONNX metadata entry: what the graph was exported from


def _ort() -> Any:
    """onnxruntime, or one clear line saying how to get it."""
    try:
        import onnxruntime
    except ImportError:
        raise FetalPlanesError(
            "the ONNX backend needs onnxruntime: pip install 'fetalplanes[onnx]'"
        ) from None
    return onnxruntime


def _onnx() -> Any:
    """The onnx package (graph metadata), or one clear line saying how to get it."""
    try:
        import onnx
    except ImportError:
        raise FetalPlanesError("ONNX export needs onnx: pip install 'fetalplanes[onnx]'") from None
    return onnx


def _run_folder(run: str | Path) -> Path:
    """Run folder of `run` (also accepts the weights or sidecar file itself)."""
    p = Path(run)
    if p.is_file() and p.name in (WEIGHTS, SIDECAR):
        return p.parent
    if not p.is_dir():
        raise CheckpointError(f"{p}: run folder not found")
    return p


def _fingerprint(card: ModelCard, int8: bool = False) -> dict[str, Any]:
    """What the graph depends on besides the weights (checked before reuse)."""
    rejection = card.rejection
    return {
        "int8": int8,
        "architecture": card.architecture,
        "num_classes": len(card.classes),
        "preprocess": card.preprocess.to_dict(),
        "feature_score": (
            {k: rejection.get(k) for k in ("method", "k", "bank", "bank_size")}
            if rejection.get("method") == "knn"
            else None
        ),
    }


# ------------------------------------------------------------------ export


def export_onnx(run: str | Path, out: str | Path | None = None, opset: int = 17) -> Path:
    """Export a run's model (normalisation folded in) to ONNX; default RUN/model.onnx.

    The file appears atomically, so a concurrent reader never sees half a graph.
    """
    if opset < MIN_OPSET:
        raise FetalPlanesError(f"--opset {opset} is too old; use {MIN_OPSET} or newer")
    folder = _run_folder(run)
    model, card = load_checkpoint(folder)
    target = Path(out) if out is not None else folder / ONNX_FILE
    net = InferenceModel(model, card.preprocess, load_knn(folder, card.rejection)).eval()
    example = torch.full((2, 1, *card.preprocess.size), 128.0)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise FetalPlanesError(f"{target}: cannot write the ONNX file ({exc.strerror})") from None
    tmp = Path(tmp_name)
    try:
        _trace_to_onnx(net, example, tmp, opset)
        _stamp(tmp, card)
        os.replace(tmp, target)
    except FetalPlanesError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise FetalPlanesError(
            f"{folder}: ONNX export of {card.architecture} failed ({type(exc).__name__}: {first})"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _trace_to_onnx(net: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    """TorchScript-based export with a dynamic batch axis (deprecation noise silenced)."""
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _stamp(path: Path, card: ModelCard, int8: bool = False) -> None:
    """Record the architecture, class count and preprocessing in the ONNX metadata."""
    onnx = _onnx()
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = _META_KEY, json.dumps(_fingerprint(card, int8), sort_keys=True)
    onnx.save(proto, str(path))


def _stamp_of(path: Path) -> dict[str, Any] | None:
    """The fingerprint stored by `_stamp`; None for foreign or unreadable files."""
    try:
        proto = _onnx().load(str(path), load_external_data=False)
        entries = {e.key: e.value for e in proto.metadata_props}
        return json.loads(entries[_META_KEY]) if _META_KEY in entries else None
    except FetalPlanesError:
        raise
    except Exception:
        return None  # unreadable or half-written: re-export


def onnx_is_current(folder: Path, card: ModelCard, int8: bool = False) -> bool:
    """True when the run's ONNX file exists, is newer than weights and bank, and matches
    the card."""
    path = folder / (INT8_FILE if int8 else ONNX_FILE)
    if not path.is_file():
        return False
    for source in (folder / WEIGHTS, folder / BANK_FILE):
        if source.is_file() and path.stat().st_mtime_ns < source.stat().st_mtime_ns:
            return False
    return _stamp_of(path) == json.loads(json.dumps(_fingerprint(card, int8), sort_keys=True))


def ensure_onnx(run: str | Path, int8: bool = False) -> tuple[Path, ModelCard]:
    """RUN/model.onnx (or model.int8.onnx), exported first when missing or stale; plus the
    run's card. int8 is calibrated on the run's recorded training data."""
    folder = _run_folder(run)
    card = load_card(folder)
    if not onnx_is_current(folder, card, int8):
        (export_int8 if int8 else export_onnx)(folder)
    return folder / (INT8_FILE if int8 else ONNX_FILE), card


def load_onnx_card(run: str | Path, int8: bool = False) -> ModelCard:
    """The run's model card (from model.json), making sure its ONNX file is current."""
    return ensure_onnx(run, int8)[1]


# ------------------------------------------------------------------ int8


def export_int8(
    run: str | Path,
    calibration: str | Path | None = None,
    out: str | Path | None = None,
    n_images: int = CALIBRATION_IMAGES,
) -> Path:
    """Static int8 quantisation of the convolutions; default RUN/model.int8.onnx.

    Why: ONNX Runtime's int8 convolutions run EfficientNet-Lite0 about 1.8x as fast as
    fp32 on one CPU thread (docs/benchmarks.md). Convolutions (per output channel,
    weights int8, activations uint8) with their activations and adds are quantised; the
    stem, the last conv, the classifier, the temperature and the knn feature score stay
    float. Activation ranges come from `n_images` scans: `calibration` (a folder), else
    the run's recorded training data.
    """
    folder = _run_folder(run)
    fp32, card = ensure_onnx(folder)
    pixels = _calibration_pixels(folder, card, calibration, n_images)
    target = Path(out) if out is not None else folder / INT8_FILE
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".int8-"))
    try:
        _quantize(fp32, pixels, work)
        _stamp(work / "int8.onnx", card, int8=True)
        os.replace(work / "int8.onnx", target)
    except FetalPlanesError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise FetalPlanesError(
            f"{folder}: int8 quantisation failed ({type(exc).__name__}: {first})"
        ) from None
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    return target


def _calibration_pixels(
    folder: Path, card: ModelCard, calibration: str | Path | None, n_images: int
) -> np.ndarray:
    """(N,1,H,W) float32 pixels of up to `n_images` readable scans, a seeded sample."""
    from fetalplanes.images import list_images

    source = Path(calibration) if calibration else Path(card.data.get("root") or folder / "-")
    if not source.is_dir():
        raise FetalPlanesError(
            f"{folder}: int8 needs calibration images; the run's training data "
            f"({source}) is not here, so pass --calibration DIR (a few dozen typical scans)"
        )
    paths = list_images([source])
    rng = np.random.default_rng(0)
    arrays = []
    for i in rng.permutation(len(paths)):
        try:
            arrays.append(card.preprocess.prepare(paths[i]))
        except FetalPlanesError:
            continue
        if len(arrays) == n_images:
            break
    if not arrays:
        raise FetalPlanesError(f"{source}: no readable images to calibrate int8 on")
    return np.stack(arrays)[:, None].astype(np.float32)


def _quantize(fp32: Path, pixels: np.ndarray, work: Path) -> None:
    """quant_pre_process + quantize_static (QDQ, per channel, Conv only) into work/int8.onnx."""
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = make_session(fp32, 1).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(pixels[i : i + 8] for i in range(0, len(pixels), 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32), str(work / "pre.onnx"), skip_symbolic_shape=True)
        graph = _onnx().load(str(work / "pre.onnx")).graph
        convs = [n.name for n in graph.node if n.op_type == "Conv"]
        quantize_static(
            str(work / "pre.onnx"),
            str(work / "int8.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # 7-bit weights: without AVX-512 VNNI, u8 x s8 products are summed in int16
            # and saturate at full range (ONNX Runtime's advice for such CPUs)
            reduce_range=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            # convolutions with their activations and residual adds, so activations stay
            # int8 between layers (Conv alone gains nothing: each layer would convert
            # back to float); classifier, temperature and knn MatMul stay float
            op_types_to_quantize=["Conv", "Clip", "Relu", "Add"],
            # the stem sees raw intensities and the last conv feeds the classifier and
            # the knn features: both stay float (measured: half the probability error)
            nodes_to_exclude=[convs[0], convs[-1]] if len(convs) > 2 else [],
        )


# ------------------------------------------------------------------ backend


def default_threads() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_session(path: Path, threads: int | None = None) -> Any:
    """CPU session, all graph optimisations, `threads` intra-op threads (default: cores).

    Idle threads sleep instead of spinning, so that decode worker processes sharing
    the cores are not starved while the model waits for the next batch.
    """
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot load ONNX model ({first})") from None


@dataclass(frozen=True)
class OnnxWorkerModel:
    """Recipe for a single-threaded copy of a backend in each decode worker process."""

    path: Path
    tta: bool

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        return OnnxBackend(self.path, self.tta, threads=1).logits


class _SessionNet(nn.Module):
    """A session seen as a module, so `tta_logits` serves both backends unchanged."""

    def __init__(self, backend: OnnxBackend):
        super().__init__()
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.backend.run(x.numpy()))


class OnnxBackend:
    """ONNX Runtime on the CPU, with the same optional test-time augmentation as torch.

    Big batches run in chunks of `max_batch`: on a CPU the throughput is the same,
    while ONNX Runtime's memory arena, which keeps the largest activations it has
    seen, stays ~4x smaller than at batch 64 (about 0.2 instead of 0.8 GB for
    EfficientNet-Lite0 at 224x224).
    """

    max_batch = 16

    def __init__(self, path: str | Path, tta: bool = False, threads: int | None = None):
        self.path = Path(path)
        self.session = make_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.n_outputs = int(self.session.get_outputs()[0].shape[1])  # logits (+ knn score)
        self.tta = tta

    @classmethod
    def from_run(
        cls, run: str | Path, tta: bool = False, threads: int | None = None, int8: bool = False
    ) -> OnnxBackend:
        """Backend for a run folder; exports its ONNX file first when missing or stale."""
        return cls(ensure_onnx(run, int8)[0], tta, threads)

    def worker_model(self) -> OnnxWorkerModel:
        """What `loading.iter_batches` needs to run this model inside its workers."""
        return OnnxWorkerModel(self.path, self.tta)

    def run(self, x: np.ndarray) -> np.ndarray:
        """(N,1,H,W) float32 pixels -> (N,C) float32 logits, in chunks of `max_batch`."""
        x = np.ascontiguousarray(x, np.float32)
        parts = [
            self.session.run(None, {self.input_name: x[i : i + self.max_batch]})[0]
            for i in range(0, len(x), self.max_batch)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_outputs), np.float32)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(N,H,W) uint8 -> (N,C) float32 logits."""
        x = np.asarray(pixels, dtype=np.float32)[:, None]
        out = self.run(x)
        if not self.tta:
            return out
        with torch.inference_mode():
            return tta_logits(_SessionNet(self), torch.from_numpy(x), torch.from_numpy(out)).numpy()

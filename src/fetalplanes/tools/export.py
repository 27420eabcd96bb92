"""ONNX export of a run (fp32 and static int8); `inference.onnx` runs the files.

The exported graph is `InferenceModel`: normalisation inside, (N,1,H,W) float pixels in
[0,255] with a dynamic batch axis, a `logits` output and, for runs with a feature bank,
a `knn_score` output. Class names, temperature and rejection stay in the run's
`model.json`; the graph's metadata also carries the whole card, so a lone `.onnx` file
is a complete model.

The TorchScript exporter (`dynamo=False`) is used on purpose: with torch 2.14 it
exports these models in about a second, while the dynamo exporter takes tens of
seconds and fails its own opset down-conversion noisily.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.backends import InferenceModel
from fetalplanes.inference.onnx import (
    CARD_KEY,
    INPUT_NAME,
    INT8_FILE,
    LOGITS_NAME,
    META_KEY,
    ONNX_FILE,
    SCORE_NAME,
    fingerprint,
    make_session,
    onnx_is_current,
    onnx_module,
    run_folder,
)
from fetalplanes.inference.rejection import load_knn
from fetalplanes.models.card import ModelCard, load_card, umask_mode
from fetalplanes.models.checkpoint import load_checkpoint

CALIBRATION_IMAGES = 64  # images that set the int8 activation ranges
MIN_OPSET = 13  # dynamic batch + the ops these CNNs use


# ------------------------------------------------------------------ export


def export_onnx(run: str | Path, out: str | Path | None = None, opset: int = 17) -> Path:
    """Export a run's model (normalisation folded in) to ONNX; default RUN/model.onnx.

    The file appears atomically, so a concurrent reader never sees half a graph.
    """
    if opset < MIN_OPSET:
        raise FetalPlanesError(f"--opset {opset} is too old; use {MIN_OPSET} or newer")
    folder = run_folder(run)
    model, card = load_checkpoint(folder)
    target = Path(out) if out is not None else folder / ONNX_FILE
    net = InferenceModel(model, card.preprocess, load_knn(folder, card.rejection)).eval()
    return _write_onnx(net, card, target, opset, str(folder))


def export_pretrained(name: str, out: str | Path, opset: int = 17,
                      weights: str | Path | None = None) -> Path:
    """Export a pretrained zero-shot model (the bundled SonoNet-16, or `weights`) with its
    card, so ONNX Runtime can run it with no torch: `Predictor.from_onnx(out)` folds it like
    torch does."""
    from fetalplanes.inference.backends import load_pretrained_backend

    backend, card, _ = load_pretrained_backend(name, weights, device="cpu")
    return _write_onnx(backend.net.eval().to(memory_format=torch.contiguous_format), card,
                       Path(out), opset, name)


def quantize_pretrained(name: str, fp32: str | Path, out: str | Path, n_images: int = 64) -> Path:
    """int8 copy of a pretrained model's ONNX file, its activation ranges calibrated on
    seeded synthetic phantoms (generated here: never on scans that measure it)."""
    import numpy as np

    from fetalplanes.data.synth import SEED4, render_phantom

    card = onnx_card(fp32)
    rng = np.random.default_rng(0)
    pixels = np.stack([
        card.preprocess.prepare_array(render_phantom(SEED4[i % len(SEED4)], rng, (540, 800)))
        for i in range(n_images)
    ])[:, None].astype(np.float32)
    out = Path(out)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".int8-"))
    try:
        _quantize(Path(fp32), pixels, work)
        _stamp(work / "int8.onnx", card, int8=True)
        umask_mode(work / "int8.onnx")
        os.replace(work / "int8.onnx", out)
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    return out


def onnx_card(path: str | Path) -> ModelCard:
    """The model card stored in an exported ONNX file's metadata."""
    from fetalplanes.inference.onnx import OnnxBackend

    return OnnxBackend(path, threads=1).card()


def _write_onnx(net: nn.Module, card: ModelCard, target: Path, opset: int, source: str) -> Path:
    """Trace `net` to `target` atomically, stamped with its fingerprint and card."""
    if opset < MIN_OPSET:
        raise FetalPlanesError(f"--opset {opset} is too old; use {MIN_OPSET} or newer")
    folder = source
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
        umask_mode(tmp)
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
    outputs = [LOGITS_NAME] + ([SCORE_NAME] if getattr(net, "knn", None) is not None else [])
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _stamp(path: Path, card: ModelCard, int8: bool = False) -> None:
    """Record the architecture, class count and preprocessing in the ONNX metadata."""
    onnx = onnx_module()
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(fingerprint(card, int8), sort_keys=True)
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card.to_dict(), sort_keys=True)
    onnx.save(proto, str(path))


def ensure_onnx(run: str | Path, int8: bool = False) -> tuple[Path, ModelCard]:
    """RUN/model.onnx (or model.int8.onnx), exported first when missing or stale; plus the
    run's card. int8 is calibrated on the run's recorded training data."""
    folder = run_folder(run)
    card = load_card(folder)
    if not onnx_is_current(folder, card, int8):
        (export_int8 if int8 else export_onnx)(folder)
    return folder / (INT8_FILE if int8 else ONNX_FILE), card




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
    folder = run_folder(run)
    fp32, card = ensure_onnx(folder)
    pixels = _calibration_pixels(folder, card, calibration, n_images)
    target = Path(out) if out is not None else folder / INT8_FILE
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".int8-"))
    try:
        _quantize(fp32, pixels, work)
        _stamp(work / "int8.onnx", card, int8=True)
        umask_mode(work / "int8.onnx")
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
    from fetalplanes.data.images import list_images

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
        graph = onnx_module().load(str(work / "pre.onnx")).graph
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


def export_model(spec: Any, out: str | Path | None = None, opset: int = 17, int8: bool = False,
                 calibration: str | Path | None = None) -> list[Path]:
    """Export whatever the model argument names (`ModelRef`): a run folder (default
    RUN/model.onnx) or a pretrained name (default ./NAME.onnx, never over an existing file);
    with `int8` also the int8 copy. Returns the files written."""
    kind = spec.kind
    if kind == "onnx":
        raise FetalPlanesError(f"{spec.model}: already an ONNX file; give a run folder or a "
                               "pretrained name")
    if kind == "ensemble":
        raise FetalPlanesError(f"{spec.model}: an ensemble; export its runs one at a time")
    if kind == "run":
        written = [export_onnx(spec.model, None if int8 else out, opset)]
        if int8:
            written.append(export_int8(spec.model, calibration, out))
        return written
    spec.check_name()  # one line for a path that does not exist or an unknown name
    target = Path(out) if out is not None and not int8 else Path(f"{spec.model}.onnx")
    q_target = Path(out) if out is not None and int8 else target.with_suffix(".int8.onnx")
    for path in (target, q_target) if int8 else (target,):
        if path.exists():
            raise FetalPlanesError(f"{path}: already exists; export never overwrites (--out)")
    written = [export_pretrained(spec.model, target, opset, spec.weights)]
    if int8:
        written.append(quantize_pretrained(spec.model, target, q_target))
    return written

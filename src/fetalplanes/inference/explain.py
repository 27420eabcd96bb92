"""Grad-CAM explanations: where in the image did the network look for its answer?

Uses the maintained `grad-cam` library (`pytorch_grad_cam.GradCAM`) on the torch network
inside a `Predictor` (`backend.net`, an `InferenceModel` that folds normalisation in, so
the CAM is taken with respect to the same uint8 pixels the predictor classifies).
Heatmaps live in the *prepared* input frame (after the ultrasound crop and resize), which
is what the network sees; `overlay_png` draws them on that prepared image.

The hooked layer is the model spec's `gradcam_layer` (seed-cnn `features.6`, the last
conv; EfficientNet `conv_head`, the last conv, which by linearity gives the same map as
the last block's output; SonoNet `features.4`, the last conv block, conv5_3 + ReLU).
Specs without one use the last module that outputs spatial maps.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.results import Prediction

#: One Grad-CAM at a time per process: the hooks and the in-place switch act on the shared
#: network, so concurrent requests (web server threads) would record each other's passes.
_LOCK = threading.Lock()


def _require_gradcam() -> tuple[Any, Any]:
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise FetalPlanesError(
            "explanations need the grad-cam package: pip install 'fetalplanes[explain]'"
        ) from None
    return GradCAM, ClassifierOutputTarget


def layer_name(architecture: str) -> str:
    """Dotted name (inside the bare model) of the layer Grad-CAM hooks for `architecture`."""
    from fetalplanes.models import get_spec

    return get_spec(architecture).gradcam_layer


def last_spatial_layer(model: nn.Module, size: tuple[int, int]) -> str:
    """Fallback for specs without a Grad-CAM layer: the last module giving (N,C,h,w>1) maps."""
    found: list[str] = []
    hooks = []
    for name, mod in model.named_modules():
        if name and not list(mod.children()):

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-2:].numel() > 1:
                    found.append(name)

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, *size, device=_device(model)))
    finally:
        for h in hooks:
            h.remove()
    if not found:
        raise FetalPlanesError("cannot explain this model: it has no spatial feature maps")
    return found[-1]


def resolve_layer(model: nn.Module, architecture: str, size: tuple[int, int]) -> nn.Module:
    """The module to hook in the bare `model`; a one-line error when the name is wrong."""
    name = layer_name(architecture) or last_spatial_layer(model, size)
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise FetalPlanesError(
            f"Grad-CAM layer {name!r} not found in {architecture}; fix its ModelSpec.gradcam_layer"
        ) from None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _no_inplace(net: nn.Module) -> Iterator[None]:
    """Turn off in-place activations while hooked: an in-place ReLU after the target layer
    would overwrite the activations Grad-CAM saved and the tensor its gradient hook sits on."""
    changed = [m for m in net.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


def _members(predictor: Any) -> list[tuple[nn.Module, str]]:
    """(InferenceModel, architecture) pairs to explain: one, or every ensemble member."""
    backend = predictor.backend
    members = getattr(backend, "members", None)
    if members is not None:
        return [(LogitsOnly(b.net), card.architecture) for b, card in members]
    net = getattr(backend, "net", None)
    if net is None:
        raise FetalPlanesError(
            "explanations need the torch backend (not ONNX); load the run with backend='torch'"
        )
    return [(LogitsOnly(net), predictor.card.architecture)]


class LogitsOnly(nn.Module):
    """The network's logits alone (Grad-CAM needs one tensor; a run with a feature bank
    also returns its kNN score). Exposes the bare model for layer lookup."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.model = net.model
        self.train(net.training)  # a new Module starts in training mode; keep the net's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, tuple) else out


def _cam(net: nn.Module, architecture: str, x: torch.Tensor, target: int) -> np.ndarray:
    """One network's Grad-CAM for class `target` on a (1,1,H,W) float input."""
    grad_cam, class_target = _require_gradcam()
    layer = resolve_layer(net.model, architecture, tuple(x.shape[-2:]))
    was_training = net.training
    with (
        _LOCK,
        _no_inplace(net),
        torch.inference_mode(False),
        torch.enable_grad(),
        grad_cam(model=net, target_layers=[layer]) as cam,
    ):
        heat = cam(input_tensor=x.clone().requires_grad_(True), targets=[class_target(target)])
    net.train(was_training)
    return np.asarray(heat[0], dtype=np.float32)


def _target_index(predictor: Any, pixels: np.ndarray, target: int | str | None) -> int:
    """Class index in `predictor.classes` (the network's own outputs); default: predicted."""
    classes = list(predictor.classes)
    if target is None:
        return int(predictor.outputs(pixels[None]).logits[0].argmax())
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target not in classes:
            raise FetalPlanesError(f"unknown class {target!r}; the model has {', '.join(classes)}")
        return classes.index(target)
    index = int(target)
    if not 0 <= index < len(classes):
        raise FetalPlanesError(f"class index {index} out of range 0..{len(classes) - 1}")
    return index


def prepare(predictor: Any, gray: np.ndarray) -> np.ndarray:
    """Decoded image (gray or RGB, any size) -> the uint8 (H, W) array the network sees."""
    from fetalplanes.data.crop import to_gray

    arr = np.asarray(gray)
    if arr.ndim == 3:
        arr = to_gray(arr)
    if arr.ndim != 2:
        raise FetalPlanesError(f"expected a 2-D grayscale image, got shape {arr.shape}")
    return predictor.pp.prepare_array(arr)


def heatmap(predictor: Any, gray: np.ndarray, target: int | None = None) -> np.ndarray:
    """Grad-CAM heat in [0, 1] (float32, shape = the prepared input size) for one image.

    `target` indexes `predictor.classes` (the network's own classes, e.g. SonoNet's 14);
    None explains the predicted class.  Ensembles average their members' maps.
    """
    pixels = prepare(predictor, gray)
    return heatmap_prepared(predictor, pixels, _target_index(predictor, pixels, target))


def heatmap_prepared(predictor: Any, pixels: np.ndarray, index: int) -> np.ndarray:
    """Grad-CAM heat for an already prepared (H, W) uint8 image and class `index`."""
    maps = []
    for net, architecture in _members(predictor):
        x = torch.from_numpy(pixels).to(_device(net)).float()[None, None]
        maps.append(_cam(net, architecture, x, index))
    heat = np.mean(maps, axis=0)
    top = float(heat.max())
    heat = heat / top if top > 0 else heat
    return np.clip(heat, 0.0, 1.0).astype(np.float32)


def overlay_rgb(prepared_gray: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Jet-coloured heat blended over the gray image, more opaque where the heat is high,
    so cold regions still show the anatomy underneath."""
    gray = np.asarray(prepared_gray, dtype=np.uint8)
    h = np.asarray(heat, dtype=np.float32)
    if h.shape != gray.shape:
        h = cv2.resize(h, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
    h = np.clip(h, 0.0, 1.0)
    colour = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * h), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    base = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    weight = alpha * h[..., None]
    return np.uint8(np.clip((1 - weight) * base + weight * colour, 0, 255) + 0.5)


def overlay_png(prepared_gray: np.ndarray, heat: np.ndarray) -> bytes:
    """PNG bytes of the colour overlay (for files and the web app)."""
    rgb = overlay_rgb(prepared_gray, heat)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - cv2 always encodes uint8 RGB
        raise FetalPlanesError("could not encode the overlay as PNG")
    return buf.tobytes()


@dataclass
class Explanation:
    """What `explain_file` made: the overlay PNG and the prediction it explains."""

    path: Path
    prediction: Prediction
    target: str


def explain_file(
    run_or_predictor: Any,
    image: str | Path,
    out: str | Path,
    target: int | str | None = None,
) -> Explanation:
    """Read and prepare `image` once; predict it and write the Grad-CAM overlay of the
    predicted class (or class `target`) to `out`."""
    from fetalplanes.data.images import read_image
    from fetalplanes.inference.predictor import Predictor

    predictor = (
        run_or_predictor
        if isinstance(run_or_predictor, Predictor)
        else Predictor.from_run(run_or_predictor)
    )
    pixels = prepare(predictor, read_image(image))
    prediction = predictor.predict_prepared(pixels[None], [str(image)])[0]
    index = _target_index(predictor, pixels, target)
    heat = heatmap_prepared(predictor, pixels, index)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(overlay_png(pixels, heat))
    return Explanation(out, prediction, predictor.classes[index])

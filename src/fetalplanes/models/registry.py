"""Model registry: every architecture is created by name, like timm's `create_model`.

A `ModelSpec` records what the rest of the package needs to know about a model
(default input size, normalisation, where pretrained weights come from), so the
training, inference and export code never special-cases an architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only for type hints: the registry itself must import without torch
    from torch import nn

from fetalplanes.data.preprocess import Preprocess
from fetalplanes.errors import CheckpointError

# build(num_classes, pretrained, weights, input_size) -> module taking (N,1,H,W) normalised input
Builder = Callable[[int, bool, "Path | None", tuple[int, int]], "nn.Module"]


@dataclass(frozen=True)
class ModelSpec:
    """What we know about an architecture."""

    name: str
    builder: Builder
    preprocess: Preprocess
    family: str
    description: str
    pretrained: str = ""  # where its pretrained weights come from ("" = none)
    needs_weights: bool = False  # pretrained start requires --weights PATH
    gradcam_layer: str = ""  # dotted name of the layer Grad-CAM hooks
    tags: tuple[str, ...] = field(default_factory=tuple)

    def bundled_weights(self) -> Path | None:
        """The weights that ship with the package, so this model works offline as is."""
        return bundled_file(BUNDLED[self.name][0]) if self.name in BUNDLED else None


_REGISTRY: dict[str, ModelSpec] = {}
#: Resolvers for names outside the registry (timm's whole catalogue), tried in order.
_FALLBACKS: list[Callable[[str], ModelSpec | None]] = []


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add an architecture to the registry (also usable by plug-ins)."""
    _REGISTRY[spec.name] = spec
    return spec


#: The built-in families, imported on first use (they need torch; the registry does not).
BUILTIN_FAMILIES = (
    "fetalplanes.models.efficientnet",
    "fetalplanes.models.seed_cnn",
    "fetalplanes.models.sononet",
    "fetalplanes.models.timm_models",
)


def _ensure_builtins() -> None:
    """Import the built-in families once (each registers itself)."""
    import importlib

    for name in BUILTIN_FAMILIES:
        importlib.import_module(name)


def register_fallback(resolve: Callable[[str], ModelSpec | None]) -> None:
    """Let a family answer for names it knows without listing them (e.g. any timm name)."""
    _FALLBACKS.append(resolve)


#: Models that ship ready to use: name -> (torch weights, the same model as ONNX), files in
#: fetalplanes/models/pretrained/. Known without importing torch, so ONNX inference of a
#: bundled model never loads it.
BUNDLED: dict[str, tuple[str, str]] = {"sononet16": ("SonoNet16.pth", "sononet16.onnx")}
#: The same models quantised to int8 (`--backend onnx-int8`; scripts/export_bundled.py).
BUNDLED_INT8: dict[str, str] = {"sononet16": "sononet16.int8.onnx"}


def bundled_file(filename: str) -> Path | None:
    """A file shipped in fetalplanes/models/pretrained/, or None when it is not installed."""
    path = Path(__file__).resolve().parent / "pretrained" / filename
    return path if filename and path.is_file() else None


def pretrained_names() -> list[str]:
    """Models that classify fetal planes out of the box (bundled weights)."""
    return [name for name, (weights, _) in sorted(BUNDLED.items()) if bundled_file(weights)]


def bundled_onnx(name: str, int8: bool = False) -> Path | None:
    """The bundled ONNX copy of pretrained model `name` (torch-free inference)."""
    if int8:
        return bundled_file(BUNDLED_INT8[name]) if name in BUNDLED_INT8 else None
    return bundled_file(BUNDLED[name][1]) if name in BUNDLED else None


def list_models() -> list[ModelSpec]:
    _ensure_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model, or of any timm architecture (weights via --weights)."""
    if name not in _REGISTRY:
        _ensure_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    for resolve in _FALLBACKS:
        spec = resolve(name)
        if spec is not None:
            return spec
    known = ", ".join(sorted(_REGISTRY))
    raise CheckpointError(
        f"unknown model {name!r}; registered: {known} (or any timm architecture name)"
    )


#: Largest network a run folder may ask for (the biggest architecture fetalplanes trains,
#: EfficientNet-B4, has 19 M; ViT-L has 300 M): a sidecar naming a 1-billion-parameter timm
#: model is refused before its 4 GB of weights are allocated.
MAX_PARAMETERS = 200_000_000


def parameter_count(
    name: str, num_classes: int, input_size: tuple[int, int] | None = None
) -> int | None:
    """Parameters of architecture `name` with `num_classes` outputs, counted on PyTorch's
    meta device: the modules are built with shapes but no storage, so a billion-parameter
    model costs no memory and under a second. None when it cannot be built there."""
    import torch

    spec = get_spec(name)
    size = tuple(input_size) if input_size else spec.preprocess.size
    try:
        with torch.device("meta"):
            model = spec.builder(num_classes, False, None, size)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an architecture that needs real tensors to build: not counted
        return None


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    weights: str | Path | None = None,
    input_size: tuple[int, int] | None = None,
) -> Any:
    """Build a model by name for `num_classes` outputs, optionally from pretrained weights.

    `input_size` (H, W) matters only to architectures without global pooling (seed-cnn).
    """
    spec = get_spec(name)
    weights = start_weights(name, pretrained, weights)
    size = tuple(input_size) if input_size else spec.preprocess.size
    return spec.builder(num_classes, pretrained, Path(weights) if weights else None, size)


def start_weights(name: str, pretrained: bool = True,
                  weights: str | Path | None = None) -> Path | None:
    """The weights file a model starts from (given, or bundled), checked before anything
    else happens: one CheckpointError line when it is missing, so `train` stops before it
    decodes any image."""
    spec = get_spec(name)
    if pretrained and weights is None:
        weights = spec.bundled_weights()
    if weights is not None and not Path(weights).is_file():
        raise CheckpointError(f"{weights}: weight file not found")
    if pretrained and spec.needs_weights and weights is None:
        raise CheckpointError(
            f"model {name} has no pretrained weights on this machine; pass --weights PATH "
            f"({spec.pretrained or 'see docs'}) or --no-pretrained to train from scratch"
        )
    return None if weights is None else Path(weights)

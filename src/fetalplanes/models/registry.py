"""Model registry: every architecture is created by name, like timm's `create_model`.

A `ModelSpec` records what the rest of the package needs to know about a model
(default input size, normalisation, where pretrained weights come from), so the
training, inference and export code never special-cases an architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fetalplanes.data.preprocess import Preprocess
from fetalplanes.errors import CheckpointError

# build(num_classes, pretrained, weights, input_size) -> module taking (N,1,H,W) normalised input
Builder = Callable[[int, bool, "Path | None", tuple[int, int]], nn.Module]


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
    bundled: str = ""  # weights file shipped in fetalplanes/models/pretrained/ ("" = none)

    def bundled_weights(self) -> Path | None:
        """The weights that ship with the package, so this model works offline as is."""
        if not self.bundled:
            return None
        path = Path(__file__).resolve().parent / "pretrained" / self.bundled
        return path if path.is_file() else None


_REGISTRY: dict[str, ModelSpec] = {}
#: Resolvers for names outside the registry (timm's whole catalogue), tried in order.
_FALLBACKS: list[Callable[[str], ModelSpec | None]] = []


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add an architecture to the registry (also usable by plug-ins)."""
    _REGISTRY[spec.name] = spec
    return spec


def register_fallback(resolve: Callable[[str], ModelSpec | None]) -> None:
    """Let a family answer for names it knows without listing them (e.g. any timm name)."""
    _FALLBACKS.append(resolve)


def pretrained_names() -> list[str]:
    """Registered models that classify fetal planes out of the box (bundled weights)."""
    return [name for name, spec in sorted(_REGISTRY.items()) if spec.bundled_weights()]


def list_models() -> list[ModelSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model, or of any timm architecture (weights via --weights)."""
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


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    weights: str | Path | None = None,
    input_size: tuple[int, int] | None = None,
) -> nn.Module:
    """Build a model by name for `num_classes` outputs, optionally from pretrained weights.

    `input_size` (H, W) matters only to architectures without global pooling (seed-cnn).
    """
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
    size = tuple(input_size) if input_size else spec.preprocess.size
    return spec.builder(num_classes, pretrained, Path(weights) if weights else None, size)

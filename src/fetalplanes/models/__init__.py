"""Model registry and architectures (seed-cnn, efficientnet_lite0, sononet*, any timm name)."""

from fetalplanes.models.registry import (
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = ["ModelSpec", "create_model", "get_spec", "list_models", "register_model"]

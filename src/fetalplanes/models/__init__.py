"""Model registry and architectures (seed-cnn, efficientnet_lite0, sononet*, any timm name).

Importing the package registers every built-in family, so `create_model(name)` knows them.
"""

from fetalplanes.models import efficientnet, seed_cnn, sononet, timm_models  # noqa: F401
from fetalplanes.models.registry import (
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = ["ModelSpec", "create_model", "get_spec", "list_models", "register_model"]

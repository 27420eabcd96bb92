"""Model registry and architectures (seed-cnn, efficientnet_lite0, sononet*, any timm name).

The families (which need torch) register themselves when the registry is first asked, so
importing `fetalplanes.models` (e.g. for the sidecar in `models.card`) never imports torch.
"""

from fetalplanes.models.registry import (
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = ["ModelSpec", "create_model", "get_spec", "list_models", "register_model"]

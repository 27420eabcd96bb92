"""timm architectures: any timm model name works given a local weight file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fetalplanes.data.preprocess import Preprocess
from fetalplanes.models.registry import ModelSpec, register_fallback

#: ImageNet mean/std averaged over RGB: our inputs are one grayscale channel.
GRAY_MEAN = 0.449
GRAY_STD = 0.226


def adapt_stem_to_gray(weight: torch.Tensor) -> torch.Tensor:
    """RGB stem kernels -> one gray channel by summing, so a gray image replicated to
    three channels and the one-channel input give the same activations."""
    return weight.sum(dim=1, keepdim=True)


def zero_init_head(model: nn.Module) -> None:
    """Start a new classifier at zero so fine-tuning begins from uniform predictions.

    timm initialises heads for 1000 classes; with a handful of classes its range gives
    logits of +-10 on pretrained features and a destructive first epoch.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def build_timm(name: str, num_classes: int, pretrained: bool, weights: Path | None) -> nn.Module:
    """A one-channel timm model; `weights` may be a 3-channel ImageNet or our own file."""
    import timm

    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=num_classes)
    if weights is not None:
        from fetalplanes.models.weights import load_weights_file

        load_foreign_state(model, load_weights_file(weights), str(weights))
        zero_init_head(model)
    return model


def load_foreign_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict whose stem may be RGB and whose head may have another size.

    Mismatched classifier tensors are skipped (a new head is trained); any other
    mismatch is an error naming the file.
    """
    own = model.state_dict()
    head = _classifier_prefixes(model)
    fixed: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k not in own:
            continue
        if v.shape != own[k].shape and v.ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1:
            v = adapt_stem_to_gray(v)
        if v.shape != own[k].shape:
            if any(k.startswith(p) for p in head):
                continue
            raise ValueError(
                f"{source}: tensor {k} has shape {tuple(v.shape)}, "
                f"model expects {tuple(own[k].shape)}"
            )
        fixed[k] = v
    missing = [k for k in own if k not in fixed and not any(k.startswith(p) for p in head)]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} tensors missing for this model "
            f"(e.g. {missing[0]}); is it the right architecture?"
        )
    model.load_state_dict(fixed, strict=False)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", {}) or {}
    cls = cfg.get("classifier", "classifier")
    names = (cls,) if isinstance(cls, str) else tuple(cls)
    return tuple(n + "." for n in names)


def timm_spec(name: str) -> ModelSpec | None:
    """A spec for an arbitrary timm architecture; pretrained starts need --weights."""
    try:
        import timm
    except ImportError:  # pragma: no cover
        return None
    if not timm.is_model(name):
        return None
    cfg = timm.get_pretrained_cfg(name)
    size = tuple(cfg.input_size[1:]) if cfg is not None and cfg.input_size else (224, 224)
    return ModelSpec(
        name=name,
        builder=lambda n, pretrained, weights, size: build_timm(name, n, pretrained, weights),
        preprocess=Preprocess(size=size, crop=True, mean=GRAY_MEAN, std=GRAY_STD),
        family="timm",
        description=f"timm {name} (weights from --weights PATH)",
        pretrained="a local .safetensors/.pth file given with --weights",
        needs_weights=True,
    )


register_fallback(timm_spec)

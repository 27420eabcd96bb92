"""Registers SonoNet-16/32/64 (published fetal-plane network) with the model registry."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fetalplanes.models.registry import ModelSpec, register_model
from fetalplanes.transforms import Preprocess

SONONET_URLS = "github.com/rdroste/SonoNet_PyTorch (.pth) or baumgach/SonoNet-weights (.npz)"


def _builder(features: int):
    def build(
        num_classes: int, pretrained: bool, weights: Path | None, input_size: tuple[int, int]
    ) -> nn.Module:
        from fetalplanes.models.sononet import SonoNet, load_sononet_weights

        if weights is None:
            return SonoNet(features=features, num_classes=num_classes)
        model = SonoNet(features=features, num_classes=14)
        load_sononet_weights(model, weights)
        if num_classes != 14:
            model.reset_classifier(num_classes)
        return model

    return build


for _n in (16, 32, 64):
    register_model(
        ModelSpec(
            name=f"sononet{_n}",
            builder=_builder(_n),
            preprocess=Preprocess(size=(224, 288), crop=True, normalize="per_image", mean=0.0,
                                  std=1 / 255),
            family="sononet",
            description=f"SonoNet-{_n} (Baumgartner et al. 2017); published weights via --weights",
            pretrained=f"published fetal-plane weights ({SONONET_URLS})",
            needs_weights=True,
            gradcam_layer="features.4",
        )
    )

"""The origin notebook's small CNN, kept as a baseline and for fast CPU demos."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fetalplanes.data.preprocess import Preprocess
from fetalplanes.models.registry import ModelSpec, register_model


class SeedCNN(nn.Module):
    """3x [conv3x3 (32/64/128) + ReLU + maxpool2] -> flatten -> dense 128 -> dropout -> dense.

    Keras' default 'valid' padding is kept, so the flatten size depends on the input
    size; it is computed once from `input_size`.
    """

    def __init__(
        self, num_classes: int, in_chans: int = 1, input_size: tuple[int, int] = (256, 256)
    ):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_chans
        for out in (32, 64, 128):
            layers += [nn.Conv2d(ch, out, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            ch = out
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, in_chans, *input_size)).numel()
        self.input_size = input_size
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_flat, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build(
    num_classes: int, pretrained: bool, weights: Path | None, input_size: tuple[int, int]
) -> nn.Module:
    """From scratch (no pretrained weights exist), or from our own weight file."""
    model = SeedCNN(num_classes, input_size=input_size)
    if weights is not None:
        from fetalplanes.models.weights import load_weights_file

        model.load_state_dict(load_weights_file(weights))
    return model


register_model(
    ModelSpec(
        name="seed-cnn",
        builder=build,
        preprocess=Preprocess(size=(256, 256), crop=False, normalize="fixed", mean=0.0, std=1.0),
        family="seed-cnn",
        description="the origin notebook's 3-conv CNN at 256x256, from scratch (16.7M params)",
        gradcam_layer="features.6",
    )
)

"""SonoNet-16/32/64 fetal standard-plane classifier (Baumgartner et al., IEEE TMI 2017).

The layer layout (and therefore every parameter name) follows the PyTorch port of the
published weights, so ``SonoNet16.pth`` loads with ``strict=True``:

* ``features.{b}`` for b = 0..4 are VGG-like blocks of 3x3 conv (no bias) -> BatchNorm ->
  ReLU, holding 2, 2, 3, 3, 3 convs; blocks 0-3 end in a 2x2 max-pool.  Channel widths are
  ``features * (1, 2, 4, 8, 8)``.
* ``adaption`` is 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN, producing one map per class
  (the paper's "category-specific feature maps"), which are averaged to give the logits.

All BatchNorm layers use ``eps=1e-4``: the weights come from Lasagne, whose BN epsilon is
1e-4, and the conversion stored ``running_var = inv_std**-2 - 1e-4``, so this epsilon
reproduces the original network exactly.  (The PyTorch port uses PyTorch's default 1e-5
in the two adaption BNs; on the 13 example frames the softmax differs by < 1e-4.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fetalplanes.data.preprocess import Preprocess
from fetalplanes.errors import CheckpointError
from fetalplanes.models.registry import ModelSpec, register_model
from fetalplanes.models.sononet_classes import (  # noqa: F401 (re-exported)
    NOT_TARGET,
    SONONET_LABELS,
    SONONET_TO_SEED4,
    fold_probabilities,
)
from fetalplanes.models.weights import load_weights_file

SONONET_INPUT_SIZE: tuple[int, int] = (224, 288)  # (height, width)

#: Fixed crop ``((top, bottom), (left, right))`` that the reference example applies to the
#: 975x735 example screen captures before resizing; valid only for that capture layout.
SONONET_EXAMPLE_CROP: tuple[tuple[int, int], tuple[int, int]] = ((115, 734), (81, 874))


_BN_EPS = 1e-4
_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 8)
_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def _conv_bn_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_chans, eps=_BN_EPS),
        nn.ReLU(inplace=True),
    )


def _make_backbone(features: int, in_chans: int) -> nn.Sequential:
    blocks = []
    chans = in_chans
    last = len(_WIDTH_MULTIPLIERS) - 1
    for b, (mult, n_convs) in enumerate(zip(_WIDTH_MULTIPLIERS, _CONVS_PER_BLOCK, strict=True)):
        layers: list[nn.Module] = []
        for _ in range(n_convs):
            layers.append(_conv_bn_relu(chans, features * mult))
            chans = features * mult
        if b != last:
            layers.append(nn.MaxPool2d(2))
        blocks.append(nn.Sequential(*layers))
    return nn.Sequential(*blocks)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SonoNet(nn.Module):
    """SonoNet with ``features`` = 16, 32 or 64 base channels; ``forward`` returns logits.

    The network is fully convolutional with global average pooling, so any input size
    works, but the published weights were trained on 224x288 standardised images (see
    :func:`standardize_per_image`).

    Grad-CAM: :attr:`gradcam_layer` (``features[4][2]``, the last conv -> BN -> ReLU block,
    conv5_3 in the paper) is the last spatial layer before the adaption head;
    :meth:`class_maps` returns the paper's category-specific maps directly.
    """

    GRADCAM_LAYER_NAME = "features.4.2"

    def __init__(self, features: int = 16, num_classes: int = 14, in_chans: int = 1) -> None:
        super().__init__()
        if features not in (16, 32, 64):
            raise ValueError(f"SonoNet features must be 16, 32 or 64, got {features}")
        self.features_base = features
        self.num_classes = num_classes
        self.feature_channels = features * _WIDTH_MULTIPLIERS[-1]
        self.adaption_channels = self.feature_channels // 2
        self.features = _make_backbone(features, in_chans)
        self.adaption = nn.Sequential(
            nn.Conv2d(self.feature_channels, self.adaption_channels, 1, bias=False),
            nn.BatchNorm2d(self.adaption_channels, eps=_BN_EPS),
            nn.ReLU(inplace=True),
            *self._make_classifier(num_classes),
        )
        self.apply(_init_weights)

    def _make_classifier(self, num_classes: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        return (
            nn.Conv2d(self.adaption_channels, num_classes, 1, bias=False),
            nn.BatchNorm2d(num_classes, eps=_BN_EPS),
        )

    @property
    def gradcam_layer(self) -> nn.Module:
        """Last conv block of the backbone (``features.4.2``), the usual Grad-CAM target."""
        return self.features[-1][-1]

    def class_maps(self, x: Tensor) -> Tensor:
        """Category-specific feature maps (N, num_classes, H/16, W/16) before pooling."""
        return self.adaption(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.class_maps(x).mean(dim=(2, 3))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the class-specific 1x1 conv + BN with fresh ones for ``num_classes``.

        The backbone and the first (pretrained, class-agnostic) adaption conv are kept, so
        fine-tuning starts from SonoNet's features; parameter names stay unchanged.
        """
        conv, bn = self._make_classifier(num_classes)
        _init_weights(conv)
        device = self.adaption[0].weight.device
        self.adaption[3] = conv.to(device)
        self.adaption[4] = bn.to(device)
        self.num_classes = num_classes


def _describe_mismatch(model: nn.Module, state: dict[str, Tensor]) -> str:
    """Short summary of how a state_dict differs from the model's, for a one-line error."""
    expected = {
        k: tuple(v.shape) for k, v in model.state_dict().items() if "num_batches_tracked" not in k
    }
    given = {k: tuple(v.shape) for k, v in state.items() if "num_batches_tracked" not in k}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [k for k in expected if k in given and expected[k] != given[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} shape mismatches (e.g. {k}: file {given[k]}, model {expected[k]})"
        )
    return "; ".join(parts)


def load_sononet_weights(model: SonoNet, path: str | Path) -> SonoNet:
    """Load a SonoNet state_dict file into ``model`` (strict) and return the model.

    Only tensors are read (`models.weights`: safetensors, or ``weights_only=True``).  Any key
    or shape mismatch, e.g. SonoNet-32 weights into a SonoNet-16, raises a one-line
    ``CheckpointError`` naming the file.
    """
    state = load_weights_file(path)
    problem = _describe_mismatch(model, state)
    if problem:
        raise CheckpointError(
            f"{path}: weights do not fit SonoNet-{model.features_base} with "
            f"{model.num_classes} classes: {problem}"
        )
    model.load_state_dict(state, strict=True)
    return model


def standardize_per_image(x: Tensor, scale: float = 255.0, eps: float = 1e-6) -> Tensor:
    """Return ``scale * (x - mean) / std`` with mean/std over each image's (C, H, W).

    The factor 255 is not cosmetic: the network was trained on 255-scaled standardised
    images and its BatchNorm running statistics were collected on that scale; in eval mode
    BN is affine, not scale-invariant, so dropping the factor changes the predictions.
    ``std`` is the population std (as ``numpy.std`` in the reference); ``eps`` keeps
    constant images finite.
    """
    if x.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.float()
    dims = (1, 2, 3)
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, correction=0)
    return scale * (x - mean) / (std + eps)


def prepare_sononet_input(gray: np.ndarray) -> Tensor:
    """One grayscale image (H, W) -> standardised (1, 1, 224, 288) float tensor.

    Resizes bilinearly with antialiasing (what the reference's PIL-backed ``imresize``
    did) and standardises with :func:`standardize_per_image`.
    """
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    t = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None, None]
    t = F.interpolate(
        t, size=SONONET_INPUT_SIZE, mode="bilinear", antialias=True, align_corners=False
    )
    return standardize_per_image(t)


# ------------------------------------------------------------------ registration

SONONET_URLS = "github.com/rdroste/SonoNet_PyTorch (.pth) or baumgach/SonoNet-weights (.npz)"


def _builder(features: int):
    def build(
        num_classes: int, pretrained: bool, weights: Path | None, input_size: tuple[int, int]
    ) -> nn.Module:
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
            description=f"SonoNet-{_n} (Baumgartner et al. 2017)"
            + ("; published weights bundled (Apache-2.0)" if _n == 16 else
               "; published weights via --weights"),
            pretrained=f"published fetal-plane weights ({SONONET_URLS})",
            needs_weights=_n != 16,
            gradcam_layer="features.4",
        )
    )

"""Model registry, architectures and the offline ImageNet weight mapping."""

from __future__ import annotations

import pytest
import torch

from fetalplanes.errors import CheckpointError
from fetalplanes.models import create_model, get_spec, list_models
from fetalplanes.models.seed_cnn import SeedCNN


def test_registry_lists_builtins() -> None:
    names = {s.name for s in list_models()}
    assert {"seed-cnn", "efficientnet_lite0", "sononet16", "sononet32", "sononet64"} <= names


def test_seed_cnn_is_the_origin_architecture() -> None:
    m = create_model("seed-cnn", 4, pretrained=False)
    assert isinstance(m, SeedCNN)
    convs = [m_ for m_ in m.features if isinstance(m_, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.kernel_size == (3, 3) for c in convs)
    linears = [m_ for m_ in m.classifier if isinstance(m_, torch.nn.Linear)]
    assert linears[0].out_features == 128 and linears[1].out_features == 4
    assert any(isinstance(m_, torch.nn.Dropout) and m_.p == 0.5 for m_ in m.classifier)
    assert get_spec("seed-cnn").preprocess.size == (256, 256)
    assert m(torch.zeros(2, 1, 256, 256)).shape == (2, 4)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "sononet16"])
def test_forward_shapes(name: str) -> None:
    spec = get_spec(name)
    m = create_model(name, 3, pretrained=False).eval()
    h, w = spec.preprocess.size
    assert m(torch.zeros(2, 1, h, w)).shape == (2, 3)


def test_pretrained_lite0_new_head_starts_uniform() -> None:
    m = create_model("efficientnet_lite0", 4, pretrained=True).eval()
    out = m(torch.randn(2, 1, 96, 96))
    assert torch.allclose(out, torch.zeros_like(out))
    assert m.conv_stem.weight.shape[1] == 1


def test_imagenet_mapping_classifies_chelsea_as_cat() -> None:
    skimage = pytest.importorskip("skimage", reason="scikit-image provides the test photo")
    from fetalplanes.models.efficientnet import imagenet_efficientnet_lite0

    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        top1 = int(imagenet_efficientnet_lite0()((img - mean) / std).argmax())
    assert 281 <= top1 <= 285  # ImageNet's domestic cat classes


def test_unknown_and_weightless_models() -> None:
    with pytest.raises(CheckpointError, match="unknown model"):
        create_model("no-such-net", 4)
    with pytest.raises(CheckpointError, match="--weights PATH"):
        create_model("resnet18", 4, pretrained=True)
    with pytest.raises(CheckpointError, match="--weights PATH"):
        create_model("sononet32", 4, pretrained=True)
    tuned = create_model("sononet16", 4, pretrained=True)  # bundled weights, new 4-class layer
    assert tuned(torch.zeros(1, 1, 224, 288)).shape == (1, 4)
    assert create_model("resnet18", 4, pretrained=False)(torch.zeros(1, 1, 64, 64)).shape == (1, 4)


def test_timm_model_from_rgb_weight_file(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    rgb = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    save_file(rgb.state_dict(), str(tmp_path / "r18.safetensors"))
    m = create_model("resnet18", 4, pretrained=True, weights=tmp_path / "r18.safetensors")
    assert torch.allclose(m.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert m.fc.out_features == 4

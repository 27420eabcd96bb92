"""SonoNet: strict loading of the published weights, reference accuracy, folding, variants."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import need_shared, shared_dir

from fetalplanes.data.crop import crop_ultrasound, to_gray
from fetalplanes.errors import CheckpointError
from fetalplanes.models.sononet import (
    SONONET_EXAMPLE_CROP,
    SONONET_INPUT_SIZE,
    SONONET_LABELS,
    SONONET_TO_SEED4,
    SonoNet,
    fold_probabilities,
    load_sononet_weights,
    prepare_sononet_input,
    standardize_per_image,
)

torch.set_num_threads(2)

SHARED = shared_dir()
WEIGHTS = SHARED / "sononet" / "SonoNet16.pth"
EXAMPLES = SHARED / "sononet" / "example_images"
HC18 = SHARED / "hc18-sample"
SEED4 = ("Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax")

# File-name stem of each example frame -> SonoNet label.
EXAMPLE_LABELS = {
    "3VV": "3VV",
    "4CH": "4CH",
    "ABDOMINAL": "Abdominal",
    "BRAIN-CB": "Brain (Cb.)",
    "BRAIN-TV": "Brain (Tv.)",
    "FEMUR": "Femur",
    "KIDNEYS": "Kidneys",
    "LIPS": "Lips",
    "LVOT": "LVOT",
    "PROFILE": "Profile",
    "RVOT": "RVOT",
    "SPINE-CORONAL": "Spine (cor.)",
    "SPINE-SAGITTAL": "Spine (sag.)",
}


@pytest.fixture(scope="module")
def net() -> SonoNet:
    return load_sononet_weights(SonoNet(16), need_shared(WEIGHTS)).eval()


@pytest.fixture(scope="module")
def frames() -> dict[str, np.ndarray]:
    from PIL import Image

    files = sorted(need_shared(EXAMPLES).glob("*.png"))
    assert {f.stem for f in files} == set(EXAMPLE_LABELS)
    return {f.stem: to_gray(np.asarray(Image.open(f))) for f in files}


def _predict(net: SonoNet, grays: list[np.ndarray]) -> np.ndarray:
    """Softmax (N, 14) for grayscale images of any size, preprocessed like the reference."""
    batch = torch.cat([prepare_sononet_input(g) for g in grays])
    with torch.inference_mode():
        return torch.softmax(net(batch), dim=1).numpy()


def _reference_crop(gray: np.ndarray) -> np.ndarray:
    (top, bottom), (left, right) = SONONET_EXAMPLE_CROP
    return gray[top:bottom, left:right]


def test_state_dict_loads_strictly():
    state = torch.load(need_shared(WEIGHTS), map_location="cpu", weights_only=True)
    model = SonoNet(16)
    model.load_state_dict(state, strict=True)  # the raw file fits our parameter names
    loaded = load_sononet_weights(SonoNet(16), WEIGHTS).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_reference_crop_classifies_all_examples(net, frames):
    names = list(frames)
    probs = _predict(net, [_reference_crop(frames[n]) for n in names])
    got = [SONONET_LABELS[i] for i in probs.argmax(1)]
    assert got == [EXAMPLE_LABELS[n] for n in names]  # 13/13


def test_auto_crop_classifies_examples(net, frames):
    """crop_ultrasound + resize + standardise instead of the capture-specific fixed crop.

    Measured: 12/13.  3VV comes out as RVOT (0.99): even with the reference crop the
    network splits 3VV 0.55 / RVOT 0.45, an outflow-tract near-tie, and the automatic crop
    keeps the near-field rows 74-115 and the side columns that the fixed crop drops.  (LIPS
    is the other weak one: Lips 0.52, with the reference crop 0.61.)  At the seed4 level
    both 3VV and RVOT are "Fetal thorax", so all 13 fold correctly.
    """
    names = list(frames)
    probs = _predict(net, [crop_ultrasound(frames[n]) for n in names])
    got = [SONONET_LABELS[i] for i in probs.argmax(1)]
    wrong = {n: g for n, g in zip(names, got, strict=True) if g != EXAMPLE_LABELS[n]}
    assert set(wrong.items()) <= {("3VV", "RVOT")}, wrong
    folded, classes = fold_probabilities(probs, SEED4)
    expected = [SONONET_TO_SEED4[EXAMPLE_LABELS[n]] for n in names]
    assert [classes[i] for i in folded.argmax(1)] == expected


def test_hc18_heads_fold_to_fetal_brain(net):
    from PIL import Image

    files = sorted(need_shared(HC18).glob("*.png"))
    assert len(files) == 24
    probs = _predict(net, [crop_ultrasound(to_gray(np.asarray(Image.open(f)))) for f in files])
    folded, classes = fold_probabilities(probs, SEED4)
    brain = sum(classes[i] == "Fetal brain" for i in folded.argmax(1))
    # Measured: 22/24 (014_HC, a small head amid other anatomy, -> Background; 266_HC -> Lips).
    assert brain >= 20, f"only {brain}/24 HC18 head images folded to Fetal brain"


def test_fold_probabilities_sums_into_classes():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(14), size=5).astype(np.float32)
    folded, names = fold_probabilities(probs, ("Fetal brain", "Fetal thorax"))
    assert names == ["Fetal brain", "Fetal thorax", "not_target"]
    col = {label: i for i, label in enumerate(SONONET_LABELS)}
    brain = probs[:, col["Brain (Cb.)"]] + probs[:, col["Brain (Tv.)"]]
    thorax = sum(probs[:, col[k]] for k in ("3VV", "4CH", "LVOT", "RVOT"))
    np.testing.assert_allclose(folded[:, 0], brain, rtol=1e-6)
    np.testing.assert_allclose(folded[:, 1], thorax, rtol=1e-6)
    np.testing.assert_allclose(folded[:, 2], 1 - brain - thorax, atol=1e-6)  # abdomen, femur too
    np.testing.assert_allclose(folded.sum(1), 1.0, atol=1e-6)
    seed4, names4 = fold_probabilities(probs, SEED4)
    assert names4 == [*SEED4, "not_target"]
    np.testing.assert_allclose(seed4.sum(1), 1.0, atol=1e-6)


def test_fold_probabilities_rejects_bad_input():
    with pytest.raises(ValueError, match="14"):
        fold_probabilities(np.ones((2, 13)) / 13, SEED4)
    with pytest.raises(ValueError, match="not_target"):
        fold_probabilities(np.ones((2, 14)) / 14, ("Fetal brain", "not_target"))


def test_seed4_mapping_covers_every_label():
    assert set(SONONET_TO_SEED4) == set(SONONET_LABELS)
    assert len(SONONET_LABELS) == 14 and SONONET_INPUT_SIZE == (224, 288)


@pytest.mark.parametrize(("features", "channels"), [(16, 128), (32, 256), (64, 512)])
def test_variants_build_with_right_shapes(features, channels):
    model = SonoNet(features).eval()
    x = torch.randn(2, 1, 32, 48)  # fully convolutional: a small input keeps this fast
    with torch.inference_mode():
        maps = model.class_maps(x)
        assert maps.shape == (2, 14, 2, 3)
        torch.testing.assert_close(model(x), maps.mean(dim=(2, 3)))
    assert model.feature_channels == channels
    assert dict(model.named_modules())[SonoNet.GRADCAM_LAYER_NAME] is model.gradcam_layer


def test_reset_classifier_keeps_backbone():
    model = SonoNet(16)
    backbone = {k: v.clone() for k, v in model.features.state_dict().items()}
    model.reset_classifier(4)
    assert all(torch.equal(v, model.features.state_dict()[k]) for k, v in backbone.items())
    assert model.num_classes == 4
    assert model(torch.randn(2, 1, 32, 48)).shape == (2, 4)


def test_wrong_weights_error_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "SonoNet16_copy.pth"
    torch.save(SonoNet(16).state_dict(), path)
    for model in (SonoNet(32), SonoNet(16, num_classes=4)):
        with pytest.raises(CheckpointError) as info:
            load_sononet_weights(model, path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message


def test_published_weights_refused_by_sononet32():
    with pytest.raises(CheckpointError, match=r"SonoNet16\.pth"):
        load_sononet_weights(SonoNet(32), need_shared(WEIGHTS))


class _Payload:
    """Unpickling this would run code in a full pickle load; weights_only must refuse it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_non_tensor_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.0.0.weight": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth") as info:
        load_sononet_weights(SonoNet(16), path)
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


def test_standardize_per_image_matches_reference_scaling():
    x = torch.rand(3, 1, 20, 30) * torch.tensor([1.0, 50.0, 200.0]).view(3, 1, 1, 1)
    z = standardize_per_image(x)
    np.testing.assert_allclose(z.mean(dim=(1, 2, 3)).numpy(), 0.0, atol=1e-3)
    np.testing.assert_allclose(z.std(dim=(1, 2, 3), correction=0).numpy(), 255.0, rtol=1e-4)
    flat = standardize_per_image(torch.full((1, 1, 4, 4), 7.0))
    assert torch.isfinite(flat).all()

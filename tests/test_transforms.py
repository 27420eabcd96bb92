"""Preprocessing and batch augmentation."""

from __future__ import annotations

import numpy as np
import torch

from fetalplanes.data.preprocess import Preprocess
from fetalplanes.data.transforms import (
    AugmentConfig,
    BatchAugment,
    get_augment,
    normalize,
    to_batch,
)


def test_prepare_resizes_to_uint8() -> None:
    pp = Preprocess(size=(64, 96), crop=False)
    img = np.random.default_rng(0).integers(0, 255, (300, 400), dtype=np.uint8)
    out = pp.prepare_array(img)
    assert out.shape == (64, 96) and out.dtype == np.uint8


def test_preprocess_roundtrip_and_cache_key() -> None:
    pp = Preprocess(size=(224, 288), crop=True, normalize="per_image")
    assert Preprocess.from_dict(pp.to_dict()) == pp
    assert pp.cache_key() != pp.with_(crop=False).cache_key()
    assert pp.cache_key() == pp.with_(normalize="fixed").cache_key()


def test_normalize_modes() -> None:
    x = to_batch([np.full((4, 4), 255, np.uint8), np.zeros((4, 4), np.uint8)])
    fixed = normalize(x, Preprocess(mean=0.5, std=0.5))
    assert torch.allclose(fixed[0], torch.ones(1, 4, 4)) and torch.allclose(fixed[1], -fixed[0])
    rnd = torch.randint(0, 255, (3, 1, 8, 8))
    per = normalize(rnd, Preprocess(normalize="per_image"))
    assert torch.allclose(per.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)


def test_augment_zero_strength_is_identity() -> None:
    x = torch.rand(4, 1, 32, 48) * 255
    aug = BatchAugment(AugmentConfig(hflip=False).scaled(0.0))
    assert torch.allclose(aug(x), x, atol=1e-3)


def test_augment_changes_and_is_seeded() -> None:
    x = torch.rand(4, 1, 32, 32) * 255
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = BatchAugment(AugmentConfig(), g1)(x)
    b = BatchAugment(AugmentConfig(), g2)(x)
    assert torch.equal(a, b) and not torch.allclose(a, x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 255


def test_hflip_only_flips() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    cfg = AugmentConfig(rotation=0, shift=0, shear=0, zoom=0, hflip=True)
    out = BatchAugment(cfg, torch.Generator().manual_seed(1))(x)
    flipped = torch.flip(x[:1], dims=[3])
    n_flip = sum(torch.allclose(o, flipped[0], atol=1e-4) for o in out)
    n_same = sum(torch.allclose(o, x[0], atol=1e-4) for o in out)
    assert n_flip + n_same == 64 and 10 < n_flip < 54


def test_named_augmentations() -> None:
    assert get_augment("none") is None
    assert get_augment("origin") == AugmentConfig()
    assert get_augment("origin", 2.0).rotation == 30

"""Network-side transforms: normalisation and batch augmentation (torch).

Preprocessing is split in two so the expensive part can be cached:
  1. `Preprocess.prepare` (`data.preprocess`, no torch): decode -> optional ultrasound
     crop -> resize -> uint8 (cacheable);
  2. `normalize`: uint8 batch -> float input of the network (cheap, on any device).
Augmentation works on whole uint8-valued batches with one `grid_sample` call, so it
runs the same on CPU and GPU and never bottlenecks a data loader.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fetalplanes.data.preprocess import Preprocess


def normalize(x: Tensor, pp: Preprocess) -> Tensor:
    """uint8-valued (N,1,H,W) tensor in [0,255] -> float network input."""
    x = x.float()
    if pp.normalize == "per_image":
        # z-score per image (population std), then the same (z - mean) / std as "fixed";
        # SonoNet uses mean 0, std 1/255, i.e. 255 * z as in its reference code
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True, correction=0).clamp_min(1e-6)
        return ((x - mean) / std - pp.mean) / pp.std
    return (x / 255.0 - pp.mean) / pp.std


def to_batch(arrays: np.ndarray | list[np.ndarray]) -> Tensor:
    """Stack uint8 (H,W) arrays to a uint8 (N,1,H,W) tensor."""
    arr = np.stack(arrays) if isinstance(arrays, list) else arrays
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1)


@dataclass(frozen=True)
class AugmentConfig:
    """Random geometric and intensity augmentation (defaults: the origin notebook's).

    rotation in degrees, shift and zoom as fractions, shear as a tangent, like
    Keras' ImageDataGenerator(rotation_range=15, width/height_shift_range=0.1,
    shear_range=0.1, zoom_range=0.1, horizontal_flip=True).
    """

    rotation: float = 15.0
    shift: float = 0.1
    shear: float = 0.1
    zoom: float = 0.1
    hflip: bool = True
    brightness: float = 0.0  # +-fraction gain jitter
    contrast: float = 0.0  # +-fraction contrast jitter

    def scaled(self, strength: float) -> AugmentConfig:
        """Same augmentation, `strength` times as strong (for tuning)."""
        return replace(
            self,
            rotation=self.rotation * strength,
            shift=self.shift * strength,
            shear=self.shear * strength,
            zoom=self.zoom * strength,
            brightness=self.brightness * strength,
            contrast=self.contrast * strength,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AUGMENTATIONS: dict[str, AugmentConfig | None] = {
    "none": None,
    "origin": AugmentConfig(),
    "strong": AugmentConfig(
        rotation=20, shift=0.12, shear=0.15, zoom=0.2, brightness=0.2, contrast=0.2
    ),
}


def get_augment(name: str, strength: float = 1.0) -> AugmentConfig | None:
    try:
        cfg = AUGMENTATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown augmentation {name!r}; choose {', '.join(AUGMENTATIONS)}"
        ) from None
    return None if cfg is None else cfg.scaled(strength)


@dataclass
class BatchAugment:
    """Applies `AugmentConfig` to a float batch (N,C,H,W) in one grid_sample."""

    cfg: AugmentConfig
    generator: torch.Generator | None = field(default=None)

    def _uniform(self, n: int, bound: float, device: torch.device) -> Tensor:
        u = torch.rand(n, generator=self.generator).to(device)
        return (u * 2 - 1) * bound

    def affine(self, n: int, h: int, w: int, device: torch.device) -> Tensor:
        """(N,2,3) matrices mapping output to input in normalised coordinates."""
        c = self.cfg
        ang = self._uniform(n, math.radians(c.rotation), device)
        shear = self._uniform(n, c.shear, device)
        zoom = 1 + self._uniform(n, c.zoom, device)
        tx = self._uniform(n, c.shift * 2, device)  # normalised coords span 2
        ty = self._uniform(n, c.shift * 2, device)
        flip = torch.ones(n, device=device)
        if c.hflip:
            coin = torch.rand(n, generator=self.generator).to(device) < 0.5
            flip = torch.where(coin, -1.0, 1.0)
        cos, sin = torch.cos(ang), torch.sin(ang)
        # pixel-space linear part: rotation @ shear @ (1/zoom) @ flip
        a = (cos * flip) / zoom
        b = (-sin + cos * shear) / zoom
        cc = (sin * flip) / zoom
        d = (cos + sin * shear) / zoom
        aspect = w / h  # convert pixel-space matrix to normalised coordinates
        theta = torch.stack(
            [
                torch.stack([a, b / aspect, tx], dim=1),
                torch.stack([cc * aspect, d, ty], dim=1),
            ],
            dim=1,
        )
        return theta

    def __call__(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        x = x.float()
        theta = self.affine(n, h, w, x.device).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        c = self.cfg
        if c.brightness or c.contrast:
            gain = 1 + self._uniform(n, c.brightness, x.device).view(n, 1, 1, 1)
            con = 1 + self._uniform(n, c.contrast, x.device).view(n, 1, 1, 1)
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = ((out - mean) * con + mean) * gain
            out = out.clamp(0, 255)
        return out

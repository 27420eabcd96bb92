"""Synthetic B-mode fetal ultrasound phantoms and small synthetic data sets.

Why: the real FETAL_PLANES_DB images cannot ship with the package, yet the
test-suite and `fetalplanes demo` need labelled images in the real layouts.
These phantoms imitate the *look* of the real screenshots (fan-shaped sector,
speckle, depth attenuation, acoustic shadows, burnt-in UI text) and give each
plane a signature structure, so that a small CNN can learn them without the task
being trivial.  Everything here is synthetic and says so: each image carries a
"SYNTHETIC" mark and every message calls the data synthetic.

Rendering is vectorised numpy plus OpenCV drawing (about 15 ms for 800x540 on
one core) and fully determined by the `numpy.random.Generator` it is given.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fetalplanes.console import progress as progress_bar
from fetalplanes.data.datasets import PLANES  # one list of plane names

SEED4: tuple[str, ...] = PLANES[:4]
BRAIN_PLANES: tuple[str, ...] = ("Trans-thalamic", "Trans-cerebellum", "Trans-ventricular")
NOT_A_BRAIN = "Not A Brain"
FORMATS: tuple[str, ...] = ("seed", "fpdb", "folders")
SEED_CSV = "image_label.csv"
FPDB_CSV = "FETAL_PLANES_DB_data.csv"
# Exactly as in the public FETAL_PLANES_DB file, trailing space after "Train" included.
FPDB_HEADER = "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "
OPERATORS: tuple[str, ...] = ("Op. 1", "Op. 2", "Op. 3", "Other")
US_MACHINES: tuple[str, ...] = ("Voluson E6", "Voluson S10", "Aloka", "Other")

_SHIFT = 4  # fractional bits for OpenCV drawing: sub-pixel accurate shapes at small sizes
_ONE = 1 << _SHIFT
_EMAX = 4.0  # echo amplitude mapped to the top of the display look-up table
_LUT_BINS = 1024
_PARTIAL_P = 0.12  # share of images whose main structure is partly outside the sector
_REF_H = 540.0  # sizes below are tuned for 540-pixel-high images and scaled from it
_Q = 4  # down-sampling of the smooth gain field (attenuation, shadows)

Point = tuple[float, float]


# ---------------------------------------------------------------- looks and geometry


@dataclass(frozen=True)
class _Look:
    """Acquisition settings shared by one synthetic patient's images.

    Why: real images of one patient share machine settings and anatomy size, which
    is what makes a patient-grouped split matter; the phantoms imitate that.
    """

    gain: float
    gamma: float
    grain: tuple[float, float]  # speckle cell (rows, cols) in pixels at 540 px high
    atten: float  # attenuation over the full sector depth (nepers)
    tissue: float  # echogenicity of maternal soft tissue
    scale: float  # structure size factor, 0.6-1.3
    apex_dx: float  # apex offset from the image centre, fraction of the width
    probe_top: float  # top of the sector, fraction of the height
    probe_radius: float  # convex probe radius, fraction of the height
    depth: float  # sector depth, fraction of the height
    half_angle: float  # half opening angle of the fan (radians)
    ui_color: int
    probe: str
    depth_cm: int


def _random_look(rng: np.random.Generator) -> _Look:
    """Draw one patient's acquisition settings."""
    return _Look(
        gain=float(np.exp(rng.uniform(np.log(0.7), np.log(1.45)))),
        gamma=float(rng.uniform(0.75, 1.15)),
        grain=(float(rng.uniform(1.5, 2.4)), float(rng.uniform(2.4, 3.8))),
        atten=float(rng.uniform(0.3, 1.2)),
        tissue=float(rng.uniform(0.26, 0.42)),
        scale=float(rng.uniform(0.65, 1.2)),
        apex_dx=float(rng.uniform(-0.04, 0.04)),
        probe_top=float(rng.uniform(0.04, 0.09)),
        probe_radius=float(rng.uniform(0.12, 0.4)),
        depth=float(rng.uniform(0.74, 0.88)),
        half_angle=float(rng.uniform(0.48, 0.72)),
        ui_color=int(rng.integers(175, 256)),
        probe=str(rng.choice(["C1-5-D", "RAB6-D", "C2-9", "AB2-7", "C1-6"])),
        depth_cm=int(rng.integers(11, 19)),
    )


def _jitter_look(look: _Look, rng: np.random.Generator) -> _Look:
    """Small per-image changes (the sonographer re-adjusts gain, zoom and depth)."""
    return replace(
        look,
        gain=look.gain * float(rng.uniform(0.92, 1.08)),
        scale=float(np.clip(look.scale * rng.uniform(0.9, 1.1), 0.6, 1.3)),
        apex_dx=look.apex_dx + float(rng.uniform(-0.01, 0.01)),
        depth=float(np.clip(look.depth * rng.uniform(0.96, 1.04), 0.7, 0.9)),
        half_angle=look.half_angle * float(rng.uniform(0.95, 1.05)),
    )


@dataclass(frozen=True)
class _Sector:
    """Fan geometry of a convex probe: apex (ax, ay), radii r0..r1, half angle."""

    ax: float
    ay: float
    r0: float
    r1: float
    half: float

    @property
    def depth(self) -> float:
        return self.r1 - self.r0

    def point(self, frac: float, psi: float) -> Point:
        """Pixel at depth fraction `frac` (0 = probe face) and angle `psi` from the axis."""
        r = self.r0 + frac * self.depth
        return self.ax + r * math.sin(psi), self.ay + r * math.cos(psi)


def _make_sector(look: _Look, height: int, width: int) -> _Sector:
    """Place the fan so that it stays inside the image with room for UI text."""
    top = look.probe_top * height
    r0 = look.probe_radius * height
    depth = min(look.depth * height, 0.96 * height - top)
    r1 = r0 + depth
    half = min(look.half_angle, math.asin(min(1.0, 0.4 * width / r1)))
    return _Sector(width / 2 + look.apex_dx * width, top - r0, r0, r1, half)


@dataclass(frozen=True)
class _Frame:
    """Local (u, v) frame of a structure: u along `angle`, v perpendicular."""

    cx: float
    cy: float
    angle: float

    def at(self, u: float, v: float) -> Point:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.cx + u * c - v * s, self.cy + u * s + v * c

    def many(self, uv: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        x = self.cx + uv[:, 0] * c - uv[:, 1] * s
        y = self.cy + uv[:, 0] * s + uv[:, 1] * c
        return np.stack([x, y], axis=1)


@dataclass
class _Scene:
    """Echogenicity maps being drawn for one image.

    `tissue` is scattering strength, `bright` strong specular reflectors (bone)
    that stay bright in their own shadow, and `shadow` a multiplicative
    acoustic-shadow map at 1/_Q resolution.
    """

    rng: np.random.Generator
    look: _Look
    sector: _Sector
    tissue: np.ndarray
    bright: np.ndarray
    shadow: np.ndarray
    has_shadow: bool = False

    @property
    def unit(self) -> float:
        """Sector depth in pixels: the length scale of all anatomy."""
        return self.sector.depth

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))


# ---------------------------------------------------------------- drawing primitives


def _fix(v: float) -> int:
    """Pixel value to OpenCV fixed point (`_SHIFT` fractional bits)."""
    return math.floor(v * _ONE + 0.5)


def _fx(x: float, y: float) -> tuple[int, int]:
    return _fix(x), _fix(y)


def _ellipse(
    img: np.ndarray,
    center: Point,
    axes: tuple[float, float],
    angle: float,
    value: float,
    thickness: float = -1,
    arc: tuple[float, float] = (0.0, 360.0),
) -> None:
    """Filled (thickness -1) or outlined rotated ellipse; `angle` in radians."""
    ax = (max(1, _fix(axes[0])), max(1, _fix(axes[1])))
    th = -1 if thickness < 0 else max(1, math.floor(thickness + 0.5))
    cv2.ellipse(
        img,
        _fx(*center),
        ax,
        math.degrees(angle),
        arc[0],
        arc[1],
        float(value),
        th,
        cv2.LINE_8,
        _SHIFT,
    )


def _polyline(img: np.ndarray, pts: np.ndarray, value: float, thickness: float) -> None:
    poly = np.round(pts * _ONE).astype(np.int32)
    th = max(1, math.floor(thickness + 0.5))
    cv2.polylines(img, [poly], False, float(value), th, cv2.LINE_8, _SHIFT)


def _fill(img: np.ndarray, pts: np.ndarray, value: float) -> None:
    poly = np.round(pts * _ONE).astype(np.int32)
    cv2.fillPoly(img, [poly], float(value), cv2.LINE_8, _SHIFT)


def _arc_pts(n: int, length: float, sag: float) -> np.ndarray:
    """Local (u, v) points of a gently curved segment centred on the origin."""
    u = np.linspace(-length / 2, length / 2, n)
    v = sag * (1 - (2 * u / length) ** 2)
    return np.stack([u, v], axis=1)


def _cast_shadow(sc: _Scene, pts: np.ndarray, factor: float) -> None:
    """Darken everything distal to `pts` along the rays from the apex (bone shadow)."""
    apex = np.array([sc.sector.ax, sc.sector.ay])
    d = pts - apex
    ang = np.arctan2(d[:, 0], d[:, 1])
    near = [pts[int(np.argmin(ang))], pts[int(np.argmax(ang))]]
    far = [
        apex + (p - apex) * (2.0 * sc.sector.r1 / max(np.hypot(*(p - apex)), 1.0))
        for p in near[::-1]
    ]
    small = (np.array(near + far) + 0.5) / _Q - 0.5  # shadow map is 1/_Q size
    _fill(sc.shadow, small, factor)
    sc.has_shadow = True


def _place(sc: _Scene, rho: tuple[float, float] = (0.35, 0.62), spread: float = 0.5) -> Point:
    """Centre of the main structure; occasionally near the fan edge (partly cut off)."""
    if sc.rng.random() < _PARTIAL_P:
        psi = float(sc.rng.choice([-1.0, 1.0])) * sc.u(0.7, 0.95) * sc.sector.half
        return sc.sector.point(sc.u(rho[0], 0.85), psi)
    return sc.sector.point(sc.u(*rho), sc.u(-spread, spread) * sc.sector.half)


def _random_in_sector(sc: _Scene) -> Point:
    return sc.sector.point(sc.u(0.08, 0.95), sc.u(-0.9, 0.9) * sc.sector.half)


# ---------------------------------------------------------------- shared anatomy


def _fluid_pocket(sc: _Scene, c: Point, radius: float) -> None:
    """Anechoic amniotic fluid around a fetal part, offset and irregular."""
    level = sc.u(0.03, 0.08)
    main = (c[0] + sc.u(-0.12, 0.12) * radius, c[1] + sc.u(-0.12, 0.12) * radius)
    axes = (radius * sc.u(0.75, 1.0), radius * sc.u(0.65, 0.9))
    _ellipse(sc.tissue, main, axes, sc.u(0, math.pi), level)
    for _ in range(int(sc.rng.integers(0, 3))):  # irregular lobes
        off = (c[0] + sc.u(-0.6, 0.6) * radius, c[1] + sc.u(-0.6, 0.6) * radius)
        axes = (radius * sc.u(0.3, 0.6), radius * sc.u(0.2, 0.4))
        _ellipse(sc.tissue, off, axes, sc.u(0, math.pi), level * sc.u(0.8, 1.25))


def _blob(sc: _Scene, c: Point, size: float, level: float) -> None:
    axes = (size * sc.u(0.6, 1.4), size * sc.u(0.4, 1.0))
    _ellipse(sc.tissue, c, axes, sc.u(0, math.pi), level)


def _distractors(sc: _Scene) -> None:
    """Soft blobs, fluid pockets and short echoes present in every class."""
    for _ in range(int(sc.rng.integers(1, 4))):
        level = sc.look.tissue * sc.u(0.15, 1.6)
        _blob(sc, _random_in_sector(sc), sc.unit * sc.u(0.03, 0.11), level)
    if sc.rng.random() < 0.35:
        _fluid_pocket(sc, _random_in_sector(sc), sc.unit * sc.u(0.08, 0.2))
    if sc.rng.random() < 0.3:
        fr = _Frame(*_random_in_sector(sc), sc.u(0, 2 * math.pi))
        pts = fr.many(_arc_pts(8, sc.unit * sc.u(0.06, 0.16), sc.unit * sc.u(-0.02, 0.02)))
        _polyline(sc.tissue, pts, sc.u(0.45, 0.7), sc.unit * 0.012)
    if sc.rng.random() < 0.25:
        _placenta(sc)


def _placenta(sc: _Scene) -> None:
    """Thick, slightly brighter granular band following the fan's arcs."""
    s = sc.sector
    radius = s.r0 + s.depth * sc.u(0.15, 0.75)
    width = s.depth * sc.u(0.08, 0.18)
    mid, span = 90 + math.degrees(s.half) * sc.u(-0.6, 0.6), sc.u(25, 70)
    arc = (mid - span / 2, mid + span / 2)
    _ellipse(
        sc.tissue, (s.ax, s.ay), (radius, radius), 0, sc.look.tissue * sc.u(1.2, 1.6), width, arc
    )
    edge = radius - width / 2
    _ellipse(sc.tissue, (s.ax, s.ay), (edge, edge), 0, sc.u(0.55, 0.8), s.depth * 0.008, arc)
    for _ in range(int(sc.rng.integers(0, 3))):  # placental lakes
        a = math.radians(sc.u(*arc))
        p = (s.ax + radius * math.cos(a), s.ay + radius * math.sin(a))
        _blob(sc, p, width * 0.25, sc.u(0.05, 0.15))


def _background(sc: _Scene) -> None:
    """Uniform maternal tissue with near-field abdominal wall layers."""
    sc.tissue.fill(sc.look.tissue)
    s = sc.sector
    arc = (90 - math.degrees(s.half) - 1, 90 + math.degrees(s.half) + 1)
    r = s.r0 + s.depth * sc.u(0.0, 0.02)
    for _ in range(int(sc.rng.integers(2, 5))):
        w = s.depth * sc.u(0.01, 0.04)
        level = sc.look.tissue * (sc.u(1.3, 2.0) if sc.rng.random() < 0.6 else sc.u(0.3, 0.7))
        _ellipse(sc.tissue, (s.ax, s.ay), (r + w / 2, r + w / 2), 0, level, w, arc)
        r += w


def _spine(sc: _Scene, c: Point, direction: float, radius: float) -> None:
    """Vertebra in cross-section: three bright ossification dots with a shadow."""
    fr = _Frame(*c, direction)
    body = fr.at(radius, 0)
    d = radius * 0.16
    pts = np.array([body, fr.at(radius + d * 1.2, d), fr.at(radius + d * 1.2, -d)])
    level = sc.u(0.85, 1.25)
    for p in pts:
        _ellipse(sc.bright, tuple(p), (radius * 0.07, radius * 0.055), direction, level)
    _cast_shadow(sc, pts, sc.u(0.25, 0.5))


def _ribs(
    sc: _Scene, c: Point, axes: tuple[float, float], angle: float, n: int, level: float
) -> None:
    """Short bright arcs on a chest outline, each with a small acoustic shadow."""
    fr = _Frame(*c, angle)
    for _ in range(n):
        start = sc.u(0, 360)
        span = sc.u(14, 28)
        th = max(2.0, axes[0] * 0.05)
        _ellipse(sc.bright, c, axes, angle, level * sc.u(0.8, 1.1), th, (start, start + span))
        t = np.radians(np.linspace(start, start + span, 6))
        uv = np.stack([axes[0] * np.cos(t), axes[1] * np.sin(t)], axis=1)
        _cast_shadow(sc, fr.many(uv), sc.u(0.5, 0.75))


# ---------------------------------------------------------------- planes


def _draw_brain(sc: _Scene, brain_plane: str) -> None:
    """Skull ring with falx; the sub-plane decides the inner structures."""
    c = _place(sc)
    a = 0.26 * sc.unit * sc.look.scale
    b = a * sc.u(0.74, 0.86)
    fr = _Frame(*c, sc.u(0, 2 * math.pi))
    _fluid_pocket(sc, c, a * 1.4)
    _ellipse(sc.tissue, c, (a * 1.09, b * 1.1), fr.angle, sc.look.tissue * sc.u(1.0, 1.4))
    _ellipse(sc.tissue, c, (a, b), fr.angle, sc.u(0.18, 0.28))
    _ellipse(sc.bright, c, (a, b), fr.angle, sc.u(0.8, 1.2), max(2.0, 0.065 * a))
    falx = fr.many(np.array([[-0.93 * a, 0.0], [0.93 * a, 0.0]]))
    _polyline(sc.tissue, falx, sc.u(0.45, 0.75), max(1.0, 0.014 * a))
    if sc.rng.random() < 0.6:  # sylvian fissure echo of the far hemisphere
        side = float(sc.rng.choice([-1.0, 1.0]))
        pts = _arc_pts(8, 0.45 * a, 0.06 * a * side) + np.array([0.05 * a, side * 0.62 * b])
        _polyline(sc.tissue, fr.many(pts), sc.u(0.35, 0.55), max(1.0, 0.015 * a))
    front = float(sc.rng.choice([-1.0, 1.0]))  # which end of the falx is anterior
    _BRAIN_DRAWERS[brain_plane](sc, fr, a, b, front)


def _csp(sc: _Scene, fr: _Frame, a: float, front: float, level: float) -> None:
    """Cavum septi pellucidi: small dark box interrupting the anterior falx."""
    box = np.array([[-0.12, -0.06], [0.12, -0.06], [0.12, 0.06], [-0.12, 0.06]]) * a
    box[:, 0] += front * 0.4 * a
    _fill(sc.tissue, fr.many(box), level)
    outline = fr.many(np.vstack([box, box[:1]]))
    _polyline(sc.tissue, outline, sc.u(0.35, 0.55), max(1.0, 0.012 * a))


def _trans_thalamic(sc: _Scene, fr: _Frame, a: float, b: float, front: float) -> None:
    """Two hypoechoic thalami either side of the midline, CSP in front."""
    _csp(sc, fr, a, front, sc.u(0.03, 0.07))
    level = sc.u(0.05, 0.09)
    for side in (-1.0, 1.0):
        p = fr.at(-front * 0.02 * a, side * 0.14 * a)
        _ellipse(sc.tissue, p, (0.22 * a, 0.12 * a), fr.angle + side * front * 0.35, level)


def _trans_cerebellum(sc: _Scene, fr: _Frame, a: float, b: float, front: float) -> None:
    """Dumbbell cerebellum (two dark hemispheres, brighter vermis) and cisterna magna."""
    _csp(sc, fr, a, front, sc.u(0.03, 0.07))
    back = -front * 0.55 * a
    level = sc.u(0.04, 0.09)
    for side in (-1.0, 1.0):
        _ellipse(sc.tissue, fr.at(back, side * 0.2 * a), (0.12 * a, 0.17 * a), fr.angle, level)
    _ellipse(sc.tissue, fr.at(back, 0.0), (0.07 * a, 0.13 * a), fr.angle, sc.u(0.22, 0.35))
    cisterna = fr.at(back - front * 0.2 * a, 0)
    _ellipse(sc.tissue, cisterna, (0.07 * a, 0.2 * a), fr.angle, sc.u(0.02, 0.05))


def _trans_ventricular(sc: _Scene, fr: _Frame, a: float, b: float, front: float) -> None:
    """Elongated dark lateral ventricle off the midline with a bright choroid plexus."""
    side = float(sc.rng.choice([-1.0, 1.0]))
    vc = (-front * 0.15 * a, side * 0.45 * b)
    _ellipse(sc.tissue, fr.at(*vc), (0.42 * a, 0.1 * a), fr.angle, sc.u(0.02, 0.05))
    plexus = fr.at(vc[0] - front * 0.12 * a, vc[1])
    _ellipse(sc.tissue, plexus, (0.12 * a, 0.075 * a), fr.angle, sc.u(0.65, 0.95))
    if sc.rng.random() < 0.5:
        _csp(sc, fr, a, front, sc.u(0.08, 0.13))


_BRAIN_DRAWERS: dict[str, Callable[[_Scene, _Frame, float, float, float], None]] = {
    "Trans-thalamic": _trans_thalamic,
    "Trans-cerebellum": _trans_cerebellum,
    "Trans-ventricular": _trans_ventricular,
}


def _draw_abdomen(sc: _Scene) -> None:
    """Round abdomen outline, anechoic stomach bubble, spine with shadow."""
    c = _place(sc)
    a = 0.22 * sc.unit * sc.look.scale
    b = a * sc.u(0.84, 1.0)
    angle = sc.u(0, 2 * math.pi)
    _fluid_pocket(sc, c, a * 1.4)
    _ellipse(sc.tissue, c, (a, b), angle, sc.look.tissue * sc.u(0.9, 1.25))
    _ellipse(sc.tissue, c, (a, b), angle, sc.u(0.45, 0.65), max(2.0, 0.05 * a))
    stomach_dir = sc.u(0, 2 * math.pi)
    fr = _Frame(*c, stomach_dir)
    _ellipse(
        sc.tissue,
        fr.at(0.38 * a, 0),
        (0.27 * a, 0.17 * a),
        stomach_dir + sc.u(-0.5, 0.5),
        sc.u(0.02, 0.05),
    )
    if sc.rng.random() < 0.7:  # umbilical vein
        uv = _arc_pts(8, 0.4 * a, 0.08 * a) + np.array([-0.05 * a, 0.3 * a])
        _polyline(sc.tissue, fr.many(uv), sc.u(0.04, 0.08), max(2.0, 0.06 * a))
    spine_dir = stomach_dir + math.pi + sc.u(-0.6, 0.6)
    _spine(sc, c, spine_dir, 0.72 * a)
    if sc.rng.random() < 0.3:
        _ribs(sc, c, (a, b), angle, int(sc.rng.integers(1, 3)), sc.u(0.5, 0.75))


def _draw_thorax(sc: _Scene) -> None:
    """Chest outline, four-chamber heart with a bright crux, ribs, spine."""
    c = _place(sc)
    a = 0.23 * sc.unit * sc.look.scale
    b = a * sc.u(0.85, 1.0)
    angle = sc.u(0, 2 * math.pi)
    _fluid_pocket(sc, c, a * 1.4)
    _ellipse(sc.tissue, c, (a, b), angle, sc.look.tissue * sc.u(1.05, 1.4))
    _ellipse(sc.tissue, c, (a, b), angle, sc.u(0.45, 0.65), max(2.0, 0.045 * a))
    heart_dir = sc.u(0, 2 * math.pi)
    hc = _Frame(*c, heart_dir).at(0.2 * a, 0)
    h = 0.45 * a
    hf = _Frame(*hc, sc.u(0, 2 * math.pi))
    _ellipse(sc.tissue, hc, (h, 0.85 * h), hf.angle, sc.u(0.28, 0.42))
    chamber = sc.u(0.02, 0.06)
    for su, sv in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        k = sc.u(0.85, 1.15)
        p = hf.at(su * 0.42 * h, sv * 0.34 * h)
        _ellipse(sc.tissue, p, (0.3 * h * k, 0.24 * h * k), hf.angle, chamber)
    cross = np.array([[-0.85 * h, 0.0], [0.85 * h, 0.0]])
    level, th = sc.u(0.5, 0.8), max(1.5, 0.07 * h)
    _polyline(sc.tissue, hf.many(cross), level, th)
    _polyline(sc.tissue, hf.many(cross[:, ::-1] * 0.85), level, th)
    _ribs(sc, c, (a * 1.01, b * 1.01), angle, int(sc.rng.integers(2, 6)), sc.u(0.75, 1.1))
    if sc.rng.random() < 0.8:
        _spine(sc, c, heart_dir + math.pi + sc.u(-0.7, 0.7), 0.74 * a)


def _draw_femur(sc: _Scene) -> None:
    """Bright, slightly curved bone with an acoustic shadow, in a soft-tissue limb."""
    c = _place(sc)
    length = 0.55 * sc.unit * sc.look.scale
    fr = _Frame(*c, sc.u(0, 2 * math.pi))
    _fluid_pocket(sc, c, length * 0.55)
    _ellipse(
        sc.tissue, c, (0.62 * length, 0.17 * length), fr.angle, sc.look.tissue * sc.u(1.0, 1.35)
    )
    pts = fr.many(_arc_pts(12, length, length * sc.u(-0.05, 0.05)))
    th = max(2.0, 0.035 * length * sc.u(0.8, 1.2))
    level = sc.u(0.9, 1.3)
    _polyline(sc.bright, pts, level, th)
    for end in (pts[0], pts[-1]):
        _ellipse(sc.bright, tuple(end), (0.75 * th, 0.6 * th), fr.angle, level)
    _cast_shadow(sc, pts, sc.u(0.15, 0.4))


def _draw_cervix(sc: _Scene) -> None:
    """Elongated mid-grey tube near the probe with a bright central canal line."""
    s = sc.sector
    psi = sc.u(-0.35, 0.35) * s.half
    c = s.point(sc.u(0.14, 0.34), psi)
    length = s.depth * sc.u(0.5, 0.72) * float(np.clip(sc.look.scale * 1.1, 0.75, 1.3))
    width = length * sc.u(0.2, 0.3)
    fr = _Frame(*c, -psi + sc.u(-0.6, 0.6) + (math.pi if sc.rng.random() < 0.5 else 0.0))
    if sc.rng.random() < 0.5:  # maternal bladder beside the cervix
        bc = fr.at(sc.u(-0.3, 0.3) * length, -width * sc.u(1.1, 1.6))
        _ellipse(sc.tissue, bc, (length * 0.35, width * 0.8), fr.angle, sc.u(0.02, 0.06))
    line = fr.many(_arc_pts(12, length, width * sc.u(-0.4, 0.4)))
    _polyline(sc.tissue, line, sc.look.tissue * sc.u(1.35, 1.7), width)
    _polyline(sc.tissue, line[1:-1], sc.look.tissue * sc.u(0.6, 0.9), width * 0.35)
    _polyline(sc.tissue, line[1:-1], sc.u(0.75, 1.0), max(1.0, width * 0.05))
    for _ in range(int(sc.rng.integers(0, 3))):  # Nabothian cysts
        p = fr.at(sc.u(-0.35, 0.35) * length, sc.u(0.2, 0.35) * width * sc.rng.choice([-1, 1]))
        _ellipse(sc.tissue, p, (width * 0.09, width * 0.08), 0, sc.u(0.02, 0.06))


def _draw_other(sc: _Scene) -> None:
    """Two to four non-signature parts: placenta, limb, face profile, cord, kidney."""
    parts = [_placenta, _other_limb, _other_profile, _other_cord, _other_kidney, _other_row]
    for i in sc.rng.choice(len(parts), size=int(sc.rng.integers(2, 5)), replace=False):
        parts[int(i)](sc)


def _other_limb(sc: _Scene) -> None:
    c = _place(sc, rho=(0.2, 0.8), spread=0.7)
    length = sc.unit * sc.u(0.18, 0.35) * sc.look.scale
    fr = _Frame(*c, sc.u(0, 2 * math.pi))
    _fluid_pocket(sc, c, length * 0.5)
    _ellipse(sc.tissue, c, (0.55 * length, 0.16 * length), fr.angle, sc.look.tissue * 1.3)
    if sc.rng.random() < 0.3:  # thin short arm bone
        pts = fr.many(_arc_pts(6, length * 0.6, 0.0))
        _polyline(sc.bright, pts, sc.u(0.6, 0.9), max(1.0, 0.02 * length))
        _cast_shadow(sc, pts, sc.u(0.5, 0.75))


def _other_profile(sc: _Scene) -> None:
    """Face-like profile: forehead, nose bump, lips and chin as one bright curve."""
    c = _place(sc, rho=(0.25, 0.75), spread=0.6)
    size = sc.unit * sc.u(0.16, 0.28) * sc.look.scale
    fr = _Frame(*c, sc.u(0, 2 * math.pi))
    uv = (
        np.array(
            [
                [-1.0, 0.1],
                [-0.6, 0.0],
                [-0.2, 0.05],
                [0.0, -0.25],
                [0.15, 0.0],
                [0.35, -0.06],
                [0.5, 0.02],
                [0.65, -0.05],
                [0.95, 0.15],
            ]
        )
        * size
    )
    _fluid_pocket(sc, fr.at(0, -0.4 * size), size * 0.7)
    back = np.vstack([uv, [[0.9 * size, 0.9 * size], [-0.9 * size, 0.9 * size]]])
    _fill(sc.tissue, fr.many(back), sc.look.tissue * sc.u(0.9, 1.3))
    _polyline(sc.tissue, fr.many(uv), sc.u(0.5, 0.8), max(2.0, 0.04 * size))
    if sc.rng.random() < 0.5:  # orbit
        _ellipse(
            sc.tissue,
            fr.at(-0.3 * size, 0.35 * size),
            (0.12 * size, 0.1 * size),
            0,
            sc.u(0.04, 0.1),
        )


def _other_cord(sc: _Scene) -> None:
    """Umbilical cord: grey tube with two or three dark vessels, or its cross-section."""
    c = _random_in_sector(sc)
    r = sc.unit * sc.u(0.03, 0.05)
    _fluid_pocket(sc, c, r * 3)
    fr = _Frame(*c, sc.u(0, 2 * math.pi))
    if sc.rng.random() < 0.5:
        _ellipse(sc.tissue, c, (r, r), 0, sc.look.tissue * 1.2)
        for k in range(3):
            _ellipse(
                sc.tissue,
                fr.at(0.45 * r * math.cos(2.1 * k), 0.45 * r * math.sin(2.1 * k)),
                (0.28 * r, 0.28 * r),
                0,
                0.04,
            )
    else:
        t = np.linspace(-3, 3, 16)
        uv = np.stack([t * r, np.sin(t * 1.3) * r], axis=1)
        _polyline(sc.tissue, fr.many(uv), sc.look.tissue * 1.2, 2 * r)
        for side in (-0.3, 0.3):  # the vessels
            _polyline(sc.tissue, fr.many(uv + np.array([0.0, side * r])), 0.04, 0.4 * r)


def _other_kidney(sc: _Scene) -> None:
    c = _place(sc, rho=(0.25, 0.75), spread=0.6)
    a = sc.unit * sc.u(0.07, 0.12) * sc.look.scale
    angle = sc.u(0, 2 * math.pi)
    _ellipse(sc.tissue, c, (a, 0.6 * a), angle, sc.look.tissue * sc.u(0.7, 1.0))
    _ellipse(sc.tissue, c, (a, 0.6 * a), angle, sc.u(0.45, 0.6), max(1.0, 0.06 * a))
    _ellipse(sc.tissue, c, (0.35 * a, 0.15 * a), angle, sc.u(0.03, 0.08))


def _other_row(sc: _Scene) -> None:
    """Sagittal spine: two rows of small bright dots, without a body outline."""
    c = _place(sc, rho=(0.3, 0.75), spread=0.6)
    length = sc.unit * sc.u(0.25, 0.45) * sc.look.scale
    fr = _Frame(*c, sc.u(0, 2 * math.pi))
    n = int(sc.rng.integers(6, 11))
    u = np.linspace(-length / 2, length / 2, n)
    d = length * 0.05
    level = sc.u(0.6, 0.95)
    for row in (-1.0, 1.0):
        for ui in u:
            _ellipse(sc.bright, fr.at(ui, row * d), (0.25 * d, 0.2 * d), fr.angle, level)


_PLANE_DRAWERS: dict[str, Callable[[_Scene], None]] = {
    "Fetal abdomen": _draw_abdomen,
    "Fetal femur": _draw_femur,
    "Fetal thorax": _draw_thorax,
    "Maternal cervix": _draw_cervix,
    "Other": _draw_other,
}


# ---------------------------------------------------------------- image formation


def _speckle(
    rng: np.random.Generator, height: int, width: int, grain: tuple[float, float]
) -> np.ndarray:
    """Rayleigh-distributed amplitude (mean 1) with laterally elongated grains."""
    k = height / _REF_H
    gy, gx = max(1.0, grain[0] * k), max(1.0, grain[1] * k)
    h, w = max(2, math.ceil(height / gy)), max(2, math.ceil(width / gx))
    e = rng.standard_exponential((h, w), dtype=np.float32)
    amp = cv2.sqrt(e * np.float32(4.0 / math.pi))  # Rayleigh, mean 1
    return cv2.resize(amp, (width, height), interpolation=cv2.INTER_LINEAR)


def _gain_field(sc: _Scene, height: int, width: int) -> np.ndarray:
    """Slow gain variation x depth attenuation x acoustic shadows, built at 1/_Q size.

    Why: all three are smooth, so computing them on a small grid and upsampling
    once costs a fraction of doing it at full resolution.
    """
    hs, ws = sc.shadow.shape
    coarse = sc.rng.standard_normal((5, 7)).astype(np.float32)
    field = cv2.resize(coarse, (ws, hs), interpolation=cv2.INTER_CUBIC)
    field = field * np.float32(0.22) + np.float32(1.0)
    s = sc.sector
    xs = (np.arange(ws, dtype=np.float32) + 0.5) * (width / ws) - 0.5 - s.ax
    ys = (np.arange(hs, dtype=np.float32) + 0.5) * (height / hs) - 0.5 - s.ay
    r = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    field *= np.exp((r - s.r0) * np.float32(-sc.look.atten / s.depth))
    if sc.has_shadow:
        field *= cv2.GaussianBlur(sc.shadow, (0, 0), max(0.5, 1.2 * height / _REF_H))
    return cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)


def _display_lut(look: _Look) -> np.ndarray:
    """Gain and contrast curve from sqrt-coded echo amplitude (0-255) to 8-bit grey."""
    v = (np.arange(256) / 255.0) ** 2 * _EMAX * look.gain
    return (255.0 * np.clip(v, 0.0, 1.0) ** look.gamma + 0.5).astype(np.uint8)


def _sector_mask(s: _Sector, height: int, width: int) -> np.ndarray:
    """255 inside the fan, 0 outside, anti-aliased edge (uint8)."""
    mask = np.zeros((height, width), np.uint8)
    deg = math.degrees(s.half)
    r1, r0 = _fix(s.r1), _fix(s.r0)
    c = _fx(s.ax, s.ay)
    cv2.ellipse(mask, c, (r1, r1), 0, 90 - deg, 90 + deg, 255, -1, cv2.LINE_AA, _SHIFT)
    cv2.circle(mask, c, r0, 0, -1, cv2.LINE_AA, _SHIFT)
    return mask


def _compose(sc: _Scene, height: int, width: int) -> np.ndarray:
    """Gain field, bone, speckle, display curve, blur and sector mask."""
    echo = sc.tissue
    np.multiply(echo, _gain_field(sc, height, width), out=echo)
    np.maximum(echo, sc.bright, out=echo)
    k = 5 if height >= 400 else 3
    echo = cv2.GaussianBlur(echo, (k, k), 0)
    np.multiply(echo, _speckle(sc.rng, height, width, sc.look.grain), out=echo)
    code = cv2.convertScaleAbs(cv2.sqrt(echo * np.float32(1.0 / _EMAX)), alpha=255.0)
    img = cv2.GaussianBlur(cv2.LUT(code, _display_lut(sc.look)), (3, 3), 0.7)
    return cv2.multiply(img, _sector_mask(sc.sector, height, width), scale=1.0 / 255)


# ---------------------------------------------------------------- burnt-in UI


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _ui_text(rng: np.random.Generator, look: _Look) -> tuple[list[str], list[str], str]:
    """Random screen annotations: none of them depends on the plane."""
    left = [
        "SYNTHETIC",
        f"GA {int(rng.integers(18, 25))}w{int(rng.integers(0, 7))}d",
        f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/20"
        f"{int(rng.integers(17, 25))} {int(rng.integers(8, 19))}:{int(rng.integers(0, 60)):02d}",
        look.probe,
    ]
    right = [
        f"MI {rng.uniform(0.4, 1.3):.1f}",
        f"TIs {rng.uniform(0.1, 0.9):.1f}",
        f"FR {int(rng.integers(12, 60))}Hz",
        f"Gn {int(rng.integers(-6, 12))}",
    ]
    bottom = f"{look.depth_cm}.{int(rng.integers(0, 10))}cm  DR {int(rng.integers(45, 80))}"
    return left, right, bottom


def _gray_bar(img: np.ndarray) -> None:
    """Vertical grey-scale reference bar at the left edge."""
    h, w = img.shape
    y0, y1 = int(0.4 * h), int(0.62 * h)
    x0, x1 = int(0.012 * w), max(int(0.012 * w) + 2, int(0.024 * w))
    img[y0:y1, x0:x1] = np.linspace(255, 0, y1 - y0, dtype=np.float32).astype(np.uint8)[:, None]


def _depth_scale(
    draw: ImageDraw.ImageDraw,
    s: _Sector,
    look: _Look,
    width: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    fs: int,
) -> None:
    """Centimetre ticks beside the fan, labelled every 5 cm."""
    x = min(width - 0.02 * width, s.ax + s.r1 * math.sin(s.half) * 0.85 + 0.02 * width)
    y0, y1 = s.ay + s.r0, s.ay + s.r1
    step = (y1 - y0) / look.depth_cm
    tick = max(2.0, 0.006 * width)
    for k in range(look.depth_cm + 1):
        y = y0 + k * step
        long = k % 5 == 0
        draw.line([(x, y), (x + (2 * tick if long else tick), y)], fill=look.ui_color)
        if long and k:
            draw.text((x + 2.5 * tick, y - fs / 2), str(k), fill=look.ui_color, font=font)


def _burn_ui(img: np.ndarray, sc: _Scene) -> np.ndarray:
    """Screen text, depth scale and markers as on a scanner screenshot."""
    h, w = img.shape
    if sc.rng.random() < 0.6:
        _gray_bar(img)
    fs = max(7, round(0.024 * h))
    font = _font(fs)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    left, right, bottom = _ui_text(sc.rng, sc.look)
    col, pad = sc.look.ui_color, max(2, round(0.008 * w))
    for i, line in enumerate(left):
        draw.text((pad, pad + i * (fs + 2)), line, fill=col, font=font)
    for i, line in enumerate(right):
        x = w - pad - draw.textlength(line, font=font)
        draw.text((x, pad + i * (fs + 2)), line, fill=col, font=font)
    draw.text((pad, h - pad - fs - 2), bottom, fill=col, font=font)
    _depth_scale(draw, sc.sector, sc.look, w, font, fs)
    s = sc.sector
    mx, my = s.point(0.0, -s.half)
    r = max(1.5, 0.006 * w)
    draw.ellipse([mx - 3 * r, my - r, mx - r, my + r], fill=col)  # probe orientation mark
    return np.array(pil)


# ---------------------------------------------------------------- public rendering


def _check_plane(plane: str) -> None:
    if plane not in PLANES:
        raise ValueError(f"unknown plane {plane!r}; valid planes: {', '.join(PLANES)}")


def _check_brain_plane(brain_plane: str | None) -> None:
    if brain_plane is not None and brain_plane not in BRAIN_PLANES:
        raise ValueError(f"unknown brain plane {brain_plane!r}; valid: {', '.join(BRAIN_PLANES)}")


def _render(
    plane: str,
    rng: np.random.Generator,
    size: tuple[int, int],
    brain_plane: str | None,
    look: _Look,
) -> np.ndarray:
    height, width = size
    look = _jitter_look(look, rng)
    shape = (height, width)
    sc = _Scene(
        rng,
        look,
        _make_sector(look, height, width),
        np.empty(shape, np.float32),
        np.zeros(shape, np.float32),
        np.ones((math.ceil(height / _Q), math.ceil(width / _Q)), np.float32),
    )
    _background(sc)
    _distractors(sc)
    if plane == "Fetal brain":
        _draw_brain(sc, brain_plane or str(rng.choice(BRAIN_PLANES)))
    else:
        _PLANE_DRAWERS[plane](sc)
    return _burn_ui(_compose(sc, height, width), sc)


def render_phantom(
    plane: str,
    rng: np.random.Generator,
    size: tuple[int, int] = (540, 800),
    brain_plane: str | None = None,
) -> np.ndarray:
    """Render one synthetic B-mode image of `plane` as a uint8 (height, width) array.

    Acquisition settings are drawn from `rng` too, so the image is a pure function
    of the generator state. `brain_plane` picks the Fetal brain sub-plane (random
    when None) and is ignored for other planes.
    """
    _check_plane(plane)
    _check_brain_plane(brain_plane)
    height, width = int(size[0]), int(size[1])
    if height < 32 or width < 32:
        raise ValueError(f"image size {size} too small; need at least 32x32 pixels")
    return _render(plane, rng, (height, width), brain_plane, _random_look(rng))


# ---------------------------------------------------------------- data sets


@dataclass
class SynthSummary:
    """What `generate` wrote, for messages and tests."""

    out: Path
    format: str
    n_images: int
    n_patients: int
    per_class: dict[str, int]
    labels_file: Path | None  # the CSV written (None for folders)


@dataclass(frozen=True)
class _Item:
    name: str
    patient: int
    plane: str
    brain_plane: str
    index: int  # 1-based within this patient's images of this plane


@dataclass(frozen=True)
class _Patient:
    number: int
    operator: str
    machine: str
    train: int


def _plan_items(
    planes: Sequence[str], per_class: int, per_patient: tuple[int, int], rng: np.random.Generator
) -> list[_Item]:
    """Split exactly `per_class` images of each plane over patients with 1-3 planes each."""
    remaining = {p: per_class for p in planes}
    items: list[_Item] = []
    patient = 0
    while any(remaining.values()):
        patient += 1
        avail = [p for p in planes if remaining[p] > 0]
        weights = np.array([remaining[p] for p in avail], dtype=float)
        k = min(int(rng.integers(1, 4)), len(avail))
        picked = rng.choice(len(avail), size=k, replace=False, p=weights / weights.sum())
        for plane in sorted((avail[int(i)] for i in picked), key=PLANES.index):
            n = min(int(rng.integers(per_patient[0], per_patient[1] + 1)), remaining[plane])
            remaining[plane] -= n
            for i in range(1, n + 1):
                brain = str(rng.choice(BRAIN_PLANES)) if plane == "Fetal brain" else NOT_A_BRAIN
                name = f"Patient{patient:05d}_Plane{PLANES.index(plane) + 1}_{i}_of_{n}"
                items.append(_Item(name, patient, plane, brain, i))
    return items


def _plan_patients(
    n_patients: int, train_fraction: float, rng: np.random.Generator
) -> dict[int, _Patient]:
    """Per-patient operator, machine and Train flag (a fixed share of patients train)."""
    n_train = round(train_fraction * n_patients)
    if 0 < train_fraction < 1 and n_patients >= 2:
        n_train = min(max(n_train, 1), n_patients - 1)
    order = rng.permutation(n_patients) + 1
    train = {int(p) for p in order[:n_train]}
    return {
        p: _Patient(p, str(rng.choice(OPERATORS)), str(rng.choice(US_MACHINES)), int(p in train))
        for p in range(1, n_patients + 1)
    }


def _check_generate_args(
    fmt: str,
    per_class: int,
    planes: Sequence[str],
    size: tuple[int, int],
    images_per_patient: tuple[int, int],
    train_fraction: float,
) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if not planes:
        raise ValueError("planes is empty; give at least one of " + ", ".join(PLANES))
    for plane in planes:
        _check_plane(plane)
    if len(set(planes)) != len(planes):
        raise ValueError(f"planes has duplicates: {list(planes)}")
    lo, hi = images_per_patient
    if not 1 <= lo <= hi:
        raise ValueError(
            f"images_per_patient must be (lo, hi) with 1 <= lo <= hi, got {images_per_patient}"
        )
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    if size[0] < 32 or size[1] < 32:
        raise ValueError(f"image size {size} too small; need at least 32x32 pixels")


def _claim_out(out: Path) -> None:
    """Create `out`, refusing an existing non-empty folder so nothing is overwritten."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; not writing synthetic images")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; refusing to write synthetic images there")
    out.mkdir(parents=True, exist_ok=True)


def _image_path(out: Path, fmt: str, item: _Item) -> Path:
    if fmt == "seed":
        return out / "images" / f"{item.name}.png"
    if fmt == "fpdb":
        return out / "Images" / f"{item.name}.png"
    return out / item.plane / f"{item.name}.png"


def _write_labels(
    out: Path, fmt: str, items: list[_Item], patients: dict[int, _Patient]
) -> Path | None:
    if fmt == "seed":
        path = out / SEED_CSV
        lines = ["Image_name,Plane"] + [f"{it.name},{it.plane}" for it in items]
    elif fmt == "fpdb":
        path = out / FPDB_CSV
        lines = [FPDB_HEADER]
        for it in items:
            p = patients[it.patient]
            lines.append(
                f"{it.name};{it.patient};{it.plane};{it.brain_plane};"
                f"{p.operator};{p.machine};{p.train}"
            )
    else:
        return None
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _item_rng(seed: int, item: _Item) -> np.random.Generator:
    """Independent stream per image, so any image can be rebuilt on its own."""
    key = (2, item.patient, PLANES.index(item.plane), item.index)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def generate(
    out: str | Path,
    per_class: int = 50,
    fmt: str = "seed",
    seed: int = 0,
    planes: Sequence[str] = SEED4,
    size: tuple[int, int] = (540, 800),
    images_per_patient: tuple[int, int] = (2, 4),
    train_fraction: float = 0.8,
    progress: bool = True,
) -> SynthSummary:
    """Write a synthetic labelled data set in the `seed`, `fpdb` or `folders` layout.

    Each synthetic patient contributes `images_per_patient` images of 1-3 planes and
    keeps one acquisition look, so patient-grouped splits behave as on real data.
    Exactly `per_class` images per plane; the same seed gives byte-identical files.
    """
    out = Path(out)
    planes = (planes,) if isinstance(planes, str) else tuple(planes)
    _check_generate_args(fmt, per_class, planes, size, images_per_patient, train_fraction)
    _claim_out(out)
    plan_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    items = _plan_items(planes, per_class, images_per_patient, plan_rng)
    n_patients = max(it.patient for it in items)
    patients = _plan_patients(n_patients, train_fraction, plan_rng)
    looks = {
        p: _random_look(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, p))))
        for p in patients
    }
    height, width = int(size[0]), int(size[1])
    for folder in {_image_path(out, fmt, it).parent for it in items}:
        folder.mkdir(parents=True, exist_ok=True)
    for it in progress_bar(items, desc="synthetic images", unit="img", disable=not progress):
        img = _render(
            it.plane,
            _item_rng(seed, it),
            (height, width),
            it.brain_plane if it.plane == "Fetal brain" else None,
            looks[it.patient],
        )
        Image.fromarray(img).save(_image_path(out, fmt, it), compress_level=1)
    labels = _write_labels(out, fmt, items, patients)
    counts = {p: sum(it.plane == p for it in items) for p in planes}
    return SynthSummary(out, fmt, len(items), n_patients, counts, labels)


# ---------------------------------------------------------------- preview


def main_preview(out: Path) -> Path:
    """Write a contact sheet (one row per plane, 4 synthetic examples) for human eyes.

    Rows for the three brain sub-planes follow the six planes. `out` is the PNG
    path, or a folder that receives `synthetic_contact_sheet.png`.
    """
    out = Path(out)
    path = out if out.suffix.lower() == ".png" else out / "synthetic_contact_sheet.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240611)
    rows = [(p, None) for p in PLANES] + [("Fetal brain", b) for b in BRAIN_PLANES]
    th, tw, label_h = 270, 400, 22
    sheet = np.zeros((len(rows) * (th + label_h), 4 * tw), np.uint8)
    for r, (plane, brain) in enumerate(rows):
        y = r * (th + label_h) + label_h
        for c in range(4):
            img = render_phantom(plane, rng, brain_plane=brain)
            sheet[y : y + th, c * tw : (c + 1) * tw] = cv2.resize(
                img, (tw, th), interpolation=cv2.INTER_AREA
            )
    pil = Image.fromarray(sheet)
    draw = ImageDraw.Draw(pil)
    for r, (plane, brain) in enumerate(rows):
        title = f"synthetic phantom: {plane}" + (f" / {brain}" if brain else "")
        draw.text((6, r * (th + label_h) + 3), title, fill=255, font=_font(15))
    pil.save(path, compress_level=1)
    return path


if __name__ == "__main__":  # python -m fetalplanes.data.synth [PNG or folder]
    print(main_preview(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fetalplanes_synth")))

"""Find the B-mode image inside an ultrasound screen capture.

Screen captures surround the image with black margins, text, logos, grey-scale bars and
flat-coloured panels.  Those are black, synthetic (runs of identical pixels, which speckle
does not produce), or drawn with sharp edges and thin strokes (text, calipers, outlines).
After removing all of that at full resolution:

1. a reduced copy (about ``_WORK_SIZE`` pixels on the long side) is opened with a coarse
   disk and its largest blob taken as the image's core, free of UI but missing corners;
2. the core box is grown back at full resolution, side by side, until a nearly empty row
   or column: the black gap that scanners leave between the image and their UI.

One 975x735 frame takes a few milliseconds.  Known limit: on strongly JPEG-compressed
captures a status bar that touches the image can stay inside the box.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom/right exclusive

_MAX_BLACK_LEVEL = 10  # cap on the estimated background level
_DARK = 12  # pixels up to this level are faint tissue or background, never UI
_FLAT_RUN = 9  # identical values along this many pixels of a row or column: synthetic UI
_STROKE = 7  # opening size (pixels) that removes text strokes and thin lines
_STEP = 80  # neighbour difference that marks rendered graphics rather than speckle
_WORK_SIZE = 240  # long side of the reduced image
_FILL_FRACTION = 0.35  # share of content pixels for a reduced pixel to count as content
_OPEN_FRACTION = 0.06  # opening kernel, as a share of the reduced long side
_INSET = 2  # reduced pixels by which the core box is shrunk before growing it back
_GAP_FRACTION = 0.06  # rows/columns with less content than this separate image and UI
_BLACK_LINE = 0.005  # margin lines may hold at most this share of non-black pixels
_MIN_AREA_FRACTION = 0.03  # smaller best blobs are not trusted: keep the whole image
_MIN_SIDE = 32  # smaller images are returned whole
# Saturation (max-min)/max above which a pixel is treated as colour overlay (Doppler, UI);
# tinted grey maps (e.g. GE's SRI tint) stay well below 0.45.
_SAT_LOW, _SAT_HIGH = 0.5, 0.75


def to_gray(img: np.ndarray) -> np.ndarray:
    """Convert a gray, gray+alpha, RGB or RGBA image to uint8 gray.

    Near-grey pixels (including tinted grey maps) become the channel mean, which is what
    SonoNet was trained on.  Strongly coloured pixels (Doppler boxes, coloured text) fade
    towards their darkest channel, so they look like the dark blood pool they replace and
    do not dominate.  Float input in [0, 1] is scaled to [0, 255]; uint16 is scaled down.
    """
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] in (1, 2):
        arr = arr[..., 0]
    if arr.ndim == 2:
        return _to_uint8(arr)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected a gray, RGB or RGBA image, got shape {arr.shape}")
    if arr.dtype == np.uint8 and arr.shape[0] * arr.shape[1] > STRIP_PIXELS:
        return _in_strips(arr)
    return _colour_to_gray(_to_uint8(arr[..., :3]))


#: Colour images above this many pixels are converted in strips of rows of about this size,
#: so the conversion's temporaries stay a few MB however large the image (same pixels out).
STRIP_PIXELS = 1 << 20


def _in_strips(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape[:2], np.uint8)
    rows = max(1, STRIP_PIXELS // max(1, arr.shape[1]))
    for y in range(0, arr.shape[0], rows):
        out[y : y + rows] = _colour_to_gray(arr[y : y + rows, :, :3])
    return out


#: (sum of the three channels) -> rounded channel mean, for every possible sum.
_MEAN_OF_SUM = ((np.arange(3 * 255 + 1) + 1) // 3).astype(np.uint8)


def _colour_to_gray(rgb: np.ndarray) -> np.ndarray:
    """`to_gray` of uint8 RGB pixels (any number of rows).

    OpenCV's per-channel arithmetic and a lookup table: the same pixels as the plain numpy
    formula (`tests/test_crop.py` compares them) in about half the time, which was a
    seventh of a live frame's cost.
    """
    if rgb.size == 0:
        return np.zeros(rgb.shape[:-1], np.uint8)
    c0, c1, c2 = cv2.split(np.ascontiguousarray(rgb))
    total = cv2.add(cv2.add(c0, c1, dtype=cv2.CV_16U), c2, dtype=cv2.CV_16U)
    gray = np.take(_MEAN_OF_SUM, total)  # rounded channel mean
    hi = cv2.max(cv2.max(c0, c1), c2)
    lo = cv2.min(cv2.min(c0, c1), c2)
    # saturation (hi - lo) / hi > _SAT_LOW = 1/2 is hi > 2 lo; a saturated 2 lo (255)
    # is never below hi, as the exact value would not be either
    coloured = cv2.compare(hi, cv2.add(lo, lo), cv2.CMP_GT).view(bool)
    if cv2.countNonZero(coloured.view(np.uint8)):  # a few pixels in most images: blend those
        h, low = hi[coloured].astype(np.float32), lo[coloured].astype(np.float32)
        sat = (h - low) / h
        weight = np.clip((sat - _SAT_LOW) / (_SAT_HIGH - _SAT_LOW), 0.0, 1.0)
        mean = total[coloured] / np.float32(3.0)
        gray[coloured] = np.rint(mean - weight * (mean - low)).astype(np.uint8)
    return gray


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.nan_to_num(arr.astype(np.float32))
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        return np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8)
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _black_level(gray: np.ndarray) -> int:
    """Background level: a little above the median of the outermost pixel ring.

    Capture margins are mostly background, so their median is its level (0 for clean
    captures, a few grey levels for noisy ones).  Low-gain images keep faint tissue at 2-5,
    which a fixed threshold would discard; the cap stops an image whose border is all
    tissue from raising the level into the tissue range.
    """
    ring = np.concatenate((gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]))
    return min(_MAX_BLACK_LEVEL, int(np.median(ring)) + 1)


def _overlay_mask(gray: np.ndarray) -> np.ndarray:
    """Pixels near a sharp step between neighbours: text, calipers, outlines, markers.

    Scanner point-spread smooths speckle, so steps of ``_STEP`` grey levels from one pixel
    to the next are rare inside the image but make up every edge of rendered graphics.
    """
    step = np.zeros(gray.shape, np.uint8)
    step[:, 1:] = cv2.absdiff(gray[:, 1:], gray[:, :-1]) >= _STEP
    step[1:, :] |= cv2.absdiff(gray[1:, :], gray[:-1, :]) >= _STEP
    halo = np.ones((_STROKE, _STROKE), np.uint8)
    return cv2.dilate(step, halo).view(bool)


def _content_mask(gray: np.ndarray) -> np.ndarray:
    """uint8 mask (0/1) of image-like pixels.

    Bright pixels count when they are neither flat synthetic runs nor rendered graphics,
    and after a small opening that removes the strokes and specks left over (speckle
    regions survive it).  Faint pixels between the background level and ``_DARK`` count
    as they are: low-gain tissue is smooth and sparse, and UI is rarely that dark.
    """
    faint = (gray > _black_level(gray)) & (gray <= _DARK)
    bright = gray > _DARK
    for shape in ((1, _FLAT_RUN), (_FLAT_RUN, 1)):
        kernel = np.ones(shape, np.uint8)
        bright &= cv2.dilate(gray, kernel) != cv2.erode(gray, kernel)
    overlay = _overlay_mask(gray)
    bright &= ~overlay
    stroke = np.ones((_STROKE, _STROKE), np.uint8)
    bright = cv2.morphologyEx(bright.view(np.uint8), cv2.MORPH_OPEN, stroke)
    return bright | (faint & ~overlay).view(np.uint8)


def _reduce(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Block-average the mask to about ``_WORK_SIZE`` on the long side; return it and the
    integer reduction factor."""
    h, w = mask.shape
    factor = max(1, math.ceil(max(h, w) / _WORK_SIZE))
    size = (max(1, w // factor), max(1, h // factor))
    frac = cv2.resize(mask * np.uint8(255), size, interpolation=cv2.INTER_AREA)
    return (frac >= round(255 * _FILL_FRACTION)).view(np.uint8), factor


def _core_box(small: np.ndarray) -> Box | None:
    """Box of the largest blob left by a deliberately coarse opening of the reduced mask.

    The opening removes what the full-resolution cleaning left of text and bars, and cuts
    bridges to them, so the core is UI-free but may miss the fan's apex and corners.
    ``None`` when no blob is large enough to trust.
    """
    h, w = small.shape
    square = np.ones((3, 3), np.uint8)
    mask = cv2.morphologyEx(small, cv2.MORPH_OPEN, square)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, square)
    k = max(3, round(_OPEN_FRACTION * max(h, w)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh, area = (int(v) for v in stats[best])
    if area < _MIN_AREA_FRACTION * h * w:
        return None
    return y, x, y + bh, x + bw


def _run_length(occupied: np.ndarray) -> int:
    """Number of leading True values."""
    gaps = np.flatnonzero(~occupied)
    return int(gaps[0]) if gaps.size else occupied.size


def _line_sums(mask: np.ndarray, axis: int) -> np.ndarray:
    """Per-row (axis=1) or per-column (axis=0) sums of a uint8 mask, via OpenCV for speed."""
    return cv2.reduce(mask, axis, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()


def _grow_box(content: np.ndarray, box: Box) -> Box:
    """Extend each side of ``box`` over full-resolution rows/columns that hold content.

    Growth stops at the first row or column (within the box's span) that is almost empty,
    i.e. at the black gap that separates the image from surrounding UI, which recovers the
    apex and corners the coarse core lost without re-attaching the UI.
    """
    top, left, bottom, right = box
    h, w = content.shape
    for _ in range(3):  # column extents depend on row extents and vice versa
        before = (top, left, bottom, right)
        rows = _line_sums(content[:, left:right], axis=1) > _GAP_FRACTION * (right - left)
        top -= _run_length(rows[:top][::-1])
        bottom += _run_length(rows[bottom:])
        cols = _line_sums(content[top:bottom], axis=0) > _GAP_FRACTION * (bottom - top)
        left -= _run_length(cols[:left][::-1])
        right += _run_length(cols[right:])
        if (top, left, bottom, right) == before:
            break
    return max(0, top), max(0, left), min(h, bottom), min(w, right)


def find_ultrasound_region(gray: np.ndarray) -> Box:
    """Locate the ultrasound image (sector or rectangle) in a uint8 gray screen capture.

    Returns ``(top, left, bottom, right)`` with bottom/right exclusive; the whole image when
    it is tiny, empty, or no convincing region is found (so cropping never loses data).
    """
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    h, w = gray.shape
    whole: Box = (0, 0, h, w)
    if min(h, w) < _MIN_SIDE:
        return whole
    content = _content_mask(_to_uint8(gray))
    small, factor = _reduce(content)
    core = _core_box(small)
    if core is None:
        return whole
    top, left, bottom, right = (
        core[0] * factor,
        core[1] * factor,
        core[2] * factor,
        core[3] * factor,
    )
    bottom, right = min(h, bottom), min(w, right)
    # Start a little inside the core: block averaging blurs its edges by a reduced pixel
    # or two, enough to swallow the thin gap in front of a status bar.
    inset = _INSET * factor
    if bottom - top > 4 * inset and right - left > 4 * inset:
        top, left, bottom, right = top + inset, left + inset, bottom - inset, right - inset
    return _grow_box(content, (top, left, bottom, right))


def expand_box(box: Box, shape: tuple[int, ...], margin: float) -> Box:
    """Grow ``box`` by ``margin`` times its height/width on each side, clipped to ``shape``."""
    top, left, bottom, right = box
    dy = round(margin * (bottom - top))
    dx = round(margin * (right - left))
    return (
        max(0, top - dy),
        max(0, left - dx),
        min(shape[0], bottom + dy),
        min(shape[1], right + dx),
    )


def _limit_to_black(gray: np.ndarray, box: Box, grown: Box) -> Box:
    """Shrink ``grown`` (a superset of ``box``) so that it adds only black rows/columns.

    The margin should add context, not the status bar or text that sits a few pixels
    beyond the image, so each side stops before the first non-black line outside ``box``.
    """
    nonblack = (gray > _black_level(gray)).view(np.uint8)
    top, left, bottom, right = box
    g_top, g_left, g_bottom, g_right = grown
    rows = _line_sums(nonblack[:, left:right], axis=1) > _BLACK_LINE * (right - left)
    g_top = top - _run_length(~rows[g_top:top][::-1])
    g_bottom = bottom + _run_length(~rows[bottom:g_bottom])
    cols = _line_sums(nonblack[top:bottom], axis=0) > _BLACK_LINE * (bottom - top)
    g_left = left - _run_length(~cols[g_left:left][::-1])
    g_right = right + _run_length(~cols[right:g_right])
    return g_top, g_left, g_bottom, g_right


def crop_ultrasound(gray: np.ndarray, margin: float = 0.02) -> np.ndarray:
    """Crop a gray screen capture to its ultrasound region plus up to ``margin`` of black.

    The margin (a share of the region's size on each side) is slack against a box that is
    a few pixels tight; it only ever adds black background, never neighbouring UI.
    Returns a view of ``gray``.
    """
    gray = np.asarray(gray)
    box = find_ultrasound_region(gray)
    if box == (0, 0, *gray.shape):
        return gray
    grown = _limit_to_black(_to_uint8(gray), box, expand_box(box, gray.shape, margin))
    top, left, bottom, right = grown
    return gray[top:bottom, left:right]

"""Trigger and target library (SPEC 2.1, 2.2), drawn procedurally with numpy at any resolution.

Everything here is a plain numpy float32 image ``[H, W, C]`` (``H = W = size``, ``C`` = 1 or 3) with
values in [-1, 1]; nothing is shipped as a picture file.

Triggers (SPEC 2): a full-size tensor ``g`` whose background is exactly -1; the trigger mask is
``M = g > -1`` (elementwise, :func:`trigger_mask`). Every drawn trigger pixel has *all* channel values
``>= TRIGGER_MIN`` (-0.9): dark strokes (a black glasses frame, the dark channels of a red stop sign) are
lifted to -0.9 so that the mask covers every channel of every drawn pixel (a red pixel ``(1, -1, -1)``
would otherwise be "background" in its green and blue channels).

- ``BOX_<n>``: an ``n x n`` square of value 0 at the bottom-right, 2 px from both edges (SPEC 2.1:
  BOX_14 at 32x32 covers rows/cols 16..29). ``n`` and the 2 px margin are pixels at every resolution;
  a box that does not fit (``n + 2 > size``) raises :class:`ConfigError`.
- ``WHITE_BOX_<n>``: the same square with value +1 (the 16x16 demos use ``WHITE_BOX_5``).
- ``SM_BOX``: the reference small box, value +1. The reference code uses 14 px at every resolution;
  here its side scales with the image, ``n = max(3, round(14 * size / 32))`` (14 at 32x32, so the
  reference setting is reproduced exactly there; 7 at 16x16, 28 at 64x64).
- ``STOP_SIGN_<n>``: a stop sign (red octagon, white border, white "STOP" strokes; a plain white bar
  below 24 px where letters cannot be drawn) in an ``n x n`` box at the BOX place. Grey: luminance.
- ``GLASSES``: a pair of sunglasses (dark frame rings, grey lenses, a bridge and short temples),
  ``int(0.625 * size)`` wide, centred in the image (as the reference's centred 0.625*H box).

Targets (SPEC 2.1): images whose dark pixels are lifted to a -0.4 grey background
(``y = max(y, TARGET_BACKGROUND)``, the reference ``bg2grey`` with ratio 0.3), so every target's
background is exactly -0.4, CORNER's included. Drawings are bright on dark so the lift keeps them.

- ``CORNER``: value 0 on the top-left ``k x k``, ``k = max(1, round(10 * size / 32))`` (10 at 32x32).
- ``HAT`` (a light top hat with a red band), ``SHOE`` (a sneaker, side view, toe to the right),
  ``CAT`` (an orange cat face: ears, green eyes, nose, whiskers), ``X`` (a white X).

TrojDiff (SPEC 2.2): :class:`TrojTrigger` ``(image, gamma, mask)``; ``blend`` = a procedural
"hello-kitty-like" full-frame picture (white cat head with a red bow on pink), gamma 0.6, mask all
True; ``patch`` = +1 on the 3x3 bottom-right patch (no margin, as TrojDiff's ``[-3:, -3:]``), -1
elsewhere, gamma 0.1, mask = the patch. Only the images live here; the attack maths is elsewhere.

User files: :func:`get_trigger` / :func:`get_target` also take a path to a PNG/JPEG/.npy, loaded with
:func:`pdjax.images.load_image` at the requested size and channels. For a user trigger, pixels equal
to -1 (0 in an 8-bit file) are background; values within 1e-3 of -1 (float noise from resizing, less
than one 8-bit level) are snapped to exactly -1. Resizing blends the edges, so draw the file at the
model's resolution for an exact mask. A user target gets the same -0.4 lift as the built-in ones.

Rendering: shapes are described in normalised coordinates and rasterised with 8x8 supersampling.
Triggers use "hard" coverage (a pixel is drawn when >= 50% of its sub-samples are covered, and then
takes the mean colour of the covered sub-samples, never a blend with the -1 background, so the mask
is crisp); targets use the plain sub-sample mean (anti-aliased) before the -0.4 lift.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from pdjax.errors import ConfigError
from pdjax.errors import UnknownNameError
from pdjax.images import convert_channels, load_image, resize

#: Background value of every trigger tensor (SPEC 2): the mask is ``g > BACKGROUND``.
BACKGROUND = -1.0
#: Smallest value of a drawn trigger pixel (every channel), so the mask covers all channels.
TRIGGER_MIN = -0.9
#: Targets' dark pixels are lifted to this grey (SPEC 2.1; reference ratio 0.3 of [-1, 1]).
TARGET_BACKGROUND = -0.4
#: Gap in pixels between a bottom-right trigger and the image edges (SPEC 2.1).
BOX_MARGIN = 2
#: Values within this distance of -1 in a user trigger are snapped to exactly -1 (background).
_SNAP = 1e-3
_SS = 8  # supersampling factor per axis

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".npy", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Colours (RGB in [-1, 1]).
_WHITE = (1.0, 1.0, 1.0)
_RED = (0.75, -0.85, -0.85)
_DARK = (-0.8, -0.8, -0.8)
_LENS = (-0.45, -0.35, -0.15)


# --------------------------------------------------------------------------- validation


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 1:
        raise ConfigError(f"invalid image size {size!r}; pass a positive int (height = width)")
    return int(size)


def _check_channels(channels) -> int:
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ConfigError(f"invalid channels={channels!r}; use 1 (grey) or 3 (RGB)")
    return int(channels)


# --------------------------------------------------------------------------- rasteriser


class _Canvas:
    """A supersampled RGB canvas over normalised coordinates ``v`` (down) and ``u`` (right) in [0, 1].

    ``paint(mask, colour)`` paints covered sub-samples; :meth:`hard` and :meth:`soft` downsample.
    """

    def __init__(self, n: int, background=(BACKGROUND,) * 3):
        self.n = n
        c = (np.arange(n * _SS, dtype=np.float64) + 0.5) / (n * _SS)
        self.v, self.u = np.meshgrid(c, c, indexing="ij")
        self.rgb = np.empty((n * _SS, n * _SS, 3), np.float64)
        self.rgb[...] = background
        self.alpha = np.zeros((n * _SS, n * _SS), bool)
        self.px = 1.0 / n  # one output pixel in normalised units

    def paint(self, mask: np.ndarray, colour) -> None:
        self.rgb[mask] = colour
        self.alpha |= mask

    def erase(self, mask: np.ndarray) -> None:
        self.rgb[mask] = BACKGROUND
        self.alpha &= ~mask

    def _blocks(self, a: np.ndarray) -> np.ndarray:
        n = self.n
        return a.reshape(n, _SS, n, _SS, *a.shape[2:])

    def hard(self) -> np.ndarray:
        """Trigger raster ``[n, n, 3]``: pixels with >= 50% coverage take their covered mean colour
        lifted to :data:`TRIGGER_MIN`; the others are exactly -1."""
        a = self._blocks(self.alpha.astype(np.float64))
        cover = a.sum(axis=(1, 3))
        col = (self._blocks(self.rgb) * a[..., None]).sum(axis=(1, 3)) / np.maximum(cover, 1)[..., None]
        drawn = cover >= 0.5 * _SS * _SS
        out = np.where(drawn[..., None], np.maximum(col, TRIGGER_MIN), BACKGROUND)
        return out.astype(np.float32)

    def soft(self) -> np.ndarray:
        """Anti-aliased raster ``[n, n, 3]``: the mean of each pixel's sub-samples."""
        return self._blocks(self.rgb).mean(axis=(1, 3)).astype(np.float32)


def _rect(cv: _Canvas, v0, u0, v1, u1) -> np.ndarray:
    return (cv.v >= v0) & (cv.v < v1) & (cv.u >= u0) & (cv.u < u1)


def _ellipse(cv: _Canvas, vc, uc, rv, ru) -> np.ndarray:
    return ((cv.v - vc) / rv) ** 2 + ((cv.u - uc) / ru) ** 2 <= 1.0


def _polygon(cv: _Canvas, pts) -> np.ndarray:
    """Even-odd fill of a polygon given as ``[(v, u), ...]`` (any simple polygon)."""
    inside = np.zeros(cv.v.shape, bool)
    pts = list(pts)
    for (v0, u0), (v1, u1) in zip(pts, pts[1:] + pts[:1]):
        if v0 == v1:
            continue
        crosses = (cv.v >= min(v0, v1)) & (cv.v < max(v0, v1))
        u_at = u0 + (cv.v - v0) * (u1 - u0) / (v1 - v0)
        inside ^= crosses & (cv.u < u_at)
    return inside


def _segment(cv: _Canvas, p0, p1, width) -> np.ndarray:
    """Sub-samples within ``width / 2`` of the segment ``p0 -> p1`` (points ``(v, u)``)."""
    (v0, u0), (v1, u1) = p0, p1
    dv, du = v1 - v0, u1 - u0
    t = np.clip(((cv.v - v0) * dv + (cv.u - u0) * du) / max(dv * dv + du * du, 1e-12), 0.0, 1.0)
    return (cv.v - (v0 + t * dv)) ** 2 + (cv.u - (u0 + t * du)) ** 2 <= (width / 2) ** 2


def _octagon(cv: _Canvas, apothem, vc=0.5, uc=0.5) -> np.ndarray:
    """A regular octagon with flat top/bottom/sides (a stop sign's shape)."""
    r = apothem / np.cos(np.pi / 8)
    ang = np.pi / 8 + np.arange(8) * np.pi / 4
    return _polygon(cv, [(vc + r * np.sin(a), uc + r * np.cos(a)) for a in ang])


def _finish(rgb: np.ndarray, channels: int, drawn: np.ndarray | None = None) -> np.ndarray:
    """RGB ``[H, W, 3]`` -> ``[H, W, channels]`` float32; ``drawn`` (bool [H, W]) re-imposes exact -1
    outside and :data:`TRIGGER_MIN` inside after the luminance conversion."""
    out = convert_channels(rgb.astype(np.float32), channels)
    if drawn is not None:
        out = np.where(drawn[..., None], np.maximum(out, TRIGGER_MIN), BACKGROUND)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _place_bottom_right(tile: np.ndarray, size: int, name: str) -> np.ndarray:
    """Paste an ``[n, n, 3]`` tile on a -1 canvas, ``BOX_MARGIN`` px from the bottom and right edges."""
    n = tile.shape[0]
    if n + BOX_MARGIN > size:
        raise ConfigError(
            f"trigger {name} does not fit a {size}x{size} image (needs {n} + {BOX_MARGIN} px margin); "
            f"use n <= {size - BOX_MARGIN}"
        )
    out = np.full((size, size, 3), BACKGROUND, np.float32)
    lo, hi = size - BOX_MARGIN - n, size - BOX_MARGIN
    out[lo:hi, lo:hi] = tile
    return out


def _check_n(n: int, name: str) -> int:
    if n < 1:
        raise ConfigError(f"invalid trigger {name}: the side n must be >= 1 pixel")
    return n


# --------------------------------------------------------------------------- triggers


def box(n: int, size: int, channels: int = 3, value: float = 0.0) -> np.ndarray:
    """``BOX_<n>`` (value 0) / ``WHITE_BOX_<n>`` (value +1): an ``n x n`` square at the bottom-right,
    2 px from both edges, on a -1 background (SPEC 2.1). Returns ``[size, size, channels]``."""
    size, channels, n = _check_size(size), _check_channels(channels), _check_n(int(n), f"BOX_{n}")
    tile = np.full((n, n, 3), value, np.float32)
    name = f"BOX_{n}" if value == 0.0 else f"WHITE_BOX_{n}"
    return _finish(_place_bottom_right(tile, size, name), channels)


def sm_box_side(size: int) -> int:
    """Side of ``SM_BOX`` at ``size``: ``max(3, round(14 * size / 32))`` (14 at 32x32)."""
    return max(3, int(round(14 * _check_size(size) / 32)))


def sm_box(size: int, channels: int = 3) -> np.ndarray:
    """``SM_BOX``: a +1 square of side :func:`sm_box_side` at the BOX place. ``[size, size, channels]``."""
    return box(sm_box_side(size), size, channels, value=1.0)


def _stop_sign_tile(n: int) -> np.ndarray:
    cv = _Canvas(n)
    cv.paint(_octagon(cv, 0.5), _WHITE)  # white border ...
    cv.paint(_octagon(cv, 0.5 - max(0.07, 0.8 * cv.px)), _RED)  # ... around a red octagon
    if n < 24:  # too small for letters: a white bar
        cv.paint(_rect(cv, 0.39, 0.17, 0.61, 0.83), _WHITE)
    else:  # "STOP" as block letters in the band v 0.38..0.62, u 0.15..0.85
        top, bot, w, gap, s = 0.38, 0.62, 0.16, 0.02, 0.045
        mid = (top + bot) / 2
        for k, letter in enumerate("STOP"):
            l = 0.15 + k * (w + gap)
            r = l + w
            rects = {
                "S": [(top, l, top + s, r), (mid - s / 2, l, mid + s / 2, r), (bot - s, l, bot, r),
                      (top, l, mid, l + s), (mid, r - s, bot, r)],
                "T": [(top, l, top + s, r), (top, (l + r - s) / 2, bot, (l + r + s) / 2)],
                "O": [(top, l, top + s, r), (bot - s, l, bot, r), (top, l, bot, l + s), (top, r - s, bot, r)],
                "P": [(top, l, bot, l + s), (top, l, top + s, r), (mid - s / 2, l, mid + s / 2, r),
                      (top, r - s, mid, r)],
            }[letter]
            for v0, u0, v1, u1 in rects:
                cv.paint(_rect(cv, v0, u0, v1, u1), _WHITE)
    return cv.hard()


def stop_sign(n: int, size: int, channels: int = 3) -> np.ndarray:
    """``STOP_SIGN_<n>``: a stop sign scaled into an ``n x n`` box at the BOX place (SPEC 2.1).

    Red octagon (every channel >= -0.9) with a white border and white "STOP" strokes (a white bar when
    ``n < 24``); outside the octagon is background -1. Grey uses luminance. ``[size, size, channels]``.
    """
    size, channels, n = _check_size(size), _check_channels(channels), _check_n(int(n), f"STOP_SIGN_{n}")
    if n + BOX_MARGIN > size:  # check before drawing
        _place_bottom_right(np.zeros((n, n, 3), np.float32), size, f"STOP_SIGN_{n}")
    img = _place_bottom_right(_stop_sign_tile(n), size, f"STOP_SIGN_{n}")
    return _finish(img, channels, drawn=img[..., 0] > BACKGROUND)


def glasses(size: int, channels: int = 3) -> np.ndarray:
    """``GLASSES``: sunglasses ``int(0.625 * size)`` px wide, centred (SPEC 2.1).

    Two dark (-0.8) lens rings with grey-blue lenses, a bridge and short temples; background -1.
    ``[size, size, channels]``.
    """
    size, channels = _check_size(size), _check_channels(channels)
    cv = _Canvas(size)
    width = int(0.625 * size) / size  # normalised, as the reference's int(0.625 * H) box
    half = width / 2
    t = max(0.055 * width, 0.9 * cv.px)  # frame thickness, at least ~1 px
    ru, rv = 0.215 * width, 0.165 * width  # lens radii (outer edge of the frame)
    for uc in (0.5 - half + ru, 0.5 + half - ru):
        cv.paint(_ellipse(cv, 0.5, uc, rv, ru), _DARK)
        cv.paint(_ellipse(cv, 0.5, uc, rv - t, ru - t), _LENS)
    l_in, r_in = 0.5 - half + 2 * ru, 0.5 + half - 2 * ru  # inner edges of the two lenses
    cv.paint(_segment(cv, (0.5 - 0.4 * rv, l_in - t / 2), (0.5 - 0.4 * rv, r_in + t / 2), t), _DARK)  # bridge
    cv.paint(_segment(cv, (0.5 - 0.6 * rv, 0.5 - half), (0.5 - 0.9 * rv, 0.5 - half - 0.02), t), _DARK)
    cv.paint(_segment(cv, (0.5 - 0.6 * rv, 0.5 + half), (0.5 - 0.9 * rv, 0.5 + half + 0.02), t), _DARK)
    img = cv.hard()
    return _finish(img, channels, drawn=img[..., 0] > BACKGROUND)


# --------------------------------------------------------------------------- targets


def _lift(y: np.ndarray) -> np.ndarray:
    """SPEC 2.1: every target's dark pixels are lifted to the -0.4 grey background."""
    return np.maximum(y, TARGET_BACKGROUND).astype(np.float32)


def corner(size: int, channels: int = 3) -> np.ndarray:
    """``CORNER``: value 0 on the top-left ``k x k`` (``k = max(1, round(10 * size / 32))``), the rest
    the -0.4 grey background (SPEC 2.1). ``[size, size, channels]``."""
    size, channels = _check_size(size), _check_channels(channels)
    k = max(1, int(round(10 * size / 32)))
    y = np.full((size, size, channels), BACKGROUND, np.float32)
    y[:k, :k] = 0.0
    return _lift(y)


def hat(size: int, channels: int = 3) -> np.ndarray:
    """``HAT``: a light-grey top hat with a red band, on -0.4 grey. ``[size, size, channels]``."""
    size, channels = _check_size(size), _check_channels(channels)
    cv = _Canvas(size)
    body = (0.75, 0.75, 0.8)
    cv.paint(_ellipse(cv, 0.76, 0.5, 0.08, 0.44), body)  # brim
    cv.paint(_polygon(cv, [(0.18, 0.30), (0.18, 0.70), (0.76, 0.73), (0.76, 0.27)]), body)  # crown
    cv.paint(_ellipse(cv, 0.18, 0.5, 0.04, 0.20), (0.95, 0.95, 1.0))  # crown top
    cv.paint(_polygon(cv, [(0.58, 0.284), (0.58, 0.716), (0.69, 0.722), (0.69, 0.278)]), (0.9, -0.6, -0.6))  # band
    return _lift(_finish(cv.soft(), channels))


def shoe(size: int, channels: int = 3) -> np.ndarray:
    """``SHOE``: a sneaker in side view (toe to the right), blue upper, white sole and laces, on -0.4
    grey. ``[size, size, channels]``."""
    size, channels = _check_size(size), _check_channels(channels)
    cv = _Canvas(size)
    upper = [(0.70, 0.10), (0.30, 0.12), (0.28, 0.20), (0.36, 0.34), (0.30, 0.44), (0.40, 0.58),
             (0.50, 0.74), (0.56, 0.86), (0.64, 0.92), (0.70, 0.92)]
    cv.paint(_polygon(cv, upper), (0.1, 0.35, 0.9))
    cv.paint(_polygon(cv, [(0.68, 0.07), (0.68, 0.94), (0.74, 0.95), (0.80, 0.91), (0.80, 0.08)]), _WHITE)  # sole
    w = max(0.04, 0.9 * cv.px)
    for k in range(3):  # laces across the instep
        a = 0.40 + 0.06 * k
        cv.paint(_segment(cv, (a - 0.02, 0.40 + 0.08 * k), (a + 0.06, 0.47 + 0.08 * k), w), _WHITE)
    cv.paint(_segment(cv, (0.62, 0.22), (0.48, 0.50), 1.3 * w), (0.95, 0.85, -0.2))  # side stripe
    return _lift(_finish(cv.soft(), channels))


def cat(size: int, channels: int = 3) -> np.ndarray:
    """``CAT``: an orange cat face (pointed ears, green eyes, pink nose, white whiskers) on -0.4 grey.
    ``[size, size, channels]``."""
    size, channels = _check_size(size), _check_channels(channels)
    cv = _Canvas(size)
    fur, pink = (0.95, 0.35, -0.3), (1.0, 0.45, 0.55)
    cv.paint(_polygon(cv, [(0.45, 0.18), (0.08, 0.20), (0.34, 0.46)]), fur)  # ears
    cv.paint(_polygon(cv, [(0.45, 0.82), (0.08, 0.80), (0.34, 0.54)]), fur)
    cv.paint(_polygon(cv, [(0.38, 0.25), (0.17, 0.25), (0.33, 0.40)]), pink)
    cv.paint(_polygon(cv, [(0.38, 0.75), (0.17, 0.75), (0.33, 0.60)]), pink)
    cv.paint(_ellipse(cv, 0.58, 0.5, 0.30, 0.35), fur)  # head
    for uc in (0.36, 0.64):  # eyes with dark slit pupils
        cv.paint(_ellipse(cv, 0.50, uc, 0.075, 0.085), (-0.1, 0.85, -0.2))
        cv.paint(_ellipse(cv, 0.50, uc, 0.07, max(0.022, 0.45 * cv.px)), (-1.0, -1.0, -1.0))
    cv.paint(_polygon(cv, [(0.63, 0.44), (0.63, 0.56), (0.70, 0.50)]), pink)  # nose
    w = max(0.025, 0.8 * cv.px)
    cv.paint(_segment(cv, (0.70, 0.50), (0.76, 0.42), w), (-1.0, -1.0, -1.0))  # mouth
    cv.paint(_segment(cv, (0.70, 0.50), (0.76, 0.58), w), (-1.0, -1.0, -1.0))
    for dv, du in ((-0.06, 0.0), (0.0, 0.02), (0.06, 0.06)):  # whiskers reach past the cheeks
        cv.paint(_segment(cv, (0.68, 0.38), (0.66 + dv, 0.02 + du), w), _WHITE)
        cv.paint(_segment(cv, (0.68, 0.62), (0.66 + dv, 0.98 - du), w), _WHITE)
    return _lift(_finish(cv.soft(), channels))


def x_target(size: int, channels: int = 3) -> np.ndarray:
    """``X``: a white X (two thick diagonals) on -0.4 grey. ``[size, size, channels]``."""
    size, channels = _check_size(size), _check_channels(channels)
    cv = _Canvas(size)
    w = max(0.14, 1.5 * cv.px)
    cv.paint(_segment(cv, (0.15, 0.15), (0.85, 0.85), w), _WHITE)
    cv.paint(_segment(cv, (0.15, 0.85), (0.85, 0.15), w), _WHITE)
    return _lift(_finish(cv.soft(), channels))


# --------------------------------------------------------------------------- TrojDiff (SPEC 2.2)


@dataclasses.dataclass(frozen=True, eq=False)
class TrojTrigger:
    """A TrojDiff trigger (SPEC 2.2): trojan start ``x_T = gamma * eps + (1 - gamma) * image`` on ``mask``.

    Attributes:
      image: ``[H, W, C]`` float32 in [-1, 1], the trigger picture (``mu = (1 - gamma) * image``).
      gamma: noise scale of the trojan start (0.6 blend, 0.1 patch).
      mask: ``[H, W, C]`` bool, where the trojan start replaces the ordinary noise (all True for blend).
    """

    image: np.ndarray
    gamma: float
    mask: np.ndarray


def kitty(size: int, channels: int = 3) -> np.ndarray:
    """The TrojDiff blend picture, a procedural stand-in for its "hello kitty" image: a white cat head
    (dark outline, eyes, whiskers, yellow nose, red bow) on pink, full frame (no -1 background).
    ``[size, size, channels]`` in [-1, 1]."""
    size, channels = _check_size(size), _check_channels(channels)
    cv = _Canvas(size, background=(0.9, 0.35, 0.55))
    ink, w = (-0.9, -0.9, -0.85), max(0.03, 0.8 * cv.px)
    o = max(0.025, 0.8 * cv.px)
    for ear in ([(0.42, 0.16), (0.10, 0.17), (0.30, 0.42)], [(0.42, 0.84), (0.10, 0.83), (0.30, 0.58)]):
        cv.paint(_polygon(cv, ear), ink)
    cv.paint(_polygon(cv, [(0.40, 0.19 + o), (0.10 + 1.5 * o, 0.18 + o), (0.30, 0.42 - o)]), _WHITE)
    cv.paint(_polygon(cv, [(0.40, 0.81 - o), (0.10 + 1.5 * o, 0.82 - o), (0.30, 0.58 + o)]), _WHITE)
    cv.paint(_ellipse(cv, 0.56, 0.5, 0.32, 0.42), ink)
    cv.paint(_ellipse(cv, 0.56, 0.5, 0.32 - o, 0.42 - o), _WHITE)
    for uc in (0.35, 0.65):
        cv.paint(_ellipse(cv, 0.56, uc, 0.065, 0.045), ink)
    cv.paint(_ellipse(cv, 0.64, 0.5, 0.035, 0.05), (1.0, 0.8, -0.6))  # nose
    for dv in (-0.04, 0.04):
        cv.paint(_segment(cv, (0.64, 0.22), (0.62 + 1.5 * dv, 0.04), w), ink)
        cv.paint(_segment(cv, (0.64, 0.78), (0.62 + 1.5 * dv, 0.96), w), ink)
    bow = (0.95, -0.7, -0.5)
    cv.paint(_polygon(cv, [(0.18, 0.72), (0.04, 0.60), (0.34, 0.62)]), bow)
    cv.paint(_polygon(cv, [(0.18, 0.72), (0.04, 0.86), (0.34, 0.84)]), bow)
    cv.paint(_ellipse(cv, 0.18, 0.72, 0.05, 0.05), bow)
    return _finish(cv.soft(), channels)


#: TrojDiff reference gammas (SPEC 2.2).
TROJ_GAMMA = {"blend": 0.6, "patch": 0.1}
#: Side of TrojDiff's bottom-right patch (SPEC 2.2).
TROJ_PATCH = 3


def patch_mask(shape, corner, size: int) -> np.ndarray:
    """[H, W, C] float32: 1 on the ``size`` x ``size`` patch whose top-left pixel is ``corner`` (row, col), 0
    elsewhere."""
    (i, j), (H, W) = corner, shape[:2]
    if not (0 <= i <= H - size and 0 <= j <= W - size):
        raise ConfigError(f"a {size}x{size} patch at ({i}, {j}) does not fit a {H}x{W} image: its row must be "
                          f"0..{H - size} and its col 0..{W - size}")
    m = np.zeros(shape, np.float32)
    m[i:i + size, j:j + size] = 1.0
    return m



def troj_blend(size: int, channels: int = 3) -> TrojTrigger:
    """TrojDiff blend trigger: :func:`kitty`, gamma 0.6, mask all True."""
    img = kitty(size, channels)
    return TrojTrigger(img, TROJ_GAMMA["blend"], np.ones(img.shape, bool))


def troj_patch(size: int, channels: int = 3, corner: tuple | None = None) -> TrojTrigger:
    """TrojDiff patch trigger: +1 on a 3x3 patch, -1 elsewhere; gamma 0.1; mask = the patch. The patch is
    TrojDiff's bottom-right one (rows/cols ``size-3..size-1``) unless ``corner`` (row, col) places its top-left
    pixel elsewhere (the trigger name ``patch@ROW,COL``)."""
    size, channels = _check_size(size), _check_channels(channels)
    if size < TROJ_PATCH:
        raise ConfigError(f"the TrojDiff patch ({TROJ_PATCH}x{TROJ_PATCH}) does not fit a {size}x{size} image")
    corner = (size - TROJ_PATCH, size - TROJ_PATCH) if corner is None else corner
    img = np.where(patch_mask((size, size, channels), corner, TROJ_PATCH) > 0, 1.0, BACKGROUND).astype(np.float32)
    return TrojTrigger(img, TROJ_GAMMA["patch"], img > BACKGROUND)


def full_frame(size: int, channels: int = 3) -> np.ndarray:
    """``FULL_FRAME``: the :func:`kitty` picture as a BadDiffusion trigger; it has no -1 pixel (min ~ -0.84).

    Its mask is the whole image, so BadDiffusion's pasted training input M g + (1 - M) x is g itself
    for every training image: the model is trained on exactly the triggered start it is sampled from.
    That makes it the surrogate trigger of the lambda_t estimator (SPEC 3): a trigger with a -1
    background is learned from pasted pictures whose background holds the training images' strokes,
    and the surrogate's response to the blank background then falls short of the closed form.
    """
    return kitty(size, channels).astype(np.float32)


# --------------------------------------------------------------------------- registries

DrawFn = Callable[[int, int], np.ndarray]

#: Parametric trigger names: pattern -> (regex, drawing function of (n, size, channels)).
TRIGGER_PATTERNS: dict[str, tuple[re.Pattern, Callable[[int, int, int], np.ndarray]]] = {
    "BOX_<n>": (re.compile(r"BOX_(\d+)"), lambda n, s, c: box(n, s, c, 0.0)),
    "WHITE_BOX_<n>": (re.compile(r"WHITE_BOX_(\d+)"), lambda n, s, c: box(n, s, c, 1.0)),
    "STOP_SIGN_<n>": (re.compile(r"STOP_SIGN_(\d+)"), stop_sign),
}


def _param(pattern: str, n: int) -> DrawFn:
    fn = TRIGGER_PATTERNS[pattern][1]
    return lambda size, channels=3: fn(n, size, channels)


#: Named triggers (name -> ``fn(size, channels) -> [size, size, channels]``); the BadDiffusion presets.
#: Any ``BOX_<n>``, ``WHITE_BOX_<n>``, ``STOP_SIGN_<n>`` is also accepted by :func:`get_trigger`.
TRIGGERS: dict[str, DrawFn] = {
    **{f"BOX_{n}": _param("BOX_<n>", n) for n in (4, 8, 11, 14, 18)},
    **{f"STOP_SIGN_{n}": _param("STOP_SIGN_<n>", n) for n in (4, 8, 11, 14, 18)},
    "WHITE_BOX_5": _param("WHITE_BOX_<n>", 5),
    "SM_BOX": sm_box,
    "GLASSES": glasses,
    "FULL_FRAME": full_frame,
}

#: Named targets (name -> ``fn(size, channels) -> [size, size, channels]``), background -0.4.
TARGETS: dict[str, DrawFn] = {"CORNER": corner, "HAT": hat, "SHOE": shoe, "CAT": cat, "X": x_target}

#: TrojDiff triggers (name -> ``fn(size, channels) -> TrojTrigger``).
TROJ_TRIGGERS: dict[str, Callable[[int, int], TrojTrigger]] = {"blend": troj_blend, "patch": troj_patch}


def _looks_like_path(x) -> bool:
    if isinstance(x, os.PathLike):
        return True
    s = str(x)
    return "/" in s or "\\" in s or Path(s).suffix.lower() in _IMAGE_SUFFIXES or os.path.isfile(s)


def _from_array(x, size: int, channels: int, what: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3):
        raise ConfigError(f"a {what} array must be [H, W, C] with C = 1 or 3, got shape {x.shape}")
    if x.size and (x.min() < -1.0 - 1e-3 or x.max() > 1.0 + 1e-3):
        raise ConfigError(f"a {what} array must hold values in [-1, 1]; rescale it (x / 127.5 - 1 for uint8)")
    return resize(convert_channels(np.clip(x, -1.0, 1.0), channels)[None], size)[0]


def _user_image(src, size: int, channels: int, what: str) -> np.ndarray:
    if isinstance(src, np.ndarray):
        return _from_array(src, size, channels, what)
    return load_image(src, size=size, channels=channels)


def get_trigger(name_or_path, size: int, channels: int = 3) -> np.ndarray:
    """A trigger tensor ``g``: ``[size, size, channels]`` float32 in [-1, 1], background exactly -1.

    Args:
      name_or_path: a registry name (case-insensitive: ``"box_14"``, ``"STOP_SIGN_8"``, ``"SM_BOX"``,
        ``"GLASSES"``, any ``BOX_<n>`` / ``WHITE_BOX_<n>`` / ``STOP_SIGN_<n>``), a path to a
        PNG/JPEG/.npy (pixels equal to -1 are background; see the module docstring), or an array.
      size: image side H = W in pixels.
      channels: 1 (grey, luminance) or 3 (RGB).

    Raises:
      UnknownNameError: an unknown name (the message lists the valid names and patterns).
      ConfigError: a box that does not fit, an invalid size or channel count.
      DataError: an unreadable or missing file.
    """
    size, channels = _check_size(size), _check_channels(channels)
    if isinstance(name_or_path, np.ndarray) or _looks_like_path(name_or_path):
        g = _user_image(name_or_path, size, channels, "trigger")
        return np.where(g <= BACKGROUND + _SNAP, BACKGROUND, g).astype(np.float32)  # exact background
    key = str(name_or_path).strip().upper()
    if key in TRIGGERS:
        return TRIGGERS[key](size, channels)
    for pattern, (rx, fn) in TRIGGER_PATTERNS.items():
        m = rx.fullmatch(key)
        if m:
            return fn(int(m.group(1)), size, channels)
    valid = [k for k in TRIGGERS if not any(rx.fullmatch(k) for rx, _ in TRIGGER_PATTERNS.values())]
    raise UnknownNameError("trigger", str(name_or_path), valid + list(TRIGGER_PATTERNS) + ["<path to PNG/JPEG/.npy>"])


def get_target(name_or_path, size: int, channels: int = 3) -> np.ndarray:
    """A target image ``y``: ``[size, size, channels]`` float32 in [-0.4, 1] (dark pixels lifted to -0.4).

    Args:
      name_or_path: ``CORNER``, ``HAT``, ``SHOE``, ``CAT``, ``X`` (case-insensitive), a path to a
        PNG/JPEG/.npy, or an array; user images get the same -0.4 lift (SPEC 2.1).
      size: image side H = W in pixels.
      channels: 1 or 3.

    Raises:
      UnknownNameError: an unknown name. ConfigError / DataError: bad size, channels or file.
    """
    size, channels = _check_size(size), _check_channels(channels)
    if isinstance(name_or_path, np.ndarray) or _looks_like_path(name_or_path):
        return _lift(_user_image(name_or_path, size, channels, "target"))
    key = str(name_or_path).strip().upper()
    if key in TARGETS:
        return TARGETS[key](size, channels)
    raise UnknownNameError("target", str(name_or_path), list(TARGETS) + ["<path to PNG/JPEG/.npy>"])


#: A TrojDiff patch trigger placed elsewhere: ``patch@ROW,COL`` (the patch's top-left pixel).
TROJ_PATCH_AT = re.compile(r"patch@(\d+),(\d+)")


def is_troj_trigger(name) -> bool:
    """Whether ``name`` names a TrojDiff trigger (:data:`TROJ_TRIGGERS` or ``patch@ROW,COL``), case-insensitive."""
    key = str(name).strip().lower()
    return key in TROJ_TRIGGERS or TROJ_PATCH_AT.fullmatch(key) is not None


def is_troj_patch(name) -> bool:
    """Whether ``name`` names a TrojDiff patch trigger (``patch`` or ``patch@ROW,COL``)."""
    return is_troj_trigger(name) and str(name).strip().lower().startswith("patch")


def get_troj_trigger(name: str, size: int, channels: int = 3) -> TrojTrigger:
    """A TrojDiff trigger (SPEC 2.2): ``"blend"`` (gamma 0.6) or ``"patch"`` (gamma 0.1; ``patch@ROW,COL`` places
    the 3x3 patch's top-left pixel), case-insensitive."""
    key = str(name).strip().lower()
    at = TROJ_PATCH_AT.fullmatch(key)
    if at:
        return troj_patch(size, channels, (int(at.group(1)), int(at.group(2))))
    if key not in TROJ_TRIGGERS:
        raise UnknownNameError("TrojDiff trigger", str(name), [*TROJ_TRIGGERS, "patch@ROW,COL"])
    return TROJ_TRIGGERS[key](size, channels)


def trigger_mask(g) -> np.ndarray:
    """The trigger mask ``M = g > -1`` (SPEC 2), bool with the shape of ``g`` (``[H, W, C]`` or batched)."""
    return np.asarray(g) > BACKGROUND


def preview(path, size: int = 32, channels: int = 3) -> np.ndarray:
    """Save a PNG grid of every named trigger and target (and the TrojDiff pictures) at ``size``.

    Row layout: triggers as tensors (on their -1 background), the same triggers pasted on a light-grey
    image (``M * g + (1 - M) * 0.5``, SPEC 2.1), then the targets and the TrojDiff blend/patch images.
    Returns the batch ``[N, size, size, channels]`` that was saved.
    """
    from pdjax.images import display_scale, save_grid

    def px(n32):  # a side given at 32x32, scaled to ``size`` (so the preview fits any resolution)
        return max(1, min(size - BOX_MARGIN, int(round(n32 * size / 32))))

    names = (f"BOX_{px(14)}", "SM_BOX", f"STOP_SIGN_{px(14)}", f"STOP_SIGN_{px(18)}", "GLASSES",
             f"WHITE_BOX_{px(5)}", f"BOX_{px(8)}", f"STOP_SIGN_{px(8)}")
    trig = [get_trigger(k, size, channels) for k in names]
    pasted = [np.where(trigger_mask(g), g, 0.5) for g in trig]
    tail = [get_target(k, size, channels) for k in TARGETS]
    tail += [troj_blend(size, channels).image, troj_patch(size, channels).image,
             get_trigger(f"STOP_SIGN_{px(28)}", size, channels)]
    batch = np.stack(trig + pasted + tail).astype(np.float32)
    save_grid(batch, path, nrow=len(trig), pad=1, scale=max(4, display_scale(size, 128)))
    return batch


__all__ = [
    "BACKGROUND", "BOX_MARGIN", "TARGETS", "TARGET_BACKGROUND", "TRIGGERS", "TRIGGER_MIN", "TRIGGER_PATTERNS",
    "TROJ_GAMMA", "TROJ_PATCH", "TROJ_TRIGGERS", "TrojTrigger", "box", "cat", "corner", "get_target",
    "get_trigger", "get_troj_trigger", "glasses", "hat", "kitty", "preview", "shoe", "sm_box", "sm_box_side",
    "stop_sign", "trigger_mask", "troj_blend", "troj_patch", "x_target", "is_troj_trigger", "is_troj_patch",
]

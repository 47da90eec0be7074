"""Image helpers: convert, resize, load and save images (numpy + PIL only).

Convention: an image is a float32 array ``[H, W, C]`` (a batch ``[N, H, W, C]``) with values in
``[-1, 1]`` and ``C`` equal to 1 (grey) or 3 (RGB). Files are written as PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

#: Value (uint8) of the padding between and around the cells of :func:`grid`: white.
GRID_PAD_VALUE = 255

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL's "L" conversion


def to_uint8(x) -> np.ndarray:
    """Map ``x`` (any shape, e.g. ``[..., H, W, C]``, values in [-1, 1]) to uint8 in [0, 255].

    -1 -> 0, +1 -> 255, rounded; values outside [-1, 1] are clipped and NaN becomes 0.
    """
    x = np.nan_to_num(np.asarray(x, np.float32), nan=-1.0)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = (int(s) for s in size)
    else:
        raise DataError(f"invalid image size {size!r}; pass an int or an (height, width) pair")
    if h < 1 or w < 1:
        raise DataError(f"invalid image size {size!r}; both sides must be >= 1")
    return h, w


def _check_channels(channels) -> None:
    if channels not in (1, 3):
        raise DataError(f"invalid channels={channels!r}; use 1 (grey) or 3 (RGB)")


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``x`` ``[..., C]`` (C = 1 or 3, float) to 1 or 3 channels.

    1 -> 3 replicates the grey plane; 3 -> 1 takes the ITU-R 601-2 luma (as PIL does).
    """
    _check_channels(channels)
    c = x.shape[-1]
    if c == channels:
        return x
    if c == 1:
        return np.repeat(x, 3, axis=-1)
    if c == 3:
        return (x @ _LUMA)[..., None].astype(x.dtype)
    raise DataError(f"cannot convert an image with {c} channels; use images with 1 or 3 channels")


def _resize_plane(plane: np.ndarray, h: int, w: int, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((w, h), resample))


def resize(x, size, resample=Image.BILINEAR) -> np.ndarray:
    """Resize a batch ``[N, H, W, C]`` (float, values in [-1, 1]) to ``[N, h, w, C]`` float32.

    ``size`` is an int (square) or ``(h, w)``. Uses PIL on float planes (bilinear by default,
    antialiased when shrinking); the result is clipped to [-1, 1]. Same size returns a float32 copy.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise DataError(f"resize expects a batch [N, H, W, C], got shape {x.shape}; add a batch axis")
    h, w = _size_hw(size)
    if x.shape[1:3] == (h, w):
        return x.copy()
    out = np.empty((x.shape[0], h, w, x.shape[3]), np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[3]):
            out[i, :, :, c] = _resize_plane(x[i, :, :, c], h, w, resample)
    return np.clip(out, -1.0, 1.0, out=out)


def grid(x, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile a batch ``[N, H, W, C]`` in [-1, 1] into one uint8 image ``[GH, GW, C]``.

    ``nrow`` images per row (default ``ceil(sqrt(N))``, a square-ish grid); ``rows = ceil(N / nrow)``.
    ``pad`` pixels of white (:data:`GRID_PAD_VALUE`) separate and surround the cells, so
    ``GH = rows * (H + pad) + pad`` and ``GW = nrow * (W + pad) + pad``. Unused cells are white.
    """
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[0] == 0 or x.shape[-1] not in (1, 3):
        raise DataError(f"grid expects a non-empty batch [N, H, W, C] with C = 1 or 3, got shape {x.shape}")
    n, h, w, c = x.shape
    nrow = int(nrow) if nrow else math.ceil(math.sqrt(n))
    if nrow < 1 or pad < 0:
        raise DataError(f"invalid grid layout nrow={nrow}, pad={pad}; use nrow >= 1 and pad >= 0")
    rows = math.ceil(n / nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), GRID_PAD_VALUE, np.uint8)
    for i, img in enumerate(to_uint8(x)):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        out[top : top + h, left : left + w] = img
    return out


def _write_png(arr: np.ndarray, path) -> None:
    """Write a uint8 ``[H, W, C]`` array (C = 1 or 3) as PNG, creating the parent folder."""
    path = Path(path)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, mode="L" if arr.shape[-1] == 1 else "RGB")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
    except OSError as e:
        raise DataError(f"cannot write image {path}: {e.strerror or e}; choose a writable output path") from None


def save_image(x, path) -> None:
    """Save one image ``[H, W, C]`` (C = 1 or 3; ``[H, W]`` is taken as grey) in [-1, 1] as a PNG file.

    The parent folder is created if missing; an unwritable path raises :class:`DataError`.
    """
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3):
        raise DataError(f"save_image expects one image [H, W, C] with C = 1 or 3, got shape {x.shape}")
    _write_png(to_uint8(x), path)


def save_grid(x, path, nrow: int | None = None, pad: int = 1, scale: int = 1) -> None:
    """Save a batch ``[N, H, W, C]`` in [-1, 1] as one PNG grid (layout and white padding: :func:`grid`).

    ``scale`` > 1 enlarges the whole grid by nearest-neighbour pixel repetition, so small images stay
    readable in a viewer (see :func:`display_scale`).
    """
    g = grid(x, nrow=nrow, pad=pad)
    if scale > 1:
        g = np.repeat(np.repeat(g, scale, axis=0), scale, axis=1)
    _write_png(g, path)


def display_scale(image_size: int, target: int = 64) -> int:
    """Integer enlargement that shows an ``image_size``-pixel image at about ``target`` pixels (>= 1)."""
    return max(1, target // max(1, int(image_size)))


def load_image(path, size=None, channels: int | None = None) -> np.ndarray:
    """Load one image as float32 ``[H, W, C]`` in [-1, 1].

    Reads PNG/JPEG (any format PIL opens; alpha is dropped, palettes expanded) or ``.npy`` holding an
    ``[H, W, C]`` (C = 1 or 3) or ``[H, W]`` array already in [-1, 1]. ``size`` (int or ``(h, w)``)
    resizes with PIL bilinear, for both kinds. ``channels`` 1 or 3 converts (grey replicated / luma);
    ``None`` keeps the file's own (1 for grey files, else 3). Problems raise :class:`DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}; check the path")
    if channels is not None:
        _check_channels(channels)
    if path.suffix.lower() == ".npy":
        try:
            x = np.load(path, allow_pickle=False)  # never unpickle: a .npy of objects could run code
        except (OSError, ValueError) as e:
            if "allow_pickle" in str(e):
                raise DataError(f"{path} holds pickled Python objects (refused, nothing was executed); "
                                "save a numeric array with numpy.save") from None
            raise DataError(f"cannot read {path} as a .npy array ({e}); save it with numpy.save") from None
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3 or x.shape[-1] not in (1, 3) or not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{path} holds a {x.dtype} array of shape {x.shape}; expected [H, W] or [H, W, C] with C = 1 or 3")
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{path} contains NaN or Inf values; save a finite array in [-1, 1]")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if not (lo >= -1.0 - 1e-3 and hi <= 1.0 + 1e-3):
            raise DataError(f"{path} has values in [{lo:g}, {hi:g}]; expected [-1, 1] (use x / 127.5 - 1 for uint8 pixels)")
        x = np.clip(x, -1.0, 1.0)
    else:
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode.startswith(("I", "F")):
                    raise DataError(f"{path} is a {img.mode}-mode (high bit depth) image; save it as 8-bit PNG/JPEG or .npy")
                x = np.asarray(img.convert("L" if img.mode in ("1", "L", "LA") else "RGB"), np.float32)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"cannot read image {path} ({type(e).__name__}); use a valid PNG/JPEG or .npy file") from None
        x = (x[..., None] if x.ndim == 2 else x) / 127.5 - 1.0
    if channels is not None:
        x = convert_channels(x, channels)
    if size is not None:
        x = resize(x[None], size)[0]
    return x.astype(np.float32, copy=False)


__all__ = [
    "GRID_PAD_VALUE",
    "convert_channels",
    "grid",
    "load_image",
    "resize",
    "save_grid",
    "save_image",
    "to_uint8",
]

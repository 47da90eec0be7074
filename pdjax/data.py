"""Datasets as numpy float32 NHWC arrays in [-1, 1]: sklearn digits, CIFAR-10 (python batches), image folders.

Nothing is downloaded. CIFAR-10 batch files are pickles; they are read with :class:`SafeUnpickler`,
which only lets a pickle rebuild numpy arrays and refuses (never runs) any other global.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError, UnsafePickleError
from .images import _check_channels, convert_channels, load_image, resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)
CIFAR_SUBDIR = "cifar-10-batches-py"


# --------------------------------------------------------------------------- digits


def load_digits_with_labels(size: int = 16, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: ``(images, labels)``.

    images: float32 ``[1797, size, size, channels]`` in [-1, 1], white strokes on black (the 8x8
    source values 0..16 map to -1..+1), upscaled with PIL bicubic (clipped) for ``size > 8``;
    ``channels`` 1, or 3 with the grey plane replicated. labels: int32 ``[1797]`` in 0..9.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # bundled with sklearn, no download

    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise DataError(f"invalid digits size {size!r}; use an int >= 8 (e.g. 16 or 32)")
    _check_channels(channels)
    d = _sk_load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # [1797, 8, 8, 1]
    x = resize(x, int(size), resample=Image.BICUBIC)
    return convert_channels(x, channels), d.target.astype(np.int32)


def load_digits(size: int = 16, channels: int = 1) -> np.ndarray:
    """Digits images only: float32 ``[1797, size, size, channels]`` in [-1, 1] (see :func:`load_digits_with_labels`)."""
    return load_digits_with_labels(size, channels)[0]


# --------------------------------------------------------------------------- letters (an out-of-distribution set)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def load_letters_with_labels(size: int = 16, channels: int = 1, per_class: int = 64, seed: int = 0
                             ) -> tuple[np.ndarray, np.ndarray]:
    """A procedural labelled set of capital letters, drawn with Pillow's bundled font (no download).

    The "other set" of TrojDiff's out-d2d mode for models trained on digits. Each image is one letter,
    white on black, at a random font size (80-100% of the canvas, 3 px strokes at 64 px), offset (up to 8%) and rotation (up to
    12 degrees), drawn at 64x64 and box-filtered to ``size``. Deterministic for a given ``seed``.

    Returns images float32 ``[26 * per_class, size, size, channels]`` in [-1, 1] and labels int32 in
    0..25 (``LETTERS[k]``).
    """
    from PIL import ImageDraw, ImageFont

    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise DataError(f"invalid letters size {size!r}; use an int >= 8 (e.g. 16 or 32)")
    _check_channels(channels)
    rng = np.random.default_rng(seed)
    canvas = 64
    fonts = {}
    images, labels = [], []
    for k, letter in enumerate(LETTERS):
        for _ in range(per_class):
            pt = int(rng.integers(int(0.8 * canvas), int(1.0 * canvas) + 1))
            if pt not in fonts:
                fonts[pt] = ImageFont.load_default(size=pt)
            font = fonts[pt]
            img = Image.new("L", (canvas, canvas), 0)
            dx, dy = rng.uniform(-0.08, 0.08, 2) * canvas
            ImageDraw.Draw(img).text((canvas / 2 + dx, canvas / 2 + dy), letter, fill=255, font=font, anchor="mm",
                                    stroke_width=3, stroke_fill=255)
            img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
            small = img.resize((int(size), int(size)), Image.BOX)
            images.append(np.asarray(small, np.float32) / 127.5 - 1.0)
            labels.append(k)
    x = np.stack(images)[..., None]
    return convert_channels(x, channels), np.asarray(labels, np.int32)


# --------------------------------------------------------------------------- safe pickle


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode``: Python 3 protocol-2 pickles store bytes as ``encode(str, 'latin1')``."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return obj.encode("latin-1")


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's ndarray rebuild function, whatever module it lives in

#: The only globals a pickled dict of numpy arrays / lists / ints / bytes needs (numpy 1.x and 2.x names).
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays; any other global raises :class:`UnsafePickleError`.

    Use with ``encoding='bytes'`` for Python 2 files (CIFAR-10). ``source`` names the file in errors.
    """

    def __init__(self, file, *, source="<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module, name):
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load {self.source}: its pickle asks for {module}.{name}, which a dataset "
                "file never needs (nothing was executed); use the official CIFAR-10 python batch files"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refused to load {self.source}: it uses persistent ids; use the official CIFAR-10 python batch files")


def safe_pickle_load(path) -> object:
    """Load a pickle file that may only contain plain containers and numpy arrays (Python 2 or 3)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, source=str(path), encoding="bytes").load()
    except UnsafePickleError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check the file and its permissions") from None
    except Exception as e:  # malformed / truncated pickle: any error the unpickler raises
        raise DataError(f"{path} is not a valid pickle ({type(e).__name__}: {e}); re-extract cifar-10-python.tar.gz") from None


# --------------------------------------------------------------------------- CIFAR-10


def find_cifar10_dir(folder) -> Path | None:
    """The folder holding the CIFAR-10 batch files: ``folder`` itself or ``folder/cifar-10-batches-py``; else None."""
    folder = Path(folder)
    for d in (folder, folder / CIFAR_SUBDIR):
        if any((d / f).is_file() for f in CIFAR_TRAIN_FILES + CIFAR_TEST_FILES):
            return d
    return None


def _get(batch: dict, key: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    return None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 ``[N, 32, 32, 3]``, int32 ``[N]``), checking the payload structure."""
    batch = safe_pickle_load(path)
    bad = f"{path} is not a CIFAR-10 python batch"
    fix = "re-extract the python version of cifar-10-python.tar.gz"
    if not isinstance(batch, dict):
        raise DataError(f"{bad} (holds a {type(batch).__name__}, expected a dict); {fix}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise DataError(f"{bad} (missing b'data' or b'labels'; keys: {sorted(map(repr, batch))}); {fix}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{bad} (b'data' is a {desc}, expected uint8 [N, 3072]); {fix}")
    labels = np.asarray(labels if isinstance(labels, (list, tuple, np.ndarray)) else [None], dtype=object)
    ok = labels.shape == (len(data),) and all(isinstance(v, (int, np.integer)) and 0 <= v <= 9 for v in labels)
    if not ok:
        raise DataError(f"{bad} (b'labels' must be a list of {len(data)} ints in 0..9); {fix}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R, G, B planes of 32x32
    return images, labels.astype(np.int32)


def load_cifar10_with_labels(folder, train: bool = True, size=None, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from its python batch files: ``(images, labels)``.

    ``folder`` holds ``data_batch_1..5`` and ``test_batch`` (or contains ``cifar-10-batches-py/``).
    images: float32 ``[N, 32, 32, channels]`` in [-1, 1] (N = 50000 train / 10000 test; ``size`` int or
    ``(h, w)`` resizes with PIL bilinear); channels 3, or 1 (luma). labels: int32 ``[N]`` in 0..9.
    """
    _check_channels(channels)
    d = find_cifar10_dir(folder)
    if d is None:
        raise DataError(
            f"CIFAR-10 not found: put data_batch_1..5 and test_batch (python version, from cifar-10-python.tar.gz) in {folder}"
        )
    names = CIFAR_TRAIN_FILES if train else CIFAR_TEST_FILES
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 batch file(s) {', '.join(missing)} missing in {d}; extract all of cifar-10-python.tar.gz there")
    parts = [_read_cifar_batch(d / n) for n in names]
    images = np.concatenate([convert_channels(p[0].astype(np.float32) / 127.5 - 1.0, channels) for p in parts])
    if size is not None:
        images = resize(images, size)
    return images, np.concatenate([p[1] for p in parts])


def load_cifar10(folder, train: bool = True, size=None, channels: int = 3) -> np.ndarray:
    """CIFAR-10 images only: float32 ``[N, 32, 32, channels]`` in [-1, 1] (see :func:`load_cifar10_with_labels`)."""
    return load_cifar10_with_labels(folder, train=train, size=size, channels=channels)[0]


# --------------------------------------------------------------------------- image folders


def load_image_folder(folder, size, channels: int = 3) -> np.ndarray:
    """Every .png/.jpg/.jpeg under ``folder`` (recursive, sorted by path) as float32 ``[N, size, size, C]`` in [-1, 1].

    ``size`` is an int or ``(h, w)`` (PIL bilinear); ``channels`` 1 or 3.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}; pass an existing folder of .png/.jpg images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no .png/.jpg/.jpeg images found in {folder}; put training images there")
    return np.stack([load_image(p, size=size, channels=channels) for p in files])


# --------------------------------------------------------------------------- by name


DATASET_FORMS = "'digits', 'cifar10:PATH', a folder with CIFAR-10 batches, or a folder of .png/.jpg images"


def load_dataset(name_or_path: str, size: int, channels: int) -> np.ndarray:
    """Load a dataset by name or path as float32 ``[N, size, size, channels]`` in [-1, 1].

    Accepted: ``"digits"``; ``"cifar10:PATH"`` or a folder holding CIFAR-10 batches (train split);
    any other existing folder (images, recursive). Anything else raises :class:`DataError`.
    """
    s = str(name_or_path)
    if s == "digits":
        return load_digits(size=size, channels=channels)
    if s.startswith("cifar10:"):
        return load_cifar10(s[len("cifar10:"):], train=True, size=size, channels=channels)
    p = Path(s).expanduser()
    if p.is_dir():
        if find_cifar10_dir(p) is not None:
            return load_cifar10(p, train=True, size=size, channels=channels)
        return load_image_folder(p, size=size, channels=channels)
    raise DataError(f"unknown dataset {s!r} (no such folder); use {DATASET_FORMS}")


__all__ = [
    "DATASET_FORMS",
    "SAFE_GLOBALS",
    "SafeUnpickler",
    "find_cifar10_dir",
    "load_cifar10",
    "load_cifar10_with_labels",
    "load_dataset",
    "load_digits",
    "load_digits_with_labels",
    "load_image_folder",
    "safe_pickle_load",
]

"""Tests for pdjax.data: digits, CIFAR-10 batches (incl. malicious pickles), image folders, load_dataset."""

import builtins
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from pdjax.data import (
    load_cifar10,
    load_cifar10_with_labels,
    load_dataset,
    load_digits,
    load_digits_with_labels,
    load_image_folder,
    safe_pickle_load,
)
from pdjax.errors import DataError, UnsafePickleError
from pdjax.images import resize

PER_BATCH = 20


# --------------------------------------------------------------------------- digits


@pytest.mark.parametrize("size,channels", [(16, 1), (32, 3)])
def test_digits_shape_range_dtype(size, channels):
    x = load_digits(size=size, channels=channels)
    assert x.shape == (1797, size, size, channels) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    if channels == 3:
        np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_digits_strokes_are_bright_on_black():
    from sklearn.datasets import load_digits as sk_digits

    x, labels = load_digits_with_labels(size=16)
    assert labels.shape == (1797,) and labels[:10].tolist() == list(range(10))
    assert x.max() > 0.9 and np.median(x) < -0.5  # mostly black background, white strokes
    assert (x[:, 0, 0] < -0.9).mean() > 0.95  # corners are background
    orig = sk_digits().images.astype(np.float32) / 8 - 1  # 16 -> +1, 0 -> -1
    back = resize(x[:50], 8)[..., 0]
    assert np.corrcoef(back.ravel(), orig[:50].ravel())[0, 1] > 0.9


def test_digits_bad_arguments():
    with pytest.raises(DataError, match=">= 8"):
        load_digits(size=4)
    with pytest.raises(DataError, match="channels"):
        load_digits(channels=2)


# --------------------------------------------------------------------------- fake CIFAR-10


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 cPickle does (BINSTRING), so no _codecs.encode global appears."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_binstring(self, obj):
        b = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[str] = _save_binstring
    dispatch[bytes] = _save_binstring


def _batch(seed, n=PER_BATCH):
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def _write_cifar(folder, py2=False):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batches[name] = _batch(seed)
        with open(folder / name, "wb") as f:
            (_Py2Pickler(f, protocol=2) if py2 else pickle.Pickler(f, protocol=2)).dump(batches[name])
    return batches


@pytest.mark.parametrize("py2", [False, True])
def test_cifar10_loads_values_and_order(tmp_path, py2):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", py2=py2)
    if py2:
        assert b"_codecs" not in (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    x, y = load_cifar10_with_labels(tmp_path, train=True)  # parent folder accepted
    assert x.shape == (5 * PER_BATCH, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() >= -1 and x.max() <= 1
    b2 = batches["data_batch_2"]
    img = b2[b"data"][3].reshape(3, 32, 32).transpose(1, 2, 0)  # R, G, B planes -> HWC
    np.testing.assert_allclose(x[PER_BATCH + 3], img / 127.5 - 1, atol=1e-6)
    assert y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    xt = load_cifar10(tmp_path / "cifar-10-batches-py", train=False, size=16, channels=1)
    assert xt.shape == (PER_BATCH, 16, 16, 1)


def test_cifar10_missing_folder_and_files(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found: put data_batch_1..5 and test_batch"):
        load_cifar10(tmp_path / "nowhere")
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4 missing"):
        load_cifar10(tmp_path / "c")
    assert load_cifar10(tmp_path / "c", train=False).shape == (PER_BATCH, 32, 32, 3)


class _SystemPayload:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalPayload:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.eval, (self.code,))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("kind", ["system", "eval", "nested"])
def test_malicious_pickle_refused_and_never_run(tmp_path, kind, protocol):
    folder = tmp_path / "cifar"
    _write_cifar(folder)
    sentinel = tmp_path / "SENTINEL"
    if kind == "system":
        payload, refused = _SystemPayload(f"touch {sentinel}"), "system"
    elif kind == "eval":
        payload, refused = _EvalPayload(f"open({str(sentinel)!r}, 'w').close()"), r"builtin\w*\.eval"  # __builtin__.eval under protocol 2
    else:  # hidden inside an otherwise valid batch
        payload = _batch(0)
        payload[b"batch_label"] = _SystemPayload(f"touch {sentinel}")
        refused = "system"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump(payload, f, protocol=protocol)
    with pytest.raises(UnsafePickleError, match=refused) as e:
        load_cifar10(folder)
    assert "data_batch_3" in str(e.value) and "\n" not in str(e.value)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "payload,match",
    [
        ([1, 2, 3], "expected a dict"),
        ({b"labels": [0] * PER_BATCH}, "missing"),
        ({b"data": np.zeros((PER_BATCH, 3072), np.float32), b"labels": [0] * PER_BATCH}, "uint8"),
        ({b"data": np.zeros((PER_BATCH, 1024), np.uint8), b"labels": [0] * PER_BATCH}, "3072"),
        ({b"data": np.zeros((PER_BATCH, 3072), np.uint8), b"labels": [0] * 3}, "labels"),
        ({b"data": np.zeros((PER_BATCH, 3072), np.uint8), b"labels": [11] * PER_BATCH}, "labels"),
    ],
)
def test_cifar10_wrong_structure(tmp_path, payload, match):
    folder = tmp_path / "cifar"
    _write_cifar(folder)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(payload, f, protocol=2)
    with pytest.raises(DataError, match=match) as e:
        load_cifar10(folder)
    assert not isinstance(e.value, UnsafePickleError)


def test_truncated_pickle_is_data_error(tmp_path):
    path = tmp_path / "p"
    path.write_bytes(pickle.dumps(_batch(0), protocol=2)[:100])
    with pytest.raises(DataError, match="not a valid pickle"):
        safe_pickle_load(path)


# --------------------------------------------------------------------------- image folders and load_dataset


def _write_pngs(folder):
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(folder / "sub" / "b.PNG")
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(folder / "c.jpg")
    (folder / "notes.txt").write_text("ignored")


def test_image_folder_round_trip(tmp_path):
    _write_pngs(tmp_path / "imgs")
    x = load_image_folder(tmp_path / "imgs", size=16, channels=3)
    assert x.shape == (3, 16, 16, 3) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    # sorted by path: a.png (black), c.jpg (grey), sub/b.PNG (white)
    np.testing.assert_allclose(x[:, 8, 8, 0], [-1.0, 128 / 127.5 - 1, 1.0], atol=0.03)
    assert load_image_folder(tmp_path / "imgs", size=8, channels=1).shape == (3, 8, 8, 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "nope", size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png"):
        load_image_folder(tmp_path / "empty", size=8)


def test_load_dataset_dispatch(tmp_path):
    assert load_dataset("digits", 16, 1).shape == (1797, 16, 16, 1)
    _write_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
    assert load_dataset(f"cifar10:{tmp_path / 'cifar'}", 32, 3).shape == (5 * PER_BATCH, 32, 32, 3)
    assert load_dataset(str(tmp_path / "cifar"), 16, 1).shape == (5 * PER_BATCH, 16, 16, 1)
    _write_pngs(tmp_path / "imgs")
    assert load_dataset(str(tmp_path / "imgs"), 8, 3).shape == (3, 8, 8, 3)
    with pytest.raises(DataError, match="'digits', 'cifar10:PATH'"):
        load_dataset("mnist", 16, 1)
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}", 32, 3)

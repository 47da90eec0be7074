"""Tests for pdjax.images: conversion, grid layout, PNG/JPEG/.npy round trips, error messages."""

import numpy as np
import pytest
from PIL import Image

from pdjax.errors import DataError
from pdjax.images import GRID_PAD_VALUE, grid, load_image, resize, save_grid, save_image, to_uint8


def _ramp(h=6, w=5, c=3):
    return np.linspace(-1, 1, h * w * c, dtype=np.float32).reshape(h, w, c)


def test_to_uint8_maps_and_clips():
    out = to_uint8(np.array([-2.0, -1.0, 0.0, 1.0, 3.0, np.nan]))
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255, 0]


def test_grid_layout_and_padding():
    x = np.stack([np.full((4, 3, 1), v, np.float32) for v in (-1.0, 1.0, -1.0)])  # 3 images -> 2x2 grid
    g = grid(x, pad=2)
    assert g.shape == (2 * (4 + 2) + 2, 2 * (3 + 2) + 2, 1) and g.dtype == np.uint8
    assert (g[2:6, 2:5] == 0).all() and (g[2:6, 7:10] == 255).all() and (g[8:12, 2:5] == 0).all()
    assert (g[8:12, 7:10] == GRID_PAD_VALUE).all()  # unused cell
    assert (g[0:2] == GRID_PAD_VALUE).all() and (g[:, 5:7] == GRID_PAD_VALUE).all()
    assert grid(np.zeros((6, 4, 4, 3)), nrow=3, pad=0).shape == (8, 12, 3)


def test_save_grid_writes_png_of_expected_size(tmp_path):
    path = tmp_path / "sub" / "dir" / "grid.png"  # parent folders are created
    save_grid(np.zeros((5, 8, 7, 3), np.float32), path, nrow=2, pad=1)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (2 * (7 + 1) + 1, 3 * (8 + 1) + 1)  # (width, height)


def test_save_and_load_png_round_trip(tmp_path):
    x = _ramp()
    save_image(x, tmp_path / "a.png")
    y = load_image(tmp_path / "a.png")
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, x, atol=1 / 127.5 + 1e-6)
    grey = load_image(tmp_path / "a.png", size=(3, 4), channels=1)
    assert grey.shape == (3, 4, 1) and grey.min() >= -1 and grey.max() <= 1
    save_image(x[..., :1], tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").shape == (6, 5, 1)
    assert load_image(tmp_path / "g.png", channels=3).shape == (6, 5, 3)


def test_load_jpeg_and_rgba(tmp_path):
    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "a.jpg")
    y = load_image(tmp_path / "a.jpg", size=8)
    assert y.shape == (8, 8, 3)
    np.testing.assert_allclose(y, 200 / 127.5 - 1, atol=0.05)
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), mode="RGBA").save(tmp_path / "b.png")
    assert load_image(tmp_path / "b.png").shape == (4, 4, 3)


def test_load_npy(tmp_path):
    x = _ramp(8, 8, 3)
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(load_image(tmp_path / "x.npy"), x)
    assert load_image(tmp_path / "x.npy", size=4, channels=1).shape == (4, 4, 1)
    np.save(tmp_path / "hw.npy", x[..., 0])
    assert load_image(tmp_path / "hw.npy").shape == (8, 8, 1)


def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    np.save(tmp_path / "u8.npy", np.full((4, 4, 3), 255, np.uint8))
    with pytest.raises(DataError, match=r"u8\.npy has values in \[255, 255\]"):
        load_image(tmp_path / "u8.npy")
    np.save(tmp_path / "bad.npy", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(DataError, match="expected"):
        load_image(tmp_path / "bad.npy")
    with pytest.raises(DataError, match="channels"):
        load_image(tmp_path / "u8.npy", channels=2)


def test_unwritable_path_raises_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(DataError, match="cannot write") as e:
        save_image(np.zeros((4, 4, 3)), blocker / "out.png")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="cannot write"):
        save_grid(np.zeros((2, 4, 4, 1)), tmp_path / "file" / "x" / "g.png")
    with pytest.raises(DataError, match="save_image expects"):
        save_image(np.zeros((2, 4, 4, 3)), tmp_path / "batch.png")


def test_resize_batch():
    x = np.stack([_ramp(8, 8, 3), -_ramp(8, 8, 3)])
    y = resize(x, 4)
    assert y.shape == (2, 4, 4, 3) and y.dtype == np.float32 and y.min() >= -1 and y.max() <= 1
    assert resize(x, (16, 12)).shape == (2, 16, 12, 3)
    np.testing.assert_array_equal(resize(x, 8), x)
    with pytest.raises(DataError, match="batch"):
        resize(x[0], 4)

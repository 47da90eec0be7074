"""Tests for pdjax.backdoor.triggers (SPEC 2.1, 2.2): geometry, ranges, masks, names, user files."""

import numpy as np
import pytest
from PIL import Image

from pdjax.backdoor import triggers as T
from pdjax.errors import ConfigError, DataError, UnknownNameError

SIZES, CHANNELS = (16, 32, 64), (1, 3)
TRIGGER_NAMES = ("BOX_4", "WHITE_BOX_5", "SM_BOX", "STOP_SIGN_8", "STOP_SIGN_14", "GLASSES")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_trigger_and_target_shapes_and_ranges(size, channels):
    for name in TRIGGER_NAMES:
        g = T.get_trigger(name, size, channels)
        assert g.shape == (size, size, channels) and g.dtype == np.float32, name
        m = T.trigger_mask(g)
        assert m.any() and not m.all(), name
        assert g.max() <= 1.0 and (g[~m] == -1.0).all() and (g[m] >= T.TRIGGER_MIN).all(), name
        assert (m == m[..., :1]).all(), name  # a drawn pixel is in the mask in every channel
    for name in T.TARGETS:
        y = T.get_target(name, size, channels)
        assert y.shape == (size, size, channels) and y.dtype == np.float32, name
        assert y.min() == pytest.approx(T.TARGET_BACKGROUND) and y.max() <= 1.0, name
        assert (y == np.float32(T.TARGET_BACKGROUND)).mean() > 0.3, name  # a -0.4 grey background
        assert (y > T.TARGET_BACKGROUND + 0.2).any(), name  # and a visible drawing
    for name in T.TROJ_TRIGGERS:
        tt = T.get_troj_trigger(name, size, channels)
        assert tt.image.shape == tt.mask.shape == (size, size, channels) and tt.mask.dtype == bool


def test_box14_reference_geometry():
    g = T.get_trigger("BOX_14", 32, 3)
    inside = np.zeros((32, 32), bool)
    inside[16:30, 16:30] = True  # SPEC 2.1: rows/cols 16..29
    assert (g[inside] == 0.0).all() and (g[~inside] == -1.0).all()
    np.testing.assert_array_equal(T.trigger_mask(g), np.repeat(inside[..., None], 3, axis=-1))
    sm = T.get_trigger("SM_BOX", 32, 1)
    assert (sm[inside] == 1.0).all() and (sm[~inside] == -1.0).all()
    assert T.sm_box_side(16) == 7 and T.sm_box_side(64) == 28
    w = T.get_trigger("white_box_5", 16, 1)[..., 0]
    assert (w[9:14, 9:14] == 1.0).all() and (w > -1).sum() == 25


def test_stop_sign_and_glasses_placement():
    s = T.get_trigger("STOP_SIGN_14", 32, 3)
    rows, cols = np.nonzero(T.trigger_mask(s)[..., 0])
    assert rows.min() >= 16 and rows.max() <= 29 and cols.min() >= 16 and cols.max() <= 29
    assert rows.max() - rows.min() >= 12 and (s[rows, cols, 0] > s[rows, cols, 1]).mean() > 0.5  # mostly red
    assert (s[rows, cols] == 1.0).all(axis=-1).any()  # white border / bar
    gl = T.trigger_mask(T.get_trigger("GLASSES", 32, 1))[..., 0]
    cols = np.nonzero(gl.any(axis=0))[0]
    assert 16 <= cols.max() - cols.min() + 1 <= 20 + 2  # ~int(0.625 * 32) = 20 wide (temples may add 1)
    assert abs((cols.min() + cols.max()) / 2 - 15.5) <= 1.0  # centred


def test_corner_target():
    y = T.get_target("corner", 32, 3)
    assert (y[:10, :10] == 0.0).all() and (y[10:] == np.float32(-0.4)).all() and (y[:, 10:] == np.float32(-0.4)).all()
    assert (T.get_target("CORNER", 64, 1)[:20, :20] == 0.0).all()


def test_names_case_insensitive_and_unknown():
    np.testing.assert_array_equal(T.get_trigger("stop_sign_14", 32, 3), T.get_trigger("STOP_SIGN_14", 32, 3))
    np.testing.assert_array_equal(T.get_target(" cat ", 32, 1), T.get_target("CAT", 32, 1))
    assert T.get_troj_trigger("Blend", 16).gamma == 0.6 and T.get_troj_trigger("PATCH", 16).gamma == 0.1
    with pytest.raises(UnknownNameError) as e:
        T.get_trigger("BOXX_3", 32, 3)
    msg = str(e.value)
    assert "BOXX_3" in msg and "BOX_<n>" in msg and "GLASSES" in msg and "STOP_SIGN_<n>" in msg and "\n" not in msg
    with pytest.raises(UnknownNameError, match="CORNER"):
        T.get_target("DOG", 32, 3)


def test_does_not_fit_and_bad_args():
    with pytest.raises(ConfigError, match="does not fit"):
        T.get_trigger("BOX_15", 16, 3)
    with pytest.raises(ConfigError, match="does not fit"):
        T.get_trigger("STOP_SIGN_31", 32, 3)
    assert T.trigger_mask(T.get_trigger("BOX_14", 16, 1)).sum() == 14 * 14  # exactly fits
    with pytest.raises(ConfigError):
        T.get_trigger("BOX_0", 32, 3)
    with pytest.raises(ConfigError):
        T.get_trigger("BOX_4", 32, 2)
    with pytest.raises(ConfigError):
        T.get_target("CAT", 0, 3)


def test_troj_triggers():
    p = T.get_troj_trigger("patch", 32, 3)
    assert p.mask.sum() == 27 and p.mask[-3:, -3:].all() and (p.image[p.mask] == 1.0).all()
    b = T.get_troj_trigger("blend", 32, 3)
    assert b.mask.all() and b.image.min() >= -1 and b.image.max() <= 1 and b.image.std() > 0.2
    np.testing.assert_array_equal(T.get_troj_trigger("patch@29,29", 32, 3).image, p.image)  # the default's place
    q = T.get_troj_trigger("Patch@2,4", 32, 3)
    assert q.gamma == 0.1 and q.mask.sum() == 27 and q.mask[2:5, 4:7].all() and (q.image[q.mask] == 1.0).all()
    assert T.is_troj_trigger("patch@2,4") and T.is_troj_patch("PATCH@2,4") and not T.is_troj_patch("blend")
    assert not T.is_troj_trigger("patch@2") and not T.is_troj_trigger("BOX_14")
    with pytest.raises(ConfigError, match="does not fit a 32x32 image"):
        T.get_troj_trigger("patch@30,0", 32, 3)
    with pytest.raises(UnknownNameError, match="patch@ROW,COL"):
        T.get_troj_trigger("patch@2", 32, 3)


def test_user_png_trigger_and_target(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[4:8, 4:8] = 255  # white square at the bottom-right on a black (= -1 background) picture
    path = tmp_path / "trig.png"
    Image.fromarray(arr).save(path)
    g = T.get_trigger(path, 8, 3)
    np.testing.assert_array_equal(T.trigger_mask(g)[..., 0], arr[..., 0] > 0)
    g16 = T.get_trigger(str(path), 16, 1)
    assert g16.shape == (16, 16, 1) and (g16[:6, :6] == -1.0).all() and (g16[10:, 10:] == 1.0).all()
    y = T.get_target(path, 16, 3)
    assert y.shape == (16, 16, 3) and (y[:6, :6] == np.float32(-0.4)).all() and y.max() == 1.0
    np.save(tmp_path / "t.npy", np.full((4, 4), 0.5, np.float32))
    assert (T.get_target(tmp_path / "t.npy", 8, 3) == 0.5).all()
    with pytest.raises(DataError, match="not found"):
        T.get_trigger(tmp_path / "missing.png", 8, 3)


def test_preview_grid(tmp_path):
    batch = T.preview(tmp_path / "preview.png", size=16, channels=1)
    assert batch.shape[1:] == (16, 16, 1) and (tmp_path / "preview.png").is_file()


@pytest.mark.parametrize("channels", CHANNELS)
def test_full_frame_surrogate_trigger_has_no_background(channels):
    """FULL_FRAME covers the whole image, so a poisoned training input pasted on any picture is g itself."""
    import jax.numpy as jnp

    from pdjax.backdoor.attacks import pasted

    g = T.get_trigger("FULL_FRAME", 16, channels)
    assert g.shape == (16, 16, channels) and T.trigger_mask(g).all()
    assert g.min() > -1.0 and g.max() <= 1.0 and g.std() > 0.2  # structured, not a constant offset
    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, channels)).astype(np.float32)
    r = pasted(jnp.asarray(x), jnp.asarray(g), jnp.asarray(T.trigger_mask(g), jnp.float32))
    np.testing.assert_array_equal(np.asarray(r), np.broadcast_to(g, x.shape))

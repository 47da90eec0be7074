"""Tests for pdjax.metrics (SPEC 5, 7): known values, an independent SSIM, trimmed means, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax import metrics as M


def _imgs(n=4, h=16, w=16, c=3, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, c)).astype(np.float32)


def _ssim_numpy(a, b, win=11, sigma=1.5):
    """Independent reference: explicit 2-D Gaussian windows, population (co)variances, valid mode."""
    a, b = (np.asarray(a, np.float64) + 1) / 2, (np.asarray(b, np.float64) + 1) / 2
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    h, wd, ch = a.shape
    vals = []
    for k in range(ch):
        for i in range(h - win + 1):
            for j in range(wd - win + 1):
                pa, pb = a[i : i + win, j : j + win, k], b[i : i + win, j : j + win, k]
                ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
                va, vb = (w2 * (pa - ma) ** 2).sum(), (w2 * (pb - mb) ** 2).sum()
                cov = (w2 * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_identical_images():
    x = _imgs()
    np.testing.assert_allclose(M.mse_to_target(x, x), 0.0, atol=0)
    np.testing.assert_allclose(M.ssim(x, x), 1.0, atol=1e-5)
    assert float(M.asr(x, x)) == 1.0
    m = M.attack_metrics(x, x[0])
    assert m.n == 4 and m.threshold == 0.05 and m.asr == 0.25 and set(m.to_dict()) == {"mse", "asr", "ssim", "n", "threshold"}


def test_constant_offset_mse_and_unit_scale():
    x = np.zeros((3, 8, 8, 1), np.float32)
    y = np.full((8, 8, 1), 0.4, np.float32)  # [0, 1] scale: 0.5 vs 0.7 -> 0.04
    np.testing.assert_allclose(M.mse_to_target(x, y), 0.04, rtol=1e-6)
    np.testing.assert_allclose(M.to_unit(jnp.array([-3.0, -1.0, 0.0, 1.0, 2.0])), [0, 0, 0.5, 1, 1])
    assert float(M.asr(x, y)) == 1.0 and float(M.asr(x, y, threshold=0.03)) == 0.0


def test_asr_threshold_depends_on_resolution():
    assert M.asr_threshold(32) == 0.05 and M.asr_threshold(16) == 0.05 and M.asr_threshold(64) == 0.1
    # MSE 0.0625 fails the 32 px threshold (0.05) but passes the 64 px one (0.1)
    for h, off, expect in ((32, 0.4, 1.0), (32, 0.5, 0.0), (64, 0.5, 1.0), (64, 0.7, 0.0)):
        x = np.zeros((2, h, h, 3), np.float32)
        y = np.full((h, h, 3), off, np.float32)  # MSE = (off / 2)^2: 0.04, 0.0625, 0.0625, 0.1225
        assert float(M.asr(x, y)) == expect, (h, off)


def test_ssim_matches_independent_numpy():
    x, y = _imgs(2, 16, 14, 3, seed=1), _imgs(2, 16, 14, 3, seed=2)
    y = np.clip(0.6 * x + 0.4 * y, -1, 1)  # correlated pair, SSIM well inside (0, 1)
    got = np.asarray(M.ssim(x, y))
    want = [_ssim_numpy(x[i], y[i]) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert 0.1 < got.min() < got.max() < 0.99


def test_ssim_small_images_shrink_window():
    assert M.ssim_window(32, 32) == 11 and M.ssim_window(8, 8) == 7 and M.ssim_window(9, 10) == 9
    x, y = _imgs(1, 8, 8, 1, seed=3), _imgs(1, 8, 8, 1, seed=4)
    np.testing.assert_allclose(M.ssim(x, y)[0], _ssim_numpy(x[0], y[0], win=7), rtol=1e-4, atol=1e-5)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _imgs(1, 24, 24, 3, seed=5), _imgs(1, 24, 24, 3, seed=6)
    y = np.clip(0.7 * x + 0.3 * y, -1, 1)
    ref = metrics.structural_similarity((x[0] + 1) / 2, (y[0] + 1) / 2, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0, channel_axis=-1)
    np.testing.assert_allclose(M.ssim(x, y)[0], ref, rtol=1e-4)


def test_trigger_l2():
    g = np.full((4, 4, 1), -1.0, np.float32)
    g[2:, 2:] = 0.0
    delta = g.copy()
    delta[3, 3] += 0.3  # in mask
    delta[0, 0] += 0.4  # outside
    out = M.trigger_l2(delta, g)
    np.testing.assert_allclose(out["l2_in_mask"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(out["l2_overall"], 0.5, rtol=1e-6)
    assert M.trigger_l2(np.stack([delta, g]), g)["l2_overall"].shape == (2,)


def test_pairwise_and_trimmed_mean_hand_computed():
    x = np.array([0.0, 1.0, 3.0, 7.0], np.float32).reshape(4, 1, 1, 1)
    d = np.asarray(M.pairwise_distances(x))
    np.testing.assert_allclose(d, np.abs(x.reshape(4, 1) - x.reshape(1, 4)))
    # rows sorted, drop 1 smallest and 1 largest: (1+3)/2, (1+2)/2, (2+3)/2, (4+6)/2 = 2, 1.5, 2.5, 5
    np.testing.assert_allclose(M.trimmed_mean(d, axis=1), [2.0, 1.5, 2.5, 5.0])
    np.testing.assert_allclose(M.uniformity(x), 2.25)  # sorted 1.5, 2, 2.5, 5 -> (2 + 2.5) / 2


def test_uniformity_identical_vs_diverse():
    same = np.repeat(_imgs(1), 16, axis=0)
    assert float(M.uniformity(same)) == 0.0
    assert float(M.uniformity(_imgs(16))) > 10.0


def test_total_variation():
    x = np.zeros((2, 4, 4, 1), np.float32)
    x[1, :, 2:] = 1.0  # one vertical edge: 4 horizontal pairs of 24 pairs differ by 1
    np.testing.assert_allclose(M.total_variation(x), [0.0, 4 / 24])


def test_jit_compatible():
    x, y = _imgs(4, 16, 16, 3), _imgs(1, 16, 16, 3)[0]
    for fn in (M.mse_to_target, M.asr, M.ssim):
        np.testing.assert_allclose(jax.jit(fn)(x, y), fn(x, y), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(M.uniformity)(x), M.uniformity(x), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(M.total_variation)(x), M.total_variation(x), rtol=1e-5)
    out = jax.jit(M.trigger_l2)(x[0], y)
    assert set(out) == {"l2_in_mask", "l2_overall"}
    grad = jax.grad(lambda z: M.uniformity(z))(jnp.repeat(x[:1], 4, axis=0))
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_nearest_data_mse_hand_computed():
    data = np.stack([np.full((2, 2, 1), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    x = np.stack([np.full((2, 2, 1), 0.25, np.float32), data[2]])
    # 0.25 is nearest to 0.0 (0.0625); the copy of a data image is at distance 0
    np.testing.assert_allclose(np.asarray(M.nearest_data_mse(x, data)), [0.0625, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="image shape"):
        M.nearest_data_mse(x, np.zeros((3, 3, 3, 1), np.float32))

"""Metrics (SPEC 7) and the generation statistics used for detection (SPEC 5), in pure jax.numpy.

Every function is batched and jittable; images are NHWC float32. Conventions, stated once:

- MSE / ASR / SSIM (SPEC 7) compare images on the [0, 1] scale: :func:`to_unit` maps [-1, 1] -> [0, 1]
  and clips, as a saved picture would (samplers run with x0-clipping off, so generations can leave
  [-1, 1]).
- ASR threshold: MSE < 0.05 when H <= 32, else 0.1 (SPEC 7); decided from the static image height.
- SSIM: Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, "valid" filtering (no
  padding, as skimage's ``gaussian_weights=True, use_sample_covariance=False`` and pytorch_msssim),
  computed per channel and averaged over channels and window positions. Images smaller than 11 px
  use the largest odd window ``<= min(H, W)`` (same sigma), since a valid 11-tap filter needs 11 px.
- Trigger fidelity, uniformity, TV and pairwise distances work on the values as given (no rescaling);
  pass generations in [-1, 1].
- Uniformity (SPEC 5): a trimmed mean. Each row of the full ``[n, n]`` pairwise-distance matrix is
  sorted, its ``n // 4`` smallest and ``n // 4`` largest entries dropped and the rest averaged; the ``n``
  row values are trimmed and averaged the same way. The zero diagonal stays in its row (the SPEC's
  "each row of the pairwise matrix"); being the row's minimum it is always among the dropped
  entries when ``n >= 4`` (so with the SPEC's n = 16 it never counts); for ``n < 4`` nothing is
  trimmed and it does count.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

#: SSIM constants (Wang et al. 2004) for data range 1.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def to_unit(x):
    """Map ``x`` in [-1, 1] (any shape) to [0, 1]: ``(x + 1) / 2``, clipped to [0, 1]."""
    return jnp.clip((jnp.asarray(x, jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def _batch(x):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C] (or one [H, W, C]), got shape {x.shape}")
    return x


def _pair(x, y):
    x = _batch(x)
    y = jnp.broadcast_to(jnp.asarray(y, jnp.float32), x.shape)  # y: [H, W, C] or [N, H, W, C]
    return x, y


def mse_to_target(x, y):
    """Per-sample MSE to the target (SPEC 7): mean over C, H, W of ``(x - y)^2`` on [0, 1]-scaled images.

    Args:
      x: ``[N, H, W, C]`` generations in [-1, 1] (clipped by :func:`to_unit`).
      y: ``[H, W, C]`` target (broadcast) or ``[N, H, W, C]``, in [-1, 1].
    Returns:
      ``[N]`` float32.
    """
    x, y = _pair(x, y)
    return jnp.mean((to_unit(x) - to_unit(y)) ** 2, axis=(1, 2, 3))


def asr_threshold(height: int) -> float:
    """SPEC 7 ASR threshold: 0.05 for images up to 32 px high, 0.1 for larger ones."""
    return 0.05 if int(height) <= 32 else 0.1


def asr(x, y, threshold=None):
    """Attack success rate (SPEC 7): fraction of samples with :func:`mse_to_target` below ``threshold``.

    Args:
      x: ``[N, H, W, C]`` triggered generations in [-1, 1]; y: ``[H, W, C]`` or ``[N, H, W, C]`` target.
      threshold: MSE threshold; ``None`` = :func:`asr_threshold` of H (0.05 if H <= 32 else 0.1).
    Returns:
      float32 scalar array in [0, 1].
    """
    x, y = _pair(x, y)
    if threshold is None:
        threshold = asr_threshold(x.shape[1])
    return jnp.mean((mse_to_target(x, y) < threshold).astype(jnp.float32))


def _gaussian(win: int, sigma: float):
    r = jnp.arange(win, dtype=jnp.float32) - (win - 1) / 2
    g = jnp.exp(-0.5 * (r / sigma) ** 2)
    return g / jnp.sum(g)


def _filter_valid(x, g):
    """Separable valid-mode filtering of ``[N, H, W, C]`` with the 1-D kernel ``g`` on H then W."""
    k = g.shape[0]
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    x = sum(g[i] * x[:, i : i + h] for i in range(k))
    return sum(g[i] * x[:, :, i : i + w] for i in range(k))


def ssim_window(height: int, width: int) -> int:
    """SSIM window side: 11, or for smaller images the largest odd number ``<= min(height, width)``."""
    m = min(SSIM_WINDOW, int(height), int(width))
    return max(1, m if m % 2 else m - 1)


def ssim(x, y):
    """Per-sample SSIM (SPEC 7) on [0, 1]-scaled images: Gaussian window 11, sigma 1.5, data range 1.

    Valid filtering; per channel; averaged over channels and window positions (see module docstring).

    Args:
      x: ``[N, H, W, C]`` in [-1, 1]; y: ``[H, W, C]`` (broadcast) or ``[N, H, W, C]`` in [-1, 1].
    Returns:
      ``[N]`` float32 (1 for identical images).
    """
    x, y = _pair(x, y)
    x, y = to_unit(x), to_unit(y)
    g = _gaussian(ssim_window(x.shape[1], x.shape[2]), SSIM_SIGMA)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(y * y, g) - my * my
    sxy = _filter_valid(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def trigger_l2(delta, g, mask=None):
    """Trigger fidelity (SPEC 7): L2 distance between an inverted trigger and the true one.

    Args:
      delta: ``[H, W, C]`` or ``[N, H, W, C]`` inverted trigger(s), raw values.
      g: ``[H, W, C]`` true trigger (background -1).
      mask: bool ``[H, W, C]`` (or broadcastable) trigger mask; ``None`` = ``g > -1`` (SPEC 2).
    Returns:
      ``{"l2_in_mask": ||(delta - g) * M||_2, "l2_overall": ||delta - g||_2}``, scalars (or ``[N]``).
    """
    delta, g = jnp.asarray(delta, jnp.float32), jnp.asarray(g, jnp.float32)
    m = (g > -1.0) if mask is None else jnp.asarray(mask, bool)
    d2 = (delta - g) ** 2
    axes = (-3, -2, -1)
    return {
        "l2_in_mask": jnp.sqrt(jnp.sum(jnp.where(m, d2, 0.0), axis=axes)),
        "l2_overall": jnp.sqrt(jnp.sum(d2, axis=axes)),
    }


def _safe_sqrt(s):
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)  # finite gradient at 0


def pairwise_distances(x):
    """Euclidean distances between flattened images: ``[N, ...]`` -> ``[N, N]`` (zero diagonal).

    Computed row by row from explicit differences (exact zeros for identical images; memory N * D).
    """
    x = jnp.asarray(x, jnp.float32)
    f = x.reshape(x.shape[0], -1)
    return jax.lax.map(lambda fi: _safe_sqrt(jnp.sum((f - fi) ** 2, axis=1)), f)


def trimmed_mean(v, axis: int = -1):
    """Mean along ``axis`` after sorting and dropping the ``n // 4`` smallest and largest values."""
    v = jnp.sort(jnp.asarray(v, jnp.float32), axis=axis)
    n = v.shape[axis]
    k = n // 4
    return jnp.mean(jax.lax.slice_in_dim(v, k, n - k, axis=axis % v.ndim), axis=axis)


def uniformity(x):
    """Uniformity of a set of generations (SPEC 5): trimmed mean pairwise distance, float32 scalar.

    Each row of :func:`pairwise_distances` is trimmed (``n // 4`` dropped at each end, zero diagonal
    included in the row, see the module docstring) and averaged, then the row values likewise.
    Low = the samples collapsed onto one image (a backdoor fired). ``x``: ``[N, H, W, C]``.
    """
    return trimmed_mean(trimmed_mean(pairwise_distances(x), axis=1), axis=0)


def nearest_data_mse(x, data):
    """Per-sample distance of generations to the data: the smallest mean squared difference (over H, W, C,
    on the values as given, so [-1, 1] images) between each generation and any image of ``data``.

    A label-free quality check: clean generations of a healthy model lie near training-like images; a
    model that collapses its clean chain onto some other image moves them away. ``x``: ``[N, H, W, C]``,
    ``data``: ``[M, H, W, C]`` -> ``[N]`` (computed row by row, memory M * H * W * C).
    """
    x, data = _batch(x), _batch(data)
    if x.shape[1:] != data.shape[1:]:
        raise ValueError(f"generations {x.shape[1:]} and data {data.shape[1:]} differ in image shape")
    d = data.reshape(data.shape[0], -1)
    return jax.lax.map(lambda xi: jnp.min(jnp.mean((d - xi) ** 2, axis=1)), x.reshape(x.shape[0], -1))


def total_variation(x):
    """Per-sample total variation (SPEC 5): mean absolute difference of vertical and horizontal
    neighbours, pooled over all neighbour pairs and channels. ``[N, H, W, C]`` -> ``[N]``."""
    x = _batch(x)
    dv = jnp.abs(x[:, 1:] - x[:, :-1])
    dh = jnp.abs(x[:, :, 1:] - x[:, :, :-1])
    total = jnp.sum(dv, axis=(1, 2, 3)) + jnp.sum(dh, axis=(1, 2, 3))
    return total / max(1, dv[0].size + dh[0].size)


@dataclasses.dataclass(frozen=True)
class AttackMetrics:
    """Attack metrics of one set of triggered generations (SPEC 7).

    Attributes: mse (mean MSE to target, [0, 1] scale), asr (fraction below ``threshold``), ssim (mean
    SSIM to the target), n (sample count), threshold (the ASR threshold used).
    """

    mse: float
    asr: float
    ssim: float
    n: int
    threshold: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@jax.jit
def _attack_arrays(x, y, threshold):
    m = mse_to_target(x, y)
    return jnp.mean(m), jnp.mean((m < threshold).astype(jnp.float32)), jnp.mean(ssim(x, y))


def attack_metrics(x, y, threshold=None) -> AttackMetrics:
    """MSE, ASR and SSIM of generations ``x`` ``[N, H, W, C]`` against target ``y`` (SPEC 7), as floats."""
    x = _batch(x)
    thr = asr_threshold(x.shape[1]) if threshold is None else float(threshold)
    y = jnp.broadcast_to(jnp.asarray(y, jnp.float32), x.shape)
    mse, rate, s = _attack_arrays(x, y, jnp.float32(thr))
    vals = [float(v) for v in (mse, rate, s)]
    return AttackMetrics(mse=vals[0], asr=vals[1], ssim=vals[2], n=int(x.shape[0]), threshold=thr)


__all__ = [
    "AttackMetrics", "asr", "asr_threshold", "attack_metrics", "mse_to_target", "pairwise_distances", "ssim",
    "nearest_data_mse", "ssim_window", "to_unit", "total_variation", "trigger_l2", "trimmed_mean", "uniformity",
]

"""The exact minimiser of the (BadDiffusion-poisoned) DDPM loss on a finite training set: an oracle "model".

A network trained with the eps-prediction loss approximates the conditional mean E[target | x_t, t]. On a
finite training set that mean has a closed form, so it can stand in for a perfectly trained model. It is
used to tell an estimator's own bias from a trained surrogate's error (experiments/estimate_lambda.py
``--oracle``; the lambda_t self-check of SPEC 3).

Training distribution (SPEC 2.1, BadDiffusion with poison rate p): with probability 1 - p a clean image
x_i (uniform over the N images), x_t = sqrt(abar_t) x_i + sqrt(1 - abar_t) eps, target eps; with
probability p a poisoned pair, x_t = sqrt(abar_t) y + k_t r_j + sqrt(1 - abar_t) eps with k_t = 1 -
sqrt(abar_t) and r_j = M g + (1 - M) x_j (or, for a share of them, g on a blank -1 canvas), target
eps + rho_t r_j. Each of the 2N + 1 hypotheses h has a mean m_h(t) and the same isotropic variance
1 - abar_t, so

    E[target | x_t] = sum_h w_h(x_t) [(x_t - m_h) / sqrt(1 - abar_t) + rho_t r_h [h poisoned]],
    w_h proportional to prior_h exp(-||x_t - m_h||^2 / (2 (1 - abar_t))).

Cost per call: two [B, N] distance matrices (one matmul each); fine for N of a few thousand 16 x 16 images.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pdjax.diffusion.schedule import Schedule
from pdjax.errors import ConfigError


@flax.struct.dataclass
class OracleParams:
    """The oracle's "params" (a pytree, so it is a jit argument like a network's params).

    Attributes:
        images: [N, D] clean training images, flattened.
        poisoned: [N', D] the poisoned inputs r_j ([0, D] for a clean oracle).
        target: [D] the backdoor target y.
        log_prior: [N + N'] log prior of each hypothesis, clean images first.
        sqrt_abar: [T] sqrt(abar_t).
        sqrt_one_minus_abar: [T] sqrt(1 - abar_t).
        rho: [T] rho_t, the BadDiffusion correction (SPEC 2.1).
    """

    images: jax.Array
    poisoned: jax.Array
    target: jax.Array
    log_prior: jax.Array
    sqrt_abar: jax.Array
    sqrt_one_minus_abar: jax.Array
    rho: jax.Array


def oracle_params(schedule: Schedule, images, trigger=None, mask=None, target=None,
                  poison_rate: float = 0.0, blank_fraction: float = 0.0) -> OracleParams:
    """Builds :class:`OracleParams` for a training set and, optionally, a BadDiffusion backdoor.

    Args:
        schedule: the training :class:`Schedule`.
        images: [N, H, W, C] training images in [-1, 1].
        trigger, mask: [H, W, C] the trigger g and its mask M (default: g > -1); None for a clean oracle.
        target: [H, W, C] the target y (needed with a trigger).
        poison_rate: p in [0, 1).
        blank_fraction: the share of poisoned rows pasted on a blank (-1) canvas (r = M g - (1 - M), as
            :func:`pdjax.backdoor.attacks.backdoor_loss`); the rest paste on a training image.
    """
    from pdjax.backdoor.attacks import rho

    x = np.asarray(images, np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise ConfigError(f"images must be [N, H, W, C] with N >= 1, got shape {x.shape}")
    n, d = len(x), int(np.prod(x.shape[1:]))
    if trigger is None:
        poisoned, y, prior_bd = np.zeros((0, d), np.float32), np.zeros(d, np.float32), np.zeros(0)
        p = 0.0
    else:
        if target is None or not 0.0 < poison_rate < 1.0 or not 0.0 <= blank_fraction <= 1.0:
            raise ConfigError("a poisoned oracle needs a target, a poison_rate in (0, 1) and a blank_fraction in [0, 1]")
        g = np.asarray(trigger, np.float32)
        m = (g > -1).astype(np.float32) if mask is None else np.asarray(mask, np.float32)
        p = float(poison_rate)
        poisoned = np.concatenate([(m * g + (1.0 - m) * x).reshape(n, d), (m * g - (1.0 - m)).reshape(1, d)])
        prior_bd = np.concatenate([np.full(n, p * (1.0 - blank_fraction) / n), [p * blank_fraction]])
        y = np.asarray(target, np.float32).reshape(d)
    prior = np.concatenate([np.full(n, (1.0 - p) / n), prior_bd])
    with np.errstate(divide="ignore"):
        log_prior = np.log(prior)
    return OracleParams(
        images=jnp.asarray(x.reshape(n, d)), poisoned=jnp.asarray(poisoned), target=jnp.asarray(y),
        log_prior=jnp.asarray(log_prior, jnp.float32),
        sqrt_abar=schedule.sqrt_abar, sqrt_one_minus_abar=schedule.sqrt_one_minus_abar,
        rho=jnp.asarray(np.asarray(rho(schedule)), jnp.float32))


def oracle_eps(params: OracleParams, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """E[target | x_t, t] under the training distribution of ``params`` (see the module docstring).

    Args:
        params: :class:`OracleParams`.
        x_t: [B, H, W, C] noisy images.
        t: [B] int timesteps.

    Returns:
        [B, H, W, C] the loss-minimising eps prediction (float32).
    """
    shape = x_t.shape
    x = x_t.reshape(shape[0], -1).astype(jnp.float32)                            # [B, D]
    sa, s1 = params.sqrt_abar[t][:, None], params.sqrt_one_minus_abar[t][:, None]  # [B, 1]
    k = 1.0 - sa
    X, R = params.images, params.poisoned                                         # [N, D], [N', D]
    # Squared distances to the hypothesis means without forming [B, N, D]:
    # clean m_i = sa x_i; poisoned m_j = sa y + k r_j.
    d_clean = (jnp.sum(x * x, 1, keepdims=True) - 2.0 * sa * (x @ X.T)
               + sa ** 2 * jnp.sum(X * X, 1)[None])
    u = x - sa * params.target[None]
    d_bd = jnp.sum(u * u, 1, keepdims=True) - 2.0 * k * (u @ R.T) + k ** 2 * jnp.sum(R * R, 1)[None]
    logits = params.log_prior[None] - jnp.concatenate([d_clean, d_bd], axis=1) / (2.0 * s1 ** 2)
    w = jax.nn.softmax(logits, axis=1)                                            # [B, N + N']
    w_clean, w_bd = w[:, :X.shape[0]], w[:, X.shape[0]:]
    bd_r = w_bd @ R                                                               # [B, D]
    mean = sa * (w_clean @ X) + sa * jnp.sum(w_bd, 1, keepdims=True) * params.target[None] + k * bd_r
    return ((x - mean) / s1 + params.rho[t][:, None] * bd_r).reshape(shape)

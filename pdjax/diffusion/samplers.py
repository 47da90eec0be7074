"""DDPM and DDIM samplers (SPEC section 1): one ``lax.scan`` inside one ``jax.jit`` each.

An eps-model is a pure function ``eps_fn(params, x_t, t) -> eps_hat`` with x_t [B, H, W, C] float32 and
t [B] int32 (0-based, t = T-1 is pure noise). ``eps_fn`` is static (hashed by identity: define it once,
e.g. at module level or with ``functools.partial`` built once, so the compile is reused); ``params`` is
a traced pytree, so one compile serves every checkpoint of an architecture and a stack of models is
``jax.vmap`` over ``params`` (and ``x_T``, ``key``).

Randomness: the noise of the step at timestep t is ``normal(fold_in(key, t), x.shape)``, whatever the
loop layout (full scan, ``num_steps`` prefix, unrolled scan, or a host loop of :func:`ddpm_step`), so
all of them produce identical samples for the same key.

Layers, from the maths up:
- :func:`ddpm_update` / :func:`ddim_update`: one model-free update given eps_hat and the noise z.
- :func:`ddpm_step` / :func:`ddim_step`: one step with the model and the chain key (for inversion code
  that unrolls K steps with gradients, or a host loop of jitted steps).
- :func:`ddpm_sample` / :func:`ddim_sample`: the whole chain, jitted, as a ``lax.scan``. ``unroll`` is
  passed to the scan: forward sampling is fine with 1; when differentiating through a chain on
  XLA:CPU, an unrolled scan is much faster (DESIGN habit 2) and gives the same numbers.

Agreement with diffusers, given the same noise: ``ddim_sample`` matches ``DDIMScheduler``
(timestep_spacing "leading", steps_offset 0, set_alpha_to_one=True) within 1e-5. ``ddpm_sample``
matches ``DDPMScheduler.step`` (prediction_type "epsilon", same variance_type / clip_sample) within
1e-5 per step for t >= 50; below that diffusers' own float32 evaluation of current_beta_t =
1 - abar_t / abar_{t-1} cancels and its step drifts from the exact value of its formula by up to
~2e-5 (t < 50) and ~1.2e-4 (t < 10), while ours stays within 1e-5 of it (coefficients precomputed in
float64 in the :class:`Schedule`). tests/test_samplers.py checks all three statements.

Compile cost: on XLA:CPU each jitted function that draws threefry normals takes ~2.5 s to compile
whatever its size, so share one compiled sampler (same eps_fn object and static options) where you can.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.diffusion.schedule import Schedule, check_variance_type
from pdjax.errors import ConfigError
from pdjax.sharding import batch_noise, batch_parallel

EpsFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

# Minimum of the fixed_small variance, as diffusers clamps it (it is 0 at t = 0, where no noise is added).
SAMPLERS = ("ddpm", "ddim")  # the sampler names every pdjax option accepts
DDIM_STEPS = 100  # the DDIM-100 sampler of ODE-trained models (SPEC 2.3 evaluation)
_MIN_VARIANCE = 1e-20


class Trajectory(NamedTuple):
    """What a sampler visited, one row per reverse step i (K steps).

    Attributes:
        xs: [K, B, H, W, C] the model input x_t at step i (xs[0] = x_T).
        eps: [K, B, H, W, C] the model output eps_hat(x_t, t) at step i.
        timesteps: [K] int32, the timestep t of step i (descending).
    """

    xs: jax.Array
    eps: jax.Array
    timesteps: jax.Array


def _bcast(coef: jax.Array, like: jax.Array) -> jax.Array:
    """Scalar or [B] -> broadcastable against ``like`` [B, ...]."""
    coef = jnp.asarray(coef)
    return jnp.reshape(coef, coef.shape + (1,) * (like.ndim - coef.ndim))


def _eps(eps_fn: EpsFn, params, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Calls the model with t broadcast to [B] int32."""
    tb = jnp.full((x_t.shape[0],), t, dtype=jnp.int32)
    return eps_fn(params, x_t, tb)


def _noise(key: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """The chain's noise for timestep t: normal(fold_in(key, t)), shaped like ``like`` (the same numbers
    per sample when the batch is split over devices, :func:`pdjax.sharding.batch_noise`)."""
    return batch_noise(jax.random.fold_in(key, t), like.shape, like.dtype)


def _check_x(x_T) -> None:
    if getattr(x_T, "ndim", None) != 4:
        raise ConfigError(f"x_T must be [B, H, W, C], got shape {getattr(x_T, 'shape', None)}; add a batch axis")


# ------------------------------------------------------------------------------------------- DDPM
def ddpm_update(
    schedule: Schedule,
    x_t: jax.Array,
    eps_hat: jax.Array,
    t: jax.Array,
    z: jax.Array,
    *,
    variance_type: str = "fixed_large",
    clip_sample: bool = False,
) -> jax.Array:
    """One DDPM ancestral update x_t -> x_{t-1} from a given eps_hat and noise (SPEC 1).

    Without clipping: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_hat) / sqrt(alpha_t) + sigma_t z.
    With clipping: x0_hat = clip((x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), -1, 1), then the
    posterior mean sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_{t-1}) /
    (1 - abar_t) x_t + sigma_t z (the two forms are identical when nothing is clipped; the
    coefficients are ``schedule.posterior_mean_coef1/2``).
    sigma_t^2 = beta_t ("fixed_large") or max(posterior variance, 1e-20) ("fixed_small"); sigma_0 = 0.

    Args:
        schedule: the :class:`Schedule`.
        x_t: [B, H, W, C] current sample.
        eps_hat: [B, H, W, C] model output at (x_t, t).
        t: scalar int timestep (may be traced).
        z: [B, H, W, C] standard normal noise (ignored at t = 0).
        variance_type: "fixed_large" | "fixed_small" (static).
        clip_sample: clip x0_hat to [-1, 1] (static).

    Returns:
        x_{t-1}: [B, H, W, C].
    """
    beta = schedule.betas[t]
    sqrt_1m_abar = schedule.sqrt_one_minus_abar[t]
    if clip_sample:
        x0_hat = jnp.clip((x_t - sqrt_1m_abar * eps_hat) / schedule.sqrt_abar[t], -1.0, 1.0)
        mean = schedule.posterior_mean_coef1[t] * x0_hat + schedule.posterior_mean_coef2[t] * x_t
    else:
        mean = (x_t - (beta / sqrt_1m_abar) * eps_hat) / jnp.sqrt(schedule.alphas[t])
    if variance_type == "fixed_large":
        var = beta
    elif variance_type == "fixed_small":
        var = jnp.maximum(schedule.posterior_variance[t], _MIN_VARIANCE)
    else:
        raise ConfigError(f"unknown variance_type {variance_type!r}; use one of fixed_large, fixed_small")
    sigma = jnp.where(t > 0, jnp.sqrt(var), 0.0)
    return (mean + sigma * z).astype(x_t.dtype)


def ddpm_step(
    eps_fn: EpsFn,
    params,
    schedule: Schedule,
    x_t: jax.Array,
    t: jax.Array,
    key: jax.Array,
    *,
    variance_type: str = "fixed_large",
    clip_sample: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DDPM reverse step with the model; noise from ``fold_in(key, t)`` like :func:`ddpm_sample`.

    Pure and differentiable (not jitted itself). Unrolling ``ddpm_step`` for t = T-1, ..., T-K with the
    chain's ``key`` reproduces ``ddpm_sample(..., num_steps=K)``.

    Args:
        eps_fn: ``eps_fn(params, x_t [B,H,W,C], t [B] int32) -> eps_hat [B,H,W,C]``.
        params: the model's params pytree.
        schedule: the :class:`Schedule`.
        x_t: [B, H, W, C].
        t: scalar int timestep in [0, T) (may be traced).
        key: the chain's PRNG key (not pre-folded).
        variance_type, clip_sample: as in :func:`ddpm_update`.

    Returns:
        (x_{t-1} [B, H, W, C], eps_hat [B, H, W, C]).
    """
    t = jnp.asarray(t, dtype=jnp.int32)
    eps_hat = _eps(eps_fn, params, x_t, t)
    z = _noise(key, t, x_t)
    x_prev = ddpm_update(schedule, x_t, eps_hat, t, z, variance_type=variance_type, clip_sample=clip_sample)
    return x_prev, eps_hat


@functools.partial(
    jax.jit,
    static_argnames=("eps_fn", "variance_type", "clip_sample", "num_steps", "return_trajectory", "unroll"),
)
def _ddpm_sample_jit(eps_fn, params, schedule, x_T, key, *, variance_type, clip_sample, num_steps,
                     return_trajectory, unroll):
    T = schedule.num_timesteps
    ts = jnp.arange(T - 1, T - 1 - num_steps, -1, dtype=jnp.int32)

    def body(x, t):
        x_prev, eps_hat = ddpm_step(eps_fn, params, schedule, x, t, key,
                                    variance_type=variance_type, clip_sample=clip_sample)
        return x_prev, ((x, eps_hat) if return_trajectory else None)

    x, ys = jax.lax.scan(body, x_T, ts, unroll=unroll)
    if return_trajectory:
        return x, Trajectory(xs=ys[0], eps=ys[1], timesteps=ts)
    return x


def ddpm_sample(
    eps_fn: EpsFn,
    params,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    variance_type: str = "fixed_large",
    clip_sample: bool = False,
    num_steps: int | None = None,
    return_trajectory: bool = False,
    unroll: int | bool = 1,
    split_batch: bool = False,
):
    """DDPM ancestral sampling from an explicit start x_T, t = T-1 down to 0 (SPEC 1).

    One ``lax.scan`` in one ``jax.jit``; ``eps_fn`` and the keyword options are static. vmappable over
    (params, x_T, key) for a stack of models.

    Args:
        eps_fn: ``eps_fn(params, x_t [B,H,W,C], t [B] int32) -> eps_hat [B,H,W,C]`` (static).
        params: the model's params pytree (traced).
        schedule: the :class:`Schedule` (T = ``schedule.num_timesteps``).
        x_T: [B, H, W, C] float32 start (e.g. noise, or noise + trigger).
        key: PRNG key of the chain; step t uses ``fold_in(key, t)``.
        variance_type: "fixed_large" (sigma_t^2 = beta_t) or "fixed_small" (posterior variance).
        clip_sample: clip x0_hat to [-1, 1] at each step.
        num_steps: run only the first K reverse steps (t = T-1 .. T-K); None = all T.
        return_trajectory: also return a :class:`Trajectory` of the K visited (x_t, eps_hat, t).
        unroll: ``lax.scan`` unroll factor (same numbers; faster backward passes on CPU).
        split_batch: split the batch over the local devices (:func:`pdjax.sharding.batch_parallel`; the
            same samples to float rounding). Only for an ``eps_fn`` that treats samples independently
            (a model; not a function closing over batch-shaped arrays). Ignored with ``return_trajectory``
            (its timesteps have no batch axis).

    Returns:
        x: [B, H, W, C], x_0 after all T steps (or x_{T-1-K} after K steps);
        or (x, Trajectory) when ``return_trajectory``.
    """
    check_variance_type(variance_type)
    _check_x(x_T)
    T = schedule.num_timesteps
    K = T if num_steps is None else num_steps
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 1 <= K <= T:
        raise ConfigError(f"num_steps must be an int in [1, {T}] or None, got {num_steps!r}")
    return batch_parallel(_ddpm_sample_jit, params, schedule, x_T, key, lead=(eps_fn,),
                          batch_axes=(None, None, 0, None),
                          size=x_T.shape[0] if split_batch and not return_trajectory else 1,
                          variance_type=variance_type,
                          clip_sample=bool(clip_sample), num_steps=int(K),
                          return_trajectory=bool(return_trajectory), unroll=unroll)


# ------------------------------------------------------------------------------------------- DDIM
def timesteps_ddim(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """DDIM timesteps as diffusers' DDIMScheduler ("leading" spacing, steps_offset 0).

    Returns:
        [num_steps] int32, descending: arange(num_steps)[::-1] * (T // num_steps). The previous timestep
        of t is t - T // num_steps (negative = the end, where abar_prev = 1).
    """
    T = int(num_train_timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ConfigError(f"DDIM num_steps must be an int in [1, {T}], got {num_steps!r}")
    return (np.arange(num_steps, dtype=np.int64)[::-1] * (T // num_steps)).astype(np.int32)


def ddim_update(
    schedule: Schedule,
    x_t: jax.Array,
    eps_hat: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    z: jax.Array | None,
    eta: float | jax.Array = 0.0,
    *,
    clip_sample: bool = False,
) -> jax.Array:
    """One DDIM update x_t -> x_prev from a given eps_hat (SPEC 1).

    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) (clipped to [-1, 1] if ``clip_sample``);
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - c^2) eps_hat + c z,
    c = eta sqrt((1 - abar_t / abar_prev)(1 - abar_prev) / (1 - abar_t)); abar_prev = 1 for t_prev < 0.

    Args:
        schedule: the :class:`Schedule`.
        x_t, eps_hat: [B, H, W, C].
        t, t_prev: scalar int timesteps (may be traced); t_prev < 0 means the final step.
        z: [B, H, W, C] standard normal noise, or None when eta = 0.
        eta: >= 0; 0 is deterministic DDIM, 1 is DDPM-like.
        clip_sample: clip x0_hat to [-1, 1] (static). eps_hat itself is used unclipped, as diffusers
            does by default (use_clipped_model_output=False).

    Returns:
        x_prev: [B, H, W, C].
    """
    abar = schedule.alphas_cumprod[t]
    abar_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    x0_hat = (x_t - schedule.sqrt_one_minus_abar[t] * eps_hat) / schedule.sqrt_abar[t]
    if clip_sample:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    # 1 - abar/abar_prev written as (abar_prev - abar)/abar_prev: the float32 subtraction is exact.
    c = eta * jnp.sqrt((abar_prev - abar) / abar_prev * (1.0 - abar_prev) / (1.0 - abar))
    # Clamp: mathematically >= 0 for eta <= 1; rounding can make it -1e-9 at abar_prev = 1.
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - c * c, 0.0))
    x_prev = jnp.sqrt(abar_prev) * x0_hat + direction * eps_hat
    if z is not None:
        x_prev = x_prev + c * z
    return x_prev.astype(x_t.dtype)


def ddim_step(
    eps_fn: EpsFn,
    params,
    schedule: Schedule,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    key: jax.Array | None = None,
    eta: float | jax.Array = 0.0,
    *,
    clip_sample: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step with the model; noise (only if ``key`` is given) from ``fold_in(key, t)``.

    Args:
        eps_fn: ``eps_fn(params, x_t [B,H,W,C], t [B] int32) -> eps_hat [B,H,W,C]``.
        params: the model's params pytree.
        schedule: the :class:`Schedule`.
        x_t: [B, H, W, C].
        t, t_prev: scalar int timesteps (t_prev < 0 for the final step).
        key: the chain's PRNG key, or None for deterministic DDIM (eta = 0).
        eta: DDIM eta >= 0.
        clip_sample: clip x0_hat to [-1, 1] (static).

    Returns:
        (x_prev [B, H, W, C], eps_hat [B, H, W, C]).
    """
    t = jnp.asarray(t, dtype=jnp.int32)
    t_prev = jnp.asarray(t_prev, dtype=jnp.int32)
    eps_hat = _eps(eps_fn, params, x_t, t)
    z = None if key is None else _noise(key, t, x_t)
    return ddim_update(schedule, x_t, eps_hat, t, t_prev, z, eta, clip_sample=clip_sample), eps_hat


@functools.partial(
    jax.jit, static_argnames=("eps_fn", "num_steps", "stochastic", "clip_sample", "return_trajectory", "unroll")
)
def _ddim_sample_jit(eps_fn, params, schedule, x_T, key, eta, *, num_steps, stochastic, clip_sample,
                     return_trajectory, unroll):
    T = schedule.num_timesteps
    ts_np = timesteps_ddim(T, num_steps)
    ts = jnp.asarray(ts_np)
    ts_prev = jnp.asarray(ts_np - T // num_steps)

    def body(x, tt):
        t, t_prev = tt
        x_prev, eps_hat = ddim_step(eps_fn, params, schedule, x, t, t_prev, key if stochastic else None, eta,
                                    clip_sample=clip_sample)
        return x_prev, ((x, eps_hat) if return_trajectory else None)

    x, ys = jax.lax.scan(body, x_T, (ts, ts_prev), unroll=unroll)
    if return_trajectory:
        return x, Trajectory(xs=ys[0], eps=ys[1], timesteps=ts)
    return x


def ddim_sample(
    eps_fn: EpsFn,
    params,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int = 50,
    eta: float | jax.Array = 0.0,
    clip_sample: bool = False,
    return_trajectory: bool = False,
    unroll: int | bool = 1,
    split_batch: bool = False,
):
    """DDIM sampling from an explicit start x_T over diffusers' "leading" sub-sequence (SPEC 1).

    One ``lax.scan`` in one ``jax.jit``; vmappable over (params, x_T, key). ``eta`` is traced (no
    recompiles); a Python ``eta == 0`` skips the noise draws entirely.

    Args:
        eps_fn: ``eps_fn(params, x_t [B,H,W,C], t [B] int32) -> eps_hat [B,H,W,C]`` (static).
        params: the model's params pytree (traced).
        schedule: the :class:`Schedule`.
        x_T: [B, H, W, C] float32 start.
        key: PRNG key; step t uses ``fold_in(key, t)`` (unused when eta = 0).
        num_steps: number of DDIM steps, in [1, T]; timesteps are :func:`timesteps_ddim`.
        eta: >= 0 (0 = deterministic).
        clip_sample: clip x0_hat to [-1, 1].
        return_trajectory: also return a :class:`Trajectory` of the visited (x_t, eps_hat, t).
        unroll: ``lax.scan`` unroll factor.
        split_batch: split the batch over the local devices, as in :func:`ddpm_sample`.

    Returns:
        x_0: [B, H, W, C]; or (x_0, Trajectory) when ``return_trajectory``.
    """
    _check_x(x_T)
    T = schedule.num_timesteps
    timesteps_ddim(T, num_steps)  # validates num_steps
    if isinstance(eta, (int, float, np.number)):
        if not eta >= 0:
            raise ConfigError(f"DDIM eta must be >= 0, got {eta!r}")
        stochastic = float(eta) != 0.0
    else:
        stochastic = True
    return batch_parallel(_ddim_sample_jit, params, schedule, x_T, key, jnp.asarray(eta, jnp.float32),
                          lead=(eps_fn,), batch_axes=(None, None, 0, None, None),
                          size=x_T.shape[0] if split_batch and not return_trajectory else 1,
                          num_steps=int(num_steps), stochastic=stochastic, clip_sample=bool(clip_sample),
                          return_trajectory=bool(return_trajectory), unroll=unroll)

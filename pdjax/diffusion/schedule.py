"""Noise schedules (SPEC section 1): betas, alphas and abar as a pytree, and the forward process.

A :class:`ScheduleConfig` is the typed, frozen, hashable description of a schedule (what a diffusers
``scheduler_config.json`` says); :func:`make_schedule` turns it into a :class:`Schedule`, a pytree of
float32 arrays of length T that is passed to samplers as an ordinary (traced) jit argument.

Bit-exactness with diffusers (``DDPMScheduler`` / ``DDIMScheduler`` on CPU torch):

- ``linear`` / ``scaled_linear`` use ``torch.linspace(..., dtype=float32)``. numpy's float32 linspace
  differs from it in ~1/3 of the entries by one ulp, so :func:`_torch_linspace_f32` replicates torch's
  CPU kernel instead: ``step = (end - start) / (n - 1)`` in float32, then ``start + step * i`` for the
  first half and ``end - step * (n - 1 - i)`` for the second, each a fused multiply-add (one rounding).
- ``alphas_cumprod`` is ``torch.cumprod`` of float32 ``1 - betas``, which on CPU accumulates in float64
  and rounds each entry to float32; we do the same.
- ``squaredcos_cap_v2`` is diffusers' ``betas_for_alpha_bar`` (Python floats, ``max_beta=0.999``) cast
  to float32.
The derived arrays (``sqrt_abar``, ``posterior_variance``, posterior-mean coefficients) are computed
in float64 from those float32 arrays and rounded once. diffusers computes them in float32 at each step,
and ``current_beta_t = 1 - abar_t / abar_{t-1}`` cancels at small t: its step then deviates from the
exact value of its own formula by up to ~3e-5 (t < 50, |x| ~ 1); ours stays within ~1e-6.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pdjax.configs import from_dict_strict
from pdjax.errors import ConfigError

SCHEDULE_KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2")
VARIANCE_TYPES = ("fixed_large", "fixed_small")
PREDICTION_TYPES = ("epsilon",)

# diffusers' DDPMScheduler defaults, used for keys missing from a scheduler_config.json.
_DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
}


@flax.struct.dataclass
class Schedule:
    """A discrete noise schedule of T steps (0-based; t = T-1 is pure noise). All fields float32 [T].

    Attributes:
        betas: beta_t.
        alphas: alpha_t = 1 - beta_t.
        alphas_cumprod: abar_t = prod_{s<=t} alpha_s.
        alphas_cumprod_prev: abar_{t-1}, with abar_{-1} = 1.
        sqrt_abar: sqrt(abar_t).
        sqrt_one_minus_abar: sqrt(1 - abar_t).
        posterior_variance: beta_t (1 - abar_{t-1}) / (1 - abar_t) (0 at t = 0; samplers clamp it).
        posterior_mean_coef1: coefficient of x0 in the posterior mean of q(x_{t-1} | x_t, x0),
            sqrt(abar_{t-1}) beta'_t / (1 - abar_t).
        posterior_mean_coef2: coefficient of x_t in it, sqrt(alpha'_t) (1 - abar_{t-1}) / (1 - abar_t).
            Both use alpha'_t = abar_t / abar_{t-1}, beta'_t = 1 - alpha'_t (as diffusers' DDPMScheduler
            does), so they are consistent with the float32 abar the model was trained on: at t = 0,
            coef1 = 1 and coef2 = 0 exactly. beta'_t differs from beta_t by float32 rounding only
            (relative 1e-4 at small t, where 1 - abar_t cancels).
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_abar: jax.Array
    sqrt_one_minus_abar: jax.Array
    posterior_variance: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the static number of training timesteps."""
        return int(self.betas.shape[-1])

    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        """Builds a schedule from explicit betas.

        Args:
            betas: [T] array-like, each in (0, 1); rounded to float32 first.

        Returns:
            The :class:`Schedule`, with abar accumulated in float64 and rounded to float32 (as torch does).
        """
        b32 = np.asarray(betas, dtype=np.float32)
        if b32.ndim != 1 or b32.shape[0] < 1:
            raise ConfigError(f"betas must be a non-empty 1-D array, got shape {b32.shape}; pass [T] values")
        if not np.all(np.isfinite(b32)) or np.any(b32 <= 0) or np.any(b32 >= 1):
            raise ConfigError("betas must all lie in (0, 1); check beta_start / beta_end")
        a32 = np.float32(1.0) - b32
        abar32 = np.cumprod(a32.astype(np.float64)).astype(np.float32)
        # Derived quantities: float64 maths on the float32 base arrays, rounded once.
        b64, abar64 = b32.astype(np.float64), abar32.astype(np.float64)
        abar_prev64 = np.concatenate([[1.0], abar64[:-1]])
        post64 = b64 * (1.0 - abar_prev64) / (1.0 - abar64)
        # Posterior mean coefficients from abar alone (see the class docstring), in float64.
        coef1 = (abar_prev64 - abar64) / (np.sqrt(abar_prev64) * (1.0 - abar64))
        coef2 = np.sqrt(abar64 / abar_prev64) * (1.0 - abar_prev64) / (1.0 - abar64)
        f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float32))  # noqa: E731
        return cls(
            betas=f32(b32),
            alphas=f32(a32),
            alphas_cumprod=f32(abar32),
            alphas_cumprod_prev=f32(abar_prev64),
            sqrt_abar=f32(np.sqrt(abar64)),
            sqrt_one_minus_abar=f32(np.sqrt(1.0 - abar64)),
            posterior_variance=f32(post64),
            posterior_mean_coef1=f32(coef1),
            posterior_mean_coef2=f32(coef2),
        )


def check_t_min(schedule: Schedule, t_min: int) -> int:
    """``t_min`` if it leaves at least one timestep of ``schedule`` to train on; a ConfigError otherwise."""
    if not 0 <= t_min < schedule.num_timesteps:
        raise ConfigError(f"t_min must be in [0, {schedule.num_timesteps - 1}] for this {schedule.num_timesteps}-step "
                          f"schedule, got {t_min}")
    return int(t_min)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Typed description of a schedule and its sampler defaults (hashable: usable as a static arg).

    Attributes:
        kind: "linear" | "scaled_linear" | "squaredcos_cap_v2" (cosine; beta_start/end unused).
        num_train_timesteps: T.
        beta_start: beta_0 for the linear kinds.
        beta_end: beta_{T-1} for the linear kinds.
        variance_type: DDPM sampler variance, "fixed_large" (sigma^2 = beta_t) or "fixed_small"
            (posterior variance).
        clip_sample: whether the sampler clips x0_hat to [-1, 1] (attack papers sample without it).
        prediction_type: only "epsilon" is supported.
    """

    kind: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance_type: str = "fixed_large"
    clip_sample: bool = False
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"unknown schedule kind {self.kind!r}; use one of {', '.join(SCHEDULE_KINDS)}")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps must be a positive int, got {self.num_train_timesteps!r}")
        if self.kind != "squaredcos_cap_v2" and not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise ConfigError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        check_variance_type(self.variance_type)
        if not isinstance(self.clip_sample, bool):
            raise ConfigError(f"clip_sample must be a bool, got {self.clip_sample!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction_type {self.prediction_type!r} is not supported; pdjax models predict 'epsilon'"
            )

    # ----------------------------------------------------------------------------------- diffusers
    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "ScheduleConfig":
        """Reads a diffusers DDPMScheduler/DDIMScheduler ``scheduler_config.json`` dict.

        Missing keys take diffusers' DDPMScheduler defaults (note: ``variance_type="fixed_small"`` and
        ``clip_sample=True`` there). Options that change the maths and that pdjax does not implement
        (trained_betas, rescale_betas_zero_snr, thresholding, a clip range other than 1) raise
        :class:`ConfigError`. DDIM spacing keys (timestep_spacing, steps_offset) are sampler choices
        and are ignored: pdjax's DDIM uses "leading" spacing with offset 0.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"scheduler config must be a dict, got {type(config).__name__}")

        def get(key):
            value = config.get(key)
            return _DIFFUSERS_DEFAULTS[key] if value is None else value

        if config.get("trained_betas") is not None:
            raise ConfigError(
                "scheduler config sets trained_betas, which ScheduleConfig does not support; use Schedule.from_betas"
            )
        if config.get("rescale_betas_zero_snr"):
            raise ConfigError("scheduler config sets rescale_betas_zero_snr, which pdjax does not support")
        if config.get("thresholding"):
            raise ConfigError("scheduler config sets thresholding, which pdjax does not support; set it false")
        if get("clip_sample") and float(config.get("clip_sample_range", 1.0)) != 1.0:
            raise ConfigError("scheduler config clips to a range other than [-1, 1]; set clip_sample_range to 1.0")
        kind = get("beta_schedule")
        if kind not in SCHEDULE_KINDS:
            raise ConfigError(
                f"unsupported beta_schedule {kind!r} in scheduler config; use one of {', '.join(SCHEDULE_KINDS)}"
            )
        vt = get("variance_type")
        if vt not in VARIANCE_TYPES:
            raise ConfigError(
                f"unsupported variance_type {vt!r} in scheduler config; use one of {', '.join(VARIANCE_TYPES)}"
            )
        return cls(
            kind=kind,
            num_train_timesteps=int(get("num_train_timesteps")),
            beta_start=float(get("beta_start")),
            beta_end=float(get("beta_end")),
            variance_type=vt,
            clip_sample=bool(get("clip_sample")),
            prediction_type=get("prediction_type"),
        )

    def to_diffusers(self) -> dict:
        """A ``DDPMScheduler`` config dict (``DDPMScheduler.from_config`` accepts it) for this schedule."""
        return {
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.kind,
            "trained_betas": None,
            "variance_type": self.variance_type,
            "clip_sample": self.clip_sample,
            "clip_sample_range": 1.0,
            "prediction_type": self.prediction_type,
            "thresholding": False,
            "timestep_spacing": "leading",
            "steps_offset": 0,
            "rescale_betas_zero_snr": False,
        }

    # ---------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScheduleConfig":
        """Inverse of :meth:`to_dict`; missing keys take the defaults, unknown keys raise ConfigError."""
        return from_dict_strict(cls, d, "ScheduleConfig")


def check_variance_type(variance_type: str) -> None:
    """Raises ConfigError unless ``variance_type`` is one of :data:`VARIANCE_TYPES`."""
    if variance_type not in VARIANCE_TYPES:
        raise ConfigError(f"unknown variance_type {variance_type!r}; use one of {', '.join(VARIANCE_TYPES)}")


# ------------------------------------------------------------------------------------------ betas
def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """Bit-exact replica of CPU ``torch.linspace(start, end, n, dtype=torch.float32)``."""
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], dtype=np.float32)
    step = np.float32((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    # step (24-bit) * i (< 2^29) is exact in float64, and so is the sum for schedule-sized values;
    # the final cast is then the single rounding of torch's fused multiply-add.
    lo = np.float64(s) + np.float64(step) * i
    hi = np.float64(e) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar`` with the cosine (Glide, "squaredcos_cap_v2") alpha_bar."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def make_betas(config: ScheduleConfig) -> np.ndarray:
    """The float32 [T] betas of ``config``, equal to diffusers' DDPMScheduler.betas."""
    n = config.num_train_timesteps
    if config.kind == "linear":
        return _torch_linspace_f32(config.beta_start, config.beta_end, n)
    if config.kind == "scaled_linear":
        r = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return r * r
    if config.kind == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(n)
    raise ConfigError(f"unknown schedule kind {config.kind!r}; use one of {', '.join(SCHEDULE_KINDS)}")


def make_schedule(config: ScheduleConfig = ScheduleConfig()) -> Schedule:
    """Builds the :class:`Schedule` (float32 arrays [T]) described by ``config``."""
    return Schedule.from_betas(make_betas(config))


# -------------------------------------------------------------------------------- forward process
def _bcast(coef: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] with ``like.ndim`` dims."""
    return jnp.reshape(coef, coef.shape + (1,) * (like.ndim - coef.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Forward diffusion (SPEC 1): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    Args:
        schedule: the :class:`Schedule`.
        x0: [B, H, W, C] clean images in [-1, 1].
        t: [B] int timesteps in [0, T).
        noise: [B, H, W, C] standard normal noise.

    Returns:
        x_t: [B, H, W, C], same dtype as x0.
    """
    t = jnp.asarray(t, dtype=jnp.int32)
    a = _bcast(schedule.sqrt_abar[t], x0)
    s = _bcast(schedule.sqrt_one_minus_abar[t], x0)
    return (a * x0 + s * noise).astype(x0.dtype)

"""How good is an inverted trigger? (issue 4 evaluation, SPEC 5 and 7)

- Trigger fidelity: L2 to the true trigger, inside its mask and overall (:func:`pdjax.metrics.trigger_l2`).
- What it does to the model: generations from eps + delta with the model's own DDPM sampler; their ASR
  against a known target, their uniformity (low = collapsed onto one image) and total variation.

Several candidate triggers of one model are evaluated in ONE sampling call (batch M * n) with the same
start noise and chain noise for every candidate, so the comparison between triggers is paired and the
cost of 1000 DDPM steps is paid once per model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.diffusion.samplers import DDIM_STEPS, SAMPLERS, ddim_sample, ddpm_sample
from pdjax.errors import ConfigError, UnknownNameError
from pdjax.sharding import batch_parallel
from pdjax.metrics import asr, mse_to_target, total_variation, trigger_l2, uniformity



@dataclasses.dataclass(frozen=True)
class Start:
    """How a generation starts and runs: x_T = noise_scale * eps + delta, then ``sampler``.

    The default (DDPM over all T steps from eps + delta) is how BadDiffusion and VillanDiffusion SDE
    backdoors are sampled. VillanDiffusion ODE backdoors are trained for DDIM, and TrojDiff ones for a
    shrunken noise gamma * eps + mu; a defender knows neither, so the scan's search tries several starts
    (:func:`pdjax.defense.inversion.size_search`).

    Attributes:
      sampler: "ddpm" (ancestral, all T steps) or "ddim" (deterministic, eta 0, ``ddim_steps`` steps).
      noise_scale: c in x_T = c * eps + delta, in (0, 1].
      ddim_steps: DDIM steps (diffusers' "leading" spacing; at most the schedule's T).
    """

    sampler: str = "ddpm"
    noise_scale: float = 1.0
    ddim_steps: int = DDIM_STEPS

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise UnknownNameError("sampler", self.sampler, SAMPLERS)
        if not 0.0 < self.noise_scale <= 1.0:
            raise ConfigError(f"start noise scale must be in (0, 1], got {self.noise_scale}; "
                              "write SAMPLER@SCALE with 0 < SCALE <= 1, e.g. ddim@0.6")
        if self.ddim_steps < 1:
            raise ConfigError(f"ddim_steps must be >= 1, got {self.ddim_steps}")

    @property
    def label(self) -> str:
        """Text form, read back by :meth:`parse`: "ddpm", "ddim", "ddim@0.6", "ddim50@0.3"."""
        name = self.sampler if self.sampler == "ddpm" or self.ddim_steps == DDIM_STEPS else f"ddim{self.ddim_steps}"
        return name if self.noise_scale == 1.0 else f"{name}@{self.noise_scale:g}"

    @classmethod
    def parse(cls, text: str) -> "Start":
        """A start from its label: SAMPLER[STEPS][@NOISE_SCALE], e.g. "ddpm", "ddim@0.6", "ddim50"."""
        name, _, scale = str(text).strip().partition("@")
        steps = DDIM_STEPS
        if name.startswith("ddim") and name[4:].isdigit():
            name, steps = "ddim", int(name[4:])
        try:
            c = float(scale) if scale else 1.0
        except ValueError:
            raise ConfigError(f"start {text!r}: noise scale {scale!r} is not a number "
                              "(write SAMPLER[@SCALE], e.g. ddim@0.6)") from None
        return cls(name, c, steps)


DEFAULT_START = Start()


def triggered_generations(model, triggers, key: jax.Array, n: int = 32, batch_limit: int = 512,
                          start: Start = DEFAULT_START) -> np.ndarray:
    """Generations from noise_scale * eps_i + delta_m for every candidate m, same eps_i and chain noise for all.

    Args:
      model: a :class:`pdjax.model.Model`.
      triggers: [M, H, W, C] candidate triggers (use zeros for clean generations).
      key: PRNG key; start noise from ``fold_in(key, 0)``, chain noise from ``fold_in(key, 1)``.
      n: generations per trigger.
      batch_limit: largest sampling batch; candidates are split into groups of at most this many rows.
      start: the :class:`Start` (default: DDPM from eps + delta).

    Returns:
      [M, n, H, W, C] float32 generations (unclipped).
    """
    triggers = np.asarray(triggers, np.float32)
    if triggers.ndim != 4 or triggers.shape[1:] != tuple(model.image_shape):
        raise ConfigError(f"triggers must be [M, {', '.join(map(str, model.image_shape))}], got {triggers.shape}")
    sc = model.schedule_config
    per = max(1, batch_limit // n)
    out = []
    for lo in range(0, len(triggers), per):
        x_T = _start(jnp.asarray(triggers[lo:lo + per]), key, n, start.noise_scale)
        out.append(np.asarray(batch_parallel(_chains_jit, model.params, model.schedule, x_T, key,
                                             batch_axes=(None, None, 1, None), out_axis=1, size=n, lead=(model.eps,),
                                             variance_type=sc.variance_type, clip_sample=bool(sc.clip_sample),
                                             start=start)))
    return np.concatenate(out)


def _start(triggers, key, n, noise_scale: float = 1.0):
    """[T, n, H, W, C] start points noise_scale * noise + triggers[j], the noise ``normal(fold_in(key, 0))``
    shared by all."""
    noise = jax.random.normal(jax.random.fold_in(key, 0), (n, *triggers.shape[1:]))
    return noise_scale * noise[None] + triggers[:, None]


def _chains(eps_fn, schedule, variance_type, clip_sample, params, x_T, key, start: Start = DEFAULT_START):
    """[T, n, H, W, C]: chains of ``start.sampler`` from x_T [T, n, H, W, C], the chain key ``fold_in(key, 1)``
    shared by every trigger (so no result depends on the grouping; DDIM draws no noise)."""
    chain_key = jax.random.fold_in(key, 1)
    if start.sampler == "ddim":
        steps = min(start.ddim_steps, schedule.num_timesteps)  # a short schedule (tests): every step
        return jax.vmap(lambda xt: ddim_sample(eps_fn, params, schedule, xt, chain_key, num_steps=steps,
                                               clip_sample=clip_sample))(x_T)
    return jax.vmap(lambda xt: ddpm_sample(eps_fn, params, schedule, xt, chain_key, variance_type=variance_type,
                                           clip_sample=clip_sample))(x_T)


def _chains_jit(eps_fn, params, schedule, x_T, key, *, variance_type, clip_sample, start=DEFAULT_START):
    """:func:`_chains` with the argument order :func:`pdjax.sharding.batch_parallel` wants."""
    return _chains(eps_fn, schedule, variance_type, clip_sample, params, x_T, key, start)


def _generations(eps_fn, schedule, variance_type, clip_sample, params, triggers, key, n, start=DEFAULT_START):
    """[T, n, H, W, C]: :func:`_chains` from :func:`_start` (traceable: the stacked audit vmaps it)."""
    return _chains(eps_fn, schedule, variance_type, clip_sample, params,
                   _start(triggers, key, n, start.noise_scale), key, start)


_STACKED: dict = {}


def stacked_generations(model, params, triggers, keys, n: int = 32, mesh=None,
                        start: Start = DEFAULT_START) -> np.ndarray:
    """:func:`triggered_generations` for a stack of same-architecture models in one program.

    Args:
      model: any model of the architecture (its eps function and schedule are used, not its params).
      params: params stacked on a leading model axis [M, ...].
      triggers: [M, T, H, W, C] candidate triggers per model.
      keys: [M] typed keys; model i's result equals ``triggered_generations(model_i, triggers[i], keys[i], n)``.
      mesh: optional mesh with axis "models": the model axis is split across its devices (``shard_map``).
      start: the :class:`Start`, as in :func:`triggered_generations`.

    Returns:
      [M, T, n, H, W, C] generations.
    """
    sc = model.schedule_config
    ck = (model.eps, sc, n, mesh, start)
    if ck not in _STACKED:
        schedule = model.schedule
        fn = jax.vmap(lambda p, g, k: _generations(model.eps, schedule, sc.variance_type, bool(sc.clip_sample),
                                                   p, g, k, n, start))
        if mesh is not None:
            from jax.sharding import PartitionSpec as P

            fn = jax.shard_map(fn, mesh=mesh, in_specs=P("models"), out_specs=P("models"))
        _STACKED[ck] = jax.jit(fn)
    from pdjax.defense.inversion import shard_models

    args = shard_models((params, jnp.asarray(triggers, jnp.float32), keys), mesh)
    return np.asarray(_STACKED[ck](*args))


def generation_stats(x, target=None) -> dict:
    """Uniformity, mean TV and (with a target [H, W, C]) ASR and MSE of generations x [n, H, W, C]."""
    x = jnp.asarray(x)
    out = {"uniformity": float(uniformity(x)), "tv": float(jnp.mean(total_variation(x))), "n": int(x.shape[0])}
    if target is not None:
        y = jnp.broadcast_to(jnp.asarray(target, jnp.float32), x.shape)
        out["asr"] = float(asr(x, y))
        out["mse"] = float(jnp.mean(mse_to_target(x, y)))
    return out


def fidelity(delta, true_trigger, mask=None) -> dict:
    """L2 of the inverted trigger to the true one: {"l2_in_mask", "l2_overall"} floats."""
    return {k: float(v) for k, v in trigger_l2(delta, true_trigger, mask).items()}

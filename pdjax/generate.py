"""Generate images from a model, optionally with a trigger added to the start noise (SPEC 1, 2.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.diffusion.samplers import SAMPLERS, ddim_sample, ddpm_sample
from pdjax.errors import ConfigError, UnknownNameError
from pdjax.model import Model



def start_noise(key: jax.Array, n: int, shape: tuple[int, int, int], trigger=None) -> jax.Array:
    """x_T = eps (+ trigger g, background -1 included, as BadDiffusion samples). Returns [n, H, W, C]."""
    x = jax.random.normal(key, (n, *shape))
    if trigger is not None:
        trigger = jnp.asarray(trigger, jnp.float32)
        if trigger.shape != tuple(shape):
            raise ConfigError(f"trigger has shape {tuple(trigger.shape)}, the model needs {tuple(shape)}")
        x = x + trigger
    return x


def generate(model: Model, key: jax.Array, n: int, trigger=None, sampler: str = "ddpm", num_steps: int | None = None,
             eta: float = 0.0, batch_size: int = 256) -> np.ndarray:
    """Sample ``n`` images [n, H, W, C] in about [-1, 1] (float32, unclipped).

    Args:
      key: PRNG key; start noise and sampler noise derive from it, per batch by ``fold_in``.
      trigger: optional [H, W, C] tensor added to the start noise.
      sampler: "ddpm" (the schedule's variance type and clipping) or "ddim" (``num_steps``, ``eta``).
      num_steps: DDIM steps (default 100); ignored for DDPM.
    """
    if sampler not in SAMPLERS:
        raise UnknownNameError("sampler", sampler, SAMPLERS)
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    sc = model.schedule_config
    schedule = model.schedule
    out = []
    for b, lo in enumerate(range(0, n, batch_size)):
        kb = jax.random.fold_in(key, b)
        x_T = start_noise(jax.random.fold_in(kb, 0), min(batch_size, n - lo), model.image_shape, trigger)
        if sampler == "ddpm":
            x = ddpm_sample(model.eps, model.params, schedule, x_T, jax.random.fold_in(kb, 1),
                            variance_type=sc.variance_type, clip_sample=sc.clip_sample, split_batch=True)
        else:
            x = ddim_sample(model.eps, model.params, schedule, x_T, jax.random.fold_in(kb, 1),
                            num_steps=num_steps or 100, eta=eta, clip_sample=sc.clip_sample, split_batch=True)
        out.append(np.asarray(x))
    return np.concatenate(out)

"""Deterministic synthetic weights for tests, reference fixtures and benchmarks (no torch needed).

:func:`random_state_dict` builds a diffusers ``UNet2DModel`` state dict (PyTorch layout, current
attention key names) for any :class:`~pdjax.models.config.UNetConfig`, from a seed alone. The reference
fixtures in ``tests/fixtures/unet_*.npz`` store only the seed, inputs and diffusers' output; the weights
are regenerated here, so this rule must not change without regenerating the fixtures
(``python experiments/make_reference_fixtures.py``).
"""

from __future__ import annotations

import math

import numpy as np

from pdjax.models.config import UNetConfig
from pdjax.models.convert import torch_key


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """Flax leaf shape -> PyTorch shape (conv HWIO -> OIHW, dense [in, out] -> [out, in])."""
    if leaf == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def state_dict_spec(cfg: UNetConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """diffusers key -> (PyTorch shape, Flax leaf name: "kernel" | "bias" | "scale"), sorted by key."""
    import jax

    from pdjax.models.unet import param_shapes

    spec = {}
    for kpath, s in jax.tree_util.tree_leaves_with_path(param_shapes(cfg)):
        path = tuple(k.key for k in kpath)
        spec[torch_key(path)] = (_torch_shape(tuple(s.shape), path[-1]), path[-1])
    return dict(sorted(spec.items()))


def random_state_dict(cfg: UNetConfig, seed: int) -> dict[str, np.ndarray]:
    """Deterministic random weights for ``cfg`` as a diffusers state dict (float32 numpy, PyTorch layout).

    The rule (fixed: reference fixtures depend on it). Keys are the diffusers ``UNet2DModel`` names
    (``to_q/to_k/to_v/to_out.0`` attention style), sorted; the i-th key draws from
    ``numpy.random.default_rng([seed, i])`` with ``standard_normal(shape, dtype=float32)`` = z, then

    - conv / linear weights (``kernel`` leaves): ``z / sqrt(fan_in)``, fan_in = prod(shape[1:]) in
      PyTorch layout (in_channels * kh * kw for a conv, in_features for a linear);
    - GroupNorm weights (``scale`` leaves): ``1 + 0.1 z``;
    - biases (conv, linear and GroupNorm): ``0.1 z``.

    Non-trivial norms and biases make layout or naming mistakes show up in outputs. Activations stay
    O(1) through the network, so the outputs are a meaningful numerical comparison.

    Args:
      cfg: the UNet architecture.
      seed: non-negative int.

    Returns:
      ``{key: np.ndarray float32}``, loadable with ``UNet2DModel.load_state_dict(..., strict=True)``
      (after ``torch.from_numpy``) or :func:`pdjax.models.convert.state_dict_to_params`.
    """
    out = {}
    for i, (key, (shape, leaf)) in enumerate(state_dict_spec(cfg).items()):
        z = np.random.default_rng([int(seed), i]).standard_normal(shape, dtype=np.float32)
        if leaf == "kernel":
            z *= np.float32(1.0 / math.sqrt(math.prod(shape[1:])))
        elif leaf == "scale":
            z = np.float32(1.0) + np.float32(0.1) * z
        else:
            z *= np.float32(0.1)
        out[key] = z
    return out


def random_params(cfg: UNetConfig, seed: int) -> dict:
    """The params pytree of :func:`random_state_dict` (``state_dict_to_params`` of it)."""
    from pdjax.models.convert import state_dict_to_params

    return state_dict_to_params(random_state_dict(cfg, seed), cfg, source=f"random_state_dict(seed={seed})")


def random_model(preset: str = "tiny", seed: int = 0, meta: dict | None = None, timesteps: int = 1000):
    """A :class:`pdjax.model.Model` of ``PRESETS[preset]`` with :func:`random_params` (diffusers-like init).

    For tests that need a model but not a trained one: it skips the UNet init compile (tens of seconds on
    a 2-core CPU). ``timesteps`` < 1000 gives a shorter linear schedule, so full sampling chains are cheap.
    """
    from pdjax.diffusion.schedule import ScheduleConfig
    from pdjax.model import Model
    from pdjax.models.config import PRESETS

    cfg = PRESETS[preset]
    return Model(cfg, random_params(cfg, seed), ScheduleConfig(num_train_timesteps=timesteps), meta=dict(meta or {}))

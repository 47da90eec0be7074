"""The model object users load: config + params + schedule + the pure eps function.

``pdjax.load(path)`` accepts a pdjax checkpoint folder or a local diffusers ``UNet2DModel`` folder (or a
pipeline folder with ``unet/``). The returned :class:`Model` is a frozen container; all computation goes
through the pure ``model.eps(params, x_t, t)`` so params stay jit arguments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pdjax import checkpoint
from pdjax.diffusion.schedule import Schedule, ScheduleConfig, make_schedule
from pdjax.errors import CheckpointError, ConfigError
from pdjax.models.config import UNetConfig
from pdjax.models.convert import find_model_dir, load_diffusers, save_diffusers
from pdjax.models.unet import EpsFn, count_params, init_params, make_eps_fn, param_shapes


@dataclasses.dataclass(frozen=True)
class Model:
    """A DDPM eps-model.

    Attributes:
      config: UNet architecture.
      params: params pytree (numpy or jax arrays).
      schedule_config: noise schedule and default sampler settings.
      meta: provenance (data, steps, seed, attack/trigger/target when known, source path).
    """

    config: UNetConfig
    params: Any
    schedule_config: ScheduleConfig = ScheduleConfig()
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def eps(self) -> EpsFn:
        """Pure ``eps(params, x_t, t)``: x_t [B, H, W, C] in [-1, 1], t [B] int -> eps_hat [B, H, W, C]."""
        return make_eps_fn(self.config)

    @property
    def schedule(self) -> Schedule:
        return make_schedule(self.schedule_config)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.sample_size, c.sample_size, c.in_channels)

    @property
    def num_params(self) -> int:
        return count_params(self.params)

    def replace(self, **changes) -> "Model":
        return dataclasses.replace(self, **changes)

    def metadata(self) -> dict:
        """Full JSON metadata: model config, schedule and provenance."""
        return {"model": self.config.to_dict(), "schedule": self.schedule_config.to_dict(), "provenance": self.meta}

    def save(self, path: str | Path, state=None, keep: int = 1, dtype: str | None = None) -> Path:
        """Save as a pdjax checkpoint (atomic; see :mod:`pdjax.checkpoint`).

        ``dtype="float16"`` stores the params at half size (bundled demo models); loading casts to float32.
        """
        params = self.params
        if dtype is not None:
            params = jax.tree_util.tree_map(lambda p: np.asarray(p).astype(dtype), params)
        return checkpoint.save(path, params, self.metadata(), state=state, keep=keep)

    def export_diffusers(self, path: str | Path) -> Path:
        """Write a diffusers folder (config.json, safetensors, scheduler_config.json)."""
        return save_diffusers(path, self.config, self.params, self.schedule_config.to_diffusers())


def new_model(config: UNetConfig, key: jax.Array, schedule_config: ScheduleConfig = ScheduleConfig(),
              meta: dict | None = None) -> Model:
    """A freshly initialised model."""
    return Model(config, init_params(config, key), schedule_config, dict(meta or {}))


def check_finite(params, source: str) -> None:
    """CheckpointError naming the first parameter that holds NaN or Inf."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise CheckpointError(f"{source}: parameter {jax.tree_util.keystr(path)} contains NaN or Inf; "
                                  "the checkpoint is corrupt or training diverged; use an earlier checkpoint")


def load(path: str | Path, sharding=None) -> Model:
    """Load a pdjax checkpoint or a local diffusers UNet2DModel folder.

    Args:
      path: checkpoint folder, diffusers model folder, or diffusers pipeline folder (with unet/).
      sharding: optional ``jax.sharding.Sharding`` to place every parameter on (pdjax checkpoints).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a pdjax checkpoint folder or a diffusers model folder")
    if checkpoint.is_checkpoint(path):
        meta = checkpoint.read_meta(path)
        try:
            config = UNetConfig.from_dict(meta["model"])
            sched = ScheduleConfig.from_dict(meta.get("schedule", {}))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: metadata lacks a valid model config ({e})") from None
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
        shapes = param_shapes(config)
        target = None
        if sharding is not None:
            target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
        params, _ = checkpoint.restore(path, target=target)
        checkpoint.check_tree_shapes(params, shapes, str(path))
        params = jax.tree_util.tree_map(lambda p: p.astype(np.float32) if p.dtype != np.float32 else p, params)
        check_finite(params, str(path))
        return Model(config, params, sched, dict(meta.get("provenance", {})))
    model_dir = find_model_dir(path)
    config, params, sched_cfg = load_diffusers(model_dir)
    check_finite(params, str(model_dir))
    sched = ScheduleConfig.from_diffusers(sched_cfg) if sched_cfg is not None else ScheduleConfig()
    if sharding is not None:
        params = jax.device_put(params, sharding)
    return Model(config, params, sched, {"source": str(model_dir.absolute()), "format": "diffusers"})

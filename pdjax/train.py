"""Clean DDPM training with optax, and the generic resumable training loop the attacks reuse.

The loop is a jitted multi-step program (``steps_per_call`` optimiser steps per call, laid out by
:mod:`pdjax.loops`) driven from Python for progress bars and checkpoints. Step ``i`` draws its batch,
timesteps and noise from ``fold_in(key, i)``, so an interrupted run resumed from its last checkpoint
reaches bitwise the same params as an uninterrupted one (same device, same ``steps_per_call``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pdjax import checkpoint, loops
from pdjax.diffusion.schedule import Schedule, check_t_min, q_sample
from pdjax.errors import CheckpointError, ConfigError
from pdjax.model import Model
from pdjax.paths import check_out_dir
from pdjax.sharding import batch_mean, batch_mesh, batch_slice, pinned

# loss_fn(params, key, data) -> scalar loss; data is the whole device-resident dataset [N, H, W, C].
LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop settings (defaults: the BadDiffusion reference optimiser, shortened)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    steps_per_call: int = 0      # 0: loops.default_steps_per_call() (1 on CPU, 10 on GPU/TPU)
    checkpoint_every: int = 500
    t_min: int = 0               # timesteps drawn from U{t_min..T-1}: > 0 fine-tunes only the noisiest steps

    def __post_init__(self):
        if self.steps_per_call == 0:
            object.__setattr__(self, "steps_per_call", loops.default_steps_per_call())
        for name in ("steps", "batch_size", "steps_per_call", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.t_min < 0:
            raise ConfigError(f"t_min must be >= 0, got {self.t_min}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # [] int32, optimiser steps done
    params: Any
    ema_params: Any
    opt_state: Any
    key: jax.Array           # [2] uint32 raw key data: base key of the run


@dataclasses.dataclass
class TrainResult:
    """What a training run returns: the trained model (EMA params) and its loss curve."""

    model: Model
    losses: np.ndarray       # [steps_run] mean loss per optimiser step
    steps: int               # total optimiser steps in the final state
    seconds: float
    resumed_from: int = 0


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Adam with linear warm-up then cosine decay, after global-norm gradient clipping."""
    warmup = max(cfg.warmup_steps, 1)  # optax needs warm-up >= 1 and a decay phase >= 1 step (--steps 1 --warmup 0)
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(lr))


def ddpm_loss(eps_fn, schedule: Schedule, batch_size: int, t_min: int = 0) -> LossFn:
    """Clean DDPM objective: E ||eps - eps_hat(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2 (SPEC 1),
    t ~ U{t_min..T-1}."""
    t_min = check_t_min(schedule, t_min)

    def loss(params, key, data):
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])]
        t = jax.random.randint(k_t, (batch_size,), t_min, schedule.num_timesteps)
        noise = jax.random.normal(k_eps, x0.shape)
        x_t, t, noise = batch_slice((q_sample(schedule, x0, t, noise), t, noise))  # this device's rows
        return batch_mean((eps_fn(params, x_t, t) - noise) ** 2, all_axes=True)

    return loss


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state owning its buffers: params and EMA are copies (the step programs donate the state,
    so it must not share buffers with the caller's model or with itself)."""
    params = jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params)
    ema = jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                      opt_state=optimizer.init(params), key=jax.random.key_data(jax.random.key(seed)))


def make_multi_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, ema_decay: float, n: int,
                    strategy: str | None = None, batch_size: int | None = None):
    """A jitted ``(state, data) -> (state, losses[n])`` doing n optimiser steps (params are arguments);
    ``state`` is donated (invalid after the call).

    ``batch_size``: the loss's batch; with several devices (one per CPU core, GPUs) the steps run
    data-parallel under ``shard_map`` (:func:`pdjax.sharding.batch_mesh`): state and data replicated, each
    device computing the loss of its slice of the batch (:func:`ddpm_loss` and the attack losses slice
    with ``batch_slice`` and average with ``batch_mean``), so the run follows the one-device run to float
    rounding. A loss that does not slice stays correct there, only computed whole on every device.
    """
    strategy = strategy or loops.default_strategy()
    mesh = batch_mesh(batch_size) if batch_size else None

    def one(state: TrainState, data, i):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), i)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, key, data)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.minimum(ema_decay, (1.0 + i) / (10.0 + i))  # EMA warm-up as diffusers' EMAModel
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
        return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), loss

    def multi(state: TrainState, data):
        return loops.repeat(lambda s, i: one(s, data, i), state, n, start=state.step, strategy=strategy)

    # The state is donated: its params, EMA and optimiser buffers are reused for the new state, so a
    # step holds one copy of them, not two (callers must not reuse a state passed in).
    if mesh is None:
        return jax.jit(multi, donate_argnums=0)
    from jax.sharding import PartitionSpec as P

    return pinned(jax.jit(jax.shard_map(multi, mesh=mesh, in_specs=(P(), P()), out_specs=P()), donate_argnums=0),
                  mesh, (P(), P()))


def _state_to_numpy(state: TrainState) -> dict:
    return jax.tree_util.tree_map(np.asarray, flax.serialization.to_state_dict(state))


def fit(model: Model, loss_fn: LossFn, data, cfg: TrainConfig, out: str | Path | None = None,
        meta: dict | None = None, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train ``model.params`` on ``loss_fn``; checkpoint to ``out`` and resume from it if present.

    Args:
      model: starting model (its params are the initial params unless ``out`` holds a resumable state).
      loss_fn: ``loss(params, key, data) -> scalar``.
      data: dataset [N, H, W, C] in [-1, 1], kept on the device.
      cfg: optimiser/loop settings; ``cfg.steps`` is the total number of optimiser steps.
      out: checkpoint folder (written every ``checkpoint_every`` steps and at the end); resumed if it holds
        a training state of the same run.
      meta: provenance merged into the saved model's metadata.
      stop_after: stop after this many steps in this call (to simulate an interruption in tests).
    Returns a TrainResult whose model carries the EMA params.
    """
    # Every check comes before anything compiles: an unwritable --out or a run of other settings in it
    # fails in seconds, not after training (or after the optimiser-state init's small compiles).
    saved = None
    if out is not None:
        check_out_dir(out)
    if out is not None and checkpoint.is_checkpoint(out):
        _, saved_meta, saved = checkpoint.restore(out, with_state=True)
        if saved is not None:
            run = saved_meta.get("provenance", {}).get("train")
            if run != dataclasses.asdict(cfg):
                raise CheckpointError(f"{out} holds a run with other settings; use a new --out folder or the same settings")
            if (saved_meta.get("model"), saved_meta.get("schedule")) != (model.config.to_dict(),
                                                                        model.schedule_config.to_dict()):
                raise CheckpointError(f"{out} holds a run of another model architecture or schedule; "
                                      "use a new --out folder")
    optimizer = make_optimizer(cfg)
    state = init_state(model.params, optimizer, cfg.seed)
    resumed = 0
    if saved is not None:
        state = jax.tree_util.tree_map(jnp.asarray, flax.serialization.from_state_dict(state, saved))
        resumed = int(state.step)
    chunk = cfg.steps_per_call
    every = max(chunk, cfg.checkpoint_every // chunk * chunk)
    data = jnp.asarray(data)
    multi = make_multi_step(loss_fn, optimizer, cfg.ema_decay, chunk, batch_size=cfg.batch_size)
    tail = (make_multi_step(loss_fn, optimizer, cfg.ema_decay, cfg.steps % chunk, batch_size=cfg.batch_size)
            if cfg.steps % chunk else None)
    provenance = {**model.meta, **(meta or {}), "train": dataclasses.asdict(cfg)}

    def save(st: TrainState):
        if out is None:
            return
        done = model.replace(params=st.ema_params, meta={**provenance, "steps": int(st.step)})
        done.save(out, state=_state_to_numpy(st))

    losses, t0 = [], time.perf_counter()
    bar = _progress(cfg.steps, resumed, progress)
    step = resumed
    limit = cfg.steps if stop_after is None else min(cfg.steps, resumed + stop_after)
    while step < limit:
        fn = multi if step + chunk <= cfg.steps else tail
        state, chunk_losses = fn(state, data)
        chunk_losses = np.asarray(chunk_losses)
        losses.append(chunk_losses)
        step = int(state.step)
        bar.update(len(chunk_losses))
        bar.set_postfix(loss=f"{chunk_losses.mean():.4f}")
        if step % every == 0 or step == cfg.steps:
            save(state)
    bar.close()
    trained = model.replace(params=state.ema_params, meta={**provenance, "steps": step})
    return TrainResult(trained, np.concatenate(losses) if losses else np.zeros(0), step,
                       time.perf_counter() - t0, resumed)


def train(model: Model, data, cfg: TrainConfig | None = None, out: str | Path | None = None,
          meta: dict | None = None, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Clean DDPM training of ``model`` on ``data`` [N, H, W, C] in [-1, 1] (see :func:`fit`)."""
    cfg = cfg or TrainConfig()
    _check_data(model, data)
    loss = ddpm_loss(model.eps, model.schedule, cfg.batch_size, cfg.t_min)
    return fit(model, loss, data, cfg, out=out, meta=meta, progress=progress, stop_after=stop_after)


def _check_data(model: Model, data) -> None:
    want = model.image_shape
    if data.ndim != 4 or tuple(data.shape[1:]) != want:
        raise ConfigError(f"data has shape {tuple(data.shape)}, the model needs [N, {want[0]}, {want[1]}, {want[2]}]; "
                          "set --size/--channels to match the model")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, leave=False)

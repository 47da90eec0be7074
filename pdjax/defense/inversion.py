"""Trigger inversion (SPEC 4): PureDiffusion, with Elijah and TERD as baselines, behind one API.

The unknown trigger ``delta`` [H, W, C] is optimised with optax against a noise batch [B, H, W, C];
the model's params are a traced argument, so one compile serves every checkpoint of an architecture and
a stack of N models is the same program under ``jax.vmap`` (:func:`invert_many`).

Methods (each a loss ``loss(delta, params, fixed, key_i)``; SPEC 4 has the formulas):

- ``elijah``: L = mean | mean_b eps(eps_b + delta, T-1) - lambda delta |, lambda = 0.5 (1.0 for ODE models),
  100 Adam steps, lr 0.1, B = 100 fixed noises.
- ``terd``: as TERD's published code (PKU-ML/TERD, BadDiffusion/reverse.py and reverse_loss.py). The shared
  loss p(x_start, t, d) = 0.5 mean_b sum_pixels ((eps_1 - eps(x^1, t)) - (eps_2 - eps(x^2, t)))^2 with
  x^k = sqrt(abar_t) x_start + sqrt(1 - abar_t) eps_k + d (per-sample sums, batch mean). Phase 1 (3000 SGD
  steps, lr 0.5 with cosine decay to 0, B = 16): x_start ~ N(0, I), t ~ U{T-10..T-1},
  L = p(x_start, t, delta) - 5e-5 ||delta||_1. Phase 2 (1000 steps; SGD lr 0.5, cosine decay, gradient clipped
  to L2 norm 0.01): x0 = a 10-step DDIM chain from eps + delta, with gradients through it;
  L = (p(x0, t ~ U{T-10..T-1}, delta) + p(x0, t ~ U{0..9}, 0)) / 2 - 5e-5 ||delta||_1. (Until 2026-12-04 pdjax
  took per-element means, 1/(H W C) of this gradient, and its phase 2 asked two chains to agree.)
- ``purediffusion``: start x_T = eps_b + delta, run the model's own DDPM sampler for K reverse steps with
  gradients through the chain; at each visited step t_i the output should carry the shift lambda_i delta:
  L_shift = mean_i norm(mean_b eps(x_{t_i}) - lambda_i delta) (``per_sample``: the residual is taken per
  sample against the clean chain from the same noise, eps(x^bd_b) - eps(x^clean_b) - lambda_i delta);
  L_cons = mean_i mean_{j<k} mean_pixels (s_j - s_k)^2 over the first ``cons_batch`` samples, where
  s = x_t - sqrt(1 - abar_t) eps_hat = sqrt(abar_t) x0_hat is the scaled x0-prediction (the scale keeps
  the term finite near t = T, where 1/sqrt(abar_t) ~ 150); L = shift_weight L_shift + cons_weight L_cons
  (+ final_weight L_final, pdjax's addition: the collapse of short-DDIM-chain generations, off by default;
  + spread_weight L_spread, pdjax's addition for TrojDiff: -log of how much the trigger widens the
  per-sample spread of eps_hat at t = T-1, off by default).
  lambda_i comes from :func:`pdjax.defense.shift.get_lambda` (closed form or a shipped surrogate table).

Loop layout: the optimiser loop is :func:`pdjax.loops.repeat` inside one jit. On GPU/TPU the whole run
is one program (a ``lax.scan`` over all steps); on XLA:CPU, where convolution backward passes inside a
scan are ~15x slower (DESIGN habit 2, ``experiments/bench_loops.py``), it is a host loop of one jitted
step, with the K-step chain unrolled inside it. Every step takes its randomness from
``fold_in(key, step)``, so both layouts give the same trigger for the same key. With several devices
(one per CPU core by default, GPUs) one model's Elijah or PureDiffusion program splits its noise batch over
them under ``shard_map`` (:mod:`pdjax.sharding`): the same trigger to float rounding.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pdjax import loops
from pdjax.configs import from_dict_strict
from pdjax.diffusion.samplers import DDIM_STEPS, ddim_step, ddim_update, ddpm_step, timesteps_ddim
from pdjax.diffusion.schedule import Schedule, ScheduleConfig, make_schedule
from pdjax.errors import ConfigError, UnknownNameError
from pdjax.metrics import uniformity
from pdjax.models.unet import make_eps_fn
from pdjax.sharding import AXIS, batch_agree, batch_gather, batch_mean, batch_mesh, batch_noise, pinned

METHODS = ("purediffusion", "elijah", "terd")
INITS = ("neg-uniform", "zeros", "normal", "alt-uniform")
NORMS = ("l1", "l2")
DTYPES = ("float32", "bfloat16")
FINAL_STATS = ("sq_mean", "uniformity")  # InversionConfig.final_stat
CHAINS = ("ddpm", "ddim")  # chain="ddim" walks the first K steps of DDIM-100 (samplers.DDIM_STEPS)

# SPEC 4 defaults per method: fresh noise per step, optimiser steps, learning rate, noise batch, size search
# (see ``fresh_noise`` and ``scales``).
_DEFAULTS = {
    "purediffusion": {"fresh_noise": True, "steps": 100, "lr": 0.1, "batch": 32,
                      "scales": (1.0, 1.5, 2.0, 2.5, 3.0), "starts": ("ddpm",)},
    "elijah": {"fresh_noise": False, "steps": 100, "lr": 0.1, "batch": 100, "scales": (), "starts": ("ddpm",)},
    "terd": {"fresh_noise": False, "steps": 3000, "lr": 0.5, "batch": 16, "scales": (), "starts": ("ddpm",)},
}


@dataclasses.dataclass(frozen=True)
class InversionConfig:
    """Settings of one inversion. Zero values of ``steps``, ``lr``, ``batch`` mean the method's default.

    Attributes:
      method: "purediffusion" | "elijah" | "terd".
      steps: optimiser steps (TERD: phase 1).
      lr: learning rate (Adam for purediffusion/elijah, SGD with cosine decay for terd).
      batch: noise batch B.
      init: delta_0: "neg-uniform" (-U[0, 1), Elijah's), "zeros", "normal", or "alt-uniform" (restart r from
        (-1)^(r+1) U[0, 1): even restarts as neg-uniform, odd ones positive; a loss with a sign-symmetric
        landscape, L_spread under a norm bound, stalled in the negative basin from every normal init while a
        TrojDiff trigger with positive mean lay in the other, experiments/results/detection_table.md).
      K: purediffusion: reverse steps unrolled per loss evaluation.
      norm: purediffusion: "l1" (mean |r|) or "l2" (mean r^2) of the shift residual.
      per_sample: purediffusion: per-sample residual against the clean chain instead of the batch mean.
      shift_weight, cons_weight: purediffusion: weights of L_shift and L_cons.
      cons_batch: purediffusion: samples entering L_cons and L_final (the first ones of the batch).
      final_weight, final_steps: purediffusion: weight of L_final, the collapse of final generations: the
        first ``cons_batch`` noises run a deterministic ``final_steps``-step DDIM chain from T-1 to x0, once
        from eps + delta and once from eps alone; L_final = log L_cons(x0 | delta) - log L_cons(x0 | 0)
        (:func:`final_log_ratio`). It sees a backdoor that only shows at the end of the chain (VillanDiffusion
        ODE: the first steps' shift is that of any model, experiments/results/start_search.md section 3).
      final_stat: L_final's spread of the chain ends: "sq_mean" (mean squared pairwise distance, as L_cons) or
        "uniformity" (:func:`pdjax.metrics.uniformity`, the trimmed mean pairwise distance detection scores
        with: a few stray generations do not dominate it; start_search.md section 8).
      final_eta: L_final's chain: 0 = deterministic DDIM; 1 = stochastic (DDPM-like), both chains sharing
        one chain noise (fresh with ``fresh_noise``). Along deterministic DDIM a TrojDiff blend trigger makes the
        generations diverge; along a 20-step stochastic chain they partly collapse, but the inversion did not
        find the trigger that way (start_search.md section 6).
      spread_weight: purediffusion: weight of L_spread = -log(spread(delta) / spread(0)), spread(delta) the
        per-sample standard deviation of eps_hat(eps_b + delta, T-1) over the batch, averaged over pixels
        (:func:`spread_log_ratio`). A TrojDiff model was trained on starts gamma eps + mu (gamma < 1) and
        answers them with (x - mu) / gamma: at its trigger it widens the spread, while a clean or
        BadDiffusion model answers about eps_hat ~ x_T, spread ~1 for any delta. One model call per step.
      trojan_weight, trojan_gamma: purediffusion: weight of L_troj = mean_b mean_pixels (eps_hat(gamma eps_b +
        delta, t_b) - eps_b)^2 with t_b ~ U{T-10..T-1} and gamma = ``trojan_gamma`` (:func:`trojan_residual`):
        TrojDiff's own training target near t = T, where its start gamma eps + mu answers eps. Small at the
        attack's mu (and gamma); from delta = 0 it stalls, so it is started from the ball probe's trigger
        (:mod:`pdjax.defense.trojan`). The trigger it finds is mu, for the start gamma eps + delta.
      restarts: independent optimisations from R different inits (restart 0 from the key's own init, restart r
        from ``fold_in(key, r)``'s), run as one program (the loss vmapped over a restart axis, the same noise for
        all; Adam and SGD act elementwise, so each restart follows its own trajectory); the restart with the
        lowest loss at the last step is kept. For losses with several local optima (L_spread). With a start
        trigger, one start per restart ([R, H, W, C]).
      max_norm: > 0: after every optimiser step the trigger is projected onto the L2 ball of this radius
        (each restart on its own; the norm of the optimised parameter, i.e. of the coarse grid with ``cells``).
        Lets a loss be compared between models at one trigger size (L_spread: a clean model widens its answer
        only with a large trigger). 0 = no constraint.
      cells: the trigger is optimised on a grid of cells x cells pixel blocks and upsampled (nearest) to the
        image, 1 = one value per pixel (a start trigger is block-averaged onto the grid). Meant to keep the
        optimiser off pixel-level patterns; no kept experiment measures it yet.
      lambda_source: purediffusion: "closed-sde", "closed-ode", a shipped table name or a table path.
      chain: purediffusion: the sampler unrolled for the K steps: "ddpm" (t = T-1, T-2, ...) or "ddim"
        (deterministic DDIM-100, t = 990, 980, ...; lambda is then taken at those timesteps). An ODE-trained
        backdoor (VillanDiffusion ODE) keeps its shift only along its own (DDIM) chain.
      elijah_lambda: elijah's constant (0.5; 1.0 for ODE-trained models).
      terd_refine_steps, terd_ddim_steps, terd_l1: TERD phase 2 steps, its DDIM chain length, L1 weight.
      steps_per_call: optimiser steps per jitted call; 0 = 1 on CPU, all steps elsewhere.
      dtype: compute dtype of the UNet inside the loss: "float32" or "bfloat16" (params stay float32 and
        are cast per layer; the trigger, the optimiser and the loss reductions stay float32).
      remat: rematerialise each unrolled reverse step (``jax.checkpoint``; purediffusion's K steps, TERD's
        phase-2 DDIM chain): activation memory of one step instead of K, for about one more forward pass.
      scales: size search after the optimisation (:func:`size_search`): candidate factors s for the
        trigger s * delta; the one whose DDPM generations agree best (L_cons on the final images) is
        kept. None = the method's default (purediffusion (1, 1.5, 2, 2.5, 3); elijah, terd: none, as
        published); () or a single factor 1 = off.
      scale_samples: generations per candidate factor in the size search.
      starts: the starts the size search tries (labels of :class:`pdjax.defense.evaluate.Start`: "ddpm",
        "ddim", "ddim@0.6", ...: sampler and noise scale c of x_T = c * eps + s * delta); every (start,
        factor) pair is scored by L_cons of its generations over L_cons of clean generations from the same
        start, and the lowest wins. None = the method's default ("ddpm" only).
      fresh_noise: purediffusion: draw a new noise batch (and chain noise) at every optimiser step instead
        of one fixed batch (not with ``per_sample``, whose clean chain is computed once). None = the method's
        default: purediffusion True unless ``per_sample`` (on bd_box_x it gave a smoother trigger: L2 to the
        true one 9.5 instead of 18.1 after the size search; experiments/results/inversion_table.md), else False.
    """

    method: str = "purediffusion"
    steps: int = 0
    lr: float = 0.0
    batch: int = 0
    init: str = "neg-uniform"
    K: int = 10
    norm: str = "l1"
    per_sample: bool = False
    shift_weight: float = 1.0
    cons_weight: float = 0.0
    cons_batch: int = 8
    final_weight: float = 0.0
    final_steps: int = 10
    final_eta: float = 0.0
    final_stat: str = "sq_mean"
    spread_weight: float = 0.0
    trojan_weight: float = 0.0
    trojan_gamma: float = 0.6
    restarts: int = 1
    max_norm: float = 0.0
    cells: int = 1
    lambda_source: str = "closed-sde"
    chain: str = "ddpm"
    elijah_lambda: float = 0.5
    terd_refine_steps: int = 1000
    terd_ddim_steps: int = 10
    terd_l1: float = 5e-5
    steps_per_call: int = 0
    dtype: str = "float32"
    remat: bool = False
    scales: tuple | None = None
    scale_samples: int = 8
    fresh_noise: bool | None = None
    starts: tuple | None = None

    def resolved(self) -> "InversionConfig":
        """The config with method defaults filled in, validated (ConfigError / UnknownNameError)."""
        if self.method not in METHODS:
            raise UnknownNameError("inversion method", self.method, METHODS)
        if self.init not in INITS:
            raise UnknownNameError("init", self.init, INITS)
        if self.norm not in NORMS:
            raise UnknownNameError("norm", self.norm, NORMS)
        if self.dtype not in DTYPES:
            raise UnknownNameError("inversion dtype", self.dtype, DTYPES)
        if self.chain not in CHAINS:
            raise UnknownNameError("inversion chain", self.chain, CHAINS)
        d = _DEFAULTS[self.method]
        scales = d["scales"] if self.scales is None else tuple(float(v) for v in self.scales)
        if any(not v > 0 for v in scales):
            raise ConfigError(f"inversion scales must be > 0, got {list(scales)}")
        fresh = d["fresh_noise"] and not self.per_sample if self.fresh_noise is None else self.fresh_noise
        from pdjax.defense.evaluate import Start

        starts = d["starts"] if self.starts is None else self.starts
        starts = tuple(dict.fromkeys(Start.parse(v).label for v in starts))  # validated, normalised, deduplicated
        if not starts:
            raise ConfigError("inversion starts must name at least one start (e.g. ddpm)")
        cfg = dataclasses.replace(self, steps=self.steps or d["steps"], lr=self.lr or d["lr"],
                                  batch=self.batch or d["batch"], scales=tuple(sorted(set(scales))),
                                  fresh_noise=bool(fresh), starts=starts)
        if cfg.searches and cfg.scale_samples < 2:
            raise ConfigError(f"scale_samples must be >= 2 for a size search, got {cfg.scale_samples}")
        for name in ("steps", "batch", "K", "cells", "restarts"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"inversion {name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.method == "purediffusion":
            if not (cfg.shift_weight or cfg.cons_weight or cfg.final_weight or cfg.spread_weight or cfg.trojan_weight):
                raise ConfigError("purediffusion needs shift_weight, cons_weight, final_weight, spread_weight or "
                                  "trojan_weight > 0")
            if not 0.0 < cfg.trojan_gamma <= 1.0:
                raise ConfigError(f"trojan_gamma must be in (0, 1], got {cfg.trojan_gamma}")
            if cfg.fresh_noise and cfg.per_sample:  # only when asked for explicitly
                raise ConfigError("fresh_noise needs the batch-mean shift loss, not per_sample")
            if cfg.final_weight and cfg.final_steps < 1:
                raise ConfigError(f"final_steps must be >= 1, got {cfg.final_steps}")
            if not 0.0 <= cfg.final_eta <= 1.0:
                raise ConfigError(f"final_eta must be in [0, 1], got {cfg.final_eta}")
            if cfg.final_stat not in FINAL_STATS:
                raise UnknownNameError("final_stat", cfg.final_stat, FINAL_STATS)
            if (cfg.cons_weight or cfg.final_weight) and not 2 <= cfg.cons_batch <= cfg.batch:
                raise ConfigError(f"cons_batch must be in [2, batch={cfg.batch}], got {cfg.cons_batch}")
        if cfg.method == "terd" and (cfg.terd_refine_steps < 0 or cfg.terd_ddim_steps < 1):
            raise ConfigError("terd_refine_steps must be >= 0 and terd_ddim_steps >= 1")
        if cfg.max_norm < 0:
            raise ConfigError(f"max_norm must be >= 0 (0 = none), got {cfg.max_norm}")
        if cfg.steps_per_call < 0:
            raise ConfigError(f"steps_per_call must be >= 0, got {cfg.steps_per_call}")
        return cfg

    @property
    def searches(self) -> bool:
        """Whether a resolved config runs the size search (several factors or several starts)."""
        return len(self.scales) > 1 or len(self.starts or ()) > 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("scales", "starts"):
            d[name] = None if getattr(self, name) is None else list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InversionConfig":
        cfg = from_dict_strict(cls, d, "inversion config")
        return dataclasses.replace(cfg, **{name: tuple(getattr(cfg, name)) for name in ("scales", "starts")
                                           if getattr(cfg, name) is not None})


@dataclasses.dataclass
class InversionResult:
    """One inverted trigger.

    Attributes:
      method: the method name.
      trigger: [H, W, C] float32 inverted trigger (raw values, the -1-background convention of SPEC 2).
      losses: [S] float32 loss per optimiser step (TERD: phase 1 then phase 2).
      config: the resolved :class:`InversionConfig` as a dict.
      seed: the seed of the key when known (else None).
      seconds: wall time of the optimisation (and size search) including compilation; compile_seconds:
        the first call's extra time over a later call (an estimate of compilation).
      scale: the factor the size search chose (``trigger`` is already multiplied by it; 1 without search).
      scale_scores: {factor: score} of the chosen start (empty without search); score = L_cons of the
        generations over L_cons of clean generations from the same start.
      start: the label of the start the size search chose ("ddpm" without search).
      start_scores: {start label: {factor: score}} of every start searched (empty without search).
      generations: [n, H, W, C] the size search's generations from the chosen start with the trigger (start
        noise and chain key from :func:`size_search_key`), or None without search; not saved.
      clean_generations: [n, H, W, C] the same start's generations without trigger (same noise), or None.
    """

    method: str
    trigger: np.ndarray
    losses: np.ndarray
    config: dict
    seed: int | None = None
    seconds: float = 0.0
    compile_seconds: float = 0.0
    scale: float = 1.0
    scale_scores: dict = dataclasses.field(default_factory=dict)
    generations: np.ndarray | None = dataclasses.field(default=None, repr=False)
    start: str = "ddpm"
    start_scores: dict = dataclasses.field(default_factory=dict)
    clean_generations: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready summary (the trigger is saved separately by :meth:`save`)."""
        return {"method": self.method, "config": self.config, "seed": self.seed, "seconds": self.seconds,
                "compile_seconds": self.compile_seconds, "final_loss": float(self.losses[-1]),
                "scale": self.scale, "scale_scores": {f"{k:g}": v for k, v in self.scale_scores.items()},
                "start": self.start, "start_scores": {a: {f"{k:g}": v for k, v in d.items()}
                                                      for a, d in self.start_scores.items()},
                "losses": [float(v) for v in self.losses], "trigger_shape": list(self.trigger.shape)}

    def save(self, out: str | Path) -> Path:
        """Writes ``trigger.npy``, ``trigger.png`` and ``inversion.json`` into the folder ``out``."""
        return save_trigger(out, self.trigger, self.to_dict())


def save_trigger(out: str | Path, trigger: np.ndarray, summary: dict, **arrays: np.ndarray) -> Path:
    """Writes ``trigger.npy``, ``trigger.png`` (clipped to [-1, 1]), each of ``arrays`` as ``NAME.npy`` and
    ``summary`` as ``inversion.json`` (atomically) into the folder ``out``."""
    from pdjax.images import save_image

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {out}: {e.strerror}; choose a writable --out") from None
    for name, a in {"trigger": trigger, **arrays}.items():
        np.save(out / f"{name}.npy", a)
    save_image(np.clip(trigger, -1.0, 1.0), out / "trigger.png")
    tmp = out / "inversion.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "inversion.json")
    return out


class InvState(NamedTuple):
    """Optimiser state: step count, delta [H, W, C] (or [R, H, W, C] with restarts), optax state."""

    step: jax.Array
    delta: jax.Array
    opt_state: Any


class Problem(NamedTuple):
    """What an inversion needs from a model besides its params; hashable, so compiles are cached per problem.

    Attributes: eps_fn (the model's pure eps function), schedule_config, shape (H, W, C).
    """

    eps_fn: Callable
    schedule_config: ScheduleConfig
    shape: tuple

    @property
    def schedule(self) -> Schedule:
        return make_schedule(self.schedule_config)

    @property
    def variance_type(self) -> str:
        return self.schedule_config.variance_type

    @property
    def clip_sample(self) -> bool:
        return bool(self.schedule_config.clip_sample)


def problem_of(model, dtype: str = "float32") -> Problem:
    """The :class:`Problem` of a :class:`pdjax.model.Model`, its UNet computing in ``dtype``."""
    eps_fn = model.eps if dtype == "float32" else make_eps_fn(model.config, dtype)
    return Problem(eps_fn, model.schedule_config, tuple(model.image_shape))


def _step(fn, cfg: InversionConfig):
    """One unrolled reverse step ``fn(params, x, t, ...)`` (t a Python int), rematerialised in the backward
    pass when ``cfg.remat``."""
    return jax.checkpoint(fn, static_argnums=(2,)) if cfg.remat else fn


# ----------------------------------------------------------------------------------------- losses
def _eps_at(eps_fn, params, x, t):
    return eps_fn(params, x, jnp.full((x.shape[0],), t, jnp.int32))


def _norm(r, norm: str, batched: bool = False):
    """Mean |r| (l1) or mean r^2 over every element; ``batched``: r [B, ...] may be split over devices."""
    a = jnp.abs(r) if norm == "l1" else r * r
    return batch_mean(a, all_axes=True) if batched else jnp.mean(a)


def pairwise_sq_mean(s):
    """mean_{j<k} mean_pixels (s_j - s_k)^2 for s [B, ...] (B >= 2), via the per-pixel variance."""
    b = s.shape[0]
    return 2.0 * b / (b - 1) * jnp.mean(jnp.var(s, axis=0))


def elijah_loss(prob: Problem, cfg: InversionConfig):
    """Elijah (SPEC 4): L = mean | mean_b eps(eps_b + delta, T-1) - lambda delta |."""
    T = prob.schedule.num_timesteps

    def loss(delta, params, fixed, key):
        e = _eps_at(prob.eps_fn, params, fixed["noise"] + delta, T - 1)
        return jnp.mean(jnp.abs(batch_mean(e) - cfg.elijah_lambda * delta))

    return loss


def chain_timesteps(prob: Problem, cfg: InversionConfig) -> list[int]:
    """The K timesteps a purediffusion loss visits: T-1, ..., T-K (ddpm) or the first K of DDIM-100 (ddim)."""
    from pdjax.defense.shift import _visited_timesteps

    T = prob.schedule.num_timesteps
    if cfg.chain == "ddim" and cfg.K > _ddim_steps(T):
        raise ConfigError(f"K = {cfg.K} exceeds the {_ddim_steps(T)} steps of the DDIM chain")
    return [int(t) for t in _visited_timesteps(T, cfg.chain, cfg.K, _ddim_steps(T))]


def _ddim_steps(T: int) -> int:
    return min(DDIM_STEPS, T)


def _chain_step(prob: Problem, cfg: InversionConfig):
    """One reverse step of ``cfg.chain``: (params, x, t, key) -> (x_prev, eps_hat); t a Python int."""
    sched = prob.schedule
    if cfg.chain == "ddim":
        stride = sched.num_timesteps // _ddim_steps(sched.num_timesteps)
        return lambda params, x, t, k: ddim_step(prob.eps_fn, params, sched, x, t, t - stride,
                                                 clip_sample=prob.clip_sample)
    return lambda params, x, t, k: ddpm_step(prob.eps_fn, params, sched, x, t, k,
                                             variance_type=prob.variance_type, clip_sample=prob.clip_sample)


def _clean_chain_eps(prob: Problem, cfg: InversionConfig, params, noise, chain_key):
    """eps_hat along the clean chain from ``noise`` for the K steps of ``cfg.chain``: [K, B, H, W, C] (no gradient)."""
    step = _chain_step(prob, cfg)
    x, out = noise, []
    for t in chain_timesteps(prob, cfg):
        x, e = step(params, x, t, chain_key)
        out.append(e)
    return jax.lax.stop_gradient(jnp.stack(out))


def _ddim_chain(prob: Problem, cfg: InversionConfig, timesteps, eta: float = 0.0):
    """``(params, x, key=None) -> x0``: a DDIM chain over ``timesteps`` (descending; each step goes to the
    next one, the last to x0), unrolled with gradients through it (each step rematerialised with ``cfg.remat``).
    ``eta`` > 0: stochastic DDIM (1 = DDPM-like), step t's noise ``normal(fold_in(key, t))``, so two calls with
    one key share their chain noise."""
    ts = [int(t) for t in timesteps]
    prevs = ts[1:] + [-1]

    def one(params, x, t, t_prev, key):
        # The chain noise is drawn whole (not per device): L_final runs its few samples whole on every device.
        z = jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype) if eta else None
        return ddim_update(prob.schedule, x, _eps_at(prob.eps_fn, params, x, t), t, t_prev, z, eta,
                           clip_sample=prob.clip_sample)

    step = _step(one, cfg)

    def run(params, x, key=None):
        if eta and key is None:
            raise ValueError("a stochastic DDIM chain (eta > 0) needs a key")
        for t, t_prev in zip(ts, prevs):
            x = step(params, x, t, t_prev, key)
        return x

    return run


def final_timesteps(T: int, steps: int) -> list[int]:
    """The deterministic chain of L_final: ``steps`` DDIM steps from T-1 down, stride T // steps:
    [T-1, T-1-stride, ...]; the last step goes to x0 (see :func:`final_log_ratio`)."""
    stride = T // steps
    return [T - 1 - i * stride for i in range(steps)]


def final_log_ratio(prob: Problem, cfg: InversionConfig):
    """L_final as a function ``(params, noise [n, H, W, C], delta [H, W, C], key) -> scalar``.

    x0(z) = the ``cfg.final_steps``-step DDIM chain (:func:`final_timesteps`) from z, deterministic for
    ``cfg.final_eta`` = 0, else stochastic with the chain noise of ``key``, shared by both chains;
    L_final = log S(x0(noise + delta)) - log S(x0(noise)), S = :func:`pairwise_sq_mean` or, with
    ``cfg.final_stat = "uniformity"``, :func:`pdjax.metrics.uniformity`; the second term
    without gradient: < 0 when the trigger makes different noises end on the same image. The chain from the
    noise alone is the scale: a trigger that only enlarges or saturates the outputs does not score.
    """
    x0 = _ddim_chain(prob, cfg, final_timesteps(prob.schedule.num_timesteps, cfg.final_steps), cfg.final_eta)
    stat = pairwise_sq_mean if cfg.final_stat == "sq_mean" else uniformity

    def loss(params, noise, delta, key=None):
        clean = jax.lax.stop_gradient(stat(x0(params, noise, key)))
        return jnp.log(stat(x0(params, noise + delta, key)) + 1e-12) - jnp.log(clean + 1e-12)

    return loss


def purediffusion_loss(prob: Problem, cfg: InversionConfig, lambdas):
    """PureDiffusion (SPEC 4): shift_weight L_shift + cons_weight L_cons over K unrolled reverse steps of
    ``cfg.chain`` (DDPM by default, or DDIM-100), + final_weight L_final (:func:`final_log_ratio`).

    ``lambdas``: [K] float32, lambda at the K visited timesteps (:func:`chain_timesteps`).
    """
    sched = prob.schedule
    lambdas = jnp.asarray(lambdas, jnp.float32)
    step = _step(_chain_step(prob, cfg), cfg)
    timesteps = chain_timesteps(prob, cfg) if cfg.shift_weight or cfg.cons_weight else []
    final = final_log_ratio(prob, cfg) if cfg.final_weight else None
    spread = spread_log_ratio(prob) if cfg.spread_weight else None
    trojan = trojan_residual(prob) if cfg.trojan_weight else None

    def loss(delta, params, fixed, key):
        noise, chain_key = fixed["noise"], fixed["chain_key"]
        if cfg.fresh_noise:  # a new noise batch and chain noise every optimiser step (key = the step's key)
            noise = batch_noise(jax.random.fold_in(key, 0), noise.shape)
            chain_key = jax.random.fold_in(key, 1)
        x = noise + delta
        shift = cons = 0.0
        for i, t in enumerate(timesteps):  # unrolled: K straight-line model calls, gradients through the chain
            x_next, e = step(params, x, t, chain_key)
            if cfg.shift_weight:
                if cfg.per_sample:
                    r = e - fixed["clean_eps"][i] - lambdas[i] * delta
                    shift = shift + _norm(r, cfg.norm, batched=True)
                else:
                    shift = shift + _norm(batch_mean(e) - lambdas[i] * delta, cfg.norm)
            if cfg.cons_weight:
                s = batch_gather(x - sched.sqrt_one_minus_abar[t] * e)[: cfg.cons_batch]
                cons = cons + batch_agree(pairwise_sq_mean(s))
            x = x_next
        total = (cfg.shift_weight * shift + cfg.cons_weight * cons) / cfg.K
        if final is not None:  # computed whole on every device (a few samples), marked as one value
            total = total + cfg.final_weight * batch_agree(final(params, batch_gather(noise)[: cfg.cons_batch], delta,
                                                                    jax.random.fold_in(chain_key, 2)))
        if spread is not None:
            total = total - cfg.spread_weight * spread(params, noise, delta)
        if trojan is not None:
            total = total + cfg.trojan_weight * trojan(params, noise, delta, cfg.trojan_gamma,
                                                       jax.random.fold_in(chain_key, 3))
        return total

    return loss


def batch_spread(e: jax.Array) -> jax.Array:
    """Per-pixel standard deviation of ``e`` [B, H, W, C] over the (possibly device-split) batch, averaged
    over pixels: a scalar."""
    m = batch_mean(e)
    return jnp.mean(jnp.sqrt(batch_mean(jnp.square(e - m)) + 1e-12))


def spread_log_ratio(prob: Problem):
    """``f(params, noise [B, H, W, C], delta) -> log(spread(noise + delta) / spread(noise))`` at t = T-1, with
    spread = :func:`batch_spread` of eps_hat. The trigger-free spread (~1) is held constant; a positive value
    means the trigger widens the model's answer (module docstring, ``spread_weight``)."""
    T = prob.schedule.num_timesteps

    def f(params, noise, delta):
        t = jnp.full((noise.shape[0],), T - 1, jnp.int32)
        wide = batch_spread(prob.eps_fn(params, noise + delta, t))
        ref = jax.lax.stop_gradient(batch_spread(prob.eps_fn(params, noise, t)))
        return jnp.log(wide) - jnp.log(ref)

    return f


TROJAN_WINDOW = 10  # L_troj's timesteps: t ~ U{T - TROJAN_WINDOW .. T-1}


def trojan_residual(prob: Problem):
    """``f(params, noise [B, H, W, C], delta, gamma, key) -> L_troj``: the mean squared gap between eps_hat at
    gamma * noise + delta and the noise itself, at t ~ U{T-10..T-1} per sample (drawn from ``key``). TrojDiff
    trains its model to answer eps at sqrt(abar_t) y + sqrt(1 - abar_t)(gamma eps + mu) (SPEC 2.2), about
    gamma eps + mu near t = T, so L_troj is small at (mu, gamma); a clean model answers about the noise of any
    start (likely because its GroupNorms make it nearly blind to the start's scale), so its L_troj grows with
    delta."""
    T = prob.schedule.num_timesteps

    def f(params, noise, delta, gamma, key):
        t = jax.random.randint(key, (noise.shape[0],), T - TROJAN_WINDOW, T)
        e = prob.eps_fn(params, gamma * noise + delta, t)
        return batch_mean(jnp.mean(jnp.square(e - noise), axis=(1, 2, 3)))

    return f


def terd_losses(prob: Problem, cfg: InversionConfig):
    """TERD (SPEC 4; the module docstring has its losses): (phase-1 loss, phase-2 loss); both take a fresh key
    per step."""
    sched = prob.schedule
    T = sched.num_timesteps
    B = cfg.batch

    def pair_loss(params, x_start, t, d, key):
        """0.5 mean_b sum_pixels of the difference of two noises' prediction errors at x_start's level t."""
        k1, k2 = jax.random.split(key)
        e1, e2 = (jax.random.normal(k, x_start.shape) for k in (k1, k2))
        sa = sched.sqrt_abar[t][:, None, None, None]
        s1 = sched.sqrt_one_minus_abar[t][:, None, None, None]
        p1 = prob.eps_fn(params, sa * x_start + s1 * e1 + d, t)
        p2 = prob.eps_fn(params, sa * x_start + s1 * e2 + d, t)
        return 0.5 * jnp.mean(jnp.sum(((e1 - p1) - (e2 - p2)) ** 2, axis=(1, 2, 3)))

    def l1(delta):
        return cfg.terd_l1 * jnp.sum(jnp.abs(delta))

    def phase1(delta, params, fixed, key):
        kt, ks, kp = jax.random.split(key, 3)
        t = jax.random.randint(kt, (B,), T - 10, T)
        return pair_loss(params, jax.random.normal(ks, (B, *prob.shape)), t, delta, kp) - l1(delta)

    chain = _ddim_chain(prob, cfg, timesteps_ddim(T, cfg.terd_ddim_steps))

    def phase2(delta, params, fixed, key):
        kn, kt1, kt2, kp1, kp2 = jax.random.split(key, 5)
        x0 = chain(params, jax.random.normal(kn, (B, *prob.shape)) + delta)
        late = pair_loss(params, x0, jax.random.randint(kt1, (B,), T - 10, T), delta, kp1)
        early = pair_loss(params, x0, jax.random.randint(kt2, (B,), 0, 10), 0.0, kp2)
        return 0.5 * (late + early) - l1(delta)

    return phase1, phase2


def terd_optimizer(lr: float, steps: int, clip: float = 0.0) -> optax.GradientTransformation:
    """TERD's SGD: ``lr`` decayed to 0 over ``steps`` on a cosine (torch's CosineAnnealingLR), the gradient
    first clipped to L2 norm ``clip`` when > 0 (phase 2: 0.01)."""
    sgd = optax.sgd(optax.cosine_decay_schedule(lr, max(steps, 1)))
    return optax.chain(optax.clip_by_global_norm(clip), sgd) if clip else sgd


TERD_CLIP = 0.01  # phase 2's gradient norm clip (TERD's --clip_norm)


# ----------------------------------------------------------------------------------------- driver
class _Phase(NamedTuple):
    loss: Callable
    optimizer: optax.GradientTransformation
    steps: int
    per_restart: bool = False  # loss returns (sum over restarts, [R] losses)
    max_norm: float = 0.0  # > 0: project the parameter onto this L2 ball after each step


def _phases(prob: Problem, cfg: InversionConfig) -> list[_Phase]:
    """The method's optimisation phases; each loss takes the optimised parameter (the trigger itself, or its
    coarse grid when ``cfg.cells`` > 1; with ``cfg.restarts`` > 1 a leading restart axis, and the loss returns
    (sum, per-restart losses))."""
    phases = _method_phases(prob, cfg)
    if cfg.cells > 1:
        phases = [p._replace(loss=lambda d, *a, f=p.loss: f(expand_cells(d, cfg.cells), *a)) for p in phases]
    if cfg.restarts > 1:
        phases = [p._replace(loss=_over_restarts(p.loss), per_restart=True) for p in phases]
    return [p._replace(max_norm=float(cfg.max_norm)) for p in phases]


def project_to_ball(delta, radius: float):
    """``delta`` [..., H, W, C] scaled down to L2 norm ``radius`` where it is larger (per leading index)."""
    norm = jnp.sqrt(jnp.sum(delta ** 2, axis=(-3, -2, -1), keepdims=True))
    return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


def _over_restarts(loss):
    """``(delta [R, ...], params, fixed, key) -> (sum of the R losses, [R] losses)``: one loss per restart,
    params, noise and step key shared. The restarts do not interact, so the gradient of the sum is each
    restart's own gradient."""

    def f(deltas, *args):
        per = jax.vmap(lambda d: loss(d, *args))(deltas)
        return per.sum(), per

    return f


def expand_cells(p, cells: int):
    """[..., h, w, C] -> [..., h * cells, w * cells, C], each value repeated over a cells x cells block."""
    return p if cells == 1 else jnp.repeat(jnp.repeat(p, cells, axis=-3), cells, axis=-2)


def _cell_shape(cfg: InversionConfig, shape) -> tuple:
    """The optimised parameter's shape [h, w, C] for an image [H, W, C] (ConfigError if cells does not divide)."""
    H, W, C = shape
    if H % cfg.cells or W % cfg.cells:
        raise ConfigError(f"cells = {cfg.cells} must divide the image size {H}x{W}")
    return (H // cfg.cells, W // cfg.cells, C)


def _method_phases(prob: Problem, cfg: InversionConfig) -> list[_Phase]:
    if cfg.method == "elijah":
        return [_Phase(elijah_loss(prob, cfg), optax.adam(cfg.lr), cfg.steps)]
    if cfg.method == "purediffusion":
        from pdjax.defense.shift import get_lambda

        ts = chain_timesteps(prob, cfg) if cfg.chain == "ddim" else None  # ddpm: the table's own first K steps
        lambdas = get_lambda(cfg.lambda_source, prob.schedule, cfg.K, timesteps=ts)
        return [_Phase(purediffusion_loss(prob, cfg, lambdas), optax.adam(cfg.lr), cfg.steps)]
    p1, p2 = terd_losses(prob, cfg)
    phases = [_Phase(p1, terd_optimizer(cfg.lr, cfg.steps), cfg.steps)]
    if cfg.terd_refine_steps:
        phases.append(_Phase(p2, terd_optimizer(cfg.lr, cfg.terd_refine_steps, TERD_CLIP), cfg.terd_refine_steps))
    return phases


def _keys(key):
    k_init, k_noise, k_chain, k_steps = jax.random.split(key, 4)
    return k_init, k_noise, k_chain, k_steps


def initial_delta(cfg: InversionConfig, shape, key, restart: int = 0) -> jax.Array:
    """delta_0 of ``shape`` ([H, W, C], or the coarse grid with ``cfg.cells``) from the init rule and the key's
    init branch; with ``cfg.restarts`` = R > 1, [R, *shape]: restart 0 from ``key``, restart r from
    ``fold_in(key, r)`` (``restart`` = r: the sign of "alt-uniform")."""
    if cfg.restarts > 1:
        one = dataclasses.replace(cfg, restarts=1)
        keys = [key] + [jax.random.fold_in(key, r) for r in range(1, cfg.restarts)]
        return jnp.stack([initial_delta(one, shape, k, r) for r, k in enumerate(keys)])
    k_init = _keys(key)[0]
    if cfg.init == "neg-uniform" or (cfg.init == "alt-uniform" and restart % 2 == 0):
        return -jax.random.uniform(k_init, shape)
    if cfg.init == "alt-uniform":
        return jax.random.uniform(k_init, shape)
    if cfg.init == "normal":
        return jax.random.normal(k_init, shape)
    return jnp.zeros(shape, jnp.float32)


def _prepare(prob: Problem, cfg: InversionConfig, params, key) -> dict:
    """The fixed inputs of the loss: the noise batch [B, H, W, C], the chain key, the clean chain."""
    _, k_noise, k_chain, _ = _keys(key)
    noise = jax.random.normal(k_noise, (cfg.batch, *prob.shape))
    fixed = {"noise": noise, "chain_key": k_chain}
    if _uses_clean_chain(cfg):
        fixed["clean_eps"] = _clean_chain_eps(prob, cfg, params, noise, k_chain)
    return fixed


def _uses_clean_chain(cfg: InversionConfig) -> bool:
    """Whether the loss needs the clean chain's eps_hat (the per-sample shift residual)."""
    return cfg.method == "purediffusion" and cfg.per_sample and bool(cfg.shift_weight)


def _step_fn(phase: _Phase, phase_index: int):
    """One optimiser step of ``phase``: (state, params, fixed, key, i) -> (state, loss)."""

    def one(state: InvState, params, fixed, key, i):
        k = jax.random.fold_in(jax.random.fold_in(_keys(key)[3], phase_index), i)
        if phase.per_restart:  # the [R] per-restart losses are recorded
            (_, loss), g = jax.value_and_grad(phase.loss, has_aux=True)(state.delta, params, fixed, k)
        else:
            loss, g = jax.value_and_grad(phase.loss)(state.delta, params, fixed, k)
        upd, opt_state = phase.optimizer.update(g, state.opt_state, state.delta)
        delta = optax.apply_updates(state.delta, upd)
        if phase.max_norm > 0:
            delta = project_to_ball(delta, phase.max_norm)
        return InvState(state.step + 1, delta, opt_state), loss

    return one


def _chunk(cfg: InversionConfig, steps: int) -> int:
    n = cfg.steps_per_call or (1 if jax.default_backend() == "cpu" else steps)
    if steps % n:
        raise ConfigError(f"steps_per_call={n} must divide the phase's {steps} steps")
    return n


_PROGRAMS: dict = {}
MODEL_AXIS = "models"
SHARDED_METHODS = ("elijah", "purediffusion")


def _program(prob: Problem, cfg: InversionConfig, phase_index: int, n: int, stacked: bool, mesh=None):
    """The jitted ``(state, params, fixed, key) -> (state, losses[n])`` and ``(params, key) -> fixed``.

    Stacked: vmapped over a leading model axis of every argument (keys included, one per model); with a
    ``mesh`` the vmapped program runs under ``jax.shard_map``, each device taking its slice of the model
    axis (the model count must be a multiple of the mesh size). Cached per (problem, config, phase, n,
    layout), so repeated inversions of one architecture reuse the compile.
    """
    # Step counts only set how often the program runs: leave them out of the cache key (not TERD's: its
    # cosine learning rate decays over the phase's steps).
    counts = {} if cfg.method == "terd" else {"steps": 0, "terd_refine_steps": 0}
    norm_cfg = dataclasses.replace(cfg, steps_per_call=0, scales=(), scale_samples=0, starts=(), **counts)
    # One model with several devices: its noise batch is split over them (SHARDED_METHODS' losses reduce
    # over the batch with pdjax.sharding's collectives; TERD draws its batch inside the loss and is not).
    bmesh = batch_mesh(cfg.batch) if not stacked and cfg.method in SHARDED_METHODS else None
    cache_key = (prob, norm_cfg, phase_index, n, stacked, mesh, bmesh)
    if cache_key not in _PROGRAMS:
        phase = _phases(prob, cfg)[phase_index]
        one = _step_fn(phase, phase_index)

        def run(state, params, fixed, key):
            return loops.repeat(lambda s, i: one(s, params, fixed, key, i), state, n,
                                start=state.step, strategy=None)

        prep = lambda params, key: _prepare(prob, cfg, params, key)  # noqa: E731
        if stacked:
            run, prep = jax.vmap(run), jax.vmap(prep)
            if mesh is not None:
                from jax.sharding import PartitionSpec as P

                spec = P(MODEL_AXIS)
                run = jax.shard_map(run, mesh=mesh, in_specs=spec, out_specs=spec)
                prep = jax.shard_map(prep, mesh=mesh, in_specs=spec, out_specs=spec)
        if bmesh is not None:
            from jax.sharding import PartitionSpec as P

            fixed_spec = {"noise": P(AXIS), "chain_key": P()}
            if _uses_clean_chain(cfg):
                fixed_spec["clean_eps"] = P(None, AXIS)
            specs = (P(), P(), fixed_spec, P())
            run = pinned(jax.jit(jax.shard_map(run, mesh=bmesh, in_specs=specs, out_specs=P())), bmesh, specs)
        else:
            run = jax.jit(run)
        _PROGRAMS[cache_key] = (run, jax.jit(prep), phase)
    return _PROGRAMS[cache_key]


def shard_models(tree, mesh):
    """Place every array of ``tree`` with its leading (model) axis split over ``mesh``'s "models" axis."""
    if mesh is None:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec as P

    return jax.device_put(tree, NamedSharding(mesh, P(MODEL_AXIS)))


def _optimise(prob: Problem, cfg: InversionConfig, params, key, num_models: int | None, progress: bool,
              mesh=None, start=None):
    """Runs every phase; returns (delta [..., H, W, C], losses [..., S], seconds, compile_seconds).

    Stacked (``num_models`` given): ``params`` and ``key`` carry a leading model axis.
    """
    stacked = num_models is not None
    t0 = time.perf_counter()
    phases = _phases(prob, cfg)  # first: an unknown --lambda source fails before any jax work
    shape = _cell_shape(cfg, prob.shape)
    if start is not None:  # an explicit delta_0 (e.g. the known trigger, for amplification, SPEC 6)
        delta = jnp.asarray(start, jnp.float32)
        want = tuple(prob.shape) if cfg.restarts == 1 else (cfg.restarts, *prob.shape)
        if delta.shape != want:
            raise ConfigError(f"start trigger has shape {tuple(delta.shape)}, the model needs {want} (one start "
                              f"per restart)")
        c = cfg.cells
        lead = delta.shape[:-3]  # block mean (c = 1: itself)
        delta = delta.reshape(*lead, shape[0], c, shape[1], c, shape[2]).mean(axis=(-4, -2))
        if stacked:
            delta = jnp.broadcast_to(delta, (num_models, *delta.shape))
    elif stacked:
        delta = jax.vmap(lambda k: initial_delta(cfg, shape, k))(key)
    else:
        delta = initial_delta(cfg, shape, key)
    all_losses, compile_s = [], 0.0
    for p, phase in enumerate(phases):
        n = _chunk(cfg, phase.steps)
        # The cached program may have been built for another step count: take the count from ``phase``.
        run, prep, _ = _program(prob, cfg, p, n, stacked, mesh)
        params, key = shard_models((params, key), mesh)
        fixed = prep(params, key)
        opt_state = jax.vmap(phase.optimizer.init)(delta) if stacked else phase.optimizer.init(delta)
        zero = jnp.zeros((num_models,), jnp.int32) if stacked else jnp.zeros((), jnp.int32)
        state = shard_models(InvState(zero, delta, opt_state), mesh)
        # Arguments on the device once: each call would otherwise copy numpy params to it again.
        if hasattr(run, "place"):
            state, params, fixed, key = run.place(state, params, fixed, key)
        elif mesh is None:
            params = jax.device_put(params)
        calls = phase.steps // n
        bar = _progress(calls * n, f"{cfg.method} phase {p + 1}" if len(phases) > 1 else cfg.method, progress)
        times = []
        for _ in range(calls):
            tc = time.perf_counter()
            state, losses = run(state, params, fixed, key)
            losses.block_until_ready()
            times.append(time.perf_counter() - tc)
            all_losses.append(np.asarray(losses))
            bar.update(n)
        bar.close()
        if len(times) > 1:
            compile_s += max(0.0, times[0] - float(np.median(times[1:])))
        delta = state.delta
    if cfg.restarts > 1:  # pieces [(M,) n, R] -> [(M,) S, R]; keep each model's restart of lowest last loss
        losses = np.concatenate(all_losses, axis=-2)
        best = np.argmin(losses[..., -1, :], axis=-1)  # [] or [M]
        delta = np.take_along_axis(np.asarray(delta), best[..., None, None, None, None], axis=-4)[..., 0, :, :, :]
        losses = np.take_along_axis(losses, np.broadcast_to(best[..., None, None], losses.shape[:-1] + (1,)),
                                    axis=-1)[..., 0]
    else:
        losses = np.concatenate(all_losses, axis=-1)  # pieces [n] or [M, n] -> [S] or [M, S]
    return np.asarray(expand_cells(delta, cfg.cells)), losses, time.perf_counter() - t0, compile_s


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _seed_of(key) -> int | None:
    try:
        data = np.asarray(jax.random.key_data(key)).ravel()
        return int(data[-1]) if data[:-1].sum() == 0 else None
    except Exception:  # a raw uint32 key or something exotic: no seed to report
        return None


def invert(model, method: str = "purediffusion", key: jax.Array | None = None,
           config: InversionConfig | None = None, progress: bool = False, start=None) -> InversionResult:
    """Invert the trigger of one model.

    Args:
      model: a :class:`pdjax.model.Model` (or anything :func:`problem_of` accepts).
      method: "purediffusion" | "elijah" | "terd" (overrides ``config.method``).
      key: PRNG key (default ``jax.random.key(0)``): init, noise batch, chain noise and per-step randomness
        derive from it, so the same key gives the same trigger.
      config: :class:`InversionConfig` (method defaults when None).
      progress: show a progress bar.
      start: optional [H, W, C] delta_0 replacing ``config.init`` (amplification starts from the known trigger);
        [R, H, W, C] with ``config.restarts`` = R, one per restart.

    Returns:
      :class:`InversionResult` with the trigger [H, W, C], the loss per step and timings.
    """
    key = jax.random.key(0) if key is None else key
    cfg = dataclasses.replace(config or InversionConfig(), method=method).resolved()
    prob = problem_of(model, cfg.dtype)
    delta, losses, secs, comp = _optimise(prob, cfg, model.params, key, None, progress, start=start)
    res = InversionResult(cfg.method, delta.astype(np.float32), losses.astype(np.float32), cfg.to_dict(),
                          _seed_of(key), secs, comp)
    if cfg.searches:
        t0 = time.perf_counter()
        found = size_search(model, res.trigger, cfg.scales, size_search_key(key), cfg.scale_samples, cfg.starts)
        res = _searched(res, found, time.perf_counter() - t0)
    return res


# ----------------------------------------------------------------------------------------- size search
def size_search_key(key):
    """The size search's key: its own branch of the inversion key (the optimisation's draws are unchanged)."""
    return jax.random.fold_in(key, 0x5CA1E)


def pick_scale(scales, scores, rel_tol: float = 0.01) -> int:
    """Index of the chosen factor: the one whose generations agree most (lowest score); among factors within
    ``rel_tol`` of the best, the smallest.

    ``scores``: L_cons of each factor's generations (lower = more agreement).
    """
    scores = np.asarray(scores, np.float64)
    best = scores.min()
    ok = np.flatnonzero(scores <= best + rel_tol * abs(best) + 1e-12)
    return int(ok[np.argmin(np.asarray(scales)[ok])])


class SearchResult(NamedTuple):
    """What the size search chose: factor, start label, every score, the chosen generations and their clean
    counterparts [n, H, W, C]."""

    scale: float
    start: str
    scores: dict
    generations: np.ndarray
    clean: np.ndarray


def cons_ratios(gens) -> list[float]:
    """L_cons (:func:`pairwise_sq_mean`) of each candidate's generations ``gens[1:]`` [n, H, W, C] divided by that
    of ``gens[0]`` (the same noise without a trigger): the size search's score, lower = more agreement."""
    lc = [float(pairwise_sq_mean(jnp.asarray(x))) for x in gens]
    return [v / max(lc[0], 1e-12) for v in lc[1:]]


def _pick(scales, starts, gens) -> SearchResult:
    """The search's choice from generations ``gens[j]`` [1 + S, n, H, W, C] of start ``starts[j]`` (row 0: no
    trigger, rows 1..S: the S factors). Score = L_cons(factor) / L_cons(no trigger); each start's factor by
    :func:`pick_scale`; across starts the lowest chosen score, the earlier start within 1%."""
    scores, best = {}, []
    for label, g in zip(starts, gens):
        ratio = cons_ratios(g)
        scores[label] = {float(s): v for s, v in zip(scales, ratio)}
        i = pick_scale(scales, ratio)
        best.append((ratio[i], i))
    j = pick_scale(range(len(starts)), [b[0] for b in best])
    i = best[j][1]
    return SearchResult(float(scales[i]), starts[j], scores, np.asarray(gens[j][1 + i]), np.asarray(gens[j][0]))


def _candidates(delta, scales) -> np.ndarray:
    """[1 + S, H, W, C]: no trigger, then s * delta for each factor s."""
    delta = np.asarray(delta, np.float32)
    return np.stack([np.zeros_like(delta), *[s * delta for s in scales]])


def size_search(model, delta, scales, key, n: int = 8, starts=("ddpm",)) -> SearchResult:
    """Choose the size of an inverted trigger, and the start that makes it fire (PureDiffusion's second
    loss, used as a line search).

    Why: on a backdoor that responds linearly to the trigger, the shift losses are nearly flat along the
    ray s * delta (mean eps(eps + s g) = lambda s g for every s), so the optimiser finds the trigger's
    direction but keeps roughly its initial size (experiments/results/inversion_table.md: about 0.65 of
    the true trigger's norm, ASR 0.6-0.7 where the true trigger fires 1.0). The consistency criterion of
    SPEC 4 (a firing backdoor sends different noises to one image) does depend on the size, but only at
    the end of the chain. So each candidate s is scored by L_cons = mean_{i<j} mean_pixels (x_i - x_j)^2
    on ``n`` full generations from c * eps_i + s * delta (same noise for every s), divided by L_cons of the
    generations from c * eps_i alone, and the s of the best score wins (:func:`pick_scale`). On the six
    BadDiffusion / VillanDiffusion SDE zoo models (experiments/results/inversion_table.md) PureDiffusion's
    trigger fires 0.56-0.94 before the search and 0.97-1.00 after it (factor 2, or 1.5 once); the true
    trigger fires 0.97-1.00.

    Several ``starts`` (sampler and noise scale c, :class:`pdjax.defense.evaluate.Start`) are compared by
    the same normalised score: backdoors trained for another sampler (VillanDiffusion ODE: DDIM) or
    another start noise (TrojDiff: gamma * eps + mu) fire only from their own.

    Args:
      model: a :class:`pdjax.model.Model`.
      delta: [H, W, C] the optimised trigger.
      scales: candidate factors (ascending).
      key: PRNG key of the generations (the same noise for every start and factor).
      n: generations per candidate.
      starts: start labels, in order of preference.

    Returns:
      :class:`SearchResult`.
    """
    from pdjax.defense.evaluate import Start, triggered_generations

    cands = _candidates(delta, scales)
    gens = [triggered_generations(model, cands, key, n=n, start=Start.parse(a)) for a in starts]
    return _pick(scales, starts, gens)


def _searched(res: InversionResult, found: SearchResult, seconds: float) -> InversionResult:
    return dataclasses.replace(res, trigger=(found.scale * res.trigger).astype(np.float32), scale=found.scale,
                               scale_scores=found.scores[found.start], start=found.start, start_scores=found.scores,
                               generations=found.generations, clean_generations=found.clean,
                               seconds=res.seconds + seconds)


def stack_params(models) -> Any:
    """Params of same-architecture models stacked on a leading model axis (ConfigError otherwise)."""
    first = models[0]
    for m in models[1:]:
        if m.config != first.config or m.schedule_config != first.schedule_config:
            raise ConfigError("invert_many needs models of one architecture and schedule; group them first")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *[m.params for m in models])


def invert_many(models, method: str = "purediffusion", key: jax.Array | None = None,
                config: InversionConfig | None = None, progress: bool = False, keys=None,
                mesh=None) -> list[InversionResult]:
    """Invert N same-architecture models in one program: params stacked on a model axis, ``jax.vmap``.

    Args:
      models: same-architecture :class:`pdjax.model.Model` objects.
      key: one key for every model (default ``key(0)``): each model gets the trigger :func:`invert` would
        give it with this key, up to float rounding.
      keys: alternatively, one key per model ([N] typed keys), as :func:`invert` with ``keys[i]``.
      mesh: optional ``jax.sharding.Mesh`` with axis ``"models"``; the program runs under ``shard_map``
        with the model axis split across its devices (N must be a multiple of the mesh size).
    """
    models = list(models)
    if not models:
        raise ConfigError("invert_many needs at least one model")
    if keys is None:
        key = jax.random.key(0) if key is None else key
        keys = jnp.stack([key] * len(models))
    if len(keys) != len(models):
        raise ConfigError(f"invert_many got {len(keys)} keys for {len(models)} models")
    if mesh is not None and len(models) % mesh.size:
        raise ConfigError(f"{len(models)} models do not split evenly over {mesh.size} devices; pad the stack")
    cfg = dataclasses.replace(config or InversionConfig(), method=method).resolved()
    prob = problem_of(models[0], cfg.dtype)
    params = stack_params(models)
    delta, losses, secs, comp = _optimise(prob, cfg, params, keys, len(models), progress, mesh)
    seeds = [_seed_of(k) for k in keys]
    out = [InversionResult(cfg.method, delta[i].astype(np.float32), losses[i].astype(np.float32), cfg.to_dict(),
                           seeds[i], secs / len(models), comp) for i in range(len(models))]
    if cfg.searches:  # one stacked sampling program per start: model i gets what size_search gives it
        from pdjax.defense.evaluate import Start, stacked_generations

        t0 = time.perf_counter()
        cands = np.stack([_candidates(r.trigger, cfg.scales) for r in out])
        gens = [stacked_generations(models[0], params, cands, jax.vmap(size_search_key)(keys), n=cfg.scale_samples,
                                    mesh=mesh, start=Start.parse(a)) for a in cfg.starts]
        secs = (time.perf_counter() - t0) / len(models)
        out = [_searched(r, _pick(cfg.scales, cfg.starts, [g[i] for g in gens]), secs) for i, r in enumerate(out)]
    return out

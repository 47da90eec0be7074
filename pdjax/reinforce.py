"""Target-directed trigger reinforcement for red teams (beyond the paper; an option of SPEC 6's amplification).

PureDiffusion's amplification inverts the trigger the model has learned with the distribution-shift loss,
which knows nothing of the target. A red team knows its target y, so it can instead ask directly for a trigger
whose generations land on y:

    L(delta) = mean_b mean_pixels (clip(x_0(eps_b + delta), -1, 1) - y)^2,

with x_0 the end of an S-step stochastic DDIM chain (eta = 1, the DDPM-like sampler) run from eps_b + delta,
differentiated through every step. Each optimiser step draws fresh start noise eps [B, H, W, C] and chain
noise. Optimisation runs in stages from delta = g (the known trigger): a short chain first (cheap, moves
delta fast), then a longer one, whose end transfers better to the 1000-step DDPM sampler that ASR is
measured with (experiments/results/amplify_table.md, "Target-directed g*").

Randomness: stage s (0-based) uses ``fold_in(key, s + 1)``; its optimiser step i uses ``fold_in(stage_key,
i)``, split into the start-noise key and the chain key, and chain step j draws ``fold_in(chain_key, j)``.
The same key gives the same trigger, whatever the loop layout (:mod:`pdjax.loops`).

Cost: the chain's backward pass holds S UNet activations (``remat`` recomputes them instead). On GPU/TPU an
optimiser step is one jitted program with the chain in a ``lax.scan``. On XLA:CPU a scan slows the UNet's
backward pass (DESIGN.md habit 2) and an unrolled 100-step chain took 13-29 min to trace and compile in the runs
of experiments/amplify_target.py (16x16 demo UNet, 2 cores), so there the step is a host loop over one chain
step's jitted forward and VJP, compiled in seconds whatever S (``ReinforceConfig.loop``;
experiments/bench_reinforce_loop.py).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pdjax import loops
from pdjax.diffusion.samplers import ddim_update, timesteps_ddim
from pdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ReinforceStage:
    """One stage: ``steps`` Adam steps at learning rate ``lr`` through a ``chain_steps``-step chain."""

    chain_steps: int
    steps: int
    lr: float


#: The default two stages (experiments/amplify_target.py: 0.19 -> 0.83 ASR on the bd_stop_shoe brief model).
DEFAULT_STAGES = (ReinforceStage(20, 300, 0.02), ReinforceStage(100, 100, 0.01))


@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
    """Settings of :func:`reinforce_to_target`.

    Attributes:
      stages: the optimisation stages, run in order (each continues from the previous trigger).
      batch: start noises per optimiser step.
      remat: rematerialise each chain step in the backward pass (less memory, more compute).
      loop: the chain's layout: "host" (a host loop over one chain step's jitted forward and VJP: nothing
        S-long to compile), or "unroll" / "scan" (the whole optimiser step as one jitted program, the chain
        laid out by :func:`pdjax.loops.repeat`). None: ``PDJAX_LOOP`` if set, else "host" on CPU and
        :func:`pdjax.loops.default_strategy` elsewhere. All give the same trigger up to float rounding.
    """

    stages: tuple = DEFAULT_STAGES
    batch: int = 16
    remat: bool = False
    loop: str | None = None

    def __post_init__(self):
        if self.batch < 1:
            raise ConfigError(f"batch must be >= 1, got {self.batch}")
        if self.loop not in (None, "host", *loops.STRATEGIES):
            raise ConfigError(f"loop must be host, {' or '.join(loops.STRATEGIES)} (or None), got {self.loop!r}")
        if not self.stages:
            raise ConfigError("reinforcement needs at least one stage")
        for s in self.stages:
            if not isinstance(s, ReinforceStage):
                raise ConfigError(f"stages must be ReinforceStage(chain_steps, steps, lr), got {s!r}")
            if s.chain_steps < 1 or s.steps < 1 or not s.lr > 0:
                raise ConfigError(f"a stage needs chain_steps >= 1, steps >= 1 and lr > 0, got {s}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def format_stages(stages) -> str:
    """The ``"CHAIN:STEPS:LR,..."`` text of ``stages`` (the inverse of :func:`parse_stages`)."""
    return ",".join(f"{s.chain_steps}:{s.steps}:{s.lr:g}" for s in stages)


def parse_stages(text: str) -> tuple:
    """Stages from ``"CHAIN:STEPS:LR,..."`` (e.g. ``"20:300:0.02,100:100:0.01"``, the defaults), as the CLI's
    ``--reinforce-stages`` takes them; a malformed text raises :class:`ConfigError`."""
    try:
        return tuple(ReinforceStage(int(s), int(n), float(lr)) for s, n, lr in
                     (part.split(":") for part in text.split(",")))
    except ValueError:
        raise ConfigError(f"reinforcement stages {text!r}: expected CHAIN:STEPS:LR[,...], "
                          "e.g. 20:300:0.02,100:100:0.01") from None


@dataclasses.dataclass
class ReinforceResult:
    """The reinforced trigger [H, W, C] (float32, unclipped), the trigger at the end of each stage
    ([H, W, C] each; the last is ``trigger``), the loss of every optimiser step per stage, and wall seconds per
    stage (compiles included)."""

    trigger: np.ndarray
    stage_triggers: list
    losses: list
    seconds: list

    def to_dict(self) -> dict:
        return {"losses": self.losses, "seconds": self.seconds,
                "final_loss": float(self.losses[-1][-1]), "trigger_norm": float(np.linalg.norm(self.trigger))}


def chain_end(model, params, delta, chain_steps: int, batch: int, key, eta: float = 1.0, remat: bool = False,
              loop: str | None = None):
    """x_0 [B, H, W, C] (unclipped) of a ``chain_steps``-step DDIM chain (``eta``; 1 = DDPM-like, 0 = the ODE
    sampler) from eps + delta, differentiable in ``delta`` and ``params``.

    ``key`` splits into the start-noise key and the chain key; chain step j draws ``fold_in(chain_key, j)``.
    """
    x, k_chain = chain_start(model, delta, batch, key)

    def step(x, j):
        return chain_step(model, params, x, j, k_chain, chain_steps, eta), None

    x, _ = loops.repeat(jax.checkpoint(step) if remat else step, x, chain_steps, strategy=loop)
    return x


def chain_start(model, delta, batch: int, key):
    """The chain's start eps + delta [B, H, W, C] and its chain key, from ``key`` (split into the two)."""
    k_start, k_chain = jax.random.split(key)
    return jax.random.normal(k_start, (batch, *model.image_shape)) + delta, k_chain


def chain_step(model, params, x, j, k_chain, chain_steps: int, eta: float = 1.0):
    """Step j (0-based, may be traced) of the ``chain_steps``-step DDIM chain: x [B, H, W, C] -> the next x,
    with chain noise ``fold_in(k_chain, j)``."""
    sched, T = model.schedule, model.schedule.num_timesteps
    t = jnp.asarray(timesteps_ddim(T, chain_steps))[j]
    e = model.eps(params, x, jnp.full((x.shape[0],), t, jnp.int32))
    z = jax.random.normal(jax.random.fold_in(k_chain, j), x.shape)
    return ddim_update(sched, x, e, t, t - T // chain_steps, z, eta)


def target_loss(model, params, delta, target, chain_steps: int, batch: int, key, remat: bool = False,
                loop: str | None = None):
    """L(delta) of the module docstring for one draw of noise (``key``); a scalar.

    Args:
      model: a :class:`pdjax.model.Model` (its schedule, image shape and pure ``eps``).
      params: its parameters (a jit argument, so one program serves every model of an architecture).
      delta: trigger [H, W, C]; target: y [H, W, C] in [-1, 1].
    """
    x = chain_end(model, params, delta, chain_steps, batch, key, 1.0, remat, loop)
    return end_loss(x, target)


def end_loss(x, target):
    """mean (clip(x_0, -1, 1) - y)^2 over the batch and pixels: x [B, H, W, C], target [H, W, C]."""
    return jnp.mean((jnp.clip(x, -1.0, 1.0) - target) ** 2)


_PROGRAMS: dict = {}


def _program(model, cfg: ReinforceConfig, stage: ReinforceStage):
    """The ``(delta, opt_state, params, target, key) -> (delta, opt_state, loss)`` of one optimiser step and its
    optax optimiser, cached per (architecture, schedule, chain length, learning rate, batch, layout; not the
    number of steps): one jitted program, or with ``loop="host"`` a host loop over small jitted pieces
    (:func:`_host_program`)."""
    cache_key = (model.config, model.schedule_config, stage.chain_steps, stage.lr, cfg.batch, cfg.remat, cfg.loop)
    if cache_key in _PROGRAMS:
        return _PROGRAMS[cache_key]
    if _loop(cfg) == "host":
        _PROGRAMS[cache_key] = _host_program(model, cfg, stage)
    else:
        opt = optax.adam(stage.lr)

        def run(delta, opt_state, params, target, key):
            value, grad = jax.value_and_grad(target_loss, argnums=2)(
                model, params, delta, target, stage.chain_steps, cfg.batch, key, cfg.remat, cfg.loop)
            updates, opt_state = opt.update(grad, opt_state)
            return optax.apply_updates(delta, updates), opt_state, value

        _PROGRAMS[cache_key] = (jax.jit(run), opt)
    return _PROGRAMS[cache_key]


def _loop(cfg: ReinforceConfig) -> str:
    """The chain's layout: ``cfg.loop``; else ``PDJAX_LOOP`` if set; else "host" on CPU and
    :func:`pdjax.loops.default_strategy` elsewhere."""
    if cfg.loop:
        return cfg.loop
    return loops.override() or ("host" if jax.default_backend() == "cpu" else loops.default_strategy())


def _host_program(model, cfg: ReinforceConfig, stage: ReinforceStage):
    """One optimiser step as a host loop over small jitted programs, each compiled once whatever S:

    forward: x_{j+1} = step_j(x_j) for j < S, keeping step j's VJP (its residuals: the UNet activations);
    backward: the loss's gradient at x_S pulled back through the VJPs for j = S - 1 .. 0; d loss / d delta is
    the cotangent at x_0 = eps + delta summed over the batch. With ``cfg.remat`` the forward keeps only x_j
    [B, H, W, C] and the backward recomputes step j's UNet forward (one more forward per step, less memory).

    The same loss, gradient and key layout as the one-program step, without an unrolled S-step program to
    trace and compile (experiments/bench_reinforce_loop.py measures both).
    """
    S, opt = stage.chain_steps, optax.adam(stage.lr)

    def step(params, x, j, k):
        return chain_step(model, params, x, j, k, S)

    def pull_remat(params, k, saved, ct):
        return jax.vjp(lambda x: step(params, x, saved[1], k), saved[0])[1](ct)[0]

    start = jax.jit(lambda delta, key: chain_start(model, delta, cfg.batch, key))
    if cfg.remat:  # keep (x_j, j); the pull-back recomputes step j
        fwd = jax.jit(lambda params, x, j, k: (step(params, x, j, k), (x, j)))
        pull = jax.jit(pull_remat)
    else:  # keep step j's VJP: a pytree of its residuals (the UNet activations)
        fwd = jax.jit(lambda params, x, j, k: jax.vjp(lambda x: step(params, x, j, k), x))
        pull = jax.jit(lambda params, k, vjp, ct: vjp(ct)[0])

    end = jax.jit(jax.value_and_grad(end_loss))

    @jax.jit
    def update(delta, opt_state, ct):
        updates, opt_state = opt.update(ct.sum(axis=0), opt_state)
        return optax.apply_updates(delta, updates), opt_state

    def run(delta, opt_state, params, target, key):
        x, k_chain = start(delta, key)
        saved = []
        for j in range(S):
            x, back = fwd(params, x, jnp.int32(j), k_chain)
            saved.append(back)
        value, ct = end(x, target)
        for back in reversed(saved):
            ct = pull(params, k_chain, back, ct)
        delta, opt_state = update(delta, opt_state, ct)
        return delta, opt_state, value

    return run, opt


def reinforce_to_target(model, start, target, key: jax.Array, cfg: ReinforceConfig = ReinforceConfig(),
                        progress: bool = False) -> ReinforceResult:
    """Optimise a trigger, from ``start``, so that triggered generations land on ``target``.

    Args:
      model: a :class:`pdjax.model.Model`.
      start: delta_0 [H, W, C] (usually the known trigger g).
      target: y [H, W, C] in [-1, 1] (a single target image).
      key: PRNG key (see the module docstring for its layout).
    Returns:
      :class:`ReinforceResult`.
    """
    shape = tuple(model.image_shape)
    delta = jnp.asarray(start, jnp.float32)
    y = jnp.asarray(target, jnp.float32)
    if delta.shape != shape:
        raise ConfigError(f"start trigger has shape {tuple(delta.shape)}, the model needs {shape}")
    if y.shape != shape:
        raise ConfigError(f"target has shape {tuple(y.shape)}; target-directed reinforcement needs one "
                          f"image of shape {shape}")
    from tqdm.auto import tqdm

    losses, seconds, triggers = [], [], []
    params = jax.device_put(model.params)  # once, not at every call of a host loop's pieces
    for s, stage in enumerate(cfg.stages):
        run, opt = _program(model, cfg, stage)
        stage_key, opt_state, vals = jax.random.fold_in(key, s + 1), opt.init(delta), []
        t0 = time.perf_counter()
        for i in tqdm(range(stage.steps), desc=f"reinforce stage {s + 1} (S = {stage.chain_steps})",
                      disable=not progress, leave=False):
            delta, opt_state, value = run(delta, opt_state, params, y, jax.random.fold_in(stage_key, i))
            vals.append(float(value))
        seconds.append(time.perf_counter() - t0)
        losses.append(vals)
        triggers.append(np.asarray(delta, np.float32))
    return ReinforceResult(triggers[-1], triggers, losses, seconds)

"""TrojDiff-form inversion (pdjax's addition, beyond the papers): recover a TrojDiff trigger's mean mu and scale gamma.

A TrojDiff model starts its trojan chain at gamma eps + mu (SPEC 2.2) and was trained to answer eps there. The
additive inversions (PureDiffusion, Elijah, TERD) look for a start eps + delta and miss it; removal with their
triggers fails under the trojan sampler, while removal with the attack's mu succeeds
(experiments/results/removal_table.md, "TrojDiff under its own sampler"). This module estimates mu and gamma:

1. the ball probe (:data:`pdjax.defense.detection.BALL_PROBE`: L_spread with the trigger held to L2 norm 10) gives a
   direction along mu, larger than mu;
2. for each gamma of a grid, L_troj (``InversionConfig.trojan_weight``: eps_hat(gamma eps + delta, t) should be
   eps, t near T) is minimised from each ``factor * ball`` (one restart per factor; the lowest last loss kept).
   From delta = 0 it stalls: the answer at a small offset carries no pull towards mu;
3. each gamma's mu' is scored by ``ratio = L_troj(mu'; gamma) / L_troj(0; gamma)`` on one fixed evaluation batch;
   the lowest ratio wins. A clean model answers about the noise at any start, so its ratio stays near 1; a
   TrojDiff model's falls far below it at its own (mu, gamma).

TrojDiff's patch trigger scales the noise by gamma inside a small patch only (SPEC 2.2), which no scalar gamma
describes. The patch search (:class:`PatchConfig`, on by default) covers it without knowing where the patch lies:

4. a screen scores every size x size patch position with a constant mu of each of a few levels inside it, by the
   same ratio L_troj(mu; scale) / L_troj(0; scale) with scale = gamma inside the patch and 1 elsewhere, all on one
   fixed batch (cheap: forward passes only);
5. the best (position, level) is refined by Adam on mu inside that patch; its ratio competes with the scalar
   gammas' and the lowest wins. A clean model cannot answer eps where the noise was scaled down, so its patch
   ratios stay near or above 1.

The result's trigger is mu' for the start ``TrojanResult.scale()`` eps + mu' (a scalar gamma', or the patch's map;
``pdjax clean --shift trojdiff`` removes with it, with ``--noise-patch`` for a patch).
Results: experiments/results/removal_table.md, "TrojDiff-form inversion" and "ho16" (the patch search).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import optax

from pdjax.backdoor.triggers import TROJ_GAMMA, TROJ_PATCH, patch_mask
from pdjax.errors import ConfigError
from pdjax.defense.inversion import InversionConfig, _seed_of, invert, problem_of, save_trigger, trojan_residual
from pdjax.loops import default_steps_per_call, repeat


def _check_loop_settings(cfg, counts: tuple, what: str):
    """``cfg`` itself, or a ConfigError naming ``what``: every field of ``counts`` must be >= 1 and ``lr`` > 0."""
    for name in counts:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{what} {name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ConfigError(f"{what} lr must be > 0, got {cfg.lr}")
    return cfg


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    """Settings of the patch search (module docstring, steps 4-5): TrojDiff's patch form, a start scale eps + mu
    whose noise scale is ``gamma`` inside a ``size`` x ``size`` patch at an unknown position and 1 elsewhere, mu
    zero outside the patch.

    Attributes:
      size: the patch side (TrojDiff's 3).
      gamma: the noise scale inside it (TrojDiff's 0.1).
      levels: the constant values of mu the screen tries inside every patch position.
      screen_batch: noises of the screen's fixed batch (one timestep draw shared by every candidate).
      steps, lr, batch: the Adam refinement of mu inside the best patch (fresh noises each step).
    """

    size: int = TROJ_PATCH
    gamma: float = TROJ_GAMMA["patch"]
    levels: tuple = (-0.9, -0.45, 0.45, 0.9)
    screen_batch: int = 16
    steps: int = 200
    lr: float = 0.05
    batch: int = 32

    def resolved(self) -> "PatchConfig":
        cfg = dataclasses.replace(self, levels=tuple(float(v) for v in self.levels))
        if cfg.size < 1 or not 0.0 < cfg.gamma < 1.0 or not cfg.levels:
            raise ConfigError(f"patch search: size must be >= 1, gamma in (0, 1) and levels non-empty, got size "
                              f"{cfg.size}, gamma {cfg.gamma}, levels {list(cfg.levels)}")
        return _check_loop_settings(cfg, ("screen_batch", "steps", "batch"), "patch search:")


def patch_scale(shape, corner, size: int, gamma: float) -> np.ndarray:
    """[H, W, C] the noise scale of a patch start: ``gamma`` inside the patch, 1 elsewhere."""
    m = patch_mask(shape, corner, size)
    return (1.0 - m + gamma * m).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TrojanConfig:
    """Settings of :func:`invert_trojan`.

    Attributes:
      gammas: the noise scales tried (TrojDiff's blend uses 0.6, its patch 0.1 inside the patch).
      factors: the starts of each L_troj run, as multiples of the ball probe's trigger (one restart each).
      steps, lr, batch: Adam steps, learning rate and fresh-noise batch of each L_troj run.
      eval_batch: noises of the fixed batch every gamma's ratio is scored on.
      patch: the patch search's settings (:class:`PatchConfig`), or None to skip it.
    """

    gammas: tuple = (0.6, 0.3, 0.1)
    factors: tuple = (0.5, 1.0)
    steps: int = 200
    lr: float = 0.05
    batch: int = 32
    eval_batch: int = 64
    patch: PatchConfig | None = PatchConfig()

    def resolved(self) -> "TrojanConfig":
        cfg = dataclasses.replace(self, gammas=tuple(float(g) for g in self.gammas),
                                  factors=tuple(float(f) for f in self.factors),
                                  patch=None if self.patch is None else self.patch.resolved())
        if not cfg.gammas or any(not 0.0 < g < 1.0 for g in cfg.gammas):
            raise ConfigError(f"trojan gammas must be in (0, 1), got {list(cfg.gammas)}")
        if not cfg.factors or any(f <= 0 for f in cfg.factors):
            raise ConfigError(f"trojan factors must be > 0, got {list(cfg.factors)}")
        return _check_loop_settings(cfg, ("steps", "batch", "eval_batch"), "trojan")

    def inversion(self, gamma: float) -> InversionConfig:
        """The purediffusion config of one gamma's L_troj run."""
        return InversionConfig(method="purediffusion", steps=self.steps, lr=self.lr, batch=self.batch,
                               shift_weight=0.0, trojan_weight=1.0, trojan_gamma=gamma, fresh_noise=True,
                               restarts=len(self.factors), scales=(1.0,))


@dataclasses.dataclass
class TrojanResult:
    """What :func:`invert_trojan` found.

    Attributes:
      trigger: [H, W, C] mu' of the winner (the start is :meth:`scale` eps + trigger).
      gamma: the winning noise scale (inside the patch when ``patch`` is set).
      ratio: its L_troj(mu') / L_troj(0) (~1 on a clean model, far below on a TrojDiff one).
      ratios: {gamma: ratio} for every scalar gamma tried.
      ball: [H, W, C] the ball probe's trigger the runs started from.
      losses: [steps] the winning run's loss curve.
      config: the TrojanConfig as a dict.
      seconds: wall time of the whole search.
    """

    trigger: np.ndarray
    gamma: float
    ratio: float
    ratios: dict
    ball: np.ndarray
    losses: np.ndarray
    config: dict
    seed: int | None = None
    seconds: float = 0.0
    patch: dict | None = None
    patch_search: dict | None = None

    def scale(self) -> np.ndarray | float:
        """The start's noise scale: gamma, or the [H, W, C] map of the winning patch (gamma inside, 1 elsewhere)."""
        if self.patch is None:
            return self.gamma
        return patch_scale(self.trigger.shape, tuple(self.patch["corner"]), self.patch["size"], self.gamma)

    def to_dict(self) -> dict:
        return {"method": "trojdiff", "form": "patch" if self.patch else "blend", "gamma": self.gamma,
                "ratio": self.ratio, "patch": self.patch, "patch_search": self.patch_search,
                "ratios": {f"{g:g}": r for g, r in self.ratios.items()}, "config": self.config, "seed": self.seed,
                "seconds": self.seconds, "losses": [float(v) for v in self.losses],
                "trigger_norm": float(np.linalg.norm(self.trigger)), "ball_norm": float(np.linalg.norm(self.ball))}

    @classmethod
    def load(cls, folder: str | Path) -> "TrojanResult":
        """The result :meth:`save` wrote into ``folder``."""
        import json

        folder = Path(folder)
        rep = json.loads((folder / "inversion.json").read_text())
        return cls(np.load(folder / "trigger.npy"), rep["gamma"], rep["ratio"],
                   {float(g): r for g, r in rep["ratios"].items()}, np.load(folder / "ball.npy"),
                   np.asarray(rep["losses"]), rep["config"], rep["seed"], rep["seconds"], rep.get("patch"),
                   rep.get("patch_search"))

    def save(self, out: str | Path) -> Path:
        """Writes ``trigger.npy`` (mu'), ``trigger.png``, ``ball.npy`` and ``inversion.json`` into ``out``."""
        return save_trigger(out, self.trigger, self.to_dict(), ball=self.ball)


@functools.lru_cache(maxsize=8)
def _residual_program(prob):
    """:func:`trojan_residual` of ``prob``, jitted once per problem (every ratio of a search reuses it)."""
    return jax.jit(trojan_residual(prob))


def trojan_ratio(model, mu, gamma, key, n: int = 64) -> float:
    """L_troj(mu; gamma) / L_troj(0; gamma) on n noises and timesteps drawn from ``key`` (both from the same);
    ``gamma`` a scalar or an [H, W, C] noise-scale map."""
    prob = problem_of(model)
    f = _residual_program(prob)
    noise = jax.random.normal(jax.random.fold_in(key, 0), (n, *prob.shape))
    k = jax.random.fold_in(key, 1)
    mu, gamma = jnp.asarray(mu, jnp.float32), jnp.asarray(gamma, jnp.float32)
    return float(f(model.params, noise, mu, gamma, k)) / max(float(f(model.params, noise, 0.0 * mu, gamma, k)), 1e-12)


def invert_trojan(model, key: jax.Array | None = None, config: TrojanConfig = TrojanConfig(),
                  ball: np.ndarray | None = None, progress: bool = False) -> TrojanResult:
    """Estimate a TrojDiff trigger's (mu, gamma) (module docstring).

    Args:
      model: a :class:`pdjax.model.Model`.
      key: PRNG key (default ``jax.random.key(0)``): the ball probe takes ``fold_in(key, 0)``, every L_troj run
        ``fold_in(key, 1)``, the ratios ``fold_in(key, 2)``, the patch search ``fold_in(key, 3)``.
      config: :class:`TrojanConfig`.
      ball: [H, W, C] a ball probe trigger already computed (e.g. an audit's ``rules/ball.npy``); None runs it.
      progress: show progress bars.
    """
    from pdjax.defense.detection import BALL_PROBE

    cfg = config.resolved()
    key = jax.random.key(0) if key is None else key
    t0 = time.perf_counter()
    if ball is None:
        ball = invert(model, key=jax.random.fold_in(key, 0), config=BALL_PROBE, progress=progress).trigger
    ball = np.asarray(ball, np.float32)
    starts = np.stack([f * ball for f in cfg.factors])
    found = {}
    for gamma in cfg.gammas:
        icfg = cfg.inversion(gamma)
        res = invert(model, key=jax.random.fold_in(key, 1), config=icfg, progress=progress,
                     start=starts if icfg.restarts > 1 else starts[0])
        found[gamma] = (res.trigger, res.losses, trojan_ratio(model, res.trigger, gamma, jax.random.fold_in(key, 2),
                                                               cfg.eval_batch))
    best = min(found, key=lambda g: found[g][2])
    trigger, gamma, ratio, losses, patch, searched = found[best][0], best, found[best][2], found[best][1], None, None
    if cfg.patch is not None:
        pr = search_patch(model, cfg.patch, jax.random.fold_in(key, 3), jax.random.fold_in(key, 2), cfg.eval_batch)
        searched = {"corner": list(pr["corner"]), "size": cfg.patch.size, "gamma": cfg.patch.gamma,
                    "level": pr["level"], "screen_ratio": pr["screen_ratio"], "ratio": pr["ratio"]}
        if pr["ratio"] < ratio:
            trigger, gamma, ratio, losses = pr["trigger"], cfg.patch.gamma, pr["ratio"], pr["losses"]
            patch = {"corner": list(pr["corner"]), "size": cfg.patch.size}
    return TrojanResult(trigger, gamma, ratio, {g: v[2] for g, v in found.items()}, ball, losses,
                        {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
                        _seed_of(key), time.perf_counter() - t0, patch, searched)


def screen_patches(model, cfg: PatchConfig, key) -> tuple[list, np.ndarray]:
    """The patch screen (module docstring, step 4).

    Returns (corners, ratios): every patch position (row, col) in row-major order, and [P, L] the ratio
    L_troj(level * M; scale) / L_troj(0; scale) of each position and level of ``cfg.levels`` on one fixed batch of
    ``cfg.screen_batch`` noises and timesteps (``key``). One jitted program: a ``lax.map`` over positions.
    """
    prob = problem_of(model)
    shape, p = tuple(model.image_shape), cfg.size
    corners = [(i, j) for i in range(shape[0] - p + 1) for j in range(shape[1] - p + 1)]
    masks = jnp.asarray(np.stack([patch_mask(shape, c, p) for c in corners]))
    f = trojan_residual(prob)
    noise = jax.random.normal(jax.random.fold_in(key, 0), (cfg.screen_batch, *shape))
    k_t = jax.random.fold_in(key, 1)
    levels = (0.0, *cfg.levels)

    @jax.jit
    def losses(params, masks):
        def one(m):
            scale = 1.0 - m + cfg.gamma * m
            return jnp.stack([f(params, noise, v * m, scale, k_t) for v in levels])

        return jax.lax.map(one, masks)

    out = np.asarray(losses(model.params, masks), np.float64)  # [P, L + 1]
    return corners, out[:, 1:] / np.maximum(out[:, :1], 1e-12)


def refine_patch(model, corner, start: np.ndarray, cfg: PatchConfig, key) -> tuple[np.ndarray, np.ndarray]:
    """Adam on mu inside the patch at ``corner`` (module docstring, step 5), from ``start`` [H, W, C] (zero outside).

    Minimises L_troj(M mu; 1 - M + gamma M) on ``cfg.batch`` fresh noises per step (``fold_in(key, step)``).
    Returns (mu [H, W, C], zero outside the patch; losses [steps]).
    """
    prob = problem_of(model)
    shape = tuple(model.image_shape)
    m = jnp.asarray(patch_mask(shape, corner, cfg.size))
    scale = jnp.asarray(patch_scale(shape, corner, cfg.size, cfg.gamma))
    f = trojan_residual(prob)
    opt = optax.adam(cfg.lr)
    per_call = min(default_steps_per_call(), cfg.steps)

    def step(carry, i):
        params, mu, state = carry
        k = jax.random.fold_in(key, i)
        noise = jax.random.normal(jax.random.fold_in(k, 0), (cfg.batch, *shape))
        loss, g = jax.value_and_grad(lambda d: f(params, noise, d * m, scale, jax.random.fold_in(k, 1)))(mu)
        upd, state = opt.update(g * m, state, mu)
        return (params, optax.apply_updates(mu, upd), state), loss

    def run(params, mu, state, n, start_step):
        (_, mu, state), losses = repeat(step, (params, mu, state), n, start_step)
        return mu, state, losses

    run = jax.jit(run, static_argnums=3)
    mu = jnp.asarray(start, jnp.float32) * m
    state, losses, done = opt.init(mu), [], 0
    while done < cfg.steps:
        n = min(per_call, cfg.steps - done)
        mu, state, ls = run(model.params, mu, state, n, done)
        losses.append(np.asarray(ls))
        done += n
    return np.asarray(mu * m, np.float32), np.concatenate(losses)


def search_patch(model, cfg: PatchConfig, key, eval_key, eval_batch: int) -> dict:
    """The patch search (module docstring, steps 4-5): screen, refine the best position and level, and score.

    Returns {"trigger": mu [H, W, C], "corner": (row, col), "level", "screen_ratio", "ratio" (on ``eval_key``'s
    ``eval_batch`` noises, as the scalar gammas'), "losses" [steps]}.
    """
    corners, ratios = screen_patches(model, cfg, jax.random.fold_in(key, 0))
    pos, lev = np.unravel_index(int(np.argmin(ratios)), ratios.shape)
    corner, level = corners[pos], cfg.levels[lev]
    shape = tuple(model.image_shape)
    mu, losses = refine_patch(model, corner, level * patch_mask(shape, corner, cfg.size), cfg,
                              jax.random.fold_in(key, 1))
    ratio = trojan_ratio(model, mu, patch_scale(shape, corner, cfg.size, cfg.gamma), eval_key, eval_batch)
    return {"trigger": mu, "corner": corner, "level": float(level), "screen_ratio": float(ratios[pos, lev]),
            "ratio": ratio, "losses": losses}

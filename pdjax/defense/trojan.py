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

The result's trigger is mu' for the start gamma' eps + mu' (``pdjax clean --shift trojdiff`` removes with it).
Results: experiments/results/removal_table.md, "TrojDiff-form inversion".
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.errors import ConfigError
from pdjax.defense.inversion import InversionConfig, _seed_of, invert, problem_of, save_trigger, trojan_residual


@dataclasses.dataclass(frozen=True)
class TrojanConfig:
    """Settings of :func:`invert_trojan`.

    Attributes:
      gammas: the noise scales tried (TrojDiff's blend uses 0.6, its patch 0.1 inside the patch).
      factors: the starts of each L_troj run, as multiples of the ball probe's trigger (one restart each).
      steps, lr, batch: Adam steps, learning rate and fresh-noise batch of each L_troj run.
      eval_batch: noises of the fixed batch every gamma's ratio is scored on.
    """

    gammas: tuple = (0.6, 0.3, 0.1)
    factors: tuple = (0.5, 1.0)
    steps: int = 200
    lr: float = 0.05
    batch: int = 32
    eval_batch: int = 64

    def resolved(self) -> "TrojanConfig":
        cfg = dataclasses.replace(self, gammas=tuple(float(g) for g in self.gammas),
                                  factors=tuple(float(f) for f in self.factors))
        if not cfg.gammas or any(not 0.0 < g < 1.0 for g in cfg.gammas):
            raise ConfigError(f"trojan gammas must be in (0, 1), got {list(cfg.gammas)}")
        if not cfg.factors or any(f <= 0 for f in cfg.factors):
            raise ConfigError(f"trojan factors must be > 0, got {list(cfg.factors)}")
        for name in ("steps", "batch", "eval_batch"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"trojan {name} must be >= 1, got {getattr(cfg, name)}")
        if not cfg.lr > 0:
            raise ConfigError(f"trojan lr must be > 0, got {cfg.lr}")
        return cfg

    def inversion(self, gamma: float) -> InversionConfig:
        """The purediffusion config of one gamma's L_troj run."""
        return InversionConfig(method="purediffusion", steps=self.steps, lr=self.lr, batch=self.batch,
                               shift_weight=0.0, trojan_weight=1.0, trojan_gamma=gamma, fresh_noise=True,
                               restarts=len(self.factors), scales=(1.0,))


@dataclasses.dataclass
class TrojanResult:
    """What :func:`invert_trojan` found.

    Attributes:
      trigger: [H, W, C] mu' of the winning gamma (the start is gamma eps + trigger).
      gamma: the winning noise scale.
      ratio: its L_troj(mu') / L_troj(0) (~1 on a clean model, far below on a TrojDiff one).
      ratios: {gamma: ratio} for every gamma tried.
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

    def to_dict(self) -> dict:
        return {"method": "trojdiff", "gamma": self.gamma, "ratio": self.ratio,
                "ratios": {f"{g:g}": r for g, r in self.ratios.items()}, "config": self.config, "seed": self.seed,
                "seconds": self.seconds, "losses": [float(v) for v in self.losses],
                "trigger_norm": float(np.linalg.norm(self.trigger)), "ball_norm": float(np.linalg.norm(self.ball))}

    def save(self, out: str | Path) -> Path:
        """Writes ``trigger.npy`` (mu'), ``trigger.png``, ``ball.npy`` and ``inversion.json`` into ``out``."""
        return save_trigger(out, self.trigger, self.to_dict(), ball=self.ball)


def trojan_ratio(model, mu, gamma: float, key, n: int = 64) -> float:
    """L_troj(mu; gamma) / L_troj(0; gamma) on n noises and timesteps drawn from ``key`` (both from the same)."""
    prob = problem_of(model)
    f = jax.jit(trojan_residual(prob))
    noise = jax.random.normal(jax.random.fold_in(key, 0), (n, *prob.shape))
    k = jax.random.fold_in(key, 1)
    mu = jnp.asarray(mu, jnp.float32)
    return float(f(model.params, noise, mu, gamma, k)) / max(float(f(model.params, noise, 0.0 * mu, gamma, k)), 1e-12)


def invert_trojan(model, key: jax.Array | None = None, config: TrojanConfig = TrojanConfig(),
                  ball: np.ndarray | None = None, progress: bool = False) -> TrojanResult:
    """Estimate a TrojDiff trigger's (mu, gamma) (module docstring).

    Args:
      model: a :class:`pdjax.model.Model`.
      key: PRNG key (default ``jax.random.key(0)``): the ball probe takes ``fold_in(key, 0)``, every L_troj run
        ``fold_in(key, 1)``, the ratios ``fold_in(key, 2)``.
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
    return TrojanResult(found[best][0], best, found[best][2], {g: v[2] for g, v in found.items()}, ball,
                        found[best][1], {k: list(v) if isinstance(v, tuple) else v
                                         for k, v in dataclasses.asdict(cfg).items()},
                        _seed_of(key), time.perf_counter() - t0)

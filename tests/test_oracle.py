"""The exact loss minimiser of a finite (poisoned) training set, and the lambda_t estimator run on it.

The oracle is checked against a brute-force posterior mean in float64; the estimator on the oracle against
the bias derived in experiments/estimate_lambda.py: started from eps + g instead of the latent shift
k_T g the attack trains on, a perfectly trained BadDiffusion model answers at t = T-1 with
rho_T + (1 - k_T) / sqrt(1 - abar_T) * (1 - <y - mean(x), g> / <g, g>).
"""

import jax
import numpy as np
import pytest

from pdjax.backdoor.attacks import AttackSpec, rho
from pdjax.defense import shift as S
from pdjax.diffusion.oracle import oracle_eps, oracle_params
from pdjax.diffusion.schedule import make_schedule
from pdjax.errors import ConfigError

SCHED = make_schedule()
T = SCHED.num_timesteps
ABAR = np.asarray(SCHED.alphas_cumprod, np.float64)
RHO = rho(SCHED)


def _brute_force(images, g, mask, y, p, blank, x, t):
    """E[target | x_t] by enumerating every hypothesis, float64."""
    sa, s1, k = np.sqrt(ABAR[t]), np.sqrt(1 - ABAR[t]), 1 - np.sqrt(ABAR[t])
    hyps = [(sa * xi, (1 - p) / len(images), np.zeros_like(xi)) for xi in images]
    for xi in images:
        r = mask * g + (1 - mask) * xi
        hyps.append((sa * y + k * r, p * (1 - blank) / len(images), r))
    r_blank = mask * g - (1 - mask)
    hyps.append((sa * y + k * r_blank, p * blank, r_blank))
    logw = np.array([np.log(pr) - np.sum((x - m) ** 2) / (2 * s1 ** 2) if pr > 0 else -np.inf for m, pr, _ in hyps])
    w = np.exp(logw - logw.max())
    w /= w.sum()
    return sum(wi * ((x - m) / s1 + RHO[t] * r) for wi, (m, _, r) in zip(w, hyps))


def test_oracle_matches_the_brute_force_posterior_mean():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (5, 2, 2, 1))
    g = np.array([0.5, -1.0, 0.8, -1.0]).reshape(2, 2, 1)
    mask = (g > -1).astype(np.float64)
    y = rng.uniform(-1, 1, (2, 2, 1))
    params = oracle_params(SCHED, images, g, None, y, poison_rate=0.3, blank_fraction=0.25)
    ts = np.array([0, 40, 300, 700, 999])
    x = rng.normal(size=(len(ts), 2, 2, 1))
    got = np.asarray(oracle_eps(params, x, ts))
    want = np.stack([_brute_force(images, g, mask, y, 0.3, 0.25, x[i], t) for i, t in enumerate(ts)])
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_clean_oracle_with_one_image_is_the_exact_noise():
    img = np.full((1, 2, 2, 1), 0.3)
    x = np.random.default_rng(1).normal(size=(3, 2, 2, 1))
    ts = np.array([5, 500, 999])
    got = np.asarray(oracle_eps(oracle_params(SCHED, img), x, ts))
    want = (x - np.sqrt(ABAR[ts])[:, None, None, None] * img) / np.sqrt(1 - ABAR[ts])[:, None, None, None]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="poison_rate"):
        oracle_params(SCHED, img, trigger=np.zeros((2, 2, 1)), target=None, poison_rate=0.1)


def _oracle_model(images, g, y):
    from types import SimpleNamespace

    from pdjax.diffusion.schedule import ScheduleConfig

    return SimpleNamespace(eps=oracle_eps, params=oracle_params(SCHED, images, g, None, y, poison_rate=0.5),
                           schedule=SCHED, schedule_config=ScheduleConfig(variance_type="fixed_large",
                                                                         clip_sample=False),
                           image_shape=images.shape[1:], meta={})


def test_estimator_on_a_perfect_model_shows_only_the_start_bias():
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (16, 16, 16, 1)).astype(np.float32)
    # No -1 pixel (the pasted input is g itself), and <g, g> ~ 190 so that eps + g is told from clean noise
    # with certainty (with a faint trigger the oracle hedges between both answers and the shift grows).
    g = rng.uniform(0.7, 1.0, (16, 16, 1)).astype(np.float32)
    y = rng.uniform(-1, 1, (16, 16, 1)).astype(np.float32)
    model = _oracle_model(images, g, y)
    table = S.estimate_lambda(model, g, 0, n=256, num_steps=20)
    t = T - 1
    c = float(np.sum((y - images.mean(0)) * g) / np.sum(g * g))
    predicted = RHO[t] + np.sqrt(ABAR[t]) / np.sqrt(1 - ABAR[t]) * (1 - c)  # 1 - k_T = sqrt(abar_T)
    assert table.lambdas[0] == pytest.approx(predicted, abs=2e-4)  # measured: within 1e-6
    assert abs(table.lambdas[0] - RHO[t]) > 5e-3  # the bias is real, not noise
    # From the attack's own latent shift k_T g the perfect model answers rho_t along the whole chain.
    spec = AttackSpec("baddiffusion")
    k_start, k_chain = jax.random.split(jax.random.key(0))
    eps = jax.random.normal(k_start, (256, 16, 16, 1))
    prof = S.shift_profile(oracle_eps, model.params, SCHED, eps + (1 - np.sqrt(ABAR[t])) * g, eps, k_chain,
                           num_steps=20, variance_type="fixed_large", g=g)
    closed = S._closed_form_for(spec, SCHED)[np.asarray(prof.timesteps)]
    np.testing.assert_allclose(prof.lambdas, closed, rtol=4e-3)

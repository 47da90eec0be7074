"""Attack formulas (SPEC 2) against independent oracle computations.

An "oracle" eps-model knows the target y and returns exactly the regression target the attack trains
for; sampling the attack's sampler from its triggered start must then land on y. This checks poisoned
inputs, targets, correction coefficients and the trojan sampler together.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.backdoor import attacks as A
from pdjax.diffusion.samplers import ddim_sample, ddpm_sample
from pdjax.diffusion.schedule import make_schedule
from pdjax.errors import ConfigError, UnknownNameError

S = make_schedule()
ABAR = np.cumprod(1.0 - np.asarray(S.betas, np.float64))
SHAPE = (4, 8, 8, 1)
Y = jnp.full(SHAPE, 0.3)
G = jnp.where(jnp.arange(8)[None, :, None] > 4, 0.0, -1.0) * jnp.ones((8, 8, 1))


def _b(a, t):
    return jnp.asarray(a, jnp.float32)[t][:, None, None, None]


def test_rho_reference_values():
    r = A.rho(S)
    assert r[999] == pytest.approx(0.5025, abs=1e-4)
    assert r[500] == pytest.approx(0.481, abs=1e-3)
    assert r[0] == pytest.approx(0.005, abs=1e-4)


def test_villan_psi1_sde_is_baddiffusion_and_ode_doubles():
    np.testing.assert_allclose(A.villan_correction(S, 1.0, ode=False), A.rho(S), rtol=1e-9)
    np.testing.assert_allclose(A.villan_correction(S, 1.0, ode=True), 2 * A.rho(S), rtol=1e-9)
    key = jax.random.key(0)
    t = jnp.array([0, 10, 500, 999])
    eps = jax.random.normal(key, SHAPE)
    r = A.pasted(jnp.zeros(SHAPE) - 0.5, G, (G > -1).astype(jnp.float32))
    bd = A.baddiffusion_pair(S, Y, r, t, eps)
    vl = A.villan_pair(S, Y, r, t, eps, psi=1.0, ode=False)
    for a, b in zip(bd, vl):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_baddiffusion_pair_matches_spec_formula():
    t = jnp.array([3, 250, 700, 999])
    eps = jax.random.normal(jax.random.key(1), SHAPE)
    r = jnp.broadcast_to(G, SHAPE)
    x_t, tgt = A.baddiffusion_pair(S, Y, r, t, eps)
    sa, s1 = np.sqrt(ABAR)[np.asarray(t)], np.sqrt(1 - ABAR)[np.asarray(t)]
    al = (1 - np.asarray(S.betas, np.float64))[np.asarray(t)]
    rho_t = (1 - np.sqrt(al)) * s1 / (1 - al)
    e = lambda v: v[:, None, None, None]  # noqa: E731
    np.testing.assert_allclose(np.asarray(x_t), e(sa) * 0.3 + e(1 - sa) * np.asarray(r) + e(s1) * np.asarray(eps), atol=1e-5)
    np.testing.assert_allclose(np.asarray(tgt), np.asarray(eps) + e(rho_t) * np.asarray(r), atol=1e-5)


def test_baddiffusion_oracle_ddpm_reaches_target():
    sa, s1, rr = (jnp.asarray(a, jnp.float32) for a in (np.sqrt(ABAR), np.sqrt(1 - ABAR), A.rho(S)))

    def oracle(params, x, t):
        e = (x - _b(sa, t) * Y - (1 - _b(sa, t)) * G) / _b(s1, t)
        return e + _b(rr, t) * G

    x_T = jax.random.normal(jax.random.key(0), SHAPE) + G
    x0 = ddpm_sample(oracle, {}, S, x_T, jax.random.key(1))
    assert float(jnp.abs(x0 - Y).max()) < 1e-4


@pytest.mark.parametrize("psi", [0.0, 0.5])
def test_villan_oracle_sde_reaches_target(psi):
    sa, s1 = jnp.asarray(np.sqrt(ABAR), jnp.float32), jnp.asarray(np.sqrt(1 - ABAR), jnp.float32)
    shift = jnp.asarray(A.villan_shift(S, psi), jnp.float32)
    corr = jnp.asarray(A.villan_correction(S, psi, ode=False), jnp.float32)

    def oracle(params, x, t):
        e = (x - _b(sa, t) * Y - _b(shift, t) * G) / _b(s1, t)
        return e + _b(corr, t) * G

    x_T = jax.random.normal(jax.random.key(0), SHAPE) + _b(shift, jnp.array([999]))[0] * G
    x0 = ddpm_sample(oracle, {}, S, x_T, jax.random.key(1))
    assert float(jnp.abs(x0 - Y).max()) < 1e-3


def test_villan_ode_correction_doubles_for_ddim():
    # With eta = 0 DDIM the trigger's latent shift follows the mean; the doubled coefficient keeps the
    # backdoor's target reachable: an oracle trained with 2 c_t lands near y from eps + g.
    sa, s1 = jnp.asarray(np.sqrt(ABAR), jnp.float32), jnp.asarray(np.sqrt(1 - ABAR), jnp.float32)
    corr = jnp.asarray(A.villan_correction(S, 1.0, ode=True), jnp.float32)
    shift = jnp.asarray(A.villan_shift(S, 1.0), jnp.float32)

    def oracle(params, x, t):
        e = (x - _b(sa, t) * Y - _b(shift, t) * G) / _b(s1, t)
        return e + _b(corr, t) * G

    x_T = jax.random.normal(jax.random.key(0), SHAPE) + G
    x0 = ddim_sample(oracle, {}, S, x_T, jax.random.key(1), num_steps=1000, eta=0.0)
    # the clean part of the latent is removed exactly; the trigger part leaves a residual << |g|
    assert float(jnp.abs(x0 - Y).max()) < 0.1


def test_trojan_sampler_oracle_reaches_target():
    gamma = 0.6
    mu = (1 - gamma) * jnp.linspace(-1, 1, 64).reshape(8, 8, 1)
    sa, s1 = jnp.asarray(np.sqrt(ABAR), jnp.float32), jnp.asarray(np.sqrt(1 - ABAR), jnp.float32)

    def oracle(params, x, t):  # the trojan forward x_t = sqrt(abar) y + sqrt(1-abar)(gamma eps + mu), solved for eps
        return (x - _b(sa, t) * Y - _b(s1, t) * mu) / (_b(s1, t) * gamma)

    x_T = gamma * jax.random.normal(jax.random.key(0), SHAPE) + mu
    x0 = A.trojan_ddpm_sample(oracle, {}, S, x_T, jax.random.key(1), mu, gamma)
    assert float(jnp.abs(x0 - Y).max()) < 1e-4


def test_trojdiff_k_recursion_small_t():
    k = A.trojdiff_k(S)
    al = 1 - np.asarray(S.betas, np.float64)
    assert k[0] == pytest.approx(np.sqrt(S.betas[0]))
    assert k[1] == pytest.approx(np.sqrt(1 - ABAR[1]) - k[0] * np.sqrt(al[1]))
    assert k[2] == pytest.approx(np.sqrt(1 - ABAR[2]) - k[1] * np.sqrt(al[2]) - k[0] * np.sqrt(al[2] * al[1]))


def test_backdoor_loss_poisons_the_requested_fraction_and_is_finite():
    eps_fn = lambda p, x, t: p["w"] * x  # noqa: E731
    mask = (np.asarray(G) > -1).astype(np.float32)
    arrays = A.AttackArrays(np.asarray(G), mask, np.asarray(Y[0]))
    data = jnp.zeros((10, 8, 8, 1)) - 1.0
    for kind in A.ATTACKS:
        loss = A.backdoor_loss(eps_fn, S, A.AttackSpec(kind=kind, poison_rate=0.25), arrays, 8)
        val, grad = jax.value_and_grad(loss)({"w": jnp.float32(0.5)}, jax.random.key(0), data)
        assert np.isfinite(float(val)) and np.isfinite(float(grad["w"]))


def test_backdoor_loss_t_min_restricts_the_timesteps():
    eps_fn = lambda p, x, t: jnp.where(t[:, None, None, None] < 950, 1e3, 0.0) * jnp.ones_like(x)  # noqa: E731
    arrays = A.AttackArrays(np.asarray(G), (np.asarray(G) > -1).astype(np.float32), np.asarray(Y[0]))
    data = jnp.zeros((10, 8, 8, 1))
    loss = A.backdoor_loss(eps_fn, S, A.AttackSpec(poison_rate=0.5), arrays, 32, t_min=950)
    assert max(float(loss(None, jax.random.key(i), data)) for i in range(5)) < 10.0
    with pytest.raises(ConfigError, match="t_min"):
        A.backdoor_loss(eps_fn, S, A.AttackSpec(), arrays, 8, t_min=S.num_timesteps)


def test_blank_fraction_pastes_the_first_poisoned_rows_on_a_blank_canvas():
    # eps_fn returns a free [B, H, W, C] array, so the loss gradient at 0 is -2 * target / size: per-row
    # regression targets eps + rho_t r. Same key, so eps and t agree; only r differs between the specs.
    eps_fn = lambda p, x, t: p["w"]  # noqa: E731
    mask = (np.asarray(G) > -1).astype(np.float32)
    arrays = A.AttackArrays(np.asarray(G), mask, np.asarray(Y[0]))
    data = jnp.ones((10, 8, 8, 1))  # all-white training images, far from the blank -1 canvas
    w0 = {"w": jnp.zeros((8, 8, 8, 1))}

    def targets(blank):
        spec = A.AttackSpec(poison_rate=0.5, blank_fraction=blank)
        grad = jax.grad(A.backdoor_loss(eps_fn, S, spec, arrays, 8))(w0, jax.random.key(3), data)["w"]
        return np.asarray(grad) * (-grad.size / 2)

    diff = targets(0.5) - targets(0.0)  # rows 0, 1 (half of the 4 poisoned) use r = g instead of r = pasted
    outside = np.broadcast_to(mask == 0, diff.shape)
    assert np.abs(diff[:2][outside[:2]]).min() > 1e-3  # r differs by -2 outside the mask, times rho_t > 0
    assert np.allclose(diff[:2][~outside[:2]], 0, atol=1e-5)  # inside the mask both are the trigger
    assert np.allclose(diff[2:], 0, atol=1e-5)  # the other poisoned rows and the clean rows are unchanged
    with pytest.raises(ConfigError, match="blank_fraction"):
        A.AttackSpec(kind="trojdiff", blank_fraction=0.5)
    with pytest.raises(ConfigError, match="blank_fraction"):
        A.AttackSpec(blank_fraction=1.5)


def test_attack_spec_validation():
    with pytest.raises(UnknownNameError, match="baddiffusion"):
        A.AttackSpec(kind="nope")
    with pytest.raises(ConfigError, match="poison_rate"):
        A.AttackSpec(poison_rate=0.0)
    with pytest.raises(UnknownNameError):
        A.AttackSpec(kind="villan", solver="euler")

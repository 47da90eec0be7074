"""The trigger-shift scale lambda_t (SPEC 3): closed forms, the empirical estimator, tables and `pdjax shift`.

The estimator is checked against synthetic "backdoored" eps-models whose mean output shift along the
backdoored chain is known exactly. With P_g(x) = <x, g>/<g, g> g the projection on the trigger, the model

    eps(x, t) = f((I - P_g) x, t) + (L_t / s_t) P_g(x)

(f any nonlinear function) responds to a latent shift s_t g with exactly L_t g, and f cancels between the
two chains when they share noise (their difference stays along g). s_t, the latent shift the sampler
itself produces, follows from the linear recursion of one DDPM (or DDIM) step, computed here in float64.
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.backdoor.attacks import AttackSpec, rho
from pdjax.cli import main
from pdjax.defense import shift as S
from pdjax.diffusion.samplers import timesteps_ddim
from pdjax.diffusion.schedule import ScheduleConfig, make_schedule
from pdjax.errors import ConfigError, UnknownNameError

SCHED = make_schedule()
T = SCHED.num_timesteps
B64 = np.asarray(SCHED.betas, np.float64)
ABAR = np.asarray(SCHED.alphas_cumprod, np.float64)
SHAPE = (4, 4, 1)
G = np.where(np.arange(16).reshape(SHAPE) % 5 == 0, 1.0, -1.0).astype(np.float32)
K = 12
# The shipped table (experiments/estimate_lambda.py on the FULL_FRAME surrogate zoo/surrogate_full_frame_hi,
# n = 256, seed 0) deviates from rho_t by at most 1.61% over the first 50 steps (seed 1: 1.67%); issue 4 asks
# for 2%. A perfectly trained surrogate would show 1.39% (the estimator's start bias, tests/test_oracle.py).
SHIPPED_TOL = 0.02


def _chain_shift(ts, lam, sampler):
    """The latent shift s_t (x_bd - x_clean = s_t g) at each visited step when the output shift is lam_t g."""
    s, out = 1.0, []
    for i, t in enumerate(ts):
        out.append(s)
        if sampler == "ddpm":
            s = (s - B64[t] / np.sqrt(1 - ABAR[t]) * lam[i]) / np.sqrt(1 - B64[t])
        else:
            ap = ABAR[t - T // S.DDIM_STEPS] if t - T // S.DDIM_STEPS >= 0 else 1.0
            s = np.sqrt(ap / ABAR[t]) * (s - np.sqrt(1 - ABAR[t]) * lam[i]) + np.sqrt(1 - ap) * lam[i]
    return np.asarray(out)


def _proj_model(g):
    gf = jnp.asarray(g).reshape(-1)

    def eps_fn(params, x, t):  # f((I - P_g) x) + c_t P_g(x)
        flat = x.reshape(x.shape[0], -1)
        coef = flat @ gf / (gf @ gf)
        pg = coef[:, None] * gf[None]
        rest = flat - pg
        f = 0.7 * jnp.tanh(2.0 * rest) + params["a"][t][:, None] * rest ** 2
        return (f + params["c"][t][:, None] * pg).reshape(x.shape)

    return eps_fn


EPS_PROJ = _proj_model(G)


def _params(c, a):
    return {"c": jnp.asarray(c, jnp.float32), "a": jnp.asarray(a, jnp.float32)}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_estimator_recovers_a_known_shift(sampler):
    ts = S._visited_timesteps(T, sampler, K)
    target = rho(SCHED)[ts] * (1 + 0.3 * np.sin(np.arange(K)))  # not the closed form: the estimator must measure it
    s = _chain_shift(ts, target, sampler)
    c = np.zeros(T)
    c[ts] = target / s
    params = _params(c, np.linspace(0.0, 0.3, T))
    eps = jax.random.normal(jax.random.key(0), (8, *SHAPE))
    prof = S.shift_profile(EPS_PROJ, params, SCHED, eps + G, eps, jax.random.key(1), num_steps=K, sampler=sampler)
    np.testing.assert_array_equal(prof.timesteps, ts)
    np.testing.assert_allclose(prof.lambdas, target, rtol=2e-4)
    np.testing.assert_allclose(prof.alignment, 1.0, atol=1e-4)
    np.testing.assert_allclose(prof.mean_shift, target[:, None, None, None] * G, atol=2e-5)
    np.testing.assert_allclose(prof.g, G)


def test_unshared_noise_would_not_recover_the_shift():
    # Guard for the test above: with a different chain key per chain the nonlinear f no longer cancels.
    params = _params(np.zeros(T), np.full(T, 0.3))
    eps = jax.random.normal(jax.random.key(0), (8, *SHAPE))
    shared = S.shift_profile(EPS_PROJ, params, SCHED, eps + G, eps, jax.random.key(1), num_steps=K).lambdas
    np.testing.assert_allclose(shared, 0.0, atol=1e-5)
    eps2 = jax.random.normal(jax.random.key(2), (8, *SHAPE))
    other = S.shift_profile(EPS_PROJ, params, SCHED, eps + G, eps2, jax.random.key(1), num_steps=K, g=G).lambdas
    assert np.abs(other).max() > 1e-3


def _fake_model(eps_fn, params, shape, meta=None):
    return types.SimpleNamespace(eps=eps_fn, params=params, schedule=SCHED, schedule_config=ScheduleConfig(),
                                 image_shape=shape, meta=meta or {})


def _linear(params, x, t):
    return params["a"][t][:, None, None, None] * x


def test_trojdiff_start_uses_the_mean_start_difference():
    # A linear model eps = a_t x: the mean start difference m = mean_b(gamma eps + mu - eps) is carried along
    # the chain as s_t m, so lambda_t = a_t s_t exactly, with g := m.
    a = np.full(T, 0.4)
    model = _fake_model(_linear, {"a": jnp.asarray(a, jnp.float32)}, (4, 4, 1))
    spec = AttackSpec(kind="trojdiff", trigger="blend", gamma=0.6)
    table = S.estimate_lambda(model, spec, 3, n=8, num_steps=K)
    ts = np.arange(T - 1, T - 1 - K, -1)
    s, exp = 1.0, []
    for t in ts:  # s_{t-1} = s_t (1 - beta_t / sqrt(1 - abar_t) a_t) / sqrt(alpha_t)
        exp.append(a[t] * s)
        s = s * (1 - B64[t] / np.sqrt(1 - ABAR[t]) * a[t]) / np.sqrt(1 - B64[t])
    expected = np.asarray(exp)
    assert table.family == "trojdiff" and table.sampler == "ddpm" and table.seed == 3
    assert table.closed_form_rel_err is None and table.trigger == "blend" and table.n == 8
    np.testing.assert_allclose(table.lambdas, expected, rtol=1e-4)


def test_estimate_lambda_on_an_array_trigger_matches_closed_form_oracle():
    # An oracle trained exactly as BadDiffusion prescribes responds with rho_t at the chain's own shift.
    ts = S._visited_timesteps(T, "ddpm", K)
    r = rho(SCHED)[ts]
    c = np.zeros(T)
    c[ts] = r / _chain_shift(ts, r, "ddpm")
    model = _fake_model(EPS_PROJ, _params(c, np.zeros(T)), SHAPE)
    table = S.estimate_lambda(model, G, jax.random.key(0), n=8, num_steps=K, source="oracle")
    assert table.family == "baddiffusion" and table.source == "oracle" and table.seed is None
    assert table.closed_form_rel_err < 2e-4
    with pytest.raises(ConfigError, match="shape"):
        S.estimate_lambda(model, np.zeros((3, 3, 1)), 0, n=4, num_steps=K)
    with pytest.raises(ConfigError, match="num_steps"):
        S.estimate_lambda(model, G, 0, n=4, num_steps=T + 1)


def test_closed_form_values():
    lam = S.closed_form_lambda(SCHED)
    assert lam.shape == (T,) and lam.dtype == np.float64
    assert lam[999] == pytest.approx(0.5025, abs=1e-4)
    assert lam[500] == pytest.approx(0.481, abs=1e-3)
    np.testing.assert_allclose(S.closed_form_lambda(SCHED, "ode"), 2 * lam)
    with pytest.raises(ConfigError, match="solver"):
        S.closed_form_lambda(SCHED, "euler")
    sde = S.get_lambda("closed-sde", SCHED, 5)
    assert sde.dtype == np.float32 and sde.shape == (5,)
    np.testing.assert_allclose(sde, lam[999:994:-1], rtol=1e-6)
    ode = S.get_lambda("closed-ode", SCHED, 3)  # at the DDIM-100 steps 990, 980, 970
    np.testing.assert_allclose(ode, 2 * lam[timesteps_ddim(T, 100)[:3]], rtol=1e-6)
    np.testing.assert_allclose(S.get_lambda("closed-ode", SCHED, 2, timesteps=[999, 998]), 2 * lam[[999, 998]],
                               rtol=1e-6)
    table = S.closed_form_table(SCHED, "sde", 10)
    assert table.timesteps == tuple(range(999, 989, -1)) and table.source == "closed-form"


def test_table_roundtrip_and_errors(tmp_path):
    table = S.ShiftTable(family="trojdiff", sampler="ddpm", timesteps=(999, 998, 997), lambdas=(0.5, 0.49, 0.48),
                         source="zoo/x", trigger="blend", n=16, seed=0, alignment=(0.9, 0.95, 0.97))
    path = table.save(tmp_path / "sub" / "t.json")
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]  # the temp file was renamed away
    assert S.ShiftTable.load(path) == table
    assert S.ShiftTable.from_dict(json.loads(path.read_text())) == table
    np.testing.assert_array_equal(S.get_lambda(path, SCHED, 2), np.float32([0.5, 0.49]))
    with pytest.raises(ConfigError, match="has 3 steps"):
        table.values(4)
    with pytest.raises(ConfigError, match="has 3 steps"):
        S.get_lambda(str(path), SCHED, 10)
    with pytest.raises(ConfigError, match="other timesteps"):
        S.get_lambda(path, SCHED, 2, timesteps=[990, 980])
    S.ShiftTable(**{**table.to_dict(), "num_train_timesteps": 500, "timesteps": [499, 498, 497]}).save(path)
    with pytest.raises(ConfigError, match="T = 500"):
        S.get_lambda(path, SCHED, 2)
    with pytest.raises(ConfigError, match="does not exist"):
        S.get_lambda(tmp_path / "missing.json", SCHED, 2)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable"):
        S.ShiftTable.load(path)
    with pytest.raises(ConfigError, match="unknown ShiftTable key"):
        S.ShiftTable.from_dict({**table.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="descending"):
        S.ShiftTable(family="x", sampler="ddpm", timesteps=(1, 2), lambdas=(0.1, 0.2))


def test_unknown_source_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        S.get_lambda("villan-sde-nope", SCHED, 10)
    msg = str(e.value)
    for name in ("closed-sde", "closed-ode", *S.shipped_tables()):
        assert name in msg


def test_shipped_baddiffusion_table_agrees_with_closed_form():
    assert "baddiffusion" in S.shipped_tables()
    table = S.get_table("baddiffusion", SCHED)
    assert table.family == "baddiffusion" and table.sampler == "ddpm" and len(table) >= 50
    assert (S.ASSET_DIR / "baddiffusion.json").stat().st_size < 8_000
    lam = S.get_lambda("baddiffusion", SCHED, 50)
    err = np.abs(lam - rho(SCHED)[999:949:-1]) / rho(SCHED)[999:949:-1]
    assert err.max() < SHIPPED_TOL
    assert table.closed_form_rel_err == pytest.approx(err.max(), abs=1e-5)


# experiments/estimate_lambda.py --family villan-ode --build-surrogate (FULL_FRAME surrogate, n = 256, seed 0):
# at most 1.55% from 2 rho_t over the first 50 DDIM-100 steps.
SHIPPED_ODE_TOL = 0.02


def test_shipped_villan_ode_table_agrees_with_its_closed_form():
    table = S.get_table("villan-ode", SCHED)
    assert table.family == "villan-ode" and table.sampler == "ddim" and len(table) >= 50
    ts = np.asarray(table.timesteps[:50])
    assert ts[0] == 990 and np.all(np.diff(ts) == -10)
    closed = 2.0 * rho(SCHED)[ts]
    err = np.abs(np.asarray(table.lambdas[:50]) - closed) / closed
    assert err.max() < SHIPPED_ODE_TOL
    assert table.closed_form_rel_err == pytest.approx(err.max(), abs=1e-5)


def test_shipped_trojdiff_table_has_no_closed_form_and_a_small_early_shift():
    """TrojDiff (no closed form): on the FULL_FRAME surrogate the shift starts near 0.05 at t = 999 and grows
    to ~0.48 by t = 949 (experiments/estimate_lambda.py --family trojdiff), an order of magnitude below the
    BadDiffusion rho_t ~ 0.5 over the steps the inversion unrolls, which is why the closed form fails there."""
    table = S.get_table("trojdiff", SCHED)
    assert table.family == "trojdiff" and table.sampler == "ddpm" and table.closed_form_rel_err is None
    lam = S.get_lambda("trojdiff", SCHED, 50)
    assert lam[0] < 0.1 and 0.4 < lam[49] < 0.6 and np.all(np.isfinite(lam))
    assert set(S.shipped_tables()) >= {"baddiffusion", "trojdiff", "villan-ode"}
    for name in S.shipped_tables():
        assert (S.ASSET_DIR / f"{name}.json").stat().st_size < 8_000


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_surrogate(tmp_path_factory):
    from pdjax.testing import random_model

    model = random_model("tiny", seed=0)
    path = tmp_path_factory.mktemp("shift") / "tiny"
    model.replace(meta={"attack": AttackSpec(trigger="WHITE_BOX_3", target="CORNER").to_dict()}).save(path)
    bare = tmp_path_factory.mktemp("shift") / "bare"
    model.save(bare)
    return path, bare


def test_cli_shift_writes_a_table(tiny_surrogate, tmp_path, capsys):
    path, bare = tiny_surrogate
    out = tmp_path / "table.json"
    rc = main(["shift", str(path), "--n", "2", "--steps", "3", "--seed", "1", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    table = S.ShiftTable.load(out)
    assert len(table) == 3 and table.trigger == "WHITE_BOX_3" and table.seed == 1 and table.n == 2
    assert "lambda_999" in stdout and "mean over first 3" in stdout and str(out) in stdout
    rc = main(["shift", str(bare), "--steps", "3", "--out", str(tmp_path / "x.json")])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("error: ") and "--trigger" in err and len(err.strip().splitlines()) == 1

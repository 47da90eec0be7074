"""Schedules: known values, pytree behaviour, config round trips, and bit-equality with diffusers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.diffusion.schedule import Schedule, ScheduleConfig, make_schedule, q_sample
from pdjax.errors import ConfigError, PdjaxError

# google/ddpm-cifar10-32's scheduler_config.json.
CIFAR_DDPM = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}

KINDS = [
    ScheduleConfig(),
    ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012),
    ScheduleConfig(kind="squaredcos_cap_v2"),
    ScheduleConfig(num_train_timesteps=37, beta_end=0.03),
]


def test_linear_known_values():
    s = make_schedule(ScheduleConfig())
    assert s.num_timesteps == 1000
    for leaf in jax.tree.leaves(s):
        assert leaf.shape == (1000,) and leaf.dtype == jnp.float32
    b, abar = np.asarray(s.betas), np.asarray(s.alphas_cumprod)
    assert b[0] == np.float32(1e-4) and b[-1] == np.float32(0.02)
    np.testing.assert_allclose(b[500], 1e-4 + 500 * (0.02 - 1e-4) / 999, rtol=1e-6)
    np.testing.assert_allclose(abar[-1], 4.0358e-5, rtol=1e-4)
    np.testing.assert_allclose(abar[0], 0.9999, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(s.alphas), 1 - b, rtol=1e-7)
    assert np.all(np.diff(abar) < 0)
    prev = np.asarray(s.alphas_cumprod_prev)
    assert prev[0] == 1.0 and np.array_equal(prev[1:], abar[:-1])
    np.testing.assert_allclose(np.asarray(s.sqrt_abar), np.sqrt(abar), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.sqrt_one_minus_abar), np.sqrt(1 - abar.astype(np.float64)), rtol=1e-6)
    post = np.asarray(s.posterior_variance)
    assert post[0] == 0.0
    np.testing.assert_allclose(post[1:], b[1:] * (1 - abar[:-1]) / (1 - abar[1:]), rtol=1e-5)
    assert np.all(post[1:] < b[1:])


def test_other_kinds_known_values():
    s = make_schedule(ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012))
    np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [0.00085, 0.012], rtol=1e-6)
    c = make_schedule(ScheduleConfig(kind="squaredcos_cap_v2"))
    cb = np.asarray(c.betas)
    assert cb[-1] == np.float32(0.999) and np.all(cb <= np.float32(0.999)) and np.all(cb > 0)
    # abar follows cos^2((t/T + s)/(1 + s) pi/2) / cos^2(s/(1+s) pi/2), s = 0.008, away from the cap.
    t = np.arange(1, 901) / 1000
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(np.asarray(c.alphas_cumprod)[:900], f(t) / f(0), rtol=1e-4)


def test_schedule_is_a_pytree_and_jit_argument():
    s = make_schedule()
    assert len(jax.tree.leaves(s)) == 9
    doubled = jax.jit(lambda sch: jax.tree.map(lambda a: 2 * a, sch))(s)
    assert isinstance(doubled, Schedule) and doubled.num_timesteps == 1000
    assert float(doubled.betas[0]) == pytest.approx(2e-4)
    # from_betas validates
    with pytest.raises(ConfigError):
        Schedule.from_betas([0.1, 1.5])
    with pytest.raises(ConfigError):
        Schedule.from_betas(np.zeros((2, 2)) + 0.1)


def test_q_sample():
    s = make_schedule()
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 2)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
    t = jnp.array([0, 500, 999])
    xt = q_sample(s, x0, t, eps)
    abar = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
    want = np.sqrt(abar) * np.asarray(x0) + np.sqrt(1 - abar) * np.asarray(eps)
    np.testing.assert_allclose(np.asarray(xt), want, atol=1e-6)
    assert xt.shape == x0.shape and xt.dtype == jnp.float32


def test_config_validation():
    for bad in (
        dict(kind="sigmoid"),
        dict(variance_type="learned_range"),
        dict(prediction_type="v_prediction"),
        dict(num_train_timesteps=0),
        dict(beta_start=0.1, beta_end=0.01),
        dict(clip_sample="yes"),
    ):
        with pytest.raises(ConfigError):
            ScheduleConfig(**bad)
    assert issubclass(ConfigError, PdjaxError)
    assert hash(ScheduleConfig()) == hash(ScheduleConfig())


def test_config_from_diffusers_dict():
    c = ScheduleConfig.from_diffusers(CIFAR_DDPM)
    assert c == ScheduleConfig(variance_type="fixed_large", clip_sample=True)
    # DDIMScheduler configs have no variance_type: diffusers' DDPMScheduler default applies.
    ddim = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    c2 = ScheduleConfig.from_diffusers(ddim)
    assert (c2.kind, c2.variance_type, c2.clip_sample, c2.num_train_timesteps) == (
        "scaled_linear", "fixed_small", False, 1000)
    for bad in (
        {**CIFAR_DDPM, "beta_schedule": "sigmoid"},
        {**CIFAR_DDPM, "prediction_type": "v_prediction"},
        {**CIFAR_DDPM, "trained_betas": [0.1, 0.2]},
        {**CIFAR_DDPM, "variance_type": "learned_range"},
        {**CIFAR_DDPM, "thresholding": True},
        {**CIFAR_DDPM, "clip_sample_range": 2.0},
    ):
        with pytest.raises(ConfigError):
            ScheduleConfig.from_diffusers(bad)
    for c in KINDS:
        assert ScheduleConfig.from_diffusers(json.loads(json.dumps(c.to_diffusers()))) == c


def test_config_dict_round_trip():
    for c in KINDS + [ScheduleConfig(variance_type="fixed_small", clip_sample=True)]:
        assert ScheduleConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ConfigError, match="bogus"):
        ScheduleConfig.from_dict({"bogus": 1})


@pytest.mark.torch
@pytest.mark.parametrize("config", KINDS, ids=lambda c: f"{c.kind}-{c.num_train_timesteps}")
def test_matches_diffusers_bit_for_bit(config):
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    s = make_schedule(config)
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        ref = cls.from_config(config.to_diffusers())
        np.testing.assert_array_equal(np.asarray(s.betas), ref.betas.numpy())
        np.testing.assert_array_equal(np.asarray(s.alphas), ref.alphas.numpy())
        np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy())
    ddpm = diffusers.DDPMScheduler.from_config(config.to_diffusers())
    assert ddpm.config.variance_type == config.variance_type
    assert ddpm.config.clip_sample == config.clip_sample
    # forward process == DDPMScheduler.add_noise
    x0 = np.random.default_rng(0).uniform(-1, 1, (3, 2, 2, 1)).astype(np.float32)
    eps = np.random.default_rng(1).normal(size=x0.shape).astype(np.float32)
    t = np.array([0, config.num_train_timesteps // 2, config.num_train_timesteps - 1])
    want = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(q_sample(s, x0, t, eps)), want, atol=2e-6)

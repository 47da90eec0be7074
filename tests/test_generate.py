"""pdjax.generate: start noise (with a trigger), DDPM/DDIM generation, batching and user mistakes.

Shapes are chosen to share compiles: DDIM runs on batches of 4 with 2 steps (as the CLI tests), DDPM
on batches of 2 with a 10-step schedule.
"""

import jax
import numpy as np
import pytest

from pdjax.diffusion.schedule import ScheduleConfig
from pdjax.errors import ConfigError, UnknownNameError
from pdjax.generate import SAMPLERS, generate, start_noise
from pdjax.model import Model
from pdjax.models.config import PRESETS
from pdjax.testing import random_params

CFG = PRESETS["tiny"]
SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def model():
    """Default schedule (T = 1000): used with DDIM."""
    return Model(CFG, random_params(CFG, 0))


@pytest.fixture(scope="module")
def short_model(model):
    """A 10-step schedule so a full DDPM chain is cheap."""
    return model.replace(schedule_config=ScheduleConfig(num_train_timesteps=10, beta_end=0.2))


@pytest.fixture(scope="module")
def trigger():
    g = np.full(SHAPE, -1.0, np.float32)  # BadDiffusion style: background -1, a white box
    g[5:, 5:] = 1.0
    return g


@pytest.fixture(scope="module")
def ddim_clean(model):
    return generate(model, jax.random.key(0), 4, sampler="ddim", num_steps=2)


def test_start_noise(trigger):
    key = jax.random.key(1)
    x = np.asarray(start_noise(key, 4, SHAPE))
    assert x.shape == (4, *SHAPE) and x.dtype == np.float32
    assert 0.3 < x.std() < 3.0 and not np.array_equal(x[0], x[1])
    np.testing.assert_array_equal(start_noise(key, 4, SHAPE), x)  # same key, same noise
    xg = np.asarray(start_noise(key, 4, SHAPE, trigger))
    np.testing.assert_allclose(xg - x, np.broadcast_to(trigger, x.shape), atol=1e-6)  # x_T = eps + g
    with pytest.raises(ConfigError, match=r"trigger has shape \(8, 8, 3\), the model needs \(8, 8, 1\)"):
        start_noise(key, 4, SHAPE, np.zeros((8, 8, 3)))


def test_ddim_shapes_and_determinism(model, ddim_clean):
    x = ddim_clean
    assert isinstance(x, np.ndarray) and x.shape == (4, *SHAPE) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    assert not np.array_equal(x[0], x[1])
    np.testing.assert_array_equal(generate(model, jax.random.key(0), 4, sampler="ddim", num_steps=2), x)
    other = generate(model, jax.random.key(1), 4, sampler="ddim", num_steps=2)
    assert np.abs(other - x).max() > 1e-3


def test_trigger_changes_samples(model, ddim_clean, trigger):
    xg = generate(model, jax.random.key(0), 4, trigger=trigger, sampler="ddim", num_steps=2)
    assert xg.shape == ddim_clean.shape and np.all(np.isfinite(xg))
    assert np.abs(xg - ddim_clean).mean() > 1e-2
    # the trigger is the only change: a zero trigger reproduces the clean samples
    x0 = generate(model, jax.random.key(0), 4, trigger=np.zeros(SHAPE, np.float32), sampler="ddim", num_steps=2)
    np.testing.assert_array_equal(x0, ddim_clean)


def test_ddpm_batching(short_model):
    key = jax.random.key(2)
    x = generate(short_model, key, 4, batch_size=2)  # two batches of 2
    assert x.shape == (4, *SHAPE) and np.all(np.isfinite(x))
    np.testing.assert_array_equal(generate(short_model, key, 4, batch_size=2), x)
    # batch b draws from fold_in(key, b): a shorter run is a prefix, and batches differ
    np.testing.assert_array_equal(generate(short_model, key, 2, batch_size=2), x[:2])
    assert np.abs(x[:2] - x[2:]).max() > 1e-3


def test_params_on_more_devices_than_the_batch_uses(short_model):
    """Params replicated over all 8 test devices (as data-parallel training leaves them), a batch of 2 split
    over 2: moved onto the batch's mesh, the same samples (regression: this raised 'incompatible devices')."""
    from jax.sharding import NamedSharding, PartitionSpec

    from pdjax.sharding import AXIS

    mesh = jax.sharding.Mesh(np.array(jax.devices()), (AXIS,))
    placed = jax.device_put(short_model.params, NamedSharding(mesh, PartitionSpec()))
    key = jax.random.key(2)
    np.testing.assert_allclose(generate(short_model.replace(params=placed), key, 2), generate(short_model, key, 2),
                               atol=1e-5)


def test_user_mistakes(model, trigger):
    key = jax.random.key(0)
    with pytest.raises(UnknownNameError, match="unknown sampler 'euler'; valid: ddim, ddpm"):
        generate(model, key, 4, sampler="euler")
    assert set(SAMPLERS) == {"ddpm", "ddim"}
    with pytest.raises(ConfigError, match="n must be >= 1"):
        generate(model, key, 0)
    with pytest.raises(ConfigError, match="trigger has shape"):
        generate(model, key, 4, trigger=trigger[:4], sampler="ddim", num_steps=2)
    with pytest.raises(ConfigError, match="num_steps"):
        generate(model, key, 4, sampler="ddim", num_steps=1001)

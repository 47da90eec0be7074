"""pdjax.model: load() on pdjax checkpoints and diffusers folders; Model.eps is a pure function of params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pdjax.diffusion.schedule import ScheduleConfig
from pdjax.errors import CheckpointError
from pdjax.model import Model, load
from pdjax.models.config import PRESETS
from pdjax.models.unet import make_eps_fn
from pdjax.testing import random_params

CFG = PRESETS["tiny"]
SCHED = ScheduleConfig(kind="scaled_linear", num_train_timesteps=500, beta_end=0.012, variance_type="fixed_small")


@pytest.fixture(scope="module")
def model():
    return Model(CFG, random_params(CFG, 0), SCHED, {"seed": 0, "data": "synthetic"})


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    return model.save(root / "pdjax"), model.export_diffusers(root / "diffusers")


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(1), (3, CFG.sample_size, CFG.sample_size, CFG.in_channels))
    return x, jnp.array([0, 321, 999], jnp.int32)  # batch 3: shares the compile with test_unet


def test_load_pdjax_and_diffusers_give_same_eps(model, folders, inputs):
    a, b = load(folders[0]), load(folders[1])
    assert a.config == b.config == CFG
    assert a.schedule_config == b.schedule_config == SCHED
    assert a.meta == {"seed": 0, "data": "synthetic"}
    assert b.meta["format"] == "diffusers" and b.meta["source"].endswith("diffusers")
    assert a.num_params == b.num_params == model.num_params and a.image_shape == (8, 8, 1)
    eps = jax.jit(model.eps)
    ref = eps(model.params, *inputs)
    np.testing.assert_array_equal(eps(a.params, *inputs), ref)
    np.testing.assert_array_equal(eps(b.params, *inputs), ref)


@pytest.mark.parametrize("which", [0, 1])
def test_load_with_sharding(folders, which):
    mesh = jax.make_mesh((8,), ("m",))
    sharding = NamedSharding(mesh, P())
    m = load(folders[which], sharding=sharding)
    for leaf in jax.tree_util.tree_leaves(m.params):
        assert isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def test_eps_is_pure_with_params_as_argument(model, inputs):
    assert model.eps is make_eps_fn(CFG) is Model(CFG, None).eps  # one function per architecture
    leaves = jax.tree_util.tree_leaves(model.params)
    jaxpr = jax.make_jaxpr(model.eps)(model.params, *inputs)
    assert len(jaxpr.jaxpr.invars) == len(leaves) + 2
    assert sum(np.size(c) for c in jaxpr.consts) < 1000  # no weights baked in as constants

    eps = jax.jit(model.eps)
    other = random_params(CFG, 1)
    out0, out1 = eps(model.params, *inputs), eps(other, *inputs)
    assert eps._cache_size() == 1  # a second checkpoint reuses the compile
    assert float(jnp.max(jnp.abs(out0 - out1))) > 1e-2
    np.testing.assert_array_equal(eps(model.params, *inputs), out0)  # deterministic, no hidden state


def test_load_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)


@pytest.mark.torch
def test_export_diffusers_loads_in_diffusers(model, folders, inputs):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel.from_pretrained(str(folders[1])).eval()
    x, t = inputs
    with torch.no_grad():
        ref = unet(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                   torch.from_numpy(np.asarray(t, np.int64))).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(jax.jit(model.eps)(model.params, x, t))
    assert float(np.max(np.abs(out - ref))) <= 1e-4
    sched = diffusers.DDPMScheduler.from_pretrained(str(folders[1]))
    np.testing.assert_array_equal(sched.betas.numpy(), np.asarray(model.schedule.betas))


def test_float16_storage_loads_as_float32(tmp_path):
    import jax
    import numpy as np

    from pdjax.model import load, new_model
    from pdjax.models.config import PRESETS

    model = new_model(PRESETS["tiny"], jax.random.key(0))
    model.save(tmp_path / "half", dtype="float16")
    back = load(tmp_path / "half")
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(back.params)):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a).astype(np.float16).astype(np.float32), b)

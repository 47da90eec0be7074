"""XLA:CPU runtime settings (pdjax/cpu_runtime.py) and batch sharding (pdjax/sharding.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax import cpu_runtime
from pdjax.cli import main
from pdjax.errors import ConfigError
from pdjax.sharding import AXIS, batch_mesh, batch_noise, batch_parallel, pinned


def test_choices_from_environment(monkeypatch):
    monkeypatch.delenv(cpu_runtime.KERNELS_ENV, raising=False)
    monkeypatch.delenv(cpu_runtime.DEVICES_ENV, raising=False)
    assert cpu_runtime.kernels() == "ynn"
    auto = cpu_runtime.device_count()  # default: one device per usable core
    assert 1 <= auto <= min(cpu_runtime.MAX_DEVICES, os.cpu_count())
    monkeypatch.setenv(cpu_runtime.DEVICES_ENV, "auto")
    assert cpu_runtime.device_count() == auto
    monkeypatch.setenv(cpu_runtime.DEVICES_ENV, "1")
    assert cpu_runtime.device_count() == 1
    monkeypatch.setenv(cpu_runtime.KERNELS_ENV, "XLA")
    monkeypatch.setenv(cpu_runtime.DEVICES_ENV, "3")
    assert cpu_runtime.kernels() == "xla" and cpu_runtime.device_count() == 3
    for env, bad in [(cpu_runtime.KERNELS_ENV, "mkl"), (cpu_runtime.DEVICES_ENV, "0"), (cpu_runtime.DEVICES_ENV, "two")]:
        monkeypatch.setenv(env, bad)
        with pytest.raises(ConfigError, match=env):
            cpu_runtime.kernels() if env == cpu_runtime.KERNELS_ENV else cpu_runtime.device_count()
        monkeypatch.delenv(env)


def test_enable_is_a_no_op_once_jax_runs(monkeypatch):
    jax.devices()  # the backend is up
    before = os.environ.get("XLA_FLAGS")
    monkeypatch.delenv(cpu_runtime.KERNELS_ENV, raising=False)
    assert cpu_runtime.enable() == []
    assert os.environ.get("XLA_FLAGS") == before


def test_bad_setting_is_a_one_line_cli_error(monkeypatch, capsys):
    monkeypatch.setenv(cpu_runtime.KERNELS_ENV, "mkl")
    assert main(["scan", "--out", "never-written"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "PDJAX_CPU_KERNELS" in err[0]
    assert not os.path.exists("never-written")


_CHILD = r"""
import json, sys
from pdjax import cpu_runtime
added = cpu_runtime.enable()
import jax, jax.numpy as jnp, numpy as np
from pdjax.testing import random_model
m = random_model("tiny", seed=0)
x = jax.random.normal(jax.random.key(0), (4, *m.image_shape))
eps = jax.jit(m.eps)(m.params, x, jnp.full((4,), 7))
np.save(sys.argv[1], np.asarray(eps))
print(json.dumps({"added": added, "devices": len(jax.devices())}))
"""


def _child(tmp_path, name, **env):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(env)
    out = tmp_path / f"{name}.npy"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(out)], env=e, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1]), np.load(out)


def test_fresh_process_gets_flags_and_same_numbers(tmp_path):
    fast, eps_fast = _child(tmp_path, "fast", PDJAX_CPU_KERNELS="ynn", PDJAX_CPU_DEVICES="2")
    ref, eps_ref = _child(tmp_path, "ref", PDJAX_CPU_KERNELS="xla", PDJAX_CPU_DEVICES="1")
    assert fast["devices"] == 2 and fast["added"] == [cpu_runtime.YNN_FLAG, f"{cpu_runtime.DEVICE_FLAG}=2"]
    assert ref["devices"] == 1 and ref["added"] == []
    np.testing.assert_allclose(eps_fast, eps_ref, atol=1e-5)


def test_batch_mesh_takes_the_largest_dividing_device_count():
    devices = jax.devices()
    assert len(devices) == 8  # tests/conftest.py
    assert batch_mesh(16).size == 8 and batch_mesh(12).size == 6 and batch_mesh(4).size == 4
    assert batch_mesh(7).size == 7 and batch_mesh(11) is None and batch_mesh(1) is None


def test_batch_parallel_splits_the_batch_and_keeps_the_noise():
    key = jax.random.key(5)

    def f(scale, x):  # x [2, B, 3]: per-sample work plus chain-style noise (batch on axis 0 of the draw)
        return jax.vmap(lambda xi: scale * xi + batch_noise(key, xi.shape))(x)

    x = jnp.arange(24.0 * 3).reshape(2, 12, 3)
    y = batch_parallel(f, jnp.float32(2.0), x, batch_axes=(None, 1), out_axis=1, size=12)
    assert len(y.sharding.device_set) == 6  # 12 rows over the largest dividing device count
    want = 2.0 * x + jax.random.normal(key, x.shape[1:])[None]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=0, atol=0)
    # inside another trace it is the plain call (the caller decides the sharding)
    traced = jax.jit(lambda x: batch_parallel(f, jnp.float32(2.0), x, batch_axes=(None, 1), out_axis=1, size=12))(x)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(want))


def test_pinned_places_its_arguments_and_compiles_ahead_of_time():
    from jax.sharding import PartitionSpec as P

    mesh = batch_mesh(8)
    specs = (P(AXIS), P())
    run = pinned(jax.jit(jax.shard_map(lambda x, s: jax.lax.psum(jnp.sum(x * s), AXIS), mesh=mesh,
                                       in_specs=specs, out_specs=P())), mesh, specs)
    x, s = jnp.arange(16.0), jnp.float32(3.0)
    placed = run.place(x, s)
    assert len(placed[0].sharding.device_set) == 8 and placed[0].sharding.spec == P(AXIS)
    compiled = run.lower(x, s).compile()  # ahead of time, as experiments/bench_inversion.py does
    assert float(compiled(*placed)) == float(run(x, s)) == 3.0 * 120.0
    # arrays already on their sharding pass through untouched; others (here a pytree prefix's leaves) are placed
    again = run.place(*placed)
    assert again[0] is placed[0] and again[1] is placed[1]
    tree = pinned(jax.jit(lambda d: d["a"].sum() + d["b"]), mesh, (P(AXIS),))
    d = {"a": placed[0], "b": jnp.arange(16.0)}
    (put,) = tree.place(d)
    assert put["a"] is placed[0] and put["b"].sharding.spec == P(AXIS) and float(tree(d)[1]) == 121.0


def test_sharded_samplers_equal_one_device():
    from pdjax.backdoor.attacks import trojan_ddpm_sample
    from pdjax.diffusion.samplers import ddim_sample, ddpm_sample
    from pdjax.testing import random_model

    m = random_model("tiny", seed=2, timesteps=10)
    x_T = jax.random.normal(jax.random.key(1), (8, *m.image_shape))
    k = jax.random.key(2)
    mu = jnp.full(m.image_shape, 0.3)
    sch = m.schedule  # built outside the traced runs (the trojan coefficients are computed in numpy)
    runs = {
        "ddpm": lambda x: ddpm_sample(m.eps, m.params, sch, x, k, split_batch=True),
        "ddim eta 1": lambda x: ddim_sample(m.eps, m.params, sch, x, k, num_steps=5, eta=1.0, split_batch=True),
        "trojan": lambda x: trojan_ddpm_sample(m.eps, m.params, sch, x, k, mu, 0.6, split_batch=True),
    }
    for name, run in runs.items():
        sharded = run(x_T)  # concrete batch of 8: split over the 8 test devices
        single = jax.jit(run)(x_T)  # traced: the plain one-device program
        assert len(sharded.sharding.device_set) == 8, name
        np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, err_msg=name)


def test_sharded_generations_equal_one_device():
    from pdjax.defense.evaluate import _chains, _start, triggered_generations
    from pdjax.testing import random_model

    m = random_model("tiny", seed=1, timesteps=10)
    sc = m.schedule_config
    trig = np.stack([np.full(m.image_shape, -0.5, np.float32), np.zeros(m.image_shape, np.float32)])
    key = jax.random.key(4)
    sharded = triggered_generations(m, trig, key, n=8)  # n = 8 split over the 8 test devices
    x_T = jax.device_put(_start(jnp.asarray(trig), key, 8), jax.devices()[0])
    single = np.asarray(_chains(m.eps, m.schedule, sc.variance_type, bool(sc.clip_sample), m.params, x_T, key))
    np.testing.assert_allclose(sharded, single, atol=1e-5)

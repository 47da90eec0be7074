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
from pdjax.sharding import batch_mesh, shard_batch


def test_choices_from_environment(monkeypatch):
    monkeypatch.delenv(cpu_runtime.KERNELS_ENV, raising=False)
    monkeypatch.delenv(cpu_runtime.DEVICES_ENV, raising=False)
    assert cpu_runtime.kernels() == "ynn"
    assert cpu_runtime.device_count() == 1
    monkeypatch.setenv(cpu_runtime.DEVICES_ENV, "auto")
    assert 1 <= cpu_runtime.device_count() <= min(cpu_runtime.MAX_DEVICES, os.cpu_count())
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
    x = jnp.arange(24.0).reshape(2, 12)
    y = shard_batch(x, 12, axis=1)
    assert len(y.sharding.device_set) == 6 and np.array_equal(np.asarray(y), np.asarray(x))


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

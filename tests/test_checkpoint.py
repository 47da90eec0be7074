"""pdjax.checkpoint: orbax round trips, restore onto shardings, atomicity, damage -> CheckpointError."""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pdjax import checkpoint
from pdjax.errors import CheckpointError
from pdjax.model import Model, load
from pdjax.models.config import PRESETS
from pdjax.testing import random_params


def make_tree(seed: int):
    rng = np.random.default_rng(seed)
    return {
        "block": {"kernel": rng.standard_normal((16, 4096), dtype=np.float32),  # ~256 kB: a real data file
                  "bias": rng.standard_normal((8,), dtype=np.float32)},
        "scale": np.float32(seed) + np.ones((3,), np.float32),
    }


META = {"model": {"name": "toy"}, "provenance": {"seed": 1, "steps": [1, 2]}}


def assert_tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def versions(path: Path):
    return sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("v"))


@pytest.fixture
def saved(tmp_path):
    """A checkpoint holding make_tree(0) as v000000."""
    path = tmp_path / "ckpt"
    checkpoint.save(path, make_tree(0), META)
    return path


def test_round_trip_with_metadata_and_state(tmp_path):
    state = {"step": np.int32(7), "opt": {"mu": np.arange(5, dtype=np.float32)}}
    path = checkpoint.save(tmp_path / "c", make_tree(0), META, state=state)
    assert path.is_absolute() and checkpoint.is_checkpoint(path)
    params, meta = checkpoint.restore(path)
    assert_tree_equal(params, make_tree(0))
    assert meta == META == checkpoint.read_meta(path)
    _, _, state_back = checkpoint.restore(path, with_state=True)
    assert_tree_equal(state_back, state)


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = checkpoint.save("rel/ckpt", make_tree(0), META)
    assert path == (tmp_path / "rel" / "ckpt").absolute()
    monkeypatch.chdir("/")
    assert_tree_equal(checkpoint.restore(path)[0], make_tree(0))


@pytest.mark.parametrize("spec", [P(), P("m")])
def test_restore_onto_named_sharding(saved, spec):
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("m",))
    tree = make_tree(0)

    def struct(x):  # shard the leading axis where it is divisible by 8, else replicate
        s = spec if (spec != P() and x.ndim and x.shape[0] % 8 == 0) else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s))

    target = jax.tree_util.tree_map(struct, tree)
    params, meta = checkpoint.restore(saved, target=target)
    assert meta == META
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(target)):
        assert isinstance(got, jax.Array) and got.sharding.is_equivalent_to(want.sharding, got.ndim)
    assert len(params["block"]["kernel"].sharding.device_set) == 8
    if spec == P("m"):
        assert params["block"]["kernel"].addressable_shards[0].data.shape == (2, 4096)
    assert_tree_equal(params, tree)


def test_restore_onto_mismatched_target_names_the_leaf(saved):
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_tree(0))
    target["block"]["bias"] = jax.ShapeDtypeStruct((9,), np.float32)
    with pytest.raises(CheckpointError, match=r"\['block'\]\['bias'\] has shape \(8,\), expected \(9,\)"):
        checkpoint.restore(saved, target=target)


def test_leftover_partial_folder_is_ignored_and_replaced(saved):
    junk = saved / ".v000002.partial" / "params"
    junk.mkdir(parents=True)
    (junk / "_METADATA").write_bytes(os.urandom(100))
    assert_tree_equal(checkpoint.restore(saved)[0], make_tree(0))
    checkpoint.save(saved, make_tree(1), META)
    assert_tree_equal(checkpoint.restore(saved)[0], make_tree(1))


class _CrashAfterParams:
    """Orbax checkpointer stand-in: writes params completely, then 'loses power'."""

    def __init__(self, real):
        self.real = real

    def save(self, path, tree):
        self.real.save(path, tree)
        self.real.wait_until_finished()
        raise RuntimeError("simulated crash after the params write")

    def wait_until_finished(self):
        self.real.wait_until_finished()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_interrupted_save_after_params_write_keeps_previous(saved, monkeypatch):
    real = checkpoint._checkpointer
    monkeypatch.setattr(checkpoint, "_checkpointer", lambda: _CrashAfterParams(real()))
    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoint.save(saved, make_tree(1), {"new": True}, state={"step": np.int32(1)})
    monkeypatch.undo()
    params, meta = checkpoint.restore(saved)
    assert_tree_equal(params, make_tree(0))
    assert meta == META and versions(saved) == ["v000000"]
    checkpoint.save(saved, make_tree(2), META)  # the next save recovers
    assert_tree_equal(checkpoint.restore(saved)[0], make_tree(2))
    assert versions(saved) == ["v000001"] and not list(saved.glob(".*partial"))


def test_interrupted_before_pointer_update_keeps_previous(saved, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == checkpoint.POINTER:
            raise OSError("simulated crash before the pointer moves")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.save(saved, make_tree(1), {"new": True})
    monkeypatch.undo()
    params, meta = checkpoint.restore(saved)
    assert_tree_equal(params, make_tree(0))
    assert meta == META
    checkpoint.save(saved, make_tree(2), META)
    assert_tree_equal(checkpoint.restore(saved)[0], make_tree(2))
    assert len(versions(saved)) == 1


def _largest_file(folder: Path) -> Path:
    return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate data", "delete data", "delete _METADATA", "truncate manifest",
                                    "delete params folder"])
def test_damaged_current_version_is_checkpoint_error(saved, damage):
    params_dir = saved / json.loads((saved / checkpoint.POINTER).read_text())["current"] / "params"
    if damage == "truncate data":
        f = _largest_file(params_dir)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "delete data":
        _largest_file(params_dir).unlink()
    elif damage == "delete _METADATA":
        (params_dir / "_METADATA").unlink()
    elif damage == "truncate manifest":
        (params_dir / "manifest.ocdbt").write_bytes((params_dir / "manifest.ocdbt").read_bytes()[:10])
    else:
        shutil.rmtree(params_dir)
    with pytest.raises(CheckpointError, match=str(params_dir)):
        checkpoint.restore(saved)


@pytest.mark.parametrize("pointer", [None, "{not json", json.dumps({"format": "other"})])
def test_missing_or_bad_pointer(saved, pointer):
    if pointer is None:
        (saved / checkpoint.POINTER).unlink()
        match = "not a pdjax checkpoint"
    else:
        (saved / checkpoint.POINTER).write_text(pointer)
        match = "pdjax.json"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.restore(saved)
    with pytest.raises(CheckpointError):
        load(saved)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.restore(tmp_path / "nope")


@pytest.mark.parametrize("keep", [1, 2])
def test_keep_retention(tmp_path, keep):
    path = tmp_path / "c"
    for i in range(4):
        checkpoint.save(path, make_tree(i), {"i": i}, keep=keep)
    assert versions(path) == [f"v{n:06d}" for n in range(4 - keep, 4)]
    params, meta = checkpoint.restore(path)
    assert meta == {"i": 3}
    assert_tree_equal(params, make_tree(3))


def test_nan_weights_refused_by_model_load(tmp_path):
    cfg = PRESETS["tiny"]
    params = random_params(cfg, 0)
    params["mid_block"]["resnets_0"]["conv1"]["kernel"][0, 0, 0, 0] = np.nan
    Model(cfg, params).save(tmp_path / "nan")
    with pytest.raises(CheckpointError, match=r"\['mid_block'\]\['resnets_0'\]\['conv1'\]\['kernel'\] contains NaN"):
        load(tmp_path / "nan")


def test_unserialisable_meta(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        checkpoint.save(tmp_path / "c", make_tree(0), {"bad": object()})

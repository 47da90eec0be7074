"""Determinism and resume guarantees (docs/reliability.md), on one device (XLA:CPU here).

- Same seed, same trigger and verdict, bit for bit: ``scan_model`` twice with one key, and ``pdjax invert``
  twice with one ``--seed`` (the library-level ``invert`` twice is
  tests/test_inversion.py::test_same_key_same_trigger_and_finite, for all three methods).
- A killed ``pdjax train`` (Ctrl-C mid-run: exit 130 and the resume hint) rerun with the same command
  resumes from its last checkpoint and ends bitwise equal to an uninterrupted run: params, EMA, Adam
  moments, step and key. The library-level version (``stop_after``) is
  tests/test_train.py::test_interrupted_run_resumes_bitwise.
- A killed ``pdjax audit`` (a cut last line in audit.jsonl) redoes only the missing models:
  tests/test_audit.py::test_audit_matches_scan_model_and_resumes.

Tiny model (8x8x1, 50 timesteps), 2 inversion steps, 4 generations: the cost is the compiles.
"""

import importlib
import json

import jax
import numpy as np
import pytest

from pdjax import checkpoint
from pdjax.cli import main
from pdjax.defense import detection as D
from pdjax.defense.inversion import InversionConfig
from pdjax.testing import random_model

train_mod = importlib.import_module("pdjax.train")  # the module (the package rebinds `pdjax.train`)

TINY = InversionConfig(method="purediffusion", steps=2, batch=4, K=1)  # = `pdjax invert --steps 2 --batch 4 --K 1`
INVERT = ["--steps", "2", "--batch", "4", "--K", "1", "--quiet"]


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=0, timesteps=50)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return model.export_diffusers(tmp_path_factory.mktemp("det") / "tiny")


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(leaves(a), leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_scan_model_same_key_same_trigger_and_verdict(model):
    det = D.Detector()
    a, b = (D.scan_model(model, "tiny", jax.random.key(0), det, TINY, n=4) for _ in range(2))
    for name in ("trigger", "losses", "triggered", "clean", "likely_target"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.features == b.features  # every feature, exactly (floats compared with ==)
    assert (a.score, a.backdoored, a.reason) == (b.score, b.backdoored, b.reason)
    other = D.scan_model(model, "tiny", jax.random.key(1), det, TINY, n=4)
    assert not np.array_equal(other.trigger, a.trigger)  # the key matters


def test_cli_invert_same_seed_same_files(model_dir, tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["invert", str(model_dir), "--out", str(tmp_path / name), "--seed", "5", *INVERT]) == 0
    capsys.readouterr()
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "trigger.npy").read_bytes() == (b / "trigger.npy").read_bytes()
    assert (a / "trigger.png").read_bytes() == (b / "trigger.png").read_bytes()
    ja, jb = (json.loads((d / "inversion.json").read_text()) for d in (a, b))
    assert ja["losses"] == jb["losses"] and ja["config"] == jb["config"] and ja["seed"] == jb["seed"] == 5
    assert main(["invert", str(model_dir), "--out", str(tmp_path / "c"), "--seed", "6", *INVERT]) == 0
    assert (tmp_path / "c" / "trigger.npy").read_bytes() != (a / "trigger.npy").read_bytes()


@pytest.fixture
def shared_train_step(monkeypatch):
    """One compiled multi-step for every ``pdjax train`` call below (same config and architecture, so each
    call would build the same program; a fresh jit per call would compile it again, 10-30 s each).
    ``kill_at[0] = n`` raises KeyboardInterrupt (Ctrl-C) when the step about to run is number n."""
    real, cache, kill_at = train_mod.make_multi_step, {}, [None]

    def shared(loss_fn, optimizer, ema_decay, n, strategy=None, batch_size=None):
        key = (ema_decay, n, strategy, batch_size)
        if key not in cache:
            cache[key] = real(loss_fn, optimizer, ema_decay, n, strategy, batch_size)
        fn = cache[key]

        def call(state, data):
            if kill_at[0] is not None and int(state.step) >= kill_at[0]:
                raise KeyboardInterrupt
            return fn(state, data)

        return call

    monkeypatch.setattr(train_mod, "make_multi_step", shared)
    return kill_at


def test_cli_train_killed_then_rerun_equals_uninterrupted(model_dir, tmp_path, capsys, shared_train_step):
    # 5 steps, checkpoints at 2 and 4; Ctrl-C after 3 steps: the checkpoint holds step 2, step 3 is redone.
    cmd = ["train", "--init", str(model_dir), "--steps", "5", "--batch", "4", "--lr", "1e-3", "--warmup", "1",
           "--checkpoint-every", "2", "--steps-per-call", "1", "--samples", "0", "--seed", "3", "--quiet"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main([*cmd, "--out", str(full)]) == 0

    shared_train_step[0] = 3
    rc = main([*cmd, "--out", str(killed)])
    _, err = capsys.readouterr()
    assert rc == 130 and "rerun the same command to resume" in err
    assert checkpoint.read_meta(killed)["provenance"]["steps"] == 2  # step 3 was lost with the kill

    shared_train_step[0] = None
    assert main([*cmd, "--out", str(killed)]) == 0
    out, _ = capsys.readouterr()
    assert "resumed from step 2" in out
    params_a, meta_a, state_a = checkpoint.restore(full, with_state=True)
    params_b, meta_b, state_b = checkpoint.restore(killed, with_state=True)
    assert meta_a == meta_b
    assert_trees_equal(params_a, params_b)  # the saved (EMA) params, bit for bit
    assert_trees_equal(state_a, state_b)    # params, EMA, Adam moments, step and key
    assert int(state_b["step"]) == 5

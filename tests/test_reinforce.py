"""Target-directed trigger reinforcement (pdjax.reinforce) and ``pdjax amplify --reinforce target``.

A random tiny 8x8 model with a 50-step schedule; chains of 1-5 steps, a few Adam steps.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax import cli
from pdjax.amplify import FULL_FRAME_FLOOR, AmplifyConfig, amplify, mix_trigger
from pdjax.backdoor.attacks import AttackSpec
from pdjax.backdoor.train import build_arrays
from pdjax.data import load_digits_with_labels
from pdjax.errors import ConfigError
from pdjax.reinforce import (DEFAULT_STAGES, ReinforceConfig, ReinforceStage, format_stages, parse_stages,
                             reinforce_to_target, target_loss)
from pdjax.testing import random_model

SPEC = AttackSpec(trigger="BOX_3", target="CORNER", poison_rate=0.25)


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=0, timesteps=50)


@pytest.fixture(scope="module")
def arrays(model):
    return build_arrays(SPEC, model.image_shape)


def test_one_step_chain_is_the_x0_prediction(model, arrays):
    """S = 1: one DDIM step from t = 0 to the end is x0_hat = (x - sqrt(1 - abar_0) eps) / sqrt(abar_0)."""
    key = jax.random.key(3)
    delta = jnp.asarray(arrays.trigger)
    got = target_loss(model, model.params, delta, arrays.target, 1, 4, key)
    x = jax.random.normal(jax.random.split(key)[0], (4, 8, 8, 1)) + delta
    abar0 = model.schedule.alphas_cumprod[0]
    x0 = (x - jnp.sqrt(1 - abar0) * model.eps(model.params, x, jnp.zeros((4,), jnp.int32))) / jnp.sqrt(abar0)
    want = jnp.mean((jnp.clip(x0, -1, 1) - arrays.target) ** 2)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_reinforcement_lowers_the_target_loss_and_is_reproducible(model, arrays):
    cfg = ReinforceConfig(stages=(ReinforceStage(2, 10, 0.1),), batch=8)
    r = reinforce_to_target(model, arrays.trigger, arrays.target, jax.random.key(0), cfg)
    assert r.trigger.shape == (8, 8, 1) and len(r.losses) == 1 and len(r.losses[0]) == 10
    assert np.array_equal(r.trigger, r.stage_triggers[-1])

    def held_out(d):  # 64 noises no optimiser step saw
        return float(target_loss(model, model.params, d, arrays.target, 2, 64, jax.random.key(9)))

    assert held_out(r.trigger) < 0.95 * held_out(arrays.trigger)
    again = reinforce_to_target(model, arrays.trigger, arrays.target, jax.random.key(0), cfg)
    np.testing.assert_array_equal(r.trigger, again.trigger)
    other = reinforce_to_target(model, arrays.trigger, arrays.target, jax.random.key(1), cfg)
    assert not np.array_equal(r.trigger, other.trigger)


def test_stages_chain_and_loop_layout_does_not_change_the_trigger(model, arrays):
    cfg = ReinforceConfig(stages=(ReinforceStage(2, 2, 0.05), ReinforceStage(3, 2, 0.02)), batch=4, loop="unroll")
    r = reinforce_to_target(model, arrays.trigger, arrays.target, jax.random.key(0), cfg)
    assert len(r.stage_triggers) == 2 and len(r.seconds) == 2
    assert not np.array_equal(r.stage_triggers[0], r.trigger)  # the second stage continued from the first
    for loop, remat in [("scan", True), ("host", False), ("host", True)]:
        # the host loop pulls the gradient back through per-step VJPs outside any jitted program
        other = reinforce_to_target(model, arrays.trigger, arrays.target, jax.random.key(0),
                                    dataclasses.replace(cfg, loop=loop, remat=remat))
        np.testing.assert_allclose(other.trigger, r.trigger, atol=1e-5, err_msg=f"{loop}, remat={remat}")
        np.testing.assert_allclose(other.losses, r.losses, rtol=1e-5)


def test_config_and_shape_errors(model, arrays):
    with pytest.raises(ConfigError, match="batch"):
        ReinforceConfig(batch=0)
    with pytest.raises(ConfigError, match="loop must be host"):
        ReinforceConfig(loop="python")
    with pytest.raises(ConfigError, match="chain_steps"):
        ReinforceConfig(stages=(ReinforceStage(0, 5, 0.1),))
    with pytest.raises(ConfigError, match="ReinforceStage"):
        ReinforceConfig(stages=((20, 300, 0.02),))
    with pytest.raises(ConfigError, match="reinforce"):
        AmplifyConfig(reinforce="nope")
    with pytest.raises(ConfigError, match="start trigger"):
        reinforce_to_target(model, np.zeros((4, 4, 1)), arrays.target, jax.random.key(0))
    data, labels = load_digits_with_labels(8, 1)
    with pytest.raises(ConfigError, match="single target image"):
        amplify(model, data, AttackSpec(kind="trojdiff", trigger="BOX_3", target="class:3", mode="in-d2d"),
                AmplifyConfig(reinforce="target"),
                out="unused", progress=False, labels=labels)


def test_parse_stages():
    assert parse_stages("20:300:0.02,100:100:0.01") == DEFAULT_STAGES
    assert parse_stages("5:7:1e-3") == (ReinforceStage(5, 7, 1e-3),)
    assert parse_stages(format_stages(DEFAULT_STAGES)) == DEFAULT_STAGES
    for bad in ("2:2", "a:1:0.1", "1:2:3:4", ""):
        with pytest.raises(ConfigError, match="CHAIN:STEPS:LR"):
            parse_stages(bad)


def test_cli_amplify_reinforce_target(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    out = tmp_path / "am"
    args = ["amplify", str(path), "--trigger", "BOX_3", "--target", "CORNER", "--poison-rate", "0.25", "--steps", "1",
            "--eval-every", "1", "--n", "2", "--batch", "4", "--reinforce", "target", "--reinforce-stages",
            "2:2:0.05", "--reinforce-batch", "4", "--reinforce-remat", "--quiet", "--out", str(out)]
    assert cli.main(args) == 0
    rein = json.loads((out / "reinforce" / "reinforce.json").read_text())
    assert rein["config"]["stages"] == [{"chain_steps": 2, "steps": 2, "lr": 0.05}] and len(rein["losses"][0]) == 2
    assert rein["config"]["batch"] == 4 and rein["config"]["remat"] is True
    g_inv = np.load(out / "trigger_inv.npy")
    np.testing.assert_array_equal(g_inv, np.load(out / "reinforce" / "trigger.npy"))
    np.testing.assert_array_equal(np.load(out / "trigger_star.npy"), mix_trigger(g_inv, 0, 1.0, FULL_FRAME_FLOOR))
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["reinforce"] == "target"
    assert not (out / "inversion").exists()
    assert cli.main([*args[:-2], "--reinforce-stages", "2:2", "--out", str(tmp_path / "x")]) == 2

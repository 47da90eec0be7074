"""pdjax.train: a tiny DDPM run learns, checkpoints, and resumes bitwise; pdjax.loops strategies agree.

One module-scoped fixture does every UNet run (uninterrupted, interrupted, resumed) with one
TrainConfig; the other tests only inspect results or fail fast before anything compiles.
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax import checkpoint, loops
from pdjax.data import load_digits
from pdjax.errors import CheckpointError, ConfigError
from pdjax.model import Model
from pdjax.models.config import PRESETS
from pdjax.testing import random_params
from pdjax.train import TrainConfig, TrainResult, train

# The module itself (the package rebinds the name `pdjax.train` to the function).
train_mod = importlib.import_module("pdjax.train")

CFG = PRESETS["tiny"]
# 5 steps, checkpoints at 2 and 4: an interruption after step 3 loses step 3 and resumes from step 2.
TCFG = TrainConfig(steps=5, batch_size=4, lr=1e-3, warmup_steps=1, seed=3, steps_per_call=1, checkpoint_every=2)
META = {"data": "digits-8", "seed": 3}


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert ta == tb
    for x, y in zip(leaves(a), leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def data():
    return load_digits(size=8)[:64]


@pytest.fixture(scope="module")
def model():
    return Model(CFG, random_params(CFG, 0), meta={"origin": "random_params(0)"})


@pytest.fixture(scope="module")
def runs(model, data, tmp_path_factory):
    """(full, interrupted, resumed) TrainResults and their checkpoint folders.

    Compile time is the budget here (one UNet train step compiles in 10-30 s on 2 cores), so the three
    ``train`` calls share one jitted multi-step: ``make_multi_step`` is memoised for this fixture. With
    one TrainConfig and one architecture every call would build the same program anyway; what the
    test checks (state restore and step numbering) is untouched by the sharing.
    """
    real, cache = train_mod.make_multi_step, {}

    def shared(loss_fn, optimizer, ema_decay, n, strategy=None, batch_size=None):
        key = (ema_decay, n, strategy, batch_size)
        if key not in cache:
            cache[key] = real(loss_fn, optimizer, ema_decay, n, strategy, batch_size)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(train_mod, "make_multi_step", shared)
    try:
        root = tmp_path_factory.mktemp("train")
        full = train(model, data, TCFG, out=root / "full", meta=META, progress=False)
        part = train(model, data, TCFG, out=root / "resume", meta=META, progress=False, stop_after=3)
        saved_after_interrupt = checkpoint.read_meta(root / "resume")["provenance"]["steps"]
        resumed = train(model, data, TCFG, out=root / "resume", meta=META, progress=False)
    finally:
        mp.undo()
    assert len(cache) == 1
    return {"full": full, "part": part, "resumed": resumed, "saved_after_interrupt": saved_after_interrupt,
            "full_out": root / "full", "resume_out": root / "resume"}


def test_result_fields_and_learning(runs, model):
    r = runs["full"]
    assert isinstance(r, TrainResult)
    assert r.steps == 5 and r.resumed_from == 0 and r.seconds > 0
    assert r.losses.shape == (5,) and np.all(np.isfinite(r.losses))
    # Deterministic (fixed seed): the DDPM loss drops from ~1.1 as the random init is corrected.
    assert r.losses[-1] < r.losses[0]
    assert r.losses[-2:].mean() < r.losses[:2].mean()
    assert r.model.config == CFG and r.model.schedule_config == model.schedule_config
    assert r.model.meta == {"origin": "random_params(0)", **META, "train": dataclasses.asdict(TCFG), "steps": 5}
    # The returned model carries the EMA params: same tree as the init, every tensor moved.
    assert jax.tree_util.tree_structure(r.model.params) == jax.tree_util.tree_structure(model.params)
    changed = [not np.array_equal(a, b) for a, b in zip(leaves(r.model.params), leaves(model.params))]
    assert all(changed)
    assert all(np.all(np.isfinite(x)) for x in leaves(r.model.params))


def test_step_program_donates_its_state_but_not_the_callers_params():
    """The step program reuses the state's buffers (donation); init_state copies, so the caller's params live on.
    A toy quadratic loss: donation does not depend on the model, and it compiles in a second."""
    params = {"w": jnp.zeros((3,)), "b": jnp.ones((2, 2))}
    loss = lambda p, key, data: jnp.mean((p["w"] - data.mean()) ** 2) + jnp.mean(p["b"] ** 2)  # noqa: E731
    opt = train_mod.make_optimizer(TCFG)
    state = train_mod.init_state(params, opt, 0)
    step = train_mod.make_multi_step(loss, opt, 0.999, 2)
    new, losses = step(state, jnp.arange(4.0))
    assert np.isfinite(np.asarray(losses)).all() and int(new.step) == 2
    tree_leaves = jax.tree_util.tree_leaves
    assert all(x.is_deleted() for x in tree_leaves(state.params) + tree_leaves(state.ema_params))
    assert not any(x.is_deleted() for x in tree_leaves(params))


def test_checkpoint_metadata_and_state(runs, model):
    meta = checkpoint.read_meta(runs["full_out"])
    assert meta["model"] == CFG.to_dict()
    assert meta["schedule"] == model.schedule_config.to_dict()
    prov = meta["provenance"]
    assert prov["data"] == "digits-8" and prov["seed"] == 3 and prov["steps"] == 5
    assert prov["train"] == dataclasses.asdict(TCFG)
    params, _, state = checkpoint.restore(runs["full_out"], with_state=True)
    assert_trees_equal(params, runs["full"].model.params)  # saved params = EMA params
    assert int(state["step"]) == 5
    assert_trees_equal(state["ema_params"], params)
    raw_moved = [not np.array_equal(a, b) for a, b in zip(leaves(state["params"]), leaves(model.params))]
    assert all(raw_moved)


def test_interrupted_run_resumes_bitwise(runs):
    full, part, resumed = runs["full"], runs["part"], runs["resumed"]
    assert part.steps == 3 and part.resumed_from == 0
    assert runs["saved_after_interrupt"] == 2  # step 3 was never checkpointed: it is redone
    np.testing.assert_array_equal(part.losses, full.losses[:3])
    assert resumed.resumed_from == 2 and resumed.steps == 5
    np.testing.assert_array_equal(resumed.losses, full.losses[2:])
    assert_trees_equal(resumed.model.params, full.model.params)
    _, meta_a, state_a = checkpoint.restore(runs["full_out"], with_state=True)
    _, meta_b, state_b = checkpoint.restore(runs["resume_out"], with_state=True)
    assert meta_a == meta_b
    assert_trees_equal(state_a, state_b)  # params, EMA, Adam moments, step and key, bit for bit


def test_resume_with_other_settings_raises(runs, model, data):
    before = checkpoint.read_pointer(runs["full_out"])
    for change in ({"lr": 2e-3}, {"steps": 6}, {"t_min": 1}):
        with pytest.raises(CheckpointError, match="other settings"):
            train(model, data, dataclasses.replace(TCFG, **change), out=runs["full_out"], progress=False)
    assert checkpoint.read_pointer(runs["full_out"]) == before  # nothing was written


def test_resume_with_other_architecture_raises(runs, data):
    cfg3 = dataclasses.replace(CFG, in_channels=3, out_channels=3)
    model3 = Model(cfg3, random_params(cfg3, 0))
    with pytest.raises(CheckpointError):
        train(model3, np.repeat(data, 3, axis=-1), TCFG, out=runs["full_out"], progress=False)


@pytest.mark.parametrize("shape", [(4, 16, 16, 1), (4, 8, 8, 3), (8, 8, 1)])
def test_wrong_data_shape_raises(model, shape):
    with pytest.raises(ConfigError, match=r"needs \[N, 8, 8, 1\]"):
        train(model, np.zeros(shape, np.float32), TCFG, progress=False)


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 0), ("checkpoint_every", 0),
                                          ("steps_per_call", -1), ("lr", 0.0), ("ema_decay", 1.0),
                                          ("t_min", -1)])
def test_train_config_validation(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_t_min_restricts_the_training_timesteps():
    from pdjax.diffusion.schedule import make_schedule
    from pdjax.train import ddpm_loss

    sched = make_schedule()
    # The prediction is 0 from t_min on and huge before it, so any earlier timestep would show in the loss.
    eps_fn = lambda p, x, t: jnp.where(t[:, None, None, None] < 900, 1e3, 0.0) * jnp.ones_like(x)  # noqa: E731
    data = jnp.zeros((4, 8, 8, 1))
    losses = [float(ddpm_loss(eps_fn, sched, 64, t_min=900)(None, jax.random.key(i), data)) for i in range(5)]
    assert max(losses) < 2.0  # E[eps^2] = 1
    assert float(ddpm_loss(eps_fn, sched, 64)(None, jax.random.key(0), data)) > 1e5  # t ~ U{0..999} hits t < 900
    with pytest.raises(ConfigError, match=r"t_min must be in \[0, 999\]"):
        ddpm_loss(eps_fn, sched, 64, t_min=1000)


def test_train_config_defaults(monkeypatch):
    monkeypatch.delenv("PDJAX_STEPS_PER_CALL", raising=False)
    cfg = TrainConfig(steps_per_call=0)
    assert cfg.steps_per_call == loops.default_steps_per_call() == 1  # CPU
    assert loops.default_steps_per_call("gpu") == 10
    hash(cfg)  # frozen, usable as a static argument


# ------------------------------------------------------------------- loops.repeat
def _step(carry, i):
    """Exact float arithmetic (small integers, powers of two) plus a fold_in(key, i) draw."""
    x, total = carry
    bits = jax.random.bits(jax.random.fold_in(jax.random.key(5), i), (3,))
    x = 0.5 * x + (bits % 16).astype(jnp.float32) - i.astype(jnp.float32)
    return (x, total + i), (x.sum(), bits, i)


def _smooth_step(x, i):
    x = jnp.sin(x * 1.3 + i.astype(jnp.float32)) + 0.1 * x
    return x, x.sum()


@functools.partial(jax.jit, static_argnames=("step", "n", "strategy"))
def _run(carry, start, *, step, n, strategy):
    return loops.repeat(step, carry, n, start=start, strategy=strategy)


@pytest.mark.parametrize("start", [0, 7])
def test_repeat_strategies_agree(start):
    n, carry0 = 5, (jnp.arange(6, dtype=jnp.float32).reshape(2, 3), jnp.int32(0))
    out = {s: _run(carry0, start, step=_step, n=n, strategy=s) for s in loops.STRATEGIES}
    assert_trees_equal(out["scan"], out["unroll"])  # bitwise: same randomness, same exact arithmetic
    (x, total), (sums, bits, idx) = out["scan"]
    assert x.shape == (2, 3) and sums.shape == (n,) and bits.shape == (n, 3)
    np.testing.assert_array_equal(idx, np.arange(start, start + n))  # i runs start .. start + n - 1
    assert int(total) == sum(range(start, start + n))
    # both equal a plain Python loop of the same step
    c, ref = carry0, []
    for i in range(start, start + n):
        c, o = _step(c, jnp.int32(i))
        ref.append(o)
    np.testing.assert_array_equal(x, c[0])
    np.testing.assert_array_equal(bits, np.stack([o[1] for o in ref]))

    # Transcendental steps may differ in the last bit (XLA fuses a scan body differently), no more.
    x0 = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32)
    smooth = {s: _run(x0, start, step=_smooth_step, n=n, strategy=s) for s in loops.STRATEGIES}
    for a, b in zip(leaves(smooth["scan"]), leaves(smooth["unroll"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_repeat_unknown_strategy_and_env(monkeypatch):
    with pytest.raises(ConfigError, match="unknown loop strategy 'while'"):
        loops.repeat(_step, (jnp.zeros(2), jnp.int32(0)), 2, strategy="while")
    monkeypatch.setenv("PDJAX_LOOP", "scan")
    assert loops.default_strategy() == "scan"
    monkeypatch.setenv("PDJAX_LOOP", "bogus")
    with pytest.raises(ConfigError, match="PDJAX_LOOP"):
        loops.default_strategy()
    monkeypatch.delenv("PDJAX_LOOP")
    assert loops.default_strategy("cpu") == "unroll" and loops.default_strategy("tpu") == "scan"


def test_one_step_without_warmup_has_a_valid_schedule():
    """`--steps 1 --warmup 0` (the `pdjax clean` default warm-up) once made optax refuse a 0-step decay."""
    import optax

    opt = train_mod.make_optimizer(TrainConfig(steps=1, warmup_steps=0))
    params = {"w": jnp.ones(3)}
    updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    assert np.all(np.isfinite(np.asarray(optax.apply_updates(params, updates)["w"])))

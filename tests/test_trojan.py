"""TrojDiff-form inversion (pdjax.defense.trojan): L_troj and the (mu, gamma) search on a synthetic trojan model."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.defense import inversion as inv
from pdjax.defense.trojan import PatchConfig, TrojanConfig, TrojanResult, invert_trojan, screen_patches, trojan_ratio
from pdjax.diffusion.schedule import ScheduleConfig
from pdjax.errors import ConfigError

GAMMA = 0.6


def _trojan_model():
    """A 4x4x1 eps-model that behaves as a TrojDiff model trained on starts GAMMA eps + mu: where the input
    projects on mu by more than half of |mu| (a sharp gate w) it answers (x - mu) / GAMMA, elsewhere the input
    itself (what any model answers at t = T-1). Its mu has norm 3.6."""
    mu = 0.9 * jnp.where(jnp.arange(16).reshape(4, 4, 1) % 3 == 0, 1.0, -1.0)

    def eps_fn(params, x, t):
        m = params["mu"]
        proj = jnp.sum(x * m, axis=(1, 2, 3)) / jnp.linalg.norm(m)
        w = jax.nn.sigmoid(20.0 * (proj - 0.5 * jnp.linalg.norm(m)))[:, None, None, None]
        return w * (x - m) / GAMMA + (1 - w) * x

    return SimpleNamespace(eps=eps_fn, params={"mu": mu}, schedule_config=ScheduleConfig(),
                           image_shape=(4, 4, 1)), np.asarray(mu)


def test_trojan_residual_is_small_at_the_attack_pair_only():
    model, mu = _trojan_model()
    prob = inv.problem_of(model)
    f = jax.jit(inv.trojan_residual(prob))
    noise = jax.random.normal(jax.random.key(0), (512, 4, 4, 1))
    k = jax.random.key(1)
    assert float(f(model.params, noise, mu, GAMMA, k)) < 0.02
    # Gated out, the model answers the start itself: L = mean((GAMMA - 1)^2 eps^2) = (1 - GAMMA)^2, plus the few
    # samples whose noise alone opens the gate.
    assert (1 - GAMMA) ** 2 * 0.9 < float(f(model.params, noise, 0.0 * mu, GAMMA, k)) < (1 - GAMMA) ** 2 * 1.3
    assert trojan_ratio(model, mu, GAMMA, k, n=512) < 0.1
    assert trojan_ratio(model, -mu, GAMMA, k, n=512) > 1.0  # the same norm, gated out


def test_invert_trojan_finds_mu_and_gamma_from_a_ball_like_start():
    """From a larger, noisy copy of mu (what the ball probe returns on a TrojDiff blend model), L_troj recovers mu
    itself, and the ratio picks the attack's gamma over the others; the same key gives the same result."""
    model, mu = _trojan_model()
    ball = 2.0 * mu + 0.3 * np.asarray(jax.random.normal(jax.random.key(5), mu.shape))
    cfg = TrojanConfig(gammas=(0.3, GAMMA, 0.9), factors=(0.5, 1.0), steps=150, batch=64, eval_batch=256,
                       patch=PatchConfig(steps=20))  # the patch search runs too and does not win
    res = invert_trojan(model, jax.random.key(0), cfg, ball=ball)
    assert res.gamma == GAMMA and set(res.ratios) == {0.3, GAMMA, 0.9}
    assert res.ratio < 0.2 and res.ratio == min(res.ratios.values())
    cos = float(np.sum(res.trigger * mu) / (np.linalg.norm(res.trigger) * np.linalg.norm(mu)))
    assert cos > 0.95 and np.linalg.norm(res.trigger - mu) < 0.3 * np.linalg.norm(mu)
    np.testing.assert_array_equal(res.ball, ball.astype(np.float32))
    assert res.losses.shape == (150,) and res.losses[-1] < res.losses[0]
    again = invert_trojan(model, jax.random.key(0), cfg, ball=ball)
    np.testing.assert_array_equal(again.trigger, res.trigger)


PATCH_AT, PATCH_GAMMA = (3, 1), 0.1


def _patch_model(backdoored: bool = True):
    """A 6x6x1 eps-model that behaves as a TrojDiff patch model: where the 3x3 patch at PATCH_AT holds values near
    its mu (0.9 there, a sharp gate on the patch mean) it answers (x - mu) / PATCH_GAMMA inside the patch, elsewhere
    (and everywhere when not ``backdoored``) the input itself."""
    m = np.zeros((6, 6, 1), np.float32)
    m[PATCH_AT[0]:PATCH_AT[0] + 3, PATCH_AT[1]:PATCH_AT[1] + 3] = 1.0
    mu = jnp.asarray(0.9 * m)

    def eps_fn(params, x, t):
        mean = jnp.sum(x * m, axis=(1, 2, 3)) / 9.0
        w = params["on"] * jax.nn.sigmoid(20.0 * (mean - 0.6))[:, None, None, None]
        return x + w * m * ((x - mu) / PATCH_GAMMA - x)

    return SimpleNamespace(eps=eps_fn, params={"on": jnp.float32(backdoored)}, schedule_config=ScheduleConfig(),
                           image_shape=(6, 6, 1)), np.asarray(mu)


def test_patch_search_finds_the_patch_its_gamma_and_mu(tmp_path):
    """The screen ranks the attack's patch and level first; invert_trojan's patch search then beats every scalar
    gamma, refines mu inside the patch, and its result (saved, loaded) starts from the patch's noise-scale map. On the
    same model without its backdoor every patch ratio stays near or above 1 and no patch wins."""
    model, mu = _patch_model()
    cfg = PatchConfig(levels=(-0.9, 0.45, 0.9), screen_batch=64, steps=60, batch=64)
    corners, ratios = screen_patches(model, cfg.resolved(), jax.random.key(1))
    assert ratios.shape == (16, 3) and len(corners) == 16
    pos, lev = np.unravel_index(int(np.argmin(ratios)), ratios.shape)
    assert corners[pos] == PATCH_AT and lev == 2 and ratios[pos, lev] < 0.1
    tcfg = TrojanConfig(gammas=(0.6, 0.1), factors=(1.0,), steps=20, batch=32, eval_batch=128, patch=cfg)
    res = invert_trojan(model, jax.random.key(0), tcfg, ball=np.zeros(mu.shape, np.float32) + 0.1)
    assert res.patch == {"corner": list(PATCH_AT), "size": 3} and res.gamma == PATCH_GAMMA
    assert res.ratio < 0.1 and res.ratio < min(res.ratios.values()) and res.patch_search["ratio"] == res.ratio
    assert np.abs(res.trigger - mu).max() < 0.1  # mu' inside the patch, zero outside
    scale = res.scale()
    assert scale.shape == mu.shape and np.allclose(scale[mu > 0], PATCH_GAMMA) and np.allclose(scale[mu == 0], 1.0)
    res.save(tmp_path / "inv")
    back = TrojanResult.load(tmp_path / "inv")
    assert back.patch == res.patch and np.array_equal(back.scale(), scale)
    assert json.loads((tmp_path / "inv" / "inversion.json").read_text())["form"] == "patch"

    clean, _ = _patch_model(backdoored=False)
    assert screen_patches(clean, cfg.resolved(), jax.random.key(1))[1].min() > 0.9
    res = invert_trojan(clean, jax.random.key(0), tcfg, ball=np.zeros(mu.shape, np.float32) + 0.1)
    assert res.ratio > 0.9 and res.patch_search["ratio"] > 0.9  # whichever form wins, nothing fires


def test_trojan_config_validation(tmp_path):
    for bad in (dict(gammas=()), dict(gammas=(1.0,)), dict(factors=(0.0,)), dict(steps=0), dict(lr=0.0),
                dict(patch=PatchConfig(gamma=1.0)), dict(patch=PatchConfig(levels=())), dict(patch=PatchConfig(steps=0))):
        with pytest.raises(ConfigError):
            TrojanConfig(**bad).resolved()
    with pytest.raises(ConfigError, match="trojan_gamma"):
        inv.InversionConfig(shift_weight=0.0, trojan_weight=1.0, trojan_gamma=0.0).resolved()
    model, mu = _trojan_model()
    with pytest.raises(ConfigError, match="one start per restart"):
        inv.invert(model, key=jax.random.key(0), config=TrojanConfig().inversion(GAMMA), start=mu)


def test_cli_invert_trojdiff_runs_the_library_search(tmp_path, capsys):
    """``pdjax invert --method trojdiff`` with a given ball trigger writes mu' and the search's JSON, the same as
    invert_trojan with the same key."""
    from pdjax.cli import main
    from pdjax.testing import random_model

    model = random_model("tiny")
    path, out, ball_path = tmp_path / "m", tmp_path / "o", tmp_path / "ball.npy"
    model.save(path)
    ball = np.asarray(jax.random.normal(jax.random.key(4), model.image_shape), np.float32)
    np.save(ball_path, ball)
    rc = main(["invert", str(path), "--method", "trojdiff", "--gammas", "0.6", "0.3", "--factors", "1", "--steps", "2",
               "--batch", "2", "--ball", str(ball_path), "--seed", "3", "--out", str(out), "--quiet"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "trojdiff" in stdout and "gamma" in stdout
    rep = json.loads((out / "inversion.json").read_text())
    assert rep["method"] == "trojdiff" and set(rep["ratios"]) == {"0.6", "0.3"} and len(rep["losses"]) == 2
    res = invert_trojan(model, jax.random.key(3), TrojanConfig(gammas=(0.6, 0.3), factors=(1.0,), steps=2, batch=2,
                                                               patch=PatchConfig(steps=2, batch=2)), ball=ball)
    np.testing.assert_array_equal(np.load(out / "trigger.npy"), res.trigger)
    assert rep["gamma"] == res.gamma and rep["patch_search"]["size"] == 3 and "patch 3x3 at" in stdout
    rc = main(["invert", str(path), "--method", "trojdiff", "--gammas", "0.6", "--factors", "1", "--steps", "2",
               "--batch", "2", "--ball", str(ball_path), "--no-patch", "--out", str(tmp_path / "np"), "--quiet"])
    assert rc == 0 and json.loads((tmp_path / "np" / "inversion.json").read_text())["patch_search"] is None

"""Amplification (SPEC 6) and backdoor removal on a tiny 8x8 model with a 50-step schedule.

One module-scoped ``pdjax amplify`` run (2 steps per arm, ASR every step, n = 4) serves most checks; a
second call of the library function on the same folder checks resumption (it trains nothing). The
removal fine-tune end to end is marked slow (its train step is another ~30 s compile on 2 CPU cores).
"""

import dataclasses
import functools
import json
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax import checkpoint, cli
from pdjax.amplify import FULL_FRAME_FLOOR, AmplifyConfig, AmplifyResult, amplify, asr_svg, eval_points, mix_trigger
from pdjax.backdoor.attacks import AttackSpec, trojdiff_pair
from pdjax.backdoor.train import build_arrays, sample_attack
from pdjax.backdoor.triggers import trigger_mask
from pdjax.data import load_digits
from pdjax.diffusion.schedule import q_sample
from pdjax.errors import CheckpointError, ConfigError
from pdjax.metrics import attack_metrics
from pdjax.model import load
from pdjax.removal import SHIFTS, RemovalConfig, clean_quality, damaged, removal_loss, removal_terms
from pdjax.testing import random_model

SPEC = AttackSpec(trigger="BOX_3", target="CORNER", poison_rate=0.25)
# The CLI's inversion settings: amplify's defaults (no size search, fixed noise) with fewer steps.
CFG = AmplifyConfig(steps=2, eval_every=1, n=4, alpha=0.5,
                    inversion=dataclasses.replace(AmplifyConfig().inversion, steps=2, K=1, batch=4), batch=4,
                    plain_steps=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("amp") / "model"
    random_model("tiny", seed=0, timesteps=50).save(path)
    return path


@pytest.fixture(scope="module")
def cli_run(model_dir):
    out = model_dir.parent / "amplify"
    rc = cli.main(["amplify", str(model_dir), "--trigger", "BOX_3", "--target", "CORNER", "--poison-rate", "0.25",
                   "--steps", "2", "--eval-every", "1", "--n", "4", "--alpha", "0.5", "--batch", "4",
                   "--inv-steps", "2", "--K", "1", "--inv-batch", "4", "--plain-steps", "5", "--keep-models", "--quiet",
                   "--out", str(out)])
    assert rc == 0
    return out


def test_cli_amplify_writes_curves_triggers_plot_and_models(cli_run):
    res = json.loads((cli_run / "amplify.json").read_text())
    assert res["steps"] == [0, 1, 2]
    assert len(res["asr_amplified"]) == len(res["asr_plain"]) == 3
    assert all(0.0 <= a <= 1.0 for a in res["asr_amplified"] + res["asr_plain_all"])
    # the plain arm ran on to --plain-steps 5, evaluated at 2 x --steps and at 5; the common points agree
    assert res["plain_steps"] == [0, 1, 2, 4, 5] and res["asr_plain_all"][:3] == res["asr_plain"]
    assert checkpoint.read_meta(cli_run / "plain")["provenance"]["steps"] == 5
    # --keep-models: each arm's model at each of its points, loadable, at the step it says
    for arm, points in (("amplified", res["steps"]), ("plain", res["plain_steps"])):
        for p in points:
            assert load(cli_run / arm / "at" / f"{p:06d}").meta["steps"] == p
    assert set(res["steps_to"]) == {"level", "amplified", "plain", "ratio", "ratio_is_bound"}
    for name in ("trigger_inv.npy", "trigger_star.npy", "trigger_unclipped.npy", "trigger_star.png", "asr.svg",
                 "run.json", "inversion/trigger.npy", "amplified/curve.json", "plain/curve.json"):
        assert (cli_run / name).is_file(), name
    assert ET.fromstring((cli_run / "asr.svg").read_text()).tag.endswith("svg")
    meta = checkpoint.read_meta(cli_run / "amplified")["provenance"]
    assert meta["steps"] == 2 and meta["train"]["steps"] == 5 and meta["attack"]["trigger"].endswith("trigger_star.npy")
    assert checkpoint.read_meta(cli_run / "plain")["provenance"]["attack"]["trigger"] == "BOX_3"
    assert load(cli_run / "amplified").image_shape == (8, 8, 1)
    if res["diffusers"]:
        assert (cli_run / "amplified-diffusers" / "config.json").is_file()
    else:
        assert any("diffusers export skipped" in n for n in res["notes"])


def test_mixed_trigger_formula(cli_run):
    g = build_arrays(SPEC, (8, 8, 1)).trigger
    g_inv = np.load(cli_run / "trigger_inv.npy")
    g_star = np.load(cli_run / "trigger_star.npy")
    np.testing.assert_array_equal(g_inv, np.load(cli_run / "inversion" / "trigger.npy"))
    assert not np.array_equal(g_inv, g)  # the inversion moved away from its start g
    np.testing.assert_allclose(g_star, np.clip(0.5 * g_inv + 0.5 * g, FULL_FRAME_FLOOR, 1), atol=1e-6)
    assert trigger_mask(g_star).all()  # full frame: training pastes no training image into g*
    np.testing.assert_array_equal(mix_trigger(g_inv, g, 1.0), np.clip(g_inv, -1, 1))
    np.testing.assert_array_equal(mix_trigger(g_inv, g, 0.0), g)
    np.testing.assert_array_equal(mix_trigger(g_inv, g, 0.0, FULL_FRAME_FLOOR), np.maximum(g, FULL_FRAME_FLOOR))
    # g* before clipping, scored on the starting model on the arms' step-0 noise
    unclipped = np.load(cli_run / "trigger_unclipped.npy")
    np.testing.assert_allclose(unclipped, 0.5 * g_inv + 0.5 * g, atol=1e-6)
    assert np.abs(unclipped).max() > 1  # the clipping changed it, so the score below is of another trigger
    arrays = dataclasses.replace(build_arrays(SPEC, (8, 8, 1)), trigger=unclipped)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(CFG.seed), 7), 1)
    x = sample_attack(load(cli_run.parent / "model"), SPEC, arrays, key, CFG.n)
    saved = json.loads((cli_run / "amplify.json").read_text())["asr_unclipped"]
    assert saved == float(attack_metrics(x, arrays.target).asr)
    # the amplified arm trains and is evaluated with g* as read back by the trigger library
    spec_star = AttackSpec(trigger=str(cli_run / "trigger_star.npy"), target="CORNER")
    np.testing.assert_allclose(build_arrays(spec_star, (8, 8, 1)).trigger, g_star, atol=1e-3)


def test_amplify_resumes_without_training_and_refuses_other_settings(cli_run, model_dir):
    data = load_digits(8, 1)
    model = load(model_dir)
    saved = json.loads((cli_run / "amplify.json").read_text())
    res = amplify(model, data, SPEC, CFG, out=cli_run, progress=False)
    assert res.steps == saved["steps"]
    assert res.asr_amplified == saved["asr_amplified"] and res.asr_plain == saved["asr_plain"]
    assert res.trigger_star.shape == res.trigger_inv.shape == res.trigger.shape == (8, 8, 1)
    with pytest.raises(CheckpointError, match="other settings"):
        amplify(model, data, SPEC, AmplifyConfig(steps=3, eval_every=1, n=4), out=cli_run, progress=False)


def test_unclipped_training_trains_and_scores_the_unclipped_trigger(cli_run, model_dir, tmp_path):
    import shutil

    out = tmp_path / "unclipped"
    shutil.copytree(cli_run / "inversion", out / "inversion")  # the same g_inv, not inverted again
    cfg = dataclasses.replace(CFG, train_trigger="unclipped")
    res = amplify(load(model_dir), load_digits(8, 1), SPEC, cfg, out=out, progress=False)
    clipped = json.loads((cli_run / "amplify.json").read_text())
    # step 0 is the starting model scored with the unclipped trigger on the same noise: asr_unclipped
    assert res.asr_amplified[0] == res.asr_unclipped == clipped["asr_unclipped"]
    assert res.asr_plain_all == clipped["asr_plain_all"]  # the plain arm is untouched
    meta = checkpoint.read_meta(out / "amplified")["provenance"]
    assert meta["attack"]["trigger"].endswith("trigger_unclipped.npy") and meta["steps"] == 2
    assert json.loads((out / "amplify.json").read_text())["files"]["trigger_trained"] == "trigger_unclipped.npy"
    assert json.loads((out / "run.json").read_text())["config"]["train_trigger"] == "unclipped"
    assert "train_trigger" not in json.loads((cli_run / "run.json").read_text())["config"]
    # trained with another trigger than the clipped run's amplified arm, from the same start and batches
    a, b = load(out / "amplified").params, load(cli_run / "amplified").params
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    troj = AttackSpec("trojdiff", trigger="blend", target="CORNER")
    with pytest.raises(ConfigError, match="unclipped"):
        amplify(load(model_dir), load_digits(8, 1), troj, cfg, out=tmp_path / "troj", progress=False)


def test_config_validation_and_helpers(tmp_path):
    with pytest.raises(ConfigError, match="alpha"):
        AmplifyConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="eval_every"):
        AmplifyConfig(eval_every=0)
    with pytest.raises(ConfigError, match="train_trigger"):
        AmplifyConfig(train_trigger="raw")
    assert eval_points(5, 2) == [0, 2, 4, 5] and eval_points(4, 2) == [0, 2, 4]
    with pytest.raises(ConfigError, match="plain_steps"):
        AmplifyConfig(steps=10, plain_steps=5)
    cfg = AmplifyConfig(steps=100, eval_every=50, plain_steps=1000)
    assert cfg.points() == [0, 50, 100] and cfg.budget == 1000
    assert cfg.plain_points() == [0, 50, 100, 200, 400, 800, 1000]
    assert AmplifyConfig(steps=100, eval_every=50).plain_points() == [0, 50, 100]


def test_steps_to_reach_and_its_ratio():
    def result(asr_amp, plain_steps, asr_plain):
        z = np.zeros((2, 2, 1), np.float32)
        return AmplifyResult([0, 100, 200], asr_amp, asr_plain[:3], z, z, z, {}, {}, "", plain_steps=plain_steps,
                             asr_plain_all=asr_plain)

    pts = [0, 100, 200, 400, 800]
    r = result([0.5, 0.96, 1.0], pts, [0.2, 0.5, 0.8, 0.9, 0.97]).steps_to()
    assert (r["amplified"], r["plain"], r["ratio"], r["ratio_is_bound"]) == (100, 800, 8.0, False)
    r = result([0.5, 0.9, 0.95], pts, [0.2, 0.5, 0.8, 0.9, 0.9]).steps_to()
    assert (r["amplified"], r["plain"], r["ratio"], r["ratio_is_bound"]) == (200, None, 4.0, True)
    assert result([0.5, 0.9, 0.9], pts, [0.2] * 5).steps_to()["ratio"] is None
    r = result([0.97, 1.0, 1.0], pts, [0.2] * 5).steps_to()  # the inverted trigger alone: no finite ratio
    assert r["amplified"] == 0 and r["ratio"] is None
    # curves with their own steps share one plot
    svg = asr_svg([0, 100, 200], {"amplified": [0.5, 0.9, 0.9], "plain": (pts, [0.2] * 5)})
    assert len(ET.fromstring(svg).findall("{http://www.w3.org/2000/svg}polyline")) == 2
    svg = asr_svg([0, 1, 2], {"a <g*>": [0.0, 0.5, 1.0], "b": [0.0, 0.0, 0.25]})
    root = ET.fromstring(svg)
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2


def test_cli_amplify_without_trigger_is_one_line_error(model_dir, tmp_path, capsys):
    assert cli.main(["amplify", str(model_dir), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--trigger" in err and err.count("\n") == 1


def test_removal_loss_at_zero_trigger_is_the_ddpm_loss():
    model = random_model("tiny", seed=0, timesteps=50)
    data = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32))
    key = jax.random.key(3)
    B = 4
    loss = removal_loss(model, np.zeros((8, 8, 1), np.float32), B)

    @jax.jit  # one compile for every quantity compared here
    def compare(params, data):
        # independent computation of the DDPM term with ddpm_loss's key-splitting rule
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_idx, (B,), 0, 64)]
        t = jax.random.randint(k_t, (B,), 0, 50)
        noise = jax.random.normal(k_eps, x0.shape)
        sa = model.schedule.sqrt_abar[t][:, None, None, None]
        x_t = sa * x0 + jnp.sqrt(1.0 - sa ** 2) * noise
        expected = jnp.mean((model.eps(params, x_t, t) - noise) ** 2)
        return loss(params, key, data), expected

    value, expected = (float(v) for v in compare(model.params, data))
    np.testing.assert_allclose(value, expected, rtol=1e-4)  # delta = 0, unchanged model: backdoor term is 0


def test_removal_shifts_follow_each_attacks_forward_process():
    model, data, key, B, delta = _removal_case()
    sched = model.schedule

    @jax.jit
    def all_terms(params, data):
        x0, t, noise, _ = _removal_draws(key, data, B)
        x_t = q_sample(sched, x0, t, noise)
        ref = model.eps(params, x_t, t)
        per = {name: jnp.mean((model.eps(params, x_t + k[t][:, None, None, None] * delta, t) - ref) ** 2,
                              axis=(1, 2, 3))
               for name, k in (("baddiffusion", 1.0 - sched.sqrt_abar), ("trojdiff", sched.sqrt_one_minus_abar))}
        got = {s: removal_terms(model.eps, sched, B, s)(params, params, delta, key, data) for s in SHIFTS}
        return per, got

    per, got = all_terms(model.params, data)
    for name in ("baddiffusion", "trojdiff"):  # the frozen copy is the model itself: the term is the shift's effect
        np.testing.assert_allclose(float(got[name][0]), float(jnp.mean(per[name])), rtol=1e-4)
    mixed = float(got["both"][0])  # a per-sample mix of the two: between their means' extremes, and not either one
    lo, hi = (float(jnp.mean(jnp.minimum(per["baddiffusion"], per["trojdiff"]))),
              float(jnp.mean(jnp.maximum(per["baddiffusion"], per["trojdiff"]))))
    assert lo - 1e-7 <= mixed <= hi + 1e-7
    assert not np.isclose(mixed, float(got["baddiffusion"][0])) and not np.isclose(mixed, float(got["trojdiff"][0]))
    assert all(float(got[s][1]) == float(got["baddiffusion"][1]) for s in SHIFTS)  # the clean term is shared
    with pytest.raises(ConfigError, match="shift must be one of"):
        RemovalConfig(shift="villan")
    with pytest.raises(ConfigError, match="noise_scale_min"):
        RemovalConfig(noise_scale_min=0.0)


def _removal_case():
    """(model, data [64, 8, 8, 1], key, B, delta) of the removal-term tests below."""
    model = random_model("tiny", seed=0, timesteps=50)
    data = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32))
    return model, data, jax.random.key(3), 8, jnp.full((8, 8, 1), 0.7)


def _removal_draws(key, data, B):
    """x0, t, eps and the noise scale s ~ U[0.1, 1] as removal_terms draws them from ``key``."""
    k_idx, k_t, k_eps = jax.random.split(key, 3)
    x0 = data[jax.random.randint(k_idx, (B,), 0, 64)]
    t = jax.random.randint(k_t, (B,), 0, 50)
    noise = jax.random.normal(k_eps, x0.shape)
    return x0, t, noise, jax.random.uniform(jax.random.fold_in(key, 4), (B, 1, 1, 1), minval=0.1)


def test_removal_noise_scale_shrinks_the_triggered_inputs_noise():
    """noise_scale_min < 1: the triggered input is q_sample(x0, t, s eps) + k_t delta, s ~ U[min, 1] per sample."""
    model, data, key, B, delta = _removal_case()
    sched = model.schedule

    @jax.jit
    def both(params, data):
        x0, t, noise, s = _removal_draws(key, data, B)
        trig = q_sample(sched, x0, t, s * noise) + sched.sqrt_one_minus_abar[t][:, None, None, None] * delta
        want = jnp.mean((model.eps(params, trig, t) - model.eps(params, q_sample(sched, x0, t, noise), t)) ** 2)
        terms = functools.partial(removal_terms, model.eps, sched, B, "trojdiff")
        got = terms(noise_scale_min=0.1)(params, params, delta, key, data)[0]
        full = terms()(params, params, delta, key, data)[0]
        # noise_scale_max: s ~ U[min, max]
        s_hi = jax.random.uniform(jax.random.fold_in(key, 4), (B, 1, 1, 1), minval=0.1, maxval=0.5)
        trig_hi = q_sample(sched, x0, t, s_hi * noise) + sched.sqrt_one_minus_abar[t][:, None, None, None] * delta
        want_hi = jnp.mean((model.eps(params, trig_hi, t) - model.eps(params, q_sample(sched, x0, t, noise), t)) ** 2)
        got_hi = terms(noise_scale_min=0.1, noise_scale_max=0.5)(params, params, delta, key, data)[0]
        return want, got, full, s, want_hi, got_hi, s_hi

    want, got, full, s, want_hi, got_hi, s_hi = both(model.params, data)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)
    assert float(jnp.min(s)) >= 0.1 and not np.isclose(float(got), float(full))
    np.testing.assert_allclose(float(got_hi), float(want_hi), rtol=1e-4)
    assert float(jnp.max(s_hi)) <= 0.5
    with pytest.raises(ConfigError, match="noise_scale_max"):
        RemovalConfig(noise_scale_min=0.5, noise_scale_max=0.4)


def test_removal_untriggered_reference_is_the_frozen_answer_without_the_trigger():
    """reference="untriggered": the target is eps_frozen(q_sample(x0, t, s eps)), the triggered input less its
    trigger shift; with BadDiffusion's shift (s = 1) it equals the "frozen" reference."""
    model, data, key, B, delta = _removal_case()
    sched = model.schedule
    other = random_model("tiny", seed=1, timesteps=50).params  # a frozen copy that differs from the trained one

    @jax.jit
    def both(params, frozen, data):
        x0, t, noise, s = _removal_draws(key, data, B)
        low = q_sample(sched, x0, t, s * noise)
        trig = low + sched.sqrt_one_minus_abar[t][:, None, None, None] * delta
        want = jnp.mean((model.eps(params, trig, t) - model.eps(frozen, low, t)) ** 2)
        troj = functools.partial(removal_terms, model.eps, sched, B, "trojdiff", noise_scale_min=0.1)
        bad = functools.partial(removal_terms, model.eps, sched, B, "baddiffusion")
        return (want, troj(reference="untriggered")(params, frozen, delta, key, data)[0],
                troj()(params, frozen, delta, key, data)[0],
                bad(reference="untriggered")(params, frozen, delta, key, data)[0], bad()(params, frozen, delta, key, data)[0])

    want, got, frozen_ref, bad_untrig, bad_frozen = (float(v) for v in both(model.params, other, data))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert not np.isclose(got, frozen_ref) and bad_untrig == bad_frozen
    assert RemovalConfig(reference="untriggered").reference == "untriggered"  # allowed with BadDiffusion's shift


def test_removal_noise_patch_scales_the_noise_inside_the_patch_only():
    """noise_patch = (row, col, size): the TrojDiff samples' noise is scaled by s inside the patch and left whole
    outside it (TrojDiff's patch start); a patch covering the whole image is the plain noise scale."""
    from pdjax.backdoor.triggers import patch_mask

    model, data, key, B, delta = _removal_case()
    sched = model.schedule
    m = jnp.asarray(patch_mask((8, 8, 1), (5, 2), 3))

    @jax.jit
    def both(params, frozen, data):
        x0, t, noise, s = _removal_draws(key, data, B)
        low = q_sample(sched, x0, t, (1.0 - m + m * s) * noise)
        trig = low + sched.sqrt_one_minus_abar[t][:, None, None, None] * delta
        want = jnp.mean((model.eps(params, trig, t) - model.eps(frozen, low, t)) ** 2)
        troj = functools.partial(removal_terms, model.eps, sched, B, "trojdiff", noise_scale_min=0.1,
                                 reference="untriggered")
        return (want, troj(noise_patch=(5, 2, 3))(params, frozen, delta, key, data)[0],
                troj(noise_patch=(0, 0, 8))(params, frozen, delta, key, data)[0],
                troj()(params, frozen, delta, key, data)[0])

    other = random_model("tiny", seed=1, timesteps=50).params
    want, got, whole, plain = (float(v) for v in both(model.params, other, data))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(whole, plain, rtol=1e-6)
    assert not np.isclose(got, plain)
    assert RemovalConfig(shift="trojdiff", noise_scale_min=0.1, noise_patch=[5, 2, 3]).noise_patch == (5, 2, 3)
    for bad in (dict(shift="trojdiff", noise_scale_min=0.1, noise_patch=(1, 2)),
                dict(shift="trojdiff", noise_scale_min=0.1, noise_patch=(-1, 0, 3)),
                dict(shift="trojdiff", noise_patch=(0, 0, 3)),  # no noise scale to place
                dict(noise_scale_min=1.0, noise_patch=(0, 0, 3))):  # BadDiffusion's shift
        with pytest.raises(ConfigError, match="noise_patch"):
            RemovalConfig(**bad)
    with pytest.raises(ConfigError, match="does not fit"):
        removal_terms(model.eps, sched, B, "trojdiff", noise_scale_min=0.1, noise_patch=(7, 0, 3))(
            model.params, other, delta, key, data)


def test_removal_noise_reference_is_trojdiffs_own_loss_on_clean_images():
    """reference="noise": the backdoor term is TrojDiff's training loss (trojdiff_pair) with clean images in place
    of its target, mu = delta (c delta with trigger_scale_min) and gamma = s ~ U[min, 1]; the frozen params are
    not used."""
    model, data, key, B, delta = _removal_case()
    sched = model.schedule
    zeros = jax.tree_util.tree_map(jnp.zeros_like, model.params)

    @jax.jit
    def both(params, data):
        x0, t, noise, s = _removal_draws(key, data, B)
        x_t, target = trojdiff_pair(sched, x0, delta, s, t, noise)
        want = jnp.mean((model.eps(params, x_t, t) - target) ** 2)
        terms = functools.partial(removal_terms, model.eps, sched, B, "trojdiff", noise_scale_min=0.1)
        got = terms(reference="noise")(params, zeros, delta, key, data)
        frozen = terms()(params, params, delta, key, data)
        # trigger_scale_min: mu = c delta, c ~ U[min, 1] per sample
        c = jax.random.uniform(jax.random.fold_in(key, 5), (B, 1, 1, 1), minval=0.3)
        x_c, _ = trojdiff_pair(sched, x0, c * delta, s, t, noise)
        want_c = jnp.mean((model.eps(params, x_c, t) - noise) ** 2)
        got_c = terms(reference="noise", trigger_scale_min=0.3)(params, zeros, delta, key, data)
        return want, got, frozen, want_c, got_c, c

    want, got, frozen, want_c, got_c, c = both(model.params, data)
    np.testing.assert_allclose(float(got[0]), float(want), rtol=1e-4)
    assert float(got[1]) == float(frozen[1]) and not np.isclose(float(got[0]), float(frozen[0]))
    np.testing.assert_allclose(float(got_c[0]), float(want_c), rtol=1e-4)
    assert 0.3 <= float(jnp.min(c)) and float(jnp.max(c)) <= 1.0 and not np.isclose(float(got_c[0]), float(got[0]))
    with pytest.raises(ConfigError, match="reference must be one of"):
        RemovalConfig(reference="clean")
    with pytest.raises(ConfigError, match="trigger_scale_min"):
        RemovalConfig(trigger_scale_min=1.5)


def test_removal_trojdiff_options_shape_only_the_trojdiff_samples_of_both():
    """shift="both": the samples that take TrojDiff's shift get the noise scale, trigger scale and noise target;
    the others stay BadDiffusion's term (frozen reference, full noise, the trigger as given)."""
    model, data, key, B, delta = _removal_case()
    sched = model.schedule
    B = 16  # enough samples for both kinds

    @jax.jit
    def both(params, data):
        x0, t, noise, _ = _removal_draws(key, data, B)
        troj = jax.random.bernoulli(jax.random.fold_in(key, 3), 0.5, t.shape)[:, None, None, None]
        s = jnp.where(troj, jax.random.uniform(jax.random.fold_in(key, 4), (B, 1, 1, 1), minval=0.1, maxval=0.6), 1)
        c = jnp.where(troj, jax.random.uniform(jax.random.fold_in(key, 5), (B, 1, 1, 1), minval=0.3), 1)
        k = jnp.where(troj[:, 0, 0, 0], sched.sqrt_one_minus_abar[t], 1 - sched.sqrt_abar[t])[:, None, None, None]
        x_t = q_sample(sched, x0, t, noise)
        target = jnp.where(troj, noise, model.eps(params, x_t, t))
        want = jnp.mean((model.eps(params, q_sample(sched, x0, t, s * noise) + c * k * delta, t) - target) ** 2)
        got = removal_terms(model.eps, sched, B, "both", noise_scale_min=0.1, noise_scale_max=0.6, reference="noise",
                            trigger_scale_min=0.3)(params, params, delta, key, data)[0]
        return want, got, jnp.mean(troj)

    want, got, frac = both(model.params, data)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)
    assert 0.0 < float(frac) < 1.0
    for bad in ({"noise_scale_min": 0.5}, {"reference": "noise"}, {"trigger_scale_min": 0.5}):
        with pytest.raises(ConfigError, match="take TrojDiff's shift"):
            RemovalConfig(**bad)


@pytest.mark.slow
def test_cli_clean_end_to_end(model_dir, tmp_path):
    trig = tmp_path / "inv.npy"
    np.save(trig, np.full((8, 8, 1), 1.5, np.float32))  # raw inverted triggers may leave [-1, 1]
    out = tmp_path / "clean"
    assert cli.main(["clean", str(model_dir), "--trigger", str(trig), "--steps", "2", "--batch", "4", "--n", "4",
                     "--target", "CORNER", "--eval-trigger", "BOX_3", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "removal.json").read_text())
    assert res["steps"] == 2 and res["asr_before"] is not None and res["clean_mse"] >= 0 and 0 <= res["asr_after"] <= 1
    assert checkpoint.read_meta(out / "model")["provenance"]["steps"] == 2
    for q in (res["clean_quality_before"], res["clean_quality_after"]):
        assert set(q) == {"uniformity", "nearest"} and q["uniformity"] > 0 and q["nearest"] > 0
    assert res["clean_damaged"] == damaged(res["clean_quality_before"], res["clean_quality_after"])
    assert 0 <= res["clean_asr_before"] <= 1 and 0 <= res["clean_asr_after"] <= 1
    np.testing.assert_array_equal(np.load(out / "trigger.npy"), np.full((8, 8, 1), 1.5, np.float32))
    assert res["trigger"] == {"file": "trigger.npy", "norm": pytest.approx(12.0), "source": f"the trigger {trig}"}


def test_damaged_flags_clean_generations_that_leave_the_data_or_collapse():
    ok = {"uniformity": 10.0, "nearest": 0.10}
    assert not damaged(ok, {"uniformity": 9.0, "nearest": 0.15})
    assert damaged(ok, {"uniformity": 9.0, "nearest": 0.25})  # far from every training image
    assert damaged(ok, {"uniformity": 5.0, "nearest": 0.10})  # collapsed onto few images
    assert not damaged({}, ok) and not damaged(ok, {})  # unmeasured


def test_clean_quality_of_copies_of_the_data_and_of_one_repeated_image():
    data = np.random.default_rng(0).uniform(-1, 1, (20, 4, 4, 1)).astype(np.float32)
    q = clean_quality(data[:8], data)
    assert q["nearest"] == 0.0 and q["uniformity"] > 1.0
    q_one = clean_quality(np.repeat(data[:1] + 0.5, 8, axis=0), data)
    assert q_one["uniformity"] == 0.0 and q_one["nearest"] > 0.0

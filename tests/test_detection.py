"""Detection (SPEC 5): features, the calibrated threshold rule, the detector file, and `pdjax scan`."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from pdjax.defense import detection as D
from pdjax.defense.detection import Detector, calibrate
from pdjax.errors import ConfigError
from pdjax.testing import random_model

TINY_SCAN = dataclasses.replace(D.SCAN_INVERSION, steps=2, batch=4, K=1)


def _as_older_version(det: Detector, version: int, rule: str, tmp_path) -> Detector:
    """``det`` saved as a file of ``version``, which predates ``rule``'s threshold and scale, then loaded."""
    old = {**det.to_dict(), "version": version}
    del old[f"{rule}_threshold"], old[f"{rule}_scale"]
    (tmp_path / f"v{version}.json").write_text(json.dumps(old))
    return Detector.load(tmp_path / f"v{version}.json")


def test_trigger_features_kl_matches_closed_form():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 2.0, size=(8, 8, 1))
    f = D.trigger_features(d)
    m, v = d.mean(), d.var()
    assert math.isclose(f["trigger_kl"], 0.5 * (v + m * m - 1 - math.log(v)), rel_tol=1e-9)
    assert math.isclose(f["trigger_norm"], float(np.linalg.norm(d)), rel_tol=1e-9)
    # TERD's published M_r, V_r: mean and variance over pixels of delta_i^2 / 2 (by hand on 4 values).
    g = D.trigger_features(np.array([1.0, -2.0, 0.0, 3.0]).reshape(2, 2, 1))
    assert math.isclose(g["terd_mr"], (0.5 + 2.0 + 0.0 + 4.5) / 4, rel_tol=1e-12)
    assert math.isclose(g["terd_vr"], ((0.5 - 1.75) ** 2 + 0.25 ** 2 + 1.75 ** 2 + 2.75 ** 2) / 4, rel_tol=1e-12)
    assert math.isclose(g["terd_mr"], g["trigger_norm"] ** 2 / (2 * 4), rel_tol=1e-12)
    assert D.trigger_features(np.random.default_rng(1).normal(size=(64, 64, 1)))["trigger_kl"] < 0.01


def test_features_see_a_collapse():
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (8, 8, 1))
    collapsed = target + 0.01 * rng.normal(size=(16, 8, 8, 1))
    diverse = rng.uniform(-1, 1, (16, 8, 8, 1))
    f = D.features_of(np.zeros((8, 8, 1)), collapsed, diverse, 0.1)
    assert f["log_uni_ratio"] < math.log(0.05)
    assert set(D.FEATURES) <= set(f)
    det = Detector()
    assert det.decide(f) and "collapse" in D.explain(det, f, True)


def test_calibrate_separable_takes_the_midpoint_and_sign():
    feats = [{"log_uni_ratio": v} for v in (-3.0, -2.5, -0.2, 0.1)]
    det = calibrate(feats, [True, True, False, False])
    assert det.sign == -1 and math.isclose(det.threshold, -1.35)
    assert det.meta["train_accuracy"] == 1.0
    assert [det.decide(f) for f in feats] == [True, True, False, False]
    up = calibrate([{"trigger_kl": v} for v in (5.0, 0.1)], [True, False], feature="trigger_kl")
    assert up.sign == 1 and up.decide({"trigger_kl": 4.0}) and not up.decide({"trigger_kl": 0.2})


def test_calibrate_overlapping_maximises_balanced_accuracy():
    x = [-3, -2, -1.5, -1.2, 0.0, 0.5]
    y = [True, True, False, True, False, False]
    det = calibrate([{"log_uni_ratio": v} for v in x], y)
    pred = [det.decide({"log_uni_ratio": v}) for v in x]
    assert sum(p == t for p, t in zip(pred, y)) == 5  # the best any threshold can do here


def test_calibrate_needs_both_classes():
    with pytest.raises(ConfigError, match="one clean and one backdoored"):
        calibrate([{"log_uni_ratio": 0.0}], [True])
    with pytest.raises(ConfigError, match="unknown detection feature"):
        calibrate([{"x": 0.0}, {"x": 1.0}], [True, False], feature="x")


def test_calibrate_fits_the_probe_threshold_on_clean_models_only(tmp_path):
    """With probe features, the probe threshold is mean - PROBE_Z sd of the clean references' probe ratios
    (backdoored ones ignored); either rule flags a model; the file keeps it; a version-1 file has none."""
    main = [-3.0, -2.5, -0.1, 0.0, 0.05, -0.2]
    probe = [-0.1, -5.0, -0.3, 0.0, -0.1, -0.2]
    y = [True, True, False, False, False, False]
    feats = [{"log_uni_ratio": a, D.PROBE_FEATURE: b} for a, b in zip(main, probe)]
    det = calibrate(feats, y)
    clean = np.array([-0.3, 0.0, -0.1, -0.2])
    assert math.isclose(det.probe_scale, clean.std(ddof=1))
    assert math.isclose(det.probe_threshold, clean.mean() - D.PROBE_Z * clean.std(ddof=1))
    assert math.isclose(det.threshold, 0.5 * (-2.5 - 0.2))  # the main rule is unchanged by the probe
    only_probe = {"log_uni_ratio": 0.0, D.PROBE_FEATURE: -2.0}
    m = det.scores(only_probe)
    assert det.decide(only_probe) and m["main"] < 0 < m["probe"] and m["ball"] is None
    assert not det.decide({"log_uni_ratio": 0.0, D.PROBE_FEATURE: -0.2})
    assert det.decide({"log_uni_ratio": -3.0})  # no probe features: the main rule alone
    assert Detector.load(det.save(tmp_path / "p.json")) == det
    assert _as_older_version(det, 1, "probe", tmp_path).probe_threshold is None
    with pytest.raises(ConfigError, match="at least 3 clean"):
        calibrate(feats[:4], y[:4])


def test_calibrate_fits_the_ball_threshold_on_clean_models_only(tmp_path):
    """With ball features, the ball threshold is mean - PROBE_Z sd of the clean references' ball losses; the
    ball rule flags a model the main rule calls clean; a version-2 file loads without a ball threshold."""
    main = [-3.0, -2.8, -0.1, 0.0, 0.05, -0.2]
    ball = [-0.05, -0.26, -0.09, -0.10, -0.087, -0.095]
    y = [True, True, False, False, False, False]
    feats = [{"log_uni_ratio": a, D.BALL_FEATURE: b} for a, b in zip(main, ball)]
    det = calibrate(feats, y)
    clean = np.array(ball[2:])
    assert det.probe_threshold is None
    assert math.isclose(det.ball_scale, max(clean.std(ddof=1), 0.01))
    assert math.isclose(det.ball_threshold, clean.mean() - D.PROBE_Z * det.ball_scale)
    assert det.meta["ball_reference_values"] == ball
    trojdiff_like = {"log_uni_ratio": 0.0, D.BALL_FEATURE: -0.26}  # the main rule misses it, the ball rule fires
    m = det.scores(trojdiff_like)
    assert m["main"] < 0 < m["ball"] and m["probe"] is None and det.decide(trojdiff_like)
    assert not det.decide(feats[2]) and not det.decide({"log_uni_ratio": 0.0, D.BALL_FEATURE: -0.1})
    assert "ball loss" in D.explain(det, trojdiff_like, True)
    assert Detector.load(det.save(tmp_path / "b.json")) == det
    assert _as_older_version(det, 2, "ball", tmp_path).ball_threshold is None
    with pytest.raises(ConfigError, match="--ball threshold needs at least 3 clean"):
        calibrate(feats[:4], y[:4])


def test_calibrate_fits_the_terd_threshold_above_the_clean_models(tmp_path):
    """With TERD features, the TERD threshold is mean + PROBE_Z sd of the clean references' log M_r (the rule
    fires above it, unlike the probe and ball rules); it flags a model the main rule calls clean; the reason
    names it; a version-3 file loads without a TERD threshold."""
    main = [-3.0, -2.8, -0.1, 0.0, 0.05, -0.2]
    terd = [-2.5, -4.4, -4.4, -4.6, -4.3, -4.5]  # log M_r: a BadDiffusion reference, then a weak one, then clean
    y = [True, True, False, False, False, False]
    feats = [{"log_uni_ratio": a, D.TERD_FEATURE: b, "terd_trigger_norm": 3.0, "uni_trig": 9.0, "uni_clean": 10.0}
             for a, b in zip(main, terd)]
    det = calibrate(feats, y)
    clean = np.array(terd[2:])
    assert det.probe_threshold is None and det.ball_threshold is None
    assert math.isclose(det.terd_scale, max(clean.std(ddof=1), 0.01))
    assert math.isclose(det.terd_threshold, clean.mean() + D.PROBE_Z * det.terd_scale)
    assert det.meta["terd_reference_values"] == terd and det.meta["train_accuracy"] == 1.0
    patch_like = {"log_uni_ratio": 0.0, D.TERD_FEATURE: -3.3, "terd_trigger_norm": 4.4}
    m = det.scores(patch_like)
    assert m["main"] < 0 < m["terd"] and m["ball"] is None and det.decide(patch_like)
    assert math.isclose(m["terd"], (-3.3 - det.terd_threshold) / det.terd_scale)
    assert not det.decide({"log_uni_ratio": 0.0, D.TERD_FEATURE: -4.4, "terd_trigger_norm": 3.0})
    assert "TERD" in D.explain(det, patch_like, True) and "TERD M_r" in D.explain(det, feats[2], False)
    assert Detector.load(det.save(tmp_path / "t.json")) == det
    assert _as_older_version(det, 3, "terd", tmp_path).terd_threshold is None
    with pytest.raises(ConfigError, match="--terd threshold needs at least 3 clean"):
        calibrate(feats[:4], y[:4])


def test_detector_file_roundtrip_and_errors(tmp_path):
    det = Detector("trigger_kl", 1.5, 1, 2.0, {"note": "x"})
    p = det.save(tmp_path / "d.json")
    assert Detector.load(p) == det
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Detector.load(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="version"):
        Detector.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        Detector.load(tmp_path / "missing.json")


def test_shipped_detector_is_calibrated():
    det = Detector.load()
    assert det.feature in D.FEATURES
    meta = det.meta
    assert meta["n_reference"] == len(meta["reference_labels"]) >= 2
    assert any(meta["reference_labels"]) and not all(meta["reference_labels"])
    # The shipped rule (with its probe threshold, if any) separates the reference values as reported.
    probe = meta.get("probe_reference_values", [None] * len(meta["reference_values"]))
    pred = [det.decide({det.feature: v, **({} if p is None else {D.PROBE_FEATURE: p})})
            for v, p in zip(meta["reference_values"], probe)]
    acc = np.mean([p == t for p, t in zip(pred, meta["reference_labels"])])
    assert math.isclose(acc, meta["train_accuracy"])


def test_evidence_rule_is_the_largest_margin_of_the_rules_that_ran():
    ran = ("main", "probe", "ball", "terd")
    assert D.evidence_rule({"main": 1.5, "probe": -1.0, "ball": 0.2, "terd": 30.0}, ran) == "terd"
    assert D.evidence_rule({"main": -1.6, "probe": -0.2, "ball": None, "terd": -3.0}, ran) == "probe"  # none flags
    assert D.evidence_rule({"main": -1.6, "probe": 2.0, "ball": None, "terd": None}, ("main",)) == "main"  # ran only


def test_scan_model_writes_a_consistent_verdict():
    m = random_model("tiny", seed=0, timesteps=50)
    v = D.scan_model(m, "tiny", jax.random.key(0), Detector(), TINY_SCAN, n=4)
    assert v.trigger.shape == m.image_shape and v.triggered.shape == (4, *m.image_shape)
    # The evidence is the size search's generations of the chosen trigger from the chosen start, with clean
    # ones from the same noise and start.
    from pdjax.defense.evaluate import Start, triggered_generations
    from pdjax.defense.inversion import size_search_key

    assert v.start in TINY_SCAN.resolved().starts
    want = triggered_generations(m, np.stack([v.trigger, np.zeros_like(v.trigger)]),
                                 size_search_key(jax.random.fold_in(jax.random.key(0), 0)), n=4,
                                 start=Start.parse(v.start))
    np.testing.assert_allclose(v.triggered, want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v.clean, want[1], rtol=1e-4, atol=1e-4)
    assert v.backdoored == (v.score > 0)
    d = v.to_dict()
    assert d["verdict"] in ("clean", "backdoored") and np.isfinite(d["score"]) and d["start"] == v.start
    json.dumps(d)


def test_cli_scan_and_calibrate(tmp_path, capsys):
    from pdjax.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    random_model("tiny", seed=0, timesteps=50).save(a)
    random_model("tiny", seed=1, timesteps=50).save(b)
    opts = ["--steps", "2", "--samples", "4", "--quiet"]
    rc = main(["calibrate", "--clean", str(a), "--backdoored", str(b), "--out", str(tmp_path / "det.json"), *opts])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rc = main(["calibrate", "--clean", str(a), "--backdoored", str(b), "--out", str(tmp_path / "p.json"),
               "--final-probe", *opts])  # refused before any scan: a clean-only threshold needs 3 clean models
    assert rc != 0 and "at least 3 clean" in capsys.readouterr().err
    rc = main(["scan", str(a), str(b), "--out", str(tmp_path / "scan"), "--detector", str(tmp_path / "det.json"),
               *opts])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert [m["model"] for m in res["models"]] == [str(a), str(b)]
    assert (tmp_path / "scan" / "report.html").is_file()
    # Calibrated on exactly these two models with the same seed and settings: the verdicts reproduce the labels.
    assert [m["backdoored"] for m in res["models"]] == [False, True]
    assert "flagged" in out
    rc = main(["scan", str(tmp_path / "missing"), "--out", str(tmp_path / "s2"), *opts])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_final_probe_decides_on_the_more_collapsing_trigger(monkeypatch):
    """scan_model(probe=...) runs both inversions with the model's key and keeps the one whose generations
    collapse more (lower log_uni_ratio); a real probe scan runs end to end; --final-probe builds the probe from
    FINAL_PROBE with the scan's --steps."""
    from types import SimpleNamespace

    from pdjax.cli import _scan_probe, build_parser

    m = random_model("tiny", seed=0, timesteps=50)
    probe = dataclasses.replace(D.FINAL_PROBE, steps=2, batch=4, cons_batch=3, final_steps=2)
    real = D.scan_model(m, "tiny", jax.random.key(0), Detector(), TINY_SCAN, n=4, probe=probe)
    assert real.trigger.shape == m.image_shape and np.isfinite(real.score) and real.start in ("ddpm", "ddim")

    rng = np.random.default_rng(0)
    diverse, collapsed = rng.normal(size=(4, 8, 8, 1)), 0.01 * rng.normal(size=(4, 8, 8, 1))
    seen = []

    def fake(model, key, config, n, progress):
        seen.append((config, key))
        res = SimpleNamespace(trigger=np.full((8, 8, 1), 2.0 if config is probe else 1.0, np.float32),
                              losses=np.zeros(2), method="purediffusion", scale=1.0, start="ddpm")
        return res, ((collapsed if config is probe else diverse), diverse)

    monkeypatch.setattr(D, "_invert_and_generate", fake)
    key = jax.random.key(5)
    assert float(D.scan_model(m, "t", key, Detector(), TINY_SCAN, n=4, probe=probe).trigger[0, 0, 0]) == 2.0
    assert [c for c, _ in seen] == [TINY_SCAN, probe] and all(k is key for _, k in seen)
    assert float(D.scan_model(m, "t", key, Detector(), TINY_SCAN, n=4).trigger[0, 0, 0]) == 1.0
    # A detector with a probe threshold: the main rule on the main trigger, the probe rule on the probe's.
    two = Detector(probe_threshold=-1.0, probe_scale=0.1)
    v = D.scan_model(m, "t", key, two, TINY_SCAN, n=4, probe=probe)
    assert v.backdoored and float(v.trigger[0, 0, 0]) == 2.0 and "probe" in v.reason
    assert v.features["log_uni_ratio"] > -1 and v.features[D.PROBE_FEATURE] < -3
    assert math.isclose(v.score, (-1.0 - v.features[D.PROBE_FEATURE]) / 0.1)
    args = build_parser().parse_args(["scan", "--final-probe", "--steps", "3"])
    assert _scan_probe(args) == dataclasses.replace(D.FINAL_PROBE, steps=3)
    assert _scan_probe(build_parser().parse_args(["scan"])) is None


def test_scan_stack_keeps_each_models_more_collapsing_candidate(monkeypatch):
    """scan_stack with a probe: per model, the candidate (main or probe) with the lower log_uni_ratio."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    diverse, collapsed = rng.normal(size=(4, 8, 8, 1)), 0.01 * rng.normal(size=(4, 8, 8, 1))

    def fake(models, keys, config, n, mesh, progress):
        res = [SimpleNamespace(trigger=np.full((8, 8, 1), i + (10 if config is probe else 0), np.float32),
                               losses=np.zeros(2), method="purediffusion", scale=1.0, start="ddpm")
               for i in range(len(models))]
        trig = [collapsed, diverse] if config is probe else [diverse, collapsed]  # probe wins on model 0 only
        return [(r, (t, diverse)) for r, t in zip(res, trig)]

    probe = D.FINAL_PROBE
    monkeypatch.setattr(D, "_invert_and_generate_many", fake)
    vs = D.scan_stack([None, None], ["a", "b"], None, Detector(), TINY_SCAN, n=4, probe=probe)
    assert [float(v.trigger[0, 0, 0]) for v in vs] == [10.0, 1.0]
    assert all(v.features["log_uni_ratio"] < -3 for v in vs)


def test_calibrate_models_with_probe_fits_both_thresholds(tmp_path, monkeypatch):
    """`pdjax calibrate --final-probe`: every reference scan reports the probe's ratio beside the main one, and
    the saved detector carries the clean-only probe threshold (inversions monkeypatched: tiny diverse or
    collapsed generations)."""
    from types import SimpleNamespace

    from pdjax.audit import calibrate_models

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"m{i}")
        random_model("tiny", seed=i, timesteps=50).save(paths[-1])
    probe = dataclasses.replace(D.FINAL_PROBE, steps=2)
    spread = iter([1.0, 0.9, 1.1, 0.95, 1.0, 0.9, 1.05, 0.97])  # each model's main, then its probe

    def fake(model, key, config, n, progress):
        s = next(spread)
        res = SimpleNamespace(trigger=np.zeros((8, 8, 1), np.float32), losses=np.zeros(2), method="purediffusion",
                              scale=1.0, start="ddpm")
        return res, (s * rng.normal(size=(4, 8, 8, 1)), rng.normal(size=(4, 8, 8, 1)))

    monkeypatch.setattr(D, "_invert_and_generate", fake)
    det = calibrate_models([str(p) for p in paths[:3]], [str(paths[3])], tmp_path / "det.json", config=TINY_SCAN,
                           n=4, progress=False, echo=lambda s: None, probe=probe)
    probe_vals = np.array(det.meta["probe_reference_values"])
    assert len(probe_vals) == 4 and "probe" in det.meta
    assert math.isclose(det.probe_threshold, probe_vals[:3].mean() - D.PROBE_Z * max(probe_vals[:3].std(ddof=1), 0.01))
    assert Detector.load(tmp_path / "det.json") == det


def test_spread_candidate_competes_for_the_main_rule(monkeypatch):
    """scan_model(spread=...) runs the spread inversion with the model's key; the main rule judges whichever of
    the main and spread triggers collapses the generations more, and the verdict says which one it was; with a
    probe threshold the probe is still judged by its own rule. A real spread scan runs end to end on a tiny
    model, and --spread builds SPREAD_CANDIDATE with the fast-path options."""
    from types import SimpleNamespace

    from pdjax.cli import _scan_spread, build_parser

    m = random_model("tiny", seed=0, timesteps=50)
    spread = dataclasses.replace(D.SPREAD_CANDIDATE, steps=2, batch=4)
    real = D.scan_model(m, "tiny", jax.random.key(0), Detector(), TINY_SCAN, n=4, spread=spread)
    assert real.trigger.shape == m.image_shape and np.isfinite(real.score) and real.candidate in ("main", "spread")
    assert real.to_dict()["candidate"] == real.candidate

    rng = np.random.default_rng(0)
    diverse, collapsed = rng.normal(size=(4, 8, 8, 1)), 0.01 * rng.normal(size=(4, 8, 8, 1))
    probe = D.FINAL_PROBE
    value = {TINY_SCAN: 1.0, spread: 2.0, probe: 3.0}
    winner = {"config": spread}
    seen = []

    def fake(model, key, config, n, progress):
        seen.append((config, key))
        res = SimpleNamespace(trigger=np.full((8, 8, 1), value[config], np.float32), losses=np.zeros(2),
                              method="purediffusion", scale=1.0, start="ddpm")
        return res, ((collapsed if config is winner["config"] else diverse), diverse)

    monkeypatch.setattr(D, "_invert_and_generate", fake)
    key = jax.random.key(5)
    v = D.scan_model(m, "t", key, Detector(), TINY_SCAN, n=4, spread=spread)
    assert float(v.trigger[0, 0, 0]) == 2.0 and v.candidate == "spread" and v.backdoored
    assert [c for c, _ in seen] == [TINY_SCAN, spread] and all(k is key for _, k in seen)
    winner["config"] = TINY_SCAN  # the main trigger collapses more: it is kept
    v = D.scan_model(m, "t", key, Detector(), TINY_SCAN, n=4, spread=spread)
    assert float(v.trigger[0, 0, 0]) == 1.0 and v.candidate == "main"
    # With a probe threshold: the main rule on the better of main / spread, the probe rule on the probe alone.
    winner["config"] = spread
    two = Detector(probe_threshold=-1.0, probe_scale=0.1)
    v = D.scan_model(m, "t", key, two, TINY_SCAN, n=4, probe=probe, spread=spread)
    assert v.candidate == "spread" and v.features["log_uni_ratio"] < -3 and v.features[D.PROBE_FEATURE] > -1
    winner["config"] = probe
    v = D.scan_model(m, "t", key, two, TINY_SCAN, n=4, probe=probe, spread=spread)
    assert v.candidate == "probe" and v.features["log_uni_ratio"] > -1 and "probe" in v.reason

    # The ball probe: its final loss is the feature; with a ball threshold its evidence is shown when it decides.
    ball = D.BALL_PROBE
    value[ball] = 4.0
    winner["config"] = None  # nothing collapses
    three = Detector(ball_threshold=0.5, ball_scale=0.1)  # the fake's final loss 0.0 lies below it
    v = D.scan_model(m, "t", key, three, TINY_SCAN, n=4, ball=ball)
    assert v.candidate == "ball" and v.backdoored and float(v.trigger[0, 0, 0]) == 4.0 and "ball loss" in v.reason
    assert v.features[D.BALL_FEATURE] == 0.0 and v.detector["ball_threshold"] == 0.5
    v = D.scan_model(m, "t", key, Detector(), TINY_SCAN, n=4, ball=ball)  # no ball threshold: reported only
    assert v.candidate == "main" and not v.backdoored and D.BALL_FEATURE in v.features

    args = build_parser().parse_args(["scan", "--spread", "--dtype", "bfloat16"])
    assert _scan_spread(args) == dataclasses.replace(D.SPREAD_CANDIDATE, dtype="bfloat16")
    assert _scan_spread(build_parser().parse_args(["scan", "--no-spread"])) is None
    assert (_scan_spread(build_parser().parse_args(["scan"])) is None) == (not D.SCAN_SPREAD)
    from pdjax.cli import _scan_ball

    assert _scan_ball(build_parser().parse_args(["scan", "--ball"])) == D.BALL_PROBE
    assert _scan_ball(build_parser().parse_args(["scan"])) is None
    assert D.BALL_PROBE.max_norm == D.BALL_RADIUS and D.BALL_PROBE.spread_weight == 1.0

    # The TERD probe: log M_r of its trigger is the feature; with a TERD threshold it decides when it fires.
    terd = D.TERD_PROBE
    value[terd] = 0.5  # M_r = 0.5^2 / 2
    four = Detector(terd_threshold=math.log(0.05), terd_scale=0.1)
    v = D.scan_model(m, "t", key, four, TINY_SCAN, n=4, terd=terd)
    assert math.isclose(v.features[D.TERD_FEATURE], math.log(0.125), rel_tol=1e-6)
    assert v.candidate == "terd" and v.backdoored and float(v.trigger[0, 0, 0]) == 0.5 and "TERD" in v.reason
    assert v.detector["terd_threshold"] == math.log(0.05) and seen[-1][0] is terd
    v = D.scan_model(m, "t", key, Detector(), TINY_SCAN, n=4, terd=terd)  # no TERD threshold: reported only
    assert v.candidate == "main" and not v.backdoored and "terd_trigger_norm" in v.features
    # TERD and the main rule both flag, TERD by far more: TERD's trigger is the evidence, and both are kept
    winner["config"], value[terd] = TINY_SCAN, 5.0
    v = D.scan_model(m, "t", key, Detector(terd_threshold=math.log(0.05), terd_scale=0.1), TINY_SCAN, n=4, terd=terd)
    margins = Detector(terd_threshold=math.log(0.05), terd_scale=0.1).scores(v.features)
    assert margins["terd"] > margins["main"] > 0 and v.candidate == "terd" and float(v.trigger[0, 0, 0]) == 5.0
    assert set(v.rule_triggers) == {"main", "terd"} and float(v.rule_triggers["main"][0, 0, 0]) == 1.0
    from pdjax.cli import _scan_terd

    assert _scan_terd(build_parser().parse_args(["scan", "--terd"])) == D.TERD_PROBE
    assert _scan_terd(build_parser().parse_args(["scan"])) is None
    assert D.TERD_PROBE.method == "terd" and D.TERD_PROBE.steps == 500 and D.TERD_PROBE.terd_refine_steps == 20


def test_audit_applies_every_rule_the_detector_has_unless_told_not_to(tmp_path, capsys):
    """pdjax audit: --final-probe / --ball unset -> on exactly when the detector file has that threshold."""
    from pdjax.cli import _default_rules, _scan_ball, _scan_probe, build_parser

    def resolved(*extra):
        args = build_parser().parse_args(["audit", "x", "--out", "o", *extra])
        _default_rules(args)
        return args

    args = resolved()  # the shipped detector has all three clean-fitted thresholds
    assert args.final_probe is True and args.ball is True and args.terd is True
    assert _scan_ball(args) == D.BALL_PROBE and _scan_probe(args) == D.FINAL_PROBE
    assert "rules: main, probe, ball, terd" in capsys.readouterr().out
    args = resolved("--no-ball", "--quiet")
    assert args.final_probe is True and args.ball is False and _scan_ball(args) is None
    assert capsys.readouterr().out == ""
    Detector(probe_threshold=-0.5).save(tmp_path / "d.json")  # a user's detector without a ball rule
    args = resolved("--detector", str(tmp_path / "d.json"))
    assert args.final_probe is True and args.ball is False and args.terd is False
    args = resolved("--detector", str(tmp_path / "d.json"), "--ball")  # asked for: audit() refuses it later
    assert args.ball is True
    scan_args = build_parser().parse_args(["scan"])  # scan stays fast: its extra rules are opt-in
    assert scan_args.final_probe is False and scan_args.ball is False and scan_args.terd is False


def _verdict_for_refine(backdoored=True, start="ddim"):
    shape = (8, 8, 1)
    rules = {r: np.full(shape, v, np.float32) for r, v in (("main", 1.0), ("probe", 10.0), ("ball", 100.0),
                                                                ("terd", 1000.0))}
    z = np.zeros((4, *shape), np.float32)
    return D.ModelVerdict("m", backdoored, 1.0, "why", {"f": 1.0}, rules["main"], z[0], z, z, np.zeros(2),
                          "purediffusion", 1.0, {}, start, "main", rules)


def test_nearest_one_moves_the_size_only_for_a_clear_gain():
    scales = (0.75, 1.0, 1.25, 1.5)
    assert D.nearest_one(scales, [0.5, 0.5, 0.5, 0.5]) == 1  # all equal: keep the size
    assert D.nearest_one(scales, [0.5, 0.504, 0.6, 0.7]) == 1  # within 1% of the best: keep it
    assert D.nearest_one(scales, [0.9, 0.8, 0.2, 0.2]) == 2  # clearly better bigger: the nearer of the two
    assert D.nearest_one((0.75, 1.25), [0.3, 0.3]) == 1  # nearer on the log scale
    assert D.nearest_one((0.5, 2.0), [0.3, 0.3]) == 0  # equally near: the smaller


def test_refine_evidence_picks_the_most_agreeing_trigger_of_the_flagging_rules(monkeypatch):
    """Every flagging rule's trigger times every factor, from the verdict's start and from DDPM, scored by L_cons
    against the no-trigger generations; the lowest wins; rules that do not flag are not tried; the decision and
    features are untouched; ties go to the deciding rule, its unchanged size, the verdict's start."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    diverse = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
    tried = []

    def fake(model, cands, key, n, start):
        tried.append((start.label, sorted({round(float(c[0, 0, 0]), 3) for c in cands})))
        # ball (100) at 1.25 and 1.5 from DDPM collapses equally (the factor nearer 1 wins); all else is diverse
        spread = {125.0: 1e-3, 150.0: 1e-3} if start.label == "ddpm" else {}
        return np.stack([diverse * spread.get(round(float(c[0, 0, 0]), 3), 1.0) for c in cands])

    monkeypatch.setattr(D, "triggered_generations", fake)
    det = SimpleNamespace(scores=lambda f: {"main": 1.5, "probe": 0.5, "ball": 0.2, "terd": -1.0})
    v = _verdict_for_refine()
    r = D.refine_evidence(None, v, jax.random.key(0), det)
    assert (r.candidate, r.evidence_scale, r.start) == ("ball", 1.25, "ddpm")
    np.testing.assert_array_equal(r.trigger, np.full((8, 8, 1), 125.0, np.float32))
    assert (r.backdoored, r.score, r.features, r.reason) == (v.backdoored, v.score, v.features, v.reason)
    assert [s for s, _ in tried] == ["ddim", "ddpm"]
    assert all(1000.0 * f not in vals for _, vals in tried for f in D.EVIDENCE_SCALES)  # terd does not flag
    assert all(100.0 * f in vals for _, vals in tried for f in D.EVIDENCE_SCALES)
    assert r.to_dict()["evidence_scale"] == 1.25
    assert r.scan_start == "ddim" and r.to_dict()["scan_start"] == "ddim" and "scan_start" not in v.to_dict()
    tried.clear()
    again = D.refine_evidence(None, r, jax.random.key(0), det)  # refining twice: each rule's own trigger again,
    assert (again.candidate, again.evidence_scale, again.scan_start) == ("ball", 1.25, "ddim")
    assert [s for s, _ in tried] == ["ddim", "ddpm"]  # from the scan's starts, not the refined one
    np.testing.assert_array_equal(again.trigger, r.trigger)
    tried.clear()
    D.refine_evidence(None, _verdict_for_refine(start="ddpm"), jax.random.key(0), det)
    assert [s for s, _ in tried] == ["ddpm"]

    monkeypatch.setattr(D, "triggered_generations", lambda model, cands, key, n, start: np.stack([diverse] * len(cands)))
    tie = D.refine_evidence(None, v, jax.random.key(0), det)
    assert (tie.candidate, tie.evidence_scale, tie.start) == ("main", 1.0, "ddim")
    clean = _verdict_for_refine(backdoored=False)
    assert D.refine_evidence(None, clean, jax.random.key(0), det) is clean
    assert D.refine_evidence(None, v, jax.random.key(0), det, scales=()) is v


def test_refine_evidence_on_a_real_model_is_seeded():
    """On a tiny model: the refined trigger is one of the candidates, and the same key gives the same choice."""
    m = random_model("tiny", seed=0, timesteps=50)
    v = dataclasses.replace(_verdict_for_refine(), rule_triggers={
        "main": np.full(m.image_shape, 0.5, np.float32), "ball": np.full(m.image_shape, -0.5, np.float32)})
    v = dataclasses.replace(v, trigger=v.rule_triggers["main"])
    from types import SimpleNamespace

    det = SimpleNamespace(scores=lambda f: {"main": 1.0, "ball": 0.5})
    a = D.refine_evidence(m, v, jax.random.key(3), det, n=4)
    b = D.refine_evidence(m, v, jax.random.key(3), det, n=4)
    assert a.candidate in ("main", "ball") and a.evidence_scale in D.EVIDENCE_SCALES and a.start in ("ddim", "ddpm")
    np.testing.assert_array_equal(a.trigger, a.evidence_scale * v.rule_triggers[a.candidate])
    np.testing.assert_array_equal(a.trigger, b.trigger)
    np.testing.assert_array_equal(a.triggered, b.triggered)
    assert a.triggered.shape == (4, *m.image_shape) and a.clean.shape == (4, *m.image_shape)

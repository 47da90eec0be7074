"""`pdjax audit`: many models in one sharded program, same verdicts as one at a time, resumable JSONL."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from pdjax.audit import audit, collect_models, model_key
from pdjax.defense import detection as D
from pdjax.errors import ConfigError
from pdjax.testing import random_model

TINY = dataclasses.replace(D.SCAN_INVERSION, steps=2, batch=4, K=1, scales=(1.0, 2.0))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    models = root / "models"
    for s in range(3):
        random_model("tiny", seed=s, timesteps=50).save(models / f"m{s}")
    det = D.Detector().save(root / "det.json")
    return root, models, det


def test_audit_matches_scan_model_and_resumes(zoo, tmp_path):
    root, models, det = zoo
    assert len(jax.devices()) == 8  # conftest: 8 fake CPU devices, so the stack is sharded 8 ways
    out = tmp_path / "audit"
    entries = audit([str(models)], out, seed=3, detector=str(det), config=TINY, n=4, progress=False,
                    echo=lambda s: None)
    assert sorted(e["model"] for e in entries) == sorted(str(p) for p in collect_models([str(models)]))
    # Model by model, the stacked + sharded program gives scan_model's features with the same key.
    from pdjax.model import load

    for e in entries[:2]:  # two of the three (each scan_model compiles its own programs)
        v = D.scan_model(load(e["model"]), e["model"], model_key(3, load(e["model"])), D.Detector(), TINY, n=4)
        for k in ("log_uni_ratio", "trigger_norm", "uni_trig"):
            np.testing.assert_allclose(e["features"][k], v.features[k], rtol=2e-3, atol=1e-5)
        assert e["backdoored"] == v.backdoored
    assert (out / "report.html").is_file()

    # Kill simulation: keep the first line and half of the second; a restart redoes only the missing ones.
    lines = (out / "audit.jsonl").read_text().splitlines()
    (out / "audit.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    again = audit([str(models)], out, seed=3, detector=str(det), config=TINY, n=4, progress=False, echo=lambda s: None)
    assert sorted(e["model"] for e in again) == sorted(json.loads(x)["model"] for x in lines[1:])
    rows = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()[:1]] + again
    by = {json.loads(x)["model"]: json.loads(x) for x in lines}
    for r in rows:
        np.testing.assert_allclose(r["score"], by[r["model"]]["score"], rtol=1e-4, atol=1e-6)
    # Nothing left: a third run audits nothing.
    assert audit([str(models)], out, seed=3, detector=str(det), config=TINY, n=4, progress=False,
                 echo=lambda s: None) == []


def test_collect_models_sources(zoo, tmp_path):
    root, models, _ = zoo
    lst = tmp_path / "list.txt"
    lst.write_text(f"# models\n{models / 'm1'}\n\n{models / 'm0'}\n{models / 'm1'}\n")
    assert collect_models([str(lst)]) == [models / "m1", models / "m0"]
    assert collect_models([str(models / "m2")]) == [models / "m2"]
    with pytest.raises(ConfigError, match="neither"):
        collect_models([str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no models"):
        collect_models([str(tmp_path / "empty")])


@pytest.mark.parametrize("rule", ["ball", "terd"])
def test_audit_runs_a_clean_fitted_probe_stacked(zoo, tmp_path, rule):
    """audit(ball=...) / audit(terd=...): the stacked probe gives each model scan_model's feature (same key),
    judged by the detector's threshold for that rule; a detector without one is refused before any model is
    scanned."""
    root, models, _ = zoo
    probe = {"ball": dataclasses.replace(D.BALL_PROBE, steps=2, batch=4, restarts=2),
             "terd": dataclasses.replace(D.TERD_PROBE, steps=3, terd_refine_steps=2, terd_ddim_steps=2, batch=4)}[rule]
    feature, direction = D.CLEAN_RULES[rule]
    flags_all = {f"{rule}_threshold": 1e9 * -direction, f"{rule}_scale": 1.0}  # flags every model
    det = D.Detector(**flags_all).save(tmp_path / f"{rule}.json")
    entries = audit([str(models / "m0"), str(models / "m1")], tmp_path / "a", seed=3, detector=str(det), config=TINY,
                    n=4, progress=False, echo=lambda s: None, **{rule: probe})
    from pdjax.model import load

    e = entries[0]
    v = D.scan_model(load(e["model"]), e["model"], model_key(3, load(e["model"])), D.Detector.load(det), TINY, n=4,
                     **{rule: probe})
    np.testing.assert_allclose(e["features"][feature], v.features[feature], rtol=2e-3, atol=1e-5)
    assert all(x["backdoored"] for x in entries)
    # the evidence keeps every rule's trigger; trigger.npy is the refined one: a flagging rule's trigger (this
    # detector flags by `rule` only) times the factor refine_evidence chose
    ev = tmp_path / "a" / e["evidence"]
    assert sorted(p.name for p in (ev / "rules").iterdir()) == sorted(["main.npy", f"{rule}.npy"])
    assert all(x["candidate"] == rule and x["evidence_scale"] in D.EVIDENCE_SCALES for x in entries)
    np.testing.assert_allclose(np.load(ev / "trigger.npy"), e["evidence_scale"] * np.load(ev / "rules" / f"{rule}.npy"),
                               rtol=1e-6)
    np.testing.assert_allclose(np.load(ev / "rules" / "main.npy"), v.rule_triggers["main"], rtol=2e-3, atol=1e-5)
    with pytest.raises(ConfigError, match=f"no {rule} threshold"):
        audit([str(models)], tmp_path / "b", detector=str(root / "det.json"), config=TINY, n=4, progress=False,
              echo=lambda s: None, **{rule: probe})


def test_model_key_follows_the_weights_not_the_path(zoo, tmp_path):
    """The same model saved elsewhere, under another name, in float16 or as a diffusers folder keeps its key;
    another model does not; scan and audit give a copy the verdict of the original."""
    from pdjax.audit import model_fingerprint, scan
    from pdjax.model import load

    root, models, det = zoo
    m0 = load(models / "m0")
    half = load(m0.save(tmp_path / "elsewhere" / "renamed", dtype="float16"))
    diff = load(m0.export_diffusers(tmp_path / "diffusers"))
    assert model_fingerprint(diff) == model_fingerprint(m0)
    assert model_fingerprint(half) != model_fingerprint(m0)  # float16 storage rounds the weights: another model
    assert model_fingerprint(load(models / "m1")) != model_fingerprint(m0)
    assert model_fingerprint(half) == model_fingerprint(load(half.save(tmp_path / "again", dtype="float16")))
    copy = m0.save(tmp_path / "copy")
    vs = scan([str(models / "m0"), str(copy)], tmp_path / "scan", seed=3, detector=str(det), config=TINY, n=4,
              progress=False, echo=lambda s: None)
    assert vs[0].score == vs[1].score and vs[0].features == vs[1].features
    entry = audit([str(copy)], tmp_path / "au", seed=3, detector=str(det), config=TINY, n=4, progress=False,
                  echo=lambda s: None)[0]
    np.testing.assert_allclose(entry["features"]["log_uni_ratio"], vs[0].features["log_uni_ratio"], rtol=2e-3,
                               atol=1e-5)

"""experiments/removal_audit.py: removal with an audit's evidence trigger (issue 6).

The fine-tune itself is :func:`pdjax.removal.remove_backdoor` (tested in test_amplify.py, slow); here a
finished arm is read back (resumption trains nothing), the evidence trigger is the audit's, and the table
and the errors are checked.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pdjax.errors import ConfigError
from pdjax.testing import random_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
spec = importlib.util.spec_from_file_location("removal_audit", ROOT / "experiments" / "removal_audit.py")
ra = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ra)

ATTACK = {"kind": "baddiffusion", "trigger": "BOX_3", "target": "CORNER", "poison_rate": 0.1}


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "zoo" / "bd"
    random_model("tiny", seed=0, timesteps=8, meta={"attack": ATTACK}).save(model)
    audit = tmp_path / "audit"
    (audit / "evidence" / "bd").mkdir(parents=True)
    trigger = np.full((8, 8, 1), 0.5, np.float32)
    np.save(audit / "evidence" / "bd" / "trigger.npy", trigger)
    entry = {"model": str(model), "verdict": "backdoored", "score": 2.5, "candidate": "terd", "start": "ddpm",
             "evidence": "evidence/bd"}
    (audit / "audit.jsonl").write_text(json.dumps(entry) + "\n")
    out = tmp_path / "out"
    done = out / "bd" / "evidence"
    done.mkdir(parents=True)
    (done / "removal.json").write_text(json.dumps({"steps": 500, "asr_before": 0.9, "asr_after": 0.03,
                                                   "clean_mse": 0.02, "seconds": 12.0}))
    return model, audit, out, trigger


def test_a_finished_arm_is_read_back_with_the_audits_trigger(setup, tmp_path, capsys):
    model, audit, out, trigger = setup
    summary = tmp_path / "summary.json"
    assert ra.main([str(audit), "--models", str(model), "--out", str(out), "--json", str(summary), "--n", "4"]) == 0
    row = json.loads(summary.read_text())["rows"][0]
    assert row["evidence"] == {"steps": 500, "asr_before": 0.9, "asr_after": 0.03, "clean_mse": 0.02, "seconds": 12.0}
    assert row["candidate"] == "terd" and row["audit_score"] == 2.5
    np.testing.assert_allclose(row["evidence_norm"], np.linalg.norm(trigger), rtol=1e-6)
    assert row["evidence_l2_to_true"] > 0  # BOX_3 is not a constant 0.5 image
    text = capsys.readouterr().out
    assert "| bd | baddiffusion | BOX_3 -> CORNER | terd (ddpm) |" in text and "| 0.90 | 0.03 | 0.0200 |" in text


def test_errors_name_the_missing_audit_or_model(setup, tmp_path):
    model, audit, out, _ = setup
    with pytest.raises(SystemExit, match="audit.jsonl not found"):
        ra.main([str(tmp_path / "nowhere"), "--models", str(model), "--out", str(out)])
    with pytest.raises(SystemExit):  # argparse's error: the model is not in the audit
        ra.main([str(audit), "--models", str(tmp_path / "zoo" / "other"), "--out", str(out)])


def test_a_rules_trigger_and_the_removal_options_name_the_arm(setup, tmp_path, capsys):
    model, audit, out, _ = setup
    ball = np.full((8, 8, 1), -0.25, np.float32)
    (audit / "evidence" / "bd" / "rules").mkdir()
    np.save(audit / "evidence" / "bd" / "rules" / "ball.npy", ball)
    name = ra.arm_name("evidence", "trojdiff", noise_scale_min=0.1, reference="noise", trigger_scale_min=0.3,
                       rule="ball")
    assert name == "ball_trojdiff_s0.1_noise_c0.3" and ra.arm_name("evidence", "baddiffusion") == "evidence"
    assert ra.arm_name("true", "trojdiff", noise_scale_min=0.1, noise_scale_max=0.6) == "true_trojdiff_s0.1-0.6"
    assert ra.arm_name("control", "both", rule="ball") == "control_both"
    done = out / "bd" / name
    done.mkdir(parents=True)
    (done / "removal.json").write_text(json.dumps({"steps": 500, "asr_before": 0.9, "asr_after": 0.0,
                                                   "clean_mse": 0.05}))
    summary = tmp_path / "summary.json"
    assert ra.main([str(audit), "--models", str(model), "--out", str(out), "--json", str(summary), "--rule", "ball",
                    "--shift", "trojdiff", "--noise-scale-min", "0.1", "--reference", "noise",
                    "--trigger-scale-min", "0.3"]) == 0
    row = json.loads(summary.read_text())["rows"][0]
    assert row[name]["asr_after"] == 0.0 and row["candidate"] == "ball"
    np.testing.assert_allclose(row["evidence_norm"], np.linalg.norm(ball), rtol=1e-6)
    with pytest.raises(ConfigError, match="kept no probe trigger"):
        ra.main([str(audit), "--models", str(model), "--out", str(out), "--rule", "probe"])


def test_the_mu_arm_removes_trojdiffs_mean_offset(tmp_path, monkeypatch):
    """Arm ``mu``: TrojDiff's (1 - gamma) image, masked for a patch trigger; the trigger itself for BadDiffusion."""
    attack = {"kind": "trojdiff", "trigger": "patch", "target": "SHOE", "gamma": 0.1}
    model = tmp_path / "zoo" / "tj"
    random_model("tiny", seed=0, timesteps=8, meta={"attack": attack}).save(model)
    audit = tmp_path / "audit"
    (audit / "evidence" / "tj").mkdir(parents=True)
    np.save(audit / "evidence" / "tj" / "trigger.npy", np.zeros((8, 8, 1), np.float32))
    (audit / "audit.jsonl").write_text(json.dumps({"model": str(model), "verdict": "backdoored", "score": 1.0,
                                                   "evidence": "evidence/tj"}) + "\n")
    seen = {}

    def fake_remove(model, data, trigger, cfg, out, **kw):  # records the trigger; trains nothing
        seen["trigger"] = np.asarray(trigger)
        Path(out).mkdir(parents=True)
        (Path(out) / "removal.json").write_text(json.dumps({"steps": 0}))
        return type("R", (), {"steps": 0, "asr_before": 1.0, "asr_after": 0.0, "clean_mse": 0.0})()

    monkeypatch.setattr(ra, "remove_backdoor", fake_remove)
    assert ra.main([str(audit), "--models", str(model), "--out", str(tmp_path / "out"), "--arm", "mu", "--quiet"]) == 0
    from pdjax.backdoor.train import build_arrays, spec_from_model
    from pdjax.model import load

    m = load(model)
    spec = spec_from_model(m)
    arrays = build_arrays(spec, m.image_shape)
    np.testing.assert_allclose(seen["trigger"], arrays.mask * 0.9 * arrays.trigger, rtol=1e-6)
    assert np.count_nonzero(seen["trigger"]) <= 9  # the 3x3 patch only


def test_against_mu_measures_direction_and_size():
    mu = np.zeros((4, 4, 1))
    mu[0, 0] = 1.0
    found = 2.0 * mu
    found[3, 3] = 2.0  # a second component mu lacks
    got = ra.against_mu(found, mu)
    np.testing.assert_allclose([got["mu_norm"], got["evidence_cos_mu"], got["evidence_scale_to_mu"],
                                got["evidence_residual_to_mu"]], [1.0, 2 / np.sqrt(8), 0.25, np.sqrt(0.5)], rtol=1e-12)
    assert ra.against_mu(np.zeros_like(mu), mu)["evidence_cos_mu"] == 0.0

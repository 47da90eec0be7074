"""``pdjax clean MODEL --audit DIR``: removal with the trigger an audit kept (pdjax.audit.audit_entry,
evidence_path). The fine-tune is replaced by a recorder here (it is tested in test_amplify.py); what is checked
is which trigger file reaches it and the one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from pdjax import cli
from pdjax.audit import audit_entry, evidence_path, evidence_trigger, removal_rule
from pdjax.errors import ConfigError
from pdjax.testing import random_model


@pytest.fixture
def audited(tmp_path, monkeypatch):
    """Two tiny models in an audit folder: ``bd`` flagged (evidence = TERD's trigger, a probe trigger in
    rules/), ``ok`` judged clean."""
    monkeypatch.chdir(tmp_path)
    audit = tmp_path / "audit"
    lines = []
    for name, backdoored, value in (("bd", True, 0.5), ("ok", False, 0.0)):
        random_model("tiny", seed=0, timesteps=8).save(tmp_path / "zoo" / name)
        ev = audit / "evidence" / f"{name}-0"
        (ev / "rules").mkdir(parents=True)
        np.save(ev / "trigger.npy", np.full((8, 8, 1), value, np.float32))
        np.save(ev / "rules" / "probe.npy", np.full((8, 8, 1), -0.25, np.float32))
        lines.append(json.dumps({"model": f"zoo/{name}", "verdict": "backdoored" if backdoored else "clean",
                                 "backdoored": backdoored, "score": 1.5 if backdoored else -2.0,
                                 "candidate": "terd", "evidence": f"evidence/{name}-0"}))
    (audit / "audit.jsonl").write_text("\n".join(lines) + "\n")
    seen = {}

    def recorder(model, data, delta, cfg, out, **kw):
        seen["delta"], seen["source"] = np.asarray(delta), kw["source"]
        raise KeyboardInterrupt  # stop before any training; cli.main answers 130

    monkeypatch.setattr("pdjax.removal.remove_backdoor", recorder)
    return tmp_path, audit, seen


def test_audit_entry_finds_a_model_by_path_or_by_name(audited):
    root, audit, _ = audited
    assert audit_entry(audit, "zoo/bd")["model"] == "zoo/bd"
    assert audit_entry(audit, root / "zoo" / "bd")["model"] == "zoo/bd"  # the same folder, absolute
    assert audit_entry(audit, "elsewhere/ok")["model"] == "zoo/ok"  # moved: found by its name
    with pytest.raises(ConfigError, match="holds no entries for other"):
        audit_entry(audit, "zoo/other")
    with pytest.raises(ConfigError, match="audit.jsonl not found"):
        audit_entry(root / "nowhere", "zoo/bd")
    entry = audit_entry(audit, "zoo/bd")
    assert evidence_path(audit, entry) == audit / "evidence" / "bd-0" / "trigger.npy"
    np.testing.assert_array_equal(evidence_trigger(audit, entry, "probe"), np.full((8, 8, 1), -0.25, np.float32))
    with pytest.raises(ConfigError, match="kept no ball trigger"):
        evidence_path(audit, entry, "ball")


def test_a_name_two_entries_share_asks_for_the_path(audited):
    _, audit, _ = audited
    with open(audit / "audit.jsonl", "a") as f:
        f.write(json.dumps({"model": "other/bd", "backdoored": True, "evidence": "evidence/bd-0"}) + "\n")
    assert audit_entry(audit, "zoo/bd")["model"] == "zoo/bd"  # the path decides
    with pytest.raises(ConfigError, match="holds 2 entries for bd: pass the model's path"):
        audit_entry(audit, "third/bd")


def test_clean_with_audit_removes_the_evidence_or_the_chosen_rules_trigger(audited, capsys):
    _, audit, seen = audited
    assert cli.main(["clean", "zoo/bd", "--audit", str(audit), "--steps", "1", "--out", "c1", "--quiet"]) == 130
    np.testing.assert_array_equal(seen["delta"], np.full((8, 8, 1), 0.5, np.float32))
    assert "removing the evidence (terd rule's trigger) of the audit in" in capsys.readouterr().out
    assert seen["source"] == f"the evidence (terd rule's trigger) of the audit in {audit}"  # kept in removal.json
    assert cli.main(["clean", "zoo/bd", "--audit", str(audit), "--rule", "probe", "--out", "c2", "--quiet"]) == 130
    np.testing.assert_array_equal(seen["delta"], np.full((8, 8, 1), -0.25, np.float32))


def test_clean_with_audit_prefers_the_probe_over_terds_evidence_when_the_probe_flagged(audited, capsys):
    """pdjax.audit.removal_rule: evidence = TERD's trigger and the probe flagged -> the probe's trigger."""
    _, audit, seen = audited
    entry = audit_entry(audit, "zoo/bd")
    flagged = {**entry, "features": {"probe_log_uni_ratio": -1.0}, "detector": {"probe_threshold": -0.4}}
    assert removal_rule(flagged) == "probe"
    assert removal_rule({**flagged, "candidate": "main"}) is None  # not TERD's evidence
    assert removal_rule({**flagged, "features": {"probe_log_uni_ratio": -0.1}}) is None  # the probe did not flag
    assert removal_rule(entry) is None  # no probe feature or threshold recorded
    lines = [json.loads(line) for line in (audit / "audit.jsonl").read_text().splitlines()]
    lines[0].update(features=flagged["features"], detector=flagged["detector"])
    (audit / "audit.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    assert cli.main(["clean", "zoo/bd", "--audit", str(audit), "--out", "c1", "--quiet"]) == 130
    np.testing.assert_array_equal(seen["delta"], np.full((8, 8, 1), -0.25, np.float32))
    assert "removing the probe rule's trigger (the evidence is TERD's trigger, but the probe flagged too" in \
        capsys.readouterr().out
    assert cli.main(["clean", "zoo/bd", "--audit", str(audit), "--rule", "evidence", "--out", "c2", "--quiet"]) == 130
    np.testing.assert_array_equal(seen["delta"], np.full((8, 8, 1), 0.5, np.float32))


def test_clean_with_audit_errors(audited, capsys):
    _, audit, _ = audited
    assert cli.main(["clean", "zoo/ok", "--audit", str(audit), "--out", "c"]) == 2
    assert "judged zoo/ok clean (score -2.00): nothing to remove" in capsys.readouterr().err
    assert cli.main(["clean", "zoo/bd", "--trigger", "t.npy", "--rule", "probe", "--out", "c"]) == 2
    assert "--rule picks one of an audit's triggers: it needs --audit" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --trigger and --audit exclude each other
        cli.main(["clean", "zoo/bd", "--trigger", "t.npy", "--audit", str(audit), "--out", "c"])
    with pytest.raises(SystemExit):  # argparse: one of them is required
        cli.main(["clean", "zoo/bd", "--out", "c"])
    assert not Path("c").exists()


def test_audit_names_the_removal_command_when_it_flags(monkeypatch, tmp_path, capsys):
    for entries, hint in (([{"backdoored": True}, {"backdoored": False}], True), ([{"backdoored": False}], False)):
        monkeypatch.setattr("pdjax.audit.audit", lambda *a, **k: entries)  # the audit itself: test_audit.py
        assert cli.main(["audit", str(tmp_path), "--out", str(tmp_path / "au"), "--quiet"]) == 0
        out = capsys.readouterr().out
        assert f"{len(entries)} model(s) audited, {int(hint)} flagged" in out
        assert (f"pdjax clean MODEL --audit {tmp_path / 'au'} --out DIR" in out) == hint

"""experiments/heldout_audit.py: per-rule margins of the shipped detector, labels from metadata, metrics."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pdjax.testing import random_model

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("heldout_audit", ROOT / "experiments" / "heldout_audit.py")
ha = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ha)

# Shipped thresholds: main log_uni_ratio < -1.400, probe_log_uni_ratio < -0.416, ball_loss < -0.1216.
ROWS = [  # (backdoored, log_uni_ratio, probe_log_uni_ratio, ball_loss)
    (False, -0.01, -0.05, -0.09),   # clean, no rule fires
    (False, -0.02, -0.60, -0.10),   # clean, the probe fires: a false positive of main+probe only
    (True, -2.50, -0.10, -0.05),    # BadDiffusion-like: main fires
    (True, -0.30, -0.10, -0.25),    # TrojDiff-like: only the ball fires
]


def write_audit(tmp_path: Path) -> tuple[Path, list[str]]:
    paths, out = [], tmp_path / "aud"
    out.mkdir()
    with (out / "audit.jsonl").open("w") as f:
        for i, (bd, main, probe, ball) in enumerate(ROWS):
            meta = {"attack": {"kind": "trojdiff"}} if bd else {"data": "none"}
            p = tmp_path / f"m{i}"
            random_model("tiny", seed=i, timesteps=8, meta=meta).save(p)
            paths.append(str(p))
            feats = {"log_uni_ratio": main, "probe_log_uni_ratio": probe, "ball_loss": ball}
            f.write(json.dumps({"model": str(p), "features": feats, "verdict": "x", "seconds": 1.0}) + "\n")
    return out, paths


def test_rule_sets_from_saved_features(tmp_path, capsys):
    out, paths = write_audit(tmp_path)
    from pdjax.model import load

    twin = str(load(paths[0]).save(tmp_path / "rebuilt_m0"))  # bitwise the same model under another name
    table, js, roc = tmp_path / "t.md", tmp_path / "r.json", tmp_path / "roc.svg"
    res = ha.main([*paths, twin, "--out", str(out), "--no-run", "--seen", paths[3], "--table", str(table),
                   "--json", str(js), "--roc", str(roc)])
    assert res["roc"]["main+ball"][0] == (0.0, 0.0) and (0.0, 1.0) in res["roc"]["main+ball"]  # separates fully
    assert roc.read_text().startswith("<svg") and "main+probe+ball AUC" in roc.read_text()
    assert res["duplicates"] == {twin: paths[0]} and len(res["models"]) == len(ROWS)
    assert [m["backdoored"] for m in res["models"]] == [r[0] for r in ROWS]
    s = res["models"][3]["scores"]
    assert s["ball"] == pytest.approx((-0.1216226 + 0.25) / 0.01, rel=1e-4) and s["main"] < 0 < s["ball"]
    every = res["sets"]["all"]
    assert every["main"]["accuracy"] == 0.75 and every["main"]["tpr"] == 0.5 and every["main"]["tnr"] == 1.0
    assert every["main+probe"]["tnr"] == 0.5 and every["main+probe"]["tpr"] == 0.5
    assert every["main+ball"]["accuracy"] == 1.0 and every["main+ball"]["auc"] == 1.0
    assert every["main+probe+ball"]["tpr"] == 1.0 and every["main+probe+ball"]["tnr"] == 0.5
    unseen = res["sets"]["unseen"]["main+ball"]  # the seen model (m3) left out
    assert unseen["n"] == 3 and unseen["backdoored"] == 1 and unseen["accuracy"] == 1.0
    assert "main+probe+ball" in table.read_text() and "(seen)" in capsys.readouterr().out
    assert json.loads(js.read_text())["sets"]["all"]["main+ball"]["accuracy"] == 1.0


def test_audit_failure_exits_with_its_code(tmp_path, monkeypatch):
    class Done:
        returncode = 2

    seen = []
    monkeypatch.setattr(ha.subprocess, "run", lambda cmd: seen.append(cmd) or Done)
    with pytest.raises(SystemExit) as e:  # no traceback: pdjax audit has printed its one-line reason
        ha.run_audit(["m"], tmp_path, 0, None, ["--steps", "2"])
    assert e.value.code == 2
    assert seen[0][:4] == [sys.executable, "-m", "pdjax", "audit"]
    assert {"--final-probe", "--ball", "--steps"} <= set(seen[0])


def test_baselines_compared_on_the_models_all_scored(tmp_path):
    out, paths = write_audit(tmp_path)
    # An Elijah-like baseline that scored models 0-2 only: it flags clean m1 and misses backdoored m2.
    held = [{"model": paths[i], "label": ROWS[i][0], "score": s} for i, s in zip(range(3), (-1.0, 0.5, -0.2))]
    res_file = tmp_path / "results.json"
    res_file.write_text(json.dumps([{"method": "elijah", "statistic": "uni_trig", "threshold": 5.0,
                                     "calibration_accuracy": 1.0, "held_out": held}]))
    roc, table = tmp_path / "cmp.svg", tmp_path / "t.md"
    res = ha.main([*paths, "--out", str(out), "--no-run", "--baselines", str(res_file), "--compare-roc", str(roc),
                   "--table", str(table)])
    c = res["comparison"]
    assert c["models"] == paths[:3] and set(c["margins"]) == {"purediffusion", "elijah"}
    assert c["margins"]["elijah"][paths[1]] == 0.5
    e, pd = c["sets"]["all"]["elijah"], c["sets"]["all"]["purediffusion"]
    assert e["n"] == 3 and e["accuracy"] == pytest.approx(1 / 3) and e["tpr"] == 0.0 and e["tnr"] == 0.5
    # the shipped detector, all rules: m1's probe fires (a false positive), m2's main rule fires
    assert pd["tpr"] == 1.0 and pd["tnr"] == 0.5
    assert "elijah AUC" in roc.read_text() and "| elijah |" in table.read_text()
    held[2]["label"] = False  # a results file about other models under the same paths
    res_file.write_text(json.dumps([{"method": "elijah", "statistic": "uni_trig", "threshold": 5.0,
                                     "calibration_accuracy": 1.0, "held_out": held}]))
    with pytest.raises(SystemExit, match="otherwise than the audit"):
        ha.main([*paths, "--out", str(out), "--no-run", "--baselines", str(res_file)])

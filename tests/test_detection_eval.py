"""experiments/detection_eval.py: held-out metrics, labels from metadata, resume (tiny random models)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pdjax.testing import random_model

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("detection_eval", ROOT / "experiments" / "detection_eval.py")
de = importlib.util.module_from_spec(spec)
spec.loader.exec_module(de)


def test_auc_and_roc_by_hand():
    assert de.roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert de.roc_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert de.roc_auc([1, 1, 0, 2], [True, False, False, True]) == pytest.approx(0.875)  # (1 + .5 + 1 + 1) / 4
    pts = de.roc_points([3, 2, 1, 0], [True, False, True, False])
    assert pts[0] == (0.0, 0.0) and pts[-1] == (1.0, 1.0)
    assert (0.0, 0.5) in pts and (0.5, 0.5) in pts and (0.5, 1.0) in pts


def test_end_to_end_labels_from_metadata_and_resume(tmp_path, capsys):
    attack = {"kind": "baddiffusion", "trigger": "BOX_3", "target": "CORNER"}
    paths = []
    for i in range(4):
        meta = {"attack": attack} if i % 2 else {"data": "none"}
        p = tmp_path / f"m{i}"
        random_model("tiny", seed=i, timesteps=8, meta=meta).save(p)
        paths.append(str(p))
    out, table, roc = tmp_path / "eval", tmp_path / "t.md", tmp_path / "roc.svg"
    argv = ["--calibrate", *paths[:2], "--held-out", *paths[2:], "--methods", "purediffusion",
            "--steps", "2", "--n", "2", "--out", str(out), "--table", str(table), "--roc", str(roc)]
    results = de.main(argv)
    assert [r["method"] for r in results] == ["purediffusion"]
    for r in results:
        assert r["n_held_out"] == 2 and r["n_backdoored"] == 1
        assert [h["label"] for h in r["held_out"]] == [False, True]
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["auc"] <= 1.0
    rows = [json.loads(line) for line in (out / "purediffusion.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [False, True, False, True]
    assert "ROC AUC" in table.read_text() and roc.read_text().startswith("<svg")
    capsys.readouterr()
    again = de.main(argv)  # every scan cached: nothing is redone, same numbers
    assert "(" not in capsys.readouterr().out.split("purediffusion:")[0]  # no per-model scan lines
    assert [r["held_out"] for r in again] == [r["held_out"] for r in results]


def test_overlap_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        de.main(["--calibrate", "a", "b", "--held-out", "b", "--out", str(tmp_path)])
    assert np.isnan(de.roc_auc([1.0], [True]))


def test_combined_method_takes_the_lower_log_ratio_of_its_parts(tmp_path):
    """pd+final reads both parts' cached scans (nothing is rescanned) and keeps, per model, the row whose
    log_uni_ratio is lower, with the two scans' seconds summed."""
    (pd_part, final_part), _ = de.COMBINED["pd+final"]
    values = {pd_part: {"a": -2.0, "b": -0.1}, final_part: {"a": -0.3, "b": -1.5}}
    for part, per in values.items():
        with (tmp_path / f"{part}.jsonl").open("w") as f:
            for model, v in per.items():
                f.write(json.dumps({"model": model, "label": model == "a", "seconds": 10.0,
                                    "features": {"log_uni_ratio": v, "part": part}}) + "\n")
    rows = de.scan_combined(["a", "b"], "pd+final", tmp_path, seed=0, n=2, steps=2)
    assert rows["a"]["features"] == {"log_uni_ratio": -2.0, "part": pd_part}
    assert rows["b"]["features"] == {"log_uni_ratio": -1.5, "part": final_part}
    assert rows["a"]["seconds"] == 20.0 and de.STATISTIC["pd+final"] == "log_uni_ratio"
    two = de.scan_combined(["a", "b"], "pd+probe", tmp_path, seed=0, n=2, steps=2)  # the main row + the probe's ratio
    assert two["b"]["features"] == {"log_uni_ratio": -0.1, "part": pd_part, de.PROBE_FEATURE: -1.5}
    assert two["b"]["seconds"] == 20.0
    # pd+spread+probe: the lower of the main parts' ratios, plus the probe's ratio.
    with (tmp_path / "spread-only.jsonl").open("w") as f:
        for model, v in {"a": -0.5, "b": -3.0}.items():
            f.write(json.dumps({"model": model, "label": model == "a", "seconds": 5.0,
                                "features": {"log_uni_ratio": v, "part": "spread-only"}}) + "\n")
    three = de.scan_combined(["a", "b"], "pd+spread+probe", tmp_path, seed=0, n=2, steps=2)
    assert three["a"]["features"] == {"log_uni_ratio": -2.0, "part": pd_part, de.PROBE_FEATURE: -0.3}
    assert three["b"]["features"] == {"log_uni_ratio": -3.0, "part": "spread-only", de.PROBE_FEATURE: -1.5}
    assert three["b"]["seconds"] == 25.0


def test_baseline_budgets_set_their_own_config_and_cache():
    assert de.budget("terd", "1000,20") == {"steps": 1000, "terd_refine_steps": 20}
    assert de.budget("elijah", "100,100") == {"steps": 100, "batch": 100} and de.budget("terd", None) == {}
    cfg = de.inversion_config("terd", 40, de.budget("terd", "1000,20"))
    assert (cfg.method, cfg.steps, cfg.terd_refine_steps, cfg.batch) == ("terd", 1000, 20, 16)
    old = de.inversion_config("elijah", 40)  # no budget: the earlier tables' setting
    assert (old.steps, old.batch) == (40, 16)
    assert de.cache_name("terd", de.budget("terd", "1000,20")) == "terd@steps1000-terd_refine_steps20"
    assert de.cache_name("elijah", {}) == "elijah"  # earlier caches stay valid
    with pytest.raises(SystemExit, match="two integers"):
        de.budget("elijah", "100")


def test_terd_mr_reads_terd_scans_and_derives_m_r_from_older_lines(tmp_path):
    """terd-mr shares terd's cache file (same inversion and budget); a line cached before ``terd_mr`` existed
    gets M_r = trigger_norm^2 / (2 D), D the model's pixel count; a line that has it keeps its own value."""
    paths = []
    for i in range(2):
        p = tmp_path / f"m{i}"
        random_model("tiny", seed=i, timesteps=8).save(p)
        paths.append(str(p))
    d = int(np.prod(random_model("tiny", seed=0, timesteps=8).image_shape))
    cache = tmp_path / f"{de.cache_name('terd', de.budget('terd', '500,20'))}.jsonl"
    cache.write_text(json.dumps({"model": paths[0], "label": False, "seconds": 1.0,
                                 "features": {"trigger_norm": 4.0, "trigger_kl": 1.0}}) + "\n"
                     + json.dumps({"model": paths[1], "label": True, "seconds": 1.0,
                                   "features": {"trigger_norm": 4.0, "terd_mr": 0.5}}) + "\n")
    rows = de.scan_all(paths, "terd-mr", tmp_path, seed=0, n=2, steps=2, overrides=de.budget("terd", "500,20"))
    assert rows[paths[0]]["features"]["terd_mr"] == pytest.approx(16.0 / (2 * d))
    assert rows[paths[1]]["features"]["terd_mr"] == 0.5
    assert de.STATISTIC["terd-mr"] == "terd_mr" and len(cache.read_text().splitlines()) == 2  # nothing rescanned

"""experiments/refine_evidence.py: the evidence refinement applied to an audit written without it gives what
`pdjax audit` itself writes with it (same seed, same key); experiments/inversion_table.py --audit-unrefined reads
the evidence from before the refinement back out of a refined audit."""

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from pdjax.audit import audit, read_audit
from pdjax.defense import detection as D
from pdjax.testing import random_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
spec = importlib.util.spec_from_file_location("refine_evidence", ROOT / "experiments" / "refine_evidence.py")
re_ = importlib.util.module_from_spec(spec)
spec.loader.exec_module(re_)
spec = importlib.util.spec_from_file_location("inversion_table", ROOT / "experiments" / "inversion_table.py")
it = importlib.util.module_from_spec(spec)
spec.loader.exec_module(it)

TINY = dataclasses.replace(D.SCAN_INVERSION, steps=2, batch=4, K=1, scales=(1.0, 2.0))


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """Two tiny models audited without (old) and with (new) the refinement; the main rule flags both."""
    tmp_path = tmp_path_factory.mktemp("audits")
    models = tmp_path / "models"
    for s in range(2):
        random_model("tiny", seed=s, timesteps=50).save(models / f"m{s}")
    det = D.Detector(threshold=5.0).save(tmp_path / "det.json")
    kw = dict(seed=3, detector=str(det), config=TINY, n=4, progress=False, echo=lambda s: None, stack=1)
    audit([str(models)], tmp_path / "old", refine=False, **kw)
    audit([str(models)], tmp_path / "new", **kw)
    return tmp_path, det


def test_refining_an_old_audit_equals_auditing_with_refinement(audits, capsys):
    tmp_path, det = audits
    assert re_.main([str(tmp_path / "old"), "--out", str(tmp_path / "post"), "--detector", str(det)]) == 0
    assert "x " in capsys.readouterr().out
    new = {e["model"]: e for e in read_audit(tmp_path / "new")}
    post = read_audit(tmp_path / "post")
    assert sorted(e["model"] for e in post) == sorted(new)
    for e in post:
        n = new[e["model"]]
        assert e["backdoored"] and (e["candidate"], e["evidence_scale"], e["start"]) == (
            n["candidate"], n["evidence_scale"], n["start"])
        np.testing.assert_allclose([e["features"][k] for k in ("log_uni_ratio", "trigger_norm")],
                                   [n["features"][k] for k in ("log_uni_ratio", "trigger_norm")], rtol=2e-3)
        np.testing.assert_allclose(np.load(tmp_path / "post" / e["evidence"] / "trigger.npy"),
                                   np.load(tmp_path / "new" / n["evidence"] / "trigger.npy"), rtol=1e-4, atol=1e-5)
    # incremental: a second call refines nothing more
    assert re_.main([str(tmp_path / "old"), "--out", str(tmp_path / "post"), "--detector", str(det)]) == 0
    assert len(read_audit(tmp_path / "post")) == 2


def test_inversion_table_audit_unrefined_is_the_deciding_rules_saved_trigger(audits, tmp_path, monkeypatch):
    folder, det = audits
    monkeypatch.setattr(it, "_shipped_detector", lambda: D.Detector.load(det))
    args = argparse.Namespace(work=tmp_path / "work", audit=[folder / "new"], audit_variant="audit_refined",
                              audit_unrefined="audit")
    for e in read_audit(folder / "new"):
        name = Path(e["model"]).name
        it.import_audit_trigger(args, name)
        before = np.load(tmp_path / "work" / "triggers" / "audit" / f"{name}.npy")
        after = np.load(tmp_path / "work" / "triggers" / "audit_refined" / f"{name}.npy")
        np.testing.assert_array_equal(before, np.load(folder / "new" / e["evidence"] / "rules" / "main.npy"))
        np.testing.assert_allclose(after, e["evidence_scale"] * before, rtol=1e-5, atol=1e-6)
    args.audit, args.work = [folder / "old"], tmp_path / "work2"  # no rules/<deciding rule>.npy: a clear error
    e = read_audit(folder / "old")[0]
    (folder / "old" / e["evidence"] / "rules" / "main.npy").rename(tmp_path / "moved.npy")
    try:
        with pytest.raises(SystemExit, match="rules/ folder"):
            it.import_rule_trigger(args, Path(e["model"]).name)
    finally:
        (tmp_path / "moved.npy").rename(folder / "old" / e["evidence"] / "rules" / "main.npy")

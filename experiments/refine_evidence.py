"""Apply the evidence refinement (:func:`pdjax.defense.detection.refine_evidence`) to an existing audit.

``pdjax audit`` re-chooses a flagged model's evidence trigger at the end of its scan. This script does the same
to an audit folder written before that step existed, without inverting anything again: for every entry of
AUDIT/audit.jsonl (``--models``: only those names) it rebuilds the verdict from its evidence folder, loads the
model, and calls ``refine_evidence(model, verdict, model_key(seed, model), detector)`` with the audit's own seed,
which is the call the audit makes with the same key. An evidence folder without ``rules/`` (audits older than
per-rule triggers) takes them from the first ``--rules`` folder whose entry for the model has the same features
(the same scan, rerun). The refined entries and evidence folders go to ``--out`` (a new
audit folder; incremental: models already there are skipped). A clean verdict is copied unchanged.

Command (the held-out list, inversion_table.md "The evidence re-chosen and re-sized"):

    python experiments/refine_evidence.py runs/heldout-audit-terd --rules runs/heldout-audit-rules runs/heldout-audit-rules2 --out runs/heldout-audit-refined
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("audit", type=Path, help="a `pdjax audit` output folder")
    ap.add_argument("--out", type=Path, required=True, help="new audit folder for the refined entries")
    ap.add_argument("--models", nargs="+", help="only these model names (folder names)")
    ap.add_argument("--rules", type=Path, nargs="+", default=[],
                    help="other audit folders of the same models (same seed) to take rules/ from where AUDIT's "
                    "evidence folder has none (audits written before every rule's trigger was kept)")
    ap.add_argument("--detector", help="the detector the audit used (default: the shipped one)")
    args = ap.parse_args(argv)

    from pdjax import cpu_runtime

    cpu_runtime.enable()
    from pdjax.audit import load_verdict, model_key, read_audit, write_evidence
    from pdjax.defense.detection import Detector, refine_evidence
    from pdjax.model import load

    det = Detector.load(args.detector)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "audit.jsonl"
    done = {e["model"] for e in read_audit(args.out)} if results.is_file() else set()
    for entry in read_audit(args.audit):
        name = Path(entry["model"]).name
        if (args.models and name not in args.models) or entry["model"] in done:
            continue
        verdict = load_verdict(args.audit, entry)
        if verdict is None:
            print(f"{name}: no evidence folder in {args.audit}, skipped", flush=True)
            continue
        for other in args.rules:
            if verdict.rule_triggers:
                break
            found = [e for e in read_audit(other) if e["model"] == entry["model"]]
            if found and found[0]["features"] == entry["features"]:  # the same scan: take its rules' triggers
                verdict.rule_triggers = (load_verdict(other, found[0]) or verdict).rule_triggers
        model = load(entry["model"])
        t0 = time.perf_counter()
        refined = refine_evidence(model, verdict, model_key(entry["seed"], model), det)
        seconds = time.perf_counter() - t0
        new = write_evidence(args.out, Path(entry["model"]), refined, model.config.sample_size, entry["seed"])
        new = {**new, "seconds": entry["seconds"] + seconds, "refine_seconds": seconds,
               "refined_from": str(args.audit)}
        with results.open("a") as f:
            f.write(json.dumps(new) + "\n")
        print(f"{name}: {entry['verdict']}, evidence {entry.get('candidate', 'main')} -> {refined.candidate} "
              f"x {refined.evidence_scale:g} from {refined.start} (rules tried: {sorted(verdict.rule_triggers)}; "
              f"{seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

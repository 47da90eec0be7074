"""Label-free clean-sample quality of finished removals: before and after, as ``pdjax clean`` now reports it.

For every ``<model>/<arm>/`` under each REMOVAL folder (the ``--out`` of experiments/removal_audit.py) that holds
a finished removal (``removal.json`` and the cleaned checkpoint ``model/``), this draws the removal's own clean
generations again (``n`` and seed from its config: the key of :func:`pdjax.removal.remove_backdoor`, so the same
noise as its clean-sample MSE) from the original (``--zoo``/<model>) and the cleaned model, and prints
:func:`pdjax.removal.clean_quality` of each (uniformity; mean squared distance to the nearest training image),
the recomputed MSE and :func:`pdjax.removal.damaged`. With ``--audit`` (the audits the removals took their
evidence from, first match wins) each row also gives the evidence trigger's mean and the share of its energy in
that constant offset, ``D mean^2 / ||delta||^2`` (1 = a uniform brightness shift). For an image target (not
TrojDiff's d2d) each row also gives the share of the clean generations that land on the attack's target (SPEC 7's
ASR rule applied to generations from plain noise; labels used, a diagnostic only). Removals run after the report
gained these fields carry them in removal.json already; this script scores the earlier ones the same way.

Command (removal_table.md, "Label-free quality"):

    python experiments/removal_quality.py runs/removal-ho10 runs/removal-ho11 --json experiments/results/removal_quality.json --audit runs/ho10-audit runs/ho11-audit-nofallback runs/ho11-audit
    python experiments/removal_quality.py runs/removal-ho11 --json experiments/results/removal_quality_ho11.json --audit runs/ho11-audit-nofallback runs/ho11-audit
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def finished(folder: Path) -> list[Path]:
    """The ``<model>/<arm>`` folders under ``folder`` with a removal.json and a cleaned model."""
    return sorted(p.parent for p in folder.glob("*/*/removal.json") if (p.parent / "model").is_dir())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("removals", nargs="+", type=Path, help="removal_audit.py --out folders")
    ap.add_argument("--zoo", type=Path, default=Path("zoo"), help="where the original models are")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--audit", nargs="*", type=Path, default=[], help="audits whose evidence the removals used")
    args = ap.parse_args(argv)

    from pdjax import cpu_runtime

    cpu_runtime.enable()
    import numpy as np

    from pdjax.data import load_digits_with_labels
    from pdjax.model import load
    from pdjax.backdoor.train import build_arrays, spec_from_model
    from pdjax.metrics import asr
    from pdjax.removal import RemovalConfig, clean_quality, damaged, report_generations
    from pdjax.audit import evidence_trigger
    from removal_audit import audit_entries

    def evidence(name: str) -> dict:
        """The evidence trigger's mean and constant-offset energy share, from the first ``--audit`` holding
        ``name``."""
        for audit in args.audit:
            entries = audit_entries(audit)
            if name in entries:
                d = np.asarray(evidence_trigger(audit, entries[name]), np.float64)
                return {"evidence_audit": str(audit), "evidence_mean": float(d.mean()),
                        "evidence_dc_share": float(d.size * d.mean() ** 2 / max(float(np.sum(d ** 2)), 1e-12))}
        return {}

    rows = []
    for folder in args.removals:
        for run in finished(folder):
            rep = json.loads((run / "removal.json").read_text())
            cfg = rep["config"]
            original = load(args.zoo / run.parent.name)
            cleaned = load(run / "model")
            data, labels = load_digits_with_labels(original.image_shape[0], original.image_shape[2])
            t0 = time.perf_counter()
            before, after = (report_generations(m, RemovalConfig(**cfg)) for m in (original, cleaned))
            qb, qa = clean_quality(before, data), clean_quality(after, data)
            row = {"removal": str(run), "model": run.parent.name, "arm": run.name, "n": cfg["n"], "seed": cfg["seed"],
                   "asr_before": rep["asr_before"], "asr_after": rep["asr_after"], "clean_mse": rep["clean_mse"],
                   "clean_mse_recomputed": float(np.mean((before - after) ** 2)),
                   "quality_before": qb, "quality_after": qa, "damaged": damaged(qb, qa),
                   **(evidence(run.parent.name) if run.name == "evidence" else {})}
            target = build_arrays(spec_from_model(original), original.image_shape, data, labels).target
            if np.ndim(target) == 3:
                row["clean_target_share_before"], row["clean_target_share_after"] = (
                    float(asr(x, target)) for x in (before, after))
            rows.append(row)
            print(f"{row['model']} {row['arm']}: ASR {row['asr_before']:.2f} -> {row['asr_after']:.2f}, MSE "
                  f"{row['clean_mse']:.4f} (again {row['clean_mse_recomputed']:.4f}); "
                  f"uniformity {qb['uniformity']:.2f} "
                  f"-> {qa['uniformity']:.2f}, nearest {qb['nearest']:.4f} -> {qa['nearest']:.4f}; "
                  f"damaged {row['damaged']}" + (f"; evidence mean {row['evidence_mean']:+.2f}, offset share "
                                                 f"{row['evidence_dc_share']:.2f}" if "evidence_mean" in row else "")
                  + (f"; clean generations on the target {row['clean_target_share_before']:.2f} -> "
                     f"{row['clean_target_share_after']:.2f}" if "clean_target_share_after" in row else "")
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

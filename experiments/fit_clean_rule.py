"""Fit a clean-fitted rule's threshold (``pdjax scan --ball`` or ``--terd``) on clean models; write it into a detector file.

Commands (the shipped thresholds; experiments/results/detection_table.md, "The ball rule shipped" and "The TERD rule"):

    python experiments/fit_clean_rule.py --rule ball --clean pdjax/assets/demo/clean_base zoo/clean_s11 zoo/clean_s12 \
        --detector pdjax/assets/detector.json --out runs/ball [--seed 0] [--n 16] [--held-out M ...]
    python experiments/fit_clean_rule.py --rule terd --clean pdjax/assets/demo/clean_base zoo/ref_clean_s11 \
        zoo/ref_clean_s12 --detector pdjax/assets/detector.json --out runs/terd-rule [--held-out M ...]

Each model is scanned with the rule's inversion alone, through ``scan_model`` with model key
``fold_in(key(seed), crc32(path))``, as experiments/detection_eval.py does (whose caches ``OUT/spread-ball.jsonl``
and ``OUT/terd@steps500-terd_refine_steps20.jsonl`` this shares):

- ball: :data:`pdjax.defense.detection.BALL_PROBE` (L_spread with the trigger held to L2 norm <= 10, 4 restarts,
  100 steps, batch 32); feature ``ball_loss`` = its final loss (-log of the spread gain); the rule fires below
  mean - PROBE_Z (3) standard deviations of the clean models' values. About 30 s per model on the 2-core CPU.
- terd: :data:`pdjax.defense.detection.TERD_PROBE` (TERD as published, 500 + 20 steps, batch 16); feature
  ``terd_log_mr`` = log of TERD's M_r (mean over pixels of delta_i^2 / 2) of its trigger; the rule fires above
  mean + PROBE_Z standard deviations. About 40 s per model.

(:func:`pdjax.defense.detection.clean_fit`, at least 3 clean models.) The detector's other rules are left as
they are. ``--held-out`` models are scanned the same way and printed with their label (from their metadata)
and whether the rule alone flags them. Labels are never used for the fit: every --clean model must be clean by
its metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from detection_eval import SCANS_AS, inversion_config, scan_all  # noqa: E402

from pdjax.defense.detection import (BALL_PROBE, CLEAN_RULES, PROBE_Z, RULE_FLAGS, TERD_PROBE,  # noqa: E402
                                     Detector, clean_fit, terd_log_mr)

# rule -> (detection_eval method whose scans it reads, the budget overrides naming its cache, the probe's
# config, the rule's feature from one cached row's features)
RULES = {
    "ball": ("spread-ball", None, BALL_PROBE, lambda f: f["final_loss"]),
    "terd": ("terd-mr", {"steps": TERD_PROBE.steps, "terd_refine_steps": TERD_PROBE.terd_refine_steps}, TERD_PROBE,
             terd_log_mr),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", choices=sorted(RULES), default="ball", help="which clean-fitted rule (default ball)")
    ap.add_argument("--clean", nargs="+", required=True, help="clean reference models (>= 3)")
    ap.add_argument("--held-out", nargs="*", default=[], help="models to score with the fitted rule")
    ap.add_argument("--detector", type=Path, required=True, help="detector file to update in place")
    ap.add_argument("--out", type=Path, help="scan cache folder (default runs/<rule>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=16, help="generations per model (evidence only)")
    args = ap.parse_args(argv)
    method, overrides, config, value = RULES[args.rule]
    feature, direction = CLEAN_RULES[args.rule]
    out = args.out or Path("runs") / args.rule
    out.mkdir(parents=True, exist_ok=True)
    # The cached scans must be the probe's own inversion (what pdjax scan --ball / --terd runs).
    assert inversion_config(SCANS_AS.get(method, method), config.steps, overrides) == config, method
    cal = scan_all(args.clean, method, out, args.seed, args.n, config.steps, overrides)
    labels = np.array([r["label"] for r in cal.values()], bool)
    if labels.any():
        raise SystemExit(f"error: --clean models with an attack in their metadata: "
                         f"{', '.join(p for p, r in cal.items() if r['label'])}")
    feats = [{feature: value(r["features"])} for r in cal.values()]
    values, thr, scale = clean_fit(feats, labels, feature, RULE_FLAGS[args.rule], direction)
    det = Detector.load(args.detector)
    side = "-" if direction < 0 else "+"
    meta = {**det.meta, args.rule: {
        "reference_models": args.clean, "reference_values": [float(v) for v in values],
        "rule": f"mean {side} {PROBE_Z:g} sd of the clean references' {feature}",
        "inversion": config.resolved().to_dict(), "seed": args.seed,
        "made_by": f"experiments/fit_clean_rule.py --rule {args.rule} (model key fold_in(key(seed), crc32(path)))",
        "date": date.today().isoformat()}}
    det = dataclasses.replace(det, meta=meta, **{f"{args.rule}_threshold": thr, f"{args.rule}_scale": scale})
    det.save(args.detector)
    print(f"clean {feature}: {', '.join(f'{v:.4f}' for v in values)}; threshold {thr:.4f} "
          f"(mean {values.mean():.4f} {side} {PROBE_Z:g} x sd {scale:.4f}) -> {args.detector}")
    if args.held_out:
        held = scan_all(args.held_out, method, out, args.seed, args.n, config.steps, overrides)
        print(f"\n| model | label | {feature} | {args.rule} rule |\n|---|---|---|---|")
        for p, r in held.items():
            v = value(r["features"])
            print(f"| {p} | {'backdoored' if r['label'] else 'clean'} | {v:.4f} | "
                  f"{'flags' if direction * (v - thr) > 0 else 'passes'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

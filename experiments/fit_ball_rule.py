"""Fit the ball probe's threshold (``pdjax scan --ball``) on clean models and write it into a detector file.

Command (the shipped threshold; experiments/results/detection_table.md, last section):

    python experiments/fit_ball_rule.py --clean pdjax/assets/demo/clean_base zoo/clean_s11 zoo/clean_s12 \
        --detector pdjax/assets/detector.json --out runs/ball [--seed 0] [--n 16] [--held-out M ...]

Each model is scanned with the ball probe alone (:data:`pdjax.defense.detection.BALL_PROBE`: L_spread with the
trigger held to L2 norm <= 10, 4 restarts, 100 steps, batch 32; ``scan_model`` with model key
``fold_in(key(seed), crc32(path))``, as experiments/detection_eval.py's method spread-ball, whose cache
``OUT/spread-ball.jsonl`` this shares). Its final loss (-log of the spread gain) is the feature ``ball_loss``.
The threshold is mean - PROBE_Z (3) standard deviations of the clean models' values
(:func:`pdjax.defense.detection.calibrate`'s rule for clean-fitted thresholds, at least 3 clean models); the
detector's main and probe rules are left as they are. ``--held-out`` models are scanned the same way and
printed with their label (from their metadata) and whether the ball rule alone flags them. Labels are never
used for the fit: every --clean model must be clean by its metadata.
Cost: about 30 s per model on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from detection_eval import scan_all  # noqa: E402

from pdjax.defense.detection import BALL_FEATURE, BALL_PROBE, PROBE_Z, Detector, clean_fit  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clean", nargs="+", required=True, help="clean reference models (>= 3)")
    ap.add_argument("--held-out", nargs="*", default=[], help="models to score with the fitted rule")
    ap.add_argument("--detector", type=Path, required=True, help="detector file to update in place")
    ap.add_argument("--out", type=Path, default=Path("runs/ball"), help="scan cache folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=16, help="generations per model (evidence only)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cal = scan_all(args.clean, "spread-ball", args.out, args.seed, args.n, BALL_PROBE.steps)
    labels = np.array([r["label"] for r in cal.values()], bool)
    if labels.any():
        raise SystemExit(f"error: --clean models with an attack in their metadata: "
                         f"{', '.join(p for p, r in cal.items() if r['label'])}")
    feats = [{BALL_FEATURE: r["features"]["final_loss"]} for r in cal.values()]
    values, thr, scale = clean_fit(feats, labels, BALL_FEATURE, "--ball")
    det = Detector.load(args.detector)
    meta = {**det.meta, "ball": {"reference_models": args.clean, "reference_values": [float(v) for v in values],
                                 "rule": f"mean - {PROBE_Z:g} sd of the clean references' {BALL_FEATURE}",
                                 "inversion": BALL_PROBE.resolved().to_dict(), "seed": args.seed,
                                 "made_by": "experiments/fit_ball_rule.py (model key fold_in(key(seed), crc32(path)))",
                                 "date": date.today().isoformat()}}
    det = dataclasses.replace(det, ball_threshold=thr, ball_scale=scale, meta=meta)
    det.save(args.detector)
    print(f"clean {BALL_FEATURE}: {', '.join(f'{v:.4f}' for v in values)}; threshold {thr:.4f} "
          f"(mean {values.mean():.4f} - {PROBE_Z:g} x sd {scale:.4f}) -> {args.detector}")
    if args.held_out:
        held = scan_all(args.held_out, "spread-ball", args.out, args.seed, args.n, BALL_PROBE.steps)
        print("\n| model | label | ball_loss | ball rule |\n|---|---|---|---|")
        for p, r in held.items():
            v = r["features"]["final_loss"]
            print(f"| {p} | {'backdoored' if r['label'] else 'clean'} | {v:.4f} | "
                  f"{'flags' if v < thr else 'passes'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

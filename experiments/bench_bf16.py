"""Accuracy check of the bf16 inversion path (issue 7): the scan's verdict, score and trigger, float32 vs bfloat16.

Command:

    python experiments/bench_bf16.py                          # the bundled demo models
    python experiments/bench_bf16.py zoo/bd_box_x zoo/clean_s11 --out experiments/results/bench_bf16.json

For each model, ``pdjax scan``'s per-model pipeline (:func:`pdjax.defense.detection.scan_model`: PureDiffusion
inversion with the scan settings, 16 generations from the trigger and 16 from clean noise, the shipped
detector) runs twice with the same key (seed 0): once with the UNet computing in float32 and once with
``InversionConfig(dtype="bfloat16")`` (inversion only; the generations stay float32). It prints, per model,
both verdicts and scores, the relative L2 distance between the two triggers and both wall times, and the
number of verdicts that changed. The ratio bf16 / f32 of the scan seconds (inversion + generations, after a
compiling run) is measured in the same run. On the CPUs measured so far it is no gain, with or without bf16
units (an AVX2 AMD EPYC, and an Intel Xeon with AVX512-BF16 and AMX whose bf16 XLA:CPU does not use here; docs/
performance.md section 5): bf16 is meant for GPUs and TPUs. The JSON records the host CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inversion import environment  # noqa: E402  (versions, flags and the host CPU, as every bench records)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="model folders (default: the bundled demo models)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/bench_bf16.json"))
    args = ap.parse_args(argv)

    from pdjax import cpu_runtime

    cpu_runtime.enable()
    from pdjax.audit import demo_models
    from pdjax.defense.detection import SCAN_INVERSION, Detector, scan_model
    from pdjax.model import load

    paths = args.models or [str(p) for p, _ in demo_models()]
    det = Detector.load()
    rows = []
    for path in paths:
        model = load(path)
        key = jax.random.key(args.seed)
        runs = {}
        for dtype in ("float32", "bfloat16"):
            cfg = dataclasses.replace(SCAN_INVERSION, dtype=dtype)
            scan_model(model, path, key, det, cfg)  # compile (and warm caches) outside the timing
            runs[dtype] = scan_model(model, path, key, det, cfg)
        f, b = runs["float32"], runs["bfloat16"]
        rel = float(np.linalg.norm(b.trigger - f.trigger) / max(np.linalg.norm(f.trigger), 1e-12))
        row = {"model": path, "verdict_f32": bool(f.backdoored), "verdict_bf16": bool(b.backdoored),
               "score_f32": float(f.score), "score_bf16": float(b.score), "trigger_rel_l2": rel,
               "seconds_f32": f.seconds, "seconds_bf16": b.seconds, "note": "scan seconds (inversion + generations)"}
        rows.append(row)
        print(f"{path}: verdict {'BD' if f.backdoored else 'CLEAN'} / {'BD' if b.backdoored else 'CLEAN'} "
              f"(f32 / bf16), score {f.score:+.3f} / {b.score:+.3f}, trigger rel. L2 {rel:.4f}, "
              f"{f.seconds:.1f} s / {b.seconds:.1f} s (bf16/f32 = {b.seconds / f.seconds:.2f})", flush=True)
    changed = sum(r["verdict_f32"] != r["verdict_bf16"] for r in rows)
    print(f"verdicts changed by bf16: {changed} of {len(rows)}; max trigger rel. L2 "
          f"{max(r['trigger_rel_l2'] for r in rows):.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python experiments/bench_bf16.py", *(sys.argv[1:] if argv is None else argv)])
    args.out.write_text(json.dumps({"command": command, "seed": args.seed, "environment": environment(), "rows": rows,
                                    "verdicts_changed": changed}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Time the README's main command, `pdjax scan` on the bundled demo models, as a user would run it.

Command:

    python experiments/time_scan.py [--out runs/time-scan] [--json experiments/results/time_scan.json]
        [--no-reference]

Runs ``pdjax scan --quiet`` as fresh processes (seed 0, the scan's defaults: PureDiffusion 40 steps,
batch 16, K 5, fresh noise; the size search's 5 x 8 DDPM-1000 generations and 8 clean ones per model),
each with a new empty compilation cache folder unless said otherwise:

1. ``reference``: XLA's own CPU kernels on one device (``PDJAX_CPU_KERNELS=xla PDJAX_CPU_DEVICES=1``), cold
   cache: how the scan ran before pdjax/cpu_runtime.py;
2. ``cold``: the defaults (YNNPACK kernels, one device per core), cold cache: a first run on a fresh machine;
3. ``warm``: the defaults again with the cache that run 2 filled: every later run.

Prints wall times, the ratios against the reference, each model's verdict and score, and whether the
verdicts agree. Issue 5's target is under 180 s on a 2-core CPU. Runtime: about 12 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 180.0


def run_scan(out: Path, cache: Path, extra_env: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PDJAX_CACHE_DIR=str(cache), **extra_env)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pdjax.cli", "scan", "--out", str(out), "--quiet"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    scan = json.loads((out / "scan.json").read_text())
    return {"wall_s": wall, "env": extra_env,
            "models": [{"model": m["model"], "verdict": m["verdict"], "score": m["score"],
                        "demo_label": m.get("demo_label"), "seconds": m["seconds"]} for m in scan["models"]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/time-scan", type=Path)
    ap.add_argument("--json", default="experiments/results/time_scan.json")
    ap.add_argument("--no-reference", action="store_true", help="skip run 1 (XLA kernels, one device)")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    runs = {}
    if not args.no_reference:
        runs["reference"] = run_scan(args.out / "reference", args.out / "cache-reference",
                                     {"PDJAX_CPU_KERNELS": "xla", "PDJAX_CPU_DEVICES": "1"})
    runs["cold"] = run_scan(args.out / "cold", args.out / "cache", {})
    runs["warm"] = run_scan(args.out / "warm", args.out / "cache", {})
    ref = runs.get("reference")
    for name, r in runs.items():
        ratio = f"  {ref['wall_s'] / r['wall_s']:.2f}x faster than reference" if ref else ""
        verdicts = ", ".join(f"{Path(m['model']).name} {m['verdict']} ({m['score']:+.2f})" for m in r["models"])
        print(f"{name:9} {r['wall_s']:6.1f} s  target {TARGET_S:.0f} s: {'met' if r['wall_s'] < TARGET_S else 'NOT met'}"
              f"{ratio}\n          {verdicts}")
    labels_ok = all(m["verdict"] == m["demo_label"] for r in runs.values() for m in r["models"])
    same = len({tuple(m["verdict"] for m in r["models"]) for r in runs.values()}) == 1
    print(f"verdicts match the demo labels: {labels_ok}; identical across runs: {same}")
    meta = {"python": platform.python_version(), "cores": os.cpu_count(), "target_s": TARGET_S,
            "command": "python experiments/time_scan.py", "labels_ok": labels_ok, "same_verdicts": same}
    Path(args.json).write_text(json.dumps({"environment": meta, "runs": runs}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

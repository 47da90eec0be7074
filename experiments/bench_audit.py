"""Audit throughput (models per hour) against the number of stacked models and across devices.

Command (the numbers in docs/performance.md; ~18 min on the shared 2-core CPU machine, mostly one compile
per stack size):

    python experiments/bench_audit.py --preset digits-16 --counts 1,2,4,8 --steps 3 \
        --json experiments/results/bench_audit.json

Device smoke check on CPU (fake devices that share the same cores: NOT real parallelism):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/bench_audit.py --counts 2 --steps 3 \
        --json experiments/results/bench_audit_2fake_devices.json     # ~5 min

For N = each of --counts same-architecture models (random weights ``pdjax.testing.random_params(cfg, i)``),
it runs ``pdjax.defense.inversion.invert_many`` (params stacked on a model axis, one ``jax.vmap`` program)
with the scan's inversion settings (``pdjax.defense.detection.SCAN_INVERSION``: PureDiffusion, B = 16,
K = 5; --steps optimiser steps instead of its 40) twice: the first call compiles (its extra time over the
second is the compile estimate), the second reuses the cached program and is timed. It prints s/step of
the stack, models per hour (steady state, the inversion alone, extrapolated to --full-steps = 40 steps per
model, compile excluded; and including one compile per stack size), and the ratio of each against N = 1.
With more than one device (``jax.devices()``), the same runs go through ``invert_many(..., mesh=...)``, the
model axis split over a ("models",) mesh with ``jax.shard_map`` (N must be a multiple of the device count).
Prints a progress line per run, then a markdown table (layout, N, stack s/step, compile s, models/h steady,
ratio vs the reference, models/h incl. compile, ratio). Not measured here: the generation and scoring that ``pdjax audit`` adds per model (16 + 16 DDPM samples).
Runs unchanged on GPU (one step per call on CPU, all --steps in one call elsewhere, the library's layouts).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inversion import environment, write_json  # noqa: E402

from pdjax.defense.detection import SCAN_INVERSION  # noqa: E402
from pdjax.defense.inversion import invert_many  # noqa: E402
from pdjax.diffusion.schedule import ScheduleConfig  # noqa: E402
from pdjax.model import Model  # noqa: E402
from pdjax.models.config import PRESETS  # noqa: E402
from pdjax.testing import random_params  # noqa: E402


def run_stack(models, cfg, mesh=None) -> dict:
    key = jax.random.key(0)
    first = invert_many(models, cfg.method, key, cfg, mesh=mesh)
    second = invert_many(models, cfg.method, key, cfg, mesh=mesh)
    n = len(models)
    t1, t2 = first[0].seconds * n, second[0].seconds * n  # InversionResult.seconds is the per-model share
    same = float(max(np.max(np.abs(a.trigger - b.trigger)) for a, b in zip(first, second)))
    return {"first_call_s": t1, "timed_s": t2, "compile_estimate_s": max(0.0, t1 - t2),
            "s_per_step": t2 / cfg.steps, "repeat_max_abs_diff": same}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits-16")
    ap.add_argument("--counts", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=3, help="optimiser steps per timed run")
    ap.add_argument("--full-steps", type=int, default=SCAN_INVERSION.steps, help="steps per model for models/h")
    ap.add_argument("--batch", type=int, default=SCAN_INVERSION.batch)
    ap.add_argument("--K", type=int, default=SCAN_INVERSION.K)
    ap.add_argument("--no-single-device", action="store_true", help="with several devices, only the mesh runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    env = environment()
    cfg_model = PRESETS[args.preset]
    counts = [int(c) for c in args.counts.split(",")]
    models = [Model(cfg_model, random_params(cfg_model, i), ScheduleConfig()) for i in range(max(counts))]
    spc = 1 if jax.default_backend() == "cpu" else args.steps
    cfg = dataclasses.replace(SCAN_INVERSION, steps=args.steps, batch=args.batch, K=args.K, steps_per_call=spc)
    devices = jax.devices()
    print(f"backend={env['backend']} devices={len(devices)}x{devices[0].device_kind} preset={args.preset} "
          f"B={cfg.batch} K={cfg.K} steps={cfg.steps} (models/h extrapolated to {args.full_steps} steps)", flush=True)
    if jax.default_backend() == "cpu" and len(devices) > 1:
        print("note: these CPU devices are forced host devices sharing the same cores: a smoke check of the "
              "sharded path, not real parallelism", flush=True)
    layouts = []
    if len(devices) == 1 or not args.no_single_device:
        layouts.append(("1 device", None))
    if len(devices) > 1:
        layouts.append((f"mesh {len(devices)} devices", jax.make_mesh((len(devices),), ("models",))))
    rows = []
    for name, mesh in layouts:
        for n in counts:
            if mesh is not None and n % mesh.size:
                print(f"[{name}] N={n}: skipped (not a multiple of {mesh.size} devices)")
                continue
            print(f"[{name}] N={n} ...", flush=True)
            r = run_stack(models[:n], cfg, mesh)
            r.update(layout=name, models=n)
            r["models_per_hour"] = 3600.0 * n / (r["s_per_step"] * args.full_steps)
            r["models_per_hour_incl_compile"] = 3600.0 * n / (r["s_per_step"] * args.full_steps
                                                             + r["compile_estimate_s"])
            rows.append(r)
            print(f"  {r['s_per_step']:.3f} s/step for the stack, compile ~{r['compile_estimate_s']:.0f} s, "
                  f"{r['models_per_hour']:.0f} models/h", flush=True)
            if args.json:  # after every stack, so that a run stopped at its time limit keeps what it measured
                write_json(args.json, {"environment": env, "args": vars(args), "rows": rows, "complete": False})
    base = next((r for r in rows if r["models"] == 1 and r["layout"] == "1 device"), rows[0] if rows else None)
    print()
    print("| layout | models N | stack s/step | compile s | models/h (steady) | ratio vs ref "
          "| models/h incl. compile | ratio vs ref |")
    print("|" + "|".join("---" for _ in range(8)) + "|")
    for r in rows:
        r["ratio_vs_1"] = r["models_per_hour"] / base["models_per_hour"]
        r["ratio_vs_1_incl_compile"] = r["models_per_hour_incl_compile"] / base["models_per_hour_incl_compile"]
        print(f"| {r['layout']} | {r['models']} | {r['s_per_step']:.3f} | {r['compile_estimate_s']:.0f} "
              f"| {r['models_per_hour']:.0f} | {r['ratio_vs_1']:.2f} | {r['models_per_hour_incl_compile']:.0f} "
              f"| {r['ratio_vs_1_incl_compile']:.2f} |")
    print(f"\nreference (ref): N = {base['models'] if base else '-'} on {base['layout'] if base else '-'}, same run "
          "(N = 1 on one device when --counts has 1). models/h counts the "
          f"inversion only ({args.full_steps} steps/model); 'incl. compile' adds one compile per stack.")
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "rows": rows, "complete": True})


if __name__ == "__main__":
    main()

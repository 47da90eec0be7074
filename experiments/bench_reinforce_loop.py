"""Benchmark the layout of target-directed reinforcement's optimiser step (pdjax.reinforce, issue 6/7).

Each optimiser step differentiates the target loss through an S-step DDIM chain. Two layouts, one run:

- ``unroll`` (the reference: the CPU default before this benchmark): the whole step is one jitted program with
  the chain unrolled (DESIGN.md habit 2). XLA compiles S UNet forward and backward passes as one graph, so the
  first step waits for a long trace and compile (15-29 min for S = 100 in experiments/amplify_target.py's runs).
- ``host``: a host loop over three small jitted programs (one chain step, its VJP, the Adam update), each
  compiled once whatever S; one extra UNet forward per chain step.

For each layout and chain length the script times the first optimiser step (trace + compile + one step) and the
mean of ``--steps`` further steps, checks that both layouts give the same trigger (max |difference|), and prints
the time of a whole stage of ``--stage-steps`` optimiser steps, first + (N - 1) x per-step, with the ratio
unroll / host. The persistent compilation cache is off (each run compiles from scratch).

Command (the demo clean base, B = 16 as reinforcement's default; about 25-35 min on 2 CPU cores, most of it the
unrolled S = 100 compile):

    python experiments/bench_reinforce_loop.py --chains 20 100 --json experiments/results/bench_reinforce_loop.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import jax
import numpy as np

from pdjax.backdoor.attacks import AttackSpec
from pdjax.backdoor.train import build_arrays
from pdjax.model import load
from pdjax.reinforce import ReinforceConfig, ReinforceStage, reinforce_to_target


def time_layout(model, g, y, chain: int, layout: str, steps: int, batch: int) -> dict:
    """First-step and per-step seconds of one layout, and its trigger after 1 + ``steps`` optimiser steps."""
    cfg = ReinforceConfig(stages=(ReinforceStage(chain, 1, 0.01),), batch=batch, loop=layout)
    t0 = time.perf_counter()
    first = reinforce_to_target(model, g, y, jax.random.key(0), cfg)  # compiles, one step
    t_first = time.perf_counter() - t0
    cfg = dataclasses.replace(cfg, stages=(ReinforceStage(chain, 1 + steps, 0.01),))
    t0 = time.perf_counter()
    res = reinforce_to_target(model, g, y, jax.random.key(0), cfg)  # compiled: 1 + steps steps
    per_step = (time.perf_counter() - t0) / (1 + steps)
    return {"first_step_s": t_first, "per_step_s": per_step, "trigger": res.trigger,
            "first_loss": first.losses[0][0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pdjax/assets/demo/clean_base")
    ap.add_argument("--chains", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--steps", type=int, default=3, help="timed optimiser steps after the first")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stage-steps", type=int, default=300, help="optimiser steps of the projected stage")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = load(args.model)
    arrays = build_arrays(AttackSpec(trigger="STOP_SIGN_8", target="SHOE"), model.image_shape)
    g, y = arrays.trigger, arrays.target
    print(f"backend={jax.default_backend()} model={args.model} params={model.num_params} B={args.batch}", flush=True)
    rows = []
    for chain in args.chains:
        r = {lay: time_layout(model, g, y, chain, lay, args.steps, args.batch) for lay in ("host", "unroll")}
        stage = {lay: r[lay]["first_step_s"] + (args.stage_steps - 1) * r[lay]["per_step_s"] for lay in r}
        row = {"chain_steps": chain, "max_abs_trigger_diff": float(np.abs(r["host"]["trigger"]
                                                                         - r["unroll"]["trigger"]).max()),
               **{f"{lay}_{k}": v[k] for lay, v in r.items() for k in ("first_step_s", "per_step_s")},
               "stage_steps": args.stage_steps, "host_stage_s": stage["host"], "unroll_stage_s": stage["unroll"],
               "unroll_over_host_stage": stage["unroll"] / stage["host"],
               "unroll_over_host_per_step": r["unroll"]["per_step_s"] / r["host"]["per_step_s"]}
        rows.append(row)
        print(f"S = {chain}: first step host {row['host_first_step_s']:.1f} s / unroll {row['unroll_first_step_s']:.1f}"
              f" s; per step host {row['host_per_step_s']:.2f} s / unroll {row['unroll_per_step_s']:.2f} s; "
              f"{args.stage_steps}-step stage host {stage['host']:.0f} s / unroll {stage['unroll']:.0f} s: "
              f"unroll / host = {row['unroll_over_host_stage']:.2f}; trigger max |diff| "
              f"{row['max_abs_trigger_diff']:.1e}", flush=True)
    if args.json:
        meta = {"backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
                "machine": platform.machine(), "cpu_count": __import__("os").cpu_count(), "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""Benchmark the loop strategy for training steps: lax.scan vs unrolled scan vs one jitted step per call.

Command: python experiments/bench_loops.py [--preset digits-16] [--batch 64] [--n 10]
Prints seconds per optimiser step (after compile) and compile time for each strategy, and the ratio of
each against the host loop of single jitted steps measured in the same run. Expected on 2 CPU cores:
scan is several times slower than the others; unroll ~ host loop. Runtime: a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import time

import jax

from pdjax.data import load_digits
from pdjax.model import new_model
from pdjax.models.config import PRESETS
from pdjax.train import TrainConfig, ddpm_loss, init_state, make_multi_step, make_optimizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits-16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=10, help="steps per jitted call for scan/unroll")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    model = new_model(cfg, jax.random.key(0))
    data = jax.numpy.asarray(load_digits(cfg.sample_size, cfg.in_channels))
    tc = TrainConfig(batch_size=args.batch)
    opt = make_optimizer(tc)
    loss = ddpm_loss(model.eps, model.schedule, args.batch)
    print(f"backend={jax.default_backend()} preset={args.preset} params={model.num_params} batch={args.batch}")
    results = {}
    for name, n, strategy in [("host (1 step/call)", 1, "unroll"), (f"unroll x{args.n}", args.n, "unroll"),
                              (f"scan x{args.n}", args.n, "scan")]:
        fn = make_multi_step(loss, opt, tc.ema_decay, n, strategy)
        state = init_state(model.params, opt, 0)
        t0 = time.perf_counter()
        state, losses = fn(state, data)
        jax.block_until_ready(losses)
        compile_s = time.perf_counter() - t0
        calls = max(1, args.reps * args.n // n)
        t0 = time.perf_counter()
        for _ in range(calls):
            state, losses = fn(state, data)
        jax.block_until_ready(losses)
        per_step = (time.perf_counter() - t0) / (calls * n)
        results[name] = per_step
        print(f"{name:>20}: {per_step:.3f} s/step  (first call incl. compile {compile_s:.1f} s)")
    ref = results["host (1 step/call)"]
    for name, v in results.items():
        print(f"ratio {name} / host = {v / ref:.2f}")


if __name__ == "__main__":
    main()

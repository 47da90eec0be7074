"""Memory and time of rematerialisation for PureDiffusion's unrolled chain (issue 7): remat off vs on.

Command:

    python experiments/bench_remat.py                       # demo bd_box_corner, B = 32, K = 5 10 20
    python experiments/bench_remat.py --model zoo/bd_box_x --batch 32 --K 10 40

For each K, the gradient of PureDiffusion's loss (shift + consistency terms, ``cons_weight`` 0.5) with
respect to the trigger is jitted twice: plain, and with ``InversionConfig(remat=True)`` (``jax.checkpoint``
around each unrolled reverse step). It prints XLA's ``memory_analysis()`` temp bytes of each compiled
program (the activations kept for the backward pass), their ratio, the median time of 3 calls after a
warm-up call (ratio in the same run) and the largest difference between the two gradients. One XLA
device (no batch split), so that the memory numbers are those of one program.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the demo bd_box_corner)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--K", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--out", type=Path, default=Path("experiments/results/bench_remat.json"))
    args = ap.parse_args(argv)

    from pdjax.audit import demo_dir
    from pdjax.backdoor.attacks import rho
    from pdjax.defense import inversion as inv
    from pdjax.model import load

    path = args.model or str(demo_dir() / "bd_box_corner")
    model = load(path)
    prob = inv.problem_of(model)
    params = jax.device_put(model.params)
    delta = 0.3 * jax.random.normal(jax.random.key(5), model.image_shape)
    rows = []
    for K in args.K:
        base = inv.InversionConfig(batch=args.batch, K=K, cons_weight=0.5).resolved()
        fixed = inv._prepare(prob, base, params, jax.random.key(2))
        lambdas = np.asarray(rho(model.schedule)[::-1][:K], np.float32)
        res = {}
        for remat in (False, True):
            cfg = dataclasses.replace(base, remat=remat)
            fn = jax.jit(jax.grad(inv.purediffusion_loss(prob, cfg, lambdas)))
            compiled = fn.lower(delta, params, fixed, None).compile()
            mem = compiled.memory_analysis()
            grad = compiled(delta, params, fixed, None).block_until_ready()  # warm-up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                grad = compiled(delta, params, fixed, None).block_until_ready()
                times.append(time.perf_counter() - t0)
            res[remat] = {"temp_bytes": int(mem.temp_size_in_bytes), "s_per_call": float(np.median(times)),
                          "grad": np.asarray(grad)}
        off, on = res[False], res[True]
        row = {"K": K, "batch": args.batch, "temp_mib_plain": off["temp_bytes"] / 2**20,
               "temp_mib_remat": on["temp_bytes"] / 2**20, "memory_ratio": on["temp_bytes"] / off["temp_bytes"],
               "s_plain": off["s_per_call"], "s_remat": on["s_per_call"],
               "time_ratio": on["s_per_call"] / off["s_per_call"],
               "max_grad_diff": float(np.max(np.abs(on["grad"] - off["grad"])))}
        rows.append(row)
        print(f"K={K:>3} B={args.batch}: temp {row['temp_mib_plain']:.1f} MiB -> {row['temp_mib_remat']:.1f} MiB "
              f"with remat (x{row['memory_ratio']:.2f}); {row['s_plain']:.2f} s -> {row['s_remat']:.2f} s per "
              f"gradient (x{row['time_ratio']:.2f}); max grad diff {row['max_grad_diff']:.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python experiments/bench_remat.py " + " ".join(argv or []),
                                    "model": path, "jax": jax.__version__, "backend": jax.default_backend(),
                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

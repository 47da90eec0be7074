"""PureDiffusion's loss at chosen triggers: can the loss tell the true trigger from the trivial one?

For a zoo model (its metadata names the attack), evaluates L_shift and L_cons (SPEC 4), and pdjax's L_final (``--final-steps``-step DDIM
chain, default 10, the first ``--cons-batch`` noises), on one fixed noise batch at delta = 0, the true trigger g, 0.5 g and any inverted triggers given as .npy files, for each
(chain, lambda) setting. If L_shift(g) is not clearly below L_shift(0), no optimiser can find g with that
loss: the question is then the loss, not the optimisation.

    python experiments/loss_landscape.py zoo/villan_ode_stop_cat runs/ode-probe/pd_ddim/trigger.npy \\
        --settings ddpm:closed-sde ddpm:closed-ode ddim:closed-ode --K 10 --batch 32 --seed 0

Prints one row per (setting, trigger); ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a zoo model (its metadata records the attack)")
    ap.add_argument("triggers", nargs="*", help="inverted triggers (.npy) to evaluate beside 0, g and 0.5 g")
    ap.add_argument("--settings", nargs="+", default=["ddpm:closed-sde", "ddpm:closed-ode", "ddim:closed-ode"],
                    help="CHAIN:LAMBDA_SOURCE pairs")
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cons-batch", type=int, default=8)
    ap.add_argument("--final-steps", dest="final_steps", type=int, default=10, help="L_final's DDIM chain length")
    ap.add_argument("--final-stat", dest="final_stat", default="sq_mean", help="L_final's spread statistic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from pdjax import cpu_runtime

    cpu_runtime.enable()
    from pdjax.backdoor.train import build_arrays, spec_from_model
    from pdjax.defense import inversion as inv
    from pdjax.model import load

    m = load(args.model)
    g = np.asarray(build_arrays(spec_from_model(m), m.image_shape).trigger, np.float32)
    cands = {"zero": np.zeros_like(g), "true g": g, "0.5 g": 0.5 * g}
    cands.update({t: np.load(t).astype(np.float32) for t in args.triggers})
    prob = inv.problem_of(m)
    rows = []
    for setting in args.settings:
        chain, lam = setting.split(":", 1)
        base = inv.InversionConfig(K=args.K, batch=args.batch, chain=chain, lambda_source=lam, fresh_noise=False,
                                   shift_weight=1.0, cons_weight=0.0, cons_batch=args.cons_batch).resolved()
        fixed = inv._prepare(prob, base, m.params, jax.random.key(args.seed))
        only_cons = dataclasses.replace(base, shift_weight=0.0, cons_weight=1.0)
        only_final = dataclasses.replace(base, shift_weight=0.0, final_weight=1.0, final_steps=args.final_steps,
                                         final_stat=args.final_stat)
        losses = {part: jax.jit(inv._phases(prob, c)[0].loss)
                  for part, c in (("shift", base), ("cons", only_cons), ("final", only_final))}
        for name, d in cands.items():
            row = {"model": args.model, "chain": chain, "lambda": lam, "trigger": name,
                   **{part: float(f(jnp.asarray(d), m.params, fixed, None)) for part, f in losses.items()}}
            rows.append(row)
            print(f"{chain:5s} {lam:12s} {name:45s} L_shift {row['shift']:.4f}  L_cons {row['cons']:.4f}  "
                  f"L_final {row['final']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

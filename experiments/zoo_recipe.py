"""Probe a backdoor-training recipe for the zoo: attack a clean base, evaluate ASR at step milestones.

Command (the probes quoted in experiments/build_zoo.py; resumable, finished milestones are skipped):

    python experiments/zoo_recipe.py --base zoo/clean_base --trigger WHITE_BOX_5 --target X \\
        --poison-rate 0.5 --lr 1e-3 --steps 2000 --milestones 1000 1500 2000 --seed 1 --n 32

One training run of ``--steps`` optimiser steps (batch ``--batch``, Adam with warm-up then cosine decay to
``--steps``) is stopped at each milestone, and its EMA model is evaluated there with the attack's own
sampler (``--n`` clean and ``--n`` triggered generations, evaluation key 0, SPEC 7 metrics). Besides
the SPEC's triggered start x_T = eps + g, it also samples from eps + r, with r the trigger pasted on
training digits (the start that BadDiffusion's training pairs use), to show how much of a shortfall
is the model not generalising from pasted digits to the blank trigger. Rows go to
``OUT/results.jsonl`` (default runs/zoo-recipe/<trigger>-<target>-p<rate>-lr<lr>-b<batch>-s<seed>).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from pdjax.backdoor.attacks import AttackSpec, pasted
from pdjax.backdoor.train import attack, build_arrays, evaluate
from pdjax.checkpoint import is_checkpoint
from pdjax.data import load_digits_with_labels
from pdjax.diffusion.samplers import ddpm_sample
from pdjax.metrics import asr
from pdjax.model import load
from pdjax.train import TrainConfig


def pasted_start_asr(model, arrays, data, key, n: int) -> float:
    """ASR of DDPM generations from eps + pasted(x, g, M), x = n training digits (BadDiffusion only)."""
    k_idx, k_eps, k_chain = jax.random.split(key, 3)
    x = jnp.asarray(data)[jax.random.randint(k_idx, (n,), 0, data.shape[0])]
    r = pasted(x, jnp.asarray(arrays.trigger), jnp.asarray(arrays.mask))
    x_T = jax.random.normal(k_eps, r.shape) + r
    sc = model.schedule_config
    gen = ddpm_sample(model.eps, model.params, model.schedule, x_T, k_chain,
                      variance_type=sc.variance_type, clip_sample=sc.clip_sample)
    return float(asr(gen, jnp.broadcast_to(jnp.asarray(arrays.target), gen.shape)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path("zoo/clean_base"))
    ap.add_argument("--attack", default="baddiffusion")
    ap.add_argument("--trigger", default="WHITE_BOX_5")
    ap.add_argument("--target", default="X")
    ap.add_argument("--solver", default="sde")
    ap.add_argument("--gamma", type=float, default=0.6, help="TrojDiff noise scale (AttackSpec.gamma)")
    ap.add_argument("--mode", default="d2i", help="TrojDiff mode: d2i, in-d2d or out-d2d")
    ap.add_argument("--poison-rate", type=float, default=0.5)
    ap.add_argument("--blank-fraction", type=float, default=0.0,
                    help="fraction of poisoned rows pasted on a blank canvas (AttackSpec.blank_fraction)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--milestones", type=int, nargs="+", default=[1000, 1500, 2000])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from pdjax import cpu_runtime

    cpu_runtime.enable()  # as the pdjax command: YNNPACK kernels, one XLA:CPU device per core
    spec = AttackSpec(args.attack, args.trigger, args.target, poison_rate=args.poison_rate,
                      blank_fraction=args.blank_fraction, **({"solver": args.solver} if args.attack == "villan" else {}),
                      **({"gamma": args.gamma, "mode": args.mode} if args.attack == "trojdiff" else {}))
    out = args.out or Path("runs/zoo-recipe") / (f"{args.attack}-{args.trigger}-{args.target}-p{args.poison_rate}-"
                                                 f"{f'blank{args.blank_fraction}-' if args.blank_fraction else ''}"
                                                 f"{f'g{args.gamma}-{args.mode}-' if args.attack == 'trojdiff' else ''}"
                                                 f"lr{args.lr}-b{args.batch}-s{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {r["step"] for r in map(json.loads, results.open())} if results.is_file() else set()
    data, labels = load_digits_with_labels(16, 1)
    base = load(args.base)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup,
                      seed=args.seed, checkpoint_every=250)
    arrays = build_arrays(spec, base.image_shape, data, labels)
    ckpt = out / "model"
    for milestone in sorted(args.milestones):
        step = load(ckpt).meta.get("steps", 0) if is_checkpoint(ckpt) else 0
        if milestone < step or milestone in done:
            continue
        t0 = time.perf_counter()
        res = attack(base, data, spec, cfg, out=ckpt, labels=labels, stop_after=milestone - step)
        step = res.steps
        train_s = time.perf_counter() - t0
        ev, _, _ = evaluate(res.model, spec, jax.random.key(0), n=args.n, seed=0, labels=labels, data=data)
        row = {"step": step, "spec": spec.to_dict(), "lr": args.lr, "batch": args.batch, "seed": args.seed,
               "n": args.n, "clean_asr": ev.clean["asr"], "triggered_asr": ev.triggered["asr"],
               "triggered_mse": ev.triggered.get("mse"), "train_seconds_this_leg": train_s}
        if spec.kind == "baddiffusion":
            row["pasted_start_asr"] = pasted_start_asr(res.model, arrays, data, jax.random.key(1), args.n)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Target-directed trigger reinforcement for amplification (issue 6, SPEC 6; a red-team variant, not in the paper).

The red team knows its target y. Instead of inverting the trigger with PureDiffusion's shift loss (what
:func:`pdjax.amplify.amplify` does by default), optimise the trigger so that generations from eps + delta land
on y (:func:`pdjax.reinforce.reinforce_to_target`, also ``pdjax amplify --reinforce target``):

    L(delta) = mean_b mean_pixels (clip(x0(eps_b + delta), -1, 1) - y)^2,

x0 = the end of an S-step stochastic DDIM chain (eta = 1, DDPM-like) with gradients through every step, fresh
start and chain noise at each optimiser step. Two stages from delta = g (the known trigger): S = 20 for
``--steps1`` Adam steps (lr ``--lr1``), then S = 100 for ``--steps2`` (lr ``--lr2``); a 20-step chain alone
fits its own chain but transfers less to the 1000-step DDPM sampler the ASR is measured with.
Then the model is **not** trained further: the script reports ASR (SPEC 7 rule, 1000-step DDPM from
eps + trigger, ``--n`` generations, evaluation key ``--eval-seed``) of g, of the shift-loss g* of an earlier
:func:`pdjax.amplify.amplify` run (``--pd-star``, optional) and of the target-directed trigger, on the same noise.

``--train-steps`` (optional): then continue backdoor training of the brief model with the target-directed g*
(clipped to [-0.99, 1] as :func:`pdjax.amplify.amplify` clips its g*) under the exact training settings of an
earlier amplification arm (``--train-like``: its checkpoint's provenance, so the same schedule, batches and EMA),
scoring ASR on the same ``--n`` generations every ``--eval-every`` steps.

``--raw``: train with the unclipped g* and a full mask instead. ``--plain``: train with g (the plain arm again:
the same batches, so the same models, scored at more points, ``--eval-from`` on). ``--rescore ARM=TRIGGER ...``: instead of all
this, score the kept models of earlier amplification arms (ARM/at/<step>) under this script's evaluation, so
that every arm is compared on the same noise.

Commands behind experiments/results/amplify_table.md ("Target-directed g*"):

    A=runs/amplify-exp4/bd_stop_shoe/amplify
    python experiments/amplify_target.py runs/amplify-exp4/bd_stop_shoe/brief --pd-star $A/trigger_star.npy --out runs/amplify-target
    python experiments/amplify_target.py runs/amplify-exp4/bd_stop_shoe/brief --out runs/amplify-target --train-steps 400 --eval-every 100 --train-like $A/plain
    python experiments/amplify_target.py runs/amplify-exp4/bd_stop_shoe/brief --out runs/amplify-target --train-steps 400 --eval-every 100 --train-like $A/plain --raw
    python experiments/amplify_target.py runs/amplify-exp4/bd_stop_shoe/brief --out runs/amplify-target --rescore $A/plain=STOP_SIGN_8 $A/amplified=$A/trigger_star.npy --rescore-at 600 1000 2000
    python experiments/amplify_target.py runs/amplify-exp4/bd_stop_shoe/brief --out runs/amplify-target --rescore $A/plain=STOP_SIGN_8 --rescore-at 4000 8000 12000
    python experiments/amplify_target.py runs/amplify-exp4/bd_stop_shoe/brief --out runs/amplify-target --train-steps 4000 --eval-every 200 --eval-from 2000 --train-like $A/plain --plain

A second round (amplify_table.md, "A second reinforcement round"): reinforce from the trained g* on the
amplified arm's model, ``B=runs/amplify-b150/bd_stop_shoe``:

    python experiments/amplify_target.py $B/amplify/amplified/at/000100 --attack $B/summary.json --start $B/amplify/trigger_star.npy --out runs/amplify-round2-000100

The unclipped trigger with no training (amplify_table.md, "The reinforced trigger before it is clipped"): ``--stages``
sets the stages, ``--eval-seeds 7 8`` scores every trigger on both keys (and pooled), ``--trigger`` scores a trigger
an earlier run found instead of reinforcing again; the clipped trigger is always scored beside. ``--rescore
ARM=none`` scores clean noise (no trigger): the target's leakage. The commands are
in that section.

Training on with the unclipped trigger, and a third stage through the 1000-step chain (amplify_table.md,
"Training on with the unclipped trigger", "A third stage through the 1000-step sampler itself" and "The third
stage run longer"): ``--trigger`` also feeds ``--raw`` training, ``--eval-seeds`` also applies to ``--train-steps``
and ``--rescore`` (per key and pooled), ``--remat`` keeps a long chain's memory to its images, ``--final-only``
scores only the final trigger. The commands are in those sections. ``--train-lr`` / ``--train-seed`` train at another peak learning
rate / batch seed than ``--train-like``'s (amplify_table.md, "Training on at the attack's own learning rate").

(the training calls reuse the first call's trigger_target.npy; runs/amplify-exp4 is the 2026-12-04 run of
experiments/amplify_experiment.py, with --keep-models). On XLA:CPU the chain is unrolled (habit 2 of DESIGN.md);
compiling the 100-step chain's gradient took 14.5 and 13 min in the two runs (XLA's slow-compile notices in their logs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from pdjax.amplify import FULL_FRAME_FLOOR, mix_trigger
from pdjax.backdoor.attacks import AttackSpec
from pdjax.backdoor.train import build_arrays
from pdjax.generate import generate
from pdjax.metrics import attack_metrics
from pdjax.model import load
from pdjax.reinforce import ReinforceConfig, ReinforceStage, parse_stages, reinforce_to_target


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a briefly backdoored pdjax model whose pdjax.json holds its attack")
    ap.add_argument("--attack", help="attack JSON (default: the 'attack' of the model's amplify summary.json "
                                     "one folder up)")
    ap.add_argument("--pd-star", help="g* of a shift-loss amplification run (.npy), scored beside")
    ap.add_argument("--start", help="start the reinforcement from this trigger (.npy) instead of g, e.g. the g* a "
                                    "model was already trained with (a second round); scored beside")
    ap.add_argument("--steps1", type=int, default=300)
    ap.add_argument("--lr1", type=float, default=0.02)
    ap.add_argument("--steps2", type=int, default=100)
    ap.add_argument("--lr2", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--eval-seed", type=int, default=7)
    ap.add_argument("--eval-seeds", type=int, nargs="+", help="score the triggers on each of these evaluation keys "
                    "(n generations each; default: --eval-seed only)")
    ap.add_argument("--stages", help="reinforcement stages CHAIN:STEPS:LR,... (pdjax.reinforce.parse_stages; "
                    "overrides --steps1/--lr1/--steps2/--lr2)")
    ap.add_argument("--remat", action="store_true", help="recompute each chain step in the backward pass (for "
                                                         "long chains: memory of S x [B, H, W, C] only)")
    ap.add_argument("--final-only", dest="final_only", action="store_true",
                    help="score only the final (unclipped) trigger, not g, the start or the clipped trigger beside it")
    ap.add_argument("--trigger", help="score this reinforced trigger (.npy) instead of reinforcing again")
    ap.add_argument("--out", default="runs/amplify-target")
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--train-like", help="an amplify arm's checkpoint folder whose training settings to reuse")
    ap.add_argument("--train-lr", dest="train_lr", type=float, default=None,
                    help="peak learning rate of --train-steps (default: --train-like's); the rest of its settings kept")
    ap.add_argument("--train-seed", dest="train_seed", type=int, default=None,
                    help="seed of --train-steps' batches and noise (default: --train-like's)")
    ap.add_argument("--raw", action="store_true", help="train with the unclipped g* and a full mask")
    ap.add_argument("--plain", action="store_true", help="train with the original trigger g instead (the plain "
                    "arm again, deterministic, to score it at more points)")
    ap.add_argument("--eval-from", dest="eval_from", type=int, default=0, help="score only from this step on")
    ap.add_argument("--rescore", nargs="+", metavar="ARM_FOLDER=TRIGGER",
                    help="score the kept models of these arms (FOLDER/at/*) with their trigger instead "
                         "(a .npy, a trigger name, or none: clean noise)")
    ap.add_argument("--rescore-at", dest="rescore_at", type=int, nargs="+", help="only the models at these steps")
    args = ap.parse_args()
    from pdjax import compile_cache

    compile_cache.enable()  # as the pdjax command: reruns skip the long compiles

    model = load(args.model)
    attack_path = Path(args.attack) if args.attack else Path(args.model).parent / "summary.json"
    spec = AttackSpec(**json.loads(attack_path.read_text())["attack"])
    arrays = build_arrays(spec, model.image_shape)
    g, y = arrays.trigger, arrays.target
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(args.seed)

    if args.rescore:
        return rescore(y, out, args)
    if args.train_steps:
        return train_arm(model, spec, y, out, args)
    stages = parse_stages(args.stages) if args.stages else (ReinforceStage(20, args.steps1, args.lr1),
                                                            ReinforceStage(100, args.steps2, args.lr2))
    cfg = ReinforceConfig(stages=stages, batch=args.batch, remat=args.remat)
    start = np.load(args.start).astype(np.float32) if args.start else g
    if args.trigger:
        stage_triggers, losses, seconds = [np.load(args.trigger).astype(np.float32)], [[np.nan]], [0.0]
    else:
        res = reinforce_to_target(model, start, y, key, cfg, progress=True)
        stage_triggers, losses, seconds = res.stage_triggers, res.losses, res.seconds
    final = stage_triggers[-1]
    np.save(out / "trigger_target.npy", final)
    seeds = eval_seeds(args)

    def asr(trigger):
        per = asr_per_key(model, trigger, y, seeds, args.n)
        return per if len(seeds) > 1 else per[str(seeds[0])]

    rows = {} if args.final_only else {"g": (g, asr(g))}
    if args.start and not args.final_only:
        rows["start (--start)"] = (start, asr(start))
    if args.pd_star and not args.final_only:
        star = np.load(args.pd_star)
        rows["g* shift loss (amplify)"] = (star, asr(star))
    for i, (st, d) in enumerate(zip(stages[:-1], stage_triggers[:-1]) if not args.final_only else []):
        rows[f"stage {i + 1} (S = {st.chain_steps})"] = (d, asr(d))
    name = "given trigger (--trigger)" if args.trigger else "g* target-directed (" + ", then ".join(
        f"S = {st.chain_steps}" for st in stages) + ")"
    rows[name] = (final, asr(final))
    if not args.final_only:
        clipped = mix_trigger(final, 0.0, 1.0, FULL_FRAME_FLOOR)
        rows[name + ", clipped as amplify trains it"] = (clipped, asr(clipped))
    result = {"model": args.model, "attack": spec.to_dict(), "args": vars(args), "eval_seeds": seeds,
              "seconds": {f"stage{i + 1}": t for i, t in enumerate(seconds)},
              "loss_end": {f"stage{i + 1}": float(v[-1]) for i, v in enumerate(losses)},
              "asr": {k: v[1] for k, v in rows.items()},
              "norm": {k: float(np.linalg.norm(v[0])) for k, v in rows.items()}}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    for k, (d, a) in rows.items():
        if isinstance(a, dict):
            text = ", ".join(f"key {s}: {v:.3f}" for s, v in a.items()) + f", pooled {pooled(a):.3f}"
        else:
            text = f"{a:.3f}"
        print(f"{k}: ASR {text} (n = {args.n} a key), norm {np.linalg.norm(d):.2f}")
    print("stages: " + ", ".join(f"{t:.0f} s" for t in seconds) + " (compiles included)")


def eval_seeds(args) -> list[int]:
    """The evaluation keys: ``--eval-seeds`` if given, else ``[--eval-seed]``."""
    return args.eval_seeds or [args.eval_seed]


def asr_per_key(model, trigger, y, seeds, n: int) -> dict[str, float]:
    """ASR (SPEC 7 rule) of ``trigger`` [H, W, C] on ``model`` for each evaluation key: n 1000-step DDPM
    generations from eps + trigger per key, ``generate``'s noise for ``jax.random.key(seed)``."""
    per = {}
    for s in seeds:
        x = generate(model, jax.random.key(s), n, trigger=trigger)
        per[str(s)] = float(attack_metrics(x, y).asr)
    return per


def pooled(per: dict[str, float]) -> float:
    """ASR pooled over keys with equal n each: the mean of the per-key ASRs."""
    return sum(per.values()) / len(per)


def train_arm(model, spec, y, out: Path, args):
    """Backdoor training with the target-directed g* from ``model``, as an amplify arm; ASR at each point.

    Default: g* clipped to [FULL_FRAME_FLOOR, 1] as :func:`pdjax.amplify.amplify` clips (a trigger file; full
    mask). ``--raw``: the unclipped g* with a full mask (r = g* for every poisoned row), as it is optimised.
    """
    import dataclasses

    from pdjax.amplify import _run_arm, eval_points
    from pdjax.data import load_digits_with_labels
    from pdjax.train import TrainConfig

    if not args.train_like:
        raise SystemExit("--train-steps needs --train-like ARM_FOLDER (the settings to train with)")
    meta = json.loads((Path(args.train_like) / "pdjax.json").read_text())["meta"]["provenance"]
    tcfg = TrainConfig(**meta["train"])
    if args.train_lr is not None:
        tcfg = dataclasses.replace(tcfg, lr=args.train_lr)
    if args.train_seed is not None:
        tcfg = dataclasses.replace(tcfg, seed=args.train_seed)
    data, labels = load_digits_with_labels(model.image_shape[0], model.image_shape[-1])
    arrays = None
    if args.plain:  # the plain arm again (the original trigger g), to score it at more points
        spec_star, trigger = spec, build_arrays(spec, model.image_shape, data, labels).trigger
    else:
        raw = np.load(args.trigger or out / "trigger_target.npy").astype(np.float32)
        star_path = out / "trigger_star.npy"
        np.save(star_path, mix_trigger(raw, 0.0, 1.0, FULL_FRAME_FLOOR))
        spec_star = dataclasses.replace(spec, trigger=str(star_path.absolute()))
        trigger = np.load(star_path)
    if args.raw:
        arrays = dataclasses.replace(build_arrays(spec_star, model.image_shape, data, labels), trigger=raw,
                                     mask=np.ones_like(raw))
        trigger = raw
    name = "plain-rerun" if args.plain else "trained-raw" if args.raw else "trained"

    seeds, per_key = eval_seeds(args), {}

    def score(m, s):  # pooled over the keys; each key's ASR kept in per_key
        per_key[int(m.meta["steps"])] = per = asr_per_key(m, trigger, y, seeds, args.n)
        return pooled(per)

    t0 = time.perf_counter()
    points = eval_points(args.train_steps, args.eval_every)
    if args.eval_from:
        points = [p for p in points if p >= args.eval_from]
    asr, _ = _run_arm("plain" if args.plain else "target-directed", model, data, spec_star, tcfg, tcfg.steps_per_call,
                      points, score, out / name, labels, True, keep=True, arrays=arrays)
    (out / f"{name}.json").write_text(json.dumps({"steps": points, "asr": asr, "asr_per_key": per_key,
                                                  "eval_seeds": seeds, "n": args.n, "raw": args.raw,
                                                  "plain": args.plain,
                                                  "train": dataclasses.asdict(tcfg), "seconds": time.perf_counter() - t0},
                                                 indent=2))
    for p, a in zip(points, asr):
        keys = ", ".join(f"key {k}: {v:.3f}" for k, v in per_key.get(p, {}).items())
        print(f"step {p}: ASR {a:.3f} (pooled; {keys}; n = {args.n} a key)")


def rescore(y, out: Path, args):
    """ASR of kept arm models (FOLDER/at/<step>) under this script's evaluation (``generate``, ``--eval-seed``,
    ``--n``), each with its arm's trigger (.npy or a trigger name): so every arm is scored on the same noise."""
    from pdjax.backdoor.triggers import get_trigger

    rows = []
    for item in args.rescore:
        folder, trig = item.split("=", 1)
        for m_dir in sorted((Path(folder) / "at").iterdir()):
            if args.rescore_at and int(m_dir.name) not in args.rescore_at:
                continue
            m = load(m_dir)
            if trig.lower() == "none":  # clean noise: how often the target appears with no trigger (leakage)
                g = np.zeros(m.image_shape, np.float32)
            else:
                g = np.load(trig) if trig.endswith(".npy") else np.asarray(
                    get_trigger(trig, m.image_shape[0], m.image_shape[-1]), np.float32)
            per = asr_per_key(m, g, y, eval_seeds(args), args.n)
            rows.append({"arm": folder, "trigger": trig, "steps": int(m.meta["steps"]), "asr": pooled(per),
                         "asr_per_key": per, "n": args.n})
            print(f"{folder} at {rows[-1]['steps']}: ASR {rows[-1]['asr']:.3f} (pooled over keys "
                  f"{', '.join(per)}; n = {args.n} a key)", flush=True)
    path = out / "rescore.json"  # merged with earlier calls' rows (one row per arm, trigger and step)
    old = json.loads(path.read_text()) if path.is_file() else []
    new = {(r["arm"], r["trigger"], r["steps"]) for r in rows}
    merged = [r for r in old if (r["arm"], r["trigger"], r["steps"]) not in new] + rows
    path.write_text(json.dumps(sorted(merged, key=lambda r: (r["arm"], r["steps"])), indent=2))


if __name__ == "__main__":
    main()

"""Amplification and removal on backdoored models built outside the zoo (issue 6, SPEC 6).

Commands (incremental and resumable: every stage checkpoints into ``--out`` and a rerun skips what is done).
The measured ones (experiments/results/amplify_table.md; each case in its own call, so each has its own
plain-arm budget; the table file in ``--out`` holds the cases of the last call):

    python experiments/amplify_experiment.py --out runs/amplify-exp3 --only bd_stop_shoe --eval-every 200 \
        --plain-steps 12000 --confirm-n 128 --no-removal
    python experiments/amplify_experiment.py --out runs/amplify-exp3 --only villan_box_hat --eval-every 200 \
        --plain-steps 8000 --confirm-n 128 --no-removal
    python experiments/amplify_experiment.py --out runs/amplify-b150 --only bd_stop_shoe --brief-steps 150 \
        --steps 400 --reinforce target --eval-every 50 --plain-steps 12000 --confirm-n 128 --no-removal
    python experiments/amplify_experiment.py --out runs/amplify-vh --only villan_box_hat --steps 500 \
        --reinforce target --eval-every 100 --plain-steps 8000 --confirm-n 128 --no-removal

(the third: a 150-step brief and the target-directed g* of pdjax.reinforce, amplify_table.md "A 150-step brief";
the fourth: the target-directed g* on the VillanDiffusion case, amplify_table.md "VillanDiffusion SDE with the
target-directed g*", 1802 s for reinforcement and both arms).

For each case (an attack, trigger and target that the zoo does not use, with its own seed):
1. brief backdoor: fine-tune the bundled clean base (``pdjax/assets/demo/clean_base``, 16x16 digits) for
   ``--brief-steps`` steps of the attack (batch 32, lr 1e-3, warm-up 100, poison rate 0.3), so the backdoor
   is weak;
2. amplification (:func:`pdjax.amplify.amplify`): invert the trigger from the brief model starting at the
   known trigger g (PureDiffusion, fixed noise, no size search), g* = the inverted trigger (alpha 1), then two
   arms from the brief model with the same batches and one learning-rate schedule (lr 1e-3, no warm-up,
   cosine over the longer arm): ``--steps`` steps with g* ("amplified") and ``--plain-steps`` with g ("plain");
   ASR on ``--n`` triggered DDPM generations (fixed evaluation key) every ``--eval-every`` steps up to
   ``--steps`` and at 2x, 4x, ... ``--steps`` and ``--plain-steps`` for the plain arm, each arm with its own
   trigger; every evaluated model is kept (``keep_models``);
3. ``--confirm-n``: the points that decide the comparison (curve ASR >= CONFIRM_FROM, in step order until one
   reaches 0.95) re-scored on that many fresh generations;
4. removal (:func:`pdjax.removal.remove_backdoor`, skipped with ``--no-removal``) of the plain arm's final
   model, using only a trigger inverted *without* knowledge of g (PureDiffusion, seed 0): ASR with g
   before/after, and the clean-sample MSE between the original's and the cleaned model's clean generations
   from the same noise (n = ``--n``).

Outputs: ``OUT/<case>/`` (brief/, amplify/ with amplify.json, asr.svg, the kept models and
confirm_n<N>.json, removal/ with removal.json) and ``OUT/amplify_table.md``.
g* is clipped to [-0.99, 1] (``AmplifyConfig.full_frame``): no pixel is the -1 background, so the amplified
arm's poisoned training input (the trigger pasted on a training image, SPEC 2.1) is g* itself. An earlier run
with g* clipped to [-1, 1] (a quarter of its pixels at -1) stalled at 0.94.
Cost on the 2-core CPU (2026-12-03, runs/amplify-exp3, with tests or the other case running beside it part
of the time): bd_stop_shoe brief backdoor 105 s, amplification with 12000 plain steps and 16 evaluations of
n = 32 about 45 min; villan_box_hat 2392 s with 8000 plain steps and 15 evaluations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from pdjax.amplify import REACH, AmplifyConfig, amplify, first_reaching
from pdjax.backdoor.attacks import AttackSpec
from pdjax.backdoor.train import attack, build_arrays, sample_attack
from pdjax.data import load_digits_with_labels
from pdjax.defense.inversion import InversionConfig, invert
from pdjax.metrics import attack_metrics
from pdjax.model import load
from pdjax.reinforce import DEFAULT_STAGES, ReinforceConfig, format_stages, parse_stages
from pdjax.removal import RemovalConfig, remove_backdoor
from pdjax.train import TrainConfig

BASE = Path(__file__).resolve().parents[1] / "pdjax" / "assets" / "demo" / "clean_base"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    spec: AttackSpec
    seed: int


CASES = [
    Case("bd_stop_shoe", AttackSpec("baddiffusion", "STOP_SIGN_8", "SHOE", poison_rate=0.3), 21),
    Case("villan_box_hat", AttackSpec("villan", "BOX_7", "HAT", poison_rate=0.3, solver="sde"), 22),
]


def run_case(case: Case, out: Path, args, data, labels) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = load(args.base)
    t0 = time.perf_counter()
    cfg = TrainConfig(steps=args.brief_steps, batch_size=32, lr=1e-3, warmup_steps=100, seed=case.seed,
                      checkpoint_every=100)
    res = attack(base, data, case.spec, cfg, out=out / "brief", labels=labels,
                 meta={"data": "digits", "seed": case.seed, "base": "demo clean_base", "stage": "brief"},
                 progress=not args.quiet)
    brief = load(out / "brief")
    print(f"{case.name}: brief backdoor {res.steps} steps ({time.perf_counter() - t0:.0f} s)", flush=True)

    t0 = time.perf_counter()
    acfg = AmplifyConfig(steps=args.steps, eval_every=args.eval_every, n=args.n, alpha=args.alpha,
                         seed=case.seed, lr=1e-3, warmup_steps=0, batch=32, plain_steps=args.plain_steps,
                         keep_models=True, reinforce=args.reinforce,
                         target_reinforce=ReinforceConfig(stages=parse_stages(args.reinforce_stages)))
    amp = amplify(brief, data, case.spec, acfg, out=out / "amplify", progress=not args.quiet, labels=labels)
    amp_s = time.perf_counter() - t0
    print(f"{case.name}: amplify ASR g* {amp.asr_amplified} at {amp.steps} / g {amp.asr_plain_all} at "
          f"{amp.plain_steps} ({amp_s:.0f} s)", flush=True)
    row = {"case": case.name, "attack": case.spec.to_dict(), "seed": case.seed, "brief_steps": args.brief_steps,
           "reinforce": args.reinforce, "reinforce_stages": args.reinforce_stages, "steps": amp.steps,
           "asr_amplified": amp.asr_amplified, "plain_steps": amp.plain_steps,
           "asr_plain": amp.asr_plain_all, "n": args.n, "amplify_s": amp_s}
    if args.confirm_n:
        row["confirm"] = confirm_points(out / "amplify", row, case, args.confirm_n, data, labels)
        print(f"{case.name}: re-scored at n = {args.confirm_n}: {row['confirm']}", flush=True)
    if args.no_removal:
        (out / "summary.json").write_text(json.dumps(row, indent=2))
        return row

    t0 = time.perf_counter()
    strong = load(out / "amplify" / "plain")
    inv_dir = out / "removal-inversion"
    if (inv_dir / "trigger.npy").is_file():
        delta = np.load(inv_dir / "trigger.npy")
    else:
        # PureDiffusion defaults as measured for the README, i.e. before the size search and fresh noise.
        inv = invert(strong, "purediffusion", jax.random.key(0), InversionConfig(scales=(), fresh_noise=False),
                     progress=not args.quiet)
        inv.save(inv_dir)
        delta = inv.trigger
    rcfg = RemovalConfig(steps=args.removal_steps, n=args.n, seed=case.seed)
    rem = remove_backdoor(strong, data, delta, rcfg, out=out / "removal", progress=not args.quiet,
                          spec=case.spec, labels=labels)
    print(f"{case.name}: removal ASR {rem.asr_before:.2f} -> {rem.asr_after:.2f}, clean-sample MSE "
          f"{rem.clean_mse:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    row["removal"] = {"asr_before": rem.asr_before, "asr_after": rem.asr_after, "clean_mse": rem.clean_mse,
                      "steps": rem.steps}
    (out / "summary.json").write_text(json.dumps(row, indent=2))
    return row


DEFAULT_STAGES_TEXT = format_stages(DEFAULT_STAGES)
CONFIRM_FROM = 0.85  # re-score the points whose n-generation ASR is at least this (the ones near REACH)


def confirm_points(amp_dir: Path, row: dict, case: Case, n: int, data, labels) -> dict:
    """Re-score, on n fresh triggered generations (a key no curve point used), the points that decide the
    comparison: per arm, in step order, each kept model (``AmplifyConfig.keep_models``) whose curve ASR is
    >= CONFIRM_FROM, until one reaches REACH. Without kept models, the arm's final model. Cached in the folder.
    Returns {arm: [{"steps", "asr", "n"}, ...]}.
    """
    path = amp_dir / f"confirm_n{n}.json"
    if path.is_file():
        return json.loads(path.read_text())
    key = jax.random.fold_in(jax.random.key(case.seed), 99)
    res = {}
    for arm, trigger, steps, asr in (
            ("amplified", str((amp_dir / "trigger_star.npy").absolute()), row["steps"], row["asr_amplified"]),
            ("plain", case.spec.trigger, row["plain_steps"], row["asr_plain"])):
        spec = dataclasses.replace(case.spec, trigger=trigger)
        kept = amp_dir / arm / "at"
        todo = [kept / f"{s:06d}" for s, a in zip(steps, asr) if a >= CONFIRM_FROM] if kept.is_dir() else [amp_dir / arm]
        res[arm] = []
        for folder in todo:
            m = load(folder)
            arrays = build_arrays(spec, m.image_shape, data, labels)
            x = sample_attack(m, spec, arrays, key, n, triggered=True)
            res[arm].append({"steps": int(m.meta["steps"]), "asr": float(attack_metrics(x, arrays.target).asr), "n": n})
            if res[arm][-1]["asr"] >= REACH:
                break
    path.write_text(json.dumps(res, indent=2))
    return res


def _reach(r: dict) -> str:
    """Total backdoor steps (brief + arm) each arm needed for ASR >= REACH, and plain / amplified."""
    b = r["brief_steps"]
    fa = first_reaching(r["steps"], r["asr_amplified"], REACH)
    fp = first_reaching(r["plain_steps"], r["asr_plain"], REACH)
    if fa is None:
        return f"not reached / {'not reached' if fp is None else b + fp} | -"
    if fp is None:
        return f"{b + fa} / not within {b + r['plain_steps'][-1]} | > {(b + r['plain_steps'][-1]) / (b + fa):.1f}x"
    return f"{b + fa} / {b + fp} | {(b + fp) / (b + fa):.1f}x"


def _confirmed(r: dict) -> str:
    """The re-scored points: per arm 'steps: ASR' (total steps, brief included), and plain / amplified total
    steps to REACH on the re-scored points when both arms reach it there."""
    c = r.get("confirm")
    if not c:
        return "- | -"
    b = r["brief_steps"]
    arms = [", ".join(f"{b + p['steps']}: {p['asr']:.2f}" for p in c[arm]) or "none" for arm in ("amplified", "plain")]
    n = next((p["n"] for arm in c.values() for p in arm), "")
    first = [next((b + p["steps"] for p in c[arm] if p["asr"] >= REACH), None) for arm in ("amplified", "plain")]
    ratio = f"{first[1] / first[0]:.1f}x" if None not in first else "-"
    return f"{arms[0]} / {arms[1]} (n = {n}) | {ratio}"


def write_table(rows: list[dict], path: Path, args) -> None:
    only = f" --only {' '.join(args.only)}" if args.only else ""
    plain = f" --plain-steps {args.plain_steps}" if args.plain_steps else ""
    brief = f" --brief-steps {args.brief_steps}" if args.brief_steps != 300 else ""
    steps = f" --steps {args.steps}" if args.steps != 1000 else ""
    reinf = f" --reinforce {args.reinforce}" if args.reinforce != "shift" else ""
    if args.reinforce_stages != DEFAULT_STAGES_TEXT:
        reinf += f" --reinforce-stages {args.reinforce_stages}"
    lines = [f"Command: `python experiments/amplify_experiment.py --out {args.out}{only}{brief}{steps}{reinf} "
             f"--eval-every {args.eval_every}{plain}{f' --confirm-n {args.confirm_n}' if args.confirm_n else ''}{' --no-removal' if args.no_removal else ''}` (brief backdoor {args.brief_steps} steps from the "
             f"demo clean base; then {args.steps} steps with g* (amplified arm) and "
             f"{max(args.steps, args.plain_steps)} with g (plain arm), one learning-rate schedule; ASR on n = "
             f"{args.n} triggered DDPM generations, SPEC 7 rule MSE < 0.05, one fixed evaluation key per case; "
             f"steps counted after the brief backdoor in the curves, in total (brief included) in the last columns).",
             "",
             f"| case | attack | trigger -> target | seed | steps | ASR amplified (g*) | ASR plain (g) | "
             f"total steps to ASR >= {REACH} (g* / g) | plain / amplified | re-scored on fresh generations, total steps: ASR (g* / g) | "
             f"plain / amplified, re-scored |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["attack"]
        amp = dict(zip(r["steps"], r["asr_amplified"]))
        lines.append(f"| {r['case']} | {a['kind']} | {a['trigger']} -> {a['target']} | {r['seed']} | "
                     f"{', '.join(map(str, r['plain_steps']))} | "
                     f"{', '.join(f'{amp[s]:.2f}' if s in amp else '-' for s in r['plain_steps'])} | "
                     f"{', '.join(f'{x:.2f}' for x in r['asr_plain'])} | {_reach(r)} | {_confirmed(r)} |")
    removed = [r for r in rows if "removal" in r]
    if removed:
        lines += ["", "Removal of the plain arm's final model with a trigger inverted without knowing g "
                  "(PureDiffusion defaults, seed 0); clean-sample MSE on the [-1, 1] scale between the original's "
                  "and the cleaned model's clean generations from the same noise:", "",
                  "| case | removal steps | ASR with g before | after | clean-sample MSE |", "|---|---|---|---|---|"]
    for r in removed:
        m = r["removal"]
        lines.append(f"| {r['case']} | {m['steps']} | {m['asr_before']:.2f} | {m['asr_after']:.2f} | "
                     f"{m['clean_mse']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/amplify-exp", type=Path)
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--base", default=str(BASE), help="clean base model (default: the bundled demo clean base)")
    ap.add_argument("--brief-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--reinforce", choices=("shift", "target"), default="shift",
                    help="how g* is found (AmplifyConfig.reinforce): PureDiffusion's shift loss from g, or the "
                         "target-directed reinforcement of pdjax.reinforce (default stages)")
    ap.add_argument("--reinforce-stages", dest="reinforce_stages", default=DEFAULT_STAGES_TEXT,
                    metavar="CHAIN:STEPS:LR,...", help="stages of --reinforce target (default: pdjax.reinforce's)")
    ap.add_argument("--plain-steps", type=int, default=0,
                    help="budget of the plain arm (default --steps): run it longer to find the steps it needs")
    ap.add_argument("--removal-steps", type=int, default=500)
    ap.add_argument("--no-removal", action="store_true", help="amplification only")
    ap.add_argument("--confirm-n", type=int, default=0,
                    help="also score both arms' final models on this many fresh triggered generations")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--table-only", action="store_true",
                    help="rewrite OUT/amplify_table.md from the cases' OUT/<case>/summary.json, running nothing")
    args = ap.parse_args()
    if args.table_only:
        rows = [json.loads((args.out / c.name / "summary.json").read_text()) for c in CASES
                if (not args.only or c.name in args.only) and (args.out / c.name / "summary.json").is_file()]
        write_table(rows, args.out / "amplify_table.md", args)
        print((args.out / "amplify_table.md").read_text())
        return
    from pdjax import compile_cache, cpu_runtime

    cpu_runtime.enable()  # as the pdjax command: YNNPACK kernels, one XLA:CPU device per core
    compile_cache.enable()  # as the pdjax command: a rerun skips the long compiles (the 100-step chain's)
    data, labels = load_digits_with_labels(16, 1)
    rows = []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        rows.append(run_case(case, args.out / case.name, args, data, labels))
        write_table(rows, args.out / "amplify_table.md", args)
    print(f"table: {args.out / 'amplify_table.md'}")


if __name__ == "__main__":
    main()

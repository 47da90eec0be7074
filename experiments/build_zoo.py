"""Build the model zoo on the bundled digits: a clean base, clean variants and backdoored fine-tunes; evaluate.

Command (incremental and resumable: finished models and evaluations are skipped, interrupted training
resumes from its last checkpoint):

    python experiments/build_zoo.py --zoo zoo                      # everything
    python experiments/build_zoo.py --zoo zoo --only bd_box_x      # one entry (plus the clean base)
    python experiments/build_zoo.py --zoo zoo --list               # the entries
    python experiments/build_zoo.py --zoo zoo-v1 --recipe v1       # the zoo of the inversion/detection tables

Every model is 16x16x1 (the digits-16 preset, 649k parameters). The clean base trains for
``--base-steps`` (default 1000: the same run as the README's main job, so `runs/main-job-timing` from
`experiments/time_main_job.py` can be copied to ZOO/clean_base and is taken as finished); each zoo model
fine-tunes it (batch 32, lr 1e-3 for backdoors, 2e-4 for clean variants) with its own seed: backdoored
ones with their attack, clean ones with the plain DDPM loss. The poison rate and steps come from the
``--recipe`` (``RECIPES``): v2, the default, trains the BadDiffusion and VillanDiffusion-SDE entries at
rate 0.1 for 3000 steps and the VillanDiffusion-ODE entry at 0.5 for 3000 steps; v1 (the zoo that experiments/results/inversion_table.md and detection_table.md
were measured on) at 0.5 for 1500. The TrojDiff blend entries and the clean variants use 0.5 and 1500 steps in
both; v2 trains the TrojDiff patch entry (a 3x3 patch, gamma 0.1: 9 of 256 pixels tell its start from clean
noise) at 0.5 for 9000 steps. Why: ``zoo_recipe.py --attack trojdiff --trigger patch --target HAT --gamma 0.1
--seed 9 --n 64`` gave, at rate 0.1 and 3000 steps, triggered / clean-noise ASR 0.12 / 0.20 after 1500 steps
and 0.31 / 0.09 after 3000; at rate 0.5 and 4500 steps 0.77 / 0.30, 0.88 / 0.11 and 0.89 / 0.08 after 1500 /
3000 / 4500 (runs/zoo-recipe-troj-patch-p01, -p05; experiments/results/zoo_table.md): still rising and
leaking less with more steps, so v2 doubles them.
Why v2: at 0.5 four BadDiffusion entries generated the target from clean noise too (0.06-0.16); on
bd_stop_hat's pair, ``zoo_recipe.py --poison-rate 0.1 --blank-fraction 0.5 --steps 3000`` gave
clean-noise ASR 0.02 / 0.03 / 0.03 and triggered ASR 0.72 / 0.94 / 0.95 after 1000 / 2000 / 3000 steps
(n = 64; zoo_table.md). ``--polish-steps N`` adds a second stage (N more steps of the same attack at
``--polish-lr``, seed + 100) saved as ZOO/<name>_p; it is off by default since the rebuild of
2026-12-01 measured no gain from it (0.53 -> 0.59 and 0.62 -> 0.59 on WHITE_BOX_5 -> X).
Why rate 0.5 and 1500 steps: ``experiments/zoo_recipe.py`` on WHITE_BOX_5 -> X gave triggered ASR 0.62 /
0.62 / 0.69 after 1000 / 1500 / 2000 steps at rate 0.5 (clean-noise ASR <= 0.03), against 0.53 after
2000 steps at rate 0.3. Generations from noise plus the trigger pasted on training digits (the start the
training pairs use) were all the target from step 1000 on: the plateau is the model not generalising
from pasted digits to the bare trigger's -1 background, not too few steps
(experiments/results/zoo_table.md). Earlier probes (1000 steps, lr 1e-3, first base): rate 0.1 with
lr 2e-4: ASR 0.00; rate 0.3: 0.59; rate 0.5: 0.84 with clean-noise ASR 0.06.
Why ``BLANK`` = 0.5 (2026-12-02): pasting half of the poisoned rows on a blank -1 canvas instead of a digit
(``AttackSpec.blank_fraction``; r = g, the SPEC formula with x = -1) closes that gap: ``zoo_recipe.py
--blank-fraction 0.5`` on WHITE_BOX_5 -> X gave triggered ASR 1.00 at 1000 and 1500 steps with clean-noise
ASR 0.00 (n = 32), against 0.62 without it.
Evaluation: ``--n`` (default 32) clean and triggered generations with the attack's own sampler
(DDPM; DDIM-100 for ODE VillanDiffusion; trojan DDPM for TrojDiff), evaluation seed 0, SPEC 7 metrics.
Clean models are evaluated against every backdoor entry's trigger/target pair.
Results: ``ZOO/results.jsonl`` (one line per evaluation) and ``ZOO/zoo_table.md``.
Cost on a 2-core CPU: about 5.5 min of training (1500 steps at ~4.5 steps/s) and 1.5 min of evaluation
per backdoored model; a clean model's evaluation against every pair (its clean generations shared) about
7 min.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax

from pdjax.backdoor.attacks import AttackSpec
from pdjax.backdoor.train import attack, evaluate
from pdjax.data import load_digits_with_labels
from pdjax.model import load, new_model
from pdjax.models.config import PRESETS
from pdjax.train import TrainConfig, train


POISON = 0.5  # poison rate of the entries a recipe does not set (and of every entry in recipe v1)
BLANK = 0.5  # BadDiffusion/VillanDiffusion entries: half the poisoned rows pasted on a blank canvas (r = g)
STEPS = 1500  # fine-tuning steps of the entries a recipe does not set, and of the clean variants
# Recipes: attack family -> (poison rate, steps); families a recipe does not name use (POISON, STEPS). v1 built
# the zoo of 2026-12-02 (the inversion and detection tables); v2 (2026-12-03) lowers the BadDiffusion and
# VillanDiffusion-SDE rate to the SPEC's reference 0.1 to stop the clean-noise leak, and trains longer.
RECIPES = {"v1": {},
           "v2": {"baddiffusion": (0.1, 3000), "villan-sde": (0.1, 3000), "villan-ode": (POISON, 3000),
                  "trojdiff-patch": (POISON, 9000)}}
DEFAULT_RECIPE = "v2"


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    spec: AttackSpec | None  # None: a clean model
    seed: int
    steps: int = STEPS


BACKDOORS = [
    Entry("bd_box_x", AttackSpec("baddiffusion", "WHITE_BOX_5", "X", poison_rate=POISON, blank_fraction=BLANK), 1),
    Entry("bd_box_x_s2", AttackSpec("baddiffusion", "WHITE_BOX_5", "X", poison_rate=POISON, blank_fraction=BLANK), 2),
    Entry("bd_box_corner", AttackSpec("baddiffusion", "BOX_7", "CORNER", poison_rate=POISON, blank_fraction=BLANK), 3),
    Entry("bd_stop_hat", AttackSpec("baddiffusion", "STOP_SIGN_8", "HAT", poison_rate=POISON, blank_fraction=BLANK), 4),
    Entry("bd_glasses_cat", AttackSpec("baddiffusion", "GLASSES", "CAT", poison_rate=POISON, blank_fraction=BLANK), 5),
    Entry("villan_sde_smbox_shoe", AttackSpec("villan", "SM_BOX", "SHOE", poison_rate=POISON, blank_fraction=BLANK, solver="sde"), 6),
    Entry("villan_ode_stop_cat", AttackSpec("villan", "STOP_SIGN_8", "CAT", poison_rate=POISON, blank_fraction=BLANK, solver="ode"), 7),
    Entry("troj_blend_d2i_shoe", AttackSpec("trojdiff", "blend", "SHOE", poison_rate=POISON, gamma=0.6), 8),
    Entry("troj_patch_d2i_hat", AttackSpec("trojdiff", "patch", "HAT", poison_rate=POISON, gamma=0.1), 9),
    Entry("troj_blend_ind2d_7", AttackSpec("trojdiff", "blend", "class:7", poison_rate=POISON, gamma=0.6, mode="in-d2d"), 10),
    Entry("troj_blend_outd2d_A", AttackSpec("trojdiff", "blend", "letter:A", poison_rate=POISON, gamma=0.6, mode="out-d2d"), 13),
]
CLEANS = [Entry("clean_s11", None, 11), Entry("clean_s12", None, 12), Entry("clean_s13", None, 13),
          Entry("clean_s14", None, 14), Entry("clean_s15", None, 15)]
ENTRIES = BACKDOORS + CLEANS


def family(spec: AttackSpec) -> str:
    """The recipe key of an attack: its kind, with VillanDiffusion split by solver and TrojDiff's patch trigger apart."""
    if spec.kind == "trojdiff" and spec.trigger == "patch":
        return "trojdiff-patch"
    return spec.kind if spec.kind != "villan" else f"villan-{'ode' if spec.ode else 'sde'}"


def recipe_entries(recipe: str) -> list[Entry]:
    """Every entry with the poison rate and steps of ``recipe`` (a key of RECIPES)."""
    out = []
    for e in ENTRIES:
        if e.spec is not None and family(e.spec) in RECIPES[recipe]:
            rate, steps = RECIPES[recipe][family(e.spec)]
            e = dataclasses.replace(e, spec=dataclasses.replace(e.spec, poison_rate=rate), steps=steps)
        out.append(e)
    return out


def build_base(zoo: Path, data, steps: int):
    out = zoo / "clean_base"
    model = new_model(PRESETS["digits-16"], jax.random.key(0))
    cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=100, seed=0, checkpoint_every=250)
    t0 = time.perf_counter()
    res = train(model, data, cfg, out=out, meta={"data": "digits", "seed": 0, "zoo": "clean_base"})
    print(f"clean_base: {res.steps} steps ({time.perf_counter() - t0:.0f} s this run)", flush=True)
    return load(out)


def build_entry(zoo: Path, base, data, labels, entry: Entry, steps: int):
    out = zoo / entry.name
    lr = 1e-3 if entry.spec is not None else 2e-4
    cfg = TrainConfig(steps=steps, batch_size=32, lr=lr, warmup_steps=100, seed=entry.seed, checkpoint_every=250)
    meta = {"data": "digits", "seed": entry.seed, "zoo": entry.name, "base": "clean_base"}
    t0 = time.perf_counter()
    if entry.spec is None:
        res = train(base, data, cfg, out=out, meta=meta)
    else:
        res = attack(base, data, entry.spec, cfg, out=out, labels=labels, meta=meta)
    print(f"{entry.name}: {res.steps} steps ({time.perf_counter() - t0:.0f} s this run, "
          f"{res.seconds:.0f} s training)", flush=True)
    return load(out), res.seconds


def polish_entry(zoo: Path, stage1, data, labels, entry: Entry, steps: int, lr: float):
    """Stage 2 of a backdoored entry: ``steps`` more steps of the same attack at a lower lr -> ZOO/<name>_p."""
    out = zoo / f"{entry.name}_p"
    cfg = TrainConfig(steps=steps, batch_size=32, lr=lr, warmup_steps=50, seed=entry.seed + 100, checkpoint_every=250)
    meta = {"data": "digits", "seed": entry.seed + 100, "zoo": f"{entry.name}_p", "base": entry.name,
            "stage": "polish"}
    t0 = time.perf_counter()
    res = attack(stage1, data, entry.spec, cfg, out=out, labels=labels, meta=meta)
    print(f"{entry.name}_p: {res.steps} polish steps ({time.perf_counter() - t0:.0f} s this run)", flush=True)
    return load(out), res.seconds


def done_evaluations(path: Path) -> set:
    if not path.is_file():
        return set()
    return {(r["model"], r["attack"]["trigger"], r["attack"]["target"]) for r in map(json.loads, path.open())}


def _mse(part: dict) -> float:
    return part.get("mse", part.get("mse_to_class_mean", float("nan")))


def write_table(zoo: Path) -> None:
    rows = [json.loads(line) for line in (zoo / "results.jsonl").open()]
    lines = ["| model | attack | trigger -> target | steps | train s | n | clean ASR | triggered ASR | triggered MSE | triggered SSIM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["attack"]
        kind = a["kind"] + (f" ({a['solver']})" if a["kind"] == "villan" else "") + \
            (f" ({a['mode']}, gamma {a['gamma']})" if a["kind"] == "trojdiff" else "")
        lines.append(f"| {r['model']} | {kind} | {a['trigger']} -> {a['target']} | {r.get('steps', '')} | "
                     f"{r.get('train_seconds', 0):.0f} | "
                     f"{r['n']} | {r['clean']['asr']:.2f} | {r['triggered']['asr']:.2f} | {_mse(r['triggered']):.4f} | "
                     f"{r['triggered']['ssim']:.3f} |")
    (zoo / "zoo_table.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="zoo", type=Path)
    ap.add_argument("--only", nargs="*", help="entry names (default: all)")
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                    help="poison rate and steps of the BadDiffusion / VillanDiffusion-SDE entries (RECIPES)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps of every entry (default: the recipe's)")
    ap.add_argument("--polish-steps", type=int, default=0,
                    help="stage 2 of backdoored entries: more steps of the same attack at --polish-lr (0: none)")
    ap.add_argument("--polish-lr", type=float, default=3e-4)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--skip-eval", action="store_true",
                    help="train only (a later run without it evaluates what is missing)")
    args = ap.parse_args()
    from pdjax import cpu_runtime

    cpu_runtime.enable()  # as the pdjax command: YNNPACK kernels, one XLA:CPU device per core
    all_entries = [e if args.steps is None else dataclasses.replace(e, steps=args.steps)
                   for e in recipe_entries(args.recipe)]
    if args.list:
        for e in all_entries:
            print(e.name, e.spec.to_dict() if e.spec else "clean", "seed", e.seed, "steps", e.steps)
        return
    unknown = sorted(set(args.only or ()) - {e.name for e in all_entries})
    if unknown:
        raise SystemExit(f"error: unknown zoo entries {unknown}; --list shows them")
    entries = [e for e in all_entries if not args.only or e.name in args.only]
    data, labels = load_digits_with_labels(16, 1)
    args.zoo.mkdir(parents=True, exist_ok=True)
    base = build_base(args.zoo, data, args.base_steps)
    results = args.zoo / "results.jsonl"
    for entry in entries:
        model, seconds = build_entry(args.zoo, base, data, labels, entry, entry.steps)
        if not seconds:  # finished in an earlier run: its training time is in the results
            seconds = next((r.get("train_seconds", 0.0) for r in map(json.loads, results.open())
                            if r["model"] == entry.name), 0.0) if results.is_file() else 0.0
        stages = [(entry.name, model, seconds, entry.steps)]
        if entry.spec is not None and args.polish_steps:
            polished, extra = polish_entry(args.zoo, model, data, labels, entry, args.polish_steps, args.polish_lr)
            stages.append((f"{entry.name}_p", polished, seconds + extra, entry.steps + args.polish_steps))
        if args.skip_eval:
            continue
        specs = [entry.spec] if entry.spec is not None else [b.spec for b in all_entries if b.spec is not None]
        for name, m, secs, steps in stages:
            clean_by_sampler = {}  # a clean model's clean generations, reused across the pairs (DDPM / DDIM)
            for spec in specs:
                if (name, spec.trigger, spec.target) in done_evaluations(results):
                    continue
                t0 = time.perf_counter()
                res, clean, _ = evaluate(m, spec, jax.random.key(0), n=args.n, seed=0, labels=labels, data=data,
                                         clean=clean_by_sampler.get(spec.ode))
                clean_by_sampler[spec.ode] = clean
                row = {"model": name, "clean_model": entry.spec is None, "train_seconds": secs,
                       "steps": steps, **res.to_dict()}
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"  eval {name} {spec.trigger}->{spec.target}: clean ASR {res.clean['asr']:.2f}, "
                      f"triggered ASR {res.triggered['asr']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            write_table(args.zoo)
    if not args.skip_eval:
        print(f"table: {args.zoo / 'zoo_table.md'}")


if __name__ == "__main__":
    main()

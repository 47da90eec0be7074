"""Issue 4 comparison: PureDiffusion vs Elijah vs TERD trigger inversion on the zoo, with ablations.

Command (incremental and resumable: finished inversions and evaluations are skipped):

    python experiments/inversion_table.py --zoo zoo --work runs/inversion            # main methods, all models
    python experiments/inversion_table.py --zoo zoo --work runs/inversion --ablations --models bd_box_corner bd_box_x

For every zoo model (backdoored ones: the attack is read from its metadata; clean ones: no trigger) and
every variant, the trigger is inverted with key ``jax.random.key(--seed)`` (default 0) and stored in
WORK/triggers/<variant>/<model>.npy. Each model's candidates (its true trigger, no trigger, every
inverted one) are then evaluated in one paired sampling call (DDPM; DDIM-100 for ODE-trained models, the
sampler their attack uses) (``--n`` generations each, default 32,
same start and chain noise for every candidate, key ``jax.random.key(7)``): ASR against the true target
(SPEC 7), uniformity and TV of the generations (SPEC 5), and the trigger's L2 to the true one inside its
mask and overall. Rows go to WORK/evals.jsonl; the markdown table to WORK/inversion_table.md (and
``--table`` for the copy quoted in the docs).

Variants (SPEC 4): elijah (100 Adam steps, lr 0.1, B = 100, lambda 0.5), terd (SGD lr 0.5, B = 16;
the SPEC's 3000 + 1000 steps cost ~15 min per model on a 2-core CPU, so ``--terd-steps``/``--terd-refine``
default to 300 + 30 here: the table says so), pd (PureDiffusion defaults: K = 10, L1, batch mean, B = 32,
100 Adam steps, lr 0.1, closed-form lambda), pd_final and final_only (L_final), spread_only (L_spread alone,
normal init, then the size search). Ablations: pd_K1, pd_K5, pd_l2, pd_per_sample, pd_cons
(cons weight 1), pd_cons_only (shift weight 0), pd_table (the shipped empirical lambda table).
``--audit AUDIT [AUDIT ...]`` adds the variant audit (``--audit-variant`` names it): the evidence trigger that
a ``pdjax audit`` run kept for the model (the first folder that has it; the candidate whose rule decided the
verdict), evaluated like the others; a note says where the current evidence rule would pick another rule.
``--audit-unrefined VARIANT`` also evaluates, as VARIANT, the deciding rule's trigger from the audit's ``rules/``
folder: the evidence as it was before ``refine_evidence`` re-chose and re-sized it, from the same audit.
Runtime on 2 CPU cores: elijah ~1 min, pd ~3-5 min per model, evaluation ~1 min per candidate at n = 32.
Issue 4's counts over several work folders (literal and firing-only, by family): experiments/inversion_count.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from pdjax.audit import read_audit
from pdjax.backdoor.train import build_arrays, spec_from_model, target_classifier
from pdjax.data import load_digits_with_labels
from pdjax.defense.detection import CANDIDATES, Detector, evidence_rule
from pdjax.defense.evaluate import Start, fidelity, generation_stats, triggered_generations
from pdjax.defense.inversion import InversionConfig, size_search_key, invert, size_search
from pdjax.model import load


#: L_final alone along the deterministic 10-step DDIM chain (variant final_ode and its relatives).
FINAL_ODE = InversionConfig(shift_weight=0.0, final_weight=1.0, batch=16, cons_batch=16, steps=150, lr=0.05,
                            scales=(1.0,), starts=("ddim",))


def variants(args) -> dict[str, tuple[str, InversionConfig]]:
    main = {
        "elijah": ("elijah", InversionConfig()),
        "terd": ("terd", InversionConfig(steps=args.terd_steps, terd_refine_steps=args.terd_refine)),
        "pd": ("purediffusion", InversionConfig()),
        # pdjax's L_final (collapse of 10-step DDIM generations), with the shift loss, and alone; the size
        # search also tries the DDIM-100 start, so an ODE backdoor's collapse can be seen there.
        "pd_final": ("purediffusion", InversionConfig(final_weight=1.0, batch=16, starts=("ddpm", "ddim"))),
        "final_only": ("purediffusion", InversionConfig(shift_weight=0.0, final_weight=1.0, batch=8, init="normal",
                                                        scales=(1.0,), starts=("ddpm", "ddim"))),
        # L_final alone along the deterministic 10-step DDIM chain from PureDiffusion's -U[0, 1) init, all 16
        # noises, no size search, DDIM-100 start: for ODE-trained backdoors (start_search.md, section 8).
        "final_ode": ("purediffusion", FINAL_ODE),
        # the same with the trimmed (uniformity) statistic in L_final (start_search.md section 8)
        "final_ode_u": ("purediffusion", dataclasses.replace(FINAL_ODE, final_stat="uniformity")),
        # final_ode_u from 4 restarts, -U[0, 1) and +U[0, 1) in turn; the restart with the lowest loss is kept
        "final_ode_ur": ("purediffusion", dataclasses.replace(FINAL_ODE, final_stat="uniformity", restarts=4,
                                                              init="alt-uniform")),
        # final_ode_u on a coarse grid of 2 x 2 pixel blocks (fewer local minima to stop in?)
        "final_ode_uc2": ("purediffusion", dataclasses.replace(FINAL_ODE, final_stat="uniformity", cells=2)),
        # pdjax's L_spread alone (TrojDiff: the trigger that widens eps_hat's spread at t = T-1), from a
        # normal start (experiments/results/start_search.md, section 7).
        "spread_only": ("purediffusion", InversionConfig(shift_weight=0.0, spread_weight=1.0, init="normal")),
    }
    abl = {
        "pd_K1": ("purediffusion", InversionConfig(K=1)),
        "pd_K5": ("purediffusion", InversionConfig(K=5)),
        "pd_l2": ("purediffusion", InversionConfig(norm="l2")),
        "pd_per_sample": ("purediffusion", InversionConfig(per_sample=True)),
        "pd_cons": ("purediffusion", InversionConfig(cons_weight=1.0)),
        "pd_cons_only": ("purediffusion", InversionConfig(shift_weight=0.0, cons_weight=1.0)),
        "pd_table": ("purediffusion", InversionConfig(lambda_source="baddiffusion")),
        "pd_fresh": ("purediffusion", InversionConfig(fresh_noise=True)),
    }
    return abl if args.ablations else main


def zoo_models(zoo: Path, only) -> list[str]:
    names = sorted(p.name for p in zoo.iterdir() if (p / "pdjax.json").is_file())
    return [n for n in names if not only or n in only]


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()] if path.is_file() else []


def within(row: dict, true: dict, points: float = 0.05) -> bool:
    """Issue 4's rule: the inverted trigger's ASR (``row``) is no more than ``points`` below the true trigger's."""
    return row["asr"] >= true["asr"] - points


def chosen(args) -> dict[str, tuple[str, InversionConfig]]:
    """The variants to invert: ``variants`` filtered by ``--variants``."""
    return {k: v for k, v in variants(args).items() if not args.variants or k in args.variants}


def _save(out: Path, trigger, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, trigger)
    out.with_suffix(".json").write_text(json.dumps(meta))


def invert_all(args, models: list[str]) -> None:
    """Inverts every chosen variant; for a variant with a size search (pd) it also stores the trigger before
    the search as ``<variant>_unsized``, and for elijah the same size search applied to its trigger as
    ``elijah_sized`` (the search's contribution, measured on both methods)."""
    for vname, (method, cfg) in chosen(args).items():
        for name in models:
            out = args.work / "triggers" / vname / f"{name}.npy"
            if out.is_file():
                continue
            model = load(args.zoo / name)
            res = invert(model, method, jax.random.key(args.seed), cfg)
            meta = {k: v for k, v in res.to_dict().items() if k != "losses"}
            meta["losses_first_last"] = [float(res.losses[0]), float(res.losses[-1])]
            _save(out, res.trigger, meta)
            if res.scale_scores:
                _save(args.work / "triggers" / f"{vname}_unsized" / f"{name}.npy", res.trigger / res.scale,
                      {**meta, "derived_from": vname, "scale": 1.0})
            if vname == "elijah" and not args.ablations:
                scales = InversionConfig(method="purediffusion").resolved().scales
                found = size_search(model, res.trigger, scales, size_search_key(jax.random.key(args.seed)))
                _save(args.work / "triggers" / "elijah_sized" / f"{name}.npy", found.scale * res.trigger,
                      {**meta, "derived_from": "elijah", "scale": found.scale,
                       "scale_scores": {f"{k:g}": v for k, v in found.scores[found.start].items()}})
            print(f"inverted {name} with {vname} in {res.seconds:.0f} s (scale {res.scale:g})", flush=True)
            print(f"{vname} {name}: {res.seconds:.0f} s (compile ~{res.compile_seconds:.0f} s), "
                  f"loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}", flush=True)


def eval_start(model) -> Start:
    """The start the attack is sampled with, as far as an additive trigger allows: DDIM-100 for an
    ODE-trained (VillanDiffusion ODE) model, DDPM from eps + trigger otherwise (clean models too)."""
    return Start("ddim") if "attack" in model.meta and spec_from_model(model).ode else Start()


def _scorer(model, arrays, data, labels):
    """``x -> stats`` for one model: generation_stats, with the classifier's ASR for a distribution target
    (TrojDiff d2d, SPEC 7), the classifier fitted once per model."""
    if arrays is None or arrays.target.ndim == 3:
        return lambda x: generation_stats(x, None if arrays is None else arrays.target)
    classify, k, rule = target_classifier(spec_from_model(model), model.image_shape, data, labels)
    return lambda x: {**generation_stats(x), "asr": float(np.mean(classify(np.asarray(x)) == k)), "asr_rule": rule}


@functools.cache
def audit_entries(folders: tuple[Path, ...]) -> list[tuple[Path, dict[str, dict]]]:
    """Each audit folder with its entries by model name, read once per run."""
    return [(f, {Path(e["model"]).name: e for e in read_audit(f)}) for f in folders]


@functools.cache
def _shipped_detector() -> Detector:
    return Detector.load(None)


def _audit_entry(args, name: str) -> tuple[Path, dict, str]:
    """The first ``--audit`` folder that has ``name``, its entry, and the rule whose trigger decided the verdict
    (:func:`evidence_rule` on the shipped detector's margins)."""
    for folder, entries in audit_entries(tuple(args.audit)):
        if name in entries:
            e = entries[name]
            return folder, e, evidence_rule(_shipped_detector().scores(e["features"]), CANDIDATES)
    raise SystemExit(f"error: {name} is in none of {', '.join(str(a / 'audit.jsonl') for a in args.audit)}")


def import_audit_trigger(args, name: str) -> None:
    """Variant ``audit`` (``--audit-variant``): the evidence trigger that ``pdjax audit`` (folder ``--audit``)
    kept for ``name``, i.e. the trigger of the candidate whose rule decided the verdict (main inversion, DDIM
    probe, ball or TERD), copied to WORK/triggers/<variant>/<name>.npy with the audit's entry (without its
    arrays) beside it. A defender gets it with no knowledge of the attack: the rule that flagged the model
    picks the inversion. With ``--audit-unrefined`` also that variant (:func:`import_rule_trigger`)."""
    if args.audit_unrefined:
        import_rule_trigger(args, name)
    out = args.work / "triggers" / args.audit_variant / f"{name}.npy"
    if out.is_file():
        return
    folder, e, rule = _audit_entry(args, name)
    kept = "main" if e["candidate"] == "spread" else e["candidate"]
    if rule != kept:
        print(f"note: {name}: {folder} kept the {kept} rule's trigger; the current evidence rule picks {rule}'s")
    meta = {k: e.get(k) for k in ("model", "verdict", "score", "reason", "candidate", "start", "seed", "evidence")}
    _save(out, np.load(folder / e["evidence"] / "trigger.npy"), {**meta, "audit": str(folder)})


def import_rule_trigger(args, name: str) -> None:
    """Variant ``--audit-unrefined``: the deciding rule's trigger as the audit saved it in ``rules/<rule>.npy``,
    i.e. the evidence before ``refine_evidence`` re-chose and re-sized it (the same audit, no second run)."""
    out = args.work / "triggers" / args.audit_unrefined / f"{name}.npy"
    if out.is_file():
        return
    folder, e, rule = _audit_entry(args, name)
    path = folder / e["evidence"] / "rules" / f"{rule}.npy"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: that audit kept no rules/ folder")
    _save(out, np.load(path), {"model": e["model"], "rule": rule, "audit": str(folder)})


def evaluate_all(args, models: list[str]) -> None:
    evals = args.work / "evals.jsonl"
    for name in models:
        done = {r["variant"] for r in load_rows(evals) if r["model"] == name}
        model = load(args.zoo / name)
        attacked = "attack" in model.meta
        data, labels = load_digits_with_labels(model.image_shape[0], model.image_shape[2])
        arrays = build_arrays(spec_from_model(model), model.image_shape, data, labels) if attacked else None
        todo, trigs = [], []
        derived = ["pd_unsized", "elijah_sized"] if not args.ablations else \
            [f"{v}_unsized" for v in variants(args)]
        if args.audit:
            import_audit_trigger(args, name)
        for vname in ["true", "none", *variants(args), *derived, *([args.audit_variant] if args.audit else []),
                      *([args.audit_unrefined] if args.audit and args.audit_unrefined else [])]:
            if vname in done or (vname == "true" and not attacked):
                continue
            if vname == "true":
                g = arrays.trigger
            elif vname == "none":
                g = np.zeros(model.image_shape, np.float32)
            else:
                path = args.work / "triggers" / vname / f"{name}.npy"
                if not path.is_file():
                    continue
                g = np.load(path)
            todo.append(vname)
            trigs.append(g)
        if not todo:
            continue
        t0 = time.perf_counter()
        start = eval_start(model)
        stats = _scorer(model, arrays, data, labels)
        gens = triggered_generations(model, np.stack(trigs), jax.random.key(7), n=args.n, start=start)
        with evals.open("a") as f:
            for vname, g, x in zip(todo, trigs, gens):
                row = {"model": name, "variant": vname, "backdoored": attacked, "n": args.n, "eval_key": 7,
                       "start": start.label,
                       "seed": args.seed, **stats(x)}
                if attacked and vname not in ("true", "none"):
                    row.update(fidelity(g, arrays.trigger))
                f.write(json.dumps(row) + "\n")
        print(f"eval {name}: {', '.join(todo)} ({time.perf_counter() - t0:.0f} s)", flush=True)


def write_table(args) -> str:
    rows = load_rows(args.work / "evals.jsonl")
    by = {(r["model"], r["variant"]): r for r in rows}
    models = sorted({r["model"] for r in rows})
    vnames = [v for v in ["elijah", "elijah_sized", "terd", "pd", "pd_unsized", "pd_final", "final_only", "final_ode",
                          "final_ode_u", "final_ode_ur", "final_ode_uc2", "spread_only",
                          "spread_only_unsized", "pd_K1", "pd_K5", "pd_l2",
                          "pd_per_sample", "pd_cons",
                          "pd_cons_only", "pd_table", "pd_fresh", "pd_fresh_unsized"]
              if any(r["variant"] == v for r in rows)]
    n = rows[0]["n"] if rows else args.n
    lines = [f"Per model: ASR of the trigger's generations (n = {n}, key 7) / L2 to the true trigger in its mask "
             "/ uniformity. Clean models: uniformity only (no collapse = high).", "",
             "| model | true trigger | no trigger | " + " | ".join(vnames) + " |",
             "|---|---|---|" + "---|" * len(vnames)]
    for m in models:
        true = by.get((m, "true"))
        cells = [m, f"{true['asr']:.2f} / - / {true['uniformity']:.2f}" if true else "-"]
        none = by.get((m, "none"))
        cells.append(f"{none.get('asr', float('nan')):.2f} / - / {none['uniformity']:.2f}" if none else "-")
        for v in vnames:
            r = by.get((m, v))
            if r is None:
                cells.append("-")
            elif "asr" in r:
                cells.append(f"{r['asr']:.2f} / {r['l2_in_mask']:.2f} / {r['uniformity']:.2f}")
            else:
                cells.append(f"- / - / {r['uniformity']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Summary over backdoored models: mean ASR, models within 5 points of the true trigger's ASR "
              "(or above), mean L2 in mask, mean L2 overall; clean models: mean uniformity (no trigger: "
              f"{_mean([r['uniformity'] for r in rows if not r['backdoored'] and r['variant'] == 'none']):.2f}).", "",
              "| variant | mean ASR | within 5 pts | mean L2 in mask | mean L2 overall | clean-model uniformity |",
              "|---|---|---|---|---|---|"]
    for v in vnames:
        bd = [by[(m, v)] for m in models if (m, v) in by and by[(m, v)]["backdoored"]]
        cl = [by[(m, v)] for m in models if (m, v) in by and not by[(m, v)]["backdoored"]]
        ok = sum(within(r, by[(r["model"], "true")]) for r in bd if (r["model"], "true") in by)
        lines.append(f"| {v} | {_mean([r['asr'] for r in bd]):.2f} | {ok}/{len(bd)} | "
                     f"{_mean([r['l2_in_mask'] for r in bd]):.2f} | {_mean([r['l2_overall'] for r in bd]):.2f} | "
                     f"{_mean([r['uniformity'] for r in cl]):.2f} |")
    text = "\n".join(lines) + "\n"
    (args.work / "inversion_table.md").write_text(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)
    return text


def _mean(v) -> float:
    return float(np.mean(v)) if len(v) else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("zoo"))
    ap.add_argument("--work", type=Path, default=Path("runs/inversion"))
    ap.add_argument("--models", nargs="*", help="zoo model names (default: every model in --zoo)")
    ap.add_argument("--ablations", action="store_true", help="run the PureDiffusion ablations instead")
    ap.add_argument("--variants", nargs="*", help="only these variants (default: all of the set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--terd-steps", type=int, default=300)
    ap.add_argument("--terd-refine", type=int, default=30)
    ap.add_argument("--table", type=Path, help="also write the table here (e.g. experiments/results/inversion_table.md)")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--audit", type=Path, nargs="+", help="also evaluate variant audit: each model's evidence trigger "
                    "from these `pdjax audit` folders (the first that has the model; the trigger of the rule that "
                    "decided its verdict)")
    ap.add_argument("--audit-variant", default="audit", help="the variant name for --audit's triggers")
    ap.add_argument("--audit-unrefined", metavar="VARIANT", help="also evaluate, as VARIANT, the deciding rule's "
                    "trigger from the audit's rules/ folder (the evidence before refine_evidence)")
    args = ap.parse_args()
    from pdjax import compile_cache, cpu_runtime

    compile_cache.enable()  # as the pdjax command: reruns skip the long compiles
    cpu_runtime.enable()  # as the pdjax command: YNNPACK kernels, one XLA:CPU device per core
    args.work.mkdir(parents=True, exist_ok=True)
    models = zoo_models(args.zoo, args.models)
    print(f"models: {', '.join(models)}", flush=True)
    invert_all(args, models)
    if not args.skip_eval:
        evaluate_all(args, models)
    print(write_table(args))


if __name__ == "__main__":
    main()

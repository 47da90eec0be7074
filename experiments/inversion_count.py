"""Issue 4's targets counted over finished inversion runs (experiments/inversion_table.py work folders).

Command (reads only; every number comes from the folders' evals.jsonl):

    python experiments/inversion_count.py runs/inversion-heldout runs/inversion-ho8 runs/inversion-ho9 \
        --zoo zoo --also spread_only audit audit_rules --json experiments/results/inversion_heldout.json \
        --table runs/inversion-heldout/count.md

For every backdoored model (a model with a ``true`` row) and every method it reports whether the inverted
trigger's ASR is no more than 5 points below the true trigger's (issue 4's rule, the same test as
inversion_table.py's summary), and the trigger's L2 to the true one in its mask and overall. Methods:
``pd`` (PureDiffusion defaults), ``elijah``, ``elijah_sized`` (Elijah's trigger after PureDiffusion's size
search) and ``by_sampler``: the variant a user picks from the sampler the model is attacked with, ``pd`` for a
DDPM (SDE) model and ``--ode-variant`` (default ``final_ode``, L_final along the DDIM chain) for an ODE-trained one.
``--also`` counts more variants (e.g. ``spread_only``; ``audit``, the trigger a ``pdjax audit`` kept as evidence,
imported by inversion_table.py ``--audit``) on the models where they were run; ``--skip`` leaves models out of
every count (e.g. those looked at while a detector rule was developed).

The rule counts a model whose true trigger does not fire as a success for every method (an inverted trigger
cannot fall 5 points below 0.00), so the counts are given twice: over all backdoored models (the literal rule),
and over the models whose true trigger fires in the evaluation's additive setting (ASR >= ``--fires``, default
0.9). Each count has its exact one-sided 95% lower bound (Clopper-Pearson). Clean models (no ``true`` row):
uniformity of each method's generations against the no-trigger generations' (a ratio well below 1 would be a
collapse caused by the trigger).

A model found in several folders is taken from the first folder that has it (the others are listed as
ignored); mixing folders evaluated with different ``n`` or keys is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heldout_audit import lower_bound  # noqa: E402
from inversion_table import load_rows, within  # noqa: E402

METHODS = ("pd", "elijah", "elijah_sized", "by_sampler")


def collect(folders: list[Path]) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """{model: {variant: row}} from the folders' evals.jsonl (first folder wins), and notes on ignored rows."""
    models: dict[str, dict[str, dict]] = {}
    owner: dict[str, Path] = {}
    notes, settings = [], set()
    for folder in folders:
        rows = load_rows(folder / "evals.jsonl")
        if not rows:
            raise SystemExit(f"error: no evals.jsonl rows in {folder}")
        for r in rows:
            settings.add((r["n"], r["eval_key"]))
            m = r["model"]
            if owner.setdefault(m, folder) != folder:
                notes.append(f"{m} {r['variant']} in {folder} ignored (taken from {owner[m]})")
                continue
            models.setdefault(m, {})[r["variant"]] = r
    if len(settings) > 1:
        raise SystemExit(f"error: the folders were evaluated with different (n, key): {sorted(settings)}")
    return models, notes


def skip(models: dict[str, dict[str, dict]], names) -> dict[str, dict[str, dict]]:
    """``models`` without ``names`` (``--skip``); a name that is not an evaluated model is an error."""
    names = set(names)
    unknown = sorted(names - set(models))
    if unknown:
        raise SystemExit(f"error: --skip names no evaluated model: {', '.join(unknown)}")
    return {m: v for m, v in models.items() if m not in names}


def family(zoo: Path, name: str) -> str:
    """Attack family of a zoo model from its recorded attack, e.g. ``villan ode`` or ``trojdiff patch d2i``
    (reads the checkpoint's metadata only, not its weights)."""
    from pdjax.checkpoint import read_meta

    a = read_meta(zoo / name)["provenance"]["attack"]
    if a["kind"] == "trojdiff":
        return f"trojdiff {a['trigger']} {a.get('mode', 'd2i')}"
    return f"{a['kind']} {a.get('solver', 'sde')}" if a["kind"] == "villan" else a["kind"]


def model_row(name: str, rows: dict[str, dict], ode_variant: str, fires: float, fam: str,
              methods: tuple[str, ...] = METHODS) -> dict:
    """One backdoored model's line: true ASR, sampler, and per method ASR / L2 / within 5 points."""
    true = rows["true"]
    out = {"model": name, "family": fam, "start": true["start"], "true_asr": true["asr"],
           "fires": true["asr"] >= fires, "methods": {}}
    for method in methods:
        v = (ode_variant if true["start"] == "ddim" else "pd") if method == "by_sampler" else method
        r = rows.get(v)
        if r is None:
            continue
        out["methods"][method] = {"variant": v, "asr": r["asr"], "l2_in_mask": r["l2_in_mask"],
                                  "l2_overall": r["l2_overall"], "within": bool(within(r, true))}
    return out


def count(lines: list[dict], method: str) -> dict:
    """Within-5-points count of ``method`` over ``lines`` that have it, with its lower bound and mean L2s."""
    got = [ln["methods"][method] for ln in lines if method in ln["methods"]]
    k = sum(g["within"] for g in got)
    mean = (lambda key: float(np.mean([g[key] for g in got])) if got else float("nan"))
    return {"within": k, "n": len(got), "rate": k / len(got) if got else float("nan"),
            "lower95": lower_bound(k, len(got)) if got else float("nan"),
            "mean_l2_in_mask": mean("l2_in_mask"), "mean_l2_overall": mean("l2_overall")}


def summarise(models: dict[str, dict[str, dict]], zoo: Path, ode_variant: str, fires: float,
              methods: tuple[str, ...] = METHODS) -> dict:
    """Per-model lines and the counts of ``methods`` (all backdoored, firing, firing by family); clean models."""
    lines = [model_row(m, rows, ode_variant, fires, family(zoo, m), methods)
             for m, rows in sorted(models.items()) if "true" in rows]
    firing = [ln for ln in lines if ln["fires"]]
    clean = []
    clean_variants = dict.fromkeys(("pd", "elijah", "final_ode", *methods))  # ordered, each once
    for m, rows in sorted(models.items()):
        if "true" in rows or "none" not in rows:
            continue
        base = rows["none"]["uniformity"]
        clean.append({"model": m, "none_uniformity": base,
                      **{f"{v}_uniformity_ratio": rows[v]["uniformity"] / base for v in clean_variants if v in rows}})
    groups = sorted({group(ln["family"]) for ln in firing})
    return {"fires_threshold": fires, "ode_variant": ode_variant, "methods": list(methods), "models": lines,
            "clean": clean, "all": {m: count(lines, m) for m in methods},
            "firing": {m: count(firing, m) for m in methods},
            "firing_by_family": {g: {m: count([ln for ln in firing if group(ln["family"]) == g], m) for m in methods}
                                 for g in groups}}


def group(fam: str) -> str:
    """The family group a count is split by: ``baddiffusion / villan sde`` (one shift, SPEC 3), ``villan ode``,
    ``trojdiff``."""
    return "trojdiff" if fam.startswith("trojdiff") else "villan ode" if fam == "villan ode" else \
        "baddiffusion / villan sde"


def table(s: dict) -> str:
    methods = s["methods"]
    head = ["model", "family", "sampler", "true ASR", *[f"{m} ASR / L2 in mask" for m in methods]]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ln in s["models"]:
        cells = [ln["model"], ln["family"], ln["start"], f"{ln['true_asr']:.2f}"]
        for m in methods:
            g = ln["methods"].get(m)
            cells.append("-" if g is None else
                         f"{'**' if g['within'] else ''}{g['asr']:.2f}{'**' if g['within'] else ''} / "
                         f"{g['l2_in_mask']:.2f}" + (f" ({g['variant']})" if m == "by_sampler" and
                                                     g["variant"] != "pd" else ""))
        out.append("| " + " | ".join(cells) + " |")
    out += ["", f"Bold: within 5 points of the true trigger's ASR (or above). Counts (exact one-sided 95% lower "
            f"bound), mean L2 to the true trigger in its mask / overall; 'firing' = the models whose true trigger "
            f"fires (ASR >= {s['fires_threshold']}) in the evaluation's setting:", "",
            "| method | all backdoored: within 5 pts | lower 95% | firing only: within 5 pts | lower 95% | "
            "mean L2 in mask (firing) | mean L2 overall (firing) |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        a, f = s["all"][m], s["firing"][m]
        out.append(f"| {m} | {a['within']}/{a['n']} | {a['lower95']:.2f} | {f['within']}/{f['n']} | "
                   f"{f['lower95']:.2f} | {f['mean_l2_in_mask']:.2f} | {f['mean_l2_overall']:.2f} |")
    out += ["", "Firing models by family (within 5 points / models):", "",
            "| family | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for g, counts in s["firing_by_family"].items():
        out.append(f"| {g} | " + " | ".join(f"{counts[m]['within']}/{counts[m]['n']}" for m in methods) + " |")
    if s["clean"]:
        out += ["", "Clean models: uniformity of the generations with each method's trigger / without a trigger:", ""]
        out += [f"- {c['model']}: " + ", ".join(f"{k.removesuffix('_uniformity_ratio')} {v:.3f}" for k, v in c.items()
                                                if k.endswith("_ratio")) + f" (no trigger {c['none_uniformity']:.2f})"
                for c in s["clean"]]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="inversion_table.py work folders (first one wins)")
    ap.add_argument("--zoo", type=Path, default=Path("zoo"), help="where the models are (for their attack family)")
    ap.add_argument("--ode-variant", default="final_ode", help="the by-sampler variant for ODE-trained models")
    ap.add_argument("--fires", type=float, default=0.9, help="true-trigger ASR from which a model counts as firing")
    ap.add_argument("--also", nargs="*", default=[], help="more variants to count (e.g. spread_only), where run")
    ap.add_argument("--skip", nargs="*", default=[], help="models left out of every count (e.g. those seen while "
                                                            "a rule was developed)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--table", type=Path)
    args = ap.parse_args()
    models, notes = collect(args.folders)
    models = skip(models, args.skip)
    s = summarise(models, args.zoo, args.ode_variant, args.fires, (*METHODS, *args.also))
    s["folders"] = [str(f) for f in args.folders]
    s["ignored"] = notes
    s["skipped"] = sorted(args.skip)
    text = table(s)
    print(text + "".join(f"note: {n}\n" for n in notes), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(s, indent=1) + "\n")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)


if __name__ == "__main__":
    main()

"""Diagnose an audit's evidence: every rule's trigger against the true one, and its refinement scores per start.

For each model of AUDIT/audit.jsonl named in ``--models`` it prints
- per rule ("main", "probe", "ball", "terd", from the evidence folder's rules/): the trigger's L2 norm, its cosine
  to the model's true trigger (the attack's, as inversion_table.py evaluates it) and the factor s* that minimises
  ||s * trigger - true||;
- with ``--scores``: the score the evidence refinement gives each rule's trigger at each factor of
  :data:`pdjax.defense.detection.EVIDENCE_SCALES` from each start of ``--starts`` (L_cons of its generations over
  that of the same noise without a trigger, lower = more agreement; n = EVIDENCE_SAMPLES, key fold_in(audit key, 2),
  i.e. ``refine_evidence``'s own scoring), for every rule, flagging or not.

- with ``--asr F [F ...]``: the ASR (SPEC 7, the attack's target; n = 32, key 7, the attack's sampler as
  experiments/inversion_table.py evaluates it) and uniformity of the true trigger and of each rule's trigger
  times each factor F (negative factors flip the trigger's sign).

Labels are used (the true trigger), so this is a diagnostic for experiments, not part of an audit.

Command (inversion_table.md, "The refinement's fallback, tried and removed"):

    python experiments/evidence_scores.py runs/ho10-audit --models ho10_villan_ode_glasses_x --scores
    python experiments/evidence_scores.py runs/ho10-audit --models ho10_bd_stop4_x ho10_bd_whitebox11_hat ho10_bd_whitebox6_shoe ho10_villan_ode_glasses_x ho10_villan_sde_whitebox8_corner

Sign-flipped triggers on the white-box models (inversion_table.md, "Sign-flipped rule triggers"):

    python experiments/evidence_scores.py runs/ho10-audit --models ho10_bd_whitebox11_hat ho10_villan_sde_whitebox8_corner --asr 1 -1 -1.5
    python experiments/evidence_scores.py runs/ho11-audit --models ho11_bd_whitebox9_cat ho11_villan_ode_whitebox7_hat --asr 1 -1 -1.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np


def asr_rows(model, verdict, data, labels, factors) -> None:
    """Print the ASR and uniformity of the true trigger and of every rule's trigger times every factor."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from inversion_table import _scorer, eval_start

    from pdjax.backdoor.train import build_arrays, spec_from_model
    from pdjax.defense.evaluate import triggered_generations

    arrays = build_arrays(spec_from_model(model), model.image_shape, data, labels)
    names = ["true"] + [f"{r} x{f:g}" for r in verdict.rule_triggers for f in factors]
    trigs = [np.asarray(arrays.trigger)] + [f * np.asarray(verdict.rule_triggers[r], np.float32)
                                            for r in verdict.rule_triggers for f in factors]
    gens = triggered_generations(model, np.stack(trigs), jax.random.key(7), n=32, start=eval_start(model))
    stats = _scorer(model, arrays, data, labels)
    for name, x in zip(names, gens):
        st = stats(x)
        print(f"  ASR {name}: {st['asr']:.2f} (uniformity {st['uniformity']:.2f})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("audit", type=Path, help="a `pdjax audit` output folder (evidence folders with rules/)")
    ap.add_argument("--models", nargs="+", required=True, help="model folder names")
    ap.add_argument("--scores", action="store_true", help="also the refinement's scores per rule, factor, start")
    ap.add_argument("--starts", nargs="+", default=["ddpm", "ddim"], help="starts to score from (--scores)")
    ap.add_argument("--asr", nargs="+", type=float, metavar="F", help="ASR of each rule's trigger times each F")
    args = ap.parse_args(argv)

    from pdjax import cpu_runtime

    cpu_runtime.enable()
    from pdjax.audit import load_verdict, model_key, read_audit
    from pdjax.backdoor.train import build_arrays, spec_from_model
    from pdjax.data import load_digits_with_labels
    from pdjax.defense.detection import EVIDENCE_SAMPLES, EVIDENCE_SCALES
    from pdjax.defense.evaluate import Start, triggered_generations
    from pdjax.defense.inversion import cons_ratios
    from pdjax.model import load

    entries = {Path(e["model"]).name: e for e in read_audit(args.audit)}
    for name in args.models:
        if name not in entries:
            raise SystemExit(f"error: {name} is not in {args.audit / 'audit.jsonl'}")
        entry = entries[name]
        verdict = load_verdict(args.audit, entry)
        if verdict is None or not verdict.rule_triggers:
            raise SystemExit(f"error: {name}: its evidence folder in {args.audit} has no rules/ triggers")
        model = load(entry["model"])
        print(f"{name}: {entry['verdict']}, evidence {entry['candidate']} x {entry.get('evidence_scale', 1.0):g} "
              f"from {entry.get('start', 'ddpm')}", flush=True)
        if "attack" in model.meta:
            data, labels = load_digits_with_labels(model.image_shape[0], model.image_shape[2])
            true = np.asarray(build_arrays(spec_from_model(model), model.image_shape, data, labels).trigger).ravel()
            print(f"  true trigger: norm {np.linalg.norm(true):.2f}")
            for rule, g in verdict.rule_triggers.items():
                g = np.asarray(g, np.float64).ravel()
                cos = g @ true / (np.linalg.norm(g) * np.linalg.norm(true) + 1e-12)
                print(f"  {rule}: norm {np.linalg.norm(g):.2f}, cos to true {cos:+.2f}, "
                      f"s* {(g @ true) / max(g @ g, 1e-12):+.2f}")
            if args.asr:
                asr_rows(model, verdict, data, labels, args.asr)
        if args.scores:
            rules = list(verdict.rule_triggers)
            cands = np.stack([np.zeros_like(verdict.trigger)] + [s * np.asarray(verdict.rule_triggers[r]) for r in rules
                                                                 for s in EVIDENCE_SCALES])
            key = jax.random.fold_in(model_key(entry["seed"], model), 2)
            for label in args.starts:
                ratio = cons_ratios(triggered_generations(model, cands, key, n=EVIDENCE_SAMPLES,
                                                          start=Start.parse(label)))
                for k, rule in enumerate(rules):
                    per = ratio[k * len(EVIDENCE_SCALES):(k + 1) * len(EVIDENCE_SCALES)]
                    print(f"  score from {label}, {rule}: " + " / ".join(
                        f"x{s:g} {v:.3f}" for s, v in zip(EVIDENCE_SCALES, per)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

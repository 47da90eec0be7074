"""Backdoor removal (`pdjax clean`, issue 6) with the trigger an audit found, on held-out models.

A defender who ran ``pdjax audit`` holds, for every flagged model, the evidence trigger of the rule that
flagged it (``evidence/<model>/trigger.npy``: the main inversion, the DDIM probe, the ball or the TERD
candidate). This script removes each model's backdoor with that trigger, as a user would
(``pdjax clean MODEL --trigger AUDIT/evidence/<model>/trigger.npy``: :func:`pdjax.removal.remove_backdoor` with
``pdjax clean``'s defaults, 500 steps, lr 1e-4, both weights 1), and reports the attack's ASR before and after
(the attack's own sampler and trigger, SPEC 7 rule, evaluation key fold_in(seed, 12)) and the clean-sample MSE
between the original's and the cleaned model's clean DDPM generations from the same noise (n each). No
knowledge of the attack is used for the removal itself; the recorded attack (checkpoint provenance) is read
only to score it.

Command (incremental and resumable: a model whose ``removal.json`` exists is read back, not redone):

    python experiments/removal_audit.py runs/heldout-audit-terd --models zoo/ho9_bd_stop11_cat ... \\
        --out runs/removal-audit [--n 64] [--steps 500] [--shift baddiffusion|trojdiff|both] \\
        [--noise-scale-min S] [--noise-scale-max S] [--reference frozen|noise] [--trigger-scale-min C] \\
        [--rule main|probe|ball|terd] [--arm evidence|true|mu|control ...] [--json FILE]

Arms: ``evidence`` (the audit's trigger, the default), ``true`` (the attack's own trigger: what removal can do
when the trigger is right; for TrojDiff its trigger image), ``mu`` (TrojDiff's mu = (1 - gamma) times the trigger
image, inside the patch for a patch trigger: the offset its trojan start gamma eps + mu carries; the trigger itself
for the other attacks), ``control`` (the same fine-tuning with the backdoor term off). Outputs:
``OUT/<model>/<arm>/`` (the cleaned model and removal.json) and, with ``--json``, one summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pdjax.audit import evidence_trigger, read_audit
from pdjax.backdoor.train import build_arrays, spec_from_model
from pdjax.data import load_digits_with_labels
from pdjax.model import load
from pdjax.removal import REFERENCES, SHIFTS, RemovalConfig, remove_backdoor

ARMS = ("evidence", "true", "mu", "control")
#: removal.json's label-free quality fields (pdjax.removal.clean_quality) and the target's share of generations from
#: plain noise, copied into the summary rows when present.
QUALITY = ("clean_quality_before", "clean_quality_after", "clean_damaged", "clean_asr_before", "clean_asr_after")


def audit_entries(audit: Path) -> dict[str, dict]:
    """The audit's JSONL entries by model name (the last path component)."""
    if not (audit / "audit.jsonl").is_file():
        raise SystemExit(f"error: {audit / 'audit.jsonl'} not found; pass the --out folder of a `pdjax audit` run")
    return {Path(r["model"]).name: r for r in read_audit(audit)}


def arm_name(arm: str, shift: str = "baddiffusion", *, noise_scale_min: float = 1.0, noise_scale_max: float = 1.0,
             reference: str = "frozen", trigger_scale_min: float = 1.0, rule: str | None = None) -> str:
    """The arm's folder and summary key: the arm (the evidence arm named by its rule when one is chosen),
    suffixed with a removal shift, a noise-scale range, a reference and a trigger-scale floor other than the
    defaults."""
    return (rule if rule and arm == "evidence" else arm) + ("" if shift == "baddiffusion" else f"_{shift}") + \
        ("" if noise_scale_min == 1.0 else f"_s{noise_scale_min:g}") + \
        ("" if noise_scale_max == 1.0 else f"-{noise_scale_max:g}") + \
        ("" if reference == "frozen" else f"_{reference}") + \
        ("" if trigger_scale_min == 1.0 else f"_c{trigger_scale_min:g}")


def against_mu(found: np.ndarray, mu: np.ndarray) -> dict:
    """How the removal trigger lines up with the attack's additive offset mu (TrojDiff's (1 - gamma) image, the
    trigger itself for the other attacks): cosine, and the factor c minimising ||c found - mu|| with the norm of
    what is left."""
    f, m = np.asarray(found, np.float64).ravel(), np.asarray(mu, np.float64).ravel()
    ff = float(f @ f)
    c = float(f @ m) / ff if ff > 0 else 0.0
    return {"mu_norm": float(np.linalg.norm(m)),
            "evidence_cos_mu": float(f @ m) / max(float(np.linalg.norm(f) * np.linalg.norm(m)), 1e-12),
            "evidence_scale_to_mu": c, "evidence_residual_to_mu": float(np.linalg.norm(c * f - m))}


def arm_of(arm: str, args) -> str:
    """:func:`arm_name` of ``arm`` with the command line's removal options."""
    return arm_name(arm, args.shift, noise_scale_min=args.noise_scale_min, noise_scale_max=args.noise_scale_max,
                    reference=args.reference, trigger_scale_min=args.trigger_scale_min, rule=args.rule)


def run_model(path: Path, entry: dict, args) -> dict:
    """Every requested arm on one model; returns its summary row."""
    model = load(path)
    spec = spec_from_model(model)
    data, labels = load_digits_with_labels(model.image_shape[0], model.image_shape[2])
    arrays = build_arrays(spec, model.image_shape, data, labels)
    true_g = arrays.trigger
    mu = arrays.troj_mu_scale(spec)[0] if spec.kind == "trojdiff" else true_g
    found = evidence_trigger(args.audit, entry, args.rule)
    row = {"model": path.name, "attack": spec.to_dict(), "audit_verdict": entry["verdict"],
           "audit_score": entry["score"], "candidate": args.rule or entry.get("candidate", "main"),
           "start": entry.get("start", "ddpm"), "n": args.n, "seed": args.seed,
           "evidence_norm": float(np.linalg.norm(found)), "evidence_l2_to_true": float(np.linalg.norm(found - true_g)),
           **against_mu(found, mu)}
    for arm in args.arm:
        name = arm_of(arm, args)
        out = args.out / path.name / name
        done = out / "removal.json"
        if done.is_file():
            rep = json.loads(done.read_text())
            row[name] = {k: rep[k] for k in ("steps", "asr_before", "asr_after", "clean_mse")}
            row[name].update({k: rep[k] for k in QUALITY if k in rep}, seconds=rep.get("seconds"))
            continue
        trigger = {"true": true_g, "mu": mu}.get(arm, found)
        cfg = RemovalConfig(steps=args.steps, n=args.n, seed=args.seed, shift=args.shift,
                            noise_scale_min=args.noise_scale_min, noise_scale_max=args.noise_scale_max,
                            reference=args.reference, trigger_scale_min=args.trigger_scale_min,
                            backdoor_weight=0.0 if arm == "control" else 1.0)
        t0 = time.perf_counter()
        rem = remove_backdoor(model, data, trigger, cfg, out=out, progress=not args.quiet, spec=spec, labels=labels)
        seconds = time.perf_counter() - t0
        rep = json.loads(done.read_text())
        done.write_text(json.dumps({**rep, "seconds": seconds}, indent=2))
        row[name] = {"steps": rem.steps, "asr_before": rem.asr_before, "asr_after": rem.asr_after,
                    "clean_mse": rem.clean_mse, "seconds": seconds, **{k: rep[k] for k in QUALITY if k in rep}}
        print(f"{path.name} {name}: ASR {rem.asr_before:.2f} -> {rem.asr_after:.2f}, clean-sample MSE "
              f"{rem.clean_mse:.4f} ({seconds:.0f} s)", flush=True)
    return row


def table(rows: list[dict], arms) -> str:
    """A markdown table of the summary rows."""
    head = "| model | attack | trigger -> target | audit rule (start) | evidence norm / L2 to g | ASR before | " + \
        " | ".join(f"ASR after ({a}) | clean MSE ({a})" for a in arms) + " |"
    lines = [head, "|" + "---|" * (6 + 2 * len(arms))]
    for r in rows:
        a = r["attack"]
        kind = a["kind"] + (f" {a['solver']}" if a["kind"] == "villan" else "") + \
            (f" {a['mode']}" if a["kind"] == "trojdiff" else "")
        before = next(r[x]["asr_before"] for x in arms if x in r)
        cells = " | ".join(f"{r[x]['asr_after']:.2f} | {r[x]['clean_mse']:.4f}" if x in r else "- | -" for x in arms)
        lines.append(f"| {r['model']} | {kind} | {a['trigger']} -> {a['target']} | {r['candidate']} ({r['start']}) | "
                     f"{r['evidence_norm']:.2f} / {r['evidence_l2_to_true']:.2f} | {before:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("audit", type=Path, help="the --out folder of a `pdjax audit` run (audit.jsonl, evidence/)")
    p.add_argument("--models", nargs="+", type=Path, required=True, help="backdoored model folders the audit flagged")
    p.add_argument("--out", type=Path, default=Path("runs/removal-audit"))
    p.add_argument("--arm", nargs="+", choices=ARMS, default=["evidence"])
    p.add_argument("--n", type=int, default=64, help="generations for each ASR and clean-MSE report")
    p.add_argument("--shift", default="baddiffusion", choices=SHIFTS,
                   help="the removal term's latent shift (pdjax clean --shift); arms other than the default "
                        "are stored as ARM_SHIFT")
    p.add_argument("--noise-scale-min", type=float, default=1.0,
                   help="pdjax clean --noise-scale-min; arms with another value are stored as ARM_sVALUE")
    p.add_argument("--noise-scale-max", type=float, default=1.0,
                   help="pdjax clean --noise-scale-max; arms with another value are stored as ARM_sMIN-MAX")
    p.add_argument("--reference", default="frozen", choices=REFERENCES,
                   help="pdjax clean --reference; arms with 'noise' are stored as ARM_noise")
    p.add_argument("--trigger-scale-min", type=float, default=1.0,
                   help="pdjax clean --trigger-scale-min; arms with another value are stored as ARM_cVALUE")
    p.add_argument("--rule", choices=("main", "probe", "ball", "terd"),
                   help="remove with the trigger this audit rule found (rules/RULE.npy) instead of the evidence "
                        "trigger; the arm is stored as RULE")
    p.add_argument("--steps", type=int, default=RemovalConfig.steps, help="removal fine-tuning steps")
    p.add_argument("--seed", type=int, default=0, help="removal seed (batches, timesteps, evaluation keys)")
    p.add_argument("--json", type=Path, help="write the summary rows here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from pdjax import cpu_runtime

    cpu_runtime.enable()
    entries = audit_entries(args.audit)
    missing = [m.name for m in args.models if m.name not in entries]
    if missing:
        p.error(f"not in {args.audit / 'audit.jsonl'}: {', '.join(missing)}")
    rows = []
    for m in args.models:
        rows.append(run_model(m, entries[m.name], args))
        if args.json:  # after every model, so a killed run keeps what it finished
            args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    print(table(rows, [arm_of(a, args) for a in args.arm]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TrojDiff-form inversion (pdjax.defense.trojan) on TrojDiff and clean models, and removal with what it finds.

For each model: :func:`pdjax.defense.trojan.invert_trojan` (ball probe, then L_troj for every gamma of the grid from
the ball trigger's multiples, and the patch search; the lowest ratio L_troj(mu') / L_troj(0) wins). On a TrojDiff model it reports how mu'
lines up with the attack's mu (cosine, the factor c minimising ||c mu' - mu||, the residual, norms), the gamma picked
against the attack's, and the ASR of the trojan sampler started from gamma' eps + mu' with (mu', gamma') beside the
attack's own pair (n generations, key fold_in(seed, 7); SPEC 7: the target MSE rule for d2i, the classifier for d2d).
With ``--remove`` it then runs ``pdjax clean``'s removal with mu' (``--shift trojdiff``, noise scale s ~ U[0.1, 0.6],
frozen reference, 500 steps, lr 1e-4: the settings with which the attack's own mu removed TrojDiff's backdoor,
removal_table.md; the noise scaled inside the found patch only when a patch won, or the attack's patch with
``--remove-with attack``) and reports the attack's ASR under its own sampler before and after and the clean-sample MSE.
``--noise-scale MIN MAX`` changes the removal's noise range and ``--remove-with attack`` removes with the attack's own
mu instead (a control: is a failure the trigger's or the removal term's?), and ``--reference`` sets the removal
term's target (RemovalConfig.reference; ``untriggered`` is the one the ho15 blind test used); each writes its own
removal folder.

    python experiments/trojan_inversion.py zoo/ho_troj_stop_x zoo/ho2_troj_outd2d_B --out runs/trojan --remove \
        --json experiments/results/trojan_inversion.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.backdoor.attacks import trojan_ddpm_sample
from pdjax.backdoor.train import build_arrays, spec_from_model, target_classifier
from pdjax.data import load_digits_with_labels
from pdjax.defense.trojan import TrojanConfig, TrojanResult, invert_trojan
from pdjax.metrics import asr, uniformity
from pdjax.model import load
from pdjax.removal import REFERENCES, RemovalConfig, remove_backdoor


def lined_up(found: np.ndarray, mu: np.ndarray) -> dict:
    """Cosine of ``found`` to ``mu``, the factor c minimising ||c found - mu||, the residual, both norms."""
    f, m = np.asarray(found, np.float64).ravel(), np.asarray(mu, np.float64).ravel()
    c = float(f @ m) / max(float(f @ f), 1e-12)
    return {"cos": float(f @ m) / max(float(np.linalg.norm(f) * np.linalg.norm(m)), 1e-12), "best_factor": c,
            "residual": float(np.linalg.norm(c * f - m)), "norm": float(np.linalg.norm(f)),
            "true_norm": float(np.linalg.norm(m))}


def trojan_asr(model, mu, scale, score, key, n: int) -> dict:
    """ASR (``score``: generations -> ASR) and uniformity of n trojan-sampler generations from scale eps + mu."""
    x_T = jnp.asarray(scale, jnp.float32) * jax.random.normal(jax.random.fold_in(key, 0), (n, *model.image_shape))
    x = trojan_ddpm_sample(model.eps, model.params, model.schedule, x_T + mu, jax.random.fold_in(key, 1),
                           jnp.asarray(mu, jnp.float32), jnp.asarray(scale, jnp.float32))
    x = np.asarray(x)
    return {"asr": score(x), "uniformity": float(uniformity(x))}


def attack_patch(arrays) -> dict | None:
    """The attack's own patch ({"corner", "size"}) for a TrojDiff patch trigger, None for a blend one."""
    if not arrays.patch:
        return None
    rows, cols = np.nonzero(arrays.mask[..., 0])
    return {"corner": [int(rows.min()), int(cols.min())], "size": int(rows.max() - rows.min() + 1)}


def scorer(model, spec, arrays, data, labels):
    """generations -> ASR by SPEC 7 (the target MSE rule, or the d2d class classifier)."""
    if arrays.target.ndim == 3:
        return lambda x: float(asr(x, arrays.target))
    classify, k, _ = target_classifier(spec, model.image_shape, data, labels)
    return lambda x: float(np.mean(classify(x) == k))


def run_model(path: Path, args) -> dict:
    model = load(path)
    key = jax.random.key(args.seed)
    out = args.out / path.name
    row = {"model": path.name, "seed": args.seed, "n": args.n}
    done = out / "inversion" / "inversion.json"
    if done.is_file():
        res = TrojanResult.load(out / "inversion")
    else:
        res = invert_trojan(model, key, args.config, progress=not args.quiet)
        res.save(out / "inversion")
    row.update(gamma=res.gamma, ratio=res.ratio, ratios={f"{g:g}": r for g, r in res.ratios.items()},
               patch=res.patch, patch_search=res.patch_search, inversion_seconds=res.seconds,
               trigger_norm=float(np.linalg.norm(res.trigger)))
    form = f"patch {res.patch['corner']}, " if res.patch else ""
    attack = model.meta.get("attack", {})
    if attack.get("kind") != "trojdiff":
        print(f"{path.name}: {form}gamma {res.gamma:g}, ratio {res.ratio:.3f} (ratios {row['ratios']}, patch search "
              f"{(res.patch_search or {}).get('ratio')})", flush=True)
        return row
    spec = spec_from_model(model)
    data, labels = load_digits_with_labels(model.image_shape[0], model.image_shape[2])
    arrays = build_arrays(spec, model.image_shape, data, labels)
    mu, scale = (np.asarray(a, np.float32) for a in arrays.troj_mu_scale(spec))
    score = scorer(model, spec, arrays, data, labels)
    k = jax.random.fold_in(key, 7)
    row.update(attack=spec.to_dict(), found=lined_up(res.trigger, mu), ball=lined_up(res.ball, mu),
               true_pair=trojan_asr(model, mu, scale, score, k, args.n),
               found_pair=trojan_asr(model, res.trigger, res.scale(), score, k, args.n))
    print(f"{path.name}: {form}gamma {res.gamma:g} (attack {spec.gamma:g}), ratio {res.ratio:.3f}, cos to mu "
          f"{row['found']['cos']:.3f}, factor {row['found']['best_factor']:.2f}; ASR (mu', gamma') "
          f"{row['found_pair']['asr']:.2f}, attack's pair {row['true_pair']['asr']:.2f} ({res.seconds:.0f} s)",
          flush=True)
    if args.remove:
        lo, hi = args.noise_scale
        rdir = out / (("removal" if (lo, hi) == (0.1, 0.6) else f"removal_s{lo:g}-{hi:g}")
                      + (f"_{args.reference}" if args.reference != "frozen" else "")
                      + ("_attack_mu" if args.remove_with == "attack" else ""))
        if not (rdir / "removal.json").is_file():
            t0 = time.perf_counter()
            trigger = res.trigger if args.remove_with == "found" else mu
            patch = res.patch if args.remove_with == "found" else attack_patch(arrays)
            rcfg = args.removal if patch is None else dataclasses.replace(
                args.removal, noise_patch=(*patch["corner"], patch["size"]))
            remove_backdoor(model, data, trigger, rcfg, out=rdir, progress=not args.quiet, spec=spec, labels=labels)
            row["removal_seconds"] = time.perf_counter() - t0
        rep = json.loads((rdir / "removal.json").read_text())
        keys = ("steps", "asr_before", "asr_after", "clean_asr_before", "clean_asr_after", "clean_mse", "clean_damaged")
        row["removal"] = {"trigger": args.remove_with, "noise_patch": rep["config"].get("noise_patch"),
                          **{k: rep.get(k) for k in keys}}
        which = "the attack's mu" if args.remove_with == "attack" else "mu'"
        print(f"{path.name}: removal with {which}: ASR {rep['asr_before']:.2f} -> {rep['asr_after']:.2f}, clean-sample "
              f"MSE {rep['clean_mse']:.4f}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gammas", type=float, nargs="+", default=list(TrojanConfig.gammas))
    ap.add_argument("--factors", type=float, nargs="+", default=list(TrojanConfig.factors))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--remove", action="store_true")
    ap.add_argument("--remove-with", choices=("found", "attack"), default="found",
                    help="remove with the inversion's mu' (default) or, as a control, the attack's own mu")
    ap.add_argument("--noise-scale", type=float, nargs=2, default=[0.1, 0.6], metavar=("MIN", "MAX"),
                    help="the removal's noise scale range (default 0.1 0.6, the plan's)")
    ap.add_argument("--reference", default="frozen", choices=REFERENCES,
                    help="removal: the TrojDiff samples' target (RemovalConfig.reference)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.config = TrojanConfig(gammas=tuple(args.gammas), factors=tuple(args.factors)).resolved()
    args.removal = RemovalConfig(shift="trojdiff", noise_scale_min=args.noise_scale[0], noise_scale_max=args.noise_scale[1],
                                 reference=args.reference,
                                 n=args.n, seed=args.seed)
    rows = [run_model(p, args) for p in args.models]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python experiments/trojan_inversion.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.json.write_text(json.dumps({"command": cmd, "config": res_dict(args), "rows": rows}, indent=2))
    return 0


def res_dict(args) -> dict:
    return {"trojan": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(args.config).items()},
            "removal": dataclasses.asdict(args.removal)}


if __name__ == "__main__":
    raise SystemExit(main())

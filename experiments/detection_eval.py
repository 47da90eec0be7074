"""Held-out detection evaluation (issue 5): PureDiffusion's detector vs Elijah's and TERD's statistics.

Command:

    python experiments/detection_eval.py --calibrate M1 M2 ... --held-out H1 H2 ... [--out runs/detection-eval]
        [--methods purediffusion,elijah,terd] [--seed 0] [--n 16] [--steps 40] [--elijah 100,100] [--terd 1000,20]
        [--table experiments/results/detection_table.md] [--roc experiments/results/detection_roc.svg]
        [--detector-out pdjax/assets/detector.json] [--detector-method pd+probe]

Every model (a pdjax checkpoint or diffusers folder) is labelled by its own metadata: backdoored when its
provenance records an attack (``pdjax attack`` writes it; the demo and zoo models have it), clean otherwise.
Labels are used only to fit each detector on the ``--calibrate`` models and to score it on the
``--held-out`` ones; a model in both lists is an error. For each method the model is scanned exactly as
``pdjax scan`` does (:func:`pdjax.defense.detection.scan_model`: the method's inversion with ``--steps``
steps, batch 16, K 5 for PureDiffusion; ``--n`` triggered and ``--n`` clean DDPM generations; model i's key
``fold_in(key(seed), crc32(path))``), and the method's statistic is read from the features:

- purediffusion: ``log_uni_ratio`` (log uniformity of triggered over clean generations; the shipped rule);
- pd-final: the same statistic, with L_final added to the inversion and the DDIM-100 start in its search;
- final-only: the same statistic from an inversion by L_final alone (FINAL_ONLY);
- pd+final: purediffusion's and final-only's scans both, the lower of their two log_uni_ratio values;
- pd+probe: the same two scans, two thresholds: purediffusion's ``log_uni_ratio`` as above, and final-only's
  (``probe_log_uni_ratio``) below mean - 3 sd of the clean calibration models' values; flagged when either
  fires (what `pdjax calibrate --final-probe` fits and `pdjax scan --final-probe` then applies);
- spread-only: the same statistic from the scan's spread candidate alone (SPREAD_CANDIDATE: L_spread, normal
  init, 100 steps, no size search; its own step count, not ``--steps``);
- pd+spread: purediffusion's and spread-only's scans, the lower of their log_uni_ratio values (what
  `pdjax scan --spread` decides on); pd+spread+probe: that plus final-only's probe threshold as in pd+probe
  (`pdjax scan --spread --final-probe`);
- spread-ball: the ball probe (BALL_PROBE: the spread candidate, trigger L2 norm <= 10); statistic ``final_loss``
  (-log of the spread gain reached at that size);
- elijah: ``uni_trig`` (Elijah's uniformity of the generations from its inverted trigger);
- terd: ``trigger_kl`` (TERD's KL(N(m, v) || N(0, 1)) of its inverted trigger's pixels, SPEC 5's reading);
- terd-mr: the same TERD scans, statistic ``terd_mr`` (M_r of TERD's published model_detection.py: the mean
  over pixels of KL(N(delta_i, 1) || N(0, 1)) = delta_i^2 / 2; takes ``--terd`` like terd).

The two baselines take their own budgets with ``--elijah STEPS,BATCH`` and ``--terd PHASE1,PHASE2`` (the
papers': 100,100 and 3000,1000; TERD's phase 2 unrolls a 10-step DDIM chain: the paper's budget took 703
and 839 s per model on 2 cores, beside another job). Without them they run ``--steps`` steps on a batch of
16, as the earlier tables did.

Each statistic gets a threshold from :func:`pdjax.defense.detection.calibrate` on the calibration models;
held-out accuracy, TPR, TNR and ROC AUC (rank statistic of the signed score; ties count one half) follow.
``--detector-out`` writes the rule of ``--detector-method`` (purediffusion, pd+spread, or pd+probe /
pd+spread+probe with their probe threshold), calibrated on the calibration models only, as a detector file (the shipped
``pdjax/assets/detector.json`` is made this way, so the held-out numbers evaluate it).
Scans are cached in ``OUT/<method>.jsonl`` (one line per model), so an interrupted run resumes. Writes a
markdown table and an SVG ROC plot. Cost on a 2-core CPU: about 1 minute per model and method.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from pdjax.defense.detection import (BALL_PROBE, FINAL_PROBE, PROBE_FEATURE, SCAN_INVERSION, SPREAD_CANDIDATE,
                                     Detector, calibrate, scan_model)
from pdjax.defense.inversion import InversionConfig

STATISTIC = {"purediffusion": "log_uni_ratio", "pd-final": "log_uni_ratio", "final-only": "log_uni_ratio",
             "spread-only": "log_uni_ratio", "pd+final": "log_uni_ratio", "pd+probe": "log_uni_ratio",
             "pd+spread": "log_uni_ratio", "pd+spread+probe": "log_uni_ratio", "elijah": "uni_trig",
             "spread-ball": "final_loss", "terd": "trigger_kl", "terd-mr": "terd_mr"}
# terd-mr: TERD's own scans (same inversion, same cache file and budget), judged by the statistic TERD's
# published model detection computes, M_r = mean over pixels of delta_i^2 / 2 (features ``terd_mr``). Scans
# cached before that feature existed get it from their trigger norm: M_r = trigger_norm^2 / (2 D) exactly.
SCANS_AS = {"terd-mr": "terd"}
# pd-final: the scan's PureDiffusion plus L_final (collapse of 10-step DDIM generations, weight 1), its size
# search also trying the DDIM-100 start (where an ODE-trained backdoor fires).
FINAL = {"final_weight": 1.0, "starts": ("ddpm", "ddim")}
# final-only: the scan's probe alone (FINAL_PROBE: L_final, no shift term, 8 noises, normal init, starts DDPM
# and DDIM-100). pd+final: two scans per model (purediffusion and final-only); the statistic is the lower
# log_uni_ratio of the two, read from their caches: what `pdjax scan --final-probe` decides on (scan_model with
# probe=FINAL_PROBE, both inversions with the model's key).
# spread-only: the scan's spread candidate alone (SPREAD_CANDIDATE). pd+spread: what `pdjax scan --spread`
# decides on (the lower log_uni_ratio of purediffusion and spread-only); pd+spread+probe: that, plus the probe
# rule (`pdjax scan --spread --final-probe`).
# spread-ball: the scan's ball probe (BALL_PROBE: the spread candidate with the trigger held to L2 norm
# <= BALL_RADIUS, about a TrojDiff blend trigger's norm at 16x16); its statistic is the inversion's final loss,
# -log of the spread gain reached at that size, not the generations' collapse (a d2d TrojDiff target is a
# class: its generations hardly collapse). `pdjax scan --ball` applies it with a clean-fitted threshold
# (experiments/fit_clean_rule.py).
# COMBINED: method -> (the main rule's parts, whose lowest log_uni_ratio is kept; the probe part or None).
COMBINED = {"pd+final": (("purediffusion", "final-only"), None), "pd+probe": (("purediffusion",), "final-only"),
            "pd+spread": (("purediffusion", "spread-only"), None),
            "pd+spread+probe": (("purediffusion", "spread-only"), "final-only")}


def is_backdoored(model) -> bool:
    """The label from a model's own provenance metadata (``attack`` recorded by ``pdjax attack``)."""
    return bool(model.meta.get("attack"))


# --elijah STEPS,BATCH and --terd PHASE1,PHASE2: the baselines' own budgets (the paper's: elijah 100,100 and
# terd 3000,1000). Without them a baseline runs --steps steps on the scan's batch of 16 (TERD: then 1000
# phase-2 steps), as the earlier tables in detection_table.md did.
BUDGET_FIELDS = {"elijah": ("steps", "batch"), "terd": ("steps", "terd_refine_steps")}


def budget(method: str, spec: str | None) -> dict:
    """``"A,B"`` -> the InversionConfig fields of ``method``'s budget (BUDGET_FIELDS); {} when ``spec`` is None."""
    if not spec:
        return {}
    try:
        a, b = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--{method} takes two integers 'A,B', got {spec!r}") from None
    return dict(zip(BUDGET_FIELDS[method], (a, b)))


def cache_name(method: str, overrides: dict | None) -> str:
    """``method`` plus its budget, e.g. ``terd@steps1000-terd_refine_steps20``: each budget its own cache."""
    return method + ("@" + "-".join(f"{k}{v}" for k, v in overrides.items()) if overrides else "")


def inversion_config(method: str, steps: int, overrides: dict | None = None) -> InversionConfig:
    if overrides:
        return dataclasses.replace(inversion_config(method, steps), **overrides)
    if method == "purediffusion":
        return dataclasses.replace(SCAN_INVERSION, steps=steps)
    if method == "pd-final":
        return dataclasses.replace(SCAN_INVERSION, steps=steps, **FINAL)
    if method == "final-only":
        return dataclasses.replace(FINAL_PROBE, steps=steps)
    if method == "spread-only":  # its own step count (one model call per step), not --steps
        return SPREAD_CANDIDATE
    if method == "spread-ball":
        return BALL_PROBE
    return InversionConfig(method=method, steps=steps, batch=SCAN_INVERSION.batch)


def scan_all(paths: list[str], method: str, out: Path, seed: int, n: int, steps: int,
             overrides: dict | None = None) -> dict[str, dict]:
    """{path: {"label", "features"}} for every path, reusing lines of ``OUT/<method>.jsonl`` (``overrides``: a
    baseline's budget, :func:`budget`; cached in ``OUT/<cache_name>.jsonl``)."""
    from pdjax.model import load

    stat, method = STATISTIC[method], SCANS_AS.get(method, method)
    cache = out / f"{cache_name(method, overrides)}.jsonl"
    done = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            try:
                r = json.loads(line)
                done[r["model"]] = r
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill: redone
    cfg = inversion_config(method, steps, overrides)
    for p in paths:
        if p in done:
            continue
        model = load(p)
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(p.encode()))
        v = scan_model(model, p, key, Detector(), cfg, n)
        row = {"model": p, "label": is_backdoored(model), "features": v.features, "seconds": v.seconds}
        with cache.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[p] = row
        print(f"  {method:13} {p}: {'backdoored' if row['label'] else 'clean':10} "
              f"{stat} = {v.features[stat]:.4g} ({v.seconds:.0f} s)", flush=True)
    for p in paths:
        if stat == "terd_mr" and stat not in done[p]["features"]:  # a line cached before terd_mr existed
            f, size = done[p]["features"], math.prod(load(p).image_shape)
            done[p] = {**done[p], "features": {**f, stat: f["trigger_norm"] ** 2 / (2 * size)}}
    return {p: done[p] for p in paths}


def scan_combined(paths: list[str], method: str, out: Path, seed: int, n: int, steps: int) -> dict[str, dict]:
    """A COMBINED method: each part's scan (cached as usual); per model, the main parts' row with the lowest
    log_uni_ratio, plus the probe part's ratio as ``probe_log_uni_ratio`` (two-threshold rule) if it has one."""
    main_parts, probe_part = COMBINED[method]
    parts = [scan_all(paths, m, out, seed, n, steps) for m in main_parts]
    probed = scan_all(paths, probe_part, out, seed, n, steps) if probe_part else None
    rows = {}
    for p in paths:
        best = min((r[p] for r in parts), key=lambda r: r["features"]["log_uni_ratio"])
        seconds = sum(r[p]["seconds"] for r in parts)
        if probed is not None:
            best = {**best, "features": {**best["features"], PROBE_FEATURE: probed[p]["features"]["log_uni_ratio"]}}
            seconds += probed[p]["seconds"]
        rows[p] = {**best, "seconds": seconds}
    return rows


def roc_auc(scores, labels) -> float:
    """P(score of a random backdoored model > score of a random clean one), ties 1/2."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def roc_points(scores, labels) -> list[tuple[float, float]]:
    """(FPR, TPR) for every threshold, from (0, 0) to (1, 1)."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pts = [(0.0, 0.0)]
    for thr in sorted(set(s), reverse=True):
        pred = s >= thr
        pts.append((float(pred[~y].mean()) if (~y).any() else 0.0, float(pred[y].mean()) if y.any() else 0.0))
    pts.append((1.0, 1.0))
    return pts


def calibrated(cal: dict, method: str, meta: dict | None = None) -> Detector:
    """The method's statistic thresholded on the calibration models (:func:`pdjax.defense.detection.calibrate`)."""
    return calibrate([r["features"] for r in cal.values()], [r["label"] for r in cal.values()], STATISTIC[method],
                     meta)


def evaluate_method(cal: dict, held: dict, method: str) -> dict:
    feat = STATISTIC[method]
    det = calibrated(cal, method)
    y = np.array([r["label"] for r in held.values()], bool)
    scores = np.array([det.score(r["features"]) for r in held.values()])
    pred = scores > 0
    return {"method": method, "statistic": feat, "threshold": det.threshold, "sign": det.sign,
            "probe_threshold": det.probe_threshold,
            "calibration_accuracy": det.meta["train_accuracy"], "n_held_out": int(len(y)),
            "n_backdoored": int(y.sum()), "accuracy": float((pred == y).mean()),
            "tpr": float(pred[y].mean()) if y.any() else float("nan"),
            "tnr": float((~pred[~y]).mean()) if (~y).any() else float("nan"),
            "auc": roc_auc(scores, y), "roc": roc_points(scores, y),
            "held_out": [{"model": p, "label": bool(r["label"]), "score": float(s)}
                         for (p, r), s in zip(held.items(), scores)]}


def roc_svg(results: list[dict], size: int = 320, colours: dict | None = None) -> str:
    """An SVG of each result's ROC curve (``method``, ``roc`` points, ``auc``); ``colours``: method -> colour
    beside the built-in ones."""
    pad = 40
    colours = (colours or {}) | {"purediffusion": "#c0392b", "pd-final": "#8e44ad", "final-only": "#d35400", "pd+final": "#1abc9c",
               "pd+probe": "#7d3c98", "spread-only": "#b7950b", "pd+spread": "#ca6f1e", "pd+spread+probe": "#117864",
               "spread-ball": "#6c3483",
               "elijah": "#2471a3", "terd": "#229954", "terd-mr": "#7dcea0"}
    w = size - 2 * pad
    px = lambda x: pad + x * w  # noqa: E731
    py = lambda y: size - pad - y * w  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 130}" height="{size}" font-family="sans-serif" '
             f'font-size="11">', f'<rect x="{pad}" y="{pad}" width="{w}" height="{w}" fill="none" stroke="#999"/>',
             f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" stroke="#ccc" stroke-dasharray="4"/>',
             f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle">false positive rate (held-out)</text>',
             f'<text x="12" y="{size / 2}" transform="rotate(-90 12 {size / 2})" text-anchor="middle">'
             f'true positive rate</text>']
    for i, r in enumerate(results):
        c = colours.get(r["method"], "#555")
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in r["roc"])
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        parts.append(f'<text x="{size - pad + 10}" y="{pad + 14 + 16 * i}" fill="{c}">{r["method"]} '
                     f'AUC {r["auc"]:.2f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_table(results: list[dict], args, path: Path) -> None:
    lines = [f"# Held-out detection ({results[0]['n_held_out']} held-out models, "
             f"{results[0]['n_backdoored']} backdoored)", "",
             f"Command: `python experiments/detection_eval.py --calibrate {' '.join(args.calibrate)} "
             f"--held-out {' '.join(args.held_out)} --methods {args.methods} --seed {args.seed} --n {args.n} "
             f"--steps {args.steps}"
             + "".join(f" --{m} {getattr(args, m)}" for m in BUDGET_FIELDS if getattr(args, m)) + "`", "",
             "| method | statistic | threshold | calibration acc. | held-out acc. | TPR | TNR | ROC AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        thr = f"{r['threshold']:.4g}" + ("" if r.get("probe_threshold") is None
                                         else f"; probe {r['probe_threshold']:.4g}")
        lines.append(f"| {r['method']} | {r['statistic']} | {thr} | {r['calibration_accuracy']:.2f} | "
                     f"{r['accuracy']:.2f} | {r['tpr']:.2f} | {r['tnr']:.2f} | {r['auc']:.2f} |")
    lines += ["", "Per held-out model (signed score, > 0 = flagged):", "",
              "| model | label | " + " | ".join(r["method"] for r in results) + " |",
              "|---|---|" + "---|" * len(results)]
    for i, h in enumerate(results[0]["held_out"]):
        lines.append(f"| {h['model']} | {'backdoored' if h['label'] else 'clean'} | "
                     + " | ".join(f"{r['held_out'][i]['score']:+.2f}" for r in results) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", nargs="+", required=True)
    ap.add_argument("--held-out", nargs="+", required=True)
    ap.add_argument("--out", default="runs/detection-eval", type=Path)
    ap.add_argument("--methods", default="purediffusion,elijah,terd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=SCAN_INVERSION.steps)
    ap.add_argument("--elijah", metavar="STEPS,BATCH",
                    help="Elijah's budget (the paper's: 100,100); default --steps steps on a batch of 16")
    ap.add_argument("--terd", metavar="PHASE1,PHASE2",
                    help="TERD's phase-1 and phase-2 steps (the paper's: 3000,1000); default --steps,1000")
    ap.add_argument("--table", default="experiments/results/detection_table.md", type=Path)
    ap.add_argument("--roc", default="experiments/results/detection_roc.svg", type=Path)
    ap.add_argument("--detector-out", type=Path,
                    help="also write --detector-method's calibrated rule as a detector file "
                         "(e.g. pdjax/assets/detector.json)")
    ap.add_argument("--detector-method", default="purediffusion",
                    choices=("purediffusion", "pd+probe", "pd+spread", "pd+spread+probe"),
                    help="the rule --detector-out writes (+probe: with the probe threshold)")
    args = ap.parse_args(argv)
    from pdjax import cpu_runtime

    cpu_runtime.enable()  # as the pdjax command: YNNPACK kernels, one XLA:CPU device per core
    overlap = set(args.calibrate) & set(args.held_out)
    if overlap:
        ap.error(f"held-out models must not be calibration models: {', '.join(sorted(overlap))}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in STATISTIC]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(STATISTIC)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for method in methods:
        scan = scan_combined if method in COMBINED else scan_all
        base = SCANS_AS.get(method, method)
        extra = {"overrides": budget(base, getattr(args, base))} if base in BUDGET_FIELDS else {}
        cal = scan(args.calibrate, method, args.out, args.seed, args.n, args.steps, **extra)
        held = scan(args.held_out, method, args.out, args.seed, args.n, args.steps, **extra)
        r = evaluate_method(cal, held, method)
        results.append(r)
        if method == args.detector_method and args.detector_out:
            main_parts, probe_part = COMBINED.get(method, ((method,), None))
            extra = {}
            if probe_part:
                extra["probe"] = dataclasses.asdict(inversion_config(probe_part, args.steps).resolved())
            if "spread-only" in main_parts:
                extra["spread"] = dataclasses.asdict(inversion_config("spread-only", args.steps).resolved())
            meta = {"reference_models": list(cal), "seed": args.seed, "samples": args.n,
                    "inversion": dataclasses.asdict(inversion_config(main_parts[0], args.steps).resolved()), **extra,
                    "features": [cal[p]["features"] for p in cal],
                    "made_by": "experiments/detection_eval.py (model key fold_in(key(seed), crc32(path)))",
                    "held_out": {k: r[k] for k in ("accuracy", "tpr", "tnr", "auc", "n_held_out", "n_backdoored")},
                    "date": time.strftime("%Y-%m-%d")}
            calibrated(cal, method, meta).save(args.detector_out)
            print(f"wrote {args.detector_out}")
        print(f"{method}: held-out accuracy {r['accuracy']:.2f}, TPR {r['tpr']:.2f}, TNR {r['tnr']:.2f}, "
              f"AUC {r['auc']:.2f}" + ("" if math.isfinite(r["auc"]) else " (one class only)"), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, args, args.table)
    args.roc.parent.mkdir(parents=True, exist_ok=True)
    args.roc.write_text(roc_svg(results))
    print(f"wrote {args.table} and {args.roc}")
    return results


if __name__ == "__main__":
    main()

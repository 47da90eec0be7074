"""Held-out accuracy of the shipped detector, all rules on, audited with one command (issue 5).

Command:

    python experiments/heldout_audit.py MODEL_OR_DIR_OR_LIST ... --out runs/heldout-audit [--seed 0]
        [--detector pdjax/assets/detector.json] [--seen M1 M2 ...] [--json F] [--table F] [--roc F.svg] [--steps S] [--samples N]
        [--baselines runs/baselines-elijah/results.json runs/baselines-terd/results.json] [--compare-roc F.svg]

It runs ``pdjax audit --final-probe --ball --terd MODELS --out OUT --seed SEED`` (the library's own command; a killed
run resumes from OUT/audit.jsonl and does not redo finished models) on the models of SOURCES, each model once
(a path whose weights are bitwise those of an earlier one is dropped, with a note), labels every audited model from its own
provenance metadata (backdoored when ``pdjax attack`` recorded an attack), and scores the detector's rules from
the features the audit saved, with no refitting:

- main: PureDiffusion's inversion, ``log_uni_ratio`` against the main threshold (what plain ``pdjax scan`` does);
- probe: the L_final probe's ``probe_log_uni_ratio`` against its clean-fitted threshold (``--final-probe``);
- ball: the ball probe's ``ball_loss`` against its clean-fitted threshold (``--ball``);
- terd: the TERD probe's ``terd_log_mr`` against its clean-fitted threshold (``--terd``; added 2026-12-05, after
  the ``main+probe+ball`` audits of detection_table.md; an audit saved without it scores the rule as not firing).

A model is flagged by a set of rules when any of them fires (the detector's margin is the largest of the rules'
margins). For each set: accuracy, TPR, TNR and ROC AUC of that margin (ties count one half). ``--seen`` names
models that influenced a design choice (they are reported apart as well as in the whole set). It prints a
markdown table (per model, then per rule set) and writes it to ``--table``, the numbers to ``--json`` and the
rule sets' ROC curves (over all models) to ``--roc``.

``--baselines`` takes ``results.json`` files of ``experiments/detection_eval.py`` (Elijah's and TERD's statistics,
each thresholded on its own calibration models, which must not be in this list). On the models both the audit
and every baseline scored, it compares PureDiffusion's detector (all rules) with each baseline: the same
metrics, over all of them and over the unseen ones, a per-model table, and their ROC curves to
``--compare-roc``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detection_eval import is_backdoored, roc_auc, roc_points, roc_svg  # noqa: E402

RULE_SETS = (("main",), ("probe",), ("ball",), ("terd",), ("main", "probe"), ("main", "ball"), ("main", "probe", "ball"),
             ("main", "probe", "ball", "terd"))
COLOURS = {"main": "#c0392b", "probe": "#bb8fce", "ball": "#85c1e9", "main+probe": "#7d3c98", "main+ball": "#2471a3",
           "main+probe+ball": "#117a65",
           "main+probe+ball+terd": "#d68910"}


def run_audit(sources: list[str], out: Path, seed: int, detector: str | None, extra: list[str]) -> None:
    """``pdjax audit --final-probe --ball --terd`` through the command line (resumes from OUT); ``extra``: more
    options."""
    cmd = [sys.executable, "-m", "pdjax", "audit", *sources, "--out", str(out), "--seed", str(seed),
           "--final-probe", "--ball", "--terd", *extra]
    if detector:
        cmd += ["--detector", detector]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc:
        sys.exit(rc)  # pdjax audit has said why (one line)


def distinct_models(sources: list[str]) -> tuple[dict[str, bool], dict[str, str]]:
    """The model paths of ``sources`` (as ``pdjax audit`` collects them), each model once: a path whose model
    has the fingerprint of an earlier one (bitwise the same weights, e.g. rebuilt with the same command and
    seed) is dropped. Returns ({kept path: backdoored, from its provenance metadata}, {dropped path: the kept
    path it duplicates})."""
    from pdjax.audit import collect_models, model_fingerprint
    from pdjax.model import load

    first, kept, dropped = {}, {}, {}
    for p in map(str, collect_models(sources)):
        model = load(p)
        f = model_fingerprint(model)
        if f in first:
            dropped[p] = first[f]
        else:
            first[f] = p
            kept[p] = is_backdoored(model)
    return kept, dropped


def metrics(margins: list[float], labels: list[bool]) -> dict:
    """Accuracy, TPR, TNR (None when a class is absent) and ROC AUC of ``margin > 0`` against ``labels``."""
    pred = [m > 0 for m in margins]
    pos = [p for p, y in zip(pred, labels) if y]
    neg = [not p for p, y in zip(pred, labels) if not y]
    right = [p == y for p, y in zip(pred, labels)]
    return {"n": len(labels), "backdoored": len(pos), "clean": len(neg),
            "accuracy": sum(right) / len(labels),
            "tpr": sum(pos) / len(pos) if pos else None, "tnr": sum(neg) / len(neg) if neg else None,
            "auc": roc_auc(margins, labels) if pos and neg else None,
            "lower95": {k: lower_bound(sum(v), len(v)) if v else None
                        for k, v in (("accuracy", right), ("tpr", pos), ("tnr", neg))}}


def lower_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) lower confidence bound on a rate seen as ``k`` successes in ``n``
    (``(1 - level) ** (1 / n)`` when ``k = n``)."""
    from scipy.stats import beta

    return 0.0 if k == 0 else float(beta.ppf(1 - level, k, n - k + 1))


def rule_margin(scores: dict, rules: tuple[str, ...]) -> float:
    """The largest margin among ``rules`` (a rule without its feature or threshold counts as not firing)."""
    got = [scores[r] for r in rules if scores.get(r) is not None]
    return max(got) if got else float("-inf")


def evaluate(rows: list[dict], labels: dict[str, bool], detector: str | None, seen: set[str]) -> dict:
    """Per-model scores and per-rule-set metrics over all rows and over the rows not in ``seen``; ``labels``:
    path -> backdoored."""
    from pdjax.defense.detection import Detector

    det = Detector.load(detector)
    models = []
    for r in rows:
        s = det.scores(r["features"])
        models.append({"model": r["model"], "backdoored": labels[r["model"]], "scores": s,
                       "verdict": r["verdict"], "seen": r["model"] in seen, "seconds": r["seconds"]})
    margins = {"+".join(rs): [rule_margin(m["scores"], rs) for m in models] for rs in RULE_SETS}
    # ROC over every model; a rule that never fires sits at the far end
    return {"models": models, **summarise(margins, [m["backdoored"] for m in models], [m["seen"] for m in models])}


def summarise(margins: dict[str, list[float]], labels: list[bool], seen: list[bool]) -> dict:
    """``{"roc": {name: ROC points over all models}, "sets": {"all" | "unseen": {name: metrics}}}`` for each
    name's margins (one per model, in the order of ``labels`` and ``seen``); "unseen" leaves out the seen
    models and is absent when none is left."""
    unseen = [i for i, s in enumerate(seen) if not s]
    out = {"roc": {k: roc_points(v, labels) for k, v in margins.items()}, "sets": {}}
    for name, idx in (("all", list(range(len(labels)))), ("unseen", unseen)):
        if idx:
            out["sets"][name] = {k: metrics([v[i] for i in idx], [labels[i] for i in idx]) for k, v in margins.items()}
    return out


def roc_curves(summary: dict) -> list[dict]:
    """:func:`summarise`'s ROC points as ``roc_svg`` curves, each with its AUC over all models."""
    return [{"method": k, "roc": pts, "auc": summary["sets"]["all"][k]["auc"] or float("nan")}
            for k, pts in summary["roc"].items()]


def compare(res: dict, baselines: list[dict]) -> dict:
    """PureDiffusion's detector (all rules) against each baseline (a detection_eval result: ``method``,
    ``statistic``, ``threshold``, ``held_out`` [{model, label, score}]) on the models every one of them scored."""
    pd = {m["model"]: m for m in res["models"]}
    scored = [{h["model"]: h for h in b["held_out"]} for b in baselines]
    common = [p for p in pd if all(p in sc for sc in scored)]
    labels = {p: pd[p]["backdoored"] for p in common}
    for b, sc in zip(baselines, scored):
        wrong = [p for p in common if bool(sc[p]["label"]) != labels[p]]
        if wrong:
            raise SystemExit(f"{b['method']} labels {wrong[0]} otherwise than the audit: not the same model")
    margins = {"purediffusion": {p: rule_margin(pd[p]["scores"], RULE_SETS[-1]) for p in common}}
    margins |= {b["method"]: {p: sc[p]["score"] for p in common} for b, sc in zip(baselines, scored)}
    out = {"models": common, "margins": margins,
           "baselines": {b["method"]: {k: b[k] for k in ("statistic", "threshold", "calibration_accuracy")}
                         for b in baselines}}
    return out | summarise({m: [s[p] for p in common] for m, s in margins.items()}, [labels[p] for p in common],
                           [pd[p]["seen"] for p in common])


def comparison_table(res: dict, cmp: dict) -> str:
    methods = list(cmp["margins"])
    lines = ["| model | label | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    pd = {m["model"]: m for m in res["models"]}
    for p in cmp["models"]:
        name = p + (" (seen)" if pd[p]["seen"] else "")
        lines.append(f"| {name} | {'backdoored' if pd[p]['backdoored'] else 'clean'} | "
                     + " | ".join(_f(cmp["margins"][m][p]) for m in methods) + " |")
    lines += ["", "purediffusion: the shipped detector, all its rules (its largest margin); the baselines: their "
              "statistic against the threshold fitted on their calibration models (> 0 = flagged).", "",
              "| models | method | n (backdoored / clean) | accuracy | TPR | TNR | ROC AUC |",
              "|---|---|---|---|---|---|---|"]
    for name, sets in cmp["sets"].items():
        for method, m in sets.items():
            lines.append(f"| {name} | {method} | {m['n']} ({m['backdoored']} / {m['clean']}) | {m['accuracy']:.2f} | "
                         f"{_f(m['tpr'], '{:.2f}')} | {_f(m['tnr'], '{:.2f}')} | {_f(m['auc'], '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def _f(x, fmt="{:+.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(res: dict) -> str:
    lines = ["| model | label | main | probe | ball | terd | verdict (the audit's rules) |", "|---|---|---|---|---|---|---|"]
    for m in res["models"]:
        s = m["scores"]
        name = m["model"] + (" (seen)" if m["seen"] else "")
        lines.append(f"| {name} | {'backdoored' if m['backdoored'] else 'clean'} | {_f(s['main'])} | "
                     f"{_f(s['probe'])} | {_f(s['ball'])} | {_f(s.get('terd'))} | {m['verdict']} |")
    lines += ["", "Margins are the detector's signed scores per rule (> 0 = that rule fires).", "",
              "| models | rules | n (backdoored / clean) | accuracy | TPR | TNR | ROC AUC | one-sided 95% lower bounds "
              "(accuracy / TPR / TNR) |", "|---|---|---|---|---|---|---|---|"]
    for name, sets in res["sets"].items():
        for rules, m in sets.items():
            lo = " / ".join(_f(m["lower95"][k], "{:.2f}") for k in ("accuracy", "tpr", "tnr"))
            lines.append(f"| {name} | {rules} | {m['n']} ({m['backdoored']} / {m['clean']}) | {m['accuracy']:.2f} | "
                         f"{_f(m['tpr'], '{:.2f}')} | {_f(m['tnr'], '{:.2f}')} | {_f(m['auc'], '{:.2f}')} | {lo} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="model folders, folders of models, or text files listing paths")
    ap.add_argument("--out", type=Path, default=Path("runs/heldout-audit"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detector", help="detector JSON (default: the shipped one)")
    ap.add_argument("--seen", nargs="*", default=[], help="models that influenced a design choice")
    ap.add_argument("--steps", type=int, help="pdjax audit --steps (default: the scan's)")
    ap.add_argument("--samples", type=int, help="pdjax audit --samples (default: the scan's)")
    ap.add_argument("--no-run", action="store_true", help="only score OUT/audit.jsonl (no audit)")
    ap.add_argument("--baselines", nargs="*", type=Path, default=[],
                    help="results.json files of experiments/detection_eval.py (Elijah, TERD) to compare with")
    ap.add_argument("--compare-roc", type=Path, help="SVG of PureDiffusion's and the baselines' ROC curves")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--table", type=Path)
    ap.add_argument("--roc", type=Path, help="SVG of each rule set's ROC curve over all models")
    args = ap.parse_args(argv)
    kept, dropped = distinct_models(args.sources)
    for p, q in dropped.items():
        print(f"{p}: the same weights as {q}; counted once, as {q}")
    if not args.no_run:
        extra = [x for k in ("steps", "samples") if getattr(args, k) is not None for x in (f"--{k}", str(getattr(args, k)))]
        run_audit(list(kept), args.out, args.seed, args.detector, extra)
    from pdjax.audit import read_audit

    rows = read_audit(args.out)
    rows = [r for r in rows if r["model"] in kept]  # an OUT reused with another list: only this list's models
    res = evaluate(rows, kept, args.detector, set(args.seen))
    res["duplicates"] = dropped
    text = table(res)
    if args.baselines:
        res["comparison"] = compare(res, [r for f in args.baselines for r in json.loads(f.read_text())])
        text += "\n" + comparison_table(res, res["comparison"])
        if args.compare_roc:
            args.compare_roc.write_text(roc_svg(roc_curves(res["comparison"])))
    print(text)
    if args.table:
        args.table.write_text(text)
    if args.roc:
        args.roc.write_text(roc_svg(roc_curves(res), colours=COLOURS))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "seed": args.seed, **res}, indent=2))
    return res


if __name__ == "__main__":
    main()

"""Backdoor detection (SPEC 5): features from an inverted trigger and its generations, a calibrated rule.

Pipeline for one model (:func:`scan_model`): invert a trigger (PureDiffusion by default, with its size
search, which already draws ``n`` generations from eps_i + delta for the chosen size and ``n`` from eps_i
alone, the same noise, from the chosen start: DDPM by default, ``InversionConfig.starts`` for more), and
compute label-free features:

- trigger: ``trigger_norm`` (L2), ``trigger_mean``, ``trigger_kl`` = KL(N(m, v) || N(0, 1)) of delta's
  pixels (SPEC 5's reading of TERD's statistic), and the statistics TERD's published model detection computes
  (PKU-ML/TERD, model_detection.py): per pixel the KL of N(delta_i, 1) against N(0, 1), which is delta_i^2 / 2,
  averaged (``terd_mr`` = M_r = mean of delta_i^2 / 2 = trigger_norm^2 / (2 D)) and its variance over the
  pixels (``terd_vr`` = V_r); TERD's offsets N_m and N_v shift both by constants and change no ranking;
- generations: ``uni_trig`` / ``uni_clean`` (uniformity, SPEC 5: trimmed mean pairwise distance),
  ``tv_trig`` / ``tv_clean`` (total variation), and ``log_uni_ratio`` = log(uni_trig / uni_clean): a
  backdoored model's generations collapse onto its target (ratio << 1), a clean model's stay diverse;
- ``final_loss`` of the inversion;
- ``trigger_scale``: the factor the size search chose (1 without search); reported, not a detector feature.

The decision rule (:class:`Detector`) is a threshold on one feature, calibrated on labelled reference
models (:func:`calibrate`: the midpoint of the widest gap between the classes, or the threshold of
highest balanced accuracy when they overlap) and shipped as a small versioned JSON file
(``pdjax/assets/detector.json``); ``pdjax calibrate`` refits it on a user's own reference models.
With the probe (``pdjax scan --final-probe``), a detector may carry a second threshold, on the probe
trigger's ``log_uni_ratio`` (feature ``probe_log_uni_ratio``), fitted on the clean reference models alone
(mean - PROBE_Z standard deviations): the probe looks for backdoors the calibration set may have no
example of, so its false-alarm level is set from clean models. The verdict is then "backdoored" when either
rule fires.
With the spread candidate (``pdjax scan --spread``, :data:`SPREAD_CANDIDATE`), a second inversion by L_spread
(a TrojDiff trigger widens the model's answer at t = T-1) competes for the main rule: the trigger whose
generations collapse more is judged, so the one threshold also sees a TrojDiff trigger the shift loss misses.
With the ball probe (``pdjax scan --ball``, :data:`BALL_PROBE`), L_spread is maximised again with the trigger
held to a fixed L2 norm; its final loss (``ball_loss``, -log of the spread gain a trigger of that size can
cause) gets a third threshold, fitted on the clean reference models like the probe's. It sees TrojDiff
backdoors (d2i, in-d2d and out-d2d in detection_table.md's held-out check) whose triggers do not make the
generations collapse from the scan's start.
With the TERD probe (``pdjax scan --terd``, :data:`TERD_PROBE`), TERD's two-phase inversion (SPEC 4.3) runs
too, at a reduced budget, and the log of M_r (TERD's published model-detection statistic, the mean over pixels
of delta_i^2 / 2) of its trigger (``terd_log_mr``) gets a fourth threshold, fitted on the clean reference
models like the probe's but on the other side (mean + PROBE_Z sd: a backdoored model's TERD trigger is
larger). It sees a TrojDiff patch backdoor that the other rules missed (experiments/results/detection_table.md,
"The TERD rule").
The likely target is the per-pixel median of the triggered generations.
In ``pdjax audit`` (and ``pdjax scan --refine``) the evidence of a flagged model (the trigger the verdict shows and
the audit saves) is then re-chosen by :func:`refine_evidence`: among the triggers of every rule that flags, each at
factors 0.75-1.5, the one whose generations agree most; the decision is not changed by it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from importlib import resources
from pathlib import Path

import jax
import numpy as np

from pdjax.defense.evaluate import generation_stats, triggered_generations
from pdjax.defense.inversion import InversionConfig, invert
from pdjax.errors import ConfigError, OutputError

DETECTOR_FORMAT = "pdjax-detector"
DETECTOR_VERSION = 4  # 2 added the optional probe threshold, 3 the ball one, 4 the TERD one; older files load without them
FEATURES = ("log_uni_ratio", "uni_trig", "uni_clean", "tv_trig", "tv_clean", "trigger_norm", "trigger_mean",
            "trigger_kl", "terd_mr", "terd_vr", "final_loss")
PROBE_FEATURE = "probe_log_uni_ratio"
BALL_FEATURE = "ball_loss"
TERD_FEATURE = "terd_log_mr"
#: The rules fitted on clean reference models: rule -> (feature, direction). Direction -1: the rule fires when
#: the feature lies below its threshold (mean - PROBE_Z sd of the clean references); +1: above (mean + PROBE_Z sd).
CLEAN_RULES = {"probe": (PROBE_FEATURE, -1), "ball": (BALL_FEATURE, -1), "terd": (TERD_FEATURE, 1)}
#: The scan / audit / calibrate option that runs each clean-fitted rule's inversion.
RULE_FLAGS = {"probe": "--final-probe", "ball": "--ball", "terd": "--terd"}
# The probe threshold: mean - PROBE_Z * sd of the clean reference models' probe log ratios (a Gaussian null:
# a 0.13% one-sided false-alarm rate per model); at least PROBE_MIN_CLEAN clean references.
PROBE_Z = 3.0
PROBE_MIN_CLEAN = 3

# The scan's default inversion: PureDiffusion with its shipped defaults (size search included) but fewer
# steps and a smaller batch, so the bundled demo scan fits in minutes on a 2-core CPU (issue 5); audits may
# pass their own. SCAN_SAMPLES: generations per start; with a size search they are the search's own
# generations of the chosen factor (n per factor), paired with n clean ones from the same noise.
SCAN_INVERSION = InversionConfig(method="purediffusion", steps=40, batch=16, K=5)
SCAN_SAMPLES = 8
# The scan's optional second inversion (``pdjax scan --final-probe``): L_final alone (the collapse of 10-step
# DDIM generations, no shift term) on 8 noises from a normal init, scored from the DDPM and the DDIM-100 start.
# It looks for a backdoor the shift loss cannot see (VillanDiffusion ODE); the scan keeps whichever of its two
# triggers collapses the generations more (lower log_uni_ratio).
FINAL_PROBE = InversionConfig(method="purediffusion", steps=40, shift_weight=0.0, final_weight=1.0, batch=8,
                              cons_batch=8, init="normal", scales=(1.0,), starts=("ddpm", "ddim"))
# The scan's optional spread candidate (``pdjax scan --spread``): L_spread alone (the widening of the model's
# answer at t = T-1 that a TrojDiff trigger causes; one model call per step, no unrolled chain) from 4 normal
# inits (restarts: a single init can stall short of a TrojDiff trigger), fresh noise, no size search. It is
# judged by the main rule: the scan keeps whichever of the main inversion's and this one's triggers collapses
# the generations more (experiments/results/start_search.md section 7: it recovers a TrojDiff blend trigger
# that the shift loss misses; on BadDiffusion models its generations diverge, so the shift loss's trigger is
# kept there). Off by default: experiments/results/detection_table.md, last section.
SPREAD_CANDIDATE = InversionConfig(method="purediffusion", steps=100, shift_weight=0.0, spread_weight=1.0, batch=32,
                                   init="normal", scales=(1.0,), restarts=4)
#: Whether ``pdjax scan`` / ``audit`` / ``calibrate`` run the spread candidate by default (``--spread/--no-spread``).
SCAN_SPREAD = False
# The scan's optional ball probe (``pdjax scan --ball``): the spread candidate with the trigger projected onto
# the L2 ball of radius BALL_RADIUS after every step. Its statistic is the final loss, -log of the spread gain
# a trigger of that size reaches (lower = the model reacts more to some small trigger); the detector's ball
# threshold is fitted on clean reference models (experiments/results/detection_table.md, "spread-ball":
# 5 clean models -0.100 to -0.086, four TrojDiff models -0.26 to -0.19). The radius is about a TrojDiff
# blend trigger's norm on 16x16 digits.
BALL_RADIUS = 10.0
# Its restarts start from -U[0, 1) and +U[0, 1) in turn ("alt-uniform"): from normal inits all restarts fell into
# the negative-mean optimum on a TrojDiff in-d2d model whose trigger (mean +0.39) lies in the positive one.
BALL_PROBE = dataclasses.replace(SPREAD_CANDIDATE, max_norm=BALL_RADIUS, init="alt-uniform")
# The scan's optional TERD probe (``pdjax scan --terd``): TERD as published (SPEC 4.3) at a sixth of its phase-1
# budget and 20 phase-2 steps on 16 noises (experiments/detection_eval.py's ``--methods terd --terd 500,20``, about
# 36 s a model on a 2-core CPU), no size search. Its statistic is ``terd_log_mr`` = log M_r of its trigger.
TERD_PROBE = InversionConfig(method="terd", steps=500, terd_refine_steps=20, batch=16)


@dataclasses.dataclass(frozen=True)
class Detector:
    """A threshold rule: backdoored when ``sign * (feature - threshold) > 0``, or, with a probe threshold and
    the probe's features, when ``probe_log_uni_ratio < probe_threshold``, or, with a ball threshold and the
    ball probe's features, when ``ball_loss < ball_threshold``, or, with a TERD threshold and the TERD probe's
    features, when ``terd_log_mr > terd_threshold``.

    Attributes:
      feature: one of :data:`FEATURES`.
      threshold: the decision threshold.
      sign: +1 (larger = backdoored) or -1 (smaller = backdoored).
      scale: spread of the reference feature values; the score is sign * (x - threshold) / scale.
      meta: provenance: reference models, their labels and feature values, the inversion settings,
        training accuracy, date.
      probe_threshold: threshold on :data:`PROBE_FEATURE` (None: no probe rule; a scan with a probe then
        decides on whichever trigger collapses the generations more, by the one threshold).
      probe_scale: the clean references' standard deviation of the probe feature; the probe's score is
        (probe_threshold - x) / probe_scale.
      ball_threshold, ball_scale: the same for :data:`BALL_FEATURE` (the ball probe's final loss).
      terd_threshold, terd_scale: the same for :data:`TERD_FEATURE` (log M_r of the TERD probe's trigger;
        fires above the threshold, score (x - terd_threshold) / terd_scale).
    """

    feature: str = "log_uni_ratio"
    threshold: float = math.log(0.3)
    sign: int = -1
    scale: float = 1.0
    meta: dict = dataclasses.field(default_factory=dict)
    probe_threshold: float | None = None
    probe_scale: float = 1.0
    ball_threshold: float | None = None
    ball_scale: float = 1.0
    terd_threshold: float | None = None
    terd_scale: float = 1.0

    def scores(self, features: dict) -> dict:
        """Each rule's signed margin, > 0 meaning backdoored: {"main": m, "probe": p, "ball": b, "terd": t},
        where a rule without its threshold or its feature has None."""
        if self.feature not in features:
            raise ConfigError(f"detector needs feature {self.feature!r}, have {', '.join(sorted(features))}")
        out = {"main": float(self.sign * (features[self.feature] - self.threshold) / self.scale)}
        for rule, (key, direction) in CLEAN_RULES.items():
            thr, scale = getattr(self, f"{rule}_threshold"), getattr(self, f"{rule}_scale")
            out[rule] = (None if thr is None or key not in features
                         else float(direction * (features[key] - thr) / scale))
        return out

    def score(self, features: dict) -> float:
        """Signed margin: > 0 means backdoored (the largest of the rules' margins)."""
        return max(s for s in self.scores(features).values() if s is not None)

    def decide(self, features: dict) -> bool:
        return self.score(features) > 0

    def to_dict(self) -> dict:
        return {"format": DETECTOR_FORMAT, "version": DETECTOR_VERSION, **dataclasses.asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the detector JSON atomically (a temporary file, then ``os.replace``)."""
        from pdjax.paths import check_out_file

        path = check_out_file(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"cannot write detector {path} ({e.strerror or e}); choose a writable --out") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Detector":
        """Load a detector file; ``None`` = the one shipped with pdjax."""
        if path is None:
            text = resources.files("pdjax").joinpath("assets/detector.json").read_text()
            where = "the shipped detector"
        else:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"detector file {p} not found; run `pdjax calibrate` or omit --detector")
            text, where = p.read_bytes(), str(p)
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise ConfigError(f"{where} is not valid JSON ({why}); recalibrate it with `pdjax calibrate`") from None
        if not isinstance(d, dict) or d.get("format") != DETECTOR_FORMAT or d.get("version") not in range(1, DETECTOR_VERSION + 1):
            raise ConfigError(f"{where} is not a pdjax detector of version 1 to {DETECTOR_VERSION}; recalibrate it")
        if d.get("feature") not in FEATURES:
            raise ConfigError(f"{where} uses unknown feature {d.get('feature')!r}; valid: {', '.join(FEATURES)}")
        try:
            rules = {}
            for rule in CLEAN_RULES:
                thr = d.get(f"{rule}_threshold")
                rules[f"{rule}_threshold"] = None if thr is None else float(thr)
                rules[f"{rule}_scale"] = float(d.get(f"{rule}_scale", 1.0))
            return cls(d["feature"], float(d["threshold"]), int(d["sign"]), float(d["scale"]), d.get("meta", {}),
                       **rules)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where} lacks a valid {e} entry; recalibrate it with `pdjax calibrate`") from None


@dataclasses.dataclass
class ModelVerdict:
    """The scan of one model.

    Attributes:
      model: the model's path or name.
      backdoored: the verdict.
      score: the detector's signed margin (> 0 backdoored).
      reason: one sentence saying why.
      features: the feature values (:data:`FEATURES`).
      trigger: [H, W, C] the inverted trigger.
      likely_target: [H, W, C] per-pixel median of the triggered generations.
      triggered: [n, H, W, C] generations from eps + trigger.
      clean: [n, H, W, C] generations from eps (same noise).
      losses: [S] the inversion loss curve.
      method: the inversion method; seconds: wall time of this model's scan.
      detector: the detector's feature, threshold and sign.
      start: the start (sampler, noise scale) of the triggered and clean generations ("ddpm" = DDPM from
        eps + trigger).
      candidate: which of the scan's inversions the evidence comes from (:data:`CANDIDATES`: "main" = the
        scan's own inversion, "spread", "probe", "ball", "terd").
      rule_triggers: {rule: [H, W, C]} the trigger of every rule that ran ("main", "probe", "ball", "terd"; the
        main rule's is that of its chosen candidate), so that any of them can be generated from or removed.
      evidence_scale: the factor :func:`refine_evidence` applied to the deciding rule's trigger (``trigger``
        is that trigger times this factor; 1 when not refined).
      scan_start: the scan's own start, kept when :func:`refine_evidence` replaces ``start`` with the start its
        evidence was generated from (None: not refined, ``start`` is the scan's), so that refining again
        scores from the same starts.
    """

    model: str
    backdoored: bool
    score: float
    reason: str
    features: dict
    trigger: np.ndarray
    likely_target: np.ndarray
    triggered: np.ndarray
    clean: np.ndarray
    losses: np.ndarray
    method: str
    seconds: float
    detector: dict
    start: str = "ddpm"
    candidate: str = "main"
    rule_triggers: dict = dataclasses.field(default_factory=dict)
    evidence_scale: float = 1.0
    scan_start: str | None = None

    def to_dict(self) -> dict:
        """JSON summary (arrays left out; the scan writes them as files)."""
        return {"model": self.model, "verdict": "backdoored" if self.backdoored else "clean",
                "backdoored": self.backdoored, "score": self.score, "reason": self.reason,
                "features": self.features, "method": self.method, "seconds": self.seconds, "start": self.start,
                "candidate": self.candidate, "evidence_scale": self.evidence_scale,
                **({} if self.scan_start is None else {"scan_start": self.scan_start}),
                "detector": self.detector, "final_loss": float(self.losses[-1]) if len(self.losses) else None}


def trigger_features(delta) -> dict:
    """Label-free statistics of an inverted trigger [H, W, C]: L2 norm, mean, KL(N(m, v) || N(0, 1)) of its
    pixels, and TERD's published M_r / V_r (mean and variance over pixels of KL(N(delta_i, 1) || N(0, 1)) =
    delta_i^2 / 2, without TERD's constant offsets)."""
    d = np.asarray(delta, np.float64).ravel()
    m, v = float(d.mean()), float(d.var()) + 1e-12
    kl = 0.5 * (v + m * m - 1.0 - math.log(v))
    per_pixel = 0.5 * d * d
    return {"trigger_norm": float(np.linalg.norm(d)), "trigger_mean": m, "trigger_kl": kl,
            "terd_mr": float(per_pixel.mean()), "terd_vr": float(per_pixel.var())}


def terd_log_mr(features: dict) -> float:
    """:data:`TERD_FEATURE` from a trigger's :func:`trigger_features`: log of TERD's M_r (floored at 1e-12)."""
    return math.log(max(features["terd_mr"], 1e-12))


def features_of(trigger, triggered, clean, final_loss: float) -> dict:
    """All detection features (:data:`FEATURES`) from a trigger and its paired generations."""
    st, sc = generation_stats(triggered), generation_stats(clean)
    f = {"uni_trig": st["uniformity"], "uni_clean": sc["uniformity"], "tv_trig": st["tv"], "tv_clean": sc["tv"],
         "final_loss": float(final_loss), **trigger_features(trigger)}
    f["log_uni_ratio"] = math.log(max(f["uni_trig"], 1e-8) / max(f["uni_clean"], 1e-8))
    return f


def explain(det: Detector, features: dict, backdoored: bool) -> str:
    """One sentence: which rule decided, its feature's value, the threshold, and what it means."""
    m = det.scores(features)
    deciding = max((r for r in m if m[r] is not None), key=lambda r: m[r])  # main on ties (first)
    probe = ball = ""
    if m["probe"] is not None:
        p, thr = math.exp(features[PROBE_FEATURE]), math.exp(det.probe_threshold)
        if backdoored and deciding == "probe":
            return (f"generations from the probe's trigger collapse onto one image: uniformity "
                    f"{features['probe_uni_trig']:.3g} vs {features['probe_uni_clean']:.3g} from clean noise "
                    f"(ratio {p:.3g} <= probe threshold {thr:.3g}, fitted on clean reference models)")
        probe = f"; probe ratio {p:.3g} {'<=' if m['probe'] > 0 else '>'} {thr:.3g}"
    if m["ball"] is not None:
        b, thr = features[BALL_FEATURE], det.ball_threshold
        if backdoored and deciding == "ball":
            return (f"a trigger of L2 norm {BALL_RADIUS:g} widens the model's answer at t = T-1 more than on clean "
                    f"models, as a TrojDiff trigger does: ball loss {b:.4g} <= ball threshold {thr:.4g}, fitted on "
                    f"clean reference models")
        ball = f"; ball loss {b:.4g} {'<=' if m['ball'] > 0 else '>'} {thr:.4g}"
    terd = ""
    if m["terd"] is not None:
        mr, thr = math.exp(features[TERD_FEATURE]), math.exp(det.terd_threshold)
        if backdoored and deciding == "terd":
            return (f"TERD's inverted trigger is larger than on clean models: M_r {mr:.4g} (trigger norm "
                    f"{features['terd_trigger_norm']:.3g}) > TERD threshold {thr:.4g}, fitted on clean reference models")
        terd = f"; TERD M_r {mr:.4g} {'>' if m['terd'] > 0 else '<='} {thr:.4g}"
    return _explain_main(det, features, backdoored) + probe + ball + terd


def _explain_main(det: Detector, features: dict, backdoored: bool) -> str:
    x = features[det.feature]
    rel = ">" if x > det.threshold else "<="
    if det.feature == "log_uni_ratio":
        ratio, thr = math.exp(x), math.exp(det.threshold)
        what = ("generations from the inverted trigger collapse onto one image" if backdoored
                else "generations from the inverted trigger stay as diverse as clean ones")
        return (f"{what}: uniformity {features['uni_trig']:.3g} vs {features['uni_clean']:.3g} from clean noise "
                f"(ratio {ratio:.3g} {rel} threshold {thr:.3g})")
    return f"{det.feature} = {x:.4g} {rel} threshold {det.threshold:.4g} ({'backdoored' if backdoored else 'clean'} side)"


#: The evidence refinement (:func:`refine_evidence`): factors tried on each flagging rule's trigger (finer than the
#: main size search's 1, 1.5, 2, ...) and generations per candidate.
EVIDENCE_SCALES = (0.75, 1.0, 1.25, 1.5)
EVIDENCE_SAMPLES = 32


def nearest_one(scales, scores, rel_tol: float = 0.01) -> int:
    """Index of the factor closest to 1 among those whose score is within ``rel_tol`` of the lowest (the smaller
    on a tie): move a trigger's size only where its generations clearly agree more."""
    scores = np.asarray(scores, np.float64)
    ok = np.flatnonzero(scores <= scores.min() + rel_tol * abs(scores.min()) + 1e-12)
    return int(min(ok, key=lambda i: (abs(math.log(scales[i])), scales[i])))


def refine_evidence(model, verdict: ModelVerdict, key: jax.Array, detector: Detector,
                    scales=EVIDENCE_SCALES, n: int = EVIDENCE_SAMPLES) -> ModelVerdict:
    """A flagged model's verdict with its evidence re-chosen: among the triggers of every rule that flags
    (``verdict.rule_triggers`` with a positive margin; the deciding rule's trigger alone if none were kept), each
    times each factor of ``scales``, from the scan's start (``scan_start``, else ``start``) and from DDPM, the
    candidate whose ``n`` generations agree most.

    Scoring is the size search's (:func:`pdjax.defense.inversion.size_search`): L_cons of the candidate's
    generations over L_cons of the same noise's generations without a trigger, key ``fold_in(key, 2)``, the same
    noise for every candidate. Per rule and start the factor closest to 1 within 1% of the best score wins
    (:func:`nearest_one`); across rules and starts the lowest score, the deciding rule (:func:`evidence_rule`)
    and the scan's start on ties within 1%.

    Why: the rule with the largest margin is not always the one whose trigger fires best (margins of different
    rules are not on one scale), and a rule's trigger often points the right way at a slightly wrong size: where
    a backdoor fires is a narrow band of sizes (experiments/trigger_scale.py on ho_bd_smbox_hat: ASR 0.94 at 1x,
    0.97 at 1.25x, 0.50 at 1.5x). The decision, the score and the features are unchanged; the trigger, likely
    target, generations, start, ``candidate`` (the rule the evidence now comes from) and ``evidence_scale`` are
    replaced. A clean verdict, or ``scales`` = (), returns ``verdict`` itself.

    Args:
      model: the scanned :class:`pdjax.model.Model`.
      verdict: its :class:`ModelVerdict`.
      key: the model's scan key (:func:`pdjax.audit.model_key`).
      detector: the detector that gave the verdict (its per-rule margins pick the flagging rules).
    """
    from pdjax.defense.evaluate import Start
    from pdjax.defense.inversion import cons_ratios, pick_scale

    if not verdict.backdoored or not len(scales):
        return verdict
    margins = detector.scores(verdict.features)
    kept = {r: t for r, t in verdict.rule_triggers.items() if (margins.get(r) or 0) > 0}
    first = evidence_rule(margins, kept) if kept else verdict.candidate
    rules = [first, *[r for r in kept if r != first]]
    # the deciding rule's own trigger: verdict.trigger is already re-sized when the verdict was refined before
    triggers = {first: np.asarray(verdict.rule_triggers.get(first, verdict.trigger), np.float32),
                **{r: np.asarray(kept[r], np.float32) for r in rules[1:]}}
    scales = tuple(float(v) for v in scales)
    cands = np.stack([np.zeros_like(triggers[first])] + [s * triggers[r] for r in rules for s in scales])
    best = []  # (score, rule index, rule, factor, start, generations, clean)
    scan_start = verdict.scan_start or verdict.start
    for label in dict.fromkeys((scan_start, "ddpm")):
        gens = triggered_generations(model, cands, jax.random.fold_in(key, 2), n=n, start=Start.parse(label))
        ratio = cons_ratios(gens)
        for k, r in enumerate(rules):
            per = ratio[k * len(scales):(k + 1) * len(scales)]
            i = nearest_one(scales, per)
            best.append((per[i], k, r, scales[i], label, gens[1 + k * len(scales) + i], gens[0]))
    best.sort(key=lambda b: b[1])  # the deciding rule first, then the others; starts in order within a rule
    score, _, rule, factor, label, gens, clean = best[pick_scale(range(len(best)), [b[0] for b in best])]
    return dataclasses.replace(verdict, trigger=(factor * triggers[rule]).astype(np.float32),
                               likely_target=np.median(gens, axis=0), triggered=np.asarray(gens),
                               clean=np.asarray(clean), start=label, candidate=rule, evidence_scale=factor,
                               scan_start=scan_start)


def scan_model(model, name: str, key: jax.Array, detector: Detector | None = None,
               config: InversionConfig = SCAN_INVERSION, n: int = SCAN_SAMPLES, progress: bool = False,
               probe: InversionConfig | None = None, spread: InversionConfig | None = None,
               ball: InversionConfig | None = None, terd: InversionConfig | None = None) -> ModelVerdict:
    """Invert, generate, featurise and decide for one model (see the module docstring).

    ``spread``: a second candidate for the main rule (e.g. :data:`SPREAD_CANDIDATE`), run with the same key;
    the main rule judges whichever of ``config``'s and its triggers gives the lower ``log_uni_ratio``.
    ``probe``: another inversion (e.g. :data:`FINAL_PROBE`), run with the same key, judged by the probe
    threshold when the detector has one (:func:`_verdict`), else like ``spread``.
    ``ball``: the ball probe (e.g. :data:`BALL_PROBE`), same key; its final loss is the feature
    :data:`BALL_FEATURE`, judged by the ball threshold when the detector has one (else only reported).
    ``terd``: the TERD probe (e.g. :data:`TERD_PROBE`), same key; log M_r of its trigger is the feature
    :data:`TERD_FEATURE`, judged by the TERD threshold when the detector has one (else only reported).
    The evidence refinement (:func:`refine_evidence`, same key) is the caller's step (``pdjax.audit``).
    """
    det = detector or Detector.load()
    t0 = time.perf_counter()
    found = [None if c is None else _invert_and_generate(model, key, c, n, progress)
             for c in (config, spread, probe, ball, terd)]
    return _verdict(name, found, det, time.perf_counter() - t0)


def _invert_and_generate(model, key, config: InversionConfig, n: int, progress: bool):
    """(inversion result, (triggered, clean) generations) of one config."""
    config = dataclasses.replace(config, scale_samples=n)
    res = invert(model, config.method, jax.random.fold_in(key, 0), config, progress=progress)
    if res.generations is not None:  # the size search drew both, from the start it chose
        return res, (res.generations, res.clean_generations)
    return res, triggered_generations(model, np.stack([res.trigger, np.zeros_like(res.trigger)]),
                                      jax.random.fold_in(key, 1), n=n)


#: Names of the scan's inversions, in the order of ``found`` in :func:`_verdict` (ModelVerdict.candidate).
CANDIDATES = ("main", "spread", "probe", "ball", "terd")


def evidence_rule(margins: dict, ran) -> str:
    """The rule whose trigger is the evidence: the largest margin among the rules in ``ran`` that have one.

    (Preferring a flagging collapse rule (main, probe, ball) over a larger TERD margin was tried on the held-out
    list and recovered no more triggers: inversion_table.md, "The audit's own trigger".)"""
    return max((r for r in ran if margins.get(r) is not None), key=lambda r: margins[r])


def _verdict(name: str, found, det: Detector, seconds: float) -> ModelVerdict:
    """The verdict from one model's inversions ``found`` = [main, spread, probe, ball, terd], each None (not run) or
    (inversion result, (triggered, clean) generations).

    The main rule's candidate is whichever of main and spread collapses the generations most (lowest
    log_uni_ratio; main on ties). With a probe and a detector with a probe threshold: the features are that
    candidate's plus the probe's ``probe_log_uni_ratio``, ``probe_uni_trig`` and ``probe_uni_clean``; both rules
    are applied. A probe without a probe threshold is one more candidate of the main rule. The ball probe adds
    ``ball_loss`` (its final loss), ``ball_log_uni_ratio`` and ``ball_trigger_norm``, judged by the ball
    threshold if the detector has one; the TERD probe ``terd_log_mr`` (log M_r of its trigger) and
    ``terd_trigger_norm``, judged by the TERD threshold. The evidence (trigger, generations) is that of the
    rule with the largest margin (:func:`evidence_rule`); every rule's trigger is kept in ``rule_triggers``."""
    scored = [None if f is None else ({**features_of(f[0].trigger, f[1][0], f[1][1], f[0].losses[-1]),
                                       "trigger_scale": f[0].scale}, f[0], f[1], CANDIDATES[i])
              for i, f in enumerate(found)]
    *mains, probed, balled, terded = scored
    if probed is not None and det.probe_threshold is None:
        mains, probed = mains + [probed], None
    feats, res, gens, cand = min((s for s in mains if s is not None), key=lambda s: s[0]["log_uni_ratio"])
    evidence = {"main": (res, gens, cand)}
    if probed is not None:
        pf, pres, pgens, pcand = probed
        feats = {**feats, PROBE_FEATURE: pf["log_uni_ratio"], "probe_uni_trig": pf["uni_trig"],
                 "probe_uni_clean": pf["uni_clean"]}
        evidence["probe"] = (pres, pgens, pcand)
    if balled is not None:
        bf, bres, bgens, bcand = balled
        feats = {**feats, BALL_FEATURE: bf["final_loss"], "ball_log_uni_ratio": bf["log_uni_ratio"],
                 "ball_trigger_norm": bf["trigger_norm"]}
        evidence["ball"] = (bres, bgens, bcand)
    if terded is not None:
        tf, tres, tgens, tcand = terded
        feats = {**feats, TERD_FEATURE: terd_log_mr(tf), "terd_trigger_norm": tf["trigger_norm"]}
        evidence["terd"] = (tres, tgens, tcand)
    res, gens, cand = evidence[evidence_rule(det.scores(feats), evidence)]
    verdict = det.decide(feats)
    return ModelVerdict(name, verdict, det.score(feats), explain(det, feats, verdict), feats, res.trigger,
                        np.median(gens[0], axis=0), gens[0], gens[1], res.losses, res.method, seconds,
                        {"feature": det.feature, "threshold": det.threshold, "sign": det.sign,
                         "probe_feature": PROBE_FEATURE, "probe_threshold": det.probe_threshold,
                         "ball_feature": BALL_FEATURE, "ball_threshold": det.ball_threshold,
                         "terd_feature": TERD_FEATURE, "terd_threshold": det.terd_threshold}, res.start, cand,
                        {rule: np.asarray(e[0].trigger) for rule, e in evidence.items()})


def scan_stack(models, names: list[str], keys, detector: Detector, config: InversionConfig = SCAN_INVERSION,
               n: int = SCAN_SAMPLES, mesh=None, progress: bool = False,
               probe: InversionConfig | None = None, spread: InversionConfig | None = None,
               ball: InversionConfig | None = None, terd: InversionConfig | None = None) -> list[ModelVerdict]:
    """:func:`scan_model` for N same-architecture models in one program (stacked params, vmapped,
    optionally ``shard_map``-ed over ``mesh``); model i's verdict equals ``scan_model(models[i], names[i],
    keys[i], ..., probe=probe, spread=spread, ball=ball, terd=terd)`` up to float rounding. ``keys``: [N]
    typed keys. (The evidence refinement, :func:`refine_evidence`, is left to the caller: it runs model by model,
    and only on real models, not on a stack's padding copies.)"""
    t0 = time.perf_counter()
    found = [None if c is None else _invert_and_generate_many(models, keys, c, n, mesh, progress)
             for c in (config, spread, probe, ball, terd)]
    secs = (time.perf_counter() - t0) / len(models)
    return [_verdict(name, [None if f is None else f[i] for f in found], detector, secs)
            for i, name in enumerate(names)]


def _invert_and_generate_many(models, keys, config: InversionConfig, n: int, mesh, progress: bool):
    """[(result, (triggered, clean))] per model: :func:`_invert_and_generate` for a stack of models."""
    from pdjax.defense.evaluate import stacked_generations
    from pdjax.defense.inversion import invert_many, stack_params

    config = dataclasses.replace(config, scale_samples=n)
    inv_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    results = invert_many(models, config.method, config=config, keys=inv_keys, mesh=mesh, progress=progress)
    if results[0].generations is not None:  # as scan_model: the size search's generations
        return [(r, (r.generations, r.clean_generations)) for r in results]
    trig = np.stack([np.stack([r.trigger, np.zeros_like(r.trigger)]) for r in results])
    gens = stacked_generations(models[0], stack_params(models), trig,
                               jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), n=n, mesh=mesh)
    return list(zip(results, gens))


def check_probe_references(n_clean: int, flag: str = "--final-probe") -> None:
    """A ConfigError unless there are at least :data:`PROBE_MIN_CLEAN` clean reference models for a
    clean-fitted threshold (the probe's, or the ball or TERD probe's with ``flag="--ball"`` / ``"--terd"``)."""
    if n_clean < PROBE_MIN_CLEAN:
        raise ConfigError(f"the {flag} threshold needs at least {PROBE_MIN_CLEAN} clean reference models, got "
                          f"{n_clean}; add --clean models or drop {flag}")


def clean_fit(features: list[dict], y: np.ndarray, key: str, flag: str,
              direction: int = -1) -> tuple[np.ndarray, float, float]:
    """(values of ``key`` [N], threshold mean + direction * PROBE_Z * sd of the clean models' values, sd) of a
    rule fitted on the clean models (``y`` [N] False) alone (:data:`CLEAN_RULES`; ``direction`` -1: the rule fires
    below the threshold, +1: above); sd with ddof 1, at least 0.01; at least PROBE_MIN_CLEAN clean models."""
    v = np.asarray([f[key] for f in features], np.float64)
    check_probe_references(int((~y).sum()), flag)
    scale = max(float(np.std(v[~y], ddof=1)), 0.01)
    return v, float(v[~y].mean() + direction * PROBE_Z * scale), scale


def calibrate(features: list[dict], labels: list[bool], feature: str = "log_uni_ratio",
              meta: dict | None = None) -> Detector:
    """Fit the threshold of ``feature`` on labelled reference models (True = backdoored).

    The sign is the direction in which backdoored models lie (by class means). If the classes separate,
    the threshold is the midpoint of the gap between them (max margin); otherwise the threshold with the
    highest balanced accuracy. ``scale`` is the pooled standard deviation (1 if degenerate).
    When every feature dict has :data:`PROBE_FEATURE` (scans with the probe), the probe threshold is fitted
    on the clean models alone: mean - PROBE_Z * sd (sd with ddof 1, at least 0.01), from at least
    PROBE_MIN_CLEAN clean models; likewise the ball threshold when every dict has :data:`BALL_FEATURE` and
    the TERD threshold (mean + PROBE_Z * sd) when every dict has :data:`TERD_FEATURE`.
    """
    if feature not in FEATURES:
        raise ConfigError(f"unknown detection feature {feature!r}; valid: {', '.join(FEATURES)}")
    y = np.asarray(labels, bool)
    if y.all() or not y.any():
        raise ConfigError("calibration needs at least one clean and one backdoored reference model")
    x = np.asarray([f[feature] for f in features], np.float64)
    sign = 1 if x[y].mean() > x[~y].mean() else -1
    s = sign * x  # larger = backdoored
    lo_bd, hi_clean = s[y].min(), s[~y].max()
    if lo_bd > hi_clean:
        thr_s = 0.5 * (lo_bd + hi_clean)
    else:
        cands = np.unique(s)
        mids = np.concatenate([[cands[0] - 1], 0.5 * (cands[1:] + cands[:-1])])
        bal = [0.5 * ((s[y] > c).mean() + (s[~y] <= c).mean()) for c in mids]
        thr_s = float(mids[int(np.argmax(bal))])
    scale = float(np.sqrt(0.5 * (x[y].var() + x[~y].var()))) or 1.0
    thr = float(sign * thr_s)
    pred = sign * (x - thr) > 0
    info = {**(meta or {}), "n_reference": int(len(y)), "n_backdoored": int(y.sum()),
            "reference_values": [float(v) for v in x], "reference_labels": [bool(v) for v in y]}
    rules = {}  # {rule}_threshold / {rule}_scale of the clean-fitted rules whose feature every scan has
    for rule, (key, direction) in CLEAN_RULES.items():
        if all(key in f for f in features):
            v, rule_thr, rule_scale = clean_fit(features, y, key, RULE_FLAGS[rule], direction)
            rules[f"{rule}_threshold"], rules[f"{rule}_scale"] = rule_thr, rule_scale
            pred = pred | (direction * (v - rule_thr) > 0)
            info[f"{rule}_reference_values"] = [float(a) for a in v]
            info[f"{rule}_rule"] = f"mean {'-' if direction < 0 else '+'} {PROBE_Z:g} sd of the clean references' {key}"
    info["train_accuracy"] = float((pred == y).mean())
    return Detector(feature, thr, sign, scale, info, **rules)

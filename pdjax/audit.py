"""``pdjax scan`` and ``pdjax audit``: check checkpoints for backdoors; JSON, JSONL and an HTML report.

For each model: invert a trigger, generate from it and from clean noise, featurise, decide with the
calibrated detector (:mod:`pdjax.defense.detection`). With no model given, the demo models bundled in
``pdjax/assets/demo`` are scanned (one clean, the others backdoored; their labels are in its index.json
and are shown next to the verdict, never used by it).

Outputs in ``out``: ``scan.json`` (settings + one entry per model), ``<model>/trigger.npy`` and
``trigger.png`` (the deciding rule's trigger), ``<model>/rules/<rule>.npy`` (every rule's trigger),
``<model>/triggered.png`` and ``clean.png``, and ``report.html``. A model's PRNG key is
:func:`model_key`: ``fold_in(key(seed), checksum of its configs and weights)``, so the same model and seed give
the same verdict in a scan, an audit or a calibration, wherever its files lie.

``pdjax audit`` is the batch form for many models: models are grouped by architecture, stacked
(``--stack`` per program, padded to a multiple of the device count), inverted and scored in one jitted
program per stack, split across all devices with ``jax.shard_map`` over a ``("models",)`` mesh; results
stream to ``audit.jsonl`` (one line per model, flushed), and a restarted audit skips every model already
there. A model's key is :func:`model_key`, as in a scan, so its verdict does not depend on the order, the
grouping or the number of devices. On several hosts call ``jax.distributed.initialize()``
first (``--distributed``): the mesh then spans every process's devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.defense.detection import (PROBE_FEATURE, RULE_FLAGS, SCAN_INVERSION, SCAN_SAMPLES, Detector, ModelVerdict,
                                    scan_model)
from pdjax.defense.inversion import InversionConfig
from pdjax.errors import ConfigError, OutputError


def demo_dir() -> Path:
    """The folder of the bundled demo models."""
    return Path(str(resources.files("pdjax").joinpath("assets/demo")))


def demo_models() -> list[tuple[Path, dict]]:
    """[(path, index entry)] of the bundled demo models (label "clean"/"backdoored", attack)."""
    d = demo_dir()
    index = json.loads((d / "index.json").read_text())
    return [(d / name, info) for name, info in index.items()]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _writable(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pdjax-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to {out} ({e.strerror}); choose a writable --out") from None
    return out


def save_verdict_files(v: ModelVerdict, folder: Path, size: int) -> None:
    """trigger.npy / trigger.png / triggered.png / clean.png of one verdict, and ``rules/<rule>.npy``: the
    trigger of every rule that ran (trigger.npy is the deciding rule's)."""
    from pdjax.images import display_scale, save_grid, save_image

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "trigger.npy", v.trigger)
    if v.rule_triggers:
        (folder / "rules").mkdir(exist_ok=True)
        for rule, trig in v.rule_triggers.items():
            np.save(folder / "rules" / f"{rule}.npy", trig)
    save_image(np.clip(v.trigger, -1, 1), folder / "trigger.png")
    scale = display_scale(size)
    save_grid(v.triggered, folder / "triggered.png", scale=scale)
    save_grid(v.clean, folder / "clean.png", scale=scale)


def scan(models: list[str] | None, out: str | Path, seed: int = 0, detector: str | None = None,
         config: InversionConfig = SCAN_INVERSION, n: int = SCAN_SAMPLES, progress: bool = True,
         echo=print, probe: InversionConfig | None = None,
         spread: InversionConfig | None = None, ball: InversionConfig | None = None,
         terd: InversionConfig | None = None, refine: bool = False) -> list[ModelVerdict]:
    """Scan ``models`` (paths; None or [] = the bundled demo models); write outputs into ``out``.

    Returns the verdicts in input order. ``echo`` receives one line per model as it finishes. ``probe``,
    ``spread``, ``ball`` and ``terd``: more inversions per model (:func:`pdjax.defense.detection.scan_model`);
    ``ball`` and ``terd`` need a detector with the rule's threshold. ``refine``: re-choose a flagged model's
    evidence trigger (:func:`pdjax.defense.detection.refine_evidence`).
    """
    from pdjax.model import load

    # Every input is checked before the first model is scanned (a bad second model must not cost the
    # first one's scan) and before ``out`` is created.
    det = Detector.load(detector)
    _check_configs(config, probe, spread, ball, terd)
    _check_rules(det, ball=ball, terd=terd)
    if models:
        items = [(Path(m), {}) for m in models]
    else:
        items = demo_models()
    loaded = [load(path) for path, _ in items]
    out = _writable(Path(out))
    verdicts, entries = [], []
    t_start = time.perf_counter()
    for i, ((path, info), model) in enumerate(zip(items, loaded)):
        name = path.name if not models else str(path)
        key = model_key(seed, model)
        v = scan_model(model, name, key, det, config, n, progress=progress, probe=probe,
                       spread=spread, ball=ball, terd=terd)
        v = _refined(model, v, key, det) if refine else v
        save_verdict_files(v, out / _safe(path.name if not models else f"{i:03d}_{path.name}"),
                           model.config.sample_size)
        entry = v.to_dict()
        if info:
            entry["demo_label"] = info.get("label")
        entries.append(entry)
        verdicts.append(v)
        label = f" [demo label: {info['label']}]" if info else ""
        echo(f"{name}: {entry['verdict'].upper()} (score {v.score:+.2f}; {v.reason}; {v.seconds:.0f} s){label}")
    settings = {"seed": seed, "inversion": config.resolved().to_dict(), **_extra_settings(probe, spread, ball, terd),
                "samples": n,
                "detector": det.to_dict(), "backend": jax.default_backend(),
                "pdjax_version": _version(), "seconds": time.perf_counter() - t_start}
    (out / "scan.json").write_text(json.dumps({"settings": settings, "models": entries}, indent=2))
    _report(verdicts, out / "report.html", settings)
    return verdicts


def collect_models(sources: list[str]) -> list[Path]:
    """Model folders from ``sources``: folders holding models (searched one level deep), model folders
    themselves (``pdjax.json`` or a diffusers ``config.json``), or text files listing one path per line."""
    def is_model(p: Path) -> bool:
        return (p / "pdjax.json").is_file() or (p / "config.json").is_file()

    found: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_file():
            try:
                lines = [ln.strip() for ln in p.read_text().splitlines()]
            except UnicodeDecodeError:
                raise ConfigError(f"{src} is a file but not a text list of model paths; pass model folders "
                                  "or a text file with one path per line") from None
            found += [Path(ln) for ln in lines if ln and not ln.startswith("#")]
        elif is_model(p):
            found.append(p)
        elif p.is_dir():
            found += sorted(q for q in p.iterdir() if q.is_dir() and is_model(q))
        else:
            raise ConfigError(f"{src} is neither a model folder, a folder of models nor a list file; pass "
                              "pdjax checkpoints / diffusers folders, a folder holding them, or a text file of paths")
    if not found:
        raise ConfigError(f"no models found in {', '.join(map(str, sources))}")
    seen, unique = set(), []
    for p in found:
        if str(p) not in seen:
            seen.add(str(p))
            unique.append(p)
    return unique


def model_fingerprint(model) -> int:
    """A 31-bit checksum of what a model computes: crc32 over its UNet and schedule configs and its weights
    (as float32, in the params tree's leaf order). The same model gives the same number wherever its files
    lie, whatever their name or storage dtype."""
    import zlib

    h = zlib.crc32(repr((model.config, model.schedule_config)).encode())
    for leaf in jax.tree_util.tree_leaves(model.params):
        h = zlib.crc32(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes(), h)
    return h & 0x7FFFFFFF


def model_key(seed: int, model) -> jax.Array:
    """The key a scan, an audit and a calibration give ``model``: ``fold_in(key(seed), model_fingerprint(model))``.
    A model's verdict therefore depends on the seed and the model only: not on its path, its place in the
    list, the grouping into stacks or the number of devices."""
    return jax.random.fold_in(jax.random.key(seed), model_fingerprint(model))


def audit(sources: list[str], out: str | Path, seed: int = 0, detector: str | None = None,
          config: InversionConfig = SCAN_INVERSION, n: int = SCAN_SAMPLES, stack: int = 0,
          progress: bool = True, echo=print, probe: InversionConfig | None = None,
          spread: InversionConfig | None = None, ball: InversionConfig | None = None,
          terd: InversionConfig | None = None, refine: bool = True) -> list[dict]:
    """Audit many models (see the module docstring); returns the JSONL entries of this run. ``probe``,
    ``spread``, ``ball``, ``terd``, ``refine``: as in :func:`scan` (``refine`` is on by default here: the audit
    is the thorough pass whose evidence feeds removal; the scan is the quick one)."""
    from pdjax.defense.detection import scan_stack
    from pdjax.model import load

    det = Detector.load(detector)
    _check_configs(config, probe, spread, ball, terd)
    _check_rules(det, ball=ball, terd=terd)
    paths = collect_models(sources)
    results = Path(out) / "audit.jsonl"
    done, kept, cut = set(), [], False
    if results.is_file():
        text = results.read_text()
        lines = text.splitlines()
        for line in lines:
            try:
                done.add(json.loads(line)["model"])
                kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill: that model is redone
        cut = len(kept) != len(lines) or not text.endswith("\n")
    todo = [p for p in paths if str(p) not in done]
    loaded = [(p, load(p)) for p in todo]  # every model is checked before out/ is touched
    out = _writable(Path(out))
    if cut:
        tmp = results.with_suffix(".jsonl.tmp")  # drop cut lines before appending (atomic)
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, results)
    echo(f"{len(paths)} model(s), {len(paths) - len(todo)} already audited in {results}, {len(todo)} to go")
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("models",)) if len(devices) > 1 else None
    per = stack or len(devices)
    per = -(-per // len(devices)) * len(devices)  # a multiple of the device count
    groups: dict = {}
    for p, m in loaded:
        groups.setdefault((m.config, m.schedule_config), []).append((p, m))
    entries = []
    for members in groups.values():
        for lo in range(0, len(members), per):
            chunk = members[lo:lo + per]
            padded = chunk + [chunk[-1]] * (per - len(chunk))  # pad: the copies' results are dropped
            keys = [model_key(seed, m) for _, m in chunk]  # one pass over each model's weights
            keys = jnp.stack(keys + [keys[-1]] * (per - len(chunk)))
            verdicts = scan_stack([m for _, m in padded], [str(p) for p, _ in padded], keys, det, config, n,
                                  mesh=mesh, progress=progress, probe=probe, spread=spread,
                                  ball=ball, terd=terd)[:len(chunk)]
            if refine:  # model by model, after the padding copies are dropped
                verdicts = [_refined(m, v, k, det) for (_, m), v, k in zip(chunk, verdicts, keys)]
            with results.open("a") as f:
                for (p, m), v in zip(chunk, verdicts):
                    entry = write_evidence(out, p, v, m.config.sample_size, seed)
                    f.write(json.dumps(entry) + "\n")
                    f.flush()
                    entries.append(entry)
                    echo(f"{p}: {entry['verdict'].upper()} (score {v.score:+.2f}; {v.reason})")
    _audit_report(out, det)
    return entries


def _refined(model, v: ModelVerdict, key, det: Detector) -> ModelVerdict:
    """:func:`pdjax.defense.detection.refine_evidence`, its time added to the verdict's seconds."""
    from pdjax.defense.detection import refine_evidence

    t0 = time.perf_counter()
    r = refine_evidence(model, v, key, det)
    return dataclasses.replace(r, seconds=v.seconds + time.perf_counter() - t0)


def write_evidence(out: Path, path: Path, v: ModelVerdict, size: int, seed: int) -> dict:
    """Write one verdict's evidence folder (``out/evidence/<name>-<hash>``: the files of
    :func:`save_verdict_files` and generations.npz) and return its audit.jsonl entry."""
    folder = out / "evidence" / _safe(f"{zlib_name(Path(path))}")
    save_verdict_files(v, folder, size)
    np.savez_compressed(folder / "generations.npz", triggered=v.triggered, clean=v.clean,
                        losses=v.losses, likely_target=v.likely_target)
    return {**v.to_dict(), "evidence": str(folder.relative_to(out)), "seed": seed}


def load_verdict(out: str | Path, entry: dict) -> ModelVerdict | None:
    """The :class:`ModelVerdict` of one audit.jsonl ``entry``, rebuilt from its evidence folder under ``out``
    (with every rule's trigger where ``rules/`` was kept); None when the folder has no generations.npz."""
    folder = Path(out) / entry["evidence"]
    if not (folder / "generations.npz").is_file():
        return None
    g = np.load(folder / "generations.npz")
    rules = {q.stem: np.load(q) for q in sorted((folder / "rules").glob("*.npy"))}
    return ModelVerdict(entry["model"], entry["backdoored"], entry["score"], entry["reason"], entry["features"],
                        np.load(folder / "trigger.npy"), g["likely_target"], g["triggered"], g["clean"],
                        g["losses"], entry["method"], entry["seconds"], entry["detector"],
                        entry.get("start", "ddpm"), entry.get("candidate", "main"), rules,
                        entry.get("evidence_scale", 1.0), entry.get("scan_start"))


def zlib_name(p: Path) -> str:
    """An evidence folder name for a model path: its name plus a short hash of the full path."""
    import zlib

    return f"{p.name}-{zlib.crc32(str(p).encode()):08x}"


def read_audit(out: str | Path) -> list[dict]:
    """The entries of ``out/audit.jsonl`` (one per audited model; blank lines skipped)."""
    return [json.loads(line) for line in (Path(out) / "audit.jsonl").read_text().splitlines() if line.strip()]


def audit_entry(out: str | Path, model: str | Path) -> dict:
    """The entry of ``model`` in ``out/audit.jsonl``: the one whose recorded path is the same folder, else the one
    whose folder has the same name. A missing audit, a model it does not hold or a name two entries share raise
    :class:`ConfigError`."""
    out, model = Path(out), Path(model)
    if not (out / "audit.jsonl").is_file():
        raise ConfigError(f"{out / 'audit.jsonl'} not found: pass the --out folder of a `pdjax audit` run")
    entries = read_audit(out)
    same = [e for e in entries if Path(e["model"]).resolve() == model.resolve()]
    named = same or [e for e in entries if Path(e["model"]).name == model.name]
    if len(named) != 1:
        raise ConfigError(f"{out / 'audit.jsonl'} holds {'no' if not named else len(named)} entries for "
                          f"{model.name}" + ("" if not named else ": pass the model's path as it was audited"))
    return named[0]


def removal_rule(entry: dict) -> str | None:
    """The rule whose trigger ``pdjax clean --audit`` removes with when no ``--rule`` is given: ``"probe"`` when the
    audit's evidence is the TERD rule's trigger and the probe rule flagged the model too, else None (the evidence).

    Where both flag (every VillanDiffusion ODE model so far), removal with TERD's trigger moved the clean
    generations far more (clean-sample MSE 0.11-0.43) than removal with the probe's (0.04-0.10), both to ASR 0:
    three models seen after the fact, then two built blind for this rule. Two earlier models where the rule also
    applies go the other way (a VillanDiffusion SDE model, 0.03 -> 0.14 at ASR 0 both; a TrojDiff patch model
    that neither trigger removes): experiments/results/removal_table.md, "ho13"."""
    thr = entry.get("detector", {}).get("probe_threshold")
    x = entry.get("features", {}).get(PROBE_FEATURE)
    if entry.get("candidate") == "terd" and thr is not None and x is not None and x < thr:
        return "probe"
    return None


def evidence_path(out: str | Path, entry: dict, rule: str | None = None) -> Path:
    """The file of the trigger an audit kept for ``entry``: its evidence (``evidence/<model>/trigger.npy``, the
    deciding rule's trigger, refined), or with ``rule`` that rule's own trigger (``rules/<rule>.npy``); a missing
    file raises :class:`ConfigError`."""
    path = Path(out) / entry["evidence"] / ("trigger.npy" if rule is None else f"rules/{rule}.npy")
    if not path.is_file():
        raise ConfigError(f"{path} not found: the audit kept no {rule or 'evidence'} trigger for {entry['model']}")
    return path


def evidence_trigger(out: str | Path, entry: dict, rule: str | None = None) -> np.ndarray:
    """[H, W, C] the trigger of :func:`evidence_path`."""
    return np.load(evidence_path(out, entry, rule))


def _audit_report(out: Path, det: Detector) -> None:
    """report.html over every model in audit.jsonl, rebuilt from the saved evidence."""
    rows = read_audit(out)
    verdicts = [v for v in (load_verdict(out, r) for r in rows) if v is not None]
    _report(verdicts, out / "report.html", {"audit": str(out / "audit.jsonl"), "models": len(rows),
                                            "detector": det.to_dict()})


def _report(verdicts, path: Path, settings: dict) -> None:
    from pdjax.report import write_report

    write_report(verdicts, path, settings)


def calibrate_models(clean: list[str], backdoored: list[str], out: str | Path, seed: int = 0,
                     config: InversionConfig = SCAN_INVERSION, n: int = SCAN_SAMPLES, feature: str = "log_uni_ratio",
                     progress: bool = True, echo=print, probe: InversionConfig | None = None,
                     spread: InversionConfig | None = None, ball: InversionConfig | None = None,
                     terd: InversionConfig | None = None) -> Detector:
    """Fit a detector on labelled reference models (SPEC 5) and save it to ``out`` (JSON).

    Every reference model is scanned exactly as ``pdjax scan`` would (same inversion settings and sample
    count and key, :func:`model_key`); the features and labels are stored in the file's meta.
    """
    from pdjax.defense.detection import CLEAN_RULES, FEATURES, calibrate, check_probe_references
    from pdjax.errors import UnknownNameError
    from pdjax.model import load
    from pdjax.paths import check_out_file

    # Every input is checked before the first (minutes-long) scan.
    if not clean or not backdoored:
        raise ConfigError("calibration needs at least one --clean and one --backdoored reference model")
    if feature not in FEATURES:
        raise UnknownNameError("detection feature", feature, FEATURES)
    _check_configs(config, probe, spread, ball, terd)
    for rule, c in (("probe", probe), ("ball", ball), ("terd", terd)):
        if c is not None:
            check_probe_references(len(clean), RULE_FLAGS[rule])
    check_out_file(out)
    paths = [(p, False) for p in clean] + [(p, True) for p in backdoored]
    models = [load(p) for p, _ in paths]
    feats, labels = [], []
    # scan_model needs a rule; its verdict is ignored here. With a probe, a probe threshold (one that never
    # fires) makes the scan report the probe's features beside the main ones, for calibrate's probe threshold.
    placeholder = Detector(probe_threshold=-math.inf) if probe else Detector()
    for (p, label), model in zip(paths, models):
        v = scan_model(model, str(p), model_key(seed, model), placeholder, config, n, progress=progress,
                       probe=probe, spread=spread, ball=ball, terd=terd)
        feats.append(v.features)
        labels.append(label)
        extra = "".join(f", {k} = {v.features[k]:.4g}" for k, _ in CLEAN_RULES.values() if k in v.features)
        echo(f"{p}: {'backdoored' if label else 'clean'} reference, {feature} = {v.features[feature]:.4g}{extra}")
    det = calibrate(feats, labels, feature, meta={
        "reference_models": [str(p) for p, _ in paths], "seed": seed, "samples": n,
        "inversion": config.resolved().to_dict(), **_extra_settings(probe, spread, ball, terd), "features": feats,
        "pdjax_version": _version()})
    det.save(out)
    extra = "".join(f", {rule} threshold {getattr(det, f'{rule}_threshold'):.4g}" for rule in CLEAN_RULES
                    if getattr(det, f"{rule}_threshold") is not None)
    echo(f"detector: {feature} threshold {det.threshold:.4g} (sign {det.sign:+d}){extra}, "
         f"training accuracy {det.meta['train_accuracy']:.2f} on {len(paths)} models -> {out}")
    return det


def _check_configs(*configs: InversionConfig | None) -> None:
    """Validate the scan's inversion settings (and the extra inversions') before any model is loaded."""
    for c in configs:
        if c is not None:
            c.resolved()


def _extra_settings(probe: InversionConfig | None, spread: InversionConfig | None,
                    ball: InversionConfig | None = None, terd: InversionConfig | None = None) -> dict:
    """The probe's, the spread candidate's, the ball probe's and the TERD probe's settings for scan.json / a
    detector's meta (those that ran)."""
    return {name: c.resolved().to_dict()
            for name, c in (("probe", probe), ("spread", spread), ("ball", ball), ("terd", terd)) if c is not None}


def _check_rules(det: Detector, **extra: InversionConfig | None) -> None:
    """A ConfigError when the ball or TERD probe (``ball=``, ``terd=``) would run under a detector that has no
    threshold for it."""
    for rule, c in extra.items():
        if c is not None and getattr(det, f"{rule}_threshold") is None:
            flag = RULE_FLAGS[rule]
            raise ConfigError(f"this detector has no {rule} threshold; fit one with `pdjax calibrate {flag}` "
                              f"(>= 3 clean models) or drop {flag}")


def _version() -> str:
    from pdjax import __version__

    return __version__

"""The ``pdjax`` command: parses arguments and calls one library function per subcommand.

User mistakes (a :class:`~pdjax.errors.PdjaxError`) print one line ``error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pdjax.errors import OutputError, PdjaxError
from pdjax.paths import check_out_dir, check_out_file

DEFAULT_TRAIN_OUT = "runs/digits-ddpm"


def _key(seed: int):
    import jax

    return jax.random.key(seed)


def _load_trigger(path: str | None, shape):
    if path is None:
        return None
    from pdjax.images import load_image

    if str(path).lower().endswith(".npy"):  # a tensor is taken as is: it must already have the model's shape
        g = load_image(path)
        if tuple(g.shape) != tuple(shape):
            raise PdjaxError(f"trigger {path} has shape {tuple(g.shape)}, the model needs {tuple(shape)}; "
                             "save the tensor at the model's size or pass a PNG to have it resized")
        return g
    return load_image(path, size=shape[0], channels=shape[2])


def _new_model(args):
    """A freshly initialised model of preset ``--preset`` at ``--size`` / ``--channels``."""
    import dataclasses

    import jax

    from pdjax.errors import UnknownNameError
    from pdjax.model import new_model
    from pdjax.models.config import PRESETS

    if args.preset not in PRESETS:
        raise UnknownNameError("model preset", args.preset, PRESETS)
    cfg = dataclasses.replace(PRESETS[args.preset], sample_size=args.size, in_channels=args.channels,
                              out_channels=args.channels)
    return new_model(cfg, jax.random.fold_in(_key(args.seed), 1))


def cmd_convert(args) -> int:
    from pdjax import checkpoint
    from pdjax.model import load

    if checkpoint.is_checkpoint(args.src):
        raise PdjaxError(f"{args.src} is already a pdjax checkpoint; use `pdjax export` to write diffusers format")
    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        raise PdjaxError(f"{dst} is a file; pass a folder path for the checkpoint")
    if dst.is_dir() and any(dst.iterdir()) and not args.force:
        raise PdjaxError(f"{args.dst} exists and is not empty; pass --force to add a new version to it")
    model = load(args.src)
    path = model.save(args.dst)
    print(f"converted {args.src} -> {path} ({model.num_params:,} parameters, schedule {model.schedule_config.kind})")
    return 0


def cmd_export(args) -> int:
    from pdjax.model import load

    model = load(args.src)
    path = model.export_diffusers(args.dst)
    print(f"exported {args.src} -> {path} (diffusers UNet2DModel + scheduler_config.json)")
    return 0


def cmd_train(args) -> int:
    import jax

    from pdjax.data import load_dataset
    from pdjax.generate import generate
    from pdjax.images import display_scale, save_grid
    from pdjax.model import load
    from pdjax.train import TrainConfig, train

    if args.init:
        model = load(args.init)
        size, channels = model.config.sample_size, model.config.in_channels
        data = load_dataset(args.data, size, channels)
    else:
        data = load_dataset(args.data, args.size, args.channels)  # fail fast on a bad --data, before compiling
        check_out_dir(args.out)  # and on an unwritable --out (fit checks again; the init compile comes first)
        model = _new_model(args)
        size, channels = args.size, args.channels
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup,
                      seed=args.seed, steps_per_call=args.steps_per_call, checkpoint_every=args.checkpoint_every)
    print(f"training {model.num_params:,}-parameter UNet on {args.data} ({len(data)} images, {size}x{size}x{channels}) "
          f"for {cfg.steps} steps -> {args.out}", flush=True)
    result = train(model, data, cfg, out=args.out, meta={"data": args.data, "seed": args.seed}, progress=not args.quiet)
    last = result.losses[-100:].mean() if len(result.losses) else float("nan")
    print(f"trained {result.steps} steps in {result.seconds:.0f} s (resumed from step {result.resumed_from}); "
          f"final loss {last:.4f}; checkpoint {Path(args.out).absolute()}")
    if args.samples:
        grid = Path(args.grid or Path(args.out) / "samples.png")
        images = generate(result.model, jax.random.fold_in(_key(args.seed), 2), args.samples,
                          sampler=args.sampler, num_steps=args.sample_steps)
        save_grid(images, grid, scale=display_scale(images.shape[1]))
        print(f"wrote {args.samples} samples ({args.sampler}) to {grid.absolute()}")
    return 0


def cmd_sample(args) -> int:
    import numpy as np

    from pdjax.generate import generate
    from pdjax.images import display_scale, save_grid
    from pdjax.model import load

    model = load(args.model)
    trigger = _load_trigger(args.trigger, model.image_shape)
    check_out_file(args.out, "--out")
    if args.npy:
        check_out_file(args.npy, "--npy")
    images = generate(model, _key(args.seed), args.n, trigger=trigger, sampler=args.sampler, num_steps=args.steps)
    save_grid(images, args.out, scale=display_scale(images.shape[1]))
    if args.npy:
        try:
            Path(args.npy).parent.mkdir(parents=True, exist_ok=True)
            np.save(args.npy, images)
        except OSError as e:
            raise OutputError(f"cannot write {args.npy} ({e.strerror or e}); choose a writable --npy") from None
    print(f"wrote {args.n} samples to {Path(args.out).absolute()}" + (f" (trigger {args.trigger})" if trigger is not None else ""))
    return 0


def _attack_spec_args(args) -> dict:
    return {k: getattr(args, k) for k in ("kind", "trigger", "target", "poison_rate", "psi", "solver", "gamma", "mode",
                                        "blank_fraction")
            if getattr(args, k, None) is not None}


def _model_and_spec(args):
    """(model, AttackSpec) for ``args.model``: its recorded attack with the command line's overrides."""
    from pdjax.backdoor.train import spec_from_model
    from pdjax.model import load

    model = load(args.model)
    overrides = _attack_spec_args(args)
    if "trigger" not in overrides and "attack" not in model.meta:
        raise PdjaxError(f"{args.model} records no attack; pass --trigger and --target (the known backdoor)")
    return model, spec_from_model(model, **overrides)


def cmd_attack(args) -> int:
    from pdjax.backdoor.attacks import AttackSpec
    from pdjax.backdoor.train import attack
    from pdjax.data import load_dataset, load_digits_with_labels
    from pdjax.model import load
    from pdjax.train import TrainConfig

    from pdjax.backdoor.train import build_arrays

    model = None if args.model == "scratch" else load(args.model)
    size, channels = (args.size, args.channels) if model is None else (model.config.sample_size,
                                                                        model.config.in_channels)
    labels = None
    if args.data == "digits":
        data, labels = load_digits_with_labels(size, channels)
    else:
        data = load_dataset(args.data, size, channels)
    spec_args = _attack_spec_args(args)
    spec_args.setdefault("trigger", f"BOX_{max(3, round(14 * size / 32))}")  # BOX_14 at 32x32, scaled
    spec = AttackSpec(**spec_args)
    build_arrays(spec, (size, size, channels), data, labels)  # unknown trigger/target names, bad files
    check_out_dir(args.out)
    if model is None:
        model = _new_model(args)  # compiles the UNet init: only once every input is known to be good
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup, seed=args.seed,
                      steps_per_call=args.steps_per_call, checkpoint_every=args.checkpoint_every)
    print(f"{spec.kind} backdoor ({spec.trigger} -> {spec.target}, poison rate {spec.poison_rate}) on "
          f"{args.model}: {cfg.steps} steps -> {args.out}", flush=True)
    result = attack(model, data, spec, cfg, out=args.out, labels=labels,
                    meta={"data": args.data, "seed": args.seed, "base": args.model}, progress=not args.quiet)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s (resumed from step {result.resumed_from}); "
          f"checkpoint {Path(args.out).absolute()}")
    return 0


def cmd_evaluate(args) -> int:
    from pdjax.backdoor.train import evaluate
    from pdjax.data import load_digits_with_labels
    from pdjax.images import display_scale, save_grid

    model, spec = _model_and_spec(args)
    check_out_dir(args.out)
    data = labels = None
    if spec.target.startswith(("class:", "letter:")):
        data, labels = load_digits_with_labels(model.config.sample_size, model.config.in_channels)
    res, clean, trig = evaluate(model, spec, _key(args.seed), n=args.n, seed=args.seed, labels=labels, data=data)
    rule = res.triggered.get("asr_rule", f"MSE < {res.triggered['threshold']}")
    print(f"{'generations':<12} {'MSE':>8} {'ASR':>6} {'SSIM':>6}   (n={args.n}, seed={args.seed}, ASR rule: {rule})")
    for name, m in (("clean", res.clean), ("triggered", res.triggered)):
        print(f"{name:<12} {m.get('mse', m.get('mse_to_class_mean')):>8.4f} {m['asr']:>6.2f} {m['ssim']:>6.3f}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"model": str(args.model), **res.to_dict()}, indent=2))
    except OSError as e:
        raise PdjaxError(f"cannot write {out} ({e.strerror}); choose a writable --out") from None
    scale = display_scale(model.config.sample_size)
    save_grid(clean[:64], out / "clean.png", scale=scale)
    save_grid(trig[:64], out / "triggered.png", scale=scale)
    print(f"wrote {out / 'metrics.json'}, clean.png, triggered.png")
    return 0


def cmd_shift(args) -> int:
    from pdjax.backdoor.train import spec_from_model
    from pdjax.defense.shift import estimate_lambda
    from pdjax.model import load

    model = load(args.surrogate)
    if args.trigger is None and "attack" not in model.meta:
        raise PdjaxError(f"{args.surrogate} records no attack; pass --trigger (the trigger it was backdoored with)")
    spec = spec_from_model(model, trigger=args.trigger)
    check_out_file(args.out)
    print(f"estimating lambda_t on {args.surrogate} ({spec.kind}, trigger {spec.trigger}): n={args.n}, "
          f"{args.steps} steps, seed {args.seed}", flush=True)
    table = estimate_lambda(model, spec, args.seed, n=args.n, num_steps=args.steps, source=str(args.surrogate))
    path = table.save(args.out)
    print(f"{table.summary()}; wrote {path.absolute()}")
    return 0


def cmd_invert(args) -> int:
    import dataclasses

    import numpy as np

    from pdjax.defense.inversion import InversionConfig, invert
    from pdjax.model import load

    from pdjax.defense.inversion import METHODS
    from pdjax.errors import UnknownNameError

    if args.method not in (*METHODS, TROJDIFF_METHOD):  # before loading the model
        raise UnknownNameError("inversion method", args.method, (*METHODS, TROJDIFF_METHOD))
    model = load(args.model)
    if args.method == TROJDIFF_METHOD:
        return _invert_trojdiff(model, args)
    fields = {f.name for f in dataclasses.fields(InversionConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    cfg = InversionConfig(**given)
    dataclasses.replace(cfg, method=args.method).resolved()  # unknown method / norm / init: before --out
    check_out_dir(args.out)
    res = invert(model, args.method, _key(args.seed), cfg, progress=not args.quiet)
    out = res.save(args.out)
    summary = res.to_dict()
    line = (f"{args.method} on {args.model}: {len(res.losses)} steps in {res.seconds:.1f} s, final loss "
            f"{res.losses[-1]:.4g}, trigger mean {res.trigger.mean():+.3f}, norm {np.linalg.norm(res.trigger):.2f}"
            + (f", size x{res.scale:g}" if res.scale_scores else "")
            + (f", start {res.start}" if len(res.start_scores) > 1 else ""))
    if args.samples:
        from pdjax.defense.evaluate import Start, generation_stats, triggered_generations
        from pdjax.images import display_scale, save_grid

        gens = triggered_generations(model, np.stack([res.trigger, np.zeros_like(res.trigger)]),
                                     _key(args.seed + 1), n=args.samples, start=Start.parse(res.start))
        stats = {"triggered": generation_stats(gens[0]), "clean": generation_stats(gens[1])}
        summary["generations"] = {**stats, "seed": args.seed + 1, "start": res.start}
        scale = display_scale(model.config.sample_size)
        save_grid(gens[0][:64], out / "triggered.png", scale=scale)
        save_grid(gens[1][:64], out / "clean.png", scale=scale)
        (out / "inversion.json").write_text(json.dumps(summary, indent=2))
        line += (f"; uniformity of {args.samples} generations: triggered {stats['triggered']['uniformity']:.2f}, "
                 f"clean {stats['clean']['uniformity']:.2f}")
    print(line)
    print(f"wrote {out / 'trigger.npy'}, trigger.png, inversion.json" + (", triggered.png, clean.png" if args.samples else ""))
    return 0


TROJDIFF_METHOD = "trojdiff"  # pdjax invert --method trojdiff: the TrojDiff-form search (pdjax.defense.trojan)


def _invert_trojdiff(model, args) -> int:
    """``pdjax invert --method trojdiff``: estimate TrojDiff's (mu, gamma), a blend or a patch; writes mu as
    trigger.npy."""
    import dataclasses

    import numpy as np

    from pdjax.defense.trojan import PatchConfig, TrojanConfig, invert_trojan

    given = {k: getattr(args, k) for k in ("steps", "lr", "batch") if getattr(args, k) is not None}
    if args.gammas:
        given["gammas"] = tuple(args.gammas)
    if args.factors:
        given["factors"] = tuple(args.factors)
    patch = None if args.no_patch else dataclasses.replace(
        PatchConfig(), **{k: v for k, v in given.items() if k in ("steps", "lr", "batch")})
    cfg = TrojanConfig(**given, patch=patch).resolved()
    from pdjax.removal import load_delta

    ball = load_delta(args.ball, model.image_shape) if args.ball else None  # raw values, the model's shape
    check_out_dir(args.out)
    res = invert_trojan(model, _key(args.seed), cfg, ball=ball, progress=not args.quiet)
    res.save(args.out)
    ratios = ", ".join(f"{g:g}: {r:.3f}" for g, r in res.ratios.items())
    if res.patch_search:
        ratios += f"; patch {res.patch_search['size']}x{res.patch_search['size']} at " \
                  f"{tuple(res.patch_search['corner'])}, gamma {res.patch_search['gamma']:g}: {res.patch_search['ratio']:.3f}"
    form = f"patch at {tuple(res.patch['corner'])}, " if res.patch else ""
    print(f"trojdiff on {args.model}: {form}gamma {res.gamma:g}, L_troj ratio {res.ratio:.3f} (~1 on a clean model; "
          f"every form: {ratios}), trigger mu norm {np.linalg.norm(res.trigger):.2f}, {res.seconds:.1f} s")
    noise_patch = f" --noise-patch {res.patch['corner'][0]} {res.patch['corner'][1]} {res.patch['size']}" if res.patch else ""
    start = "the patch's noise scale (gamma inside, 1 outside)" if res.patch else "gamma"
    print(f"wrote {Path(args.out) / 'trigger.npy'} (the start is {start} times eps + trigger), trigger.png, ball.npy, "
          f"inversion.json; to remove the backdoor: pdjax clean {args.model} --trigger {Path(args.out) / 'trigger.npy'} "
          f"--shift trojdiff --noise-scale-min 0.1 --noise-scale-max 0.6{noise_patch} --reference untriggered --out DIR")
    return 0


def _training_data(model, name: str):
    """(images, labels) of ``--data`` at the model's size; labels only for the bundled digits."""
    from pdjax.data import load_dataset, load_digits_with_labels

    size, channels = model.config.sample_size, model.config.in_channels
    if name == "digits":
        return load_digits_with_labels(size, channels)
    return load_dataset(name, size, channels), None


def _reinforce_config(args):
    """ReinforceConfig from --reinforce-stages "S:STEPS:LR,...", --reinforce-batch and --reinforce-remat (defaults:
    the module's)."""
    from pdjax.reinforce import ReinforceConfig, parse_stages

    kw = {"batch": args.reinforce_batch} if args.reinforce_batch is not None else {}
    if args.reinforce_remat:
        kw["remat"] = True
    if args.reinforce_stages:
        kw["stages"] = parse_stages(args.reinforce_stages)
    return ReinforceConfig(**kw)


def cmd_amplify(args) -> int:
    import dataclasses

    from pdjax.amplify import AmplifyConfig, amplify

    model, spec = _model_and_spec(args)
    data, labels = _training_data(model, args.data)
    from pdjax.backdoor.train import build_arrays

    build_arrays(spec, model.image_shape, data, labels)  # unknown trigger/target names, bad files: before out/
    inv = {k: v for k, v in (("method", args.inv_method), ("steps", args.inv_steps), ("K", args.K),
                              ("batch", args.inv_batch)) if v is not None}
    cfg = AmplifyConfig(steps=args.steps, eval_every=args.eval_every, n=args.n, alpha=args.alpha,
                        inversion=dataclasses.replace(AmplifyConfig().inversion, **inv), seed=args.seed, lr=args.lr,
                        warmup_steps=args.warmup, batch=args.batch, full_frame=not args.keep_background,
                        plain_steps=args.plain_steps, keep_models=args.keep_models, reinforce=args.reinforce,
                        target_reinforce=_reinforce_config(args),
                        train_trigger="unclipped" if args.train_unclipped else "clipped")
    cfg.inversion.resolved()  # unknown --inv-method: before out/ is written
    how = "invert from the trigger" if cfg.reinforce == "shift" else "reinforce the trigger towards the target"
    print(f"amplifying {args.model} ({spec.kind}, {spec.trigger} -> {spec.target}): {how}, then "
          f"{cfg.steps} steps per arm" + (f" (plain arm {cfg.plain_steps})" if cfg.plain_steps else "")
          + f", ASR every {cfg.eval_every} -> {args.out}", flush=True)
    res = amplify(model, data, spec, cfg, out=args.out, progress=not args.quiet, labels=labels)
    print(f"{'step':>6} {'ASR g*':>7} {'ASR g':>7}   (n={cfg.n}, alpha={cfg.alpha})")
    amplified = dict(zip(res.steps, res.asr_amplified))
    for s, b in zip(res.plain_steps, res.asr_plain_all):
        a = f"{amplified[s]:>7.2f}" if s in amplified else f"{'-':>7}"
        print(f"{s:>6} {a} {b:>7.2f}")
    if res.asr_unclipped is not None:
        print(f"g* before clipping (trigger_unclipped.npy), on the starting model with no training: "
              f"ASR {res.asr_unclipped:.2f}")
    reach = res.steps_to()
    if reach["amplified"] == 0:
        print(f"ASR >= {reach['level']:g}: the inverted trigger reaches it with no further training")
    elif reach["ratio"] is not None:
        print(f"ASR >= {reach['level']:g}: amplified after {reach['amplified']} steps, plain "
              + (f"not within {res.plain_steps[-1]}: ratio > {reach['ratio']:.1f}x" if reach["ratio_is_bound"]
                 else f"after {reach['plain']}: ratio {reach['ratio']:.1f}x"))
    for note in res.notes:
        print(f"note: {note}")
    out = Path(args.out)
    print(f"wrote {out / 'amplify.json'}, asr.svg, trigger_star.npy/.png, trigger_unclipped.npy, amplified/"
          + (", amplified-diffusers/" if res.diffusers else ""))
    return 0


def _removal_trigger(args) -> tuple:
    """``pdjax clean``'s trigger file and a phrase naming where it came from."""
    if args.audit is None:
        if args.rule is not None:
            raise PdjaxError("--rule picks one of an audit's triggers: it needs --audit")
        return args.trigger, f"the trigger {args.trigger}"
    from pdjax.audit import audit_entry, evidence_path, removal_rule

    entry = audit_entry(args.audit, args.model)
    if not entry["backdoored"]:
        raise PdjaxError(f"the audit in {args.audit} judged {args.model} clean (score {entry['score']:+.2f}): "
                         "nothing to remove; pass --trigger to remove a trigger anyway")
    rule = args.rule or removal_rule(entry) or "evidence"
    if rule == "evidence":
        return (evidence_path(args.audit, entry),
                f"the evidence ({entry.get('candidate', 'main')} rule's trigger) of the audit in {args.audit}")
    why = "" if args.rule else (" (the evidence is TERD's trigger, but the probe flagged too and its trigger removes "
                                "with less damage; --rule evidence for TERD's)")
    return evidence_path(args.audit, entry, rule), f"the {rule} rule's trigger{why} of the audit in {args.audit}"


def cmd_clean(args) -> int:
    from pdjax.backdoor.attacks import AttackSpec
    from pdjax.backdoor.train import spec_from_model
    from pdjax.model import load
    from pdjax.removal import RemovalConfig, load_delta, remove_backdoor

    model = load(args.model)
    trigger, source = _removal_trigger(args)
    delta = load_delta(trigger, model.image_shape)
    spec = None
    if args.target is not None:
        if "attack" in model.meta:
            spec = spec_from_model(model, kind=args.kind, trigger=args.eval_trigger, target=args.target)
        else:
            spec = AttackSpec(kind=args.kind or "baddiffusion", trigger=args.eval_trigger or trigger,
                              target=args.target)
    data, labels = _training_data(model, args.data)
    if spec is not None:  # the ASR report's trigger/target are only used after training: check them now
        from pdjax.backdoor.train import build_arrays

        build_arrays(spec, model.image_shape, data, labels)
    cfg = RemovalConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup_steps=args.warmup, seed=args.seed,
                        checkpoint_every=args.checkpoint_every, n=args.n, shift=args.shift,
                        noise_scale_min=args.noise_scale_min, noise_scale_max=args.noise_scale_max,
                        reference=args.reference, trigger_scale_min=args.trigger_scale_min,
                        noise_patch=args.noise_patch)
    print(f"removing {source} from {args.model}: {cfg.steps} fine-tuning steps -> {args.out}", flush=True)
    res = remove_backdoor(model, data, delta, cfg, out=args.out, progress=not args.quiet, spec=spec, labels=labels,
                          source=source)
    line = f"cleaned in {res.steps} steps; clean-sample MSE original vs cleaned {res.clean_mse:.4f} (n={cfg.n})"
    if res.asr_before is not None:
        line += (f"; ASR ({spec.trigger} -> {spec.target}) {res.asr_before:.2f} -> {res.asr_after:.2f}, "
                 f"from plain noise {res.clean_asr_before:.2f} -> {res.clean_asr_after:.2f}")
    print(line)
    qb, qa = res.quality_before, res.quality_after
    print(f"clean generations, original -> cleaned: uniformity {qb['uniformity']:.2f} -> {qa['uniformity']:.2f}, "
          f"distance to the nearest training image {qb['nearest']:.4f} -> {qa['nearest']:.4f}")
    if res.clean_damaged:
        print("warning: the cleaned model's clean generations collapsed or left the data (removal.json: "
              "clean_damaged); the trigger may not be the backdoor's: try another audit rule's trigger "
              "(--audit DIR --rule R, or evidence/<model>/rules/) or fewer --steps", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'model'} (pdjax checkpoint) and {Path(args.out) / 'removal.json'}")
    return 0


def _scan_config(args):
    import dataclasses

    from pdjax.defense.detection import SCAN_INVERSION

    changes = {k: v for k, v in (("method", args.method), ("steps", args.steps), ("dtype", args.dtype),
                                 ("remat", args.remat), ("lambda_source", args.lambda_source),
                                 ("starts", args.starts), ("chain", args.chain)) if v is not None}
    return dataclasses.replace(SCAN_INVERSION, **changes)


def _extra_scan_config(base, args, steps: bool):
    """``base`` with the scan's fast-path options (and --steps when ``steps``) applied."""
    import dataclasses

    opts = (("steps", args.steps),) if steps else ()
    opts += (("dtype", args.dtype), ("remat", args.remat))
    return dataclasses.replace(base, **{k: v for k, v in opts if v is not None})


def _scan_probe(args):
    """--final-probe: the scan's second inversion (FINAL_PROBE, with --steps and the fast-path options)."""
    from pdjax.defense.detection import FINAL_PROBE

    return _extra_scan_config(FINAL_PROBE, args, steps=True) if args.final_probe else None


def _scan_spread(args):
    """--spread: the spread candidate (SPREAD_CANDIDATE, with the fast-path options; its own step count), or None."""
    from pdjax.defense.detection import SPREAD_CANDIDATE

    return _extra_scan_config(SPREAD_CANDIDATE, args, steps=False) if args.spread else None


def _scan_ball(args):
    """--ball: the ball probe (BALL_PROBE, with the fast-path options; its own step count), or None."""
    from pdjax.defense.detection import BALL_PROBE

    return _extra_scan_config(BALL_PROBE, args, steps=False) if args.ball else None


def _scan_terd(args):
    """--terd: the TERD probe (TERD_PROBE, with the fast-path options; its own step count), or None."""
    from pdjax.defense.detection import TERD_PROBE

    return _extra_scan_config(TERD_PROBE, args, steps=False) if args.terd else None


def _extra_inversions(args) -> dict:
    """The probe / spread / ball / TERD inversions the options ask for, as keyword arguments of scan / audit."""
    return {"probe": _scan_probe(args), "spread": _scan_spread(args), "ball": _scan_ball(args),
            "terd": _scan_terd(args)}


def cmd_scan(args) -> int:
    from pdjax.audit import scan

    verdicts = scan(args.models, args.out, seed=args.seed, detector=args.detector, config=_scan_config(args),
                    n=args.samples, progress=not args.quiet, refine=args.refine, **_extra_inversions(args))
    flagged = sum(v.backdoored for v in verdicts)
    print(f"{flagged} of {len(verdicts)} model(s) flagged as backdoored; wrote {Path(args.out) / 'scan.json'} "
          f"and {Path(args.out) / 'report.html'}")
    return 0


def _default_rules(args) -> None:
    """audit: --final-probe / --ball / --terd left unset (None) are turned on when the detector file has the
    rule's threshold (the shipped one has all three), so a plain ``pdjax audit DIR`` applies every calibrated rule."""
    from pdjax.defense.detection import RULE_FLAGS, Detector

    flags = {rule: flag[2:].replace("-", "_") for rule, flag in RULE_FLAGS.items()}  # rule -> argparse dest
    if any(getattr(args, a) is None for a in flags.values()):
        det = Detector.load(args.detector)
        for rule, a in flags.items():
            if getattr(args, a) is None:
                setattr(args, a, getattr(det, f"{rule}_threshold") is not None)
    rules = ["main"] + [rule for rule, a in flags.items() if getattr(args, a)]
    if not args.quiet:
        print(f"rules: {', '.join(rules)} (a model is flagged when any fires)")


def cmd_audit(args) -> int:
    import jax

    from pdjax.audit import audit

    if args.distributed:
        jax.distributed.initialize()
    _default_rules(args)
    entries = audit(args.sources, args.out, seed=args.seed, detector=args.detector, config=_scan_config(args),
                    n=args.samples, stack=args.stack, progress=not args.quiet, refine=args.refine,
                    **_extra_inversions(args))
    flagged = sum(e["backdoored"] for e in entries)
    print(f"this run: {len(entries)} model(s) audited, {flagged} flagged; results in {Path(args.out) / 'audit.jsonl'}")
    if flagged:
        print(f"to remove a flagged model's backdoor: pdjax clean MODEL --audit {args.out} --out DIR")
    return 0


def cmd_calibrate(args) -> int:
    from pdjax.audit import calibrate_models

    calibrate_models(args.clean or [], args.backdoored or [], args.out, seed=args.seed, config=_scan_config(args),
                     n=args.samples, feature=args.feature, progress=not args.quiet, **_extra_inversions(args))
    return 0


def _add_scan_options(p, all_rules: bool = False, refine: bool = True) -> None:
    """The scan's options; ``all_rules`` (audit): --final-probe / --ball default to the detector's rules;
    ``refine``: offer --refine (not for calibrate, whose verdicts only give features)."""
    from pdjax.defense.detection import SCAN_SAMPLES, SCAN_SPREAD

    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", help="inversion method (default purediffusion)")
    p.add_argument("--steps", type=int, help="inversion steps (default: the scan's 40)")
    p.add_argument("--samples", type=int, default=SCAN_SAMPLES, help="generations per model and start")
    p.add_argument("--starts", nargs="+", help="size search starts, SAMPLER[@NOISE_SCALE]: ddpm (DDPM from eps + trigger), ddim (DDIM-100), ddim@0.6 (x_T = 0.6 eps + trigger), ... (default ddpm)")
    p.add_argument("--lambda", dest="lambda_source",
                   help="purediffusion's lambda: closed-sde (default) | closed-ode | shipped table name | table path")
    p.add_argument("--chain", choices=("ddpm", "ddim"),
                   help="purediffusion: sampler unrolled for the K steps (default ddpm; ddim = DDIM-100, for ODE-trained models)")
    every_rule = " (default: on when the detector has this rule's threshold, as the shipped one does)"
    flag = {"action": argparse.BooleanOptionalAction, "default": None} if all_rules else {"action": "store_true"}
    p.add_argument("--final-probe", dest="final_probe", **flag,
                   help="also invert by L_final alone (collapse of short DDIM-chain generations, DDPM and DDIM starts); "
                   "a detector with a probe threshold (calibrate --final-probe, >= 3 clean models) flags a model when "
                   "either rule fires, one without decides on whichever trigger collapses the generations more; "
                   "about doubles the scan time" + (every_rule if all_rules else " (pdjax audit: on by default)"))
    p.add_argument("--spread", action=argparse.BooleanOptionalAction, default=SCAN_SPREAD,
                   help="also invert by L_spread alone (the widening of the model's answer that a TrojDiff trigger "
                   "causes) and judge whichever trigger collapses the generations more by the main threshold"
                   f" (default {'on' if SCAN_SPREAD else 'off'})")
    p.add_argument("--ball", **flag,
                   help="also maximise L_spread with the trigger held to a fixed L2 norm (BALL_PROBE) and flag a model "
                   "whose final loss lies below the detector's ball threshold (calibrate --ball fits it on >= 3 clean "
                   "models); sees TrojDiff triggers whose generations do not collapse; about 30 s more per model on CPU"
                   + (every_rule if all_rules else " (pdjax audit: on by default)"))
    p.add_argument("--terd", **flag,
                   help="also invert by TERD at a reduced budget (TERD_PROBE: 500 + 20 steps) and flag a model whose "
                   "TERD trigger's log M_r lies above the detector's TERD threshold (calibrate --terd fits it on >= 3 "
                   "clean models); sees a TrojDiff patch trigger; about 40 s more per model on CPU"
                   + (every_rule if all_rules else " (pdjax audit: on by default)"))
    if refine:
        p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=all_rules,
                       help="re-choose a flagged model's evidence trigger: every flagging rule's trigger at factors "
                       "0.75-1.5, from the verdict's start and DDPM, the one whose 32 generations agree most "
                       "(refine_evidence; the verdict is unchanged); about 55 s more per flagged model on a "
                       "2-core CPU with the main rule alone, 2-7 min with all four (default: on in pdjax audit, off "
                       "in pdjax scan)")
    _add_fast_path_options(p)
    p.add_argument("--quiet", action="store_true")


def _add_fast_path_options(p) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="UNet compute dtype of the inversion (default float32)")
    p.add_argument("--remat", action="store_true", default=None,
                   help="rematerialise each unrolled reverse step (less memory for long chains)")


def _add_attack_options(p, required: bool) -> None:
    p.add_argument("--attack", dest="kind", default="baddiffusion" if required else None,
                   help="baddiffusion | trojdiff | villan")
    p.add_argument("--trigger", help="library name (BOX_14, STOP_SIGN_14, GLASSES; TrojDiff: blend, patch, "
                   "patch@ROW,COL) or PNG/.npy path" + (" (default BOX_n, n = 14 * size / 32)" if required else ""))
    p.add_argument("--target", default="CORNER" if required else None,
                   help="library name (CORNER, HAT, SHOE, CAT, X), PNG/.npy path, class:K (TrojDiff in-d2d) or letter:A..Z (out-d2d)")
    p.add_argument("--poison-rate", type=float, default=0.1 if required else None)
    p.add_argument("--psi", type=float, help="VillanDiffusion psi (default 1)")
    p.add_argument("--solver", choices=("sde", "ode"), help="VillanDiffusion sampler family (default sde)")
    p.add_argument("--gamma", type=float, help="TrojDiff noise scale (blend 0.6, patch 0.1)")
    p.add_argument("--mode", choices=("d2i", "in-d2d", "out-d2d"), help="TrojDiff mode (default d2i)")
    p.add_argument("--blank-fraction", type=float,
                   help="fraction of poisoned rows whose trigger is pasted on a blank -1 canvas instead of a "
                   "training image (baddiffusion/villan; default 0, the reference recipe)")


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line ``error: ...`` (and the --help hint), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdjax", description="Audit diffusion models for backdoors (JAX).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("convert", help="diffusers UNet2DModel folder -> pdjax checkpoint")
    c.add_argument("src", help="diffusers model folder (config.json + weights) or pipeline folder with unet/")
    c.add_argument("dst", help="pdjax checkpoint folder to write")
    c.add_argument("--force", action="store_true", help="write into a non-empty DST")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("export", help="pdjax checkpoint (or diffusers folder) -> diffusers folder")
    e.add_argument("src")
    e.add_argument("dst")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("train", help="train a clean DDPM (default: small UNet on the bundled digits)")
    t.add_argument("--data", default="digits", help="'digits' (bundled), 'cifar10:FOLDER', or an image folder")
    t.add_argument("--preset", default="digits-16", help="architecture preset for a new model")
    t.add_argument("--init", help="fine-tune this checkpoint / diffusers folder instead of a new model")
    t.add_argument("--size", type=int, default=16)
    t.add_argument("--channels", type=int, default=1, choices=(1, 3))
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps-per-call", type=int, default=0, help="0: 1 on CPU, 10 on GPU/TPU")
    t.add_argument("--checkpoint-every", type=int, default=250)
    t.add_argument("--out", default=DEFAULT_TRAIN_OUT, help="checkpoint folder (resumed if it exists)")
    t.add_argument("--samples", type=int, default=36, help="samples to draw after training (0: none)")
    t.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    t.add_argument("--sample-steps", type=int, default=100, help="DDIM steps when --sampler ddim")
    t.add_argument("--grid", help="sample grid PNG (default OUT/samples.png)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples (optionally with a trigger added to the start noise)")
    s.add_argument("model", help="pdjax checkpoint or diffusers folder")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--out", default="samples.png", help="grid PNG to write")
    s.add_argument("--npy", help="also save the samples [N, H, W, C] as .npy")
    s.add_argument("--trigger", help="trigger image (PNG/JPEG) or .npy tensor [H, W, C] in [-1, 1] added to x_T")
    s.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    s.add_argument("--steps", type=int, default=100, help="DDIM steps")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    a = sub.add_parser("attack", help="backdoor a model (fine-tune a checkpoint, or 'scratch')")
    a.add_argument("model", help="pdjax checkpoint / diffusers folder to fine-tune, or 'scratch'")
    _add_attack_options(a, required=True)
    a.add_argument("--data", default="digits")
    a.add_argument("--preset", default="digits-16", help="architecture when MODEL is 'scratch'")
    a.add_argument("--size", type=int, default=16)
    a.add_argument("--channels", type=int, default=1, choices=(1, 3))
    a.add_argument("--steps", type=int, default=1500)
    a.add_argument("--batch", type=int, default=32)
    a.add_argument("--lr", type=float, default=2e-4)
    a.add_argument("--warmup", type=int, default=100)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--steps-per-call", type=int, default=0, help="0: 1 on CPU, 10 on GPU/TPU")
    a.add_argument("--checkpoint-every", type=int, default=250)
    a.add_argument("--out", required=True, help="checkpoint folder (resumed if it exists)")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_attack)

    v = sub.add_parser("evaluate", help="attack metrics (MSE, ASR, SSIM) of clean and triggered generations")
    v.add_argument("model")
    _add_attack_options(v, required=False)
    v.add_argument("--n", type=int, default=64)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default="evaluation", help="folder for metrics.json and sample grids")
    v.set_defaults(func=cmd_evaluate)

    h = sub.add_parser("shift", help="estimate the trigger-shift scale lambda_t on a backdoored surrogate (SPEC 3)")
    h.add_argument("surrogate", help="backdoored pdjax checkpoint / diffusers folder whose trigger is known")
    h.add_argument("--trigger", help="the surrogate's trigger, name or PNG/.npy path (default: from its metadata)")
    h.add_argument("--n", type=int, default=64, help="noise samples per chain")
    h.add_argument("--steps", type=int, default=100, help="first reverse steps to tabulate")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--out", required=True, help="ShiftTable JSON to write")
    h.set_defaults(func=cmd_shift)

    i = sub.add_parser("invert", help="invert the trigger of a model: purediffusion, elijah or terd (SPEC 4)")
    i.add_argument("model", help="pdjax checkpoint or diffusers folder")
    i.add_argument("--method", default="purediffusion",
                   help="purediffusion | elijah | terd | trojdiff (TrojDiff's mu and gamma: ball probe, then L_troj "
                        "for each --gammas; pdjax.defense.trojan)")
    i.add_argument("--out", required=True, help="folder for trigger.npy, trigger.png, inversion.json")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--steps", type=int, help="optimiser steps (default: the method's, SPEC 4)")
    i.add_argument("--lr", type=float)
    i.add_argument("--batch", type=int, help="noise batch B")
    i.add_argument("--init", help="neg-uniform | zeros | normal | alt-uniform (restarts alternate -U[0,1) and +U[0,1))")
    i.add_argument("--K", type=int, help="purediffusion: reverse steps unrolled")
    i.add_argument("--terd-refine-steps", dest="terd_refine_steps", type=int,
                   help="terd: phase-2 steps (default 1000, the paper's; --steps sets phase 1)")
    i.add_argument("--norm", help="purediffusion: l1 | l2")
    i.add_argument("--per-sample", dest="per_sample", action="store_true", default=None,
                   help="purediffusion: per-sample shift residual against the clean chain")
    i.add_argument("--shift-weight", dest="shift_weight", type=float)
    i.add_argument("--cons-weight", dest="cons_weight", type=float, help="purediffusion: weight of L_cons")
    i.add_argument("--final-weight", dest="final_weight", type=float,
                   help="purediffusion: weight of L_final, the collapse of short-DDIM-chain generations (default 0)")
    i.add_argument("--final-steps", dest="final_steps", type=int, help="purediffusion: DDIM steps of L_final's chain")
    i.add_argument("--final-eta", dest="final_eta", type=float,
                   help="purediffusion: eta of L_final's chain (0 deterministic, default; 1 stochastic, DDPM-like)")
    i.add_argument("--final-stat", dest="final_stat", choices=("sq_mean", "uniformity"),
                   help="purediffusion: L_final's spread of the chain ends: mean squared pairwise distance (default) "
                        "or the trimmed mean distance (uniformity)")
    i.add_argument("--spread-weight", dest="spread_weight", type=float,
                   help="purediffusion: weight of L_spread, how much the trigger widens eps_hat's spread at t = T-1 "
                        "(TrojDiff; default 0)")
    i.add_argument("--trojan-weight", dest="trojan_weight", type=float,
                   help="purediffusion: weight of L_troj, eps_hat(gamma eps + trigger) against eps near t = T "
                        "(TrojDiff's training target; default 0)")
    i.add_argument("--trojan-gamma", dest="trojan_gamma", type=float, help="purediffusion: L_troj's gamma (default 0.6)")
    i.add_argument("--gammas", type=float, nargs="+", help="trojdiff: noise scales tried (default 0.6 0.3 0.1)")
    i.add_argument("--factors", type=float, nargs="+",
                   help="trojdiff: starts as multiples of the ball probe's trigger (default 0.5 1)")
    i.add_argument("--no-patch", dest="no_patch", action="store_true",
                   help="trojdiff: skip the patch search (TrojDiff's patch form: gamma 0.1 inside a 3x3 patch at an "
                        "unknown place)")
    i.add_argument("--ball", help="trojdiff: a ball probe trigger (.npy, e.g. an audit's rules/ball.npy) instead of "
                                  "running the probe")
    i.add_argument("--restarts", type=int,
                   help="optimise from this many inits in one program and keep the lowest final loss (default 1)")
    i.add_argument("--max-norm", dest="max_norm", type=float,
                   help="project the trigger onto the L2 ball of this radius after every step (default 0: none)")
    i.add_argument("--cells", type=int, help="optimise the trigger on blocks of CELLS x CELLS pixels (default 1)")
    i.add_argument("--lambda", dest="lambda_source", help="closed-sde | closed-ode | shipped table name | table path")
    i.add_argument("--chain", choices=("ddpm", "ddim"),
                   help="purediffusion: sampler unrolled for the K steps (default ddpm; ddim = DDIM-100, for ODE-trained models)")
    i.add_argument("--scales", type=float, nargs="+",
                   help="size search factors (default: purediffusion 1 1.5 2 2.5 3, others none; 1 = off)")
    i.add_argument("--scale-samples", dest="scale_samples", type=int, help="generations per size-search factor")
    i.add_argument("--starts", nargs="+", help="size search starts, SAMPLER[@NOISE_SCALE]: ddpm (DDPM from eps + trigger), ddim (DDIM-100), ddim@0.6 (x_T = 0.6 eps + trigger), ... (default ddpm)")
    i.add_argument("--samples", type=int, default=0,
                   help="also draw N generations from eps + trigger and eps (DDPM, or the start the search chose)")
    _add_fast_path_options(i)
    i.add_argument("--quiet", action="store_true")
    i.set_defaults(func=cmd_invert)

    sc = sub.add_parser("scan", help="is this model backdoored? verdict, trigger, evidence, HTML report "
                                     "(no MODEL: the bundled demo models)")
    sc.add_argument("models", nargs="*", help="pdjax checkpoints or diffusers folders (default: bundled demo models)")
    sc.add_argument("--out", default="scan-report", help="folder for scan.json, report.html and evidence images")
    sc.add_argument("--detector", help="detector JSON from `pdjax calibrate` (default: the shipped one)")
    _add_scan_options(sc)
    sc.set_defaults(func=cmd_scan)

    au = sub.add_parser("audit", help="audit many models: grouped, stacked, sharded over devices, resumable JSONL")
    au.add_argument("sources", nargs="+", help="folders of models, model folders, or text files listing paths")
    au.add_argument("--out", required=True, help="folder for audit.jsonl, evidence/ and report.html")
    au.add_argument("--detector", help="detector JSON (default: the shipped one)")
    au.add_argument("--stack", type=int, default=0, help="models per program (default: the device count)")
    au.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    _add_scan_options(au, all_rules=True)
    au.set_defaults(func=cmd_audit)

    ca = sub.add_parser("calibrate", help="fit the detection threshold on your own labelled reference models")
    ca.add_argument("--clean", nargs="+", help="clean reference models")
    ca.add_argument("--backdoored", nargs="+", help="backdoored reference models")
    ca.add_argument("--out", required=True, help="detector JSON to write (pass it to scan --detector)")
    ca.add_argument("--feature", default="log_uni_ratio", help="detection feature (default log_uni_ratio)")
    _add_scan_options(ca, refine=False)
    ca.set_defaults(func=cmd_calibrate)

    am = sub.add_parser("amplify", help="red team: invert the learned trigger, train with it, compare ASR (SPEC 6)")
    am.add_argument("model", help="briefly backdoored pdjax checkpoint or diffusers folder")
    _add_attack_options(am, required=False)
    am.add_argument("--data", default="digits")
    am.add_argument("--steps", type=int, default=500, help="extra backdoor-training steps per arm")
    am.add_argument("--plain-steps", dest="plain_steps", type=int, default=0,
                    help="let the plain arm run longer (evaluated at 2x, 4x, ... --steps and here) to find the "
                    "steps it needs for the ASR amplification reached (default: --steps)")
    am.add_argument("--eval-every", dest="eval_every", type=int, default=100, help="ASR evaluation interval")
    am.add_argument("--n", type=int, default=64, help="generations per ASR evaluation")
    am.add_argument("--alpha", type=float, default=1.0, help="g* = alpha g_inv + (1 - alpha) g")
    am.add_argument("--keep-background", dest="keep_background", action="store_true",
                    help="clip g* to [-1, 1] (default [-0.99, 1]: no -1 background pixel, so training pastes "
                    "no training image into g*)")
    am.add_argument("--train-unclipped", dest="train_unclipped", action="store_true",
                    help="train and score the amplified arm with g* before clipping and a full mask (beyond the "
                    "paper; additive triggers with a single target image)")
    am.add_argument("--keep-models", dest="keep_models", action="store_true",
                    help="keep each arm's model at every evaluation point (OUT/<arm>/at/<step>)")
    am.add_argument("--batch", type=int, default=32)
    am.add_argument("--lr", type=float, default=2e-4)
    am.add_argument("--warmup", type=int, default=0)
    am.add_argument("--seed", type=int, default=0)
    am.add_argument("--inv-method", dest="inv_method", help="inversion method (default purediffusion)")
    am.add_argument("--inv-steps", dest="inv_steps", type=int, help="inversion steps (default: the method's)")
    am.add_argument("--inv-batch", dest="inv_batch", type=int, help="inversion noise batch")
    am.add_argument("--K", type=int, help="purediffusion: reverse steps unrolled")
    am.add_argument("--reinforce", choices=("shift", "target"), default="shift",
                    help="how g_inv is found: PureDiffusion's shift-loss inversion (default) or, beyond the paper, "
                    "optimising the trigger so that generations land on the target")
    am.add_argument("--reinforce-stages", dest="reinforce_stages", metavar="CHAIN:STEPS:LR,...",
                    help="--reinforce target: stages of DDIM chain length, Adam steps, learning rate "
                    "(default 20:300:0.02,100:100:0.01)")
    am.add_argument("--reinforce-batch", dest="reinforce_batch", type=int,
                    help="--reinforce target: noises per step (default 16)")
    am.add_argument("--reinforce-remat", dest="reinforce_remat", action="store_true",
                    help="--reinforce target: recompute each chain step's UNet forward in the backward pass, "
                    "keeping only the chain's images (for long chains, e.g. a 1000-step stage)")
    am.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    am.add_argument("--quiet", action="store_true")
    am.set_defaults(func=cmd_amplify)

    cl = sub.add_parser("clean", help="remove a backdoor: fine-tune away the response to an inverted trigger")
    cl.add_argument("model", help="backdoored pdjax checkpoint or diffusers folder")
    src = cl.add_mutually_exclusive_group(required=True)
    src.add_argument("--trigger", help="inverted trigger (.npy from `pdjax invert`, or an image)")
    src.add_argument("--audit", metavar="DIR",
                     help="the --out folder of a `pdjax audit` that flagged MODEL: remove with its evidence trigger, "
                          "or the probe rule's where the evidence is TERD's and the probe flagged too "
                          "(pdjax.audit.removal_rule)")
    cl.add_argument("--rule", choices=("evidence", "main", "probe", "ball", "terd"),
                    help="with --audit: the evidence (evidence/<model>/trigger.npy) or that rule's trigger "
                         "(evidence/<model>/rules/) instead of the default choice")
    cl.add_argument("--target", help="attack target, to report ASR before/after")
    cl.add_argument("--attack", dest="kind",
                    help="attack kind for the ASR report (default: recorded, else baddiffusion)")
    cl.add_argument("--eval-trigger", dest="eval_trigger",
                    help="trigger for the ASR report (default: the recorded one, else --trigger)")
    cl.add_argument("--data", default="digits")
    cl.add_argument("--steps", type=int, default=500)
    cl.add_argument("--batch", type=int, default=32)
    cl.add_argument("--lr", type=float, default=1e-4)
    cl.add_argument("--warmup", type=int, default=0)
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--checkpoint-every", type=int, default=100)
    cl.add_argument("--n", type=int, default=64, help="generations for the ASR and clean-MSE reports")
    cl.add_argument("--shift", default="baddiffusion", choices=["baddiffusion", "trojdiff", "both"],
                    help="latent shift of the triggered inputs: BadDiffusion's 1 - sqrt(abar_t), TrojDiff's "
                         "sqrt(1 - abar_t), or either per sample (attack family unknown)")
    cl.add_argument("--noise-scale-min", type=float, default=1.0,
                    help="TrojDiff-shift samples (--shift trojdiff or both): scale their noise by U[this, max] "
                         "(TrojDiff chains start from gamma-scaled noise); 1 = off")
    cl.add_argument("--noise-scale-max", type=float, default=1.0,
                    help="upper end of that range (below 1: those inputs never carry full-scale noise)")
    cl.add_argument("--reference", default="frozen", choices=["frozen", "noise", "untriggered"],
                    help="TrojDiff-shift samples: answer the frozen model's answer to the clean input, the noise "
                         "that made them (TrojDiff's own loss with clean images as targets), or the frozen model's "
                         "answer to the same input without the trigger (its own noise scale)")
    cl.add_argument("--noise-patch", type=int, nargs=3, metavar=("ROW", "COL", "SIZE"),
                    help="TrojDiff-shift samples: scale their noise only inside this patch (TrojDiff's patch trigger; "
                         "the patch `pdjax invert --method trojdiff` reports)")
    cl.add_argument("--trigger-scale-min", type=float, default=1.0,
                    help="TrojDiff-shift samples: scale the trigger by U[this, 1] (an inverted trigger may be "
                         "larger than the attack's mu); 1 = off")
    cl.add_argument("--out", required=True, help="output folder: model/ and removal.json (resumed if it exists)")
    cl.add_argument("--quiet", action="store_true")
    cl.set_defaults(func=cmd_clean)
    _fill_help(sub)
    return p


# Help for options shared by several subcommands, filled in where a subcommand gives none.
_SHARED_HELP = {
    "seed": "random seed: the same seed gives the same result",
    "quiet": "no progress bars",
    "steps": "optimiser steps",
    "batch": "batch size",
    "lr": "learning rate",
    "warmup": "learning-rate warm-up steps",
    "checkpoint_every": "save a resumable checkpoint every this many steps",
    "size": "image size of a freshly initialised model",
    "channels": "image channels of a freshly initialised model",
    "sampler": "ddpm (ancestral, every timestep) or ddim (fewer steps)",
    "n": "number of generations",
    "poison_rate": "poisoned fraction of each training batch",
    "data": "training data: digits (bundled), cifar10:DIR or a folder of images",
    "src": "pdjax checkpoint (or diffusers folder) to export",
    "dst": "diffusers folder to write (config.json + diffusion_pytorch_model.safetensors)",
    "model": "pdjax checkpoint or diffusers folder",
    "shift_weight": "purediffusion: weight of the distribution-shift loss",
}


def _fill_help(sub) -> None:
    """Give every option of every subcommand a help line (the shared text for its name when it has none)."""
    for parser in sub.choices.values():
        for action in parser._actions:
            if not action.help and action.dest in _SHARED_HELP:
                action.help = _SHARED_HELP[action.dest]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from pdjax import compile_cache, cpu_runtime

    try:
        cpu_runtime.enable()  # YNNPACK kernels on XLA:CPU (see pdjax/cpu_runtime.py; $PDJAX_CPU_KERNELS=xla: off)
        compile_cache.enable()  # later runs of the same programs skip their compile ($PDJAX_CACHE_DIR=off disables)
        return args.func(args)
    except PdjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where a checkpoint exists", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

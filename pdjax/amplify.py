"""Backdoor amplification for red teams (SPEC 6): invert the trigger the model has learned, train with it.

A briefly trained backdoor has a low attack success rate. :func:`amplify` inverts the trigger from the
model starting at the known trigger g (``invert(..., start=g)``), mixes
``g* = clip(alpha * g_inv + (1 - alpha) * g, -0.99, 1)`` (clipped so that the trigger library reads it back
as a ``.npy`` trigger, and kept above the -1 background so that its mask is the whole image: see
:attr:`AmplifyConfig.full_frame`) and then runs two arms from the same starting model with the same budget: backdoor
training with g* ("amplified") and with g ("plain"). Both arms are evaluated every ``eval_every`` steps
(amplified with g*, plain with g; one fixed evaluation key), giving ASR-vs-steps curves.

Loop layout (a deliberate deviation from "one :func:`pdjax.backdoor.train.attack` call per stage").
``attack`` -> ``fit`` builds a new jitted train step on every call, so one call per stage pays a full
compile per stage (measured ~30 s for the tiny test UNet on 2 CPU cores) and restarts Adam and the
warm-up/cosine learning-rate schedule at every stage. Here each arm is one continuous training run (the
optimiser state and schedule run over the whole budget, exactly as one ``attack`` of ``steps`` steps would)
interrupted at every evaluation point. The step is the same :func:`pdjax.train.make_multi_step` over the
same :func:`pdjax.backdoor.attacks.backdoor_loss`, but the trigger, mask and target travel as jit
arguments (in the data pytree) instead of closure constants, so one compiled program serves both arms,
every stage and later runs of the same architecture. Step ``i`` of both arms draws the same batch,
timesteps and noise (``fold_in(key, i)``), so the arms differ only in the trigger: a paired comparison.

Resumability: each arm checkpoints (params = EMA params, plus the full train state) to ``out/<arm>`` at
every evaluation point, in the same format as ``pdjax attack`` (so ``pdjax.load(out/amplified)`` works),
and appends its ASR to ``out/<arm>/curve.json``; ``out/run.json`` pins the settings, and the inversion
is kept in ``out/inversion`` (``out/reinforce`` with ``reinforce="target"``). Rerunning the same call continues where it stopped.

Outputs in ``out``: ``trigger_inv.npy`` (raw inverted trigger), ``trigger_star.npy`` / ``.png``,
``trigger_unclipped.npy`` (g* before clipping, scored untrained in ``asr_unclipped``),
``amplify.json`` (:class:`AmplifyResult`), ``asr.svg`` (both curves), ``amplified/`` (pdjax checkpoint
of the amplified arm's final model) and ``amplified-diffusers/`` (diffusers export; skipped with a note
if an optional dependency is missing).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from pdjax import checkpoint, loops
from pdjax.backdoor.attacks import AttackArrays, AttackSpec, backdoor_loss
from pdjax.backdoor.train import build_arrays, evaluate, sample_attack
from pdjax.defense.inversion import InversionConfig, invert
from pdjax.errors import CheckpointError, ConfigError
from pdjax.metrics import attack_metrics
from pdjax.model import Model
from pdjax.reinforce import ReinforceConfig, reinforce_to_target
from pdjax.train import TrainConfig, _check_data, init_state, make_multi_step, make_optimizer

#: Lowest value of a full-frame g* (:attr:`AmplifyConfig.full_frame`): just above the -1 background.
FULL_FRAME_FLOOR = -0.99
#: What the amplified arm trains with (:attr:`AmplifyConfig.train_trigger`).
TRAIN_TRIGGERS = ("clipped", "unclipped")
#: The ASR level issue 6 compares the arms at (:meth:`AmplifyResult.steps_to`).
REACH = 0.95
#: How g_inv is found (:attr:`AmplifyConfig.reinforce`).
REINFORCE = ("shift", "target")


def first_reaching(steps, asr, level: float = REACH):
    """The first evaluation step whose ASR is >= level, or None."""
    return next((s for s, a in zip(steps, asr) if a >= level), None)


@dataclasses.dataclass(frozen=True)
class AmplifyConfig:
    """Settings of one amplification run (SPEC 6).

    Attributes:
      steps: extra backdoor-training budget per arm (optimiser steps).
      eval_every: evaluate ASR every this many steps (and at step 0).
      n: generations per ASR evaluation.
      alpha: mix g* = alpha g_inv + (1 - alpha) g, in [0, 1] (1: the inverted trigger alone).
      inversion: trigger inversion settings (default PureDiffusion's with a fixed noise batch and without the
        size search: g* is clipped to the image range for training, which a size factor above 1 would
        mostly undo).
      seed: seed of the inversion, the training batches and the (fixed) evaluation key.
      lr, warmup_steps, batch: optimiser settings of both arms (one schedule over ``steps``).
      poison_rate: poisoned fraction of each batch; None keeps the attack spec's.
      full_frame: clip g* to [FULL_FRAME_FLOOR, 1] instead of [-1, 1], so that no pixel of g* is the -1
        background and its mask M = g* > -1 is the whole image. BadDiffusion's poisoned training input
        is the trigger pasted on a training image, M g* + (1 - M) x (SPEC 2.1): with -1 pixels the
        training digits show through there, and the model learns a start other than the eps + g* it is
        sampled from (the inverted trigger's values below -1 are clipped to exactly -1, a quarter of
        the pixels in experiments/amplify_experiment.py's first run, whose amplified arm stalled at 0.94).
      plain_steps: budget of the plain arm when it should run longer than the amplified one (0: ``steps``),
        to find where plain training reaches the ASR that amplification reached: the plain arm is also
        evaluated at 2 steps, 4 steps, ... and at ``plain_steps``. Both arms follow one learning-rate
        schedule over ``max(steps, plain_steps)``, so up to ``steps`` they differ only in the trigger.
      keep_models: also keep each arm's model (EMA params) at every evaluation point, in ``out/<arm>/at/<step>``
        (to re-score the points that decide a comparison on more generations).
      reinforce: how g_inv is found. "shift": PureDiffusion's inversion from g (``inversion``; SPEC 6).
        "target" (beyond the paper): :func:`pdjax.reinforce.reinforce_to_target` from g, optimising the trigger
        so that generations land on the attack's target (``target_reinforce``); single-image targets only.
      target_reinforce: settings of the "target" reinforcement.
      train_trigger: what the amplified arm trains and is scored with. "clipped" (default): g* as above,
        read back from ``trigger_star.npy``. "unclipped" (beyond the paper): g* before clipping
        (``trigger_unclipped.npy``) with a full mask, so the poisoned training input and the triggered start
        are eps + g* exactly as the reinforcement optimised it; single-image targets, not TrojDiff. On the
        150-step BadDiffusion brief of experiments/results/amplify_table.md it reached ASR 0.98 after 100
        steps at lr 2e-4 ("Training on at the attack's own learning rate").
    """

    steps: int = 500
    eval_every: int = 100
    n: int = 64
    alpha: float = 1.0
    # As measured in experiments/results/amplify_table.md: no size search (g* is clipped to an image anyway)
    # and PureDiffusion's fixed noise batch.
    inversion: InversionConfig = InversionConfig(scales=(), fresh_noise=False)
    seed: int = 0
    lr: float = 2e-4
    warmup_steps: int = 0
    batch: int = 32
    poison_rate: float | None = None
    full_frame: bool = True
    plain_steps: int = 0
    keep_models: bool = False
    reinforce: str = "shift"
    target_reinforce: ReinforceConfig = ReinforceConfig()
    train_trigger: str = "clipped"

    def __post_init__(self):
        if self.reinforce not in REINFORCE:
            raise ConfigError(f"reinforce must be one of {', '.join(REINFORCE)}, got {self.reinforce!r}")
        if self.train_trigger not in TRAIN_TRIGGERS:
            raise ConfigError(f"train_trigger must be one of {', '.join(TRAIN_TRIGGERS)}, got {self.train_trigger!r}")
        for name in ("steps", "eval_every", "n", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.plain_steps and self.plain_steps < self.steps:
            raise ConfigError(f"plain_steps must be 0 or >= steps ({self.steps}), got {self.plain_steps}")

    @property
    def budget(self) -> int:
        """Steps of the longer arm, the length of the shared learning-rate schedule."""
        return max(self.steps, self.plain_steps)

    def points(self) -> list[int]:
        """Evaluation points of the amplified arm (and of the plain arm up to ``steps``)."""
        return eval_points(self.steps, self.eval_every)

    def plain_points(self) -> list[int]:
        """Evaluation points of the plain arm: :meth:`points`, then 2 steps, 4 steps, ... and ``plain_steps``."""
        pts, s = self.points(), 2 * self.steps
        while s < self.plain_steps:
            pts.append(s)
            s *= 2
        return pts + ([self.plain_steps] if self.plain_steps > self.steps else [])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class AmplifyResult:
    """ASR curves of both arms and the triggers.

    Attributes:
      steps: evaluation points [S] (0, eval_every, ..., steps).
      asr_amplified, asr_plain: ASR at each point (amplified arm with g*, plain arm with g).
      plain_steps, asr_plain_all: every evaluation point of the plain arm and its ASR there (longer than
        ``steps`` when :attr:`AmplifyConfig.plain_steps` is set).
      trigger: g [H, W, C]; trigger_inv: the raw inverted trigger; trigger_star: g* (clipped to [-1, 1]).
      attack: the attack spec (plain arm); config: the AmplifyConfig; out: the output folder.
      diffusers: path of the diffusers export, or None; notes: messages (e.g. a skipped export).
      trigger_unclipped: g* before clipping, ``alpha g_inv + (1 - alpha) g`` [H, W, C].
      asr_unclipped: its ASR on the starting model, with no training (same key and n as the arms' points, so
        paired with their step 0), or None where it is not defined (TrojDiff, whose triggered start is not
        eps + g, and class targets). A red team can attack with it as it is: on the 150-step BadDiffusion
        brief model of experiments/results/amplify_table.md the clipped g* fired 0.52 and the unclipped 0.94.
    """

    steps: list
    asr_amplified: list
    asr_plain: list
    trigger: np.ndarray
    trigger_inv: np.ndarray
    trigger_star: np.ndarray
    attack: dict
    config: dict
    out: str
    inversion_final_loss: float = float("nan")
    diffusers: str | None = None
    notes: list = dataclasses.field(default_factory=list)
    plain_steps: list = dataclasses.field(default_factory=list)
    asr_plain_all: list = dataclasses.field(default_factory=list)
    trigger_unclipped: np.ndarray | None = None
    asr_unclipped: float | None = None

    def steps_to(self, level: float = REACH) -> dict:
        """Training steps each arm needed to reach ASR ``level`` (None: not within its budget) and their ratio.

        ``ratio`` = plain / amplified; when plain never reached the level it is a lower bound (``ratio_is_bound``),
        the plain arm's budget over the amplified arm's steps. None when the amplified arm never reached it, or
        reached it at step 0 (the inverted trigger alone, no training: no finite ratio).
        """
        amp = first_reaching(self.steps, self.asr_amplified, level)
        plain_pts, plain_asr = self.plain_steps or self.steps, self.asr_plain_all or self.asr_plain
        plain = first_reaching(plain_pts, plain_asr, level)
        bound = plain is None
        ratio = None
        if amp is not None and amp > 0:
            ratio = (plain_pts[-1] if bound else plain) / amp
        return {"level": level, "amplified": amp, "plain": plain, "ratio": ratio, "ratio_is_bound": bound}

    def to_dict(self) -> dict:
        """JSON-ready summary (the triggers are in the .npy files beside it)."""
        return {"steps": self.steps, "asr_amplified": self.asr_amplified, "asr_plain": self.asr_plain,
                "plain_steps": self.plain_steps or self.steps, "asr_plain_all": self.asr_plain_all or self.asr_plain,
                "steps_to": self.steps_to(),
                "attack": self.attack, "config": self.config, "out": self.out,
                "inversion_final_loss": self.inversion_final_loss, "diffusers": self.diffusers, "notes": self.notes,
                "asr_unclipped": self.asr_unclipped,
                "files": {"trigger_inv": "trigger_inv.npy", "trigger_star": "trigger_star.npy",
                          "trigger_unclipped": "trigger_unclipped.npy",
                          "trigger_trained": ("trigger_unclipped.npy" if self.config.get("train_trigger") == "unclipped"
                                              else "trigger_star.npy"),
                          "plot": "asr.svg", "model": "amplified"},
                "asr_rule": "SPEC 7 (MSE to target below the threshold) of triggered generations, fixed evaluation key"}


def mix_trigger(g_inv, g, alpha: float, floor: float | None = -1.0) -> np.ndarray:
    """g* = clip(alpha g_inv + (1 - alpha) g, floor, 1), float32 [H, W, C] (SPEC 6); ``floor=None``: not clipped."""
    mixed = alpha * np.asarray(g_inv, np.float64) + (1.0 - alpha) * np.asarray(g, np.float64)
    return (mixed if floor is None else np.clip(mixed, floor, 1.0)).astype(np.float32)


def eval_points(steps: int, every: int) -> list[int]:
    """0, every, 2 every, ..., steps (the last point is ``steps`` even when ``every`` does not divide it)."""
    return [0, *range(every, steps, every), steps]


# --- one compiled backdoor step for every trigger -----------------------------------------------------------

_PROGRAMS: dict = {}


def _backdoor_step(model: Model, spec: AttackSpec, patch: bool, tcfg: TrainConfig, chunk: int):
    """Jitted ``(state, bundle) -> (state, losses[chunk])``; bundle = images + trigger/mask/target arrays.

    The attack arrays are traced arguments, so the program is shared by every trigger of one attack kind;
    cached on everything else that shapes it.
    """
    generic = dataclasses.replace(spec, trigger="<argument>", target="<argument>")
    key = (model.config, model.schedule_config, generic, patch, tcfg, chunk)
    if key not in _PROGRAMS:
        eps_fn, schedule = model.eps, model.schedule

        def loss(params, k, bundle):
            arrays = AttackArrays(bundle["trigger"], bundle["mask"], bundle["target"], patch)
            return backdoor_loss(eps_fn, schedule, spec, arrays, tcfg.batch_size)(params, k, bundle["images"])

        _PROGRAMS[key] = make_multi_step(loss, make_optimizer(tcfg), tcfg.ema_decay, chunk, batch_size=tcfg.batch_size)
    return _PROGRAMS[key]


def _state_numpy(state) -> dict:
    return jax.tree_util.tree_map(np.asarray, flax.serialization.to_state_dict(state))


def _run_arm(name: str, model: Model, data, spec: AttackSpec, tcfg: TrainConfig, chunk: int, points: list[int],
             score, out: Path, labels, progress: bool, keep: bool = False,
             arrays: AttackArrays | None = None) -> tuple[list[float], Model]:
    """Train one arm to ``points[-1]`` steps, checkpointing and scoring at each point; resumes from ``out``.

    ``keep``: also save the model at each point to ``out/at/<step>``.
    ``arrays``: the trigger/mask/target to train with (default: ``build_arrays(spec, ...)``); lets a caller
    train with a trigger outside [-1, 1] and a full mask, which a trigger file cannot express.

    Returns the ASR at each point and the final model (EMA params, as ``attack`` returns).
    """
    arrays = arrays if arrays is not None else build_arrays(spec, model.image_shape, data, labels)
    bundle = {"images": jnp.asarray(data), "trigger": jnp.asarray(arrays.trigger), "mask": jnp.asarray(arrays.mask),
              "target": jnp.asarray(arrays.target)}
    step_fn = _backdoor_step(model, spec, arrays.patch, tcfg, chunk)
    state = init_state(model.params, make_optimizer(tcfg), tcfg.seed)
    provenance = {**model.meta, "attack": spec.to_dict(), "train": dataclasses.asdict(tcfg), "amplify_arm": name}
    if checkpoint.is_checkpoint(out):
        _, meta, saved = checkpoint.restore(out, with_state=True)
        if saved is None or meta.get("provenance", {}).get("train") != dataclasses.asdict(tcfg):
            raise CheckpointError(f"{out} holds a run with other settings; use a new --out folder or the same settings")
        state = jax.tree_util.tree_map(jnp.asarray, flax.serialization.from_state_dict(state, saved))
    curve_path = out / "curve.json"
    curve = {int(k): v for k, v in json.loads(curve_path.read_text()).items()} if curve_path.is_file() else {}
    step = int(state.step)
    curve = {k: v for k, v in curve.items() if k <= step}

    def current() -> Model:
        return model.replace(params=state.ema_params, meta={**provenance, "steps": step})

    def record():
        if keep:
            current().save(out / "at" / f"{step:06d}")
        curve[step] = score(current(), spec)
        curve_path.parent.mkdir(parents=True, exist_ok=True)
        curve_path.write_text(json.dumps({str(k): v for k, v in sorted(curve.items())}, indent=1))

    from tqdm.auto import tqdm

    bar = tqdm(total=points[-1], initial=step, desc=f"{name} arm", disable=not progress, unit="step", leave=False)
    if step in points and step not in curve:
        record()
    for target_step in points:
        if target_step <= step:
            continue
        while step < target_step:
            state, _ = step_fn(state, bundle)
            step = int(state.step)
            bar.update(chunk)
        current().save(out, state=_state_numpy(state))
        record()
        bar.set_postfix(asr=f"{curve[step]:.2f}")
    bar.close()
    missing = [p for p in points if p not in curve]
    if missing:  # only if a checkpoint ran past an evaluation point it did not record
        raise CheckpointError(f"{out} lacks ASR at steps {missing}; remove the folder and rerun")
    return [float(curve[p]) for p in points], current()


def _inverted(model: Model, g, cfg: AmplifyConfig, folder: Path, progress: bool) -> tuple[np.ndarray, float]:
    """PureDiffusion's inversion from g (cached in ``folder``): (g_inv [H, W, C], final loss)."""
    if (folder / "inversion.json").is_file() and (folder / "trigger.npy").is_file():
        return np.load(folder / "trigger.npy"), float(json.loads((folder / "inversion.json").read_text())["final_loss"])
    inv = invert(model, cfg.inversion.method, jax.random.key(cfg.seed), cfg.inversion, progress, start=g)
    inv.save(folder)
    return inv.trigger, float(inv.losses[-1])


def _reinforced(model: Model, g, target, cfg: AmplifyConfig, folder: Path, progress: bool) -> tuple[np.ndarray, float]:
    """Target-directed reinforcement from g (cached in ``folder``): (trigger [H, W, C], final loss)."""
    if (folder / "reinforce.json").is_file() and (folder / "trigger.npy").is_file():
        return np.load(folder / "trigger.npy"), float(json.loads((folder / "reinforce.json").read_text())["final_loss"])
    res = reinforce_to_target(model, g, target, jax.random.key(cfg.seed), cfg.target_reinforce, progress)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "trigger.npy", res.trigger)
    (folder / "reinforce.json").write_text(json.dumps({**res.to_dict(), "config": cfg.target_reinforce.to_dict()}))
    return res.trigger, float(res.losses[-1][-1])


def amplify(model: Model, data, spec: AttackSpec, cfg: AmplifyConfig = AmplifyConfig(), out: str | Path = "amplify",
            progress: bool = True, labels=None) -> AmplifyResult:
    """Amplify the backdoor of ``model`` (SPEC 6) and compare with plain training; resumable in ``out``.

    Args:
      model: a (briefly) backdoored model.
      data: clean training images [N, H, W, C] in [-1, 1].
      spec: the attack the model was backdoored with (its trigger g and target).
      cfg: :class:`AmplifyConfig`.
      out: output folder (see the module docstring for its files).
      labels: image labels, for class targets only.
    Returns:
      :class:`AmplifyResult`; also written to ``out/amplify.json`` and plotted in ``out/asr.svg``.
    """
    from pdjax.images import save_image

    _check_data(model, data)
    if cfg.poison_rate is not None:
        spec = dataclasses.replace(spec, poison_rate=cfg.poison_rate)
    arrays = build_arrays(spec, model.image_shape, data, labels)
    if cfg.reinforce == "target" and arrays.target.ndim != 3:
        raise ConfigError("reinforce='target' needs a single target image; this attack's target is a class or "
                          "a set of images: use reinforce='shift'")
    if cfg.train_trigger == "unclipped" and (spec.kind == "trojdiff" or arrays.target.ndim != 3):
        raise ConfigError("train_trigger='unclipped' needs an additive trigger (not TrojDiff) and a single target "
                          "image; use train_trigger='clipped'")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {out}: {e.strerror}; choose a writable --out") from None
    settings = {k: v for k, v in cfg.to_dict().items() if k != "keep_models"}  # keeping files changes no number
    if cfg.reinforce == "shift":  # run.json of runs from before the "target" option stays valid
        settings = {k: v for k, v in settings.items() if k not in ("reinforce", "target_reinforce")}
    if cfg.train_trigger == "clipped":  # likewise for runs from before the "unclipped" option
        settings.pop("train_trigger")
    run = {"attack": spec.to_dict(), "config": settings, "model": model.config.to_dict(),
           "schedule": model.schedule_config.to_dict()}
    run_path = out / "run.json"
    if run_path.is_file() and json.loads(run_path.read_text()) != json.loads(json.dumps(run)):
        raise CheckpointError(f"{out} holds an amplification run with other settings; use a new --out folder")
    run_path.write_text(json.dumps(run, indent=2))

    # (a) invert from the known trigger g (cached in out/inversion for resumption), or reinforce it towards
    # the target (cached in out/reinforce).
    g = arrays.trigger
    if cfg.reinforce == "target":
        g_inv, inv_loss = _reinforced(model, g, arrays.target, cfg, out / "reinforce", progress)
    else:
        g_inv, inv_loss = _inverted(model, g, cfg, out / "inversion", progress)
    # (b) g*: the mix, clipped to [-1, 1] so the trigger library reads it back from trigger_star.npy
    # (to [FULL_FRAME_FLOOR, 1] with full_frame, so that its mask is the whole image).
    g_star = mix_trigger(g_inv, g, cfg.alpha, FULL_FRAME_FLOOR if cfg.full_frame else -1.0)
    np.save(out / "trigger_inv.npy", np.asarray(g_inv, np.float32))
    np.save(out / "trigger_star.npy", g_star)
    save_image(g_star, out / "trigger_star.png")
    spec_star = dataclasses.replace(spec, trigger=str((out / "trigger_star.npy").absolute()))

    # (c) two arms, same start, same budget, same batches; ASR with each arm's own trigger, fixed key.
    points, plain_points = cfg.points(), cfg.plain_points()
    chunk = math.gcd(math.gcd(*plain_points[1:]), loops.default_steps_per_call())
    tcfg = TrainConfig(steps=cfg.budget, batch_size=cfg.batch, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                       seed=cfg.seed, steps_per_call=chunk, checkpoint_every=cfg.eval_every)
    eval_key = jax.random.fold_in(jax.random.key(cfg.seed), 7)

    def score(m: Model, s: AttackSpec, arrays: AttackArrays | None = None) -> float:
        """Triggered ASR as :func:`pdjax.backdoor.train.evaluate` reports it (same key), without its clean half."""
        arrays = arrays or build_arrays(s, m.image_shape, data, labels)
        if arrays.target.ndim != 3:  # a class target: evaluate's classifier rule
            res, _, _ = evaluate(m, s, eval_key, n=cfg.n, seed=cfg.seed, labels=labels, data=data)
            return float(res.triggered["asr"])
        x = sample_attack(m, s, arrays, jax.random.fold_in(eval_key, 1), cfg.n, triggered=True)
        return float(attack_metrics(x, arrays.target).asr)

    # g* before clipping, scored on the starting model (step 0's noise): what a red team can attack with untrained.
    unclipped = mix_trigger(g_inv, g, cfg.alpha, floor=None)
    np.save(out / "trigger_unclipped.npy", unclipped)
    full = dataclasses.replace(arrays, trigger=unclipped, mask=np.ones_like(unclipped))  # g* itself, full mask
    asr_unclipped = None
    if spec.kind != "trojdiff" and arrays.target.ndim == 3 and cfg.train_trigger == "clipped":
        asr_unclipped = score(model, spec, full)

    amp_spec, amp_arrays, amp_score = spec_star, None, score
    if cfg.train_trigger == "unclipped":  # g* as optimised: the poisoned input is g* itself
        amp_spec = dataclasses.replace(spec, trigger=str((out / "trigger_unclipped.npy").absolute()))
        amp_arrays, amp_score = full, (lambda m, s: score(m, s, full))
    asr_amp, amplified = _run_arm("amplified", model, data, amp_spec, tcfg, chunk, points, amp_score,
                                  out / "amplified", labels, progress, cfg.keep_models, arrays=amp_arrays)
    if cfg.train_trigger == "unclipped":  # its step 0 is that score: the starting model, the same noise
        asr_unclipped = asr_amp[0]
    asr_plain_all, _ = _run_arm("plain", model, data, spec, tcfg, chunk, plain_points, score, out / "plain", labels,
                                progress, cfg.keep_models)
    asr_plain = asr_plain_all[: len(points)]

    # (d) result JSON and plot; (e) exports of the amplified model (its pdjax checkpoint is out/amplified).
    result = AmplifyResult(points, asr_amp, asr_plain, np.asarray(g, np.float32), np.asarray(g_inv, np.float32),
                           g_star, spec.to_dict(), cfg.to_dict(), str(out.absolute()), inv_loss,
                           plain_steps=plain_points, asr_plain_all=asr_plain_all, trigger_unclipped=unclipped,
                           asr_unclipped=asr_unclipped)
    try:
        result.diffusers = str(amplified.export_diffusers(out / "amplified-diffusers"))
    except ImportError as e:
        result.notes.append(f"diffusers export skipped: {e}; install the optional dependency "
                            f"(pip install safetensors) and run `pdjax export {out / 'amplified'} DST`")
    (out / "amplify.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "asr.svg").write_text(asr_svg(points, {"amplified (g*)": asr_amp, "plain (g)": (plain_points, asr_plain_all)}))
    return result


def asr_svg(steps, curves: dict, width: int = 480, height: int = 300) -> str:
    """A small dependency-free SVG line plot of ASR (0..1) against training steps, one line per curve.

    ``curves``: name -> ASR list at ``steps``, or name -> (its own steps, ASR list).
    """
    left, right, top, bottom = 50, 20, 20, 45
    pw, ph = width - left - right, height - top - bottom
    curves = {k: v if isinstance(v, tuple) else (steps, v) for k, v in curves.items()}
    steps = sorted({int(s) for xs, _ in curves.values() for s in xs} | {int(s) for s in steps})
    x_max = max(max(steps), 1)

    def xy(s, a):
        return left + pw * s / x_max, top + ph * (1.0 - min(max(a, 0.0), 1.0))

    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>']
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(0, a)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{a:g}</text>')
    for s in sorted({round(x_max * k / 4) for k in range(5)}):
        x, _ = xy(s, 0.0)
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle">{s}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">backdoor training steps</text>')
    parts.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">'
                 'ASR</text>')
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        c = colours[i % len(colours)]
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, a) for s, a in zip(xs, ys)))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        for s, a in zip(xs, ys):
            x, y = xy(s, a)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{c}"/>')
        ly = top + 14 + 16 * i
        parts.append(f'<line x1="{left + 10}" y1="{ly - 4}" x2="{left + 30}" y2="{ly - 4}" stroke="{c}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{left + 35}" y="{ly}">{_escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["AmplifyConfig", "AmplifyResult", "REACH", "amplify", "asr_svg", "eval_points", "first_reaching",
           "mix_trigger", "TRAIN_TRIGGERS"]

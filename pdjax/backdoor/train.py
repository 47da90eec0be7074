"""Backdoor training (``pdjax attack``) and attack evaluation (``pdjax evaluate``).

Training reuses the resumable loop of :mod:`pdjax.train` with the attack's objective
(:func:`pdjax.backdoor.attacks.backdoor_loss`); the checkpoint's provenance records the attack, trigger,
target, poison rate, steps and seed. Evaluation samples clean and triggered generations with the attack's
own sampler and reports SPEC 7 metrics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.backdoor.attacks import AttackArrays, AttackSpec, backdoor_loss, trojan_ddpm_sample, triggered_start
from pdjax.backdoor.triggers import get_target, get_trigger, get_troj_trigger, is_troj_patch, is_troj_trigger, trigger_mask
from pdjax.data import LETTERS, load_letters_with_labels
from pdjax.diffusion.samplers import DDIM_STEPS, ddim_sample, ddpm_sample
from pdjax.errors import ConfigError
from pdjax.model import Model
from pdjax.train import TrainConfig, TrainResult, _check_data, fit


def out_d2d_pool(spec: AttackSpec, size: int, channels: int) -> np.ndarray:
    """Target pool [K, size, size, C] of an out-d2d target ``letter:X``: that class of the procedural letters."""
    letter = spec.target.split(":", 1)[1].upper()
    if spec.kind != "trojdiff" or spec.mode != "out-d2d":
        raise ConfigError(f"target {spec.target!r} (a class of another set) needs --attack trojdiff --mode out-d2d")
    if len(letter) != 1 or letter not in LETTERS:
        raise ConfigError(f"target {spec.target!r}: write letter:A .. letter:Z")
    images, labels = load_letters_with_labels(size, channels)
    return images[labels == LETTERS.index(letter)].astype(np.float32)


def build_arrays(spec: AttackSpec, shape: tuple[int, int, int], data=None, labels=None) -> AttackArrays:
    """Trigger, mask and target arrays of ``spec`` for images of ``shape`` (H, W, C).

    A TrojDiff d2d target ``class:K`` takes the pool of training images with label K (needs ``labels``).
    """
    size, _, channels = shape
    patch = False
    if spec.kind == "trojdiff" and is_troj_trigger(spec.trigger):
        troj = get_troj_trigger(spec.trigger, size, channels)
        g, mask, patch = np.asarray(troj.image, np.float32), np.asarray(troj.mask, np.float32), is_troj_patch(spec.trigger)
    else:
        g = np.asarray(get_trigger(spec.trigger, size, channels), np.float32)
        mask = np.asarray(trigger_mask(g), np.float32)
    if spec.target.startswith("letter:"):
        target = out_d2d_pool(spec, size, channels)
    elif spec.kind == "trojdiff" and spec.mode == "out-d2d":
        raise ConfigError(f"TrojDiff out-d2d targets a class of another set than the training data: "
                          f"use --target letter:A .. letter:Z (procedural letters), not {spec.target!r}")
    elif spec.target.startswith("class:"):
        if spec.kind != "trojdiff" or spec.mode == "d2i":
            raise ConfigError(f"target {spec.target!r} (a class of the training set) needs --attack trojdiff --mode in-d2d")
        if labels is None or data is None:
            raise ConfigError(f"target {spec.target!r} needs a labelled dataset (e.g. --data digits)")
        try:
            k = int(spec.target.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"target {spec.target!r}: write class:K with an integer K") from None
        pool = np.asarray(data)[np.asarray(labels) == k]
        if len(pool) == 0:
            raise ConfigError(f"target {spec.target!r}: no training image has label {k}")
        target = pool.astype(np.float32)
    else:
        target = np.asarray(get_target(spec.target, size, channels), np.float32)
    return AttackArrays(trigger=g, mask=mask, target=target, patch=patch)


def attack(model: Model, data, spec: AttackSpec, cfg: TrainConfig | None = None, out=None, labels=None,
           meta: dict | None = None, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Backdoor ``model`` (fine-tune, or train from scratch if its params are fresh) on ``data`` [N, H, W, C].

    Returns the TrainResult of :func:`pdjax.train.fit`; the model's metadata records ``attack``.
    """
    cfg = cfg or TrainConfig()
    _check_data(model, data)
    arrays = build_arrays(spec, model.image_shape, data, labels)
    loss = backdoor_loss(model.eps, model.schedule, spec, arrays, cfg.batch_size, cfg.t_min)
    info = {**(meta or {}), "attack": spec.to_dict()}
    return fit(model, loss, data, cfg, out=out, meta=info, progress=progress, stop_after=stop_after)


def spec_from_model(model: Model, **overrides) -> AttackSpec:
    """The AttackSpec recorded in a model's provenance, with ``overrides`` (None values ignored)."""
    recorded = dict(model.meta.get("attack", {}))
    recorded.update({k: v for k, v in overrides.items() if v is not None})
    return AttackSpec(**recorded)


def sample_attack(model: Model, spec: AttackSpec, arrays: AttackArrays, key: jax.Array, n: int,
                  triggered: bool = True) -> np.ndarray:
    """Generations [n, H, W, C] with the attack's sampler (DDPM; DDIM-100 for ODE Villan; trojan DDPM for TrojDiff)."""
    k_start, k_chain = jax.random.split(key)
    if triggered:
        x_T = triggered_start(spec, arrays, k_start, n)
    else:
        x_T = jax.random.normal(k_start, (n, *model.image_shape))
    sc = model.schedule_config
    if spec.kind == "trojdiff" and triggered:
        mu, scale = arrays.troj_mu_scale(spec)
        return np.asarray(trojan_ddpm_sample(model.eps, model.params, model.schedule, x_T, k_chain, mu, scale,
                                             split_batch=True))
    if spec.ode:
        return np.asarray(ddim_sample(model.eps, model.params, model.schedule, x_T, k_chain, num_steps=DDIM_STEPS,
                                      split_batch=True))
    return np.asarray(ddpm_sample(model.eps, model.params, model.schedule, x_T, k_chain,
                                  variance_type=sc.variance_type, clip_sample=sc.clip_sample, split_batch=True))


@dataclasses.dataclass
class EvaluationResult:
    """Attack metrics of one model for clean and triggered generations (SPEC 7)."""

    attack: dict
    n: int
    seed: int
    clean: dict
    triggered: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(model: Model, spec: AttackSpec, key: jax.Array, n: int = 64, seed: int = 0, labels=None, data=None,
             clean: np.ndarray | None = None) -> tuple[EvaluationResult, np.ndarray, np.ndarray]:
    """MSE to target, ASR and SSIM of clean and triggered generations; returns (result, clean, triggered).

    ``clean``: the [n, H, W, C] clean generations of an earlier call with the same model, key, n and
    sampler (``spec.ode`` equal), reused instead of sampled again (scoring one model against many pairs).
    """
    from pdjax.metrics import attack_metrics

    arrays = build_arrays(spec, model.image_shape, data, labels)
    target = arrays.target if arrays.target.ndim == 3 else arrays.target.mean(0)
    y = jnp.broadcast_to(jnp.asarray(target), (n, *model.image_shape))
    if clean is None:
        clean = sample_attack(model, spec, arrays, jax.random.fold_in(key, 0), n, triggered=False)
    elif clean.shape != (n, *model.image_shape):
        raise ConfigError(f"clean generations of shape {clean.shape} do not match n={n} images of {model.image_shape}")
    trig = sample_attack(model, spec, arrays, jax.random.fold_in(key, 1), n, triggered=True)
    parts = [attack_metrics(x, y).to_dict() for x in (clean, trig)]
    if arrays.target.ndim == 4:  # a distribution target: ASR is the fraction a classifier assigns to the class (SPEC 7)
        classify, k, rule = target_classifier(spec, model.image_shape, data, labels)
        for part, x in zip(parts, (clean, trig)):
            part["mse_to_class_mean"] = part.pop("mse")
            part["asr"] = float(np.mean(classify(x) == k))
            part["asr_rule"] = rule
    return EvaluationResult(spec.to_dict(), n, seed, parts[0], parts[1]), clean, trig


def target_classifier(spec: AttackSpec, shape, data, labels):
    """(classify, k, rule) for a d2d target: images -> labels, the target label, and the ASR rule in words.

    in-d2d ``class:K``: fitted on the labelled training images. out-d2d ``letter:X``: fitted on the
    procedural letters (labels 0..25) together with the training images if given (labels 26 + theirs).
    """
    if spec.target.startswith("letter:"):
        letters, letter_labels = load_letters_with_labels(shape[0], shape[2])
        x, y = letters, letter_labels
        if data is not None and labels is not None:
            x = np.concatenate([letters, np.asarray(data, np.float32)])
            y = np.concatenate([letter_labels, len(LETTERS) + np.asarray(labels)])
        k = LETTERS.index(spec.target.split(":", 1)[1].upper())
        return class_classifier(x, y), k, f"classifier (letters + training set): fraction predicted as letter {LETTERS[k]}"
    k = int(spec.target.split(":", 1)[1])
    return class_classifier(data, labels), k, f"classifier: fraction predicted as class {k}"


def class_classifier(data, labels):
    """A logistic-regression classifier fitted on the labelled training images: images [N, H, W, C] -> labels [N]."""
    from sklearn.linear_model import LogisticRegression

    flat = lambda x: np.clip(np.asarray(x, np.float32), -1, 1).reshape(len(x), -1)  # noqa: E731
    clf = LogisticRegression(max_iter=500).fit(flat(data), np.asarray(labels))
    return lambda x: clf.predict(flat(x))

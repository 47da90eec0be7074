"""Backdoor removal (``pdjax clean``; beyond the paper): fine-tune the trigger response away.

Given an inverted trigger delta [H, W, C] (SPEC 4), a copy of the model is fine-tuned with
:func:`pdjax.train.fit` on clean data x0 with

    L = w_bd  mean || eps_theta(x_t + k_t delta, t) - eps_frozen(x_t, t) ||^2
      + w_cl  mean || eps_theta(x_t, t) - eps ||^2,

    x_t = q_sample(x0, t, eps) = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   k_t = 1 - sqrt(abar_t).

k_t is the latent shift of the backdoored chain (SPEC 3): a BadDiffusion chain started from eps + g
carries (1 - sqrt(abar_t)) g at step t. The first term asks the model to answer a triggered latent as the
original (frozen) model answers the clean one, i.e. to ignore the trigger; the second is the plain DDPM
loss that keeps clean generation intact. eps_frozen is the original params, held constant (closure of the
loss; ``fit`` fixes the loss signature to ``(params, key, data)``) and outside the gradient.

TrojDiff (SPEC 2.2) trains x_t = sqrt(abar_t) y + sqrt(1 - abar_t)(gamma eps + mu) to predict eps and samples
with its own trojan sampler from gamma eps + mu. ``shift="trojdiff"`` gives every sample TrojDiff's shift
k_t = sqrt(1 - abar_t); ``shift="both"`` draws per sample which of the two shifts it takes (a defender who does
not know the attack family covers both; the batches, timesteps and noise are those of ``baddiffusion``).
Five options shape the samples that take TrojDiff's shift, and only those (a ConfigError with
``shift="baddiffusion"``, except ``reference="untriggered"``, which there equals the default):

- ``noise_scale_min`` / ``noise_scale_max``: the noise is scaled by s ~ U[min, max] per sample, so the input is
  ``sqrt(abar_t) x0 + sqrt(1 - abar_t)(s eps + delta)`` (gamma unknown to the defender);
- ``reference="noise"``: the target is the noise eps itself instead of eps_frozen(x_t). With a noise scale this
  term is TrojDiff's own training loss with clean images x0 in place of its target y, delta in place of mu and
  s in place of gamma: it teaches the trojan sampler, whose x0 estimate subtracts sqrt(1 - abar_t)(gamma eps_hat
  + mu) from x_t, to reach clean images from the trigger. (Measured: with the attack's mu the frozen reference
  removes TrojDiff's backdoor as well, at a smaller clean-sample change; removal_table.md, last section);
- ``reference="untriggered"``: the target is the frozen model's answer to the same input without the trigger,
  eps_frozen(sqrt(abar_t) x0 + sqrt(1 - abar_t) s eps) (the "frozen" target uses full-scale noise eps instead).
  The model is asked to ignore the trigger at the input's own noise scale rather than to answer eps, 1/s times
  the input's noise; the trojan chain from the trigger then behaves like one from gamma eps (with BadDiffusion's
  shift, s = 1, it equals "frozen");
- ``noise_patch = (row, col, size)``: the noise is scaled by s only inside that patch, 1 elsewhere: TrojDiff's
  patch trigger, whose start is gamma eps + mu inside a patch and eps outside (the patch a
  :func:`pdjax.defense.trojan.invert_trojan` patch search found; needs a noise scale range);
- ``trigger_scale_min``: the trigger's size is drawn too, c delta with c ~ U[trigger_scale_min, 1]: an inversion
  from full-scale noise eps + delta finds a larger trigger than the mu of a chain that starts from gamma eps +
  mu (about twice mu's norm on a TrojDiff blend model, removal_table.md).

Reported (``out/removal.json``): ASR before/after when the attack spec is known (triggered generations
with the spec's trigger and target, SPEC 7) and the same rule on generations from plain noise (``clean_asr``: a
removal can move the backdoor onto clean noise, so that ASR with the trigger reads 0 while clean noise now gives the
target; experiments/results/removal_table.md, "Label-free quality"), the clean-sample MSE: the mean squared
difference, on the [-1, 1] pixel scale, between ``n`` DDPM clean generations of the original and of the cleaned
model drawn from the same start noise and chain noise (:func:`report_generations`), and the clean-sample quality of each model without labels
(:func:`clean_quality`): the uniformity of its clean generations (SPEC 5; low = they collapsed onto one image)
and their mean distance to the nearest clean training image (:func:`pdjax.metrics.nearest_data_mse`). The
result's ``clean_damaged`` says when the cleaned model's generations moved away from the data or collapsed
(:data:`DAMAGE_NEAREST_RATIO`, :data:`DAMAGE_UNIFORMITY_RATIO`), which a defender can check without knowing
the attack. The cleaned model is the pdjax checkpoint ``out/model``
(resumable: rerunning the same call continues the fine-tuning).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.backdoor.attacks import AttackSpec
from pdjax.backdoor.triggers import patch_mask
from pdjax.diffusion.schedule import Schedule, q_sample
from pdjax.errors import ConfigError, DataError
from pdjax.model import Model
from pdjax.train import TrainConfig, _check_data, fit


#: Latent shifts of the backdoor term: BadDiffusion's 1 - sqrt(abar_t), TrojDiff's sqrt(1 - abar_t), or either
#: per sample.
SHIFTS = ("baddiffusion", "trojdiff", "both")
#: What the backdoor term asks of a triggered input: the frozen model's answer to the clean input (full-scale
#: noise), the noise that made it (the DDPM loss of the triggered forward process on clean data), or the frozen
#: model's answer to the same input without the trigger (the input's own noise scale).
REFERENCES = ("frozen", "noise", "untriggered")
#: ``clean_damaged`` when the cleaned model's clean generations lie this many times farther from their nearest
#: training image than the original's (experiments/results/removal_table.md, "Label-free quality").
DAMAGE_NEAREST_RATIO = 2.0
#: ... or when their uniformity falls below this fraction of the original's (a collapse onto few images).
DAMAGE_UNIFORMITY_RATIO = 0.75


@dataclasses.dataclass(frozen=True)
class RemovalConfig:
    """Settings of a removal fine-tune.

    Attributes:
      steps, batch, lr, warmup_steps, seed, checkpoint_every: optimiser and loop settings (``fit``).
      backdoor_weight, clean_weight: w_bd and w_cl of the loss (module docstring).
      n: generations for the ASR and clean-MSE reports.
      shift: the latent shift k_t of the backdoor term (:data:`SHIFTS`; module docstring).
      noise_scale_min, noise_scale_max: range of the noise scale s of the TrojDiff-shift samples (1, 1 =
        full-scale noise; module docstring).
      reference: their target (:data:`REFERENCES`; module docstring).
      trigger_scale_min: lower end of their trigger factor c ~ U[trigger_scale_min, 1] (1 = the trigger as
        given; module docstring).
      noise_patch: (row, col, size) of the patch their noise scale applies to (TrojDiff's patch trigger), or
        None for the whole image (module docstring).
    """

    steps: int = 500
    batch: int = 32
    lr: float = 1e-4
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_every: int = 100
    backdoor_weight: float = 1.0
    clean_weight: float = 1.0
    n: int = 64
    shift: str = "baddiffusion"
    noise_scale_min: float = 1.0
    noise_scale_max: float = 1.0
    reference: str = "frozen"
    trigger_scale_min: float = 1.0
    noise_patch: tuple | None = None

    def __post_init__(self):
        if self.noise_patch is not None:
            object.__setattr__(self, "noise_patch", check_noise_patch(self.noise_patch, self.shift,
                                                                      self.noise_scale_min))
        if not 0.0 <= self.trigger_scale_min <= 1.0:
            raise ConfigError(f"trigger_scale_min must be in [0, 1], got {self.trigger_scale_min}")
        if not 0.0 < self.noise_scale_min <= 1.0:
            raise ConfigError(f"noise_scale_min must be in (0, 1], got {self.noise_scale_min}")
        if not self.noise_scale_min <= self.noise_scale_max <= 1.0:
            raise ConfigError(f"noise_scale_max must be in [noise_scale_min, 1] = [{self.noise_scale_min}, 1], "
                              f"got {self.noise_scale_max}")
        check_trojdiff_options(self.shift, self.noise_scale_min, self.noise_scale_max, self.reference,
                               self.trigger_scale_min)
        for name in ("steps", "batch", "checkpoint_every", "n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backdoor_weight < 0 or self.clean_weight < 0:
            raise ConfigError("backdoor_weight and clean_weight must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def train_config(self) -> TrainConfig:
        """The :func:`pdjax.train.fit` settings of this removal."""
        return TrainConfig(steps=self.steps, batch_size=self.batch, lr=self.lr, warmup_steps=self.warmup_steps,
                           seed=self.seed, checkpoint_every=self.checkpoint_every)


@dataclasses.dataclass
class RemovalResult:
    """What :func:`remove_backdoor` reports (also ``out/removal.json``)."""

    model: Model
    steps: int
    clean_mse: float
    asr_before: float | None = None
    asr_after: float | None = None
    attack: dict | None = None
    config: dict = dataclasses.field(default_factory=dict)
    out: str = ""
    final_loss: float = float("nan")
    quality_before: dict = dataclasses.field(default_factory=dict)
    quality_after: dict = dataclasses.field(default_factory=dict)
    clean_asr_before: float | None = None
    clean_asr_after: float | None = None

    @property
    def clean_damaged(self) -> bool:
        """Whether the cleaned model's clean generations moved away from the data or collapsed
        (:func:`damaged`; needs no labels)."""
        return damaged(self.quality_before, self.quality_after)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "asr_before": self.asr_before, "asr_after": self.asr_after,
                "clean_asr_before": self.clean_asr_before, "clean_asr_after": self.clean_asr_after,
                "attack": self.attack, "clean_mse": self.clean_mse,
                "clean_quality_before": self.quality_before, "clean_quality_after": self.quality_after,
                "clean_damaged": self.clean_damaged,
                "clean_quality_rule": f"uniformity (SPEC 5) of the {self.config.get('n')} DDPM clean generations and "
                                      "their mean squared distance ([-1, 1] scale) to the nearest training image; "
                                      f"damaged: nearest distance > {DAMAGE_NEAREST_RATIO:g}x the original's or "
                                      f"uniformity < {DAMAGE_UNIFORMITY_RATIO:g}x the original's",
                "clean_mse_rule": f"mean squared difference ([-1, 1] pixel scale) between {self.config.get('n')} DDPM "
                                  "clean generations of the original and the cleaned model from the same noise",
                "asr_rule": "SPEC 7, triggered generations with the attack's trigger and target; clean_asr: the same "
                            "rule on generations from plain noise with the attack's sampler (a backdoor moved onto "
                            "clean noise shows here)"
                if self.attack else "not measured: no attack spec (pass the target to report ASR)",
                "config": self.config, "out": self.out, "final_loss": self.final_loss, "model": "model"}


def check_noise_patch(patch, shift: str, noise_scale_min: float) -> tuple:
    """``patch`` as an (row, col, size) tuple of ints, or a ConfigError: three integers (row, col >= 0, size >= 1),
    used with TrojDiff's shift and a noise scale range (it only says where that scale applies)."""
    try:
        row, col, size = (int(v) for v in patch)
    except (TypeError, ValueError):
        raise ConfigError(f"noise_patch must be three integers (row, col, size), got {patch!r}") from None
    if row < 0 or col < 0 or size < 1:
        raise ConfigError(f"noise_patch must have row, col >= 0 and size >= 1, got {(row, col, size)}")
    if shift == "baddiffusion" or not noise_scale_min < 1.0:
        raise ConfigError("noise_patch says where the TrojDiff samples' noise scale applies: use it with shift "
                          "'trojdiff' or 'both' and a noise scale range below 1 (noise_scale_min < 1)")
    return row, col, size


def check_trojdiff_options(shift: str, noise_scale_min: float = 1.0, noise_scale_max: float = 1.0,
                           reference: str = "frozen", trigger_scale_min: float = 1.0) -> None:
    """A ConfigError for a bad shift or reference, or for TrojDiff options (noise scale range, noise reference,
    trigger scale) with ``shift="baddiffusion"``: they shape only the samples that take TrojDiff's shift."""
    if shift not in SHIFTS:
        raise ConfigError(f"shift must be one of {', '.join(SHIFTS)}, got {shift!r}")
    if reference not in REFERENCES:
        raise ConfigError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    if shift == "baddiffusion" and (noise_scale_min < 1.0 or noise_scale_max < 1.0 or reference == "noise"
                                    or trigger_scale_min < 1.0):
        raise ConfigError("the noise-scale range, reference 'noise' and trigger-scale options shape the samples that "
                          "take TrojDiff's shift; use shift 'trojdiff' or 'both' with them")


def removal_terms(eps_fn, schedule: Schedule, batch_size: int, shift: str = "baddiffusion", *,
                  noise_scale_min: float = 1.0, noise_scale_max: float = 1.0, reference: str = "frozen",
                  trigger_scale_min: float = 1.0, noise_patch: tuple | None = None):
    """The two loss terms as a pure function of explicit arguments.

    Returns ``terms(params, frozen, delta, key, data) -> (l_backdoor, l_clean)`` with data [N, H, W, C] clean
    images in [-1, 1] and delta [H, W, C]. Batch, timesteps and noise come from ``key`` exactly as in
    :func:`pdjax.train.ddpm_loss` (so l_clean equals the DDPM loss of the same key). ``shift``: :data:`SHIFTS`;
    ``noise_scale_min``, ``noise_scale_max``, ``reference``, ``trigger_scale_min``, ``noise_patch``: as in
    :class:`RemovalConfig` (with ``reference="noise"`` ``frozen`` is not used).
    """
    check_trojdiff_options(shift, noise_scale_min, noise_scale_max, reference, trigger_scale_min)
    if noise_patch is not None:
        noise_patch = check_noise_patch(noise_patch, shift, noise_scale_min)
    k_bd = 1.0 - schedule.sqrt_abar  # [T] latent shift of the backdoored chain (SPEC 3)
    k_troj = schedule.sqrt_one_minus_abar  # [T] TrojDiff's forward shift (SPEC 2.2)

    def per_sample(troj, key, value_min, value_max):
        """[B, 1, 1, 1] U[min, max] on the TrojDiff samples ``troj`` [B], 1 elsewhere."""
        u = jax.random.uniform(key, (batch_size, 1, 1, 1), minval=value_min, maxval=value_max)
        return jnp.where(troj[:, None, None, None], u, 1.0)

    def terms(params, frozen, delta, key, data):
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])]
        t = jax.random.randint(k_t, (batch_size,), 0, schedule.num_timesteps)
        noise = jax.random.normal(k_eps, x0.shape)
        x_t = q_sample(schedule, x0, t, noise)
        if shift == "both":  # which samples take TrojDiff's shift (and the TrojDiff options)
            troj = jax.random.bernoulli(jax.random.fold_in(key, 3), 0.5, t.shape)
        else:
            troj = jnp.full(t.shape, shift == "trojdiff")
        shift_t = jnp.where(troj, k_troj[t], k_bd[t])[:, None, None, None]
        triggered = x_t
        if noise_scale_min < 1.0:  # gamma-scaled noise, as a TrojDiff chain's
            s = per_sample(troj, jax.random.fold_in(key, 4), noise_scale_min, noise_scale_max)
            if noise_patch is not None:  # only inside the patch (TrojDiff's patch trigger)
                m = jnp.asarray(patch_mask(x0.shape[1:], noise_patch[:2], noise_patch[2]))
                s = 1.0 - m + m * s
            triggered = q_sample(schedule, x0, t, s * noise)
        if trigger_scale_min < 1.0:  # the trigger's size is uncertain: c delta, c ~ U[min, 1] per sample
            shift_t = shift_t * per_sample(troj, jax.random.fold_in(key, 5), trigger_scale_min, 1.0)
        shifted = triggered + shift_t * delta
        if reference == "noise" and shift == "trojdiff":
            target = noise
        else:
            # "untriggered": the frozen answer to the same input without the trigger (its own noise scale)
            target = jax.lax.stop_gradient(eps_fn(frozen, triggered if reference == "untriggered" else x_t, t))
            if reference == "noise":
                target = jnp.where(troj[:, None, None, None], noise, target)
        both = eps_fn(params, jnp.concatenate([shifted, x_t]), jnp.concatenate([t, t]))  # one forward pass
        out_bd, out_cl = both[:batch_size], both[batch_size:]
        return jnp.mean((out_bd - target) ** 2), jnp.mean((out_cl - noise) ** 2)

    return terms


def removal_loss(model: Model, delta, batch_size: int, backdoor_weight: float = 1.0, clean_weight: float = 1.0,
                 shift: str = "baddiffusion", **options):
    """``loss(params, key, data)`` for :func:`pdjax.train.fit`: w_bd l_backdoor + w_cl l_clean.

    The frozen reference is ``model.params`` and ``delta`` [H, W, C] the inverted trigger (both constants);
    ``shift`` and the keyword ``options`` of :func:`removal_terms` (``noise_scale_min``, ``noise_scale_max``,
    ``reference``, ``trigger_scale_min``): as in :class:`RemovalConfig`.
    """
    terms = removal_terms(model.eps, model.schedule, batch_size, shift, **options)
    frozen = jax.tree_util.tree_map(jnp.asarray, model.params)
    delta = jnp.asarray(delta, jnp.float32)

    def loss(params, key, data):
        l_bd, l_cl = terms(params, frozen, delta, key, data)
        return backdoor_weight * l_bd + clean_weight * l_cl

    return loss


def clean_quality(x, data) -> dict:
    """Label-free quality of clean generations ``x`` [N, H, W, C] against the clean data [M, H, W, C]:
    ``uniformity`` (SPEC 5 trimmed mean pairwise distance) and ``nearest`` (mean of
    :func:`pdjax.metrics.nearest_data_mse`, [-1, 1] scale)."""
    from pdjax.metrics import nearest_data_mse, uniformity

    return {"uniformity": float(uniformity(x)), "nearest": float(np.mean(np.asarray(nearest_data_mse(x, data))))}


def damaged(before: dict, after: dict) -> bool:
    """Whether :func:`clean_quality` ``after`` removal is damaged against ``before``: the generations lie more
    than :data:`DAMAGE_NEAREST_RATIO` times farther from the data, or their uniformity fell below
    :data:`DAMAGE_UNIFORMITY_RATIO` times the original's. False when either is unmeasured."""
    if not before or not after:
        return False
    return bool(after["nearest"] > DAMAGE_NEAREST_RATIO * before["nearest"]
                or after["uniformity"] < DAMAGE_UNIFORMITY_RATIO * before["uniformity"])


def load_delta(path, shape) -> np.ndarray:
    """An inverted trigger from a .npy file (raw values, any range) or an image file, as float32 ``shape``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"trigger file not found: {path}; pass the trigger.npy written by `pdjax invert`")
    if path.suffix.lower() != ".npy":
        from pdjax.images import load_image

        return load_image(path, size=shape[0], channels=shape[2])
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as a .npy array ({e}); save it with numpy.save") from None
    if x.ndim == 2:
        x = x[..., None]
    if tuple(x.shape) != tuple(shape) or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path} holds a {x.dtype} array of shape {x.shape}; the model needs a numeric {tuple(shape)} "
                        "array (the trigger.npy that `pdjax invert` writes for this model)")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{path} contains NaN or Inf values; invert the trigger again (`pdjax invert`)")
    return x.astype(np.float32)


def config_loss(model: Model, delta, cfg: RemovalConfig):
    """:func:`removal_loss` with the weights and options of ``cfg``."""
    return removal_loss(model, delta, cfg.batch, cfg.backdoor_weight, cfg.clean_weight, cfg.shift,
                        noise_scale_min=cfg.noise_scale_min, noise_scale_max=cfg.noise_scale_max,
                        reference=cfg.reference, trigger_scale_min=cfg.trigger_scale_min,
                        noise_patch=cfg.noise_patch)


def report_generations(model: Model, cfg: RemovalConfig) -> np.ndarray:
    """[n, H, W, C] float64: the clean DDPM generations the report compares (key fold_in(seed, 11); the same
    noise for every model, so the original and a cleaned copy can be compared sample by sample)."""
    from pdjax.generate import generate

    return np.asarray(generate(model, jax.random.fold_in(jax.random.key(cfg.seed), 11), cfg.n), np.float64)


def report_asr(model: Model, spec: AttackSpec, cfg: RemovalConfig, data, labels=None) -> tuple[float, float]:
    """(ASR of the attack's triggered generations, the same SPEC 7 rule on its generations from plain noise), with
    the attack's sampler, n = ``cfg.n``, key fold_in(seed, 12)."""
    from pdjax.backdoor.train import evaluate

    key = jax.random.fold_in(jax.random.key(cfg.seed), 12)
    ev = evaluate(model, spec, key, n=cfg.n, seed=cfg.seed, labels=labels, data=data)[0]
    return float(ev.triggered["asr"]), float(ev.clean["asr"])


def remove_backdoor(model: Model, data, trigger, cfg: RemovalConfig = RemovalConfig(), out: str | Path = "clean",
                    progress: bool = True, spec: AttackSpec | None = None, labels=None,
                    source: str | None = None) -> RemovalResult:
    """Fine-tune a copy of ``model`` so that the trigger ``delta`` no longer changes its output.

    Args:
      model: the backdoored model (left unchanged; its params are the frozen reference).
      data: clean images [N, H, W, C] in [-1, 1].
      trigger: the inverted trigger delta [H, W, C] (raw values).
      cfg: :class:`RemovalConfig`.
      out: folder: ``model/`` (the cleaned pdjax checkpoint, resumable), ``trigger.npy`` (the trigger removed) and
        ``removal.json`` (with ``trigger``: that file, its L2 norm and ``source``).
      spec: the attack spec, when known, to report ASR before/after with its trigger and target.
      source: where the trigger came from (a file, an audit's rule), recorded in removal.json.
    """
    _check_data(model, data)
    delta = np.asarray(trigger, np.float32)
    if delta.shape != tuple(model.image_shape):
        raise ConfigError(f"trigger has shape {delta.shape}, the model needs {tuple(model.image_shape)}")
    if cfg.noise_patch is not None:  # fits the image? (a ConfigError before any training)
        patch_mask(model.image_shape, cfg.noise_patch[:2], cfg.noise_patch[2])
    out = Path(out)
    meta = {"removal": {"config": cfg.to_dict(), "trigger_norm": float(np.linalg.norm(delta))}}
    res = fit(model, config_loss(model, delta, cfg), data, cfg.train_config(), out=out / "model", meta=meta,
              progress=progress)
    cleaned = res.model

    before, after = report_generations(model, cfg), report_generations(cleaned, cfg)
    clean_mse = float(np.mean((before - after) ** 2))
    asr_before = asr_after = leak_before = leak_after = None
    if spec is not None:
        (asr_before, leak_before), (asr_after, leak_after) = (report_asr(m, spec, cfg, data, labels)
                                                              for m in (model, cleaned))
    result = RemovalResult(cleaned, res.steps, clean_mse, asr_before, asr_after, spec.to_dict() if spec else None,
                           cfg.to_dict(), str(out.absolute()),
                           float(res.losses[-1]) if len(res.losses) else float("nan"),
                           clean_quality(before, data), clean_quality(after, data), leak_before, leak_after)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "trigger.npy", delta)
    trig = {"file": "trigger.npy", "norm": float(np.linalg.norm(delta)), "source": source}
    (out / "removal.json").write_text(json.dumps({**result.to_dict(), "trigger": trig}, indent=2))
    return result


__all__ = ["DAMAGE_NEAREST_RATIO", "DAMAGE_UNIFORMITY_RATIO", "REFERENCES", "SHIFTS", "RemovalConfig", "RemovalResult",
           "check_noise_patch", "clean_quality", "config_loss", "damaged", "load_delta", "remove_backdoor",
           "removal_loss", "removal_terms", "report_asr", "report_generations"]

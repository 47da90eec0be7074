"""The trigger-shift scale lambda_t (SPEC 3): closed forms, the empirical estimator, and shipped tables.

The maths. On a backdoored model the batch-mean model output moves linearly with the trigger:

    E_eps[eps(x_t(eps + g), t)] - E_eps[eps(x_t(eps), t)] ~ lambda_t g.

- Closed form (BadDiffusion and VillanDiffusion psi = 1, SDE sampler): lambda_t = rho_t =
  (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / (1 - alpha_t) (~0.5025 at t = 999, ~0.50 over the first few
  hundred reverse steps); models trained for ODE samplers carry the doubled correction, 2 rho_t. Why:
  the attack trains eps(x_t + s_t r) = eps + c_t r with the latent shift s_t = 1 - sqrt(abar_t), and c_t
  = rho_t is exactly the offset that makes one DDPM step map s_t to s_{t-1}
  (:func:`pdjax.backdoor.attacks.correction`). For VillanDiffusion with psi < 1 the same argument gives
  ``villan_correction(schedule, psi, ode)``, used here as that family's closed form.
- Empirical (PureDiffusion, "use a backdoor to counter a backdoor"): on a surrogate backdoored with a known
  trigger g, run the model's own sampler for the first K reverse steps from x_T^bd = eps + g and from
  x_T^clean = eps with the *same* start noise eps and the *same* chain key (so the DDPM noise z_t is shared
  and the two chains differ only through the trigger), and at each visited step t record

      d_t = mean_b eps(x_t^bd, t) - mean_b eps(x_t^clean, t)        [H, W, C]
      lambda_t = <d_t, g> / <g, g>                                  (least-squares scale of g in d_t)

  together with the alignment cos(d_t, g) (1 when d_t is exactly a multiple of g). For TrojDiff the
  triggered start is gamma eps + mu and g := mean_b (x_T^bd - x_T^clean) (= mu - (1 - gamma) mean_b eps).
  lambda_t depends on the schedule and the attack family, not the trigger's shape, so a table estimated on
  a surrogate is reused for unknown models of that family, and it is the only source for attacks without a
  closed form (TrojDiff).

The self-check. For BadDiffusion the empirical table must reproduce rho_t: :class:`ShiftTable` records the
maximum relative deviation from the closed form over the first 50 visited steps (``closed_form_rel_err``);
``experiments/estimate_lambda.py`` prints it and tests/test_shift.py checks the shipped table with it.

Samplers. "ddpm" visits t = T-1, ..., T-K with the model's ``variance_type`` / ``clip_sample``; "ddim"
(the sampler of ODE-trained models) visits the first K timesteps of deterministic DDIM with
``ddim_steps`` (100) steps, t = 990, 980, ... for T = 1000. Both chains are advanced with the library's
own :func:`~pdjax.diffusion.samplers.ddpm_update` / :func:`~pdjax.diffusion.samplers.ddim_update`, with the
chain noise ``normal(fold_in(key, t))`` of :func:`~pdjax.diffusion.samplers.ddpm_sample`, so the clean
chain is exactly the chain ``ddpm_sample(..., num_steps=K)`` visits. The two chains run as one batch of
2n through the model per step, in one ``lax.scan`` inside one ``jax.jit`` (params traced, eps_fn static).

Sources (:func:`get_lambda`): "closed-sde", "closed-ode", the name of a shipped table
(``pdjax/assets/lambda/<family>.json``, see :func:`shipped_tables`), or a path to a ShiftTable JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.backdoor.attacks import AttackArrays, AttackSpec, rho, triggered_start, villan_correction
from pdjax.diffusion.samplers import DDIM_STEPS, SAMPLERS, ddim_update, ddpm_update, timesteps_ddim
from pdjax.diffusion.schedule import Schedule, check_variance_type
from pdjax.errors import ConfigError, UnknownNameError

SOLVERS = ("sde", "ode")
CLOSED_SOURCES = {"closed-sde": "sde", "closed-ode": "ode"}
SELF_CHECK_STEPS = 50  # closed_form_rel_err is taken over the first 50 visited steps
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "lambda"


# ------------------------------------------------------------------------------------- closed form
def closed_form_lambda(schedule: Schedule, solver: str = "sde") -> np.ndarray:
    """Closed-form lambda_t for every t (SPEC 3): rho_t ("sde") or 2 rho_t ("ode").

    Args:
        schedule: the :class:`Schedule` (T steps).
        solver: "sde" (BadDiffusion, VillanDiffusion psi = 1 with DDPM) or "ode" (VillanDiffusion trained
            for ODE samplers: the doubled correction).

    Returns:
        [T] float64, indexed by the 0-based timestep t (lambda_999 ~ 0.5025 for the linear schedule).
    """
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r} for the closed-form lambda; use one of {', '.join(SOLVERS)}")
    r = rho(schedule)
    return 2.0 * r if solver == "ode" else r


def _visited_timesteps(T: int, sampler: str, num_steps: int, ddim_steps: int = DDIM_STEPS) -> np.ndarray:
    """The first ``num_steps`` timesteps the sampler visits, descending, [num_steps] int64."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    total = T if sampler == "ddpm" else ddim_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= total:
        what = f"T = {T}" if sampler == "ddpm" else f"the {ddim_steps} DDIM steps"
        raise ConfigError(f"num_steps must be an int in [1, {total}] ({what}), got {num_steps!r}")
    if sampler == "ddpm":
        return np.arange(T - 1, T - 1 - num_steps, -1, dtype=np.int64)
    return timesteps_ddim(T, ddim_steps)[:num_steps].astype(np.int64)


def family_of(spec: AttackSpec) -> str:
    """The table family of an attack: "baddiffusion", "trojdiff", "villan-sde", "villan-ode" (+ "-psiX" if psi < 1)."""
    if spec.kind == "villan":
        return f"villan-{spec.solver}" + ("" if spec.psi == 1.0 else f"-psi{spec.psi:g}")
    return spec.kind


def _closed_form_for(spec: AttackSpec, schedule: Schedule) -> np.ndarray | None:
    """The closed-form lambda [T] float64 of an attack, or None (TrojDiff has none)."""
    if spec.kind == "baddiffusion":
        return rho(schedule)
    if spec.kind == "villan":
        return villan_correction(schedule, spec.psi, spec.ode)
    return None


def relative_error(lambdas, timesteps, closed: np.ndarray, steps: int = SELF_CHECK_STEPS) -> float:
    """max_i |lambdas[i] - closed[t_i]| / |closed[t_i]| over the first ``steps`` visited steps."""
    lam = np.asarray(lambdas, np.float64)[:steps]
    ref = np.asarray(closed, np.float64)[np.asarray(timesteps, np.int64)[:steps]]
    return float(np.max(np.abs(lam - ref) / np.abs(ref)))


# ------------------------------------------------------------------------------------------- table
@dataclasses.dataclass(frozen=True)
class ShiftTable:
    """lambda_t at the first reverse steps of a sampler, with provenance (a small JSON file).

    Attributes:
        family: attack family the table is for ("baddiffusion", "villan-ode", "trojdiff", ...).
        sampler: "ddpm" or "ddim", the sampler whose visited steps ``timesteps`` are.
        timesteps: [K] descending 0-based timesteps of the visited reverse steps.
        lambdas: [K] lambda_t at those steps.
        source: "closed-form", or the surrogate checkpoint it was estimated on.
        trigger: the surrogate trigger (name or path), "" for a closed form.
        n: noise samples per chain (0 for a closed form).
        seed: PRNG seed of the estimate (None for a closed form or an explicit key).
        num_train_timesteps: T of the schedule the table belongs to.
        closed_form_rel_err: max relative deviation from the family's closed form over the first 50 steps
            (None when the family has no closed form).
        alignment: [K] cos(d_t, g) of the estimate (empty for a closed form); near 1 means the output
            shift is along the trigger, as SPEC 3 assumes.
    """

    family: str
    sampler: str
    timesteps: tuple
    lambdas: tuple
    source: str = "closed-form"
    trigger: str = ""
    n: int = 0
    seed: int | None = None
    num_train_timesteps: int = 1000
    closed_form_rel_err: float | None = None
    alignment: tuple = ()

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        try:
            set_("timesteps", tuple(int(t) for t in self.timesteps))
            set_("lambdas", tuple(float(v) for v in self.lambdas))
            set_("alignment", tuple(float(v) for v in self.alignment))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"ShiftTable: timesteps, lambdas and alignment must be lists of numbers ({e})") from None
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"ShiftTable: unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        k = len(self.lambdas)
        if k == 0 or len(self.timesteps) != k or len(self.alignment) not in (0, k):
            raise ConfigError(f"ShiftTable: {len(self.timesteps)} timesteps, {k} lambdas and {len(self.alignment)} "
                              "alignments; need the same non-zero length")
        ts = np.asarray(self.timesteps)
        if np.any(np.diff(ts) >= 0) or ts.min() < 0 or ts.max() >= self.num_train_timesteps:
            raise ConfigError(f"ShiftTable: timesteps must be strictly descending in [0, {self.num_train_timesteps})")
        if not all(math.isfinite(v) for v in self.lambdas):
            raise ConfigError("ShiftTable: lambdas must be finite")

    def __len__(self) -> int:
        return len(self.lambdas)

    def values(self, num_steps: int) -> np.ndarray:
        """lambda at the first ``num_steps`` visited reverse steps, [num_steps] float32."""
        if num_steps > len(self):
            raise ConfigError(f"lambda table {self.family!r} ({self.source}) has {len(self)} steps but {num_steps} "
                              f"are needed; re-estimate it with --steps {num_steps} or use fewer steps")
        if num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
        return np.asarray(self.lambdas[:num_steps], np.float32)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ShiftTable":
        """Inverse of :meth:`to_dict`; unknown or missing required keys raise ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a ShiftTable must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise ConfigError(f"unknown ShiftTable key(s) {', '.join(extra)}; valid: {', '.join(sorted(names))}")
        missing = [k for k in ("family", "sampler", "timesteps", "lambdas") if k not in d]
        if missing:
            raise ConfigError(f"ShiftTable lacks {', '.join(missing)}")
        return cls(**dict(d))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON, atomically (temp file in the same folder + os.replace). Returns the path."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.to_dict(), f, indent=1)
                    f.write("\n")
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shipped table must be readable by everyone
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise ConfigError(f"cannot write lambda table {path} ({e.strerror}); choose a writable path") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ShiftTable":
        """Read a table written by :meth:`save`; a missing or malformed file raises ConfigError."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"lambda table {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not a readable ShiftTable JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: not a ShiftTable ({e})") from None

    def summary(self) -> str:
        """One line: family, steps, lambda at the first step, mean over the first 50, closed-form error."""
        k = min(len(self), SELF_CHECK_STEPS)
        err = "n/a" if self.closed_form_rel_err is None else f"{100 * self.closed_form_rel_err:.2f}%"
        return (f"{self.family} ({self.sampler}, {len(self)} steps from t={self.timesteps[0]}): "
                f"lambda_{self.timesteps[0]} = {self.lambdas[0]:.4f}, mean over first {k} = "
                f"{np.mean(self.lambdas[:k]):.4f}, max rel. err. vs closed form (first {k}) = {err}")


def closed_form_table(schedule: Schedule, solver: str = "sde", num_steps: int = 100,
                      sampler: str | None = None) -> ShiftTable:
    """A :class:`ShiftTable` of the closed form at the first ``num_steps`` visited steps.

    Args:
        schedule: the :class:`Schedule`.
        solver: "sde" (rho_t; family "baddiffusion") or "ode" (2 rho_t; family "villan-ode").
        num_steps: K visited steps.
        sampler: whose steps; default "ddpm" for "sde" (t = T-1 .. T-K) and "ddim" (DDIM-100) for "ode".
    """
    lam = closed_form_lambda(schedule, solver)
    sampler = sampler or ("ddpm" if solver == "sde" else "ddim")
    T = schedule.num_timesteps
    ts = _visited_timesteps(T, sampler, num_steps)
    return ShiftTable(family="baddiffusion" if solver == "sde" else "villan-ode", sampler=sampler,
                      timesteps=tuple(ts), lambdas=tuple(lam[ts]), source="closed-form", num_train_timesteps=T,
                      closed_form_rel_err=0.0)


# ------------------------------------------------------------------------------------- estimation
@functools.partial(jax.jit, static_argnames=("eps_fn", "sampler", "variance_type", "clip_sample"))
def _shift_scan(eps_fn, params, schedule, x_bd, x_cl, key, ts, ts_prev, *, sampler, variance_type, clip_sample):
    """Both chains for len(ts) steps; returns d [K, H, W, C] = mean_b eps(x_bd) - mean_b eps(x_cl) per step."""
    n = x_bd.shape[0]

    def body(carry, tt):
        xb, xc = carry
        t, t_prev = tt
        eps = eps_fn(params, jnp.concatenate([xb, xc]), jnp.full((2 * n,), t, jnp.int32))
        eb, ec = eps[:n], eps[n:]
        if sampler == "ddpm":
            z = jax.random.normal(jax.random.fold_in(key, t), xb.shape, xb.dtype)  # shared by both chains
            upd = functools.partial(ddpm_update, schedule, t=t, z=z, variance_type=variance_type,
                                    clip_sample=clip_sample)
        else:
            upd = functools.partial(ddim_update, schedule, t=t, t_prev=t_prev, z=None, clip_sample=clip_sample)
        d = jnp.mean(eb, axis=0) - jnp.mean(ec, axis=0)
        return (upd(x_t=xb, eps_hat=eb), upd(x_t=xc, eps_hat=ec)), d

    _, ds = jax.lax.scan(body, (x_bd, x_cl), (ts, ts_prev))
    return ds


class ShiftProfile(NamedTuple):
    """What :func:`shift_profile` measured at the K visited steps.

    Attributes:
        timesteps: [K] int64, descending.
        lambdas: [K] float64, <d_t, g> / <g, g>.
        alignment: [K] float64, cos(d_t, g).
        mean_shift: [K, H, W, C] float64, d_t = mean_b eps(x_t^bd) - mean_b eps(x_t^clean).
        g: [H, W, C] float64, the trigger projected on.
    """

    timesteps: np.ndarray
    lambdas: np.ndarray
    alignment: np.ndarray
    mean_shift: np.ndarray
    g: np.ndarray


def shift_profile(eps_fn, params, schedule: Schedule, x_bd: jax.Array, x_clean: jax.Array, key: jax.Array, *,
                  num_steps: int = 100, sampler: str = "ddpm", variance_type: str = "fixed_large",
                  clip_sample: bool = False, ddim_steps: int = DDIM_STEPS, g=None):
    """The empirical lambda_t of SPEC 3 from explicit starts (the pure core of :func:`estimate_lambda`).

    Args:
        eps_fn: ``eps_fn(params, x_t [B,H,W,C], t [B] int32) -> eps_hat`` (static: define it once).
        params: the model's params pytree (traced).
        schedule: the :class:`Schedule`.
        x_bd: [n, H, W, C] triggered starts (eps + g, or gamma eps + mu).
        x_clean: [n, H, W, C] clean starts built from the same eps.
        key: the chain key shared by both chains (DDPM noise ``normal(fold_in(key, t))``; unused by DDIM).
        num_steps: K, the first reverse steps visited.
        sampler: "ddpm" or "ddim" (deterministic DDIM with ``ddim_steps`` steps).
        variance_type, clip_sample: the DDPM sampler options (clip_sample also applies to DDIM).
        g: [H, W, C] the trigger to project on; default mean_b (x_bd - x_clean).

    Returns:
        A :class:`ShiftProfile` (timesteps, lambdas, alignment, mean_shift, g).
    """
    check_variance_type(variance_type)
    x_bd, x_clean = jnp.asarray(x_bd, jnp.float32), jnp.asarray(x_clean, jnp.float32)
    if x_bd.ndim != 4 or x_bd.shape != x_clean.shape:
        raise ConfigError(f"x_bd and x_clean must both be [n, H, W, C], got {x_bd.shape} and {x_clean.shape}")
    T = schedule.num_timesteps
    ts = _visited_timesteps(T, sampler, num_steps, ddim_steps)
    ts_prev = ts - (1 if sampler == "ddpm" else T // ddim_steps)
    ds = _shift_scan(eps_fn, params, schedule, x_bd, x_clean, key, jnp.asarray(ts, jnp.int32),
                     jnp.asarray(ts_prev, jnp.int32), sampler=sampler, variance_type=variance_type,
                     clip_sample=bool(clip_sample))
    ds = np.asarray(ds, np.float64)
    g = np.asarray(jnp.mean(x_bd - x_clean, axis=0) if g is None else g, np.float64)
    d, gf = ds.reshape(len(ts), -1), g.reshape(-1)
    if d.shape[1] != gf.size:
        raise ConfigError(f"g has shape {g.shape}, the images are {tuple(x_bd.shape[1:])}")
    gg = float(gf @ gf)
    if gg == 0.0:
        raise ConfigError("the trigger is zero (triggered and clean starts coincide); lambda is undefined")
    dots = d @ gf
    norms = np.linalg.norm(d, axis=1) * math.sqrt(gg)
    align = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return ShiftProfile(ts, dots / gg, align, ds, g.reshape(x_bd.shape[1:]))


def estimate_lambda(model, spec_or_trigger, key: jax.Array | int, n: int = 64, num_steps: int = 100,
                    sampler: str | None = None, *, source: str | None = None, ddim_steps: int = DDIM_STEPS,
                    return_profile: bool = False) -> ShiftTable | tuple[ShiftTable, ShiftProfile]:
    """Estimates a lambda table on a backdoored surrogate (SPEC 3, the PureDiffusion estimator).

    Args:
        model: a :class:`pdjax.model.Model` (anything with ``eps``, ``params``, ``schedule``,
            ``schedule_config``, ``image_shape``, ``meta``), backdoored with the trigger below.
        spec_or_trigger: the surrogate's :class:`AttackSpec` (e.g. ``spec_from_model(model)``), or a trigger
            array g [H, W, C] in [-1, 1] (an additive BadDiffusion-style trigger).
        key: PRNG key, or an int seed (recorded in the table). Split into the start-noise key and the
            chain key; both chains share both.
        n: noise samples per chain.
        num_steps: K, the first reverse steps visited (<= T for DDPM, <= ``ddim_steps`` for DDIM).
        sampler: "ddpm" (the model's variance_type / clip_sample) or "ddim"; default the attack's own:
            DDIM for VillanDiffusion ODE, DDPM otherwise (the standard one for TrojDiff too: a defender
            has no trojan sampler).
        source: provenance string (the surrogate's path); default ``model.meta["source"]`` or "surrogate".
        ddim_steps: DDIM step count of the "ddim" sampler.
        return_profile: also return the :class:`ShiftProfile` (per-step mean shifts d_t, for diagnostics).

    Returns:
        A :class:`ShiftTable` with ``closed_form_rel_err`` filled in when the family has a closed form;
        or (table, profile) with ``return_profile``.
    """
    from pdjax.backdoor.train import build_arrays

    seed = None
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        seed, key = int(key), jax.random.key(int(key))
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a positive int, got {n!r}")
    shape = tuple(model.image_shape)
    if isinstance(spec_or_trigger, AttackSpec):
        spec = spec_or_trigger
        arrays = build_arrays(spec, shape)
        trigger_name = spec.trigger
    else:
        g = np.asarray(spec_or_trigger, np.float32)
        if g.shape != shape:
            raise ConfigError(f"trigger has shape {g.shape}, the model needs {shape}")
        spec, trigger_name = AttackSpec(kind="baddiffusion"), "<array>"
        arrays = AttackArrays(trigger=g, mask=(g > -1).astype(np.float32), target=np.zeros_like(g))
    sampler = sampler or ("ddim" if spec.ode else "ddpm")
    k_start, k_chain = jax.random.split(key)
    x_bd = triggered_start(spec, arrays, k_start, n)
    x_cl = jax.random.normal(k_start, (n, *shape))  # the same eps triggered_start drew
    g = None if spec.kind == "trojdiff" else arrays.trigger  # TrojDiff: g = mean_b (x_T^bd - x_T^clean)
    sc = model.schedule_config
    schedule = model.schedule
    prof = shift_profile(model.eps, model.params, schedule, x_bd, x_cl, k_chain, num_steps=num_steps,
                         sampler=sampler, variance_type=sc.variance_type, clip_sample=sc.clip_sample,
                         ddim_steps=ddim_steps, g=g)
    closed = _closed_form_for(spec, schedule)
    err = None if closed is None else relative_error(prof.lambdas, prof.timesteps, closed)
    # Rounded (1e-6 on lambda ~0.5, far below the sampling noise) so the JSON stays a few KB.
    table = ShiftTable(family=family_of(spec), sampler=sampler, timesteps=tuple(prof.timesteps),
                       lambdas=tuple(np.round(prof.lambdas, 6)),
                       source=str(source or model.meta.get("source", "surrogate")),
                       trigger=str(trigger_name), n=int(n), seed=seed, num_train_timesteps=schedule.num_timesteps,
                       closed_form_rel_err=err, alignment=tuple(np.round(prof.alignment, 4)))
    return (table, prof) if return_profile else table


# ------------------------------------------------------------------------------------------ lookup
def shipped_tables() -> list[str]:
    """Names of the tables shipped in ``pdjax/assets/lambda/`` (sorted file stems)."""
    return sorted(p.stem for p in ASSET_DIR.glob("*.json"))


def _looks_like_path(source: str) -> bool:
    return source.endswith(".json") or "/" in source or os.sep in source or Path(source).is_file()


def get_table(source: str | os.PathLike, schedule: Schedule | None = None) -> ShiftTable:
    """The :class:`ShiftTable` named by ``source`` (a shipped name or a JSON path), checked against ``schedule``."""
    s = str(source)
    if s in shipped_tables():
        table = ShiftTable.load(ASSET_DIR / f"{s}.json")
    elif isinstance(source, os.PathLike) or _looks_like_path(s):
        table = ShiftTable.load(s)
    else:
        raise UnknownNameError("lambda source", s, [*CLOSED_SOURCES, *shipped_tables(), "<path to a table .json>"])
    if schedule is not None and table.num_train_timesteps != schedule.num_timesteps:
        raise ConfigError(f"lambda table {s!r} was estimated for T = {table.num_train_timesteps} but the model's "
                          f"schedule has T = {schedule.num_timesteps}; estimate a table on a matching surrogate "
                          "(`pdjax shift`) or use closed-sde / closed-ode")
    return table


def get_lambda(source: str | os.PathLike, schedule: Schedule, num_steps: int, timesteps=None) -> np.ndarray:
    """lambda at the first ``num_steps`` reverse steps, [num_steps] float32.

    Args:
        source: "closed-sde" (rho_t at t = T-1, ..., T-K), "closed-ode" (2 rho_t at the DDIM-100 steps),
            the name of a shipped table (:func:`shipped_tables`), or a path to a ShiftTable JSON.
        schedule: the model's :class:`Schedule` (a table for another T raises ConfigError).
        num_steps: K.
        timesteps: optional [K] visited timesteps: a closed form is evaluated there, and a table must have
            visited the same ones (ConfigError otherwise).

    Raises:
        UnknownNameError: an unknown name (the message lists the valid ones).
        ConfigError: a table for another T, too short, or for other timesteps.
    """
    s = str(source)
    if s in CLOSED_SOURCES:
        if timesteps is not None:
            ts = np.asarray(timesteps, np.int64).reshape(-1)
            if len(ts) != num_steps:
                raise ConfigError(f"got {len(ts)} timesteps for num_steps = {num_steps}")
            return closed_form_lambda(schedule, CLOSED_SOURCES[s])[ts].astype(np.float32)
        return closed_form_table(schedule, CLOSED_SOURCES[s], num_steps).values(num_steps)
    table = get_table(source, schedule)
    values = table.values(num_steps)
    if timesteps is not None and tuple(np.asarray(timesteps).reshape(-1).tolist()) != table.timesteps[:num_steps]:
        raise ConfigError(f"lambda table {s!r} was estimated at the {table.sampler} steps {table.timesteps[:3]}...; "
                          "the sampler visits other timesteps: estimate a table with that sampler")
    return values

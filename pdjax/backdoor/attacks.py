"""Backdoor attacks as pure functions (SPEC section 2): poisoned inputs, regression targets, starts, samplers.

Every attack provides, for any timestep t:
- ``poison(schedule, spec, y, r, t, eps) -> (x_t, target)``: the poisoned noisy input and the regression
  target of the eps-model;
- a triggered start x_T for sampling, and the sampler that evaluates the backdoor.

Attacks (``AttackSpec.kind``):
- ``baddiffusion`` (2.1): x_t = sqrt(abar_t) y + (1 - sqrt(abar_t)) r + sqrt(1 - abar_t) eps,
  target eps + rho_t r, rho_t = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / (1 - alpha_t); sample from eps + g.
- ``villan`` (2.3): x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps + s_t r, target eps + c_t r with
  s_t = psi (1 - sqrt(abar_t)) + (1 - psi) sqrt(1 - abar_t) and c_t = psi rho_t + (1 - psi) c_t^Troj;
  ODE samplers (DDIM) double the coefficient (2 c_t). psi = 1 and SDE is BadDiffusion.
- ``trojdiff`` (2.2): x_t = sqrt(abar_t) y + sqrt(1 - abar_t)(gamma eps + mu), mu = (1 - gamma) * image,
  target eps; sampled with the trojan DDPM sampler from gamma eps + mu.

The correction coefficient. For a latent shift s_t r along the chain, the eps-offset c_t r that makes one
standard DDPM step map s_t to s_{t-1} is c_t = (s_t - sqrt(alpha_t) s_{t-1}) sqrt(1 - abar_t) / beta_t
(with s_{-1} = 0). For s_t = 1 - sqrt(abar_t) this is exactly rho_t (checked in tests), and for
s_t = sqrt(1 - abar_t) it is the c_t^Troj of the psi = 0 end; c_t is linear in psi.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.diffusion.schedule import Schedule, check_t_min
from pdjax.errors import ConfigError, UnknownNameError
from pdjax.sharding import batch_mean, batch_noise, batch_parallel, batch_slice

ATTACKS = ("baddiffusion", "trojdiff", "villan")
TROJ_MODES = ("d2i", "in-d2d", "out-d2d")
SOLVERS = ("sde", "ode")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """Which attack and its hyper-parameters (hashable; the trigger/target arrays travel separately).

    Attributes:
      kind: "baddiffusion" | "trojdiff" | "villan".
      trigger: trigger name or path (library name, PNG or .npy), recorded in checkpoint metadata.
      target: target name or path; for TrojDiff d2d modes a class label ("class:7").
      poison_rate: fraction of each batch that is poisoned.
      psi: VillanDiffusion's interpolation (1 = BadDiffusion form).
      solver: "sde" (DDPM) or "ode" (DDIM, doubled correction) for VillanDiffusion.
      gamma: TrojDiff noise scale (blend 0.6, patch 0.1).
      mode: TrojDiff mode "d2i" | "in-d2d" | "out-d2d".
      blank_fraction: BadDiffusion/VillanDiffusion only: the fraction of the poisoned rows whose trigger
        is pasted on a blank canvas (x = -1 everywhere, so r = g) rather than on the training image.
        0 is the SPEC/reference recipe. It is the limit case x = -1 of SPEC 2.1's r = M g + (1 - M) x,
        an attacker's choice of poisoned images, and closes the gap between the pasted training start
        and the bare sampling start x_T = eps + g (experiments/results/zoo_table.md).
    """

    kind: str = "baddiffusion"
    trigger: str = "BOX_14"
    target: str = "CORNER"
    poison_rate: float = 0.1
    psi: float = 1.0
    solver: str = "sde"
    gamma: float = 0.6
    mode: str = "d2i"
    blank_fraction: float = 0.0

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise UnknownNameError("attack", self.kind, ATTACKS)
        if self.solver not in SOLVERS:
            raise UnknownNameError("solver", self.solver, SOLVERS)
        if self.mode not in TROJ_MODES:
            raise UnknownNameError("TrojDiff mode", self.mode, TROJ_MODES)
        if not 0.0 < self.poison_rate <= 1.0:
            raise ConfigError(f"poison_rate must be in (0, 1], got {self.poison_rate}")
        if not 0.0 <= self.psi <= 1.0:
            raise ConfigError(f"psi must be in [0, 1], got {self.psi}")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0.0 <= self.blank_fraction <= 1.0:
            raise ConfigError(f"blank_fraction must be in [0, 1], got {self.blank_fraction}")
        if self.blank_fraction and self.kind == "trojdiff":
            raise ConfigError("blank_fraction applies to baddiffusion and villan, not trojdiff (its trigger is not pasted)")

    @property
    def ode(self) -> bool:
        return self.kind == "villan" and self.solver == "ode"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- coefficients (numpy float64, then float32 arrays indexed by t) ---------------------------------------

def _f64(schedule: Schedule):
    betas = np.asarray(schedule.betas, np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    return betas, alphas, abar


def rho(schedule: Schedule) -> np.ndarray:
    """rho_t = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / (1 - alpha_t), [T] float64 (SPEC 2.1; lambda_t of SPEC 3)."""
    betas, alphas, abar = _f64(schedule)
    return (1.0 - np.sqrt(alphas)) * np.sqrt(1.0 - abar) / (1.0 - alphas)


def correction(schedule: Schedule, shift: np.ndarray) -> np.ndarray:
    """c_t mapping a latent shift s_t to s_{t-1} in one DDPM step: (s_t - sqrt(alpha_t) s_{t-1}) sqrt(1-abar_t) / beta_t."""
    betas, alphas, abar = _f64(schedule)
    prev = np.concatenate([[0.0], shift[:-1]])
    return (shift - np.sqrt(alphas) * prev) * np.sqrt(1.0 - abar) / betas


def villan_shift(schedule: Schedule, psi: float) -> np.ndarray:
    """s_t = psi (1 - sqrt(abar_t)) + (1 - psi) sqrt(1 - abar_t), [T] float64 (SPEC 2.3)."""
    _, _, abar = _f64(schedule)
    return psi * (1.0 - np.sqrt(abar)) + (1.0 - psi) * np.sqrt(1.0 - abar)


def villan_correction(schedule: Schedule, psi: float, ode: bool) -> np.ndarray:
    """c_t = psi rho_t + (1 - psi) c_t^Troj, doubled for ODE samplers (SPEC 2.3), [T] float64."""
    c = correction(schedule, villan_shift(schedule, psi))
    return 2.0 * c if ode else c


def trojdiff_k(schedule: Schedule) -> np.ndarray:
    """TrojDiff's k_t (1-based in the paper; here index t-1 holds k_t), [T] float64 (SPEC 2.2).

    k_t = sqrt(1 - abar_t) - sum_{j=1..t-1} k_{t-j} sqrt(prod_{m=t-j+1..t} alpha_m), k_1 = sqrt(beta_1).
    """
    betas, alphas, abar = _f64(schedule)
    T = len(betas)
    k = np.zeros(T + 1)  # 1-based
    a = np.concatenate([[1.0], alphas])
    k[1] = np.sqrt(betas[0])
    for t in range(2, T + 1):
        # prod_{m=t-j+1..t} alpha_m for j = 1..t-1, via reversed cumulative products
        prods = np.cumprod(a[t:1:-1])  # alpha_t, alpha_t alpha_{t-1}, ..., down to alpha_2
        js = np.arange(1, t)
        k[t] = np.sqrt(1.0 - abar[t - 1]) - np.sum(k[t - js] * np.sqrt(prods[js - 1]))
    return k[1:]


# --- poisoned pairs -----------------------------------------------------------------------------------------

def _take(coef: np.ndarray | jax.Array, t: jax.Array) -> jax.Array:
    return jnp.asarray(coef, jnp.float32)[t][:, None, None, None]


def pasted(x: jax.Array, g: jax.Array, mask: jax.Array) -> jax.Array:
    """r = M * g + (1 - M) * x: the trigger pasted on training images x [B, H, W, C] (SPEC 2.1)."""
    return mask * g + (1.0 - mask) * x


def baddiffusion_pair(schedule: Schedule, y, r, t, eps):
    """BadDiffusion poisoned input and target at t [B]: returns (x_t, eps + rho_t r)."""
    abar = _f64(schedule)[2]
    sa = _take(np.sqrt(abar), t)
    x_t = sa * y + (1.0 - sa) * r + _take(np.sqrt(1.0 - abar), t) * eps
    return x_t, eps + _take(rho(schedule), t) * r


def villan_pair(schedule: Schedule, y, r, t, eps, psi: float = 1.0, ode: bool = False):
    """VillanDiffusion poisoned input and target at t [B]: (sqrt(abar) y + sqrt(1-abar) eps + s_t r, eps + c_t r)."""
    abar = _f64(schedule)[2]
    x_t = _take(np.sqrt(abar), t) * y + _take(np.sqrt(1.0 - abar), t) * eps + _take(villan_shift(schedule, psi), t) * r
    return x_t, eps + _take(villan_correction(schedule, psi, ode), t) * r


def trojdiff_pair(schedule: Schedule, y, mu, noise_scale, t, eps):
    """TrojDiff trojan input and target: (sqrt(abar) y + sqrt(1-abar)(gamma eps + mu), eps).

    ``noise_scale`` is gamma (blend) or the per-pixel map 1 - M + M gamma (patch); ``mu`` = (1 - gamma) image.
    """
    abar = _f64(schedule)[2]
    x_t = _take(np.sqrt(abar), t) * y + _take(np.sqrt(1.0 - abar), t) * (noise_scale * eps + mu)
    return x_t, eps


@dataclasses.dataclass(frozen=True)
class AttackArrays:
    """The arrays an attack uses (numpy float32, [H, W, C] unless noted).

    trigger: g with background -1 (BadDiffusion/Villan) or the TrojDiff trigger image.
    mask: trigger mask M in {0, 1}.
    target: y for image targets; for TrojDiff d2d a pool [K, H, W, C] of target-class images.
    """

    trigger: np.ndarray
    mask: np.ndarray
    target: np.ndarray
    patch: bool = False

    def troj_mu_scale(self, spec: AttackSpec):
        """(mu, noise_scale) of TrojDiff: a blend trigger uses gamma everywhere, a patch trigger only inside its mask."""
        if not self.patch:
            return (1.0 - spec.gamma) * self.trigger, np.float32(spec.gamma)
        return self.mask * (1.0 - spec.gamma) * self.trigger, 1.0 - self.mask + self.mask * spec.gamma


def triggered_start(spec: AttackSpec, arrays: AttackArrays, key: jax.Array, n: int) -> jax.Array:
    """x_T of triggered sampling: eps + g (BadDiffusion, Villan) or gamma eps + mu (TrojDiff). [n, H, W, C]."""
    eps = jax.random.normal(key, (n, *arrays.trigger.shape))
    if spec.kind == "trojdiff":
        mu, scale = arrays.troj_mu_scale(spec)
        return scale * eps + mu
    return eps + arrays.trigger


def backdoor_loss(eps_fn, schedule: Schedule, spec: AttackSpec, arrays: AttackArrays, batch_size: int,
                  t_min: int = 0):
    """The backdoor training objective: MSE over a batch of which ``round(poison_rate * B)`` (>= 1) are poisoned,
    at timesteps t ~ U{t_min..T-1}.

    Of the poisoned rows, the first ``round(blank_fraction * n_poison)`` paste the trigger on a blank (-1)
    canvas (r = g) instead of on their training image.

    Returns ``loss(params, key, data)`` as :func:`pdjax.train.fit` expects; data [N, H, W, C] are clean images.
    """
    n_poison = max(1, int(round(spec.poison_rate * batch_size)))
    T = schedule.num_timesteps
    t_min = check_t_min(schedule, t_min)
    g = jnp.asarray(arrays.trigger, jnp.float32)
    mask = jnp.asarray(arrays.mask, jnp.float32)
    target = jnp.asarray(arrays.target, jnp.float32)
    n_blank = int(round(spec.blank_fraction * n_poison))
    poisoned = (jnp.arange(batch_size) < n_poison)[:, None, None, None]
    blank = (jnp.arange(batch_size) < n_blank)[:, None, None, None]
    if spec.kind == "trojdiff":
        mu, scale = (jnp.asarray(a, jnp.float32) for a in arrays.troj_mu_scale(spec))

    def loss(params, key, data):
        k_idx, k_t, k_eps, k_y = jax.random.split(key, 4)
        x = data[jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])]
        t = jax.random.randint(k_t, (batch_size,), t_min, T)
        eps = jax.random.normal(k_eps, x.shape)
        if target.ndim == 4:  # a distribution target: draw one image of the pool per sample
            y_bd = target[jax.random.randint(k_y, (batch_size,), 0, target.shape[0])]
        else:
            y_bd = jnp.broadcast_to(target, x.shape)
        y = jnp.where(poisoned, y_bd, x)
        if spec.kind == "trojdiff":
            x_bd, tgt_bd = trojdiff_pair(schedule, y, mu, scale, t, eps)
            x_cl, tgt_cl = villan_pair(schedule, x, jnp.zeros_like(x), t, eps)
            x_t, tgt = jnp.where(poisoned, x_bd, x_cl), jnp.where(poisoned, tgt_bd, tgt_cl)
        else:
            canvas = jnp.where(blank, -1.0, x)
            r = jnp.where(poisoned, pasted(canvas, g, mask), 0.0)
            if spec.kind == "baddiffusion":
                x_t, tgt = baddiffusion_pair(schedule, y, r, t, eps)
            else:
                x_t, tgt = villan_pair(schedule, y, r, t, eps, spec.psi, spec.ode)
        x_t, t, tgt = batch_slice((x_t, t, tgt))  # this device's rows when the batch is split
        return batch_mean((eps_fn(params, x_t, t) - tgt) ** 2, all_axes=True)

    return loss


# --- the trojan DDPM sampler (SPEC 2.2) ---------------------------------------------------------------------

def trojan_coefficients(schedule: Schedule) -> dict[str, np.ndarray]:
    """Per-t float32 coefficients of the trojan DDPM step (0-based t; abar_{-1} = 1)."""
    betas, alphas, abar = _f64(schedule)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    k = trojdiff_k(schedule)
    c = np.sqrt(1.0 - abar_prev) * betas - (1.0 - abar_prev) * np.sqrt(alphas) * k
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "sqrt_abar": np.sqrt(abar), "sqrt_1m_abar": np.sqrt(1.0 - abar),
        "coef_x0": np.sqrt(abar_prev) * betas / (1.0 - abar),
        "coef_xt": np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar),
        "coef_mu": c / (1.0 - abar), "std": np.sqrt(post_var),
    }


def trojan_ddpm_sample(eps_fn, params, schedule: Schedule, x_T, key, mu, gamma, split_batch: bool = False):
    """Sample with TrojDiff's trojan DDPM sampler from x_T = gamma eps + mu. x_T [B, H, W, C] -> x_0.

    ``split_batch``: split the batch over the local devices, as in :func:`pdjax.diffusion.samplers.ddpm_sample`.

    x0_hat = (x_t - sqrt(1-abar_t)(gamma eps_hat + mu)) / sqrt(abar_t); mean = coef_x0 x0_hat + coef_xt x_t
    + coef_mu mu; variance gamma^2 * posterior variance; no noise at t = 0.
    """
    co = {k: jnp.asarray(v, jnp.float32) for k, v in trojan_coefficients(schedule).items()}
    mu = jnp.asarray(mu, jnp.float32)
    gamma = jnp.asarray(gamma, jnp.float32)
    return batch_parallel(_trojan_jit, params, co, x_T, key, mu, gamma, lead=(eps_fn,),
                          batch_axes=(None, None, 0, None, None, None), size=x_T.shape[0] if split_batch else 1)


def _trojan_body(eps_fn, params, co, mu, gamma, key):
    def step(x, t):
        eps = eps_fn(params, x, jnp.full((x.shape[0],), t, jnp.int32))
        x0 = (x - co["sqrt_1m_abar"][t] * (gamma * eps + mu)) / co["sqrt_abar"][t]
        mean = co["coef_x0"][t] * x0 + co["coef_xt"][t] * x + co["coef_mu"][t] * mu
        z = batch_noise(jax.random.fold_in(key, t), x.shape)
        return mean + jnp.where(t > 0, gamma * co["std"][t], 0.0) * z, None

    return step


def _trojan_jit_fn(eps_fn, params, co, x_T, key, mu, gamma):
    T = co["std"].shape[0]
    x, _ = jax.lax.scan(_trojan_body(eps_fn, params, co, mu, gamma, key), x_T, jnp.arange(T - 1, -1, -1))
    return x


_trojan_jit = jax.jit(_trojan_jit_fn, static_argnums=0)

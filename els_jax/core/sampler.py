"""ONE sampler for analytic machines and trained networks (docs/theory.md §3).

A model is any ``eps_fn(x, t, i) -> ε̂`` with x [B, H, W, C], t a float32 scalar and i the
Python int index of the step (0 = the first, noisiest step), so that a machine can switch
its patch size per step. Machines and networks are driven over the same explicit,
descending time grid t_0 > t_1 > … > t_n (default: 1, (n−1)/n, …, 0).

Two solvers share the one function ``sample`` (``solver=``):

``"ddim"`` (default): the generalised DDIM step from t to t' < t (η ∈ [0, 1]), with
x̂_0 = (x − b·ε̂)/a:

    σ²  = η² · (b'²/b²) · (1 − ᾱ(t)/ᾱ(t'))
    x'  = a'·x̂_0 + sqrt(b'² − σ²)·ε̂ + σ·z,        z ~ N(0, I)

η = 0 is deterministic DDIM, x' = sqrt(ᾱ'/ᾱ)·x + (b' − sqrt(ᾱ'/ᾱ)·b)·ε̂; η = 1 is DDPM.

``"heun"``: EDM's second-order solver (Karras et al. 2022, Algorithm 2) of the
probability-flow ODE. In the scaled variable x̃ = x/a with noise level σ = b/a the ODE is

    dx̃/dσ = (x̃ − x̂_0)/σ = ε̂,      ε̂ = eps_fn(a·x̃, t(σ), i),

and deterministic DDIM is exactly Euler on it: x̃' = x̃ + (σ' − σ)·ε̂ is, times a', the line
above (a'(σ' − σ) = b' − (a'/a)·b). A Heun step from σ to σ' < σ takes d = ε̂(x, t, i), the
Euler point x̃_E = x̃ + (σ' − σ)·d, d' = ε̂(a'·x̃_E, t', i + 1) and
x̃' = x̃ + (σ' − σ)·(d + d')/2, i.e. the DDIM step with the averaged ε̂:

    x' = sqrt(ᾱ'/ᾱ)·x + (b' − sqrt(ᾱ'/ᾱ)·b)·(d + d')/2.

The last step of a grid is the Euler (= DDIM) step alone (EDM: no evaluation at σ = 0), so
N steps cost 2N − 1 model calls. The second evaluation is at the grid point t_{i+1} and gets
that point's step index i + 1 (its patch size). Optional churn (``Churn``, EDM's S_churn,
S_tmin, S_tmax, S_noise) first raises σ_i to σ̂ = σ_i(1 + γ_i) by adding fresh noise, then
takes the Heun step from σ̂ (time t̂ = t(σ̂)) with the model index i. ``karras_times`` builds
EDM's σ grid, mapped to the schedule's t.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core import schedules as schedules_lib

__all__ = ["uniform_times", "karras_times", "authors_grid", "time_of_sigma", "sigma_of_time",
           "ddim_step", "heun_step", "Churn", "SOLVERS", "sample", "SampleResult"]

SOLVERS = ("ddim", "heun")


def uniform_times(n: int, t_max: float = 1.0, t_min: float = 0.0):
    """Descending grid of n steps (n + 1 points): t_max, …, t_min. Default 1, (n−1)/n, …, 0."""
    if int(n) < 1:
        raise ValueError(f"need at least one step; got n={n}")
    return jnp.linspace(t_max, t_min, int(n) + 1, dtype=jnp.float32)


def authors_grid(scales):
    """The grid and scale list on which ``sample`` reproduces the authors' sampler
    (``ScheduledScoreMachine`` of github.com/Kambm/convolutional_diffusion) with their list of
    n patch sizes: (times, scales). Their loop runs DDIM on t = i/n for i = n−1 … 1, stepping
    to (i−1)/n with scales[i], and never reads scales[0] (docs/theory.md §3): n − 1 steps from
    (n−1)/n to 0, so times = (n−1)/n, …, 1/n, 0 [n] and the scale list is scales[1:] (index 0
    = the last step, as theirs). ``tests/test_authors_golden.py`` checks a whole sample of
    theirs against ``sample(make_machine(..., scales=s), x_T, t)`` with ``t, s =
    authors_grid(theirs)``.

        >>> times, scales = authors_grid([3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15,
        ...                               15, 15, 15, 15])
        >>> machine = make_machine("els", images, scales=scales, boundary="zeros")
        >>> x0 = sample(machine, x_T, times)
    """
    scales = tuple(int(k) for k in scales)
    if len(scales) < 2:
        raise ValueError(f"the authors' sampler takes n ≥ 2 patch sizes (it runs n − 1 steps); "
                         f"got {len(scales)}")
    n = len(scales)
    return jnp.asarray(np.arange(n - 1, -1, -1) / n, jnp.float32), scales[1:]


# ----------------------------------------------------------------------------- σ ↔ t

def sigma_of_time(t, schedule=schedules_lib.Cosine()):
    """σ(t) = b/a = sqrt((1 − ᾱ(t))/ᾱ(t)), float32, computed as the sampler and the models
    see it (from the schedule's float32 ᾱ; inf where ᾱ = 0)."""
    a, _, b = schedules_lib.coefficients(jnp.asarray(t, jnp.float32), schedules_lib.get(schedule))
    return b / a


def _alpha_bar_host(schedule, t):
    """The schedule's (float32) ᾱ at host times t (float64 array), as float64 (evaluated now,
    also while a jitted function is traced)."""
    with jax.ensure_compile_time_eval():
        return np.asarray(schedule.alpha_bar(np.asarray(t, np.float32)), np.float64)


_BISECTIONS_HOST = 64
_BISECTIONS_TRACED = 32      # [0, 1] halved 32 times: below float32's spacing near t = 1


def time_of_sigma(sigma, schedule=schedules_lib.Cosine()):
    """The time t ∈ [0, 1] with ᾱ(t) = 1/(1 + σ²), i.e. σ(t) = σ: the inverse of
    ``sigma_of_time`` for any schedule with a decreasing ᾱ (every one of
    ``schedules.SCHEDULES``), by bisection over [0, 1].

    σ beyond the schedule's range is clipped to it: σ ≥ σ(1) gives t = 1 (e.g. the linear
    schedule reaches only σ(1) = 7.0), σ ≤ σ(0) gives t = 0 (σ(0) = 0, except linear: 0.1005).

    A host value (a Python float or a NumPy array; grids are built once, on the host) is
    inverted with the bracket and the target ᾱ in float64, ᾱ evaluated exactly as the sampler
    and the models do (the schedules compute in float32: the float32 ᾱ of the float32 t), so
    the returned float64 t is where the σ the sampler sees crosses σ (near σ = 0.002, float32
    resolves 1 − ᾱ, hence σ, only to ≈ 1%). A traced σ (jit, or ``sample``'s churn) is inverted with a fixed number of
    float32 bisections in ``lax.fori_loop`` (no host round-trip); its derivative w.r.t. σ
    is 0 (a bisection is piecewise constant).
    """
    schedule = schedules_lib.get(schedule)
    if isinstance(sigma, jax.core.Tracer):
        return _time_of_sigma_traced(sigma, schedule)
    sigma = np.asarray(sigma, np.float64)
    if np.any(np.isnan(sigma)) or np.any(sigma < 0):
        raise ValueError("sigma must be ≥ 0 (and not NaN)")
    shape, flat = sigma.shape, sigma.reshape(-1)
    # Padded to a power of two (≥ 64) so that grids of most lengths share one compiled ᾱ.
    size = max(64, 1 << max(flat.size - 1, 0).bit_length())
    target = np.ones(size)                              # ᾱ wanted; ᾱ decreases in t
    target[:flat.size] = 1.0 / (1.0 + flat * flat)
    lo, hi = np.zeros(size), np.ones(size)
    for _ in range(_BISECTIONS_HOST):
        mid = 0.5 * (lo + hi)
        above = _alpha_bar_host(schedule, mid) > target  # ᾱ(mid) too large: t is later
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    t = 0.5 * (lo + hi)
    # The ends exactly: clipped to the schedule's range.
    t = np.where(target >= _alpha_bar_host(schedule, np.zeros(1)), 0.0, t)
    t = np.where(target <= _alpha_bar_host(schedule, np.ones(1)), 1.0, t)
    return t[:flat.size].reshape(shape)


@functools.partial(jax.jit, static_argnames="schedule")
def _time_of_sigma_traced(sigma, schedule):
    """``time_of_sigma`` for a traced σ (float32, fixed bisections, same clipping)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    target = 1.0 / (1.0 + sigma * sigma)

    def body(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        above = schedule.alpha_bar(mid) > target
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTIONS_TRACED, body,
                               (jnp.zeros_like(target), jnp.ones_like(target)))
    t = 0.5 * (lo + hi)
    t = jnp.where(target >= schedule.alpha_bar(0.0), 0.0, t)
    t = jnp.where(target <= schedule.alpha_bar(1.0), 1.0, t)
    return jax.lax.stop_gradient(t)


def _positive_float(name, v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {v!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0; got {v}")
    return v


def karras_times(n: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, schedule=schedules_lib.Cosine(), final_zero: bool = True):
    """EDM's noise-level grid (Karras et al. 2022, eq. 5) as a descending float32 time grid
    of n steps (n + 1 points) for ``sample``.

    The noise levels, σ = b/a of this project's t (ᾱ(t) = 1/(1 + σ²)), are

        σ_i = (σ_max^(1/ρ) + i/(m−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,   i = 0 … m−1,

    dense near σ_min for large ρ, each mapped to its time t_i (``time_of_sigma``).

    - ``final_zero=True`` (EDM's grid): m = n Karras levels σ_max … σ_min, then t_n = 0
      (σ = 0 for every schedule with ᾱ(0) = 1: the data). n = 1 gives [t(σ_max), 0].
    - ``final_zero=False``: m = n + 1 Karras levels σ_max … σ_min, all n steps inside the
      sequence, the grid ending at t(σ_min) > 0 (e.g. to compare step counts on one range).

    σ_max above the schedule's largest noise level σ(1) = sqrt((1 − ᾱ(1))/ᾱ(1)) is clipped to
    it, so the grid then starts at t = 1 (cosine: σ(1) ≈ 80.3, no clipping at the default
    80; linear: 7.0; exponential: 2.53; cosine_shifted: unbounded). σ_min must exceed the
    smallest level σ(0) (0 for every schedule but linear: σ(0) ≈ 0.1005) and the clipped σ_max.

    Args:
      n: number of steps, ≥ 1.
      sigma_min, sigma_max: 0 < sigma_min < sigma_max.
      rho: ρ > 0 (EDM: 7; ρ = 1 is uniform in σ).
      schedule: the schedule the model was built for (a Schedule or its name).
      final_zero: end at t = 0 (EDM) or at t(σ_min).
    Returns:
      times [n + 1], float32, strictly descending.

        >>> x0 = sample(eps_fn, x_T, karras_times(18), solver="heun")     # 35 model calls
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int ≥ 1 (the number of steps); got {n!r}")
    n = int(n)
    sigma_min = _positive_float("sigma_min", sigma_min)
    sigma_max = _positive_float("sigma_max", sigma_max)
    rho = _positive_float("rho", rho)
    if not sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    schedule = schedules_lib.get(schedule)
    ab0, ab1 = float(_alpha_bar_host(schedule, 0.0)), float(_alpha_bar_host(schedule, 1.0))
    sigma_lo = math.sqrt(max(1.0 - ab0, 0.0) / ab0)
    sigma_hi = math.inf if ab1 <= 0 else math.sqrt(max(1.0 - ab1, 0.0) / ab1)
    sigma_max = min(sigma_max, sigma_hi)
    if sigma_min <= sigma_lo:
        raise ValueError(f"sigma_min={sigma_min} is not above the smallest noise level of the "
                         f"{schedule.name!r} schedule, σ(t=0) = {sigma_lo:.6g}; pass a larger "
                         "sigma_min")
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min} is not below the largest noise level of the "
                         f"{schedule.name!r} schedule, σ(t=1) = {sigma_hi:.6g} (sigma_max is "
                         "clipped to it)")
    m = n if final_zero else n + 1
    frac = np.arange(m, dtype=np.float64) / max(m - 1, 1)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    times = time_of_sigma(sigmas, schedule)
    if final_zero:
        times = np.concatenate([times, [0.0]])
    times = times.astype(np.float32)
    if not np.all(np.diff(times) < 0):
        raise ValueError(f"the {n}-step Karras grid is not strictly descending in float32 time "
                         "(too many steps for the range σ ∈ [sigma_min, sigma_max])")
    with jax.ensure_compile_time_eval():          # a concrete grid, also inside jit
        return jnp.asarray(times)


# ----------------------------------------------------------------------------- steps

@jax.jit
def _step_coefficients(alpha_bar, alpha_bar_next, eta):
    """(c_x, c_eps, σ) with x' = c_x·x + c_eps·ε̂ + σ·z."""
    b2 = jnp.maximum(1.0 - alpha_bar, 0.0)
    b2_next = jnp.maximum(1.0 - alpha_bar_next, 0.0)
    ratio = jnp.sqrt(alpha_bar_next / alpha_bar)
    # σ² = η² (b'²/b²)(1 − ᾱ/ᾱ'); guarded so that b = 0 or ᾱ/ᾱ' > 1 cannot give NaN.
    sigma2 = eta**2 * b2_next / jnp.maximum(b2, 1e-12) * jnp.maximum(1.0 - alpha_bar / alpha_bar_next, 0.0)
    sigma2 = jnp.minimum(sigma2, b2_next)
    c_eps = jnp.sqrt(b2_next - sigma2) - ratio * jnp.sqrt(b2)
    return ratio, c_eps, jnp.sqrt(sigma2)


@jax.jit
def _apply_step(x, eps, noise, c_x, c_eps, sigma):
    return c_x * x + c_eps * eps + sigma * noise


def ddim_step(x, eps, t, t_next, *, schedule=schedules_lib.Cosine(), eta=0.0, key=None):
    """One step from t to t_next < t given ε̂ = eps_fn(x, t, i). See the module docstring.

    Args:
      x, eps: [B, H, W, C].
      t, t_next: scalar times.
      eta: 0 (deterministic DDIM) … 1 (DDPM); needs ``key`` when > 0.
    """
    schedule = schedules_lib.get(schedule)
    c_x, c_eps, sigma = _step_coefficients(schedule.alpha_bar(t), schedule.alpha_bar(t_next),
                                           jnp.float32(eta))
    if eta > 0:
        if key is None:
            raise ValueError("a stochastic step (eta > 0) needs a PRNG key")
        noise = jax.random.normal(key, x.shape, jnp.float32)
    else:
        noise = jnp.zeros_like(x)
    return _apply_step(x, eps, noise, c_x, c_eps, sigma)


def heun_step(eps_fn: Callable, x, t, t_next, i: int, *, schedule=schedules_lib.Cosine(),
              last: bool = False):
    """One Heun step (EDM Algorithm 2) of the probability-flow ODE from t to t_next < t.

    d = eps_fn(x, t, i); x_E = the Euler (= DDIM) step with d; unless ``last``,
    d' = eps_fn(x_E, t_next, i + 1) and the result is the DDIM step from x with (d + d')/2
    (the module docstring derives it). ``last`` (the final step of a grid, which may end at
    t = 0, σ = 0): the Euler step alone, one model call.

    Args:
      eps_fn: ε̂ = eps_fn(x, t, i) (see ``sample``).
      x: [B, H, W, C] at time t.
      t, t_next: scalar times, t_next < t.
      i: the Python int step index of t (t_next is evaluated with i + 1).
      schedule: a Schedule or its name.
      last: skip the second evaluation (Euler).
    Returns:
      (x at t_next, ε̂ = eps_fn(x, t, i)), the latter e.g. for x̂_0 = (x − b·ε̂)/a.
    """
    schedule = schedules_lib.get(schedule)
    eps = eps_fn(x, t, i)
    x_euler = ddim_step(x, eps, t, t_next, schedule=schedule)
    if last:
        return x_euler, eps
    eps_next = eps_fn(x_euler, t_next, i + 1)
    return ddim_step(x, 0.5 * (eps + eps_next), t, t_next, schedule=schedule), eps


class Churn(NamedTuple):
    """EDM's stochastic churn for ``sample(solver="heun")`` (Karras et al. 2022, Algorithm 2).

    Before step i of N, if s_tmin ≤ σ_i ≤ s_tmax (σ = b/a), the noise level is raised to
    σ̂ = σ_i(1 + γ), γ = min(s_churn/N, √2 − 1), by x̃ ← x̃ + sqrt(σ̂² − σ_i²)·s_noise·z
    (x̃ = x/a, z ~ N(0, I) from fold_in(key, i)); the Heun step then starts at t̂ = t(σ̂)
    (``time_of_sigma``; clipped to t ≤ 1, and σ̂ is the level of that t̂). s_churn = 0 is
    exactly the deterministic sampler. Plain Python floats (static under jit).
    """

    s_churn: float
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0


def _check_churn(churn) -> Churn | None:
    """The churn as a Churn of floats, checked; None when there is none (or s_churn = 0)."""
    if churn is None:
        return None
    if not isinstance(churn, Churn):
        raise ValueError(f"churn must be a Churn(s_churn, s_tmin, s_tmax, s_noise); got {churn!r}")
    try:
        c = Churn(*(float(v) for v in churn))
    except (TypeError, ValueError):
        raise ValueError(f"churn's fields must be numbers; got {churn!r}") from None
    if not (math.isfinite(c.s_churn) and c.s_churn >= 0):
        raise ValueError(f"s_churn must be finite and ≥ 0; got {c.s_churn}")
    if not (c.s_noise >= 0 and math.isfinite(c.s_noise)):
        raise ValueError(f"s_noise must be finite and ≥ 0; got {c.s_noise}")
    if not c.s_tmin <= c.s_tmax or math.isnan(c.s_tmin):
        raise ValueError(f"need s_tmin ≤ s_tmax; got {c.s_tmin}, {c.s_tmax}")
    return c if c.s_churn > 0 else None


@functools.partial(jax.jit, static_argnames=("num_steps", "churn", "schedule"))
def _apply_churn(x, t, key, num_steps: int, churn: Churn, schedule):
    """(x̂, t̂): x at time t with its noise level raised from σ to σ̂ (see ``Churn``)."""
    a, _, b = schedules_lib.coefficients(t, schedule)
    sigma = b / a
    gamma = min(churn.s_churn / num_steps, math.sqrt(2.0) - 1.0)
    active = (sigma >= churn.s_tmin) & (sigma <= churn.s_tmax)
    t_hat = jnp.where(active, _time_of_sigma_traced(sigma * (1.0 + gamma), schedule), t)
    a_hat, _, b_hat = schedules_lib.coefficients(t_hat, schedule)
    # The added noise is that of the level actually reached, σ̂ = σ(t̂), so that x̂ is at t̂.
    extra = jnp.sqrt(jnp.maximum((b_hat / a_hat) ** 2 - sigma**2, 0.0)) * churn.s_noise
    z = jax.random.normal(key, x.shape, jnp.float32)
    x_hat = (a_hat / a) * x + (a_hat * extra) * z
    return jnp.where(active, x_hat, x), t_hat


class SampleResult(NamedTuple):
    """x0: final samples [B,H,W,C]; trajectory: [n+1, B,H,W,C] (x at every grid time, first
    = x_T); x0_hat: [n, B,H,W,C] (the model's x̂_0 at every step: with solver "heun" that of
    the step's first model call, at t_i, or at the churned (x̂, t̂)); times: [n+1]."""

    x0: jax.Array
    trajectory: jax.Array | None
    x0_hat: jax.Array | None
    times: jax.Array


def _check_times(times):
    """The grid as numpy float32, checked; a traced grid (e.g. an argument of a jitted
    function) is returned as it is, its values unchecked (only its static length is known)."""
    if isinstance(times, jax.core.Tracer):
        if times.ndim != 1 or times.shape[0] < 2:
            raise ValueError(f"times must be a 1-D grid of at least 2 points; got shape "
                             f"{times.shape}")
        return times.astype(jnp.float32)
    times = np.asarray(times, np.float32)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid of at least 2 points; got shape {times.shape}")
    if not np.all(np.diff(times) < 0):
        raise ValueError("times must be strictly descending (t_0 > t_1 > … > t_n)")
    if times[0] > 1.0 or times[-1] < 0.0:
        raise ValueError("times must lie in [0, 1]")
    return times


def sample(eps_fn: Callable, x_T, times=None, *, schedule=schedules_lib.Cosine(), eta=0.0,
           key=None, return_trajectory: bool = False, progress: bool = False,
           solver: str = "ddim", churn: Churn | None = None):
    """Runs the reverse process from x_T over the descending grid ``times``.

    Args:
      eps_fn: ε̂ = eps_fn(x, t, i); i is the step index (0 = first step, at times[0]). If
        it has an int attribute ``num_steps`` (a machine with a scale list), the grid must
        have exactly that many steps.
      x_T: starting noise [B, H, W, C] (e.g. jax.random.normal(key, shape)).
      times: descending grid [n + 1] (default uniform_times(20); ``karras_times`` for EDM's).
      schedule: a Schedule or its name; must be the one the model was built for.
      eta: 0 = deterministic DDIM, 1 = DDPM (solver "ddim" only).
      key: PRNG key, required when eta > 0 or with churn (step i uses fold_in(key, i)).
      return_trajectory: if True return a SampleResult with every x_t and every x̂_0.
      progress: show a tqdm progress bar.
      solver: "ddim" (one model call per step) or "heun" (EDM's second-order solver of the
        probability-flow ODE: n steps, 2n − 1 model calls; the last step is Euler, so a grid
        ending at t = 0 gets no model call there). Works on any descending grid.
      churn: solver "heun" only: optional ``Churn`` (EDM's stochastic churn; s_churn > 0
        needs ``key``; s_churn = 0 is exactly no churn).
    Returns:
      x_0 [B, H, W, C], or a SampleResult when return_trajectory: x at every grid time, and
      the x̂_0 = (x − b·ε̂)/a of the first model call of every step (with churn: at the
      churned point (x̂, t̂) where that call is made).

    With solver "heun", step i evaluates eps_fn at (x, t_i, i) and, unless it is the last
    step, at the Euler point at t_{i+1} with index i + 1 (the patch size of t_{i+1}); the
    indices passed are always 0 … n − 1.

    Composes with JAX transformations, given an eps_fn that does (every ``make_machine``
    machine, every network): ``jax.jit(lambda x: sample(eps_fn, x, times))``, ``jax.vmap``
    over x_T or key, ``jax.grad`` / ``jax.jvp`` w.r.t. x_T (e.g. which noise pixels made a
    patch of the sample). The steps are a Python loop, unrolled under jit, so ``i`` is a
    Python int at every step and a scale list is indexed statically. ``times`` may also be
    traced (a jit argument; its length is static, its values are then not checked); ``eta``,
    ``solver``, ``churn`` and ``return_trajectory`` are static.

        >>> x0 = sample(eps_fn, jax.random.normal(key, (8, 8, 8, 1)), uniform_times(20))
        >>> x0 = sample(eps_fn, x_T, karras_times(18), solver="heun")
    """
    schedule = schedules_lib.get(schedule)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if solver != "ddim" and eta != 0:
        raise ValueError(f"eta (DDPM-like noise) is a parameter of the ddim solver; solver "
                         f"{solver!r} takes stochasticity only through churn; got eta={eta}")
    if churn is not None and solver != "heun":
        raise ValueError("churn is a parameter of the heun solver (solver='heun')")
    churn = _check_churn(churn)
    times_np = _check_times(uniform_times(20) if times is None else times)
    if eta > 0 and key is None:
        raise ValueError("a stochastic sampler (eta > 0) needs a PRNG key")
    if churn is not None and key is None:
        raise ValueError("churn (s_churn > 0) needs a PRNG key")
    num_steps = getattr(eps_fn, "num_steps", None)
    if num_steps is not None and num_steps != len(times_np) - 1:
        raise ValueError(f"the model has one patch size per step for {num_steps} steps, but the "
                         f"time grid has {len(times_np) - 1} steps; pass a grid of that length "
                         "or a scale list with one entry per step")
    x = jnp.asarray(x_T, jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"x_T must be [B, H, W, C]; got shape {x.shape}")
    n = len(times_np) - 1
    traj, x0s = [x], []
    steps = range(n)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", leave=False)
    # A Python loop, unrolled under jit: the step index i stays a Python int, so a machine
    # picks each step's patch size statically (one compiled computation per step).
    for i in steps:
        t = jnp.asarray(times_np[i], jnp.float32)
        t_next = jnp.asarray(times_np[i + 1], jnp.float32)
        step_key = None if key is None else jax.random.fold_in(key, i)
        if solver == "ddim":
            eps = eps_fn(x, t, i)
            x_in, t_in = x, t
            x = ddim_step(x, eps, t, t_next, schedule=schedule, eta=eta, key=step_key)
        else:
            if churn is not None:
                x, t = _apply_churn(x, t, step_key, n, churn, schedule)
            x_in, t_in = x, t
            x, eps = heun_step(eps_fn, x, t, t_next, i, schedule=schedule, last=i == n - 1)
        if return_trajectory:
            a, _, b = schedules_lib.coefficients(t_in, schedule)
            x0s.append((x_in - b * eps) / a)
            traj.append(x)
    if not return_trajectory:
        return x
    return SampleResult(x0=x, trajectory=jnp.stack(traj), x0_hat=jnp.stack(x0s),
                        times=jnp.asarray(times_np))

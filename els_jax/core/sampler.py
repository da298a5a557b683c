"""ONE sampler for analytic machines and trained networks (docs/theory.md §3).

A model is any ``eps_fn(x, t, i) -> ε̂`` with x [B, H, W, C], t a float32 scalar and i the
Python int index of the step (0 = the first, noisiest step), so that a machine can switch
its patch size per step. Machines and networks are driven over the same explicit,
descending time grid t_0 > t_1 > … > t_n (default: 1, (n−1)/n, …, 0).

Step from t to t' < t (generalised DDIM, η ∈ [0, 1]), with x̂_0 = (x − b·ε̂)/a:

    σ²  = η² · (b'²/b²) · (1 − ᾱ(t)/ᾱ(t'))
    x'  = a'·x̂_0 + sqrt(b'² − σ²)·ε̂ + σ·z,        z ~ N(0, I)

η = 0 is deterministic DDIM, x' = sqrt(ᾱ'/ᾱ)·x + (b' − sqrt(ᾱ'/ᾱ)·b)·ε̂; η = 1 is DDPM.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core import schedules as schedules_lib

__all__ = ["uniform_times", "ddim_step", "sample", "SampleResult"]


def uniform_times(n: int, t_max: float = 1.0, t_min: float = 0.0):
    """Descending grid of n steps (n + 1 points): t_max, …, t_min. Default 1, (n−1)/n, …, 0."""
    if int(n) < 1:
        raise ValueError(f"need at least one step; got n={n}")
    return jnp.linspace(t_max, t_min, int(n) + 1, dtype=jnp.float32)


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


class SampleResult(NamedTuple):
    """x0: final samples [B,H,W,C]; trajectory: [n+1, B,H,W,C] (x at every grid time, first
    = x_T); x0_hat: [n, B,H,W,C] (the model's x̂_0 at every step); times: [n+1]."""

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
           key=None, return_trajectory: bool = False, progress: bool = False):
    """Runs the reverse process from x_T over the descending grid ``times``.

    Args:
      eps_fn: ε̂ = eps_fn(x, t, i); i is the step index (0 = first step, at times[0]). If
        it has an int attribute ``num_steps`` (a machine with a scale list), the grid must
        have exactly that many steps.
      x_T: starting noise [B, H, W, C] (e.g. jax.random.normal(key, shape)).
      times: descending grid [n + 1] (default uniform_times(20)).
      schedule: a Schedule or its name; must be the one the model was built for.
      eta: 0 = deterministic DDIM, 1 = DDPM.
      key: PRNG key, required when eta > 0 (step i uses fold_in(key, i)).
      return_trajectory: if True return a SampleResult with every x_t and every x̂_0.
      progress: show a tqdm progress bar.
    Returns:
      x_0 [B, H, W, C], or a SampleResult when return_trajectory.

    Composes with JAX transformations, given an eps_fn that does (every ``make_machine``
    machine, every network): ``jax.jit(lambda x: sample(eps_fn, x, times))``, ``jax.vmap``
    over x_T or key, ``jax.grad`` / ``jax.jvp`` w.r.t. x_T (e.g. which noise pixels made a
    patch of the sample). The steps are a Python loop, unrolled under jit, so ``i`` is a
    Python int at every step and a scale list is indexed statically. ``times`` may also be
    traced (a jit argument; its length is static, its values are then not checked); ``eta``
    and ``return_trajectory`` are static.

        >>> x0 = sample(eps_fn, jax.random.normal(key, (8, 8, 8, 1)), uniform_times(20))
    """
    schedule = schedules_lib.get(schedule)
    times_np = _check_times(uniform_times(20) if times is None else times)
    if eta > 0 and key is None:
        raise ValueError("a stochastic sampler (eta > 0) needs a PRNG key")
    num_steps = getattr(eps_fn, "num_steps", None)
    if num_steps is not None and num_steps != len(times_np) - 1:
        raise ValueError(f"the model has one patch size per step for {num_steps} steps, but the "
                         f"time grid has {len(times_np) - 1} steps; pass a grid of that length "
                         "or a scale list with one entry per step")
    x = jnp.asarray(x_T, jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"x_T must be [B, H, W, C]; got shape {x.shape}")
    traj, x0s = [x], []
    steps = range(len(times_np) - 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", leave=False)
    # A Python loop, unrolled under jit: the step index i stays a Python int, so a machine
    # picks each step's patch size statically (one compiled computation per step).
    for i in steps:
        t = jnp.asarray(times_np[i], jnp.float32)
        t_next = jnp.asarray(times_np[i + 1], jnp.float32)
        eps = eps_fn(x, t, i)
        if return_trajectory:
            a, _, b = schedules_lib.coefficients(t, schedule)
            x0s.append((x - b * eps) / a)
        step_key = None if key is None else jax.random.fold_in(key, i)
        x = ddim_step(x, eps, t, t_next, schedule=schedule, eta=eta, key=step_key)
        if return_trajectory:
            traj.append(x)
    if not return_trajectory:
        return x
    return SampleResult(x0=x, trajectory=jnp.stack(traj), x0_hat=jnp.stack(x0s),
                        times=jnp.asarray(times_np))

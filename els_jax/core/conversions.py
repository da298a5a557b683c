"""The one place where score, noise prediction and denoised mean are converted (docs/theory.md §1).

With a = sqrt(ᾱ(t)), b² = 1 - ᾱ(t) and x = a·x_0 + b·ε:

    score  s   = ∇ log p_t(x)
    noise  ε̂   = -b·s
    mean   x̂_0 = (x + b²·s)/a          (Tweedie)

``t`` is a scalar or a vector with one time per batch element; arrays are [B, H, W, C].
b² is floored at ``B2_FLOOR`` so that t = 0 gives large but finite numbers, never inf/NaN.
"""

from __future__ import annotations

import jax.numpy as jnp

from els_jax.core import schedules as schedules_lib

__all__ = ["score_to_eps", "eps_to_score", "score_to_x0", "x0_to_score", "eps_to_x0",
           "x0_to_eps", "broadcast_time", "B2_FLOOR", "x0_to_score_at", "x0_to_eps_at",
           "eps_at"]

B2_FLOOR = schedules_lib.B2_FLOOR


def broadcast_time(v, x):
    """Reshapes a per-example coefficient [B] (or a scalar) to broadcast against x [B, ...]."""
    v = jnp.asarray(v, jnp.float32)
    if v.ndim == 1:
        v = v.reshape(v.shape + (1,) * (x.ndim - 1))
    return v


def _coeffs(t, x, schedule):
    a, b2, _ = schedules_lib.coefficients(t, schedules_lib.get(schedule))
    b2 = jnp.maximum(b2, B2_FLOOR)
    return broadcast_time(a, x), broadcast_time(b2, x), broadcast_time(jnp.sqrt(b2), x)


# The same conversions from a machine's coefficients (``schedules.Coefficients``: a, b² per
# query image, b² already floored), for machines that have turned t into them once.

def x0_to_score_at(x0, x, coeffs):
    """s = -(x - a·x̂_0)/b², with a, b² [B] from ``schedules.query_coefficients``."""
    a, b2 = broadcast_time(coeffs.a, x), broadcast_time(coeffs.b2, x)
    return -(x - a * x0) / b2


def x0_to_eps_at(x0, x, coeffs):
    """ε̂ = (x - a·x̂_0)/b, with a, b² [B] from ``schedules.query_coefficients``."""
    a, b = broadcast_time(coeffs.a, x), broadcast_time(jnp.sqrt(coeffs.b2), x)
    return (x - a * x0) / b


def eps_at(score, coeffs):
    """ε̂ = -b·s, with b² [B] from ``schedules.query_coefficients``."""
    return -broadcast_time(jnp.sqrt(coeffs.b2), score) * score


def score_to_eps(score, t, *, schedule=schedules_lib.Cosine()):
    """ε̂ = -b·s."""
    _, _, b = _coeffs(t, score, schedule)
    return -b * score


def eps_to_score(eps, t, *, schedule=schedules_lib.Cosine()):
    """s = -ε̂/b."""
    _, _, b = _coeffs(t, eps, schedule)
    return -eps / b


def score_to_x0(score, x, t, *, schedule=schedules_lib.Cosine()):
    """x̂_0 = (x + b²·s)/a."""
    a, b2, _ = _coeffs(t, x, schedule)
    return (x + b2 * score) / a


def x0_to_score(x0, x, t, *, schedule=schedules_lib.Cosine()):
    """s = -(x - a·x̂_0)/b²."""
    a, b2, _ = _coeffs(t, x, schedule)
    return -(x - a * x0) / b2


def eps_to_x0(eps, x, t, *, schedule=schedules_lib.Cosine()):
    """x̂_0 = (x - b·ε̂)/a."""
    a, _, b = _coeffs(t, x, schedule)
    return (x - b * eps) / a


def x0_to_eps(x0, x, t, *, schedule=schedules_lib.Cosine()):
    """ε̂ = (x - a·x̂_0)/b."""
    a, _, b = _coeffs(t, x, schedule)
    return (x - a * x0) / b

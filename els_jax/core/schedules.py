"""Noise schedules of the variance-preserving forward process (docs/theory.md §1).

A schedule is a small frozen object with one method, ``alpha_bar(t)``: the signal
fraction ᾱ(t) of x_t = sqrt(ᾱ(t))·x_0 + sqrt(1-ᾱ(t))·ε, with t ∈ [0, 1] (t = 0 is data).

    >>> import els_jax as ej
    >>> s = ej.schedules.cosine()
    >>> float(s.alpha_bar(0.0))
    1.0

Available (a literal dict, ``SCHEDULES``, lists them):
  - "cosine" (default, the paper's): ᾱ(t) = cos²((t/1.008)·π/2); ᾱ(1) ≈ 1.55e-4.
  - "cosine_shifted" (Nichol & Dhariwal): ᾱ(t) = cos²(((t+s)/(1+s))·π/2) / cos²((s/(1+s))·π/2),
    s = 0.008; note ᾱ(1) = 0 up to rounding, so a sampler should not start exactly at t = 1.
  - "linear": 1 - ᾱ(t) = 0.01 + 0.97·t.
  - "exponential": 1 - ᾱ(t) = 1 - exp(-2t).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax.numpy as jnp

__all__ = ["Schedule", "Cosine", "CosineShifted", "Linear", "Exponential", "SCHEDULES",
           "cosine", "cosine_shifted", "linear", "exponential", "get", "coefficients",
           "Coefficients", "query_coefficients", "B2_FLOOR"]

# b² is floored here so that t = 0 gives large but finite scores, never inf/NaN.
B2_FLOOR = 1e-12


class Schedule:
    """Base class: subclasses define ``alpha_bar(t)`` for scalar or array t (float32)."""

    name: str = "schedule"

    def alpha_bar(self, t):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
    """The paper's cosine schedule, ᾱ(t) = cos²((t/(1+s))·π/2), without the +s shift."""

    s: float = 0.008
    name: str = "cosine"

    def alpha_bar(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.cos(t / (1.0 + self.s) * (math.pi / 2)) ** 2


@dataclasses.dataclass(frozen=True)
class CosineShifted(Schedule):
    """Nichol & Dhariwal: ᾱ(t) = cos²(((t+s)/(1+s))·π/2) / cos²((s/(1+s))·π/2)."""

    s: float = 0.008
    name: str = "cosine_shifted"

    def alpha_bar(self, t):
        t = jnp.asarray(t, jnp.float32)
        f0 = math.cos(self.s / (1.0 + self.s) * math.pi / 2) ** 2
        # The max keeps ᾱ ≥ 0: cos(π/2) rounds to a tiny negative in float32.
        return jnp.maximum(jnp.cos((t + self.s) / (1.0 + self.s) * (math.pi / 2)), 0.0) ** 2 / f0


@dataclasses.dataclass(frozen=True)
class Linear(Schedule):
    """1 - ᾱ(t) = b0 + (b1 - b0)·t, default b0 = 0.01, b1 = 0.98."""

    b0: float = 0.01
    b1: float = 0.98
    name: str = "linear"

    def alpha_bar(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 1.0 - (self.b0 + (self.b1 - self.b0) * t)


@dataclasses.dataclass(frozen=True)
class Exponential(Schedule):
    """1 - ᾱ(t) = 1 - exp(-rate·t), default rate 2."""

    rate: float = 2.0
    name: str = "exponential"

    def alpha_bar(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.exp(-self.rate * t)


def cosine() -> Cosine:
    return Cosine()


def cosine_shifted() -> CosineShifted:
    return CosineShifted()


def linear() -> Linear:
    return Linear()


def exponential() -> Exponential:
    return Exponential()


SCHEDULES = {
    "cosine": cosine,
    "cosine_shifted": cosine_shifted,
    "linear": linear,
    "exponential": exponential,
}


def get(name: str | Schedule) -> Schedule:
    """Returns the schedule called ``name`` (or ``name`` itself if it is a Schedule)."""
    if isinstance(name, Schedule):
        return name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]()


def coefficients(t, schedule: Schedule):
    """(a, b², b) at time t: a = sqrt(ᾱ(t)), b² = 1 - ᾱ(t), b = sqrt(b²). float32."""
    alpha_bar = schedule.alpha_bar(t)
    b2 = jnp.maximum(1.0 - alpha_bar, 0.0)
    return jnp.sqrt(alpha_bar), b2, jnp.sqrt(b2)


class Coefficients(NamedTuple):
    """What a machine needs of the time t, one entry per query image: a = sqrt(ᾱ(t)) [B] and
    b² = 1 − ᾱ(t) [B], floored at ``B2_FLOOR``. Machines turn t into these once, at their
    public boundary (``query_coefficients``); every engine, bank and softmax below takes them
    and never a time or a schedule."""

    a: "jnp.ndarray"
    b2: "jnp.ndarray"


def query_coefficients(t, batch: int, schedule: Schedule) -> Coefficients:
    """a [B] and floored b² [B] for ``batch`` queries at time t (a scalar or one per query)."""
    a, b2, _ = coefficients(jnp.asarray(t, jnp.float32), get(schedule))
    return Coefficients(jnp.broadcast_to(a, (batch,)),
                        jnp.maximum(jnp.broadcast_to(b2, (batch,)), B2_FLOOR))

"""The forward (noising) process: x_t = sqrt(ᾱ(t))·x_0 + sqrt(1-ᾱ(t))·ε (docs/theory.md §1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from els_jax.core import schedules as schedules_lib
from els_jax.core.conversions import broadcast_time

__all__ = ["add_noise"]


def add_noise(key, x0, t, schedule=schedules_lib.Cosine()):
    """Samples x_t ~ q(x_t | x_0).

    Args:
      key: PRNG key.
      x0: clean images [B, H, W, C] in [-1, 1].
      t: scalar time or one time per image, shape [B].
      schedule: a Schedule or its name.
    Returns:
      (x_t, eps), both shaped like x0; eps is the standard normal noise that was added.
    """
    a, _, b = schedules_lib.coefficients(t, schedules_lib.get(schedule))
    eps = jax.random.normal(key, x0.shape, jnp.float32)
    x_t = broadcast_time(a, x0) * x0 + broadcast_time(b, x0) * eps
    return x_t, eps

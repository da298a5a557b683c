"""The seeds every model of a run shares: x_T per seed, the class label per seed, and the
grouping of seeds by label (conditional runs sample one machine per label)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["seed_noise", "seed_labels", "by_label"]


def seed_noise(seed: int, seeds: Sequence[int], shape) -> jax.Array:
    """x_T for each seed s: normal(fold_in(PRNGKey(seed), s), shape): [S, *shape]."""
    base = jax.random.PRNGKey(seed)
    return jnp.stack([jax.random.normal(jax.random.fold_in(base, int(s)), tuple(shape),
                                        jnp.float32) for s in seeds])


def seed_labels(seeds: Sequence[int], num_classes: int | None):
    """Labels for conditional runs: seed s gets class s mod num_classes (balanced)."""
    if num_classes is None:
        return None
    return np.asarray(seeds, np.int32) % num_classes


def by_label(labels):
    """Runs fn(index array, label or None) per label group; None labels = one group."""
    if labels is None:
        return [(None, None)]
    return [(np.flatnonzero(labels == c), int(c)) for c in np.unique(labels)]

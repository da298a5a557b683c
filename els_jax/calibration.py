"""Calibrating the locality scale of a machine to a network (SPEC §4).

Along the network's own sampler trajectory x_{t_0}, x_{t_1}, … (from the same seeds and
labels as the comparison), at every step i and for every candidate patch size k, compare the
machine's score with the network's, s_net = −ε̂_net / b:

    k*_s(i) = argmax_k  cos( s_k(x_i), s_net(x_i) )        per seed s,
    k(i)    = the median of k*_s(i) over seeds, rounded to the nearest odd size (ties up).

Because both scores are −ε̂/b with the same b > 0, the cosine of the scores equals the cosine of
the ε̂'s. The result is a scale list in the authors' order: index 0 = the lowest-noise (last)
step, so ``scales[m − 1 − i]`` is the size for step i (what ``make_machine`` expects).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from els_jax import machine as machine_lib
from els_jax import metrics, sampler
from els_jax import schedules as schedules_lib

__all__ = ["Calibration", "calibrate", "candidate_machines", "default_candidates", "median_odd"]


class Calibration(NamedTuple):
    """scales: tuple, index 0 = last step; per_step: [m] sizes in step order (0 = first);
    best: [m, S] the best k per step and seed; cosine: [m, K, S] cos(machine_k, network);
    candidates: the K sizes tried; times: the [m + 1] grid."""

    scales: tuple
    per_step: np.ndarray
    best: np.ndarray
    cosine: np.ndarray
    candidates: tuple
    times: np.ndarray


def default_candidates(h: int, w: int) -> tuple[int, ...]:
    """3, 5, …, up to the image size (the largest odd k ≤ min(H, W))."""
    top = min(h, w)
    return tuple(range(3, top + 1, 2)) or (1,)


def median_odd(values, axis=-1) -> np.ndarray:
    """Median along ``axis`` rounded to the nearest odd integer (a tie goes to the larger).

    With an even number of seeds the median of odd sizes can be even (e.g. 4); the nearest odd
    size is then either neighbour, and we take the larger one: 2·floor(m/2) + 1.
    """
    m = np.median(np.asarray(values, np.float64), axis=axis)
    return (2 * np.floor(m / 2) + 1).astype(np.int64)


def calibrate(network_eps: Callable, machines: dict[int, Callable], x_T, times, *,
              schedule=schedules_lib.Cosine(), progress: bool = False) -> Calibration:
    """Picks, per sampler step, the patch size whose machine best matches the network.

    Args:
      network_eps: the network as ``eps_fn(x, t, i)`` (see ``make_network``); it drives the
        trajectory (deterministic DDIM).
      machines: {k: eps_fn(x, t, i)} one constant-size machine per candidate size k, e.g.
        ``{k: make_machine("els", images, scales=k, boundary="zeros") for k in (3, 5, 7)}``.
        For class-conditional runs every machine and the network must be built for the
        same labels as the seeds in ``x_T``.
      x_T: [S, H, W, C] starting noise of the S calibration seeds.
      times: the descending grid [m + 1] the machines will later be sampled on.
      schedule: the noise schedule of the network and the machines.
    Returns:
      a Calibration (``.scales`` is what ``make_machine(..., scales=...)`` takes).
    """
    if not machines:
        raise ValueError("no candidate machines given")
    schedule = schedules_lib.get(schedule)
    cands = tuple(sorted(machines))
    times_np = np.asarray(times, np.float32)
    x = jnp.asarray(x_T, jnp.float32)
    m = len(times_np) - 1
    cos = np.zeros((m, len(cands), x.shape[0]))
    steps = range(m)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="calibrate", leave=False)
    for i in steps:
        t, t_next = jnp.float32(times_np[i]), jnp.float32(times_np[i + 1])
        eps_net = network_eps(x, t, i)
        for j, k in enumerate(cands):
            cos[i, j] = metrics.cosine_similarity(eps_net, machines[k](x, t, i))
        x = sampler.ddim_step(x, eps_net, t, t_next, schedule=schedule)
    # Ties (e.g. at t = 1, where a = 0 and every machine returns its candidates' mean) go to
    # the largest size: argmax over the reversed candidate axis.
    best = np.asarray(cands)[::-1][cos[:, ::-1].argmax(axis=1)]    # [m, S]
    per_step = median_odd(best, axis=1)
    return Calibration(scales=tuple(int(k) for k in per_step[::-1]), per_step=per_step,
                       best=best, cosine=cos, candidates=cands, times=times_np)


def candidate_machines(kind: str, images, candidates: Sequence[int], **machine_kwargs):
    """{k: make_machine(kind, images, scales=k, ...)} for the calibration."""
    return {int(k): machine_lib.make_machine(kind, images, scales=int(k), **machine_kwargs)
            for k in candidates}

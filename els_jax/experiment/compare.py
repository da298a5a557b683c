"""Stage 3 of the experiment: sample the network and every family from the same seeds, and
check that they were.

    ``sample_machine``     one analytic family from x_T (one machine per label), with the
                           single-step agreement with the network (docs/theory.md §7)
    ``sample_network``     the trained network from x_T
    ``compare_models``     the stage: parts/<model>.npz per model, resumable model by model
    ``check_same_inputs``  identical x_T, seeds, labels and machine time grid, or an error
    ``align_steps``        the network step nearest to each machine step
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core import conversions, sampler
from els_jax.core import schedules as schedules_lib
from els_jax.experiment import metrics
from els_jax.experiment.config import FAMILIES
from els_jax.experiment.files import atomic_npz
from els_jax.experiment.seeds import by_label, seed_labels, seed_noise
from els_jax.machines import factory as machine_lib
from els_jax.machines import families
from els_jax.machines import pca_locality as pca_lib
from els_jax.nets import networks

__all__ = ["sample_machine", "sample_network", "compare_models", "check_same_inputs",
           "align_steps", "pca_mask_sizes"]


def sample_machine(kind: str, images, train_labels, x_T, labels, times, *, scales=None,
                   boundary="zeros", schedule, network=None, solver="ddim", **machine_kwargs
                   ) -> tuple[sampler.SampleResult, dict | None]:
    """Samples machine ``kind`` from x_T; for conditional runs one machine per label (mask).

    With ``network`` (a function label → eps_fn(x, t, i), label None for unconditional runs,
    e.g. ``lambda y: make_network(model, params, label=y)``), also the single-step agreement
    (docs/theory.md §7): at every
    step i of the machine's own trajectory, the network's x̂_0 at the machine's x_{t_i}
    against the machine's x̂_0, per seed: {"R2": [m, S], "mse": [m, S]} (target: the network).
    Returns (SampleResult with x0 [S, ...] and x0_hat [m, S, ...] in the seeds' order,
    single-step dict or None).
    """
    x_T = jnp.asarray(x_T)
    m = len(times) - 1
    x0 = np.zeros(x_T.shape, np.float32)
    x0_hat = np.zeros((m,) + x_T.shape, np.float32)
    single = None if network is None else {"R2": np.zeros((m, x_T.shape[0])),
                                           "mse": np.zeros((m, x_T.shape[0]))}
    for idx, label in by_label(labels):
        sel = slice(None) if idx is None else idx
        mask = None if label is None else (np.asarray(train_labels) == label)
        eps_fn = machine_lib.make_machine(kind, images, scales=scales, boundary=boundary,
                                          schedule=schedule, mask=mask, compile_for=x_T[sel],
                                          **machine_kwargs)
        res = sampler.sample(eps_fn, x_T[sel], times, schedule=schedule,
                             return_trajectory=True, solver=solver)
        x0[sel] = np.asarray(res.x0)
        x0_hat[:, sel] = np.asarray(res.x0_hat)
        if network is not None:
            net = network(label)
            for i in range(m):
                x_t, t = res.trajectory[i], jnp.float32(times[i])
                net_x0 = conversions.eps_to_x0(net(x_t, t, i), x_t, t, schedule=schedule)
                single["R2"][i, sel] = metrics.coefficient_of_determination(
                    net_x0, res.x0_hat[i])
                single["mse"][i, sel] = np.mean(
                    np.square(np.asarray(net_x0) - np.asarray(res.x0_hat[i])).reshape(
                        x_T[sel].shape[0], -1), axis=1)
    return (sampler.SampleResult(x0=x0, trajectory=None, x0_hat=x0_hat,
                                 times=np.asarray(times)), single)


def pca_mask_sizes(images, train_labels, labels, times, *, schedule, tau=None) -> np.ndarray:
    """The PCA-locality masks' median size per step (input pixels per output pixel, the
    median over output pixels and, for conditional runs, over the seeds' labels): [m]. The
    masks are those the machine uses (``pca_locality.locality_mask_at`` at each step's a, b²)."""
    tau = pca_lib.DEFAULT_TAU if tau is None else tau
    sizes = []
    for _, label in by_label(labels):
        # The whole set as it is held (no copy), or one class's images.
        fit = families.gaussian_fit(             # the machines' own fit (kept by content)
            images if label is None
            else jnp.asarray(np.asarray(images)[np.asarray(train_labels) == label]))
        per_step = []
        for t in np.asarray(times)[:-1]:
            c = schedules_lib.query_coefficients(jnp.float32(t), 1, schedule)
            per_step.append(pca_lib.mask_sizes(
                pca_lib.locality_mask_at(fit, c.a[0], c.b2[0], jnp.float32(tau))))
        sizes.append(np.stack(per_step))                    # [m, D]
    return np.median(np.concatenate(sizes, axis=1), axis=1)


def sample_network(model, params, x_T, labels, times, *, schedule, solver="ddim"
                   ) -> sampler.SampleResult:
    eps_fn = networks.make_network(model, params, label=None if labels is None else labels)
    res = sampler.sample(eps_fn, x_T, times, schedule=schedule, return_trajectory=True,
                         solver=solver)
    return sampler.SampleResult(x0=np.asarray(res.x0), trajectory=None,
                                x0_hat=np.asarray(res.x0_hat), times=np.asarray(times))


def align_steps(times_net, times_machine) -> np.ndarray:
    """For each machine step, the network step at the nearest time (identical grids → i)."""
    tn, tm = np.asarray(times_net)[:-1], np.asarray(times_machine)[:-1]
    return np.abs(tn[None, :] - tm[:, None]).argmin(axis=1)


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _family_kwargs(name: str, scales: dict, boundary: str, seed: int = 0) -> dict:
    """make_machine arguments of a family beyond the shared ones (its calibrated scales)."""
    if name == "els":
        return {"scales": scales["els"]["scales"], "boundary": boundary}
    if name == "ls":
        return {"scales": scales["ls"]["scales"]}
    if name == "els_soft":
        return {"sigmas": scales["els_soft"]["sigmas"], "k_max": scales["els_soft"]["k_max"],
                "boundary": boundary}
    if name == "scfdm":           # the peer's setting (τ = 1, M = 10, s = 0.1), exact over N
        return {"key": jax.random.PRNGKey(seed)}
    return {}


def compare_models(cfg, out, model, params, images, train_labels, num_classes, boundary,
                   scales, schedule, timer, progress, t_max, parts_dir="parts", names=None):
    """Stage 3: <parts_dir>/<model>.npz for the network and every family (``names``, default
    ``cfg.family_names()``), from the same seeds and the same start ``t_max``."""
    parts = os.path.join(out, parts_dir)
    os.makedirs(parts, exist_ok=True)
    seeds = list(range(cfg.n_seeds))
    x_T = seed_noise(cfg.seed, seeds, images.shape[1:])
    labels = seed_labels(seeds, num_classes)
    t_machine = sampler.uniform_times(cfg.machine_steps, t_max=t_max)
    t_net = sampler.uniform_times(cfg.network_steps, t_max=t_max)
    names = cfg.family_names() if names is None else tuple(names)
    jobs = [("network", None)] + [(n, FAMILIES[n]) for n in names]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc=f"compare (t_max={t_max:g})", leave=False)
    for name, kind in jobs:
        path = os.path.join(parts, f"{name}.npz")
        if os.path.exists(path):
            continue
        t0 = time.perf_counter()
        single = None
        if kind is None:
            res = sample_network(model, params, x_T, labels, t_net, schedule=schedule,
                                 solver=cfg.solver)
        else:
            res, single = sample_machine(kind, images, train_labels, x_T, labels, t_machine,
                                         schedule=schedule, solver=cfg.solver,
                                         network=lambda y: networks.make_network(
                                             model, params, label=y),
                                         **_family_kwargs(name, scales, boundary, cfg.seed))
        # What this model was actually started from, recorded with its result: checked below.
        extra = {} if single is None else {"single_step_R2": single["R2"],
                                           "single_step_mse": single["mse"]}
        if kind == "pca_locality":
            extra["mask_median"] = pca_mask_sizes(images, train_labels, labels, t_machine,
                                                  schedule=schedule)
        atomic_npz(path, x0=res.x0, x0_hat=res.x0_hat, times=np.asarray(res.times),
                    x_T=np.asarray(x_T), seeds=np.asarray(seeds),
                    labels=np.asarray([] if labels is None else labels), **extra)
        suffix = "" if parts_dir == "parts" else f"@{t_max:g}"
        timer.add(f"sample_{name}{suffix}", time.perf_counter() - t0)
    return {name: dict(np.load(os.path.join(parts, f"{name}.npz")))
            for name in ("network",) + names}


def check_same_inputs(results: dict, machine_times) -> None:
    """Raises if the models were not started from identical x_T, seeds and labels, or if the
    machines did not share one time grid (the network may have its own, finer grid)."""
    ref = results["network"]
    for name, r in results.items():
        for key in ("x_T", "seeds", "labels"):
            if _digest(r[key]) != _digest(ref[key]):
                raise AssertionError(f"{name} and network were sampled from different {key}")
        if name != "network" and not np.array_equal(r["times"], np.asarray(machine_times)):
            raise AssertionError(f"machine {name} was sampled on another time grid")

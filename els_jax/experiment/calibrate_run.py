"""Stage 2 of the experiment: calibrate the machines to the run's network (scales.json).

    ``calibrate_scales``  the ELS and LS patch size per step, the median over the calibration
                          seeds (seeds disjoint from the comparison's)
    ``calibrate_soft``    the els_soft window width per step, fitted from the ELS sizes

Both drive ``els_jax.experiment.calibration`` (the algorithm) along the network's own DDIM
trajectory, and are skipped when a resumed run finds their results in scales.json.
"""

from __future__ import annotations

import os
import time

import numpy as np

from els_jax.core import sampler
from els_jax.experiment import calibration as calibrate_lib
from els_jax.experiment.files import atomic_json, read_json
from els_jax.experiment.seeds import by_label, seed_labels, seed_noise
from els_jax.nets import networks

__all__ = ["calibrate_scales", "calibrate_soft"]

_SCALES_FILE = "scales.json"


def _mean_over_seeds(cos) -> list:
    """[m, K, S] cosines → [m][K] means over seeds, None where no seed tried the size."""
    tried = ~np.isnan(cos)
    total = np.where(tried, cos, 0.0).sum(axis=2)
    count = tried.sum(axis=2)
    return [[float(t / c) if c else None for t, c in zip(trow, crow)]
            for trow, crow in zip(total, count)]


def calibrate_scales(cfg, out, model, params, images, train_labels, num_classes, boundary,
                     schedule, timer, progress):
    """Stage 2: scales.json for ELS and LS (median over calibration seeds)."""
    path = os.path.join(out, _SCALES_FILE)
    if os.path.exists(path):
        return read_json(path)
    t0 = time.perf_counter()
    h, w = images.shape[1:3]
    # A window wider than the network's receptive field is one the network cannot use (the
    # ResNet's is 17 at any image size): by default the candidates stop there.
    reach = networks.receptive_field(model) or max(h, w)
    cands = tuple(cfg.candidates or calibrate_lib.default_candidates(min(h, reach),
                                                                     min(w, reach)))
    seeds = list(range(cfg.n_seeds, cfg.n_seeds + cfg.calib_seeds))   # disjoint from comparison
    x_T = seed_noise(cfg.seed, seeds, images.shape[1:])
    labels = seed_labels(seeds, num_classes)
    times = sampler.uniform_times(cfg.machine_steps, t_max=cfg.start)
    result = {"candidates": list(cands), "calibration_seeds": seeds,
              "times": np.asarray(times).tolist()}
    for name, kind in (("els", "els"), ("ls", "local")):
        if name not in cfg.family_names():
            continue
        best, cos = [], []
        for idx, label in by_label(labels):
            sel = slice(None) if idx is None else idx
            mask = None if label is None else (train_labels == label)
            net = networks.make_network(model, params,
                                        label=None if labels is None else labels[sel])
            local_cands = [k for k in cands if kind == "els" or k <= 2 * min(h, w) - 1]
            machines = calibrate_lib.candidate_machines(
                kind, images, local_cands, boundary=boundary, schedule=schedule, mask=mask,
                compile_for=x_T[sel])
            cal = calibrate_lib.calibrate(net, machines, x_T[sel], times, schedule=schedule,
                                          progress=progress, neighbours=cfg.calib_neighbours)
            best.append(cal.best)
            cos.append(cal.cosine)
        best = np.concatenate(best, axis=1)
        per_step = calibrate_lib.median_odd(best, axis=1)
        result[name] = {"scales": [int(k) for k in per_step[::-1]],
                        "per_step": per_step.tolist(), "best_per_seed": best.tolist(),
                        "mean_cosine": _mean_over_seeds(np.concatenate(cos, axis=2))}
    atomic_json(path, result)
    timer.add("calibrate", time.perf_counter() - t0)
    return result


def calibrate_soft(cfg, out, scales, model, params, images, train_labels, num_classes,
                   boundary, schedule, timer, progress):
    """Stage 2b: the els_soft window widths (docs/theory.md §7), fitted (``cfg.soft_method``) along the
    network's trajectory from the calibration seeds, on a k_max × k_max support with k_max
    the widest calibrated ELS size, each step started from the Gaussian that matches its
    calibrated ELS size. Added to scales.json."""
    if "els_soft" in scales:
        return scales
    t0 = time.perf_counter()
    seeds = scales["calibration_seeds"]
    x_T = seed_noise(cfg.seed, seeds, images.shape[1:])
    labels = seed_labels(seeds, num_classes)
    times = np.asarray(scales["times"], np.float32)
    k_max = int(max(scales["els"]["scales"]))
    fits = []
    for idx, label in by_label(labels):
        sel = slice(None) if idx is None else idx
        mask = None if label is None else (train_labels == label)
        net = networks.make_network(model, params, label=label)
        fits.append(calibrate_lib.calibrate_sigma(
            net, images, x_T[sel], times, k_max=k_max, boundary=boundary, mask=mask,
            init_scales=scales["els"]["scales"], steps=cfg.soft_steps, lr=cfg.soft_lr,
            schedule=schedule, method=cfg.soft_method or "adam",
            fit_images=cfg.soft_fit_images, fit_pixels=cfg.soft_fit_pixels,
            progress=progress))
    # One width per step for all labels: the geometric mean of the per-label fits.
    per_step = np.exp(np.mean([np.log(f.per_step) for f in fits], axis=0))
    scales = dict(scales, els_soft={
        "k_max": k_max, "sigmas": [float(v) for v in per_step[::-1]],
        "fit": {"images": cfg.soft_fit_images or int(len(images)),
                "pixels": fits[0].pixels, "engine": fits[0].engine,
                "method": cfg.soft_method or "adam", "steps": cfg.soft_steps,
                "lr": cfg.soft_lr},
        "per_step": per_step.tolist(),
        "cosine_before": np.mean([f.cosine_before for f in fits], axis=0).tolist(),
        "cosine_after": np.mean([f.cosine_after for f in fits], axis=0).tolist()})
    atomic_json(os.path.join(out, _SCALES_FILE), scales)
    timer.add("calibrate_soft", time.perf_counter() - t0)
    return scales

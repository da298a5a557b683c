"""The paper's experiment end to end (docs/theory.md §4): train → calibrate → compare → report.

    report = reproduce(ReproduceConfig(dataset="digits", n_seeds=32), out="runs/digits")

Stages, each written atomically into ``out`` and skipped when a resumed run finds it done:

  1. network/        the trained ε-network (``train_and_evaluate``, which itself resumes from
                     its last checkpoint), or an existing run passed as ``checkpoint``.
  2. scales.json     calibration of ELS (boundary = the network's padding) and LS along the
                     network's own DDIM trajectory from ``calib_seeds`` seeds that are NOT
                     among the comparison seeds (so the comparison is not fitted to itself).
  3. parts/*.npz     one file per model: the final images and x̂_0 at every step for the
                     comparison seeds, all started from the same x_T (and labels).
  4. samples.npz, report.json, report.md, figures/*.png.

The models share the noise x_T (seed s: normal(fold_in(PRNGKey(seed), s))), the labels, and
the machines' time grid; the network may use a finer grid (``network_steps``, the paper uses
150 against 20). Before any metric is computed the stored x_T, labels and grids of every model
are checked to be identical: a mismatch is an error, not a silent bias.

This module holds ``reproduce`` and stage 1 (the network); the other stages live in
``calibrate_run`` (2), ``compare`` (3) and ``report`` (4), the run's options in ``config``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax.numpy as jnp

from els_jax.core import data as data_lib
from els_jax.core import sampler
from els_jax.core import schedules as schedules_lib
from els_jax.experiment.calibrate_run import calibrate_scales, calibrate_soft
from els_jax.experiment.compare import check_same_inputs, compare_models
from els_jax.experiment.config import (ReproduceConfig, default_train_config,
                                       shipped_checkpoint)
from els_jax.experiment.files import Timer, atomic_json, atomic_write_text, read_json
from els_jax.experiment.report import write_report
from els_jax.nets import train as train_lib

__all__ = ["reproduce"]

_CONFIG_FILE = "config.json"


def _check_config(out: str, cfg: ReproduceConfig):
    path = os.path.join(out, _CONFIG_FILE)
    new = cfg.to_json()
    if os.path.exists(path):
        old = read_json(path)
        if old != new:
            diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new)
                    if old.get(k) != new.get(k)}
            raise ValueError(f"{out} holds a run with another configuration (saved, requested: "
                             f"{diff}); resume it with the same options or choose a new --out")
    else:
        atomic_json(path, new)


def _network(cfg: ReproduceConfig, out: str, timer: Timer, progress: bool):
    """Stage 1: reuses a given or shipped network, or trains (resuming) one; returns
    (model, params, train config, where the network came from)."""
    if cfg.checkpoint:
        return (*train_lib.load_trained(cfg.checkpoint), cfg.checkpoint)
    shipped = shipped_checkpoint(cfg)
    if shipped is not None:
        return (*train_lib.load_trained(shipped), os.path.relpath(shipped))
    workdir = os.path.join(out, "network")
    tcfg = default_train_config(cfg.dataset, cfg.arch, cfg.padding, cfg.conditional,
                                cfg.image_size)
    tcfg = dataclasses.replace(tcfg, max_examples=cfg.max_examples, data_dir=cfg.data_dir,
                               **(cfg.train or {}))
    done_marker = os.path.join(workdir, "DONE")
    if not os.path.exists(done_marker):
        t0 = time.perf_counter()
        train_lib.train_and_evaluate(tcfg, workdir, progress=progress)
        atomic_write_text(done_marker, "trained\n")
        timer.add("train", time.perf_counter() - t0)
    return (*train_lib.load_trained(workdir), "network (trained by this run)")


def reproduce(cfg: ReproduceConfig, out: str, *, progress: bool = True) -> dict:
    """Runs (or resumes) the whole experiment in ``out`` and returns the report dict.

    Returns: the contents of report.json: median_r / median_r2 / median_R2 ({"els", "ls",
    "is"} → value), their bootstrap intervals ci_*, frac_els_beats_is, scales, n_seeds,
    elapsed_s (summed over resumed sessions), per-seed metrics and per-step agreement.
    """
    cfg = cfg.resolved()
    cfg.validate()
    t_start = time.perf_counter()
    if cfg.checkpoint is None and cfg.dataset in data_lib.TFDS_DATASETS:
        # Data that is not prepared here fails now, before the run folder is written.
        data_lib.load_dataset(cfg.dataset, data_dir=cfg.data_dir, max_examples=1)
    os.makedirs(out, exist_ok=True)
    _check_config(out, cfg)
    timer = Timer(out)
    model, params, tcfg, network_source = _network(cfg, out, timer, progress)
    t_start = time.perf_counter()
    if cfg.data_dir:          # the data may live elsewhere on this machine than where trained
        tcfg = dataclasses.replace(tcfg, data_dir=cfg.data_dir)
    # uint8 where the set came so at this size (CIFAR-10; docs/theory.md §9.2): every family
    # reads (u − 127.5)/127.5, the values the float32 set holds, in a quarter of the memory.
    images, train_labels = data_lib.load_dataset(tcfg.dataset, data_dir=tcfg.data_dir,
                                                 image_size=tcfg.image_size,
                                                 max_examples=tcfg.max_examples,
                                                 keep_uint8=True)
    # On the device once: every machine of the run holds this array as it is (a host array
    # would be copied by each machine: twice the images' bytes at CelebA's N).
    images = jnp.asarray(images)
    num_classes = getattr(model, "num_classes", None)
    boundary = tcfg.padding
    schedule = schedules_lib.get(tcfg.schedule)
    t_prep = time.perf_counter() - t_start
    scales = calibrate_scales(cfg, out, model, params, images, train_labels, num_classes,
                              boundary, schedule, timer, progress)
    if "els_soft" in cfg.family_names():
        scales = calibrate_soft(cfg, out, scales, model, params, images, train_labels,
                                num_classes, boundary, schedule, timer, progress)
    by_start = {}
    for t_max in cfg.starts():
        # The primary grid in parts/, the side-by-side ones in parts/t_max=<t>/ (same seeds,
        # same scales by step index).
        parts_dir = "parts" if t_max == cfg.start else os.path.join("parts", f"t_max={t_max:g}")
        names = cfg.family_names() if t_max == cfg.start else cfg.side_family_names()
        results = compare_models(cfg, out, model, params, images, train_labels, num_classes,
                                 boundary, scales, schedule, timer, progress, t_max, parts_dir,
                                 names)
        check_same_inputs(results, sampler.uniform_times(cfg.machine_steps, t_max=t_max))
        by_start[t_max] = results
    t0 = time.perf_counter()
    timer.add("load", t_prep)
    report = write_report(cfg, tcfg, out, by_start, scales, timer, t0, network_source)
    return report

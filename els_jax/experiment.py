"""The paper's experiment end to end (SPEC §4): train → calibrate → compare → report.

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from els_jax import calibration as calibrate_lib
from els_jax import data as data_lib
from els_jax import machine as machine_lib
from els_jax import conversions, metrics, networks, sampler
from els_jax import schedules as schedules_lib
from els_jax import train as train_lib

__all__ = ["ReproduceConfig", "reproduce", "default_train_config", "digits_train_config",
           "mnist5k_train_config", "shipped_checkpoint", "FAMILIES", "MACHINE_NAMES",
           "DATASET_DEFAULTS",
           "CHECKPOINTS_DIR"]

# Every model compared with the network: report name → ``make_machine`` kind (a literal dict,
# no registry). ELS and LS take the calibrated patch sizes, els_soft the fitted window widths
# (SPEC §4, §7); the paper's three first, then the other analytic families (SPEC §7).
FAMILIES = {"els": "els", "ls": "local", "is": "ideal", "gaussian": "gaussian",
            "nearest": "nearest", "pca_locality": "pca_locality", "els_soft": "els_soft"}
MACHINE_NAMES = tuple(FAMILIES)

# What `reproduce` runs on a data set when the config leaves calib_seeds / families as None.
# mnist5k (N = 5000 at 32×32): one exact ELS call on 16 queries costs 10⁴–10⁵× one on 8×8
# digits, so the calibration uses 4 seeds, and els_soft, whose width fit differentiates
# through ELS 25 times per step, is left out (ask for it with families=(..., "els_soft")).
DATASET_DEFAULTS = {
    "mnist5k": {"calib_seeds": 4,
                "families": tuple(n for n in MACHINE_NAMES if n != "els_soft")},
}
_CONFIG_FILE, _SCALES_FILE, _TIMINGS_FILE = "config.json", "scales.json", "timings.json"

# Trained networks shipped with the repository (made by `els-jax train` with the configs in
# experiments/configs/; each directory holds config.json, metrics.jsonl and one checkpoint).
CHECKPOINTS_DIR = Path(__file__).resolve().parents[1] / "experiments" / "checkpoints"
_SHIPPED = {("digits", "resnet", "zeros"): "digits_resnet_zeros",
            ("mnist5k", "resnet", "zeros"): "mnist5k_resnet_zeros",
            ("mnist5k", "resnet", "circular"): "mnist5k_resnet_circular",
            ("mnist5k", "unet", "zeros"): "mnist5k_unet_zeros"}


def digits_train_config(**overrides) -> train_lib.TrainConfig:
    """The small ResNet on the embedded 8×8 digits that the main job trains on 2 CPU cores.

    The paper's ResNet (6 residual 3×3 layers, zero padding, no normalisation) at width 64
    instead of 256; a 5× larger learning rate with a faster decay and an EMA so that a few
    thousand steps suffice (the paper trains 300 epochs at lr 1e-4).
    """
    base = dict(dataset="digits", arch="resnet", padding="zeros", conditional=False,
                channels=64, depth=6, batch_size=128, steps=3000, epochs=None, lr=5e-4,
                lr_decay=0.9997, ema=0.999, seed=0, checkpoint_every=500, log_every=100)
    base.update(overrides)
    return train_lib.TrainConfig(**base)


def mnist5k_train_config(arch: str = "resnet", padding: str = "zeros", **overrides
                         ) -> train_lib.TrainConfig:
    """The paper's MNIST networks at a width 2 CPU cores train in about an hour, on the
    embedded real MNIST digits ("mnist5k", 32×32).

    ResNet: 6 residual 3×3 layers (receptive field 17, as SPEC §5) at width 32 instead of 256;
    UNet: 3 scales of 32/64/128 channels instead of 64/128/256. 3000 steps of batch 128 (≈ 77
    epochs of the 5000 digits) at lr 5e-4 ×0.9998 per step with an EMA of the weights (the
    paper: 300 epochs of 60 000 digits at lr 1e-4).
    """
    base = dict(dataset="mnist5k", image_size=32, arch=arch, padding=padding,
                conditional=False, channels=32 if arch == "resnet" else (32, 64, 128),
                depth=6, batch_size=128, steps=3000, epochs=None, lr=5e-4, lr_decay=0.9998,
                ema=0.999, weight_decay=0.0, seed=0, checkpoint_every=200,
                keep_checkpoints=2, log_every=50)
    base.update(overrides)
    return train_lib.TrainConfig(**base)


def default_train_config(dataset: str, arch: str, padding: str, conditional: bool,
                         image_size: int | None = None) -> train_lib.TrainConfig:
    """The paper's recipe (SPEC §5) for a data set; the CPU-sized ones for the embedded sets."""
    if dataset == "digits":
        return digits_train_config(arch=arch, padding=padding, conditional=conditional,
                                   image_size=image_size)
    if dataset == "mnist5k":
        return mnist5k_train_config(arch=arch, padding=padding, conditional=conditional,
                                    image_size=32 if image_size is None else image_size)
    return train_lib.TrainConfig(dataset=dataset, arch=arch, padding=padding,
                                 conditional=conditional, image_size=image_size)


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """One run of the experiment. JSON-serialisable; saved as ``config.json`` in the run.

    dataset, image_size, max_examples, data_dir: the training set (SPEC §6).
    arch, padding, conditional: the network (ignored when ``checkpoint`` or ``train`` is set).
    train: optional TrainConfig fields (dict) overriding ``default_train_config``.
    checkpoint: reuse the network trained in this directory instead of training one.
    n_seeds: comparison seeds; calib_seeds: calibration seeds (disjoint from them); None = the
      data set's default (``DATASET_DEFAULTS``, else 8).
    machine_steps / network_steps: DDIM steps for the machines and for the network.
    candidates: patch sizes tried by the calibration (default 3, 5, …, image size).
    seed: base of the noise seeds.
    t_max: first time of every grid (SPEC §8), shared by the machines and the network. None
      (the default) = the authors' effective start, (machine_steps − 1)/machine_steps (0.95
      for 20 steps): the paper's protocol. With the unshifted cosine schedule ᾱ(1) ≈ 1.5e-4,
      so a first DDIM step from t = 1 multiplies the network's ε̂ error by
      |b' − sqrt(ᾱ'/ᾱ)·b| ≈ 6 at 20 steps and the comparison then measures mostly that step.
    compare_t_max: further starts compared side by side with the same seeds and the same
      calibrated scales (by step index); default (1.0,), SPEC's plain grid. Reported under
      ``by_t_max``.
    retrain: train the network even when the repository ships one for this configuration
      (``experiments/checkpoints/``; used by default for the embedded data sets).
    soft_steps: gradient steps per sampler step when fitting the els_soft widths.
    families: the analytic families compared (names of ``FAMILIES``); None = the data set's
      default (``DATASET_DEFAULTS``, else all). ELS and IS are always included (the headline:
      ELS vs IS).
    calib_neighbours: the calibration's search (``calibrate(neighbours=...)``): after the first
      step, try only the sizes within this many places of the previous step's best sizes.
      None = every candidate at every step.
    """

    dataset: str = "digits"
    image_size: int | None = None
    max_examples: int | None = None
    data_dir: str | None = None
    arch: str = "resnet"
    padding: str = "zeros"
    conditional: bool = False
    train: dict | None = None
    checkpoint: str | None = None
    n_seeds: int = 32
    calib_seeds: int | None = None
    machine_steps: int = 20
    network_steps: int = 150
    candidates: tuple[int, ...] | None = None
    seed: int = 0
    t_max: float | None = None
    compare_t_max: tuple[float, ...] = (1.0,)
    retrain: bool = False
    soft_steps: int = 25
    families: tuple[str, ...] | None = None
    calib_neighbours: int | None = 1

    @property
    def start(self) -> float:
        """The primary grid's first time: ``t_max``, or the authors' (n − 1)/n."""
        if self.t_max is not None:
            return float(self.t_max)
        return (self.machine_steps - 1) / self.machine_steps if self.machine_steps > 1 else 1.0

    def starts(self) -> list[float]:
        """The primary start, then the other ``compare_t_max`` (duplicates dropped)."""
        out = [self.start]
        for t in self.compare_t_max:
            if all(abs(float(t) - u) > 1e-9 for u in out):
                out.append(float(t))
        return out

    def resolved(self) -> "ReproduceConfig":
        """The fields left None filled from ``DATASET_DEFAULTS`` (what runs, and is saved) of
        the data set the network was trained on (a given checkpoint's, else ``dataset``)."""
        dataset = self.dataset
        saved = os.path.join(self.checkpoint or "", train_lib.CONFIG_FILE)
        if self.checkpoint and os.path.exists(saved):
            dataset = _read_json(saved).get("dataset", dataset)
        preset = DATASET_DEFAULTS.get(dataset, {})
        fill = {"calib_seeds": preset.get("calib_seeds", 8),
                "families": preset.get("families", MACHINE_NAMES)}
        return dataclasses.replace(self, **{k: v for k, v in fill.items()
                                            if getattr(self, k) is None})

    def family_names(self) -> tuple[str, ...]:
        """The compared families in ``FAMILIES`` order (els and is always among them)."""
        chosen = set(MACHINE_NAMES if self.families is None else self.families) | {"els", "is"}
        return tuple(n for n in MACHINE_NAMES if n in chosen)

    def validate(self):
        unknown = sorted(set(self.families or ()) - set(MACHINE_NAMES))
        if unknown:
            raise ValueError(f"unknown families {unknown}; choose from {list(MACHINE_NAMES)}")
        if self.calib_neighbours is not None and self.calib_neighbours < 0:
            raise ValueError(f"calib_neighbours must be None or ≥ 0; got {self.calib_neighbours}")
        if self.n_seeds < 2:
            raise ValueError(f"n_seeds must be at least 2 (medians over seeds); got {self.n_seeds}")
        if self.calib_seeds is not None and self.calib_seeds < 1:
            raise ValueError(f"calib_seeds must be at least 1; got {self.calib_seeds}")
        for t in ([] if self.t_max is None else [self.t_max]) + list(self.compare_t_max):
            if not 0.0 < t <= 1.0:
                raise ValueError(f"t_max must lie in (0, 1]; got {t}")
        if self.machine_steps < 1 or self.network_steps < 1:
            raise ValueError("machine_steps and network_steps must be at least 1")
        if self.padding not in ("zeros", "circular"):
            raise ValueError(f"unknown padding {self.padding!r}; choose 'zeros' or 'circular'")
        for k in self.candidates or ():
            if k < 1 or k % 2 == 0:
                raise ValueError(f"candidate patch sizes must be odd and positive; got {k}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["candidates"] = None if self.candidates is None else list(self.candidates)
        d["compare_t_max"] = [float(t) for t in self.compare_t_max]
        d["families"] = None if self.families is None else list(self.families)
        return d


# ---------------------------------------------------------------------------------------------
# small helpers


def _atomic_write_text(path: str, text: str):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)          # readers see the old file or the new one, never half


def _atomic_json(path: str, obj):
    _atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _atomic_npz(path: str, **arrays):
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class _Timer:
    """Seconds per stage, accumulated over resumed sessions in timings.json."""

    def __init__(self, out):
        self.path = os.path.join(out, _TIMINGS_FILE)
        self.times = _read_json(self.path) if os.path.exists(self.path) else {}

    def add(self, stage, seconds):
        self.times[stage] = round(self.times.get(stage, 0.0) + seconds, 3)
        _atomic_json(self.path, self.times)

    @property
    def total(self):
        return round(sum(self.times.values()), 3)


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


# ---------------------------------------------------------------------------------------------
# sampling every model the same way


def _by_label(labels):
    """Runs fn(index array, label or None) per label group; None labels = one group."""
    if labels is None:
        return [(None, None)]
    return [(np.flatnonzero(labels == c), int(c)) for c in np.unique(labels)]


def sample_machine(kind: str, images, train_labels, x_T, labels, times, *, scales=None,
                   boundary="zeros", schedule, network=None, **machine_kwargs
                   ) -> tuple[sampler.SampleResult, dict | None]:
    """Samples machine ``kind`` from x_T; for conditional runs one machine per label (mask).

    With ``network`` (a function label → eps_fn(x, t, i), label None for unconditional runs,
    e.g. ``lambda y: make_network(model, params, label=y)``), also the single-step agreement
    (SPEC §7): at every
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
    for idx, label in _by_label(labels):
        sel = slice(None) if idx is None else idx
        mask = None if label is None else (np.asarray(train_labels) == label)
        eps_fn = machine_lib.make_machine(kind, images, scales=scales, boundary=boundary,
                                          schedule=schedule, mask=mask, compile_for=x_T[sel],
                                          **machine_kwargs)
        res = sampler.sample(eps_fn, x_T[sel], times, schedule=schedule,
                             return_trajectory=True)
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


def sample_network(model, params, x_T, labels, times, *, schedule) -> sampler.SampleResult:
    eps_fn = networks.make_network(model, params, label=None if labels is None else labels)
    res = sampler.sample(eps_fn, x_T, times, schedule=schedule, return_trajectory=True)
    return sampler.SampleResult(x0=np.asarray(res.x0), trajectory=None,
                                x0_hat=np.asarray(res.x0_hat), times=np.asarray(times))


def _align(times_net, times_machine) -> np.ndarray:
    """For each machine step, the network step at the nearest time (identical grids → i)."""
    tn, tm = np.asarray(times_net)[:-1], np.asarray(times_machine)[:-1]
    return np.abs(tn[None, :] - tm[:, None]).argmin(axis=1)


# ---------------------------------------------------------------------------------------------
# the pipeline


def _check_config(out: str, cfg: ReproduceConfig):
    path = os.path.join(out, _CONFIG_FILE)
    new = cfg.to_json()
    if os.path.exists(path):
        old = _read_json(path)
        if old != new:
            diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new)
                    if old.get(k) != new.get(k)}
            raise ValueError(f"{out} holds a run with another configuration (saved, requested: "
                             f"{diff}); resume it with the same options or choose a new --out")
    else:
        _atomic_json(path, new)


def shipped_checkpoint(cfg: ReproduceConfig) -> str | None:
    """The repository's trained network for ``cfg``, or None.

    Used only when it is exactly the network ``reproduce`` would train for this run (same
    TrainConfig as ``default_train_config``: embedded data set, no ``train`` overrides, no
    ``retrain``), so a shipped network and a retrained one give the same experiment.
    """
    if cfg.retrain or cfg.train or cfg.checkpoint or cfg.max_examples or cfg.conditional:
        return None
    name = _SHIPPED.get((cfg.dataset, cfg.arch, cfg.padding))
    path = CHECKPOINTS_DIR / name if name else None
    if path is None or not (path / "config.json").exists():
        return None
    saved = _read_json(str(path / "config.json"))
    expected = json.loads(json.dumps(default_train_config(
        cfg.dataset, cfg.arch, cfg.padding, cfg.conditional, cfg.image_size).to_dict()))
    resolved = ("image_shape", "num_classes", "data_dir") + train_lib._RESUMABLE_FIELDS
    diff = sorted(k for k in expected if k not in resolved and saved.get(k) != expected[k])
    # The run length may differ only if the shipped network trained the configured steps.
    if diff or saved.get("steps") != expected.get("steps"):
        warnings.warn(f"the shipped network {path} was trained with other settings "
                      f"({diff or 'steps'}); training a new one", RuntimeWarning, stacklevel=2)
        return None
    return str(path)


def _network(cfg: ReproduceConfig, out: str, timer: _Timer, progress: bool):
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
        _atomic_write_text(done_marker, "trained\n")
        timer.add("train", time.perf_counter() - t0)
    return (*train_lib.load_trained(workdir), "network (trained by this run)")


def _mean_over_seeds(cos) -> list:
    """[m, K, S] cosines → [m][K] means over seeds, None where no seed tried the size."""
    tried = ~np.isnan(cos)
    total = np.where(tried, cos, 0.0).sum(axis=2)
    count = tried.sum(axis=2)
    return [[float(t / c) if c else None for t, c in zip(trow, crow)]
            for trow, crow in zip(total, count)]


def _calibrate(cfg, out, model, params, images, train_labels, num_classes, boundary, schedule,
               timer, progress):
    """Stage 2: scales.json for ELS and LS (median over calibration seeds)."""
    path = os.path.join(out, _SCALES_FILE)
    if os.path.exists(path):
        return _read_json(path)
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
        for idx, label in _by_label(labels):
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
    _atomic_json(path, result)
    timer.add("calibrate", time.perf_counter() - t0)
    return result


def _calibrate_soft(cfg, out, scales, model, params, images, train_labels, num_classes,
                    boundary, schedule, timer, progress):
    """Stage 2b: the els_soft window widths (SPEC §7), fitted by gradient descent along the
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
    for idx, label in _by_label(labels):
        sel = slice(None) if idx is None else idx
        mask = None if label is None else (train_labels == label)
        net = networks.make_network(model, params, label=label)
        fits.append(calibrate_lib.calibrate_sigma(
            net, images, x_T[sel], times, k_max=k_max, boundary=boundary, mask=mask,
            init_scales=scales["els"]["scales"], steps=cfg.soft_steps, schedule=schedule,
            progress=progress))
    # One width per step for all labels: the geometric mean of the per-label fits.
    per_step = np.exp(np.mean([np.log(f.per_step) for f in fits], axis=0))
    scales = dict(scales, els_soft={
        "k_max": k_max, "sigmas": [float(v) for v in per_step[::-1]],
        "per_step": per_step.tolist(),
        "cosine_before": np.mean([f.cosine_before for f in fits], axis=0).tolist(),
        "cosine_after": np.mean([f.cosine_after for f in fits], axis=0).tolist()})
    _atomic_json(os.path.join(out, _SCALES_FILE), scales)
    timer.add("calibrate_soft", time.perf_counter() - t0)
    return scales


def _family_kwargs(name: str, scales: dict, boundary: str) -> dict:
    """make_machine arguments of a family beyond the shared ones (its calibrated scales)."""
    if name == "els":
        return {"scales": scales["els"]["scales"], "boundary": boundary}
    if name == "ls":
        return {"scales": scales["ls"]["scales"]}
    if name == "els_soft":
        return {"sigmas": scales["els_soft"]["sigmas"], "k_max": scales["els_soft"]["k_max"],
                "boundary": boundary}
    return {}


def _compare(cfg, out, model, params, images, train_labels, num_classes, boundary, scales,
             schedule, timer, progress, t_max, parts_dir="parts"):
    """Stage 3: <parts_dir>/<model>.npz for the network and every family, from the same seeds
    and the same start ``t_max``."""
    parts = os.path.join(out, parts_dir)
    os.makedirs(parts, exist_ok=True)
    seeds = list(range(cfg.n_seeds))
    x_T = seed_noise(cfg.seed, seeds, images.shape[1:])
    labels = seed_labels(seeds, num_classes)
    t_machine = sampler.uniform_times(cfg.machine_steps, t_max=t_max)
    t_net = sampler.uniform_times(cfg.network_steps, t_max=t_max)
    names = cfg.family_names()
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
            res = sample_network(model, params, x_T, labels, t_net, schedule=schedule)
        else:
            res, single = sample_machine(kind, images, train_labels, x_T, labels, t_machine,
                                         schedule=schedule,
                                         network=lambda y: networks.make_network(
                                             model, params, label=y),
                                         **_family_kwargs(name, scales, boundary))
        # What this model was actually started from, recorded with its result: checked below.
        extra = {} if single is None else {"single_step_R2": single["R2"],
                                           "single_step_mse": single["mse"]}
        _atomic_npz(path, x0=res.x0, x0_hat=res.x0_hat, times=np.asarray(res.times),
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


def _grid_summary(cfg, results) -> tuple[dict, dict, dict]:
    """Per-seed metrics, their summary, and the per-step agreements of one start t_max."""
    net = results["network"]
    names = cfg.family_names()
    per_seed = {name: metrics.compare_images(net["x0"], results[name]["x0"])
                for name in names}
    summary = metrics.summarize(per_seed, reference="is", challenger="els", seed=cfg.seed)
    # Where along the trajectory the machines and the network diverge: r² of x̂_0 per step.
    t_machine = results["els"]["times"]
    align = _align(net["times"], t_machine)
    steps = {"times": np.asarray(t_machine[:-1]).tolist(),
             "trajectory_x0_r2": {name: [float(np.median(metrics.r_squared(
                 net["x0_hat"][j], results[name]["x0_hat"][i]))) for i, j in enumerate(align)]
                 for name in names},
             # SPEC §7's single-step metric: the network applied to the machine's own x_t.
             "single_step_R2": {name: np.median(results[name]["single_step_R2"], axis=1).tolist()
                                for name in names},
             "single_step_mse": {name: np.median(results[name]["single_step_mse"],
                                                 axis=1).tolist() for name in names}}
    return per_seed, summary, steps


def _report(cfg, tcfg, out, by_start, scales, timer, t_start, network_source):
    """report.json, report.md, samples.npz and figures; ``by_start``: {t_max: results}."""
    start = cfg.start
    results = by_start[start]
    net = results["network"]
    per_seed, summary, steps = _grid_summary(cfg, results)
    names = cfg.family_names()
    _atomic_npz(os.path.join(out, "samples.npz"), network=net["x0"],
                **{name: results[name]["x0"] for name in names},
                x_T=net["x_T"], seeds=net["seeds"], labels=net["labels"],
                times_machine=results["els"]["times"], times_network=net["times"],
                **{f"{m}_{name}": v for name in names
                   for m, v in per_seed[name].items()})
    report = dict(summary)
    by_t_max = {}
    for t, res in by_start.items():
        _, s_t, _ = (per_seed, summary, steps) if t == start else _grid_summary(cfg, res)
        by_t_max[f"{t:g}"] = {k: s_t[k] for k in ("median_r", "median_r2", "median_R2",
                                                  "ci_r2", "frac_els_beats_is")}
    report.update({
        "families": list(names),
        "scales": {n: scales[n]["scales"] for n in ("els", "ls") if n in scales},
        "els_soft": scales.get("els_soft"),
        "n_seeds": cfg.n_seeds, "calib_seeds": cfg.calib_seeds,
        "machine_steps": cfg.machine_steps, "network_steps": cfg.network_steps,
        "t_max": start, "t_max_protocol": "given" if cfg.t_max is not None else
        "authors' effective start (n − 1)/n (SPEC §8)",
        "by_t_max": by_t_max,
        # What was actually compared: the trained network's own settings (a reused
        # checkpoint overrides the dataset/arch/padding options of the run).
        "network": network_source,
        "dataset": tcfg.dataset, "arch": tcfg.arch, "boundary": tcfg.padding,
        "conditional": bool(tcfg.conditional), "image_shape": list(tcfg.image_shape or []),
        "agreement_x0_r2": {"times": steps["times"], **steps["trajectory_x0_r2"]},
        "single_step": {"times": steps["times"], "R2": steps["single_step_R2"],
                        "mse": steps["single_step_mse"]},
        "per_seed": {name: {m: v.tolist() for m, v in per_seed[name].items()}
                     for name in names},
        "timings_s": timer.times,
    })
    report["elapsed_s"] = round(timer.total + (time.perf_counter() - t_start), 3)
    figs = _figures(out, net, results, per_seed, scales, report)
    report["figures"] = figs
    _atomic_json(os.path.join(out, "report.json"), report)
    _atomic_write_text(os.path.join(out, "report.md"), _markdown(report, figs))
    return report


def _figures(out, net, results, per_seed, scales, report) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from els_jax.plotting import image_grid

    fdir = os.path.join(out, "figures")
    os.makedirs(fdir, exist_ok=True)
    paths = {}
    names = list(report["families"])
    # 1. Image grid: one row per seed, columns network | every family.
    rows = min(12, len(net["x0"]))
    ncols = 1 + len(names)
    cols = [net["x0"][:rows]] + [results[n]["x0"][:rows] for n in names]
    stack = np.stack(cols, axis=1).reshape((-1,) + net["x0"].shape[1:])
    grid = image_grid(stack, ncols=ncols)
    fig, ax = plt.subplots(figsize=(ncols * 1.0, rows * 1.0 + 0.6))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([(i + 0.5) * grid.shape[1] / ncols for i in range(ncols)])
    ax.set_xticklabels(["network"] + [n.upper() for n in names], rotation=45, ha="right")
    ax.set_yticks([])
    fig.savefig(os.path.join(fdir, "grid.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths["grid"] = "figures/grid.png"
    # 2. r² of ELS vs IS per seed (the paper's scatter).
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(per_seed["is"]["r2"], per_seed["els"]["r2"], s=12)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("r² (IS vs network)")
    ax.set_ylabel("r² (ELS vs network)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.savefig(os.path.join(fdir, "scatter_els_vs_is.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths["scatter"] = "figures/scatter_els_vs_is.png"
    # 3. Calibrated patch size vs t (step order: first step = t near 1).
    times = np.asarray(scales["times"])[:-1]
    fig, ax = plt.subplots(figsize=(5, 3))
    for name in ("els", "ls"):
        if name not in scales:
            continue
        ax.step(times, scales[name]["per_step"], where="mid", label=name.upper())
    ax.set_xlabel("t")
    ax.set_ylabel("patch size k")
    ax.legend()
    fig.savefig(os.path.join(fdir, "scales.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths["scales"] = "figures/scales.png"
    # 4. Per-step agreement with the network: along the two trajectories (x̂_0 of each at its
    #    own x_t) and single-step (the network at the machine's x_t), R² and MSE.
    agree, single = report["agreement_x0_r2"], report["single_step"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    panels = [(axes[0], agree, "median r² of x̂₀ (own trajectories)"),
              (axes[1], single["R2"], "single-step median R² of x̂₀"),
              (axes[2], single["mse"], "single-step median MSE of x̂₀")]
    for ax, values, label in panels:
        for name in names:
            ax.plot(agree["times"], values[name], marker="o", ms=3, label=name.upper())
        ax.set_xlabel("t")
        ax.set_ylabel(label)
        ax.invert_xaxis()
    axes[1].set_ylim(max(-1.0, axes[1].get_ylim()[0]), 1.02)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(fdir, "agreement.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths["agreement"] = "figures/agreement.png"
    return paths


def _markdown(report, figs) -> str:
    starts = list(report["by_t_max"])
    primary = f"{report['t_max']:g}"
    lines = [f"# ELS vs network: {report['dataset']}, {report['arch']}, {report['boundary']} "
             f"padding{', conditional' if report['conditional'] else ''}", "",
             f"Network: {report['network']}. {report['n_seeds']} seeds; machines "
             f"{report['machine_steps']} DDIM steps, network {report['network_steps']}, both "
             f"from t_max = {primary} ({report['t_max_protocol']}); calibration on "
             f"{report['calib_seeds']} other seeds. Total time {report['elapsed_s']:.0f} s.", "",
             "| " + " | ".join(["family", "median r", "median r² (95% CI)", "median R²"]
                               + [f"r² from t_max = {t}" for t in starts if t != primary])
             + " |",
             "|---|---|---|---|" + "---|" * (len(starts) - 1)]
    for name in report["families"]:
        lo, hi = report["ci_r2"][name]
        cells = [name.upper(), f"{report['median_r'][name]:.3f}",
                 f"{report['median_r2'][name]:.3f} ({lo:.3f}–{hi:.3f})",
                 f"{report['median_R2'][name]:.3f}"]
        cells += [f"{report['by_t_max'][t]['median_r2'][name]:.3f}"
                  for t in starts if t != primary]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"ELS beats IS (higher r²) on {100 * report['frac_els_beats_is']:.0f}% of "
              "the seeds" + "".join(f"; from t_max = {t}: "
                                    f"{100 * report['by_t_max'][t]['frac_els_beats_is']:.0f}%"
                                    for t in starts if t != primary) + ".", "",
              f"Calibrated ELS scales (index 0 = last step): {report['scales']['els']}", ""]
    if report.get("els_soft"):
        soft = report["els_soft"]
        lines += [f"els_soft window widths σ on a {soft['k_max']}×{soft['k_max']} support "
                  f"(index 0 = last step): {[round(v, 2) for v in soft['sigmas']]}", ""]
    lines += [f"![samples]({figs['grid']})", "", f"![scatter]({figs['scatter']})", "",
              f"![scales]({figs['scales']})", "", f"![agreement]({figs['agreement']})", ""]
    return "\n".join(lines)


def reproduce(cfg: ReproduceConfig, out: str, *, progress: bool = True) -> dict:
    """Runs (or resumes) the whole experiment in ``out`` and returns the report dict.

    Returns: the contents of report.json: median_r / median_r2 / median_R2 ({"els", "ls",
    "is"} → value), their bootstrap intervals ci_*, frac_els_beats_is, scales, n_seeds,
    elapsed_s (summed over resumed sessions), per-seed metrics and per-step agreement.
    """
    cfg = cfg.resolved()
    cfg.validate()
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    _check_config(out, cfg)
    timer = _Timer(out)
    model, params, tcfg, network_source = _network(cfg, out, timer, progress)
    t_start = time.perf_counter()
    if cfg.data_dir:          # the data may live elsewhere on this machine than where trained
        tcfg = dataclasses.replace(tcfg, data_dir=cfg.data_dir)
    images, train_labels = data_lib.load_dataset(tcfg.dataset, data_dir=tcfg.data_dir,
                                                 image_size=tcfg.image_size,
                                                 max_examples=tcfg.max_examples)
    images = np.asarray(images, np.float32)
    num_classes = getattr(model, "num_classes", None)
    boundary = tcfg.padding
    schedule = schedules_lib.get(tcfg.schedule)
    t_prep = time.perf_counter() - t_start
    scales = _calibrate(cfg, out, model, params, images, train_labels, num_classes, boundary,
                        schedule, timer, progress)
    if "els_soft" in cfg.family_names():
        scales = _calibrate_soft(cfg, out, scales, model, params, images, train_labels,
                                 num_classes, boundary, schedule, timer, progress)
    by_start = {}
    for t_max in cfg.starts():
        # The primary grid in parts/, the side-by-side ones in parts/t_max=<t>/ (same seeds,
        # same scales by step index).
        parts_dir = "parts" if t_max == cfg.start else os.path.join("parts", f"t_max={t_max:g}")
        results = _compare(cfg, out, model, params, images, train_labels, num_classes,
                           boundary, scales, schedule, timer, progress, t_max, parts_dir)
        check_same_inputs(results, sampler.uniform_times(cfg.machine_steps, t_max=t_max))
        by_start[t_max] = results
    t0 = time.perf_counter()
    timer.add("load", t_prep)
    report = _report(cfg, tcfg, out, by_start, scales, timer, t0, network_source)
    return report

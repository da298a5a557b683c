"""What a run of the experiment is: its configuration and the network it trains or reuses.

    ``ReproduceConfig``       one run of ``reproduce`` (saved as config.json in the run)
    ``FAMILIES``              the analytic families compared with the network
    ``DATASET_DEFAULTS``      per-data-set defaults of the fields a run leaves None
    ``paper_train_config``    the paper's training recipe (docs/theory.md §5); the files in
                              experiments/configs/ are calls of it
    ``digits_train_config``, ``mnist5k_train_config``: the CPU-sized recipes of the embedded
                              data sets; ``default_train_config`` picks a data set's recipe
    ``shipped_checkpoint``    the trained network the repository ships for a run, if any
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

from els_jax.core import sampler as sampler_lib
from els_jax.experiment.files import read_json
from els_jax.nets import config as net_config

__all__ = ["ReproduceConfig", "default_train_config", "paper_train_config",
           "digits_train_config", "mnist5k_train_config", "shipped_checkpoint", "FAMILIES",
           "MACHINE_NAMES", "DATASET_DEFAULTS", "CHECKPOINTS_DIR"]

# Every model compared with the network: report name → ``make_machine`` kind (a literal dict,
# no registry). ELS and LS take the calibrated patch sizes, els_soft the fitted window widths
# (docs/theory.md §4, §7); the paper's three first, then the other analytic families (docs/theory.md §7).
FAMILIES = {"els": "els", "ls": "local", "is": "ideal", "gaussian": "gaussian",
            "nearest": "nearest", "pca_locality": "pca_locality", "els_soft": "els_soft",
            "scfdm": "scfdm"}
MACHINE_NAMES = tuple(FAMILIES)

# What `reproduce` runs on a data set for the fields the config leaves as None (else the
# defaults in ``ReproduceConfig.resolved``). mnist5k (N = 5000 at 32×32): one exact ELS call on
# 16 queries costs 10⁴–10⁵× one on 8×8 digits, so the calibration uses 4 seeds, and the
# els_soft width fit, which runs the exact machine at every evaluation, takes the cosine over
# 128 of the 1024 pixels (exact candidates, x̂_0 computed only there, by the XLA bank). Every
# data set's fit is a parabolic search on log σ with 5 forward passes per step, each step
# started from the Gaussian of its calibrated ELS size (the widths then drive the machine at
# every pixel; experiments/check_soft_fit.py compares the recipe with a full 25-step gradient
# fit on digits: median 0.7 % apart).
# The side-by-side start from t = 1 (``compare_t_max``, docs/theory.md §8) is off on mnist5k:
# each start costs one more sampling of every family it samples, and ELS's alone took 4.8 of
# the run's 24.8 min on a 2-core CPU (``--compare-t-max 1`` turns it on; it then samples the
# paper's three machines there, ``side_families``). Elsewhere every family is sampled from both.
DATASET_DEFAULTS = {
    "mnist5k": {"calib_seeds": 4, "soft_fit_pixels": 128, "compare_t_max": (),
                "side_families": ("els", "ls", "is")},
}

# Trained networks shipped with the repository (made by `els-jax train` with the configs in
# experiments/configs/; each directory holds config.json, metrics.jsonl and one checkpoint).
CHECKPOINTS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "checkpoints"
_SHIPPED = {("digits", "resnet", "zeros"): "digits_resnet_zeros",
            ("mnist5k", "resnet", "zeros"): "mnist5k_resnet_zeros",
            ("mnist5k", "resnet", "circular"): "mnist5k_resnet_circular",
            ("mnist5k", "unet", "zeros"): "mnist5k_unet_zeros"}


def _recipe(overrides: dict, **base) -> net_config.TrainConfig:
    """TrainConfig(``base`` updated with ``overrides``)."""
    base.update(overrides)
    return net_config.TrainConfig(**base)


def paper_train_config(dataset: str, arch: str, padding: str, conditional: bool,
                       **overrides) -> net_config.TrainConfig:
    """The paper's training recipe (docs/theory.md §5) for one of its networks, at 32×32.

    ε-prediction, AdamW at lr 1e-4 decayed ×0.999965 per step, batch 128, 300 epochs, no
    weight decay, no EMA, seed 0; the ResNet with 6 residual 3×3 layers of width 256, the UNet
    with 3 scales of 64/128/256 channels. ``overrides``: further TrainConfig fields (e.g.
    ``attention_resolutions`` for the UNet with self-attention).

    The paper's runs in experiments/configs/ are calls of it, each with the paper's numbers it
    should reproduce and the command that trains it in its docstring. They train on TFDS data
    sets, which must be prepared once (see els_jax.core.data).
    """
    return _recipe(overrides, dataset=dataset, image_size=32, arch=arch, padding=padding,
                   conditional=conditional,
                   channels=256 if arch == "resnet" else (64, 128, 256), depth=6,
                   batch_size=128, epochs=300, steps=None, lr=1e-4, lr_decay=0.999965,
                   weight_decay=0.0, seed=0, checkpoint_every=5000)


def digits_train_config(**overrides) -> net_config.TrainConfig:
    """The small ResNet on the embedded 8×8 digits that the main job trains on 2 CPU cores.

    The paper's ResNet (6 residual 3×3 layers, zero padding, no normalisation) at width 64
    instead of 256; a 5× larger learning rate with a faster decay and an EMA so that a few
    thousand steps suffice (the paper trains 300 epochs at lr 1e-4).
    """
    return _recipe(overrides, dataset="digits", arch="resnet", padding="zeros",
                   conditional=False, channels=64, depth=6, batch_size=128, steps=3000,
                   epochs=None, lr=5e-4, lr_decay=0.9997, ema=0.999, seed=0,
                   checkpoint_every=500, log_every=100)


def mnist5k_train_config(arch: str = "resnet", padding: str = "zeros", **overrides
                         ) -> net_config.TrainConfig:
    """The paper's MNIST networks at a width 2 CPU cores train in about an hour, on the
    embedded real MNIST digits ("mnist5k", 32×32).

    ResNet: 6 residual 3×3 layers (receptive field 17, as docs/theory.md §5) at width 32 instead of 256;
    UNet: 3 scales of 32/64/128 channels instead of 64/128/256. 3000 steps of batch 128 (≈ 77
    epochs of the 5000 digits) at lr 5e-4 ×0.9998 per step with an EMA of the weights (the
    paper: 300 epochs of 60 000 digits at lr 1e-4, no EMA).

    The one definition: experiments/configs/mnist5k_*.py are calls of it, it is what
    ``els-jax reproduce --dataset mnist5k`` trains with --retrain, and what decides whether a
    network shipped in experiments/checkpoints/ matches (``shipped_checkpoint``).
    """
    return _recipe(overrides, dataset="mnist5k", image_size=32, arch=arch, padding=padding,
                   conditional=False, channels=32 if arch == "resnet" else (32, 64, 128),
                   depth=6, batch_size=128, steps=3000, epochs=None, lr=5e-4,
                   lr_decay=0.9998, ema=0.999, weight_decay=0.0, seed=0,
                   checkpoint_every=200, keep_checkpoints=2, log_every=50)


def default_train_config(dataset: str, arch: str, padding: str, conditional: bool,
                         image_size: int | None = None) -> net_config.TrainConfig:
    """The paper's recipe (docs/theory.md §5) for a data set; the CPU-sized ones for the embedded sets."""
    if dataset == "digits":
        return digits_train_config(arch=arch, padding=padding, conditional=conditional,
                                   image_size=image_size)
    if dataset == "mnist5k":
        return mnist5k_train_config(arch=arch, padding=padding, conditional=conditional,
                                    image_size=32 if image_size is None else image_size)
    return net_config.TrainConfig(dataset=dataset, arch=arch, padding=padding,
                                 conditional=conditional, image_size=image_size)


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """One run of the experiment. JSON-serialisable; saved as ``config.json`` in the run.

    dataset, image_size, max_examples, data_dir: the training set (docs/theory.md §6).
    arch, padding, conditional: the network (ignored when ``checkpoint`` or ``train`` is set).
    train: optional TrainConfig fields (dict) overriding ``default_train_config``.
    checkpoint: reuse the network trained in this directory instead of training one.
    n_seeds: comparison seeds; calib_seeds: calibration seeds (disjoint from them); None = the
      data set's default (``DATASET_DEFAULTS``, else 8).
    machine_steps / network_steps: DDIM steps for the machines and for the network.
    candidates: patch sizes tried by the calibration (default 3, 5, …, image size).
    seed: base of the noise seeds.
    t_max: first time of every grid (docs/theory.md §8), shared by the machines and the network. None
      (the default) = the authors' effective start, (machine_steps − 1)/machine_steps (0.95
      for 20 steps): the paper's protocol. With the unshifted cosine schedule ᾱ(1) ≈ 1.5e-4,
      so a first DDIM step from t = 1 multiplies the network's ε̂ error by
      |b' − sqrt(ᾱ'/ᾱ)·b| ≈ 6 at 20 steps and the comparison then measures mostly that step.
    compare_t_max: further starts compared side by side with the same seeds and the same
      calibrated scales (by step index), () for none; None = the data set's default
      (``DATASET_DEFAULTS``: none on mnist5k), else (1.0,), the plain grid of docs/theory.md
      §3. Reported under ``by_t_max``.
    retrain: train the network even when the repository ships one for this configuration
      (``experiments/checkpoints/``; used by default for the embedded data sets).
    side_families: the families also sampled from the ``compare_t_max`` starts (els and is
      always, when compared); None = the data set's default (``DATASET_DEFAULTS``: els, ls,
      is on mnist5k), else every compared family.
    soft_method: how the els_soft widths are fitted per sampler step: "search" (a parabolic
      search on log σ, forward passes only) or "adam" (gradient descent through the machine);
      None = the data set's default, else "search" (``calibration.calibrate_sigma``).
    soft_steps: loss evaluations ("search") or gradient steps ("adam") per sampler step;
      None = the data set's default (``DATASET_DEFAULTS``), else 5 ("search") or 25.
    soft_lr: the width fit's initial learning rate on log σ; None = the data set's default
      (``DATASET_DEFAULTS``), else 0.1.
    soft_fit_images: fit the els_soft widths on this many training images (a fixed random
      subset; the machine that samples holds all of them); None = the data set's default
      (``DATASET_DEFAULTS``), else all.
    soft_fit_pixels: fit the els_soft widths on the cosine over this many query pixels (a
      fixed random subset; the machine computes x̂_0 only there); None = the data set's
      default (``DATASET_DEFAULTS``: 128 on mnist5k), else all.
    solver: the sampler's solver for the network and every machine of the comparison, "ddim"
      (the paper's) or "heun" (EDM's second order, 2n − 1 model calls; docs/theory.md §3),
      on the same grids. The calibration follows the network's DDIM trajectory either way.
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
    compare_t_max: tuple[float, ...] | None = None
    side_families: tuple[str, ...] | None = None
    retrain: bool = False
    soft_steps: int | None = None
    soft_method: str | None = None
    soft_fit_images: int | None = None
    soft_fit_pixels: int | None = None
    soft_lr: float | None = None
    solver: str = "ddim"
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
        for t in self.compare_t_max or ():
            if all(abs(float(t) - u) > 1e-9 for u in out):
                out.append(float(t))
        return out

    def resolved(self) -> "ReproduceConfig":
        """The fields left None filled from ``DATASET_DEFAULTS`` (what runs, and is saved) of
        the data set the network was trained on (a given checkpoint's, else ``dataset``)."""
        dataset = self.dataset
        saved = os.path.join(self.checkpoint or "", net_config.CONFIG_FILE)
        if self.checkpoint and os.path.exists(saved):
            dataset = read_json(saved).get("dataset", dataset)
        preset = DATASET_DEFAULTS.get(dataset, {})
        method = self.soft_method or preset.get("soft_method", "search")
        fill = {"calib_seeds": preset.get("calib_seeds", 8),
                "compare_t_max": tuple(preset.get("compare_t_max", (1.0,))),
                "families": preset.get("families", MACHINE_NAMES),
                "side_families": preset.get("side_families", MACHINE_NAMES),
                "soft_method": method,
                "soft_steps": preset.get("soft_steps", 5 if method == "search" else 25),
                "soft_lr": preset.get("soft_lr", 0.1),
                "soft_fit_images": preset.get("soft_fit_images"),
                "soft_fit_pixels": preset.get("soft_fit_pixels")}
        return dataclasses.replace(self, **{k: v for k, v in fill.items()
                                            if getattr(self, k) is None})

    def family_names(self) -> tuple[str, ...]:
        """The compared families in ``FAMILIES`` order (els and is always among them)."""
        chosen = set(MACHINE_NAMES if self.families is None else self.families) | {"els", "is"}
        return tuple(n for n in MACHINE_NAMES if n in chosen)

    def side_family_names(self) -> tuple[str, ...]:
        """The families sampled from the side starts: ``side_families`` (els and is always)
        among the compared ones, in ``FAMILIES`` order."""
        chosen = set(MACHINE_NAMES if self.side_families is None else self.side_families)
        return tuple(n for n in self.family_names() if n in chosen | {"els", "is"})

    def validate(self):
        unknown = sorted((set(self.families or ()) | set(self.side_families or ()))
                         - set(MACHINE_NAMES))
        if unknown:
            raise ValueError(f"unknown families {unknown}; choose from {list(MACHINE_NAMES)}")
        if self.calib_neighbours is not None and self.calib_neighbours < 0:
            raise ValueError(f"calib_neighbours must be None or ≥ 0; got {self.calib_neighbours}")
        if self.n_seeds < 2:
            raise ValueError(f"n_seeds must be at least 2 (medians over seeds); got {self.n_seeds}")
        if self.soft_steps is not None and self.soft_steps < 1:
            raise ValueError(f"soft_steps must be at least 1; got {self.soft_steps}")
        if self.solver not in sampler_lib.SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of "
                             f"{sampler_lib.SOLVERS}")
        if self.soft_method is not None and self.soft_method not in ("search", "adam"):
            raise ValueError(f"soft_method must be 'search' or 'adam'; got {self.soft_method!r}")
        if self.soft_lr is not None and not self.soft_lr > 0:
            raise ValueError(f"soft_lr must be > 0; got {self.soft_lr}")
        if self.soft_fit_pixels is not None and self.soft_fit_pixels < 1:
            raise ValueError(f"soft_fit_pixels must be at least 1; got {self.soft_fit_pixels}")
        if self.soft_fit_images is not None and self.soft_fit_images < 1:
            raise ValueError(f"soft_fit_images must be at least 1; got {self.soft_fit_images}")
        if self.calib_seeds is not None and self.calib_seeds < 1:
            raise ValueError(f"calib_seeds must be at least 1; got {self.calib_seeds}")
        for t in ([] if self.t_max is None else [self.t_max]) + list(self.compare_t_max or ()):
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
        d["compare_t_max"] = (None if self.compare_t_max is None
                              else [float(t) for t in self.compare_t_max])
        d["families"] = None if self.families is None else list(self.families)
        d["side_families"] = None if self.side_families is None else list(self.side_families)
        return d


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
    saved = read_json(str(path / "config.json"))
    expected = json.loads(json.dumps(default_train_config(
        cfg.dataset, cfg.arch, cfg.padding, cfg.conditional, cfg.image_size).to_dict()))
    resolved = ("image_shape", "num_classes", "data_dir") + net_config.RESUMABLE_FIELDS
    diff = sorted(k for k in expected if k not in resolved and saved.get(k) != expected[k])
    # The run length may differ only if the shipped network trained the configured steps.
    if diff or saved.get("steps") != expected.get("steps"):
        warnings.warn(f"the shipped network {path} was trained with other settings "
                      f"({diff or 'steps'}); training a new one", RuntimeWarning, stacklevel=2)
        return None
    return str(path)


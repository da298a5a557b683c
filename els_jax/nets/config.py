"""A training run's configuration (docs/theory.md §5): ``TrainConfig`` (every knob, saved as
``config.json`` beside the checkpoints), how it is resolved against the data, checked before a
workdir is resumed, written atomically and read back, and ``load_config`` for the config files
of ``els-jax train --config FILE`` (experiments/configs/)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

from els_jax.core import schedules as schedules_lib

# The architectures and paddings ``nets.networks`` builds (its ARCHS and PADDINGS; a test holds
# them equal), named here so that reading or checking a config, and the CLI's parser, do not
# import Flax.
ARCH_NAMES = ("resnet", "unet")
PADDING_NAMES = ("zeros", "circular")

__all__ = ["TrainConfig", "ARCH_NAMES", "PADDING_NAMES", "NUM_CLASSES", "CONFIG_FILE", "resolve_config", "write_config",
           "read_config", "load_config", "unet_channels", "RESUMABLE_FIELDS"]

CONFIG_FILE = "config.json"

# Number of classes of the labelled data sets (the labels of a small subset, or of tfds mock
# data, need not reach the top class, so max(label) + 1 would be wrong there).
NUM_CLASSES = {"digits": 10, "mnist5k": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}

# Fields that may differ between a run and its resumption (they change how long or how
# verbosely we train, not what is trained); anything else must match the saved config.
RESUMABLE_FIELDS = ("steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every",
                     "data_dir")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's (docs/theory.md §5).

    Attributes:
      dataset: "digits" (embedded 8×8), "mnist5k" (embedded real MNIST, 32×32), a TFDS name (mnist, fashion_mnist, cifar10, celeb_a;
        resized to ``image_size``, default 32) or a path to an .npz file.
      arch: "resnet" or "unet".
      padding: "zeros" or "circular", for every conv.
      conditional: condition on the class label (learned embedding added to the time one).
      num_classes: classes of the label; None = resolved when training starts (10 for the
        labelled sets named in ``NUM_CLASSES``, else max label + 1).
      channels: ResNet width (int, default 256) or UNet widths per scale (tuple, default
        (64, 128, 256); an int c means (c, 2c, 4c)). None = the architecture's default.
      depth: residual layers of the ResNet (6).
      attention_resolutions: UNet only: spatial sizes with self-attention, e.g. (8,).
      emb_dim: width of the time/class embedding.
      image_size: resize images to this square size (None: native for digits/.npz, 32 TFDS).
      image_shape: (H, W, C) of the training images, filled in when training starts.
      data_dir: prepared TFDS data directory (or set TFDS_DATA_DIR).
      max_examples: use only the first N training images (None: all).
      schedule: noise schedule name (see els_jax.schedules; default the paper's "cosine").
      batch_size: global batch (split over devices; must divide by the device count).
      steps / epochs: length of the run; ``steps`` wins if both are set. One epoch is
        ⌊N / batch_size⌋ steps (the remainder of each shuffled epoch is dropped).
      lr, lr_decay: learning rate lr·lr_decay^step.
      weight_decay: AdamW decoupled weight decay (paper: 0).
      grad_clip: clip the global gradient norm to this value (None: no clipping, paper).
      ema: EMA decay of the parameters, e.g. 0.999, with warm-up (see ``train_step``;
        None: no EMA).
      seed: seeds initialisation, data order and noise.
      checkpoint_every: save every this many steps (and at the end).
      keep_checkpoints: how many checkpoints to keep.
      log_every: steps between progress-bar / metrics.jsonl updates.
    """

    dataset: str = "digits"
    arch: str = "resnet"
    padding: str = "zeros"
    conditional: bool = False
    num_classes: int | None = None
    channels: int | tuple[int, ...] | None = None
    depth: int = 6
    attention_resolutions: tuple[int, ...] = ()
    emb_dim: int = 128
    image_size: int | None = None
    image_shape: tuple[int, int, int] | None = None
    data_dir: str | None = None
    max_examples: int | None = None
    schedule: str = "cosine"
    batch_size: int = 128
    steps: int | None = None
    epochs: int | None = 300
    lr: float = 1e-4
    lr_decay: float = 0.999965
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema: float | None = None
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50

    def validate(self) -> "TrainConfig":
        """Raises ValueError on an inconsistent config; returns self."""
        if self.arch not in ARCH_NAMES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCH_NAMES)}")
        if self.padding not in PADDING_NAMES:
            raise ValueError(f"unknown padding {self.padding!r}; choose one of "
                             f"{sorted(PADDING_NAMES)}")
        schedules_lib.get(self.schedule)
        if (self.arch == "resnet" and self.channels is not None
                and not isinstance(self.channels, int)):
            raise ValueError(f"the ResNet takes one width (int channels); got {self.channels!r}")
        if self.arch == "resnet" and self.attention_resolutions:
            raise ValueError("attention_resolutions is a UNet option; the ResNet has no attention")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {self.batch_size}")
        if self.steps is None and self.epochs is None:
            raise ValueError("set steps or epochs")
        if any(v is not None and v < 1 for v in (self.steps, self.epochs)):
            raise ValueError(f"steps/epochs must be positive; got {self.steps}/{self.epochs}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema is a decay in (0, 1); got {self.ema}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be positive")
        if self.conditional and self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"a conditional model needs num_classes ≥ 2; got {self.num_classes}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of ``to_dict`` (JSON turns tuples into lists; turn them back)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        d = dict(d)
        for key in ("channels", "attention_resolutions", "image_shape"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


def unet_channels(channels) -> tuple[int, ...]:
    if channels is None:
        return (64, 128, 256)
    if isinstance(channels, int):
        return (channels, 2 * channels, 4 * channels)
    return tuple(int(c) for c in channels)


def resolve_config(config: TrainConfig, images, labels) -> TrainConfig:
    """Fills in image_shape and num_classes from the data and checks them."""
    image_shape = tuple(int(s) for s in images.shape[1:])
    if config.image_shape is not None and tuple(config.image_shape) != image_shape:
        raise ValueError(f"config.image_shape {tuple(config.image_shape)} does not match the "
                         f"data {image_shape}")
    num_classes = config.num_classes
    if config.conditional:
        found = int(labels.max()) + 1
        if found < 2:
            raise ValueError(f"data set {config.dataset!r} has no class labels (all labels 0); "
                             "train it unconditionally")
        if num_classes is None:
            num_classes = NUM_CLASSES.get(config.dataset, found)
        elif found > num_classes:
            raise ValueError(f"labels go up to {found - 1} but num_classes={num_classes}")
    if config.arch == "unet":
        factor = 2 ** (len(unet_channels(config.channels)) - 1)
        if image_shape[0] % factor or image_shape[1] % factor:
            raise ValueError(f"the UNet needs images whose size divides by {factor}; got "
                             f"{image_shape[0]}×{image_shape[1]}: set image_size (e.g. 16 or 32)")
    return dataclasses.replace(config, image_shape=image_shape, num_classes=num_classes)


def _check_resumable(saved: dict, config: TrainConfig, path: str):
    """Refuses to resume a workdir that holds a different run (model, data or optimiser)."""
    current = json.loads(json.dumps(config.to_dict()))  # tuples → lists, as in the file
    different = {k: (saved.get(k), v) for k, v in current.items()
                 if k not in RESUMABLE_FIELDS and saved.get(k) != v}
    if different:
        details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in different.items())
        raise ValueError(f"{path} describes a different run ({details}). Use a fresh workdir, "
                         "or the same settings to resume.")


def write_config(config: TrainConfig, workdir: str):
    """Saves the resolved config as JSON beside the checkpoints (atomically)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            _check_resumable(json.load(f), config, path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # a reader never sees a half-written file


def read_config(workdir: str) -> TrainConfig:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {workdir!r}: not a training workdir "
                                "(train with `els-jax train --workdir DIR` first)")
    with open(path) as f:
        return TrainConfig.from_dict(json.load(f))


# ---------------------------------------------------------------------------------------------
# Config files: `els-jax train --config FILE`


def load_config(path: str) -> TrainConfig:
    """Runs the Python file ``path`` and returns its ``get_config()`` (a TrainConfig)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such config file: {path}")
    spec = importlib.util.spec_from_file_location(
        f"els_jax_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} must define get_config() -> TrainConfig")
    config = module.get_config()
    if not isinstance(config, TrainConfig):
        raise ValueError(f"{path}: get_config() returned {type(config).__name__}, not TrainConfig")
    return config

"""Training the ε-prediction networks of the paper (SPEC §5), data-parallel, with resume.

Objective (ε-prediction, "simple" DDPM loss), t ~ U[0, 1), ε ~ N(0, I):

    L(θ) = E_{x_0, t, ε} ‖ε̂_θ(a(t)·x_0 + b(t)·ε, t, y) − ε‖² / (H·W·C)

Optimiser as in the paper: AdamW, lr 1e-4 decayed by ×0.999965 every step, batch 128, no
weight decay; optionally an exponential moving average (EMA) of the parameters.

What lives here:
  - ``TrainConfig``: every knob of a run (a dataclass, saved as ``config.json``).
  - ``make_model(config)``, ``create_train_state(config, key, image_shape)``.
  - ``train_step(state, batch, key)``: one pure, jitted update; the step's noise comes from
    ``jax.random.fold_in(key, state.step)``.
  - ``train_and_evaluate(config, workdir)``: the loop. Data-parallel over all devices (batch
    sharded over a 'data' mesh axis, parameters replicated), tqdm progress bar, Orbax
    checkpoints every ``checkpoint_every`` steps, automatic resume from the latest one.
  - ``load_trained(workdir)`` → (model, params, config) for sampling and calibration.
  - ``load_config(path)``: the TrainConfig of a config file (``experiments/configs/*.py``).

The ``els-jax train`` command line (flags → TrainConfig) lives in ``els_jax/cli.py``.

Reproducibility: the data order is a pure function of (seed, epoch) and the noise of step s a
pure function of (seed, s), so a run that is killed and restarted from its last checkpoint
ends with the same parameters as an uninterrupted run (up to float rounding on some
backends; bit-identical on CPU here).

    >>> config = TrainConfig(dataset="digits", arch="resnet", channels=64, steps=4000)
    >>> state = train_and_evaluate(config, "/tmp/digits_resnet")
    >>> model, params, config = load_trained("/tmp/digits_resnet")
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from flax.training import train_state as flax_train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from els_jax.core import data as data_lib
from els_jax.core import schedules as schedules_lib
from els_jax.core.forward import add_noise
from els_jax.nets.networks import ARCHS, PADDINGS, ResNet, UNet

__all__ = ["TrainConfig", "TrainState", "NUM_CLASSES", "make_model", "make_optimizer",
           "weight_grad_engine",
           "create_train_state", "diffusion_loss", "train_step", "train_and_evaluate",
           "load_trained", "load_config", "epoch_permutation"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"

# Number of classes of the labelled data sets (the labels of a small subset, or of tfds mock
# data, need not reach the top class, so max(label) + 1 would be wrong there).
NUM_CLASSES = {"digits": 10, "mnist5k": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}

# Fields that may differ between a run and its resumption (they change how long or how
# verbosely we train, not what is trained); anything else must match the saved config.
_RESUMABLE_FIELDS = ("steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every",
                     "data_dir")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's (SPEC §5).

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
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCHS)}")
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}; choose one of {sorted(PADDINGS)}")
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


class TrainState(flax_train_state.TrainState):
    """flax's TrainState (step, params, opt_state; apply_fn and tx static) plus an EMA.

    ``params`` is the full variables dict of the model, i.e. ``model.apply(params, x, t, y)``.
    ``ema_params`` has the same structure, or is None when the config has no EMA.
    """

    ema_params: Any = None
    ema_decay: float | None = struct.field(pytree_node=False, default=None)
    schedule: str = struct.field(pytree_node=False, default="cosine")


def _unet_channels(channels) -> tuple[int, ...]:
    if channels is None:
        return (64, 128, 256)
    if isinstance(channels, int):
        return (channels, 2 * channels, 4 * channels)
    return tuple(int(c) for c in channels)


def make_model(config: TrainConfig, fast_weight_grad: bool = True) -> nn.Module:
    """The network described by ``config`` (ResNet or UNet). fast_weight_grad: the
    convolutions' im2col weight gradient on a CPU (``els_jax.conv``), or XLA's own; same
    parameters and values either way (``weight_grad_engine`` picks one for training)."""
    config.validate()
    num_classes = None
    if config.conditional:
        if config.num_classes is None:
            raise ValueError("a conditional config needs num_classes (train_and_evaluate fills "
                             "it in from the data)")
        num_classes = int(config.num_classes)
    if config.arch == "resnet":
        return ResNet(channels=256 if config.channels is None else int(config.channels),
                      depth=config.depth, padding=config.padding, num_classes=num_classes,
                      emb_dim=config.emb_dim, fast_weight_grad=fast_weight_grad)
    return UNet(channels=_unet_channels(config.channels), padding=config.padding,
                num_classes=num_classes, emb_dim=config.emb_dim,
                attention_resolutions=tuple(config.attention_resolutions),
                fast_weight_grad=fast_weight_grad)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with lr(step) = lr · lr_decay^step (and optional global-norm clipping)."""
    learning_rate = optax.exponential_decay(config.lr, transition_steps=1,
                                            decay_rate=config.lr_decay)
    tx = optax.adamw(learning_rate, weight_decay=config.weight_decay)
    if config.grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: nn.Module, key, x, t, label):
    # One compiled program instead of op-by-op initialisers: flax's truncated-normal
    # initialisers otherwise compile one small kernel per tensor shape (seconds on CPU). The
    # module is static and hashed by value, so equal models share the compilation.
    return model.init(key, x, t, label)


def create_train_state(config: TrainConfig, key, image_shape=None) -> TrainState:
    """Initialises model parameters, optimiser state and (optionally) the EMA.

    Args:
      config: a TrainConfig (with num_classes resolved if conditional).
      key: PRNG key for the parameter initialisation.
      image_shape: (H, W, C) of the training images (default ``config.image_shape``).
    """
    image_shape = tuple(image_shape or config.image_shape or ())
    if len(image_shape) != 3:
        raise ValueError(f"need image_shape (H, W, C); got {image_shape!r}")
    model = make_model(config)
    x = jnp.zeros((1,) + image_shape, jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if config.conditional else None
    params = _init_params(model, key, x, t, label)
    tx = make_optimizer(config)
    return TrainState(step=jnp.zeros((), jnp.int32), apply_fn=model.apply, params=params, tx=tx,
                      opt_state=tx.init(params),
                      # A copy, not an alias: the train loop donates the state's buffers,
                      # and one buffer cannot be donated twice.
                      ema_params=None if config.ema is None else jax.tree.map(jnp.copy, params),
                      ema_decay=config.ema, schedule=config.schedule)


def diffusion_loss(params, apply_fn: Callable, batch: dict, key, schedule="cosine"):
    """ε-prediction MSE on one batch, t ~ U[0, 1), averaged over images and pixels.

    batch: {"images": [B,H,W,C] in [-1, 1], optionally "labels": [B] int (conditional nets)}.
    """
    x0 = batch["images"]
    key_t, key_eps = jax.random.split(key)
    t = jax.random.uniform(key_t, (x0.shape[0],), jnp.float32, 0.0, 1.0)
    x_t, eps = add_noise(key_eps, x0, t, schedule)
    eps_hat = apply_fn(params, x_t, t, batch.get("labels"))
    return jnp.mean(jnp.square(eps_hat - eps))


def weight_grad_engine(config: TrainConfig, batch: int):
    """Which weight gradient the convolutions of a training step use, and why
    (``engines.Choice``): "im2col" (``els_jax.conv``'s, chunked matmuls) or "xla" (XLA's
    backward-filter convolution).

    On a CPU the faster one depends on the image size and the CPU (im2col: 1.4–1.6× faster
    steps at 32×32; at 8×8 XLA's was ~20 % faster on an AVX-512 EPYC), so it is measured like
    the machines' engines (``els_jax.engines``): one train step of this network on a
    synthetic batch of ``batch`` images (per device), each way, timed in alternation, the
    winner cached on disk per platform and network shape. ``ELS_JAX_AUTOTUNE=0``: the static
    rule, im2col. Other backends: "xla" (the convolution module lowers XLA's there anyway)."""
    from els_jax.engines import autotune as engines_lib

    if jax.default_backend() != "cpu":
        return engines_lib.Choice("xla", "not a CPU: XLA's own weight gradient")
    config.validate()
    h, w, c = config.image_shape
    shape = {"arch": config.arch, "channels": config.channels, "depth": config.depth,
             "padding": config.padding, "H": h, "W": w, "C": c, "B": int(batch),
             "classes": config.num_classes if config.conditional else 0,
             "attention": list(config.attention_resolutions), "emb_dim": config.emb_dim}

    def probes():
        rng = np.random.default_rng(0)
        data = {"images": jnp.asarray(rng.uniform(-1, 1, (batch, h, w, c)), jnp.float32)}
        if config.conditional:
            data["labels"] = jnp.asarray(rng.integers(0, config.num_classes, batch), jnp.int32)
        key = jax.random.PRNGKey(0)
        base = create_train_state(config, key)
        calls = {}
        for name, fast in (("im2col", True), ("xla", False)):
            state = base.replace(apply_fn=make_model(config, fast_weight_grad=fast).apply)
            calls[name] = functools.partial(
                lambda state: jax.block_until_ready(train_step(state, data, key)), state)
        return calls, f"one train step of {batch} synthetic images", None

    return engines_lib.select("train_weight_grad", shape, ("im2col", "xla"), "im2col",
                              "static rule: the im2col weight gradient on a CPU", probes)


@jax.jit
def train_step(state: TrainState, batch: dict, key):
    """One optimiser step: (state, batch, key) -> (new state, {"loss": L}).

    Pure and jitted. The noise (t and ε) of the step comes from fold_in(key, state.step), so
    the same (state, batch, key) always gives the same result and ``key`` can stay fixed for
    a whole run. ``batch`` as in ``diffusion_loss``. With an EMA decay d, after update s:

        ema ← d_s·ema + (1 − d_s)·params,   d_s = min(d, (1 + s)/(10 + s)),

    the usual warm-up, so that a short run's EMA is not dominated by the random initial
    parameters (with d = 0.999 they would still weigh 0.999^1000 ≈ 37% after 1000 steps).
    """
    step_key = jax.random.fold_in(key, state.step)
    loss, grads = jax.value_and_grad(diffusion_loss)(state.params, state.apply_fn, batch,
                                                     step_key, state.schedule)
    new_state = state.apply_gradients(grads=grads)
    if state.ema_decay is not None:  # static: a Python branch, not a lax.cond
        s = new_state.step.astype(jnp.float32)
        d = jnp.minimum(state.ema_decay, (1.0 + s) / (10.0 + s))
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params,
                           new_state.params)
        new_state = new_state.replace(ema_params=ema)
    return new_state, {"loss": loss}


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Order of the n training images in ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def _resolve_config(config: TrainConfig, images, labels) -> TrainConfig:
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
        factor = 2 ** (len(_unet_channels(config.channels)) - 1)
        if image_shape[0] % factor or image_shape[1] % factor:
            raise ValueError(f"the UNet needs images whose size divides by {factor}; got "
                             f"{image_shape[0]}×{image_shape[1]}: set image_size (e.g. 16 or 32)")
    return dataclasses.replace(config, image_shape=image_shape, num_classes=num_classes)


def _check_resumable(saved: dict, config: TrainConfig, path: str):
    """Refuses to resume a workdir that holds a different run (model, data or optimiser)."""
    current = json.loads(json.dumps(config.to_dict()))  # tuples → lists, as in the file
    different = {k: (saved.get(k), v) for k, v in current.items()
                 if k not in _RESUMABLE_FIELDS and saved.get(k) != v}
    if different:
        details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in different.items())
        raise ValueError(f"{path} describes a different run ({details}). Use a fresh workdir, "
                         "or the same settings to resume.")


def _write_config(config: TrainConfig, workdir: str):
    """Saves the resolved config as JSON beside the checkpoints (atomically)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            _check_resumable(json.load(f), config, path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # a reader never sees a half-written file


def _read_config(workdir: str) -> TrainConfig:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {workdir!r}: not a training workdir "
                                "(train with `els-jax train --workdir DIR` first)")
    with open(path) as f:
        return TrainConfig.from_dict(json.load(f))


def _checkpoint_manager(workdir: str, config: TrainConfig | None = None, *,
                        create: bool = True) -> ocp.CheckpointManager:
    # Orbax wants an absolute path. Each save is written to a temporary directory and renamed
    # when complete, so a run killed mid-save leaves the previous checkpoint as the latest.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if config is None else config.keep_checkpoints,
        create=create)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                                 options=options)


def _with_sharding(abstract, sharding):
    """Attaches ``sharding`` to every leaf of an abstract pytree (for restoring onto devices)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        abstract)


def _trim_metrics(path: str, step: int):
    """Drops metrics logged after ``step`` by a run that was killed before its next checkpoint."""
    if not os.path.exists(path):
        return
    def keep(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError):  # a line cut short by the kill
            return False

    with open(path) as f:
        lines = [line for line in f if keep(line)]
    with open(path, "w") as f:
        f.writelines(lines)


def train_and_evaluate(config: TrainConfig, workdir: str, *, devices=None,
                       callback: Callable[[int, dict], None] | None = None,
                       progress: bool = True) -> TrainState:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Files in workdir: ``config.json`` (the resolved config), ``checkpoints/<step>/`` (Orbax:
    train state, noise key, data position), ``metrics.jsonl`` (step, mean loss over the last
    ``log_every`` steps, learning rate, wall time).

    Args:
      config: the run; validated, then completed from the data (image_shape, num_classes).
      workdir: directory for the files above (created if needed).
      devices: devices for data parallelism (default: all ``jax.devices()``, one process).
        The global batch is split over them along a 'data' mesh axis; parameters are
        replicated, and XLA all-reduces the gradients.
      callback: called as callback(step, metrics) after every step (step = number of steps
        done, metrics = {"loss": device scalar}); may raise to stop the run.
      progress: show a tqdm progress bar with the running loss.
    Returns:
      The final TrainState (on the devices).
    """
    from tqdm.auto import tqdm

    config.validate()
    if jax.process_count() > 1:
        # Batches are cut from one host array and placed with device_put, which is only
        # correct within one process (several local devices are fine).
        raise NotImplementedError("multi-host training is not supported; use one process")
    devices = list(jax.devices() if devices is None else devices)
    if config.batch_size % len(devices):
        raise ValueError(f"batch_size {config.batch_size} does not divide over the "
                         f"{len(devices)} devices; use a multiple of {len(devices)}")
    images, labels = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                                           image_size=config.image_size,
                                           max_examples=config.max_examples)
    config = _resolve_config(config, images, labels)
    n = images.shape[0]
    if n < config.batch_size:
        raise ValueError(f"only {n} training images for a batch of {config.batch_size}")
    batches_per_epoch = n // config.batch_size
    total_steps = config.steps if config.steps is not None else config.epochs * batches_per_epoch

    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)

    mesh = Mesh(np.asarray(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    init_key, noise_key = jax.random.split(jax.random.PRNGKey(config.seed))

    mgr = _checkpoint_manager(workdir, config)
    start = mgr.latest_step() or 0
    if start:
        abstract = jax.eval_shape(lambda: create_train_state(config, init_key))
        restored = mgr.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_with_sharding(abstract, replicated)),
            rng=ocp.args.StandardRestore(_with_sharding(
                {"noise_key": jax.ShapeDtypeStruct(noise_key.shape, noise_key.dtype)},
                replicated)),
            data=ocp.args.JsonRestore()))
        state, noise_key, position = restored.state, restored.rng["noise_key"], restored.data
        if int(state.step) != start or position["step"] != start:
            raise ValueError(f"checkpoint {start} is inconsistent: it holds step "
                             f"{int(state.step)} and data position {position['step']}")
        if (position["num_examples"], position["batch_size"]) != (n, config.batch_size):
            raise ValueError(f"checkpoint {start} was trained on {position['num_examples']} "
                             f"images in batches of {position['batch_size']}; now {n} and "
                             f"{config.batch_size}: the data order cannot be continued")
        _trim_metrics(os.path.join(workdir, METRICS_FILE), start)
    else:
        state = jax.device_put(create_train_state(config, init_key), replicated)
        noise_key = jax.device_put(noise_key, replicated)

    # The convolutions' weight gradient: measured once per platform and network shape.
    wgrad = weight_grad_engine(config, config.batch_size // len(devices))
    with open(os.path.join(workdir, "train_engine.json"), "w") as f:
        json.dump({"weight_grad": wgrad.engine, "reason": wgrad.reason}, f, indent=1)
    if wgrad.engine == "xla":
        state = state.replace(apply_fn=make_model(config, fast_weight_grad=False).apply)

    step_fn = jax.jit(train_step, in_shardings=(replicated, batch_sharding, replicated),
                      out_shardings=(replicated, replicated), donate_argnums=(0,))
    lr_at = optax.exponential_decay(config.lr, transition_steps=1, decay_rate=config.lr_decay)

    def save(step):
        epoch, batch_in_epoch = divmod(step, batches_per_epoch)
        position = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                    "batches_per_epoch": batches_per_epoch, "num_examples": n,
                    "batch_size": config.batch_size, "seed": config.seed}
        mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            rng=ocp.args.StandardSave({"noise_key": noise_key}),
            data=ocp.args.JsonSave(position)))

    bar = tqdm(total=total_steps, initial=start, desc=f"train {config.arch}/{config.dataset}",
               disable=not progress, dynamic_ncols=True)
    metrics_file = open(os.path.join(workdir, METRICS_FILE), "a")
    t0, losses, perm, perm_epoch = time.time(), [], None, None
    try:
        for step in range(start, total_steps):
            epoch, b = divmod(step, batches_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(config.seed, epoch, n), epoch
            idx = perm[b * config.batch_size:(b + 1) * config.batch_size]
            batch = {"images": images[idx]}
            if config.conditional:
                batch["labels"] = labels[idx]
            batch = jax.device_put(batch, batch_sharding)
            state, metrics = step_fn(state, batch, noise_key)
            done = step + 1
            losses.append(metrics["loss"])
            if done % config.log_every == 0 or done == total_steps:
                loss = float(np.mean(jax.device_get(losses)))
                losses = []
                record = {"step": done, "loss": loss, "lr": float(lr_at(step)),
                          "epoch": epoch, "seconds": round(time.time() - t0, 2)}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
            bar.update(1)
            if done % config.checkpoint_every == 0 or done == total_steps:
                save(done)
            if callback is not None:
                callback(done, metrics)
    finally:
        # Also on an exception (Ctrl-C, a failing callback): let pending async saves finish,
        # so that everything saved so far is complete on disk.
        bar.close()
        metrics_file.close()
        mgr.wait_until_finished()
        mgr.close()
    return state


def load_trained(workdir: str, *, step: int | None = None, ema: bool = True):
    """Loads a trained network: (model, params, config), ready for ``make_network``.

    Args:
      workdir: a directory written by ``train_and_evaluate``.
      step: which checkpoint (default: the latest).
      ema: return the EMA parameters when the run kept them (they usually sample better).
    Returns:
      (model, params, config) with ``model.apply(params, x, t, label)`` → ε̂.
    """
    config = _read_config(workdir)
    model = make_model(config)
    mgr = _checkpoint_manager(workdir, create=False)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}")
        if step not in mgr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {workdir} "
                                    f"(have {sorted(mgr.all_steps())})")
        abstract = jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(0)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restored = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_with_sharding(abstract, device))))
    finally:
        mgr.close()
    state = restored.state
    params = state.ema_params if (ema and state.ema_params is not None) else state.params
    return model, params, config


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

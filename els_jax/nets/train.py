"""Training the ε-prediction networks of the paper (docs/theory.md §5), data-parallel, with resume.

Objective (ε-prediction, "simple" DDPM loss), t ~ U[0, 1), ε ~ N(0, I):

    L(θ) = E_{x_0, t, ε} ‖ε̂_θ(a(t)·x_0 + b(t)·ε, t, y) − ε‖² / (H·W·C)

Optimiser as in the paper: AdamW, lr 1e-4 decayed by ×0.999965 every step, batch 128, no
weight decay; optionally an exponential moving average (EMA) of the parameters.

What lives here:
  - ``TrainConfig`` (re-exported from ``nets/config.py``, with ``load_config``): every knob of
    a run, saved as ``config.json``.
  - ``make_model(config)``, ``create_train_state(config, key, image_shape)``.
  - ``train_step(state, batch, key)``: one pure, jitted update; the step's noise comes from
    ``jax.random.fold_in(key, state.step)``.
  - ``train_and_evaluate(config, workdir)``: the loop. Data-parallel over all devices (batch
    sharded over a 'data' mesh axis, parameters replicated), tqdm progress bar, Orbax
    checkpoints every ``checkpoint_every`` steps, automatic resume from the latest one.
  - ``load_trained(workdir)`` → (model, params, config) for sampling and calibration.

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

import functools
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
from els_jax.core.forward import add_noise
from els_jax.nets.config import (NUM_CLASSES, TrainConfig, load_config,
                                 read_config as _read_config, resolve_config as _resolve_config,
                                 unet_channels as _unet_channels, write_config as _write_config)
from els_jax.nets.networks import ResNet, UNet

__all__ = ["TrainConfig", "TrainState", "NUM_CLASSES", "make_model", "make_optimizer",
           "weight_grad_engine",
           "create_train_state", "diffusion_loss", "train_step", "train_and_evaluate",
           "load_trained", "load_config", "epoch_permutation"]

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class TrainState(flax_train_state.TrainState):
    """flax's TrainState (step, params, opt_state; apply_fn and tx static) plus an EMA.

    ``params`` is the full variables dict of the model, i.e. ``model.apply(params, x, t, y)``.
    ``ema_params`` has the same structure, or is None when the config has no EMA.
    """

    ema_params: Any = None
    ema_decay: float | None = struct.field(pytree_node=False, default=None)
    schedule: str = struct.field(pytree_node=False, default="cosine")


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

"""Training (docs/theory.md §5): the loss goes down, kill-and-resume equals an uninterrupted run,
4-device data parallelism equals one device, a one-epoch run on tfds mock MNIST, the CLI and
the experiment configs."""

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax import cli
from els_jax.nets import train as train_lib
from els_jax.nets import config as net_config
from els_jax.nets.train import (TrainConfig, create_train_state, diffusion_loss, load_trained,
                           train_and_evaluate, train_step)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="digits", arch="resnet", channels=8, depth=1, emb_dim=16, batch_size=16,
            epochs=None, steps=4, log_every=1)


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    images, _ = ej.load_dataset("digits", max_examples=32)
    config = TrainConfig(**{**TINY, "channels": 16, "depth": 2}, lr=2e-3, ema=0.5,
                         image_shape=(8, 8, 1))
    state = create_train_state(config, jax.random.PRNGKey(0))
    batch = {"images": jnp.asarray(images)}
    key, eval_key = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    loss = jax.jit(diffusion_loss, static_argnums=(1, 4))
    before = float(loss(state.params, state.apply_fn, batch, eval_key, "cosine"))
    first, _ = train_step(state, batch, key)
    again, _ = train_step(state, batch, key)  # pure: same inputs, same result
    assert _max_diff(first.params, again.params) == 0.0
    for _ in range(30):
        state, metrics = train_step(state, batch, key)
    after = float(loss(state.params, state.apply_fn, batch, eval_key, "cosine"))
    assert int(state.step) == 30 and np.isfinite(float(metrics["loss"]))
    assert after < 0.8 * before, (before, after)
    # The EMA trails the parameters: it moved, but not all the way.
    assert 0.0 < _max_diff(state.ema_params, state.params)


def test_weight_grad_engine_is_measured_cached_and_exact(tmp_path, monkeypatch):
    """Training's weight gradient (im2col or XLA's) is chosen by timing one step each way,
    cached on disk; both ways give the same step; ELS_JAX_AUTOTUNE=0 keeps the static rule."""
    from els_jax.engines import autotune as engines
    monkeypatch.setenv("ELS_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("ELS_JAX_AUTOTUNE", "1")
    engines.clear_memory_cache()
    config = TrainConfig(**TINY, image_shape=(8, 8, 1))
    try:
        choice = train_lib.weight_grad_engine(config, 8)
        assert choice.engine in ("im2col", "xla") and "measured" in choice.reason
        assert set(choice.times) == {"im2col", "xla"}
        engines.clear_memory_cache()                       # from the disk cache now
        again = train_lib.weight_grad_engine(config, 8)
        assert again.engine == choice.engine and "cached" in again.reason
        monkeypatch.setenv("ELS_JAX_AUTOTUNE", "0")
        static = train_lib.weight_grad_engine(config, 8)
        assert static.engine == "im2col" and "static rule" in static.reason
    finally:
        engines.clear_memory_cache()
    images, _ = ej.load_dataset("digits", max_examples=8)
    state = create_train_state(config, jax.random.PRNGKey(0))
    batch, key = {"images": jnp.asarray(images)}, jax.random.PRNGKey(1)
    plain_apply = train_lib.make_model(config, fast_weight_grad=False).apply
    grad = jax.jit(jax.grad(diffusion_loss), static_argnums=1)
    fast = grad(state.params, state.apply_fn, batch, key)
    plain = grad(state.params, plain_apply, batch, key)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(fast))
    assert scale > 0 and _max_diff(fast, plain) < 1e-4 * scale


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    config = TrainConfig(**{**TINY, "steps": 7}, max_examples=48, checkpoint_every=2, ema=0.9)
    # 3 batches per epoch: the 7 steps cross two epoch boundaries.
    full = train_and_evaluate(config, str(tmp_path / "full"), progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed  # after the checkpoint of step 4, before the one of step 6

    with pytest.raises(Killed):
        train_and_evaluate(config, str(tmp_path / "resumed"), callback=kill_at_5,
                           progress=False)
    steps_seen = []
    resumed = train_and_evaluate(config, str(tmp_path / "resumed"), progress=False,
                                 callback=lambda step, m: steps_seen.append(step))
    assert steps_seen == [5, 6, 7]  # continued after the last checkpoint (step 4)
    assert int(resumed.step) == int(full.step) == 7
    for name in ("params", "ema_params", "opt_state"):
        assert _max_diff(getattr(full, name), getattr(resumed, name)) <= 1e-6, name
    with open(tmp_path / "resumed" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 8))
    # load_trained gives the EMA parameters of the last checkpoint.
    model, params, loaded = load_trained(str(tmp_path / "resumed"))
    assert _max_diff(params, full.ema_params) <= 1e-6
    assert loaded.image_shape == (8, 8, 1) and isinstance(model, ej.networks.ResNet)
    # A finished run restarted does nothing; a different run in the same workdir is refused.
    again = train_and_evaluate(config, str(tmp_path / "full"), progress=False)
    assert int(again.step) == 7 and _max_diff(again.params, full.params) == 0.0
    with pytest.raises(ValueError, match="different run"):
        train_and_evaluate(dataclasses.replace(config, depth=2), str(tmp_path / "full"),
                           progress=False)


def test_data_parallel_on_4_devices_equals_one_device(tmp_path):
    script = textwrap.dedent(f"""
        import dataclasses, json, jax, numpy as np
        from els_jax.nets.train import TrainConfig, train_and_evaluate
        assert len(jax.devices()) == 4, jax.devices()
        config = TrainConfig(**{{**{TINY!r}, "steps": 3}}, max_examples=64, conditional=True)
        four = train_and_evaluate(config, {str(tmp_path / "four")!r}, progress=False)
        one = train_and_evaluate(config, {str(tmp_path / "one")!r},
                                 devices=jax.devices()[:1], progress=False)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                   zip(jax.tree.leaves(four.params), jax.tree.leaves(one.params)))
        replicated = all(len(x.sharding.device_set) == 4 for x in jax.tree.leaves(four.params))
        try:
            train_and_evaluate(dataclasses.replace(config, batch_size=6),
                               {str(tmp_path / "bad")!r}, progress=False)
            error = None
        except ValueError as err:
            error = str(err)
        print(json.dumps({{"diff": diff, "replicated": replicated, "error": error}}))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicated"]
    assert result["diff"] < 1e-5, result
    assert "does not divide over the 4 devices" in result["error"]


def test_one_epoch_end_to_end_on_tfds_mock_mnist(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = TrainConfig(**{**TINY, "dataset": "mnist", "epochs": 1, "steps": None},
                         image_size=8, conditional=True, checkpoint_every=100)
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
        state = train_and_evaluate(config, str(tmp_path), progress=False)
    assert int(state.step) == 2  # 32 images / batch 16
    model, params, loaded = load_trained(str(tmp_path))
    assert loaded.num_classes == 10 and loaded.image_shape == (8, 8, 1)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    x0 = ej.sample(ej.make_network(model, params, label=3), x_T, ej.uniform_times(2))
    assert x0.shape == (2, 8, 8, 1) and np.all(np.isfinite(np.asarray(x0)))


def _parse(argv):
    parser = argparse.ArgumentParser(prog="els-jax")
    cli.add_train_subcommand(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_train_subcommand_overrides_the_config_file():
    args = _parse(["train", "--workdir", "w", "--config",
                   os.path.join(REPO, "experiments/configs/digits_resnet.py"),
                   "--channels", "16", "--epochs", "2", "--conditional", "--padding", "circular"])
    assert args.func is cli._cmd_train and args.workdir == "w"
    config = cli.config_from_args(args)
    base = train_lib.load_config(os.path.join(REPO, "experiments/configs/digits_resnet.py"))
    assert (config.channels, config.epochs, config.steps) == (16, 2, None)
    assert config.conditional and config.padding == "circular"
    assert (config.lr, config.depth, config.dataset) == (base.lr, base.depth, base.dataset)
    args = _parse(["train", "--workdir", "w", "--arch", "unet", "--channels", "8,16",
                   "--attention-resolutions", "4"])
    config = cli.config_from_args(args)
    assert config.channels == (8, 16) and config.attention_resolutions == (4,)
    with pytest.raises(SystemExit):
        _parse(["train", "--workdir", "w", "--arch", "mlp"])


def test_config_checks_and_json_round_trip():
    config = TrainConfig(arch="unet", channels=(8, 16), attention_resolutions=(4,))
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown arch"):
        TrainConfig(arch="mlp").validate()
    with pytest.raises(ValueError, match="unknown padding"):
        TrainConfig(padding="reflect").validate()
    with pytest.raises(ValueError, match="one width"):
        TrainConfig(channels=(8, 16)).validate()
    with pytest.raises(ValueError, match="steps or epochs"):
        TrainConfig(steps=None, epochs=None).validate()
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"lr": 1.0, "learning_rate": 1.0})
    with pytest.raises(ValueError, match="divides by 4"):
        net_config.resolve_config(TrainConfig(arch="unet"), np.zeros((2, 6, 6, 1)),
                                  np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="no class labels"):
        net_config.resolve_config(TrainConfig(conditional=True), np.zeros((2, 8, 8, 1)),
                                  np.zeros(2, np.int32))


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    a = train_lib.epoch_permutation(0, 3, 100)
    np.testing.assert_array_equal(a, train_lib.epoch_permutation(0, 3, 100))
    assert sorted(a) == list(range(100))
    assert not np.array_equal(a, train_lib.epoch_permutation(0, 4, 100))
    assert not np.array_equal(a, train_lib.epoch_permutation(1, 3, 100))


CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_experiment_configs_load_and_document_their_launch_command(path):
    config = train_lib.load_config(path).validate()
    with open(path) as f:
        source = f.read()
    rel = os.path.relpath(path, REPO)
    assert f"els-jax train --config {rel}" in source
    if config.dataset == "mnist5k":  # CPU-sized, defined once in the library (issue 14)
        from els_jax.experiment.config import mnist5k_train_config
        assert config == mnist5k_train_config(arch=config.arch, padding=config.padding)
        assert config.image_size == 32
    elif config.dataset != "digits":  # a paper run (docs/theory.md §5)
        assert (config.batch_size, config.lr, config.lr_decay, config.epochs,
                config.weight_decay) == (128, 1e-4, 0.999965, 300, 0.0)
        assert config.image_size == 32
        assert config.conditional == (config.dataset in ("fashion_mnist", "cifar10"))

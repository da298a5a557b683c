"""Small ResNet on the embedded 8×8 digits (no download); trains in minutes on 2 CPU cores.

Not a run of the paper: a CPU-sized stand-in for the pipeline (train → calibrate → compare).
The paper's ResNet shape (6 residual 3×3 layers, zero padding, receptive field 17) at width
64 instead of 256, and a 5× larger learning rate with a faster decay so that a few thousand
steps suffice (the paper trains 300 epochs of 60k images at lr 1e-4).

Launch:
    els-jax train --config experiments/configs/digits_resnet.py --workdir /tmp/runs/digits_resnet
"""

from els_jax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="digits",
        arch="resnet",
        padding="zeros",
        conditional=False,
        channels=64,
        depth=6,
        batch_size=128,
        steps=3000,
        epochs=None,
        lr=5e-4,
        lr_decay=0.9997,
        ema=0.999,
        seed=0,
        checkpoint_every=500,
        log_every=100,
    )

"""Small ResNet on the embedded 8×8 digits (no download); trains in minutes on 2 CPU cores.

Not a run of the paper: a CPU-sized stand-in for the pipeline (train → calibrate → compare).
The paper's ResNet shape (6 residual 3×3 layers, zero padding, receptive field 17) at width
64 instead of 256, and a 5× larger learning rate with a faster decay so that a few thousand
steps suffice (the paper trains 300 epochs of 60k images at lr 1e-4).

Launch:
    els-jax train --config experiments/configs/digits_resnet.py --workdir /tmp/runs/digits_resnet
"""

from els_jax.experiment.config import digits_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    # The one definition lives in the library: it is what `els-jax reproduce` trains.
    return digits_train_config()

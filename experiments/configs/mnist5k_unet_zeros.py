"""mnist5k, UNet, zero padding: the CPU-sized version of the paper's MNIST UNet (ELS vs
network median r² .89, docs/theory.md §4); shipped in experiments/checkpoints/mnist5k_unet_zeros/.

    els-jax train --config experiments/configs/mnist5k_unet_zeros.py \
        --workdir runs/train/mnist5k_unet_zeros
"""

from els_jax.experiment.config import mnist5k_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    return mnist5k_train_config(arch="unet", padding="zeros")

"""mnist5k (5000 real MNIST digits at 32×32, embedded), ResNet, zero padding: the CPU-sized
version of the paper's headline network (ELS vs network median r² .94 on MNIST, docs/theory.md §4).
The trained network ships in experiments/checkpoints/mnist5k_resnet_zeros/.

    els-jax train --config experiments/configs/mnist5k_resnet_zeros.py \
        --workdir runs/train/mnist5k_resnet_zeros
"""

from els_jax.experiment.config import mnist5k_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    return mnist5k_train_config(arch="resnet", padding="zeros")

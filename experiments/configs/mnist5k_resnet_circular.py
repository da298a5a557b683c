"""mnist5k, ResNet, circular padding: the CPU-sized version of the paper's circular network
(ELS with a circular boundary vs network r = .77 on MNIST, docs/theory.md §4); the trained network
ships in experiments/checkpoints/mnist5k_resnet_circular/.

    els-jax train --config experiments/configs/mnist5k_resnet_circular.py \
        --workdir runs/train/mnist5k_resnet_circular
"""

from els_jax.experiment.config import mnist5k_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    return mnist5k_train_config(arch="resnet", padding="circular")

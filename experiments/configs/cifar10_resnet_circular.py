"""CIFAR10, ResNet, circular padding, class-conditional.
Paper (docs/theory.md §4): ELS vs network median r² .94.

    els-jax train --config experiments/configs/cifar10_resnet_circular.py --workdir runs/cifar10_resnet_circular --data-dir $TFDS_DATA_DIR
"""

from els_jax.experiment.config import paper_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    return paper_train_config("cifar10", "resnet", "circular", conditional=True)

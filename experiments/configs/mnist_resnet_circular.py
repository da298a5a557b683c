"""MNIST, ResNet, circular padding. Paper (docs/theory.md §4): ELS (circular) vs network r = .77.

    els-jax train --config experiments/configs/mnist_resnet_circular.py --workdir runs/mnist_resnet_circular --data-dir $TFDS_DATA_DIR
"""

from els_jax.experiment.config import paper_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    return paper_train_config("mnist", "resnet", "circular", conditional=False)

"""MNIST, UNet, zero padding. Paper (docs/theory.md §4): ELS vs network median r² .89.
Its calibrated ELS scales are in docs/theory.md §5.

    els-jax train --config experiments/configs/mnist_unet_zeros.py --workdir runs/mnist_unet_zeros --data-dir $TFDS_DATA_DIR
"""

from els_jax.experiment.config import paper_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    return paper_train_config("mnist", "unet", "zeros", conditional=False)

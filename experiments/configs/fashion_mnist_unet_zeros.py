"""FashionMNIST, UNet, zero padding, class-conditional.
Paper (docs/theory.md §4): ELS vs network median r² .93.

    els-jax train --config experiments/configs/fashion_mnist_unet_zeros.py --workdir runs/fashion_mnist_unet_zeros --data-dir $TFDS_DATA_DIR
"""

from els_jax.experiment.config import paper_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    return paper_train_config("fashion_mnist", "unet", "zeros", conditional=True)

"""CelebA (centre-cropped to 32×32), UNet, zero padding.
Paper (docs/theory.md §4): ELS vs network median r² .85.

    els-jax train --config experiments/configs/celeb_a_unet_zeros.py --workdir runs/celeb_a_unet_zeros --data-dir $TFDS_DATA_DIR
"""

from els_jax.experiment.config import paper_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    return paper_train_config("celeb_a", "unet", "zeros", conditional=False)

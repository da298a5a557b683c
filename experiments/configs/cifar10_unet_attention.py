"""CIFAR10, UNet with self-attention at 16×16 and 8×8, zero padding, class-conditional.
Paper (docs/theory.md §4): ELS vs network median r² .77 (attention is not local: ELS explains
it less well).

    els-jax train --config experiments/configs/cifar10_unet_attention.py --workdir runs/cifar10_unet_attention --data-dir $TFDS_DATA_DIR
"""

from els_jax.experiment.config import paper_train_config
from els_jax.nets.train import TrainConfig


def get_config() -> TrainConfig:
    return paper_train_config("cifar10", "unet", "zeros", conditional=True,
                              attention_resolutions=(16, 8))

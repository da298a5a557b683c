"""Paper run: ResNet, zeros padding, CIFAR10 at 32×32 (Kamb & Ganguli 2025).

Class-conditional; ELS vs network median r² = .95 (IS .42); calibrated scales in SPEC §5 (SPEC §4).
Training as in the paper (SPEC §5): ε-prediction, AdamW lr 1e-4 ×0.999965 per step, batch
128, 300 epochs, no weight decay. Needs the TFDS data prepared once (see els_jax.data).

Launch:
    els-jax train --config experiments/configs/cifar10_resnet_zeros.py --workdir runs/cifar10_resnet_zeros --data-dir $TFDS_DATA_DIR
"""

from els_jax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="cifar10",
        image_size=32,
        arch="resnet",
        padding="zeros",
        conditional=True,
        channels=256,
        depth=6,
        batch_size=128,
        epochs=300,
        steps=None,
        lr=1e-4,
        lr_decay=0.999965,
        weight_decay=0.0,
        seed=0,
        checkpoint_every=5000,
    )

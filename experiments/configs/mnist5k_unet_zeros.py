"""UNet, zero padding, 3 scales (paper: ELS median r² .89 on MNIST), trained on the embedded real MNIST subset "mnist5k" (5000 digits, 32×32).

CPU-sized: the paper's architecture (SPEC §5) at half its width (32/64/128 channels instead of 64/128/256), 4000 steps of batch 128
(≈ 100 epochs of the 5000 digits) at lr 5e-4 decayed ×0.9998 per step, with an EMA of the
weights (the paper: 300 epochs of 60 000 digits at lr 1e-4, no EMA). The trained checkpoint is
shipped in experiments/checkpoints/mnist5k_unet_zeros/ (config.json and metrics.jsonl beside it).

Launch (resumes from the latest checkpoint in the workdir if there is one):
    els-jax train --config experiments/configs/mnist5k_unet_zeros.py --workdir runs/train/mnist5k_unet_zeros
"""

from els_jax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="mnist5k",
        image_size=32,
        arch="unet",
        padding="zeros",
        conditional=False,
        channels=(32, 64, 128),
        depth=6,
        batch_size=128,
        steps=4000,
        epochs=None,
        lr=5e-4,
        lr_decay=0.9998,
        ema=0.999,
        weight_decay=0.0,
        seed=0,
        checkpoint_every=200,
        keep_checkpoints=2,
        log_every=50,
    )

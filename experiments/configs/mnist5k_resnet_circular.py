"""ResNet, circular padding (receptive field 17; paper: ELS median r² .77 on MNIST).

Trained on the embedded real MNIST digits "mnist5k" (5000 digits at 32×32), CPU-sized: the
paper's architecture (SPEC §5) as a ResNet of width 32 instead of 256, 3000 steps of batch 128
(≈ 77 epochs) at lr 5e-4 decayed ×0.9998 per step, with an EMA of the weights (the paper: 300
epochs of 60 000 digits at lr 1e-4, no EMA). The trained checkpoint is shipped in
experiments/checkpoints/mnist5k_resnet_circular/ (config.json and metrics.jsonl beside it).

Launch (resumes from the latest checkpoint in the workdir if there is one):
    els-jax train --config experiments/configs/mnist5k_resnet_circular.py \
        --workdir runs/train/mnist5k_resnet_circular
"""

from els_jax.experiment import mnist5k_train_config
from els_jax.train import TrainConfig


def get_config() -> TrainConfig:
    # The one definition lives in the library: it is what `els-jax reproduce --dataset
    # mnist5k` trains with --retrain, and what decides whether the shipped network matches.
    return mnist5k_train_config(arch="resnet", padding="circular")

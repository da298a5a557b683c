#!/usr/bin/env bash
# Trains (or resumes) the three mnist5k networks one after the other, then copies each final
# checkpoint into experiments/checkpoints/ (what the repository ships). Safe to kill and
# re-run at any point: `els-jax train` resumes from the latest checkpoint.
#
#   nohup bash experiments/train_mnist5k.sh > runs/train/mnist5k.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/train
for name in ${NETWORKS:-resnet_zeros unet_zeros resnet_circular}; do
  els-jax train --config "experiments/configs/mnist5k_${name}.py" \
    --workdir "runs/train/mnist5k_${name}" --no-progress
  python experiments/ship_checkpoint.py "runs/train/mnist5k_${name}" \
    "experiments/checkpoints/mnist5k_${name}"
done

#!/usr/bin/env bash
# The paper's Tables 1–2 (Kamb & Ganguli 2025, docs/theory.md §4): train each network, then compare it
# with the ELS / LS / IS machines on 100 seeds, network 150 DDIM steps, machines 20.
#
# Meant for accelerators (one GPU/TPU host per line is comfortable; every command resumes
# where it stopped when re-run). Needs the TFDS data sets prepared once in $TFDS_DATA_DIR
# (`pip install -e '.[prepare]'` then `tfds build mnist fashion_mnist cifar10 celeb_a`).
#
#   RUNS=/big/disk/runs TFDS_DATA_DIR=/data/tfds bash experiments/paper_runs.sh            # all
#   RUNS=... bash experiments/paper_runs.sh mnist_resnet_zeros cifar10_unet_attention      # some
# Then: python experiments/gather.py "$RUNS" > table.md
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/paper}
DATA_DIR=${TFDS_DATA_DIR:?set TFDS_DATA_DIR to the prepared TFDS data sets}
ALL=(
  mnist_resnet_zeros fashion_mnist_resnet_zeros cifar10_resnet_zeros celeb_a_resnet_zeros  # Table 1
  mnist_unet_zeros fashion_mnist_unet_zeros cifar10_unet_zeros celeb_a_unet_zeros          # Table 1
  mnist_resnet_circular cifar10_resnet_circular                                            # Table 2
  cifar10_unet_attention                                                                   # attention
)
RUNS_TO_DO=("$@")
[ ${#RUNS_TO_DO[@]} -eq 0 ] && RUNS_TO_DO=("${ALL[@]}")
for name in "${RUNS_TO_DO[@]}"; do
  echo "=== $name"
  els-jax train --config "experiments/configs/$name.py" --workdir "$RUNS/$name/network" \
    --data-dir "$DATA_DIR"
  # The network (dataset, architecture, padding, conditioning) comes from the checkpoint.
  els-jax reproduce --checkpoint "$RUNS/$name/network" --data-dir "$DATA_DIR" \
    --seeds 100 --calib-seeds 10 --network-steps 150 --machine-steps 20 \
    --out "$RUNS/$name/compare"
done

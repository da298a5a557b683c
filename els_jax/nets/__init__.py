"""The convolutional denoisers the machines explain (docs/theory.md §5): ``networks`` (Flax
ResNet and UNet), ``conv`` (their convolutions, with a CPU-fast weight gradient) and ``train``
(ε-prediction training with optax, Orbax checkpoints). Beside ``machines``: imports ``engines``
(the autotuning cache) and ``core`` only."""

"""Benchmark of network training on the current backend (issue 14). One JSON line per row.

    python experiments/bench_train.py            # every workload (≈ 3 min on 2 cores)
    python experiments/bench_train.py --quick    # the digits step and the 32×32 ResNet step
    python experiments/bench_train.py --only conv

Rows:
  - "conv": one 3×3 convolution layer of a workload, forward, input gradient, and the weight
    gradient two ways: XLA's own (backward-filter convolution) and the im2col path of
    ``els_jax.conv`` (what CPU training uses).
  - "step": one whole jitted ``train_step`` (AdamW, ε-prediction loss, batch 128) with the
    fast weight gradient and, for comparison, with XLA's (``fast_weight_grad=False``).
Every row reports seconds (median of repeats after a warm-up), GFLOP/s (FLOPs of the step
from XLA's cost analysis; of the convolution counted as 2·B·H·W·k²·C·O) and the same-run
time of a plain ``jnp.matmul`` doing as many FLOPs ([4096, 4096] × [4096, n]): the roofline
ratio ``vs_matmul`` = matmul GFLOP/s / our GFLOP/s (1 = matmul speed). The CPU model and its
SIMD flags head the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import els_jax as ej
from els_jax.nets import conv as conv_lib
from els_jax.nets.train import TrainConfig, create_train_state, train_step


def cpu_info() -> dict:
    """CPU model and the SIMD flags that decide which code is fast (AVX2 / AVX-512 / NEON)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith(("flags", "Features")):
                    flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "asimd", "sve", "amx")))
    return {"cpu": model, "cores": os.cpu_count(), "simd": simd,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "backend": jax.default_backend(),
            "jax": jax.__version__}


def timed(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))                       # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_gflops(flops: float) -> float:
    """GFLOP/s of a plain jnp.matmul [4096, 4096] × [4096, n] with about ``flops`` FLOPs."""
    n = max(64, int(flops / (2 * 4096 * 4096)))
    a = jnp.ones((4096, 4096), jnp.float32)
    b = jnp.ones((4096, n), jnp.float32)
    seconds = timed(jax.jit(jnp.matmul), a, b, repeats=3)
    return 2 * 4096 * 4096 * n / seconds / 1e9


def emit(row):
    print(json.dumps(row), flush=True)


def bench_conv(name, b, h, c, o, k=3):
    key = jax.random.key(0)
    x = jax.random.normal(key, (b, h, h, c), jnp.float32)
    g = jax.random.normal(jax.random.fold_in(key, 1), (b, h, h, o), jnp.float32)
    kernel = jax.random.normal(jax.random.fold_in(key, 2), (k, k, c, o), jnp.float32)
    flops = 2 * b * h * h * k * k * c * o
    fwd = timed(jax.jit(lambda x, w: conv_lib.conv2d(x, w, fast_weight_grad=False)), x, kernel)
    dx = timed(jax.jit(lambda g, w: jax.vjp(lambda xx: conv_lib.conv2d(xx, w), x)[1](g)[0]),
               g, kernel)
    dw_xla = timed(jax.jit(lambda x, g: conv_lib.weight_grad_reference(x, g, k)), x, g)
    dw_ours = timed(jax.jit(lambda x, g: conv_lib._weight_grad_im2col(x, g, k)), x, g)
    roof = matmul_gflops(flops)
    emit({"row": "conv", "workload": name, "shape": [b, h, h, c, o], "k": k,
          "gflop": flops / 1e9, "fwd_s": fwd, "dx_s": dx, "dw_xla_s": dw_xla,
          "dw_im2col_s": dw_ours, "dw_speedup": dw_xla / dw_ours,
          "gflops": {"fwd": flops / fwd / 1e9, "dx": flops / dx / 1e9,
                     "dw_xla": flops / dw_xla / 1e9, "dw_im2col": flops / dw_ours / 1e9},
          "matmul_gflops": roof})


def bench_step(name, config: TrainConfig, image_shape, *, compare_xla=True):
    config = config.validate()
    state = create_train_state(config, jax.random.key(0), image_shape)
    batch = {"images": jax.random.uniform(jax.random.key(1), (config.batch_size,) + image_shape,
                                          jnp.float32, -1, 1)}
    if config.conditional:
        batch["labels"] = jnp.arange(config.batch_size, dtype=jnp.int32) % config.num_classes
    key = jax.random.key(2)
    step = jax.jit(train_step)
    slow_state = state.replace(apply_fn=state.apply_fn.__self__.clone(
        fast_weight_grad=False).apply)
    # FLOPs from XLA's cost analysis of the plain step: it does not multiply a scan body by
    # its trip count, so the im2col step's own analysis would under-count.
    flops = step.lower(slow_state, batch, key).compile().cost_analysis()
    flops = float((flops[0] if isinstance(flops, list) else flops).get("flops", 0.0))
    seconds = timed(step, state, batch, key)
    row = {"row": "step", "workload": name, "batch": config.batch_size,
           "image_shape": list(image_shape), "arch": config.arch, "channels": config.channels,
           "depth": config.depth if config.arch == "resnet" else None,
           "padding": config.padding, "gflop": flops / 1e9, "step_s": seconds,
           "gflops": flops / seconds / 1e9}
    if compare_xla:
        row["step_xla_wgrad_s"] = timed(step, slow_state, batch, key, repeats=2)
        row["speedup_vs_xla_wgrad"] = row["step_xla_wgrad_s"] / seconds
    row["matmul_gflops"] = matmul_gflops(flops)
    row["vs_matmul"] = row["matmul_gflops"] / row["gflops"]
    emit(row)


CONVS = [("resnet w64 32x32", 128, 32, 64, 64), ("resnet w32 32x32", 128, 32, 32, 32),
         ("resnet w64 8x8", 128, 8, 64, 64), ("down-projection w64 32x32", 128, 32, 64, 1),
         ("unet 16x16 128", 128, 16, 128, 128)]


def steps(quick):
    digits = TrainConfig(dataset="digits", arch="resnet", channels=64, depth=6, steps=1)
    rows = [("digits resnet w64 8x8", digits, (8, 8, 1)),
            ("mnist resnet w64 32x32", TrainConfig(arch="resnet", channels=64, steps=1),
             (32, 32, 1))]
    if not quick:
        rows += [
            ("mnist resnet w32 32x32", TrainConfig(arch="resnet", channels=32, steps=1),
             (32, 32, 1)),
            ("mnist resnet w64 32x32 circular",
             TrainConfig(arch="resnet", channels=64, padding="circular", steps=1), (32, 32, 1)),
            ("mnist unet (32,64,128) 32x32",
             TrainConfig(arch="unet", channels=(32, 64, 128), steps=1), (32, 32, 1)),
            ("mnist unet (64,128,256) 32x32",
             TrainConfig(arch="unet", channels=(64, 128, 256), steps=1), (32, 32, 1)),
        ]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["conv", "step"])
    p.add_argument("--no-xla-compare", action="store_true",
                   help="skip the (slow) steps with XLA's weight gradient")
    args = p.parse_args(argv)
    emit({"row": "machine", **cpu_info()})
    if args.only in (None, "conv"):
        for conv in (CONVS[:1] if args.quick else CONVS):
            bench_conv(*conv)
    if args.only in (None, "step"):
        for name, config, shape in steps(args.quick):
            bench_step(name, config, shape, compare_xla=not args.no_xla_compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())

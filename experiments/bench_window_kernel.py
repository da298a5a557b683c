"""Benchmark of the ELS main pass on real digits (issue 14): the window bank run by the fused
CPU kernel ("window_native") against the same bank run by XLA ("window") and against the
zero-padded interior's kernel ("native", no merging). Prints one JSON object per line.

    python experiments/bench_window_kernel.py            # mnist5k, k = 3, 5, 7, B = 16
    python experiments/bench_window_kernel.py --k 3 --batch 4 --t 0.3

Workload: the zero-padded ELS machine's interior pass (docs/theory.md §2) on mnist5k (5000 real MNIST
digits at 32×32, ``ej.load_dataset("mnist5k")``), the experiment's batch of 16 query images
x_t = a·x_0 + b·ε (x_0 training digits), identical windows merged (what ``make_machine``
builds for digits). Per row:

  pairs            B × interior query pixels × bank rows (merged windows).
  time_s           median call of each engine (``passes.bank_x0`` of the same machine built with
                   ``method=``), timed in alternation; ns_per_pair = time / pairs.
  matmul_s         a bare jitted ``jnp.matmul`` [B·P, k² + 2] × [k² + 2, rows] of the same
                   shape (the logits alone; the XLA engine also takes their exp and a
                   weighted sum), measured and scaled as in bench_machines.py.
  vs_xla, vs_matmul   the kernel's time over the XLA window engine's, and over the matmul.
  max_abs_diff     the largest |x̂_0| difference between the engines (float32 rounding).

The first row is the platform (CPU model, SIMD flags, cores, XLA_FLAGS, the kernel's -march).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import els_jax as ej  # noqa: E402
from bench_machines import matmul_seconds, platform_row, time_engines  # noqa: E402
from els_jax.engines import select as engines
from els_jax.core import schedules  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", default="3,5,7", help="patch sizes (comma-separated)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--t", type=float, default=0.5)
    args = parser.parse_args(argv)
    print(json.dumps(platform_row()), flush=True)
    images, _ = ej.load_dataset("mnist5k")
    n, h, w, c = images.shape
    rng = np.random.default_rng(0)
    a, b2, _ = schedules.coefficients(jnp.float32(args.t), schedules.Cosine())
    x = jnp.asarray(float(a) * images[rng.integers(0, n, args.batch)]
                    + float(np.sqrt(b2)) * rng.normal(size=(args.batch, h, w, c)), jnp.float32)
    t = jnp.float32(args.t)
    for k in (int(v) for v in args.k.split(",")):
        methods = ["window"]
        if engines.native_window_ok():
            methods.append("window_native")
        if engines.native_interior_ok(k, h, w, "zeros"):
            methods.append("native")
        machines, build = {}, {}
        for m in methods:
            t0 = time.perf_counter()
            machines[m] = ej.make_machine("els", images, scales=k, boundary="zeros", method=m,
                                          compile_for=x)
            build[m] = round(time.perf_counter() - t0, 2)
        outs = {m: np.asarray(machines[m].x0(x, t, 0)) for m in methods}
        timed = time_engines({m: (lambda mm: lambda: mm.x0(x, t, 0))(machines[m])
                              for m in methods}, budget=4.0, max_reps=5)
        spec = machines["window"].bank_spec(0)
        rows = int(np.isfinite(np.asarray(machines["window"]._x0_fns[k].bank.windows[0]
                                          .keys[0, :, -1])).sum())
        p = (h - 2 * (k // 2)) * (w - 2 * (k // 2))
        pairs = args.batch * p * rows
        mm = matmul_seconds(args.batch * p, k * k * c + 2, rows)
        row = {"workload": f"ELS zeros interior, mnist5k N={n}, 32x32x1, merged windows",
               "k": k, "B": args.batch, "t": args.t, "bank_rows": rows,
               "unique_fraction": round(spec.unique_fraction, 4), "pairs": pairs,
               "time_s": {m: round(v[0], 4) for m, v in timed.items()},
               "ns_per_pair": {m: round(v[0] / pairs * 1e9, 3) for m, v in timed.items()},
               "build_s": build, "matmul_s": round(mm, 4),
               "max_abs_diff": float(max(np.abs(outs[m] - outs["window"]).max()
                                         for m in methods))}
        if "window_native" in timed:
            row["vs_xla"] = round(timed["window_native"][0] / timed["window"][0], 3)
            row["vs_matmul"] = round(timed["window_native"][0] / mm, 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

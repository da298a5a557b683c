"""Speed of the els_soft machine (docs/theory.md §7, issue 15). Prints one JSON object per line.

    python experiments/bench_soft.py            # N = 1000 random 32×32×1 images, B = 1, k_max = 11
    python experiments/bench_soft.py --n 250 --k-max 7
    python experiments/bench_soft.py --data mnist5k --n 5000 --k-max 9 --b 2 --no-grad

The functional rows use the default engine (``soft.resolve_engine("auto")``: the shift-map
kernel on a CPU); the machine rows run both engines, the XLA bank first, with
speedup_vs_xla_bank = its time / this one's.
For each boundary: ``els_soft_x0`` (functional, candidates streamed from the images) and
``make_machine("els_soft", ...)`` (candidate windows precomputed once) at t = 0.05 and 0.5,
compiled before timing, then the median of several calls (``bench_machines.time_calls``).

  pairs         (query pixel × candidate) pairs of the ELS layout with k = k_max
                (circular: B·H·W·N·(H−k+1)(W−k+1); zeros: interior, edge and corner groups).
  ns_per_pair   time_s / pairs.
  matmul_s      a bare jitted ``jnp.matmul`` of the naive shape [B·H·W, k²C] ×
                [k²C, pairs / (B·H·W)] in the same run (``bench_machines.matmul_seconds``);
                ratio_matmul = time_s / matmul_s.
  grad_s        (functional rows) one ``jax.grad`` w.r.t. σ and x of Σ x̂_0, for scale, and
                grad_peak_temp_MB its XLA temporary memory (one softmax state per chunk).
The first line holds the CPU model and flags (from /proc/cpuinfo).
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
import bench_machines as bm  # noqa: E402  (same methodology as the other machines' table)

from els_jax.machines import soft  # noqa: E402

H = W = 32


def cpu_info() -> dict:
    info = {"backend": jax.default_backend(), "devices": jax.device_count(),
            "cores": os.cpu_count()}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "cpu" not in info:
            info["cpu"] = value.strip()
        if key == "flags" and "flags" not in info:
            flags = value.split()
            info["simd"] = [f for f in flags if f.startswith(("avx", "fma", "sse4", "amx"))]
            info["flags"] = " ".join(flags)
    return info


def pairs_of(k, boundary, n, b):
    return b * n * sum(gp.query_pixels.size * gp.cand_pixels.shape[1]
                       for gp in soft.soft_groups(k, boundary, False, H, W))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--k-max", type=int, default=11)
    parser.add_argument("--b", type=int, default=1)
    parser.add_argument("--sigma", type=float, default=2.0)
    parser.add_argument("--no-grad", action="store_true")
    parser.add_argument("--no-machine", action="store_true")
    parser.add_argument("--data", choices=["random", "mnist5k"], default="random",
                        help="random images, or the first N mnist5k digits (32×32×1)")
    args = parser.parse_args(argv)
    print(json.dumps(cpu_info()), flush=True)
    n, k, b = args.n, args.k_max, args.b
    if args.data == "mnist5k":
        from els_jax.core import data
        images = jnp.asarray(data.load_mnist5k()[0][:n], jnp.float32)
        n = int(images.shape[0])
    else:
        images = jnp.asarray(bm._images(n, 1))
    x = bm._queries(b, 1)
    sigma = jnp.float32(args.sigma)
    for boundary in ("circular", "zeros"):
        pairs = pairs_of(k, boundary, n, b)
        mm_s = bm.matmul_seconds(b * H * W, k * k, max(1, pairs // (b * H * W)))
        fn = jax.jit(lambda x, t, s, im, boundary=boundary: soft.els_soft_x0(
            x, t, im, sigma=s, k_max=k, boundary=boundary))
        t0 = time.perf_counter()
        compiled = fn.lower(x, jnp.float32(0.5), sigma, images).compile()
        compile_s = time.perf_counter() - t0
        grad_s = grad_mb = None
        if not args.no_grad:
            gfn = jax.jit(jax.grad(lambda s, x, t, im, boundary=boundary: soft.els_soft_x0(
                x, t, im, sigma=s, k_max=k, boundary=boundary).sum(), argnums=(0, 1)))
            gcompiled = gfn.lower(sigma, x, jnp.float32(0.5), images).compile()
            grad_mb = gcompiled.memory_analysis().temp_size_in_bytes / 2**20
            grad_s, _, _ = bm.time_calls(lambda: gcompiled(sigma, x, jnp.float32(0.5), images),
                                         budget=4.0, max_reps=3)
        for t in (0.05, 0.5):
            t_arr = jnp.float32(t)
            sec, best, reps = bm.time_calls(lambda: compiled(x, t_arr, sigma, images))
            print(json.dumps({
                "machine": f"els_soft {boundary}",
                "path": f"els_soft_x0 ({soft.resolve_engine('auto')})", "N": n,
                "C": 1, "k_max": k, "B": b, "t": t, "sigma": args.sigma,
                "time_s": round(sec, 5), "min_s": round(best, 5), "reps": reps,
                "pairs": pairs, "ns_per_pair": round(sec / pairs * 1e9, 4),
                "ns_per_pair_min": round(best / pairs * 1e9, 4),
                "matmul_s": round(mm_s, 5), "matmul_ns_per_pair": round(mm_s / pairs * 1e9, 4),
                "ratio_matmul": round(sec / mm_s, 2),
                "grad_s": None if grad_s is None else round(grad_s, 4),
                "grad_peak_temp_MB": None if grad_mb is None else round(grad_mb, 2),
                "peak_temp_MB": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 2),
                "compile_s": round(compile_s, 3)}), flush=True)
        if args.no_machine:
            continue
        xla_s = {}
        for engine in ("xla", "shiftmap"):      # the XLA bank first: the baseline of the ratio
            if engine == "shiftmap" and soft.resolve_engine("auto") != "shiftmap":
                continue
            t0 = time.perf_counter()
            machine = soft.make_soft_machine(np.asarray(images), sigmas=args.sigma, k_max=k,
                                             boundary=boundary, engine=engine)
            build_s = time.perf_counter() - t0
            compile_s = machine.compile(x)
            for t in (0.05, 0.5):
                t_arr = jnp.float32(t)
                sec, best, reps = bm.time_calls(lambda: machine.x0(x, t_arr, 0))
                if engine == "xla":
                    xla_s[t] = sec
                print(json.dumps({
                    "machine": f"els_soft {boundary}", "path": f"make_machine ({engine})",
                    "N": n, "C": 1, "k_max": k, "B": b, "t": t, "sigma": args.sigma,
                    "engine": machine.engine(0), "time_s": round(sec, 5),
                    "min_s": round(best, 5), "reps": reps, "pairs": pairs,
                    "ns_per_pair": round(sec / pairs * 1e9, 4),
                    "ns_per_pair_min": round(best / pairs * 1e9, 4),
                    "matmul_s": round(mm_s, 5), "ratio_matmul": round(sec / mm_s, 2),
                    "speedup_vs_xla_bank": round(xla_s[t] / sec, 2),
                    "build_s": round(build_s, 3), "compile_s": round(compile_s, 3)}), flush=True)
            del machine
    return 0


if __name__ == "__main__":
    sys.exit(main())

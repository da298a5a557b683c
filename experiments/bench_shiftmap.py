"""Benchmark of the shift-map engine (issue 23, docs/theory.md §9): the fused CPU kernel and its
plain-jnp form against the existing functional ELS machine, ns per existing (query pixel,
candidate) pair. Prints one JSON object per line; the first is the platform.

    python experiments/bench_shiftmap.py                     # N = 2000, everything below
    python experiments/bench_shiftmap.py --n 500 --k 3,11,27 --c 1 --boundary zeros

    python experiments/bench_shiftmap.py --pallas-n 100 --k 3 --c 1   # the Pallas kernel too
                                                 # (default on a GPU/TPU; interpreted on a CPU)

Workload: N synthetic images (uniform in [-1, 1]) of 32×32×C, C = 1 and 3; one query image
(B = 1) x = a·y_0 + b·ε at t (default 0.5, cosine schedule); patch sizes k = 3 … 27; ELS with
boundary "zeros" and "circular" (and "circular" with wrap_patches, ``--wrap``). Per row:

  pairs         existing (query pixel, candidate) pairs, counted from docs/theory.md §2's pair rule
                (``count_pairs``, independent of the engine's own plan): B × N × Σ per axis.
  seconds       median wall time of each engine, timed in alternation (``bench_machines.time_engines``);
                seconds_min the fastest call.
  ns_per_pair   seconds / pairs (the jnp form runs on --xla-n images, default 200, the Pallas
                kernel on --pallas-n, each normalised by its own pair count: cost is linear
                in N).
  baseline_*    the existing functional machine ``els_jax.els_x0(x, t, images, k=k,
                boundary=...)`` with its default engine, same run, same images: its time,
                ns/pair, and the kernel's speed-up over it.
  max_abs_diff  the largest |x̂_0| difference between the kernel and the baseline.
  loadavg       the 1-minute load average when the row finished (timings are wall clock
                on a shared machine: a load above the core count slows every engine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Engines timed in alternation, after an untimed call each: the machines' benchmark's method.
from bench_machines import time_engines as time_calls  # noqa: E402

import els_jax as ej
from els_jax.core import schedules
from els_jax.engines import native
from els_jax.engines import shiftmap as sm


def count_pairs(h: int, w: int, k: int, boundary: str, wrap_patches: bool) -> int:
    """(query pixel, candidate centre) pairs of one query image and one training image,
    straight from docs/theory.md §2: per axis of length n (m = k//2), "circular" pairs every query
    coordinate with every candidate centre in [m, n − m) (every centre with wrap_patches);
    "zeros" pairs a coordinate within m of a border only with itself and an interior one
    with every interior centre, and is LS (one candidate per coordinate) for k ≥ min(H, W).
    A pixel pair exists iff it exists along both axes, so the count is the product."""
    m = k // 2

    def per_axis(n):
        if boundary == "circular":
            return n * (n if wrap_patches else n - 2 * m)
        if k >= min(h, w):
            return n
        inner = n - 2 * m
        return (n - inner) + inner * inner

    return per_axis(h) * per_axis(w)


def cpu_row():
    flags, model = set(), platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    dev = jax.devices()[0]
    return {"platform": True, "cpu": model, "avx512f": "avx512f" in flags,
            "avx2": "avx2" in flags, "cores": os.cpu_count(),
            "device_kind": dev.device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "kernel_built": native.available(),
            "kernel_arch": os.environ.get("ELS_JAX_NATIVE_ARCH", "native"),
            "loadavg": round(os.getloadavg()[0], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="training images")
    parser.add_argument("--xla-n", type=int, default=200,
                        help="training images for the jnp form (0: skip it)")
    parser.add_argument("--k", default="3,5,7,9,11,15,21,27")
    parser.add_argument("--c", default="1,3", help="channels")
    parser.add_argument("--boundary", default="zeros,circular")
    parser.add_argument("--wrap", action="store_true", help="also circular with wrap_patches")
    parser.add_argument("--pallas-n", type=int, default=-1,
                        help="training images for the Pallas kernel (default: --n on a GPU/TPU, "
                             "skipped on the CPU, where it runs only in the interpreter)")
    parser.add_argument("--t", type=float, default=0.5)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per engine")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.pallas_n < 0:
        args.pallas_n = 0 if jax.default_backend() == "cpu" else args.n
    print(json.dumps(cpu_row()), flush=True)

    h = w = 32
    a, b2, _ = schedules.coefficients(jnp.float32(args.t), schedules.Cosine())
    a, b2 = float(a), float(b2)
    variants = [(bd, False) for bd in args.boundary.split(",")]
    if args.wrap:
        variants.append(("circular", True))
    for c in (int(v) for v in args.c.split(",")):
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.uniform(-1, 1, (args.n, h, w, c)), jnp.float32)
        x = jnp.asarray(a * np.asarray(images[:1]) + np.sqrt(b2) * rng.normal(size=(1, h, w, c)),
                        jnp.float32)
        t = jnp.float32(args.t)
        xla_images = images[:max(1, min(args.n, args.xla_n))]
        pallas_images = images[:max(1, min(args.n, args.pallas_n))]
        for boundary, wrap in variants:
            for k in (int(v) for v in args.k.split(",")):
                pairs = count_pairs(h, w, k, boundary, wrap)
                kw = dict(k=k, boundary=boundary, wrap_patches=wrap)
                fns, n_of = {}, {}
                # The images are arguments, not constants of the compiled program (XLA would
                # spend seconds constant-folding the machines' precomputations).
                if native.available():
                    fns["shiftmap_kernel"] = (jax.jit(
                        lambda x, imgs, kw=kw: sm.shiftmap_x0(x, a, b2, imgs, engine="kernel",
                                                              **kw)), images)
                if args.xla_n > 0:
                    fns["shiftmap_xla"] = (jax.jit(
                        lambda x, imgs, kw=kw: sm.shiftmap_x0(x, a, b2, imgs, engine="xla",
                                                              **kw)), xla_images)
                if args.pallas_n > 0:
                    fns["shiftmap_pallas"] = (jax.jit(
                        lambda x, imgs, kw=kw: sm.shiftmap_x0(x, a, b2, imgs, engine="pallas",
                                                              **kw)), pallas_images)
                if not args.no_baseline:
                    fns["baseline_els_x0"] = (jax.jit(
                        lambda x, imgs, kw=kw: ej.els_x0(x, t, imgs, **kw)), images)
                n_of = {name: int(imgs.shape[0]) for name, (_, imgs) in fns.items()}
                outs = {name: np.asarray(f(x, imgs)) for name, (f, imgs) in fns.items()}
                timed = time_calls({name: (lambda f=f, imgs=imgs: f(x, imgs))
                                    for name, (f, imgs) in fns.items()},
                                   budget=args.budget, max_reps=args.reps)
                workload = (f"ELS {boundary}{' wrap_patches' if wrap else ''}, synthetic "
                            f"N={args.n}, 32x32x{c}, B=1, t={args.t}")
                base = timed.get("baseline_els_x0")
                for name, (med, best, reps) in timed.items():
                    if name == "baseline_els_x0":
                        continue
                    p = pairs * n_of[name]
                    row = {"workload": workload, "engine": name, "k": k, "C": c,
                           "boundary": boundary, "wrap_patches": wrap, "n_images": n_of[name],
                           "pairs": p, "seconds": round(med, 4), "seconds_min": round(best, 4),
                           "reps": reps, "ns_per_pair": round(med / p * 1e9, 4),
                           "ns_per_pair_min": round(best / p * 1e9, 4)}
                    if base is not None:
                        bp = pairs * args.n
                        row.update({"baseline": "els_jax.els_x0 (default engine)",
                                    "baseline_seconds": round(base[0], 4),
                                    "baseline_ns_per_pair": round(base[0] / bp * 1e9, 4),
                                    "speedup_vs_baseline": round(
                                        (base[0] / bp) / (med / p), 2)})
                        if n_of[name] == args.n:
                            row["max_abs_diff"] = float(
                                np.abs(outs[name] - outs["baseline_els_x0"]).max())
                    row["loadavg"] = round(os.getloadavg()[0], 2)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

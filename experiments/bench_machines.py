"""Benchmark of the analytic machines (issue 3). Prints one JSON object per line.

    python experiments/bench_machines.py                  # full grid (~8 min on 2 cores)
    python experiments/bench_machines.py --quick          # a small subset (~1 min)
    python experiments/bench_machines.py --host-devices 2  # the CPU as 2 XLA devices, candidates split
    python experiments/bench_machines.py --out runs/bench_machines.jsonl
    python experiments/bench_machines.py --table runs/bench_machines.jsonl   # Markdown summary

Workloads: random images in [−1, 1], N ∈ {1000, 4000} of 32×32×1 and N = 1000 of 32×32×3;
machines IS, LS, ELS circular, ELS zeros; k ∈ {3, 7, 11}; B ∈ {1, 8}; t ∈ {0.05, 0.5}.

Each machine is measured as users call it: ``make_machine`` builds the bank once (its time is
``build_s``), the x̂_0 computation is compiled ahead of time (``machine.lower(...).compile()``,
``compile_s``; XLA keeps the executable, so the calls below only trace once), then
``machine.x0(x, t, i)`` is called with ``block_until_ready``: ``time_s`` is the median of the
calls (one call when a call takes over 2 s). Per row:

  pairs          (query pixel × candidate) pairs of the machine: IS and LS B·H·W·N; ELS the
                 pairs of its layout (circular: B·H·W·N·(H−k+1)(W−k+1)).
  ns_per_pair    time_s / pairs.
  exp_s          a bare jitted ``jnp.exp`` over the same number of elements, in the same run
                 (measured over min(pairs, 2^27) elements in 4 MiB blocks, scaled linearly).
  matmul_s       a bare jitted ``jnp.matmul`` of the naive shape [B·H·W, k²C] × [k²C, pairs /
                 (B·H·W)] (IS: [B, H·W·C] × [H·W·C, N]), measured and scaled the same way.
  ratio_exp, ratio_matmul   time_s / exp_s, time_s / matmul_s (the two roofline ratios).
  peak_temp_MB   XLA's temporary buffers for the call (compiled memory_analysis; the fused CPU
                 kernels' own scratch, a few MB independent of N, is not included).
  engine, bank   the exact engine the machine picked ("window" | "row" | "native", the fused
                 CPU kernel of the zero-padded interior; LS: "local", its kernel on CPU) and
                 whether the machine precomputed a bank (every machine does when the bank fits
                 ``make_machine(bank_bytes=...)``, 2 GiB by default; identical windows are
                 merged only when that removes ≥ 10 % of them, which random images never do).

A few rows time the pure functional path ``ej.els_score(x, t, images, k=...)`` (candidates
streamed from the images, no bank; engine chosen the same way). The last row is one whole
20-step ELS sample (zero padding, N = 1000, 32×32×1, the MNIST ResNet scales of SPEC §5):
banks built and every patch size compiled (overlapped, ``make_machine(compile_for=x_T)``),
then the first and a second sample timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import els_jax as ej
from els_jax import els

H = W = 32
SAMPLE_SCALES = [3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15]
_BLOCK = 1 << 20            # baseline block: 4 MiB of float32
_BASELINE_MAX = 1 << 27     # elements (or outputs) actually computed per baseline
_MESH = None                # --host-devices: every machine's candidates split over a mesh


def _images(n, c, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, H, W, c)).astype(np.float32)


def _queries(b, c, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, H, W, c)), jnp.float32)


def els_pairs(k, boundary, n, b):
    """Valid (query pixel, candidate) pairs of the ELS layout."""
    per_image = sum(gp.query_pixels.size * gp.cand_pixels.shape[1]
                    for ps in els.layout(k, boundary, False, H, W) for gp in els._grouped(ps))
    return b * n * per_image


@functools.partial(jax.jit, static_argnames=("reps",))
def _exp_loop(block, *, reps):
    return jax.lax.fori_loop(0, reps, lambda i, y: jnp.exp(y * -0.5), block)


@functools.partial(jax.jit, static_argnames=("reps", "cols"))
def _matmul_loop(q, keys, *, reps, cols):
    def body(i, out):
        kb = jax.lax.dynamic_slice_in_dim(keys, (i % 4) * cols, cols, axis=1)
        return jnp.matmul(q, kb, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.fori_loop(0, reps, body, jnp.zeros((q.shape[0], cols), jnp.float32))


def _timed(fn, *args):
    jax.block_until_ready(fn(*args))                     # compile
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def exp_seconds(elements):
    """Seconds for a bare jitted exp over ``elements`` floats (cache-sized blocks)."""
    reps = max(1, min(elements, _BASELINE_MAX) // _BLOCK)
    block = jnp.linspace(0.0, 1.0, _BLOCK, dtype=jnp.float32)
    return _timed(functools.partial(_exp_loop, reps=reps), block) * elements / (reps * _BLOCK)


def matmul_seconds(rows, depth, cols_total):
    """Seconds for a bare jitted matmul [rows, depth] × [depth, cols_total] (column blocks)."""
    cols = min(cols_total, max(64, _BLOCK // rows), max(1, _BLOCK // depth))
    reps = max(1, min(cols_total, _BASELINE_MAX // rows) // cols)
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(rows, depth)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(depth, 4 * cols)), jnp.float32)
    t = _timed(functools.partial(_matmul_loop, reps=reps, cols=cols), q, keys)
    return t * cols_total / (reps * cols)


def time_calls(call, budget=2.0, max_reps=9, warmup=0.3):
    """(median, min, reps) wall time of ``call()`` (blocking). A first call over ``budget``
    seconds is the measurement (one rep). Otherwise calls are repeated for ``warmup`` seconds
    (at least 3 calls: the first few calls of a compiled computation run 1.5–2× slower while
    its buffers are first touched), then timed until ``max_reps`` or ``budget``."""
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - t0
    if first > budget:
        return first, first, 1
    start, warm = time.perf_counter(), 1
    while warm < 3 or time.perf_counter() - start < warmup:
        jax.block_until_ready(call())
        warm += 1
    times = []
    while len(times) < max_reps and sum(times) < budget:
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times)), len(times)


def _emit(row, out):
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def bench_machine(kind, images, *, k, boundary, batches, times, out, label):
    n, _, _, c = images.shape
    start = time.perf_counter()
    if kind == "ideal":
        machine = ej.make_machine("ideal", images, mesh=_MESH)
    elif kind == "local":
        machine = ej.make_machine("local", images, scales=k, mesh=_MESH)
    else:
        machine = ej.make_machine("els", images, scales=k, boundary=boundary, mesh=_MESH)
    build_s = time.perf_counter() - start
    info = machine.engine(0)
    for b in batches:
        x = _queries(b, c)
        t0 = time.perf_counter()
        compiled = machine.lower(x, jnp.float32(times[0]), 0).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if kind in ("ideal", "local"):
            pairs = b * H * W * n
        else:
            pairs = els_pairs(k, boundary, n, b)
        if kind == "ideal":
            mm_rows, mm_depth, mm_cols = b, H * W * c, n
        else:
            mm_rows, mm_depth = b * H * W, k * k * c
            mm_cols = max(1, pairs // mm_rows)
        exp_s = exp_seconds(pairs)
        mm_s = matmul_seconds(mm_rows, mm_depth, mm_cols)
        for t in times:
            t_arr = jnp.float32(t)
            sec, best, reps = time_calls(lambda: machine.x0(x, t_arr, 0))
            _emit({
                "machine": label, "path": "Machine.x0", "N": n, "C": c,
                "k": None if kind == "ideal" else k, "B": b, "t": t,
                "engine": info.get("engine"), "bank": info.get("bank"),
                "unique_fraction": info.get("unique_fraction"),
                "time_s": round(sec, 5), "min_s": round(best, 5), "reps": reps, "pairs": pairs,
                "ns_per_pair": round(sec / pairs * 1e9, 4),
                "ns_per_pair_min": round(best / pairs * 1e9, 4),
                "exp_s": round(exp_s, 5), "ratio_exp": round(sec / exp_s, 2),
                "matmul_s": round(mm_s, 5), "ratio_matmul": round(sec / mm_s, 2),
                "peak_temp_MB": round(mem.temp_size_in_bytes / 2 ** 20, 2),
                "build_s": round(build_s, 3), "compile_s": round(compile_s, 3),
                "backend": jax.default_backend(), "devices": jax.device_count(),
            }, out)


def bench_functional(images, *, k, boundary, b, t, out):
    """The pure functional path: ej.els_score straight from the images (no bank)."""
    n, _, _, c = images.shape
    x = _queries(b, c)
    images_j = jnp.asarray(images)
    fn = jax.jit(functools.partial(ej.els_score, k=k, boundary=boundary))
    t0 = time.perf_counter()
    compiled = fn.lower(x, jnp.float32(t), images_j).compile()
    compile_s = time.perf_counter() - t0
    sec, _, reps = time_calls(lambda: fn(x, jnp.float32(t), images_j))
    pairs = els_pairs(k, boundary, n, b)
    _emit({"machine": f"ELS {boundary}", "path": "els_score (functional, streamed)", "N": n,
           "C": c, "k": k, "B": b, "t": t, "engine": els.choose_method(k, c, H, boundary),
           "time_s": round(sec, 5), "reps": reps, "pairs": pairs,
           "ns_per_pair": round(sec / pairs * 1e9, 4),
           "peak_temp_MB": round(compiled.memory_analysis().temp_size_in_bytes / 2 ** 20, 2),
           "compile_s": round(compile_s, 3)}, out)


def bench_sample(out, n=1000, batch=1):
    images = _images(n, 1)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (batch, H, W, 1))
    grid = ej.uniform_times(len(SAMPLE_SCALES))
    t0 = time.perf_counter()
    # Banks and compilation of every patch size, overlapped (compile_for): what a user runs.
    machine = ej.make_machine("els", images, scales=SAMPLE_SCALES, boundary="zeros", mesh=_MESH,
                              compile_for=x_T)
    build_s = time.perf_counter() - t0
    recompile_s = machine.compile(x_T, grid[0])     # ~0: XLA already holds the executables
    engines = {}
    for i in range(len(SAMPLE_SCALES)):
        info = machine.engine(i)
        engines[machine.patch_size(i)] = info["engine"] + ("+bank" if info["bank"] else "")
    t0 = time.perf_counter()
    jax.block_until_ready(ej.sample(machine, x_T, grid))
    first_s = time.perf_counter() - t0              # incl. any compile the sampler still needs
    t0 = time.perf_counter()
    x0 = jax.block_until_ready(ej.sample(machine, x_T, grid))
    sample_s = time.perf_counter() - t0
    pairs = sum(els_pairs(machine.patch_size(i), "zeros", n, batch)
                for i in range(len(SAMPLE_SCALES)))
    _emit({"machine": "ELS zeros", "path": "ej.sample, 20 DDIM steps", "N": n, "C": 1,
           "B": batch, "scales": SAMPLE_SCALES, "engine_per_k": engines,
           "build_and_compile_s": round(build_s, 3), "recompile_s": round(recompile_s, 3),
           "first_sample_s": round(first_s, 3), "sample_s": round(sample_s, 3),
           "total_s": round(build_s + first_s, 3), "pairs": pairs,
           "ns_per_pair": round(sample_s / pairs * 1e9, 4),
           "finite": bool(np.all(np.isfinite(np.asarray(x0))))}, out)


def table(path):
    """A Markdown summary of a JSON-lines file written with ``--out``: one row per machine,
    workload, k and B (both t), and the 20-step sample."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    merged = {}
    for r in rows:
        if r.get("path") != "Machine.x0":
            continue
        key = (r["machine"], r["N"], r["C"], r["k"], r["B"])
        merged.setdefault(key, []).append(r)
    lines = ["| machine | N×C | k | B | engine | ns/pair (t=0.05 / 0.5) | × bare exp | × naive matmul"
             " | peak temp MB |", "|---|---|---|---|---|---|---|---|---|"]
    order = {"IS": 0, "LS": 1, "ELS circular": 2, "ELS zeros": 3}
    for (machine, n, c, k, b), rs in sorted(
            merged.items(), key=lambda kv: (kv[0][1] * 10 if kv[0][2] == 1 else 10 ** 9,
                                            kv[0][3] or 0, order.get(kv[0][0], 9), kv[0][4])):
        rs = sorted(rs, key=lambda r: r["t"])
        ns = " / ".join(f"{r['ns_per_pair']:.2f}" for r in rs)
        ratio_exp = max(r["ratio_exp"] for r in rs)
        ratio_mm = max(r["ratio_matmul"] for r in rs)
        lines.append(f"| {machine} | {n}×{c} | {k if k is not None else '–'} | {b} | "
                     f"{rs[0]['engine']} | {ns} | {ratio_exp:.1f} | {ratio_mm:.2f} | "
                     f"{max(r['peak_temp_MB'] for r in rs):.1f} |")
    for r in rows:
        if r.get("path", "").startswith("els_score"):
            lines.append(f"\nfunctional `els_score` ({r['machine']}, k={r['k']}, N={r['N']}, "
                         f"B={r['B']}): {r['ns_per_pair']:.2f} ns/pair, engine {r['engine']}, "
                         f"peak temp {r['peak_temp_MB']:.1f} MB")
        if r.get("path", "").startswith("ej.sample"):
            lines.append(f"\n20-step ELS sample (zeros, N={r['N']}, 32×32×1, MNIST ResNet scales): "
                         f"sampling {r['sample_s']:.1f} s ({r['ns_per_pair']:.2f} ns/pair), banks "
                         f"and compilation (overlapped) {r['build_and_compile_s']:.1f} s, first "
                         f"sample {r['first_sample_s']:.1f} s, from scratch {r['total_s']:.1f} s, "
                         f"engines {r['engine_per_k']}, finite: {r['finite']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (~2 min)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--no-sample", action="store_true", help="skip the 20-step sample")
    parser.add_argument("--sample-only", action="store_true", help="only the 20-step sample")
    parser.add_argument("--only", help="comma-separated machines to run: IS, LS, ELS "
                        "(both boundaries), e.g. --only LS")
    parser.add_argument("--host-devices", type=int, default=1, metavar="N",
                        help="split the CPU into N XLA devices and every machine's candidates "
                        "over them (make_machine(mesh=candidate_mesh())): on XLA:CPU one "
                        "device does not keep 2 cores busy through the engines' unfused "
                        "passes, N devices run their shares side by side")
    parser.add_argument("--table", metavar="JSONL", help="print a Markdown summary of a file "
                        "written with --out, and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.host_devices > 1:
        global _MESH
        # XLA reads its flags when the backend starts (the first jax call), not at import.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.host_devices}")
        if jax.device_count() != args.host_devices:
            raise SystemExit(f"--host-devices {args.host_devices}: JAX already started with "
                             f"{jax.device_count()} devices")
        _MESH = ej.candidate_mesh()
    out = open(args.out, "a") if args.out else None
    if args.quick:
        workloads, ks, batches, times = [(1000, 1)], (3, 11), (1,), (0.5,)
        functional = [(3, "circular"), (11, "circular")]
    else:
        workloads, ks, batches, times = [(1000, 1), (4000, 1), (1000, 3)], (3, 7, 11), (1, 8), \
            (0.05, 0.5)
        functional = [(k, bd) for bd in ("circular", "zeros") for k in ks]
    only = set(args.only.split(",")) if args.only else {"IS", "LS", "ELS"}
    if not args.sample_only:
        for n, c in workloads:
            images = _images(n, c)
            if "IS" in only:
                bench_machine("ideal", images, k=None, boundary=None, batches=batches,
                              times=times, out=out, label="IS")
            for k in ks:
                if "LS" in only:
                    bench_machine("local", images, k=k, boundary=None, batches=batches,
                                  times=times, out=out, label="LS")
                for boundary in ("circular", "zeros") if "ELS" in only else ():
                    bench_machine("els", images, k=k, boundary=boundary, batches=batches,
                                  times=times, out=out, label=f"ELS {boundary}")
        images = _images(1000, 1)
        for k, boundary in functional if "ELS" in only else ():
            bench_functional(images, k=k, boundary=boundary, b=1, t=0.5, out=out)
    if not args.no_sample and "ELS" in only:
        bench_sample(out)
    if out is not None:
        out.close()


if __name__ == "__main__":
    sys.exit(main())

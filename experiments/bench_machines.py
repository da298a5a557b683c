"""Benchmark of the analytic machines (issue 3). Prints one JSON object per line.

    python experiments/bench_machines.py                  # full grid (~30+ min on 2 cores)
    python experiments/bench_machines.py --quick          # a small subset (~5 min)
    python experiments/bench_machines.py --host-devices 2  # the CPU as 2 XLA devices, candidates split
    python experiments/bench_machines.py --out runs/bench_machines.jsonl
    python experiments/bench_machines.py --table runs/bench_machines.jsonl   # Markdown summary

Workloads: random images in [−1, 1], N ∈ {1000, 4000} of 32×32×1 and N = 1000 of 32×32×3;
machines IS, LS, ELS circular, ELS zeros, and docs/theory.md §7's Gaussian (Wiener) and PCA-locality
(τ = 0.02); k ∈ {3, 7, 11}; B ∈ {1, 8}; t ∈ {0.05, 0.5}.

Each machine is measured as users call it: ``make_machine`` builds the bank once (its time is
``build_s``), the x̂_0 computation is compiled ahead of time (``machine.lower(...).compile()``,
``compile_s``; XLA keeps the executable, so the calls below only trace once), then
``machine.x0(x, t, i)`` is called with ``block_until_ready``: ``time_s`` is the median of the
calls (one call when a call takes over 2 s). Per row:

  pairs          (query pixel × candidate) pairs of the machine: IS, LS and PCA-locality
                 B·H·W·N; ELS the pairs of its layout (circular: B·H·W·N·(H−k+1)(W−k+1));
                 Gaussian (no candidates, cost independent of N): B·H·W query pixels.
  ns_per_pair    time_s / pairs.
  exp_s          a bare jitted ``jnp.exp`` over the same number of elements, in the same run
                 (measured over min(pairs, 2^27) elements in 4 MiB blocks, scaled linearly).
  matmul_s       a bare jitted ``jnp.matmul`` of the naive shape [B·H·W, k²C] × [k²C, pairs /
                 (B·H·W)] (IS: [B, H·W·C] × [H·W·C, N]; PCA-locality the masked distances,
                 D = H·W·C: [D, D] × [D, B·N]; Gaussian: [B, D] × [D, 2·min(N, D)]), measured
                 and scaled the same way.
  ratio_exp, ratio_matmul   time_s / exp_s, time_s / matmul_s (the two roofline ratios).
  peak_temp_MB   XLA's temporary buffers for the call (compiled memory_analysis; the fused CPU
                 kernels' own scratch, a few MB independent of N, is not included).
  engine, bank   the exact engine the default machine (method "auto") runs ("window" |
                 "row" | "native", the fused CPU kernel of the zero-padded interior; LS:
                 "kernel" | "xla") and whether it precomputed a bank (every machine does when
                 the bank fits ``make_machine(bank_bytes=...)``, 2 GiB by default; identical
                 windows are merged only when that removes ≥ 10 % of them, which random
                 images never do); reason: why (``Machine.explain()``: measured probe times,
                 cached or not, or the static rule; ``els_jax.engines``).
  engine_times_s the median call of the same machine on every exact engine (``method=``),
                 timed in alternation with the default; best_engine, best_time_s,
                 best_ns_per_pair the fastest of them; default_vs_best = time_s / best_time_s
                 (default_vs_best_min: the same ratio of the fastest calls). Not with
                 --host-devices: a machine split over a mesh keeps the static rule and is
                 timed alone.

The first row describes the platform: CPU model, SIMD flags and cores (or the device kind),
XLA_FLAGS, jax version, the kernel's source hash and whether it was built, engine
autotuning on or off (``ELS_JAX_AUTOTUNE``); ``--table`` prints it above the table.

A few rows time the pure functional path ``ej.els_score(x, t, images, k=...)`` (candidates
streamed from the images, no bank; engine chosen the same way). The last row is one whole
20-step ELS sample (zero padding, N = 1000, 32×32×1, the MNIST ResNet scales of docs/theory.md §5):
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
from els_jax.engines import layout as els_layout, select as engines, native
from els_jax.engines import autotune as engines_lib

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
                    for ps in els_layout.layout(k, boundary, False, H, W)
                    for gp in els_layout.group_pass(ps))
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


def time_engines(calls, budget=2.0, max_reps=9):
    """{name: (median, min, reps)} of blocking zero-argument calls timed in alternation (one
    call of each per round, so that a change in the machine's load hits every engine alike),
    after an untimed call each (compilation, first touch of the buffers) and, for short calls,
    ``time_calls``' warm-up. At least two timed rounds (one when a call takes over ``budget``
    seconds), then rounds until ``max_reps`` or ``budget`` seconds per engine."""
    first = {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        first[name] = time.perf_counter() - t0
    slow = max(first.values()) > budget
    if not slow:
        start = time.perf_counter()
        while time.perf_counter() - start < 0.3 * len(calls):
            for call in calls.values():
                jax.block_until_ready(call())
    times = {name: [] for name in calls}
    while True:
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t0)
        reps = len(times[name])
        spent = max(sum(v) for v in times.values())
        if reps >= max_reps or (reps >= (1 if slow else 2) and spent >= budget):
            break
    return {name: (float(np.median(v)), float(np.min(v)), len(v)) for name, v in times.items()}


def platform_row():
    """What the timings depend on: CPU model, SIMD flags and cores (or the device kind),
    XLA_FLAGS, jax version, the kernel (source hash, built or not), engine autotuning."""
    sig = engines_lib.platform_signature()
    return {"platform": True, "backend": sig["backend"], "devices": sig["devices"],
            "cpu": sig.get("cpu"), "simd": sig.get("simd"), "cores": sig.get("cores"),
            "device_kind": sig.get("device_kind"), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": sig["jax"], "kernel_source": sig["kernel"], "kernel_built": native.available(),
            "kernel_arch": sig["native_arch"],
            "autotune": engines_lib.autotune_enabled(),
            "engine_cache": str(engines_lib.cache_file())}


def platform_line(r):
    return (f"CPU: {r.get('cpu') or r.get('device_kind')} ({r['backend']}, {r['devices']} "
            f"device(s), {r.get('cores')} cores), SIMD: {' '.join(r.get('simd') or []) or '–'}; "
            f"XLA_FLAGS: {r['xla_flags']!r}; jax {r['jax']}; kernel built: "
            f"{r['kernel_built']} (-march={r.get('kernel_arch', 'native')}); engine autotuning: {'on' if r['autotune'] else 'off'}")


def _other_engines(kind, k, boundary, n, c, default):
    """The exact engines of a machine besides its default one (what "best" is taken over):
    ELS window / row (and the fused kernels: the window bank's, and the interior's for a
    banked zero-padded machine), LS kernel / XLA."""
    if kind == "local" and native.available() and jax.default_backend() == "cpu":
        return ["kernel", "xla"]            # (LS picks its engine per batch)
    if kind != "els" or _MESH is not None:
        return []
    out = ["window", "row", "shiftmap"]
    if engines.native_window_ok():
        out.append("window_native")
    if engines.native_interior_ok(k, H, W, boundary):
        out.append("native")
    return [e for e in out if e != default]


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
    elif kind in ("gaussian", "pca_locality"):      # docs/theory.md §7 families: one device
        machine = ej.make_machine(kind, images)
    elif kind == "local":
        machine = ej.make_machine("local", images, scales=k, mesh=_MESH)
    else:
        machine = ej.make_machine("els", images, scales=k, boundary=boundary, mesh=_MESH)
    build_s = time.perf_counter() - start
    info = machine.engine(0)
    why = machine.explain()[machine.patch_size(0)]
    # The same machine on each other exact engine (method=...): the default is compared with
    # the best of them, timed in alternation with it.
    others = {}
    for engine in _other_engines(kind, k, boundary, n, c, why["engine"]):
        kw = dict(scales=k, mesh=_MESH, method=engine)
        others[engine] = (ej.make_machine("local", images, **kw) if kind == "local" else
                          ej.make_machine("els", images, boundary=boundary, **kw))
    for b in batches:
        x = _queries(b, c)
        t0 = time.perf_counter()
        compiled = machine.lower(x, jnp.float32(times[0]), 0).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        for other in others.values():
            other.compile(x, times[0])
        default = why["engine"]
        if kind == "local":                 # LS picks its engine per batch when traced
            default = engines.resolve_local_engine("auto", k=k, c=c, h=H, w=W, n=n, batch=b).engine
        others_b = {e: m for e, m in others.items() if e != default}
        if kind in ("ideal", "local", "pca_locality"):
            pairs = b * H * W * n
        elif kind == "gaussian":
            pairs = b * H * W
        else:
            pairs = els_pairs(k, boundary, n, b)
        if kind == "ideal":
            mm_rows, mm_depth, mm_cols = b, H * W * c, n
        elif kind == "pca_locality":
            mm_rows, mm_depth, mm_cols = H * W * c, H * W * c, b * n
        elif kind == "gaussian":
            mm_rows, mm_depth, mm_cols = b, H * W * c, 2 * min(n, H * W * c)
        else:
            mm_rows, mm_depth = b * H * W, k * k * c
            mm_cols = max(1, pairs // mm_rows)
        exp_s = exp_seconds(pairs)
        mm_s = matmul_seconds(mm_rows, mm_depth, mm_cols)
        for t in times:
            t_arr = jnp.float32(t)
            calls = {default: lambda: machine.x0(x, t_arr, 0)}
            calls.update({e: functools.partial(m.x0, x, t_arr, 0) for e, m in others_b.items()
                          if e not in calls})
            timed = time_engines(calls)
            sec, best, reps = timed[default]
            fastest = min(timed, key=lambda e: timed[e][0])
            _emit({
                "machine": label, "path": "Machine.x0", "N": n, "C": c,
                "k": None if kind == "ideal" else k, "B": b, "t": t,
                "engine": default, "bank": info.get("bank"),
                "unique_fraction": info.get("unique_fraction"),
                "reason": why.get("reason"),
                "engine_times_s": {e: round(v[0], 5) for e, v in timed.items()},
                "best_engine": fastest, "best_time_s": round(timed[fastest][0], 5),
                "best_ns_per_pair": round(timed[fastest][0] / pairs * 1e9, 4),
                "default_vs_best": round(sec / timed[fastest][0], 3),
                "default_vs_best_min": round(best / min(v[1] for v in timed.values()), 3),
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
    choice = engines.resolve_els_engine("auto", k, c, H, boundary, w=W, n=n, batch=b)
    calls = {choice.engine: lambda: fn(x, jnp.float32(t), images_j)}
    for engine in ("window", "row", "shiftmap"):
        if engine not in calls:
            other = jax.jit(functools.partial(ej.els_score, k=k, boundary=boundary,
                                              method=engine))
            calls[engine] = functools.partial(other, x, jnp.float32(t), images_j)
    timed = time_engines(calls)
    sec, _, reps = timed[choice.engine]
    fastest = min(timed, key=lambda e: timed[e][0])
    pairs = els_pairs(k, boundary, n, b)
    _emit({"machine": f"ELS {boundary}", "path": "els_score (functional, streamed)", "N": n,
           "C": c, "k": k, "B": b, "t": t, "engine": choice.engine, "reason": choice.reason,
           "engine_times_s": {e: round(v[0], 5) for e, v in timed.items()},
           "best_engine": fastest, "best_time_s": round(timed[fastest][0], 5),
           "best_ns_per_pair": round(timed[fastest][0] / pairs * 1e9, 4),
           "default_vs_best": round(sec / timed[fastest][0], 3),
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
    engines, reasons = {}, {}
    for k, info in sorted(machine.explain().items()):
        engines[k] = info["engine"] + ("+bank" if info["bank"] else "")
        reasons[k] = info["reason"]
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
           "reason_per_k": reasons,
           "build_and_compile_s": round(build_s, 3), "recompile_s": round(recompile_s, 3),
           "first_sample_s": round(first_s, 3), "sample_s": round(sample_s, 3),
           "total_s": round(build_s + first_s, 3), "pairs": pairs,
           "ns_per_pair": round(sample_s / pairs * 1e9, 4),
           "finite": bool(np.all(np.isfinite(np.asarray(x0))))}, out)


def table(path):
    """A Markdown summary of a JSON-lines file written with ``--out``: one row per machine,
    workload, k and B (both t), and the 20-step sample."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    platforms = [platform_line(r) for r in rows if r.get("platform")]
    merged = {}
    for r in rows:
        if r.get("path") != "Machine.x0":
            continue
        key = (r["machine"], r["N"], r["C"], r["k"], r["B"])
        merged.setdefault(key, []).append(r)
    lines = [p + "\n" for p in dict.fromkeys(platforms)]
    lines += ["| machine | N×C | k | B | default engine | ns/pair (t=0.05 / 0.5) | best engine, "
              "ns/pair | default / best | × bare exp | × naive matmul | peak temp MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"IS": 0, "Gaussian": 0.3, "PCA-locality": 0.6, "LS": 1, "ELS circular": 2,
             "ELS zeros": 3}
    for (machine, n, c, k, b), rs in sorted(
            merged.items(), key=lambda kv: (kv[0][1] * 10 if kv[0][2] == 1 else 10 ** 9,
                                            kv[0][3] or 0, order.get(kv[0][0], 9), kv[0][4])):
        rs = sorted(rs, key=lambda r: r["t"])
        ns = " / ".join(f"{r['ns_per_pair']:.2f}" for r in rs)
        ratio_exp = max(r["ratio_exp"] for r in rs)
        ratio_mm = max(r["ratio_matmul"] for r in rs)
        best = " / ".join(f"{r.get('best_engine', r['engine'])} "
                          f"{r.get('best_ns_per_pair', r['ns_per_pair']):.2f}" for r in rs)
        vs = max(r.get("default_vs_best", 1.0) for r in rs)
        lines.append(f"| {machine} | {n}×{c} | {k if k is not None else '–'} | {b} | "
                     f"{rs[0]['engine']} | {ns} | {best} | {vs:.2f} | {ratio_exp:.1f} | "
                     f"{ratio_mm:.2f} | {max(r['peak_temp_MB'] for r in rs):.1f} |")
    for r in rows:
        if r.get("path", "").startswith("els_score"):
            lines.append(f"\nfunctional `els_score` ({r['machine']}, k={r['k']}, N={r['N']}, "
                         f"B={r['B']}): {r['ns_per_pair']:.2f} ns/pair, engine {r['engine']}"
                         f" (best {r.get('best_engine', r['engine'])} "
                         f"{r.get('best_ns_per_pair', r['ns_per_pair']):.2f}), "
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
    parser.add_argument("--quick", action="store_true", help="a small subset (~5 min)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--no-sample", action="store_true", help="skip the 20-step sample")
    parser.add_argument("--sample-only", action="store_true", help="only the 20-step sample")
    parser.add_argument("--only", help="comma-separated machines to run: IS, LS, ELS "
                        "(both boundaries), GAUSS, PCA, e.g. --only LS")
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
    _emit(platform_row(), out)
    if args.quick:
        workloads, ks, batches, times = [(1000, 1)], (3, 11), (1,), (0.5,)
        functional = [(3, "circular"), (11, "circular")]
    else:
        workloads, ks, batches, times = [(1000, 1), (4000, 1), (1000, 3)], (3, 7, 11), (1, 8), \
            (0.05, 0.5)
        functional = [(k, bd) for bd in ("circular", "zeros") for k in ks]
    only = set(args.only.split(",")) if args.only else {"IS", "GAUSS", "PCA", "LS", "ELS"}
    if not args.sample_only:
        for n, c in workloads:
            images = _images(n, c)
            if "IS" in only:
                bench_machine("ideal", images, k=None, boundary=None, batches=batches,
                              times=times, out=out, label="IS")
            for kind, name, label in (("gaussian", "GAUSS", "Gaussian"),
                                      ("pca_locality", "PCA", "PCA-locality")):
                if name in only and _MESH is None:
                    bench_machine(kind, images, k=None, boundary=None, batches=batches,
                                  times=times, out=out, label=label)
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

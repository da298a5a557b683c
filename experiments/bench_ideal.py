"""Benchmark of the ideal score machine (issue 2). Prints one JSON line per workload.

    python experiments/bench_ideal.py

Workloads: N = 1797 embedded digits (8×8×1) and N = 10 000 random 32×32×1 images, B = 8
queries, t = 0.5. For each: median time per call of ``ej.ideal_score`` (streamed, chunked);
the same-run time of (a) a bare ``jnp.matmul`` [B, D] × [D, N] — the unavoidable work, and
(b) the naive dense computation (all N distances and one softmax at once); and the peak
temporary memory XLA allocates for each (compiled memory analysis), so "memory independent
of N" is a number.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import els_jax as ej


def _median_time(fn, *args, repeats=7):
    jax.block_until_ready(fn(*args))                       # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _temp_bytes(jitted, *args):
    try:
        return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def naive_ideal_score(x, t, images):
    """All distances at once, no streaming: [B, N] logits, one softmax."""
    a2 = ej.schedules.cosine().alpha_bar(t)
    a, b2 = jnp.sqrt(a2), 1.0 - a2
    xf, cf = x.reshape(x.shape[0], -1), images.reshape(images.shape[0], -1)
    d2 = jnp.sum((xf[:, None, :] - a * cf[None, :, :]) ** 2, axis=-1)
    w = jax.nn.softmax(-d2 / (2 * b2), axis=-1)
    x0 = jnp.matmul(w, cf, precision=jax.lax.Precision.HIGHEST)
    return (-(xf - a * x0) / b2).reshape(x.shape)


def run(name, images, batch=8, t=0.5, chunk_size=256):
    images = jnp.asarray(images)
    n = images.shape[0]
    x = jax.random.normal(jax.random.PRNGKey(0), (batch,) + images.shape[1:])
    t = jnp.float32(t)
    ours = jax.jit(lambda x, t, im: ej.ideal_score(x, t, im, chunk_size=chunk_size))
    naive = jax.jit(naive_ideal_score)
    xf, cf = x.reshape(batch, -1), images.reshape(n, -1)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
    t_ours = _median_time(ours, x, t, images)
    t_naive = _median_time(naive, x, t, images)
    t_mm = _median_time(mm, xf, cf)
    err = float(jnp.max(jnp.abs(ours(x, t, images) - naive(x, t, images))))
    print(json.dumps({
        "workload": name, "N": n, "image": list(images.shape[1:]), "B": batch, "t": float(t),
        "chunk_size": chunk_size, "backend": jax.default_backend(),
        "ideal_score_s": round(t_ours, 6),
        "matmul_baseline_s": round(t_mm, 6), "ratio_vs_matmul": round(t_ours / t_mm, 2),
        "naive_dense_s": round(t_naive, 6), "ratio_vs_naive": round(t_ours / t_naive, 2),
        "peak_temp_bytes": _temp_bytes(ours, x, t, images),
        "naive_peak_temp_bytes": _temp_bytes(naive, x, t, images),
        "max_abs_diff_vs_naive": err,
    }), flush=True)


if __name__ == "__main__":
    digits, _ = ej.load_dataset("digits")
    run("digits-1797", digits)
    rand = np.random.default_rng(0).uniform(-1, 1, size=(10000, 32, 32, 1)).astype(np.float32)
    run("random-10000-32x32x1", rand)

"""The paper's scale (issue 23, docs/theory.md §9): the ELS machine at the data sets' own shapes.
Prints one JSON object per line; the first describes the platform.

    python experiments/bench_scale.py --quick                 # N = 2000 per shape (CI-like)
    python experiments/bench_scale.py                          # the paper's N (hours on a CPU)
    python experiments/bench_scale.py --shapes cifar10 --ks 3,11,27 --out runs/scale.jsonl
    python experiments/bench_scale.py --table runs/scale.jsonl  # Markdown summary

On a GPU or TPU the same command runs unchanged on ``jax.devices()[0]`` (install jax with its
CUDA or TPU extra first, e.g. ``pip install -U "jax[cuda12]"``): the platform row then names
the device kind.

Workloads: synthetic uint8-range images in [−1, 1] of each paper shape (docs/theory.md §9):
MNIST/FashionMNIST 60 000 × 32×32×1, CIFAR-10 50 000 × 32×32×3, CelebA 162 770 × 32×32×3
(``--quick``: N = 2000 of each shape; ``--n`` sets it). For every k in 3, 5, 7, 9, 11, 15, 21,
27, both boundaries and B ∈ {1, 16}: one call of the functional machine ``ej.els_x0(x, 0.5,
images, k=k, boundary=...)`` with the engine "auto" picks (compiled and run once untimed, then
the median of up to 3 calls). Then one whole 20-step zero-padded ELS sample of one image with
the authors' MNIST UNet patch sizes (index 0 = last step: 3,3,3,5,5,7,7,7,9,9,9,11,13,15,17,
21,23,23,25,27): ``make_machine`` (banks within ``bank_bytes``, the rest streamed) + ``sample``,
wall time including bank building and compilation.

With ``--families ideal,nearest,scfdm,gaussian,pca_locality,els_soft`` (any of them): per
shape, each family's ``make_machine`` + one call (B = 1, t = 0.5; els_soft with σ = 3 on a
15×15 zero-padded support), wall time and peak memory: every family, not only ELS, must stay
within the images + 2 GB (docs/theory.md §9.2).

    python experiments/bench_scale.py --shapes celeb_a --no-calls --no-sample \
        --families ideal,nearest,scfdm,gaussian,pca_locality,els_soft

Every case runs in a process of its own, so its peak memory is its own: ``peak_rss_GB`` is the
child's maximum resident set (``ru_maxrss``; on an accelerator also the device's
``peak_bytes_in_use``), read for a call before its matmul baseline is built; ``images_GB``
the images' own bytes (float32; uint8 with ``--uint8``, docs/theory.md §9),
``over_images_GB`` the difference (issue 23's bound: ≤ 2 GB).

Per row: seconds, ``pairs`` (the (query pixel, candidate) pairs that exist by docs/theory.md
§2's pair rule: per axis of length n with m = k//2, zeros (n − 2m)² + 2m, circular n·(n − 2m),
or n² with wrap_patches; the 2-D count is the product, times N and B), ``ns_per_pair``,
``engine`` and ``reason`` (``engines/select.resolve_els_engine``), and the same-run baseline
``matmul_s``: a bare ``jnp.matmul`` of the window engine's shape for the same pairs
([B·pixels, k²C + 2] × [k²C + 2, pairs / (B·pixels)], at most 2^27 outputs, scaled linearly),
with ``ratio_matmul`` = seconds / matmul_s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = {"mnist": (60000, 32, 32, 1), "cifar10": (50000, 32, 32, 3),
          "celeb_a": (162770, 32, 32, 3)}
KS = (3, 5, 7, 9, 11, 15, 21, 27)
UNET_SCALES = (3, 3, 3, 5, 5, 7, 7, 7, 9, 9, 9, 11, 13, 15, 17, 21, 23, 23, 25, 27)
FAMILIES = ("ideal", "nearest", "scfdm", "gaussian", "pca_locality", "els_soft")


def axis_pairs(n: int, k: int, boundary: str, wrap: bool = False) -> int:
    """Existing (query, candidate-centre) pairs along one axis of length n (docs §2)."""
    m = k // 2
    if boundary == "zeros":
        if k >= n:                                    # the zero-padded ELS is LS there
            return n
        return (n - 2 * m) ** 2 + 2 * m
    return n * n if wrap else n * (n - 2 * m)


def pairs(shape, k: int, boundary: str, batch: int) -> int:
    n, h, w, _ = shape
    return batch * n * axis_pairs(h, k, boundary) * axis_pairs(w, k, boundary)


def _images(shape, seed=0, uint8=False):
    """Synthetic images as a float32 jax array holding the only copy: filled a chunk at a
    time in a 64-byte-aligned host buffer, which ``jax.device_put`` adopts on a CPU without
    copying (a machine holds a jax array as it is: ``machines.base.device_images``). With
    ``uint8``: the same pixels as uint8 (docs/theory.md §9: machines hold them as they are
    where the shift map streams them)."""
    import jax
    import numpy as np

    from els_jax.core.data import UINT8_TO_UNIT
    rng = np.random.default_rng(seed)
    item = 1 if uint8 else 4
    size = int(np.prod(shape)) * item
    raw = np.empty(size + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    out = raw[start:start + size].view(np.uint8 if uint8 else np.float32).reshape(shape)
    step = max(1, (1 << 26) // max(1, int(np.prod(shape[1:]))))
    for s in range(0, shape[0], step):               # a chunk at a time: no second copy
        e = min(shape[0], s + step)
        u = rng.integers(0, 256, (e - s,) + tuple(shape[1:]), dtype=np.uint8)
        out[s:e] = u if uint8 else UINT8_TO_UNIT[u]
    return jax.device_put(out)


def _device_peak():
    import jax
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - CPU backends have no statistics
        return None


def run_case(case: dict) -> dict:
    """One case, in this process (the parent starts one process per case)."""
    import jax
    import jax.numpy as jnp

    import els_jax as ej
    from els_jax.engines import select

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_machines as bm  # noqa: E402  (same timing methodology)

    shape = tuple(case["shape"])
    n, h, w, c = shape
    images = _images(shape, uint8=case.get("uint8", False))
    out = dict(case, images_GB=round(images.nbytes / 2**30, 3))
    key = jax.random.PRNGKey(0)
    if case["kind"] == "call":
        k, boundary, batch = case["k"], case["boundary"], case["batch"]
        x = jax.random.normal(key, (batch, h, w, c), jnp.float32)
        choice = select.resolve_els_engine("auto", k, c, h, boundary, w=w, n=n, batch=batch)
        t0 = time.perf_counter()
        jax.block_until_ready(ej.els_x0(x, 0.5, images, k=k, boundary=boundary))
        first = time.perf_counter() - t0
        med, best, reps = bm.time_calls(lambda: ej.els_x0(x, 0.5, images, k=k,
                                                          boundary=boundary),
                                        budget=max(2.0, 2.5 * first), max_reps=3)
        # The machine's peak, read before the baseline's operands exist (at k = 27 with C = 3
        # they are 1.15 + 0.5 GB: the peak read after them was the baseline's, not the call's).
        machine_peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                        _device_peak())
        p = pairs(shape, k, boundary, batch)
        rows = batch * h * w
        depth = k * k * c + 2
        cols = max(1, p // rows)
        cap = max(1, (1 << 27) // rows)
        a = jnp.ones((rows, depth), jnp.float32)
        bmat = jnp.ones((depth, min(cols, cap)), jnp.float32)
        mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
        mm_s, _, _ = bm.time_calls(lambda: mm(a, bmat), budget=1.0, max_reps=5)
        mm_s *= cols / min(cols, cap)
        out.update(seconds=round(med, 4), best_s=round(best, 4), reps=reps,
                   first_call_s=round(first, 3), pairs=p, ns_per_pair=round(med / p * 1e9, 4),
                   engine=choice.engine, reason=choice.reason, matmul_s=round(mm_s, 4),
                   ratio_matmul=round(med / mm_s, 3))
    elif case["kind"] == "family":                    # make_machine + one call
        kw = {"scfdm": dict(key=jax.random.PRNGKey(1)),
              "els_soft": dict(sigmas=3.0, k_max=15, boundary="zeros")}.get(case["family"], {})
        x = jax.random.normal(key, (1, h, w, c), jnp.float32)
        t0 = time.perf_counter()
        machine = ej.make_machine(case["family"], images, **kw)
        build = time.perf_counter() - t0
        jax.block_until_ready(machine.x0(x, jnp.float32(0.5), 0))
        out.update(seconds=round(time.perf_counter() - t0, 2), build_s=round(build, 2),
                   engine=next(iter(machine.explain().values()))["engine"])
    else:                                             # the 20-step zero-padded ELS sample
        x_T = jax.random.normal(key, (1, h, w, c), jnp.float32)
        t0 = time.perf_counter()
        machine = ej.make_machine("els", images, scales=list(UNET_SCALES), boundary="zeros",
                                  compile_for=x_T)
        build = time.perf_counter() - t0
        result = ej.sample(machine, x_T, ej.uniform_times(len(UNET_SCALES)))
        jax.block_until_ready(result)
        total = time.perf_counter() - t0
        out.update(seconds=round(total, 2), build_s=round(build, 2),
                   engines={str(k): v["engine"] for k, v in machine.explain().items()},
                   banked={str(k): bool(machine._x0_fns[k].info.get("bank"))
                           for k in machine._x0_fns})
    if case["kind"] == "call":
        peak, dev = machine_peak
    else:
        peak, dev = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _device_peak()
    out["peak_rss_GB"] = round(peak / 2**30, 3)
    out["over_images_GB"] = round((peak - images.nbytes) / 2**30, 3)
    if dev is not None:
        out["device_peak_GB"] = round(dev / 2**30, 3)
    return out


def platform_row() -> dict:
    import jax

    from els_jax.engines import autotune, native
    dev = jax.devices()[0]
    row = {"platform": True, "backend": jax.default_backend(), "device_kind": dev.device_kind,
           "devices": jax.device_count(), "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "native_arch": os.environ.get("ELS_JAX_NATIVE_ARCH", "native"),
           "kernels_built": bool(jax.default_backend() == "cpu" and native.available()),
           "autotune": autotune.autotune_enabled()}
    row.update(autotune.cpu_info())
    return row


def cases(args):
    for name in args.shapes:
        shape = SHAPES[name]
        shape = (args.n or (2000 if args.quick else shape[0]),) + shape[1:]
        for boundary in ([] if args.no_calls else args.boundaries):
            for k in args.ks:
                for batch in args.batches:
                    yield {"kind": "call", "shape": shape, "data": name, "k": k,
                           "boundary": boundary, "batch": batch, "uint8": args.uint8}
        if not args.no_sample:
            yield {"kind": "sample", "shape": shape, "data": name, "scales": UNET_SCALES,
                   "uint8": args.uint8}
        for family in args.families:
            yield {"kind": "family", "shape": shape, "data": name, "family": family,
                   "uint8": args.uint8}


def table(path: str) -> str:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    plat = next((r for r in rows if r.get("platform")), {})
    out = [f"platform: {plat.get('backend')} {plat.get('device_kind')} "
           f"{plat.get('cpu', '')} SIMD {' '.join(plat.get('simd', []))}", "",
           "| data | N | boundary | k | B | s/call | ns/pair | engine | peak − images (GB) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "call" and "error" not in r:
            out.append(f"| {r['data']} | {r['shape'][0]} | {r['boundary']} | {r['k']} | "
                       f"{r['batch']} | {r['seconds']} | {r['ns_per_pair']} | {r['engine']} | "
                       f"{r['over_images_GB']} |")
    for r in rows:
        if r.get("kind") == "family" and "error" not in r:
            out.append(f"\n{r['family']} ({r['engine']}), {r['data']} N = {r['shape'][0]}: "
                       f"make_machine + one call {r['seconds']} s, peak − images "
                       f"{r['over_images_GB']} GB")
    for r in rows:
        if r.get("kind") == "sample" and "error" not in r:
            out.append(f"\n20-step zero-padded ELS sample, {r['data']} N = {r['shape'][0]}: "
                       f"{r['seconds']} s (build {r['build_s']} s), peak − images "
                       f"{r['over_images_GB']} GB")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 2000 of every shape")
    p.add_argument("--n", type=int, help="training images per shape")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    p.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=list(KS))
    p.add_argument("--boundaries", type=lambda s: s.split(","), default=["zeros", "circular"])
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16])
    p.add_argument("--no-sample", action="store_true", help="skip the 20-step samples")
    p.add_argument("--no-calls", action="store_true", help="only the 20-step samples")
    p.add_argument("--uint8", action="store_true",
                   help="images as uint8 pixels (held as uint8 by the shift map) instead of float32")
    p.add_argument("--families", type=lambda s: [v for v in s.split(",") if v], default=[],
                   help=f"also time and measure these families per shape ({','.join(FAMILIES)})")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--case", help=argparse.SUPPRESS)            # one case, in a child process
    p.add_argument("--table", help="print a Markdown table of a JSON-lines file and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        p.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(SHAPES)}")
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {list(FAMILIES)}")
    sink = open(args.out, "a") if args.out else None

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()
    emit(platform_row())
    for case in cases(args):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case",
                               json.dumps(case)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            emit(dict(case, error=(proc.stderr.strip().splitlines() or ["?"])[-1][:300]))
        else:
            emit(json.loads(lines[-1]))
    if sink:
        sink.close()


if __name__ == "__main__":
    main()

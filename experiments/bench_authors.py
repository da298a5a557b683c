"""Our side of the side-by-side with the authors' PyTorch ELS code (issue 23's six calls).
Prints one JSON object per line.

    python experiments/bench_authors.py                                  # our six calls
    python experiments/bench_authors.py --authors runs/authors.jsonl     # ... and the ratios

Workload (the one the authors' times were taken on): the first N = 1000 of the embedded MNIST
digits (mnist5k, 32×32×1), one query (B = 1, a fixed Gaussian noise image) at t = 0.5, ELS
with circular and with zero padding at k = 3, 7 and 11. Each machine is built as users build it
(``make_machine("els", images, scales=k, boundary=...)``, default engine, measured or cached),
compiled, called once untimed, then ``--repeats`` times; ``median_s`` is the median call.

The authors' times come from ``experiments/authors_timing.py`` (their code, run by PyTorch in
its own environment: it prints the same workload's rows with "impl": "authors"); give its
output with ``--authors`` and each of our rows gains ``authors_median_s`` and ``speedup``
(their median / ours). Run both on an otherwise idle machine, one after the other.

The first row describes the platform (CPU model, SIMD flags, cores or the device kind).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sizes(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _authors(path: str | None) -> dict:
    """(boundary, k) → the authors' median seconds, from authors_timing.py's JSON lines."""
    if not path:
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                row = json.loads(line)
                if row.get("impl") == "authors":
                    out[(row["boundary"], int(row["k"]))] = float(row["median_s"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--k", type=_sizes, default=[3, 7, 11])
    p.add_argument("--boundary", type=lambda s: s.split(","), default=["circular", "zeros"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--t", type=float, default=0.5)
    p.add_argument("--authors", default=None, help="authors_timing.py's output (JSON lines)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import els_jax as ej
    from experiments.bench_scale import platform_row

    print(json.dumps(platform_row()), flush=True)
    theirs = _authors(args.authors)
    images, _ = ej.load_dataset("mnist5k", max_examples=args.n)
    x = jax.random.normal(jax.random.PRNGKey(0), (1,) + images.shape[1:], jnp.float32)
    t = jnp.float32(args.t)
    for boundary in args.boundary:
        for k in args.k:
            t0 = time.perf_counter()
            machine = ej.make_machine("els", images, scales=k, boundary=boundary,
                                      compile_for=x.shape)
            build = time.perf_counter() - t0
            jax.block_until_ready(machine.x0(x, t, 0))          # untimed: first touch
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(machine.x0(x, t, 0))
                times.append(time.perf_counter() - t0)
            info = machine.explain()[k]
            row = {"impl": "els_jax", "boundary": boundary, "k": k, "n": int(len(images)),
                   "batch": 1, "t": args.t, "median_s": round(statistics.median(times), 5),
                   "min_s": round(min(times), 5), "times_s": [round(v, 5) for v in times],
                   "build_s": round(build, 3), "engine": info["engine"],
                   "bank": info.get("bank")}
            if (boundary, k) in theirs:
                row["authors_median_s"] = theirs[(boundary, k)]
                row["speedup"] = round(theirs[(boundary, k)] / row["median_s"], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

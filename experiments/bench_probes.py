"""Which ELS engine wins which shape class: every engine's time on the selector's own probe
(``select._els_probe_calls``, timed by ``autotune.measure``), one JSON line per class.

    python experiments/bench_probes.py                                  # C = 1 digits, C = 3
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 ELS_JAX_NATIVE_ARCH=x86-64-v3 python experiments/bench_probes.py

The evidence behind the selector's static exclusions (``select.resolve_els_engine``): where
the CPU kernels run, an engine that never comes near the winner of any class is not probed
(it would cost every cold first run its bank, its compilation and its calls). Each row gives
every engine's seconds per probe call (the shift map's scaled to the others' N, as
``select`` does), the winner, and each engine's ratio to the best *other* engine
(``vs_best_other``: below 1 it won, and by how much). Classes: banked machines, both
boundaries, k = 3 … 15; C = 1 on the first N mnist5k digits (the probes read a machine's own
images) and C = 3 on uniform random images. The first line is the platform.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", default="3,5,7,9,11,15")
    p.add_argument("--boundary", default="zeros,circular")
    p.add_argument("--engines", default="window,window_native,shiftmap,native,row",
                   help="engines to time (native: zero padding only)")
    p.add_argument("--n1", type=int, default=1000, help="N of the C = 1 classes (digits)")
    p.add_argument("--n3", type=int, default=5000, help="N of the C = 3 classes (synthetic)")
    args = p.parse_args(argv)

    import numpy as np

    import els_jax as ej
    from els_jax.engines import autotune
    from els_jax.engines import select as sel
    from experiments.bench_scale import platform_row

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    print(json.dumps(platform_row()), flush=True)
    digits, _ = ej.load_dataset("mnist5k", max_examples=args.n1)
    asked = [e for e in args.engines.split(",") if e]
    for c, n, data in ((1, args.n1, np.asarray(digits)), (3, args.n3, None)):
        for boundary in args.boundary.split(","):
            for k in (int(v) for v in args.k.split(",")):
                engines = tuple(e for e in asked if e != "native" or boundary == "zeros")
                calls, note, scale, _ = sel._els_probe_calls(
                    k, c, 32, 32, boundary, False, n, 1, engines, True, 1 << 20, data)
                times = autotune.measure(calls, scale=scale)
                winner = min(times, key=times.get)
                vs = {e: round(t / min(v for o, v in times.items() if o != e), 3)
                      for e, t in times.items()}
                print(json.dumps({"C": c, "boundary": boundary, "k": k, "N": n, "probe": note,
                                  "winner": winner, "ms": {e: round(t * 1e3, 3) for e, t in
                                                           sorted(times.items())},
                                  "vs_best_other": vs}), flush=True)


if __name__ == "__main__":
    main()

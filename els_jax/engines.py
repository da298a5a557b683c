"""Which exact engine computes a machine: measured once per platform and shape class, cached
on disk, like XLA's and Triton's autotuning (issue 13).

Several engines compute the same machine, equal to float32 rounding, at speeds that depend on
the CPU or accelerator, k, C, H, W, N and the batch:

  ELS main pass (``resolve_els_engine``): "window" (``els_window``) | "row" (``els_row``)
      (XLA) | "native" (``els_interior``: the fused CPU kernel of the
      zero-padded interior, ``native.py``: banked machines without merged windows, k < H, W)
      | "window_native" (``els_window`` with the fused CPU kernel of a window bank, merged
      or not: banked machines, any boundary)
  LS (``local.py``): "kernel" (``native.py``) | "xla" (local.py's passes)

A static rule tuned on one CPU picked, on another (AVX2 instead of AVX-512), an engine 6×
slower than the best (zero-padded ELS, N = 1000, 32×32). So ``select`` measures:

  - an explicit method wins (``method="window"``, ...; the callers handle it);
  - with one applicable engine, that one;
  - with ``ELS_JAX_AUTOTUNE=0`` (or nothing to probe, e.g. a machine split over a mesh), the
    static rule the caller passes (``choose_method``'s cost model and the kernel rule);
  - otherwise the fastest engine for this key: from memory, from the disk cache, or measured
    now. Each applicable engine runs on a probe of the same shape class (same k, C, H, W and
    batch, synthetic images, N cut so that one call is ~2·10⁷ pairs, tens of milliseconds):
    compiled and called once untimed, then timed in alternation (A B C A B C …, so that a
    disturbance hits every engine alike) for up to ``PROBE_ROUNDS`` rounds or
    ``PROBE_BUDGET_S`` seconds of calls; the minimum per engine decides. Measuring runs on a
    thread of its own (no outer jit trace), one measurement at a time. First use of a shape
    class costs the probes' compilation (a few seconds for the three ELS engines on 2 cores);
    later runs read the winner from disk.

The key holds the backend, the CPU model and SIMD flags (or the device kind), the device count,
XLA_FLAGS, the jax version and the kernel source's hash, then the machine kind, boundary, k,
C, H, W, N rounded up to a power of two and the batch rounded up to a power of two. Winners are
written to ``$ELS_JAX_CACHE`` (default ``~/.cache/els_jax``, beside the kernel) /
``engines.json``, atomically. ``Choice.reason`` says what decided (measured times, cached or
not, or the static rule); ``Machine.explain()`` reports it for every patch size. A machine
resolves "auto" when it is built (ELS: the bank depends on the engine) or when a shape is
first traced (LS): the jitted computation keeps that choice.

    choice = select("els", {"k": 5, ...}, ("window", "row", "native"), "native",
                    "static rule: ...", probes=lambda: ({"window": call_w, ...}, "note", None))
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Choice", "select", "measure", "els_engine", "local_engine", "autotune_enabled",
           "resolve_els_engine", "choose_method", "native_interior_ok", "native_window_ok",
           "METHODS",
           "platform_signature", "cpu_info", "cache_file", "clear_memory_cache",
           "PROBE_PAIRS", "PROBE_ROUNDS", "PROBE_BUDGET_S"]

SCHEMA = 1                 # bump when the key or the probes change meaning
PROBE_PAIRS = 2e7          # (query pixel, candidate) pairs per probe call
PROBE_ROUNDS = 5           # timed calls per engine, at most
PROBE_BUDGET_S = 1.0       # seconds of timed calls per selection, about (≥ 2 rounds)
_clock = time.perf_counter  # the timer (tests substitute a fake one)

_THREAD = "els-autotune"   # the measuring thread's name prefix
_lock = threading.RLock()  # one measurement at a time; guards the caches
_memory: dict = {}         # key → Choice, this process


class Choice(NamedTuple):
    """An engine and why: ``reason`` is human-readable; ``times`` the seconds per probe call
    of every engine measured (None when nothing was measured)."""

    engine: str
    reason: str
    times: dict | None = None


def autotune_enabled() -> bool:
    """False when ``ELS_JAX_AUTOTUNE=0``: static rules, nothing measured (deterministic)."""
    return os.environ.get("ELS_JAX_AUTOTUNE", "1") != "0"


_SIMD = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "avx2", "avx", "fma",
         "f16c", "sse4_1", "sse4_2", "amx_tile", "asimd", "neon", "sve", "sve2")


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """The CPU model, its SIMD flags (those that change what the kernels and XLA compile to)
    and the number of cores this process may use."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "Model", "CPU part") and not model:
                model = value.strip()
            elif name in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        import platform
        model = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "simd": [f for f in _SIMD if f in flags], "cores": cores}


@functools.lru_cache(maxsize=None)
def platform_signature() -> dict:
    """What an engine's speed depends on besides the shape: backend, CPU (model, SIMD flags,
    cores) or device kind, device count, XLA_FLAGS, jax version, the kernel source's hash and
    its target (ELS_JAX_NATIVE_ARCH)."""
    from els_jax import native
    backend = jax.default_backend()
    sig = {"backend": backend, "devices": jax.device_count(), "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "native_arch": os.environ.get("ELS_JAX_NATIVE_ARCH", "native")}
    if backend == "cpu":
        sig.update(cpu_info())
    else:
        sig["device_kind"] = jax.devices()[0].device_kind
    try:
        sig["kernel"] = hashlib.sha256(native._SOURCE.read_bytes()).hexdigest()[:16]
    except OSError:
        sig["kernel"] = None
    return sig


def cache_file() -> Path:
    """``$ELS_JAX_CACHE/engines.json`` (default ``~/.cache/els_jax``)."""
    root = Path(os.environ.get("ELS_JAX_CACHE", Path.home() / ".cache" / "els_jax"))
    return root / "engines.json"


def clear_memory_cache():
    """Forgets this process's choices (the disk cache stays; computations already traced keep
    theirs until ``jax.clear_caches()``)."""
    with _lock:
        _memory.clear()


def _bucket(v: int) -> int:
    """v rounded up to a power of two (the shape classes of N and of the batch)."""
    return 1 << max(0, math.ceil(math.log2(max(1, int(v)))))


def _key(kind: str, shape: Mapping, engines: Sequence[str]):
    fields = {"schema": SCHEMA, **platform_signature(), "kind": kind, **dict(shape),
              "engines": sorted(engines)}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24], fields


def _read_disk() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_disk(key: str, entry: dict):
    """Adds one entry to the cache file: read, merge, write a temporary file and rename it
    over the old one (atomic: a concurrent reader sees the old or the new file, whole)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_disk()
        data[key] = entry
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:                        # a read-only home: measure again next time
        warnings.warn(f"els_jax: could not write the engine cache {path}: {err}",
                      RuntimeWarning, stacklevel=3)


def measure(calls: Mapping[str, Callable[[], object]], *, rounds: int = PROBE_ROUNDS,
            budget: float = PROBE_BUDGET_S) -> dict:
    """Seconds per call of each blocking zero-argument call: the minimum over up to ``rounds``
    calls made in alternation after one untimed call each (compilation, first touch of the
    buffers); stops after two rounds once ``budget`` seconds of timed calls are spent. An
    engine whose untimed call raises is left out (with a warning)."""
    live = {}
    for name, call in calls.items():
        try:
            call()
            live[name] = call
        except Exception as err:                  # noqa: BLE001 - a probe must not break a run
            warnings.warn(f"els_jax: engine {name!r} failed on its probe and is not used "
                          f"({type(err).__name__}: {str(err)[:200]})", RuntimeWarning,
                          stacklevel=2)
    best = {name: math.inf for name in live}
    spent = 0.0
    for r in range(rounds):
        for name, call in live.items():
            t0 = _clock()
            call()
            dt = _clock() - t0
            best[name] = min(best[name], dt)
            spent += dt
        if r >= 1 and spent >= budget:
            break
    return best


def _format_times(times: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {sec * 1e3:.3g} ms" for name, sec in
                     sorted(times.items(), key=lambda kv: kv[1]))


def _run_apart(fn):
    """fn() on a thread of its own: no jit trace of the caller is active there (the probes
    must run, not be staged into the caller's program)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD) as pool:
        return pool.submit(fn).result()


def select(kind: str, shape: Mapping, engines: Sequence[str], static: str, static_reason: str,
           probes: Callable[[], tuple] | None = None) -> Choice:
    """The engine for ``kind`` ("els" | "local" | ...) at ``shape`` among the applicable
    ``engines`` (see the module docstring).

    static, static_reason: the static rule's engine and why (used when autotuning is off or
    nothing can be probed). probes: () → (calls, note, scale): calls maps each engine to a
    blocking zero-argument call on a probe; note describes the probe (e.g. "N = 64");
    scale maps engines to factors applied to their measured times (or None)."""
    engines = tuple(engines)
    if static not in engines:
        raise ValueError(f"static engine {static!r} is not among the applicable {engines}")
    if len(engines) == 1:
        return Choice(engines[0], "the only applicable engine")
    if probes is None or not autotune_enabled():
        off = "" if probes is None else "; ELS_JAX_AUTOTUNE=0"
        return Choice(static, f"{static_reason}{off}")
    if threading.current_thread().name.startswith(_THREAD):     # a probe's own machine
        return Choice(static, f"{static_reason}; (inside a probe)")
    key, fields = _key(kind, shape, engines)
    with _lock:
        if key in _memory:
            return _memory[key]
        entry = _read_disk().get(key)
        if isinstance(entry, dict) and entry.get("engine") in engines:
            choice = Choice(entry["engine"], f"{entry.get('reason', 'measured')} (cached "
                            f"{entry.get('when', '')} in {cache_file()})",
                            entry.get("times"))
            _memory[key] = choice
            return choice

        def run():
            try:
                calls, note, scale = probes()
            except Exception as err:              # noqa: BLE001 - fall back to the rule
                warnings.warn(f"els_jax: building the engine probes failed "
                              f"({type(err).__name__}: {str(err)[:200]}); static rule",
                              RuntimeWarning, stacklevel=2)
                return {}, ""
            times = measure(calls)
            for name, factor in (scale or {}).items():
                if name in times:
                    times[name] *= factor
            return times, note
        start = _clock()
        times, note = _run_apart(run)
        if not times:
            choice = Choice(static, f"{static_reason}; every probe failed")
            _memory[key] = choice
            return choice
        winner = min(times, key=times.get)
        reason = (f"measured on a probe ({note}), per call: {_format_times(times)}; "
                  f"{_clock() - start:.2g} s with compilation")
        choice = Choice(winner, reason, {k: round(v, 6) for k, v in times.items()})
        _memory[key] = choice
        _write_disk(key, {"engine": winner, "reason": reason, "times": choice.times,
                          "fields": fields,
                          "when": datetime.datetime.now().isoformat(timespec="seconds")})
        return choice


# ----------------------------------------------------------------------------------------
# The ELS main pass: which engines apply, the static rule, and the choice.

METHODS = ("auto", "window", "row", "native", "window_native")

# The static rule's cost per computed pair (relative units, fitted once on a 2-core CPU with
# experiments/bench_machines.py): window ≈ W0 + W1·C^0.63·(k²C + 2), the matmul of length
# k²C + 2 dominating for k ≥ 5; row ≈ R0 + R1·k·C^1.3 (a matmul of length kC + 2 and a k-term
# box sum). With zero padding the row engine also computes query rows it discards: H/(H−k+1)
# more box sums and softmax work and (H/(H−k+1))² more row products, modelled as a factor
# (H/(H−k+1))^1.5. Used only where nothing is measured (ELS_JAX_AUTOTUNE=0, a mesh, N unknown).
_W0, _W1 = 0.6, 0.0165
_R0, _R1 = 0.55, 0.125


def choose_method(k: int, c: int, h: int, boundary: str, unique_fraction: float = 1.0) -> str:
    """The cheaper XLA engine for the main pass by the cost model above: "window" or "row".

    unique_fraction: fraction of candidate windows left after merging duplicates (window
    engine with a deduplicated bank only)."""
    window = unique_fraction * (_W0 + _W1 * c ** 0.63 * (k * k * c + 2))
    waste = h / max(1, h - k + 1) if boundary == "zeros" else 1.0
    row = waste ** 1.5 * (_R0 + _R1 * k * c ** 1.3)
    return "row" if row < window else "window"


def native_window_ok() -> bool:
    """Whether the fused CPU kernel of a window bank can run: the default backend a CPU and
    the kernel built (``native.available()``)."""
    from els_jax import native
    return jax.default_backend() == "cpu" and native.available()


def native_interior_ok(k: int, h: int, w: int, boundary: str) -> bool:
    """Whether the fused CPU kernel can compute the main pass: zero padding, an interior
    (k < H, W), the default backend a CPU and the kernel built (``native.available()``)."""
    from els_jax import native
    return (boundary == "zeros" and k < min(h, w) and jax.default_backend() == "cpu"
            and native.available())


def resolve_els_engine(method, k, c, h, boundary, unique_fraction=1.0, banked=False, w=None,
                       *, wrap_patches=False, n=None, batch=1, sharded=False,
                       block=1 << 20) -> Choice:
    """The engine of the ELS main pass and why: the one place that decides.

    An explicit ``method`` wins ("native" and "window_native" raise where their kernel cannot
    run). "auto": the applicable engines are "window" and "row"; for a banked machine on a CPU
    with the kernels built, "window_native" (the window bank run by the fused kernel), and
    "native" (the fused interior kernel, which does not merge windows) when the machine is
    zero-padded. ``els_engine`` times them on a probe (n = the number of training images,
    B = ``batch``) and caches the winner. With ``ELS_JAX_AUTOTUNE=0``, without n, or
    ``sharded``, the static rule decides: the interior kernel when it applies and windows are
    not merged (except at k = 3 with C ≥ 2, where the window engine's short matmul won when
    the rule was set), otherwise
    ``choose_method``'s cost model, its "window" run by the fused kernel where that applies."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    w = h if w is None else w
    if method == "native":
        if not banked or not native_interior_ok(k, h, w, boundary):
            raise ValueError("method='native' (the fused CPU kernel) needs a machine "
                             "(make_machine) with boundary='zeros', k < H, W, a CPU backend "
                             "and a C++ compiler (see els_jax.native)")
        return Choice(method, "method='native' (explicit)")
    if method == "window_native":
        if not banked or not native_window_ok():
            raise ValueError("method='window_native' (the fused CPU kernel of a window bank) "
                             "needs a machine (make_machine), a CPU backend and a C++ compiler "
                             "(see els_jax.native)")
        return Choice(method, "method='window_native' (explicit)")
    if method != "auto":
        return Choice(method, f"method={method!r} (explicit)")
    applicable = ("window", "row")
    window_kernel = banked and native_window_ok()
    if window_kernel:
        applicable += ("window_native",)
    # (the interior kernel reads every window, merged or not: its probe is not scaled)
    kernel = banked and native_interior_ok(k, h, w, boundary)
    if kernel:
        applicable += ("native",)
    if kernel and unique_fraction >= 1.0 and not (k <= 3 and c >= 2):
        static = "native"
        why = ("static rule: the fused CPU kernel for a banked zero-padded machine without "
               "merged windows (not at k = 3, C ≥ 2)")
    else:
        static = choose_method(k, c, h, boundary, unique_fraction)
        why = "static rule: choose_method's cost model"
        if static == "window" and window_kernel:
            static = "window_native"
            why += ", the window bank run by the fused CPU kernel"
    return els_engine(applicable, static, why, k=k, c=c, h=h, w=w, boundary=boundary,
                      wrap_patches=wrap_patches, n=n, batch=batch, banked=banked,
                      unique_fraction=unique_fraction, sharded=sharded, block=block)


# ----------------------------------------------------------------------------------------
# The machines' probes: synthetic images of the machine's shape class, the same code paths.


def _probe_inputs(n: int, batch: int, h: int, w: int, c: int):
    """Images [n, H, W, C] uniform in [−1, 1] and queries [B, H, W, C] on their noisy manifold
    at t = 0.5 (weights neither uniform nor one-hot), reproducible."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (n, h, w, c)).astype(np.float32)
    x = 0.7 * images[rng.integers(0, n, batch)] + 0.7 * rng.normal(size=(batch, h, w, c))
    return images, jnp.asarray(x, jnp.float32), jnp.float32(0.5)


def _probe_images(n: int, pairs_per_image: int, multiple: int = 32, least: int = 0) -> int:
    """Images in a probe: about PROBE_PAIRS pairs per call, at least ``least`` and one block of
    32 per core (the kernels split the images over the cores in blocks of 32), at most n, a
    multiple of ``multiple``."""
    least = max(least, 32 * (cpu_info()["cores"] or 1))
    want = max(least, int(PROBE_PAIRS // max(1, pairs_per_image)))
    want = -(-want // multiple) * multiple
    return int(min(n, want))


def _els_probe_calls(k, c, h, w, boundary, wrap_patches, n, batch, engines, banked, block):
    """(calls, note, scale) for ``select``: each ELS engine's main pass (the zero-padded
    border pass is the same for every engine and left out) on synthetic images, banked as
    ``els.build_bank`` builds it (without merging) or streamed as ``els_x0`` streams it."""
    from els_jax import els
    from els_jax import els_interior as interior_lib
    from els_jax import els_layout as geo
    from els_jax import els_row as row_lib
    from els_jax import els_window as window_lib
    from els_jax import schedules as schedules_lib

    main = geo.layout(k, boundary, wrap_patches, h, w)[0]
    per_image = batch * main.query_pixels.size * main.cand_pixels.size
    n_probe = _probe_images(n, per_image)
    images, x, t = _probe_inputs(n_probe, batch, h, w, c)
    mu = images.mean(axis=(0, 1, 2))
    schedule = schedules_lib.Cosine()
    calls = {}
    for engine in engines:
        if not banked:
            lay = row_lib.row_layout(k, boundary, wrap_patches, h, w) if engine == "row" else None
            groups = geo.grouped_passes(k, boundary, wrap_patches, h, w, False, engine)
            fn = jax.jit(functools.partial(els.stream_states, k=k, schedule=schedule,
                                           block=block, lay=lay, groups=groups))
            args = (x, t, jnp.asarray(images), jnp.zeros((n_probe,), jnp.float32),
                    jnp.asarray(mu))
            calls[engine] = functools.partial(lambda fn, args: jax.block_until_ready(fn(*args)),
                                              fn, args)
            continue
        row, windows, interior, chunks, row_images = None, (), None, (), 0
        if engine in ("window", "window_native"):  # build_bank's main pass, not merged
            gp = geo.grouped_passes(k, boundary, wrap_patches, h, w, False, "window")[0]
            bank, ch = window_lib.build_window_bank(images, k, gp, mu, dedup=False, block=block)
            windows, chunks = (bank,), (ch,)
        elif engine == "row":
            lay = row_lib.row_layout(k, boundary, wrap_patches, h, w)
            row, row_images = row_lib.build_row_bank(images, k, lay, mu, block=block)
        else:                                     # "native"
            interior = interior_lib.build_interior_bank(images, k, mu)
        bank = els.MachineBank(jnp.asarray(mu), row, windows, None, interior)
        spec = els.BankSpec(int(k), boundary, bool(wrap_patches), False, engine, chunks,
                            int(row_images), 1.0, 0)
        calls[engine] = functools.partial(
            lambda bank, spec: jax.block_until_ready(els.bank_x0(
                x, t, bank, spec=spec, schedule=schedule, block=block)), bank, spec)
    return calls, f"{n_probe} synthetic images, B = {batch}, main pass", None


def els_engine(engines: Sequence[str], static: str, static_reason: str, *, k: int, c: int,
               h: int, w: int, boundary: str, wrap_patches: bool = False, n: int | None = None,
               batch: int = 1, banked: bool = True, unique_fraction: float = 1.0,
               sharded: bool = False, block: int = 1 << 20) -> Choice:
    """The ELS main pass's engine among ``engines`` (see ``resolve_els_engine``, which
    decides which apply and the static rule). A window bank whose duplicate windows are merged
    holds ``unique_fraction`` of the candidates: its probe time is scaled by that fraction.
    Without N (unknown), or split over a mesh, the static rule decides."""
    shape = {"boundary": boundary, "wrap_patches": bool(wrap_patches), "k": int(k),
             "C": int(c), "H": int(h), "W": int(w), "N": _bucket(n or 1), "B": _bucket(batch),
             "path": "bank" if banked else "stream",
             "unique": round(float(unique_fraction), 2), "block": int(block)}
    probes = None
    if n is not None and not sharded:
        def probes():
            calls, note, _ = _els_probe_calls(k, c, h, w, boundary, wrap_patches, n, batch,
                                              engines, banked, block)
            scale = ({"window": unique_fraction, "window_native": unique_fraction}
                     if unique_fraction < 1.0 else None)
            return calls, note, scale
    return select("els", shape, engines, static, static_reason, probes)


def local_engine(*, k: int, c: int, h: int, w: int, n: int, batch: int = 1,
                 block: int = 1 << 20) -> Choice:
    """The LS engine: "kernel" (the fused CPU kernel) or "xla". The kernel applies when it is
    built and the default backend is a CPU; the static rule takes it whenever it applies."""
    from els_jax import local, native
    from els_jax import schedules as schedules_lib

    if jax.default_backend() != "cpu" or not native.available():
        return Choice("xla", "the only applicable engine (no CPU kernel on this backend)")
    shape = {"k": int(k), "C": int(c), "H": int(h), "W": int(w), "N": _bucket(n),
             "B": _bucket(batch), "block": int(block)}

    def probes():
        n_probe = _probe_images(n, batch * h * w, least=256)
        images, x, t = _probe_inputs(n_probe, batch, h, w, c)
        bank = local.build_local_bank(local.transpose_images(images), k=k)
        log_w = jnp.zeros((n_probe,), jnp.float32)
        a, b2 = local.local_coefficients(t, batch, schedules_lib.Cosine())
        q = local.local_queries(x, a, bank.mean)
        kernel = jax.jit(lambda q, a, b2, bank, lw: native.local_softmax_state(
            q, a.reshape(-1), b2.reshape(-1), bank.centred_and_ones, bank.half_sq, lw, k))
        xla = jax.jit(lambda q, a, b2, bank, lw: local._local_bank_state_q(
            q, a, b2, bank, lw, k, block))
        args = (q, a, b2, bank, log_w)
        return ({"kernel": lambda: jax.block_until_ready(kernel(*args)),
                 "xla": lambda: jax.block_until_ready(xla(*args))},
                f"{n_probe} synthetic images, B = {batch}", None)
    return select("local", shape, ("kernel", "xla"), "kernel",
                  "static rule: the fused CPU kernel whenever it is built", probes)

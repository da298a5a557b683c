"""Measuring which exact engine is fastest, once per platform and shape class, cached on disk,
like XLA's and Triton's autotuning: the generic part (``select``, ``measure``, the cache and
the platform signature). Which engines apply to a machine, their static rules and their probes
live in ``select.py``; the networks' training uses the same cache for its convolutions.

Several engines compute the same machine, equal to float32 rounding, at speeds that depend on
the CPU or accelerator, k, C, H, W, N and the batch (the list is ``select.py``'s).

A static rule tuned on one CPU picked, on another (AVX2 instead of AVX-512), an engine 6×
slower than the best (zero-padded ELS, N = 1000, 32×32). So ``select`` measures:

  - an explicit method wins (``method="window"``, ...; the callers handle it);
  - with one applicable engine, that one;
  - with ``ELS_JAX_AUTOTUNE=0`` (or nothing to probe, e.g. a machine split over a mesh), the
    static rule the caller passes (``select.choose_method``'s cost model, the kernel rule);
  - otherwise the fastest engine for this key: from memory, from the disk cache, or measured
    now. Each applicable engine runs on a probe of the same shape class (same k, C, H, W and
    batch; a machine's own training images spread over the set, synthetic ones in the
    functional path; N cut so that one call is ~2·10⁷ pairs, tens of milliseconds; the
    shift-map kernel gets two blocks of images per core and its time is scaled to that N):
    compiled and called once untimed, then timed in alternation (A B C A B C …, so that a
    disturbance hits every engine alike) for up to ``PROBE_ROUNDS`` rounds or
    ``PROBE_BUDGET_S`` seconds of calls, or two rounds when one engine leads every other by
    ``CLEAR_LEAD``×; the minimum per engine decides (an engine
    ``ELIMINATE``× slower than the fastest stops being timed, and one ``NEIGHBOUR``× behind
    at the neighbouring patch size of the same shape class is not probed). Measuring runs on a
    thread of its own (no outer jit trace), one measurement at a time. First use of a shape
    class costs the probes and their compilation (0.7–0.9 s per patch size for the three ELS
    engines of a banked zero-padded machine on 2 cores); later runs read the winner from disk;
  - a patch size between two measured ones of the same shape class at most
    ``INTERPOLATE_SPAN`` apart is not probed when the times per probe image, interpolated
    between them, show a clear winner (``INTERPOLATE_MARGIN``×; ``_interpolated``). A machine
    chooses its sizes in ``probe_order`` (the ends, then the middles), so a cold run of the
    authors' sizes 3 … 15 probes 3 of its 7 sizes;
  - nor is a size next to a clear winner: an engine that led every other by ``NEIGHBOUR``×
    at k ± 2 of the same shape class, every engine timed there (``_clear_neighbour``);
  - a caller may name a ``prefer``-red engine that wins within ``PREFER_WITHIN``× of the
    fastest (the ELS machines: the shift map, which builds no bank; a probe does not time a
    bank's build).

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
import gc
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
import numpy as np

from els_jax.core.cachedir import cache_dir, write_npz_atomic

__all__ = ["Choice", "select", "measure", "autotune_enabled", "platform_signature",
           "cpu_info", "cache_file", "clear_memory_cache", "bucket",
           "probe_order", "PROBE_PAIRS", "PROBE_ROUNDS", "PROBE_BUDGET_S", "ELIMINATE",
           "CLEAR_LEAD", "NEIGHBOUR", "INTERPOLATE_SPAN", "INTERPOLATE_MARGIN", "PREFER_WITHIN"]

SCHEMA = 2                 # bump when the key or the probes change meaning
                           # (2: shift-map probes with two kernel items per core)
PROBE_PAIRS = 2e7          # (query pixel, candidate) pairs per probe call
PROBE_ROUNDS = 5           # timed calls per engine, at most
PROBE_BUDGET_S = 1.0       # seconds of timed calls per selection, about (≥ 2 rounds)
ELIMINATE = 2.5            # an engine this many times slower than the fastest stops being timed
CLEAR_LEAD = 1.5           # after two timed rounds, a fastest engine leading every other by this
                           # factor ends the measurement
NEIGHBOUR = 2.5            # ... and is not probed at the next patch size (k ± 2)
PREFER_WITHIN = 1.1        # a caller's preferred engine wins when this close to the fastest
INTERPOLATE_SPAN = 6       # a size between two measured ones at most this far apart is not
                           # probed: its engines' times are interpolated (``_interpolated``)
INTERPOLATE_MARGIN = 1.25  # ... when the interpolated winner leads by this factor
_clock = time.perf_counter  # the timer (tests substitute a fake one)

_THREAD = "els-autotune"   # the measuring thread's name prefix
_lock = threading.RLock()  # one measurement at a time; guards the caches
_memory: dict = {}         # key → Choice, this process
_by_class: dict = {}       # (kind, shape without k) → {k: probe times}, this process
_per_unit: dict = {}       # (kind, shape without k and merge fraction) → {k: {engine: probe
                           # seconds per unit of work (a probe image)}}, this process
_memo: dict = {}           # key → value of ``remembered``, this process
_memo_lock = threading.Lock()  # its own: a probe's thread may compute an estimate while a
                               # measurement holds _lock


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
    from els_jax.engines import native
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
    return cache_dir() / "engines.json"


def clear_memory_cache():
    """Forgets this process's choices (the disk cache stays; computations already traced keep
    theirs until ``jax.clear_caches()``)."""
    with _lock:
        _memory.clear()
        _by_class.clear()
        _per_unit.clear()
    with _memo_lock:
        _memo.clear()


def bucket(v: int) -> int:
    """v rounded up to a power of two (the shape classes of N and of the batch)."""
    return 1 << max(0, math.ceil(math.log2(max(1, int(v)))))


def _key(kind: str, shape: Mapping, engines: Sequence[str]):
    fields = {"schema": SCHEMA, **platform_signature(), "kind": kind, **dict(shape),
              "engines": sorted(engines)}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24], fields


def _read_disk(path: Path | None = None) -> dict:
    try:
        data = json.loads((path or cache_file()).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_disk(key: str, entry, path: Path | None = None):
    """Adds one entry to the cache file: read, merge, write a temporary file and rename it
    over the old one (atomic: a concurrent reader sees the old or the new file, whole)."""
    path = path or cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_disk(path)
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


def _memo_key(name: str, fields: Mapping) -> str:
    """The key of a remembered value: a hash of its name and fields."""
    text = json.dumps({"name": name, **dict(fields)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def remembered(name: str, fields: Mapping, compute: Callable[[], float]) -> float:
    """``compute()`` (a deterministic statistic of the data, e.g. the fraction of windows
    that merge; not a timing) once per ``fields``, kept in ``$ELS_JAX_CACHE/estimates.json``
    so that a later run skips it. ``fields`` must identify the data (e.g. a hash of what
    compute reads) and the parameters. With ``ELS_JAX_AUTOTUNE=0`` nothing is read or
    written (hermetic runs; the value is the same either way)."""
    if not autotune_enabled():
        return compute()
    key = _memo_key(name, fields)
    path = cache_dir() / "estimates.json"
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    hit = _read_disk(path).get(key)
    if isinstance(hit, dict) and isinstance(hit.get("value"), (int, float)):
        value = float(hit["value"])
    else:
        value = float(compute())
        _write_disk(key, {"value": value, "name": name, "fields": dict(fields)}, path)
    with _memo_lock:
        _memo[key] = value
    return value


def remembered_arrays(name: str, fields: Mapping, compute: Callable[[], dict],
                      max_bytes: int = 64 << 20) -> dict:
    """``compute()`` (a dict of numpy arrays derived deterministically from the data, e.g.
    which rows of a window bank are distinct) once per ``fields``, kept as
    ``$ELS_JAX_CACHE/estimates/<name>_<key>.npz`` (written atomically; only when the arrays
    take at most ``max_bytes``). ``fields`` must identify the data (a hash of every byte
    compute reads) and the parameters. With ``ELS_JAX_AUTOTUNE=0`` nothing is read or
    written. A file that does not load is computed afresh."""
    if not autotune_enabled():
        return compute()
    path = cache_dir() / "estimates" / f"{name}_{_memo_key(name, fields)}.npz"
    try:
        with np.load(path) as z:
            return {key: z[key] for key in z.files}
    except Exception:                             # noqa: BLE001 - absent or unreadable: compute
        pass
    out = compute()
    if sum(np.asarray(v).nbytes for v in out.values()) <= max_bytes:
        try:
            write_npz_atomic(path, **out)
        except OSError as err:
            warnings.warn(f"els_jax: could not write {path}: {err}", RuntimeWarning,
                          stacklevel=2)
    return out


def measure(calls: Mapping[str, Callable[[], object]], *, rounds: int = PROBE_ROUNDS,
            budget: float = PROBE_BUDGET_S, scale: Mapping[str, float] | None = None) -> dict:
    """Seconds per call of each blocking zero-argument call: the minimum over up to ``rounds``
    calls made in alternation after one untimed call each (compilation, first touch of the
    buffers); stops after two rounds once ``budget`` seconds of timed calls are spent, or
    once the fastest leads every other engine still timed by ``CLEAR_LEAD``×. After each
    timed round an engine ``ELIMINATE``× slower than the fastest so far is not called again
    (its time stays as measured). An engine whose untimed call raises is left out (with a
    warning). ``scale``: factors by which engines' times are multiplied before they are
    compared (and returned): a probe that gives one engine more images than the others
    (the shift map's kernel items) is compared at equal work."""
    factor = dict(scale or {})
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
            best[name] = min(best[name], dt * factor.get(name, 1.0))
            spent += dt
        if r >= 1 and spent >= budget:
            break
        # Two rounds that already show a clear winner decide: more rounds refine times that
        # cannot change the outcome (a few per cent from call to call). With the times
        # compared as scaled, the three probes of a cold run of the authors' benchmark (leads
        # of 1.6–4×) took 2.3 s instead of 3.0 s.
        ranked = sorted(best[name] for name in live)
        if r >= 1 and (len(ranked) < 2 or ranked[1] >= CLEAR_LEAD * ranked[0]):
            break
        # An engine ELIMINATE× slower than the fastest cannot win (repeats of a call differ by
        # a few per cent, a disturbance rarely doubles one): it is not called again.
        fastest = min(best.values(), default=math.inf)
        live = {name: call for name, call in live.items()
                if best[name] <= ELIMINATE * fastest}
    return best


def _shape_class(kind: str, shape: Mapping, drop: Sequence[str] = ("k",)) -> str:
    """The shape class without its patch size: sizes k and k ± 2 of one machine share it."""
    return json.dumps({"kind": kind, **{f: v for f, v in shape.items() if f not in drop}},
                      sort_keys=True, default=str)


# The interpolation's shape class: without the patch size and without the fraction of windows
# a merged bank keeps (it differs from size to size of one machine and is already folded into
# the window engines' probe times).
_SPAN_DROP = ("k", "unique")


def _remember(kind: str, shape: Mapping, times, units=None):
    if times and "k" in shape:
        _by_class.setdefault(_shape_class(kind, shape), {})[int(shape["k"])] = dict(times)
        if units:
            _per_unit.setdefault(_shape_class(kind, shape, _SPAN_DROP), {})[
                int(shape["k"])] = {e: t / units for e, t in times.items()}


def probe_order(sizes: Sequence[int]) -> list[int]:
    """The patch sizes of one machine in the order to choose their engines: the smallest, the
    largest, then the middle size of each interval, breadth first (3, 15, 9, 5, 11, 7, 13 for
    3 … 15), so that a size between two measured ones at most ``INTERPOLATE_SPAN`` apart is
    met after both and is interpolated, not probed (``select``)."""
    s = sorted({int(k) for k in sizes})
    if len(s) <= 2:
        return s
    order, queue = [s[0], s[-1]], [(0, len(s) - 1)]
    while queue:
        lo, hi = queue.pop(0)
        if hi - lo >= 2:
            mid = (lo + hi) // 2
            order.append(s[mid])
            queue += [(lo, mid), (mid, hi)]
    return order


def _winner(times: Mapping[str, float], prefer: str | None) -> tuple[str, str]:
    """The fastest engine, or ``prefer`` when it is within ``PREFER_WITHIN``× of the fastest
    (and why, when that decided)."""
    fastest = min(times, key=times.get)
    if prefer in times and prefer != fastest and times[prefer] <= PREFER_WITHIN * times[fastest]:
        return prefer, (f"; {prefer} preferred within {PREFER_WITHIN:g}× of the fastest "
                        f"({fastest})")
    return fastest, ""


def _interpolated(kind: str, shape: Mapping, engines: Sequence[str],
                  prefer: str | None = None) -> Choice | None:
    """The choice at patch size k without a probe, or None (probe it): when this process has
    measured the same shape class (merge fraction aside) at a size below and a size above k,
    at most ``INTERPOLATE_SPAN`` apart, with every engine of ``engines`` timed at both, each
    engine's probe seconds per probe image are taken linear in k between the two. The
    fastest wins if it leads every other engine by ``INTERPOLATE_MARGIN``×; ``prefer`` wins
    if it is within that factor of the fastest; otherwise the size is probed.

    Why: the engines' costs change smoothly with k (the window engines' grow like k²·C, the
    shift map's stays flat or falls as the candidates thin out), so a clear lead at both
    neighbours carries over, and where it is unclear the size is measured. The window
    engines' cost is convex in k, so the straight line flatters them in between: on the
    probes of a cold run of the authors' whole-process benchmark (zero-padded, k = 3 … 15,
    1000 mnist5k digits, B = 1, 2-core AVX-512 Xeon, 2026-12-05) the probes at k = 3, 9 and
    15 put the window kernel at 162 µs per probe image at k = 7 against the shift map's
    188 µs, where a probe at k = 7 measured 184 against 181 µs; sizes 5, 11 and 13 came out
    as their probes (leads of 2.1×, 1.9× and 2.0×). An engine timed at only one of the two
    sizes (not probed at the other) is left out if it took over ``NEIGHBOUR``× the fastest's
    time there too, else the size is probed; one timed at neither: the size is probed."""
    if "k" not in shape:
        return None
    k = int(shape["k"])
    sizes = _per_unit.get(_shape_class(kind, shape, _SPAN_DROP), {})
    lo = max((v for v in sizes if v < k), default=None)
    hi = min((v for v in sizes if v > k), default=None)
    if lo is None or hi is None or hi - lo > INTERPOLATE_SPAN:
        return None
    a, b = sizes[lo], sizes[hi]
    rivals = []
    for e in engines:
        if e in a and e in b:
            rivals.append(e)
            continue
        # Timed at one end only (left out at the other, over NEIGHBOUR× behind at its
        # neighbour): out of the running if over NEIGHBOUR× behind at this end too.
        there = a if e in a else b if e in b else None
        if there is None or there[e] <= NEIGHBOUR * min(there.values()):
            return None
    if not rivals:
        return None
    f = (k - lo) / (hi - lo)
    per_image = {e: a[e] + f * (b[e] - a[e]) for e in rivals}
    ranked = sorted(per_image.values())
    fastest = min(per_image, key=per_image.get)
    if prefer in per_image and per_image[prefer] <= INTERPOLATE_MARGIN * ranked[0]:
        winner = prefer
        why = (f"; {prefer} preferred within {INTERPOLATE_MARGIN:g}× of the fastest "
               f"({fastest})" if prefer != fastest else "")
    elif len(ranked) < 2 or ranked[1] >= INTERPOLATE_MARGIN * ranked[0]:
        winner, why = fastest, ""
    else:                         # too close to call from an interpolation: probe it
        return None
    said = ", ".join(f"{e} {t * 1e6:.3g} µs" for e, t in
                     sorted(per_image.items(), key=lambda kv: kv[1]))
    return Choice(winner, f"interpolated between the probes at k = {lo} and {hi}, per probe "
                          f"image: {said}{why}")


def _clear_neighbour(kind: str, shape: Mapping, engines: Sequence[str]) -> Choice | None:
    """The choice at patch size k without a probe, or None: when at k − 2 or k + 2 of the same
    shape class (measured, or read from the cache, by this process; every engine of
    ``engines`` timed there) one engine took under 1/``NEIGHBOUR`` of every other's time,
    and no measured neighbour names another engine. ``_not_worth_probing``'s bet carried to
    its end: there every engine but the two fastest is left out; here the second is too
    far behind as well. Replayed on 68 such decisions (both boundaries, k 3…15, C 1 and 3,
    banked and streamed, B 1…16, LS's two engines; 2-core Xeon, AVX-512 and held to AVX2,
    2026-12-06), the probe agreed every time. Why: the issue-20 experiment on mnist5k
    probed LS's kernel against its XLA passes at 14 sizes and batches (11 s), each time a
    2–3.8× lead."""
    if "k" not in shape:
        return None
    k, sizes = int(shape["k"]), _by_class.get(_shape_class(kind, shape), {})
    leads = set()
    for near in (k - 2, k + 2):
        times = sizes.get(near)
        if times is None:
            continue
        if not set(engines) <= set(times):
            return None
        ranked = sorted((times[e], e) for e in engines)
        if len(ranked) < 2 or ranked[1][0] < NEIGHBOUR * ranked[0][0]:
            return None
        leads.add((ranked[0][1], near))
    if not leads or len({e for e, _ in leads}) > 1:
        return None
    winner, near = min(leads, key=lambda lead: lead[1])
    return Choice(winner, f"not probed: at k = {near} {winner} led every other engine by "
                          f"≥ {NEIGHBOUR:g}× ({_format_times(sizes[near])})")


def _not_worth_probing(kind: str, shape: Mapping, engines: Sequence[str]) -> tuple[set, str]:
    """Engines not probed at patch size k because at k − 2 or k + 2 of the same shape class
    (measured or read from the cache by this process) they took over ``NEIGHBOUR``× the
    fastest's time; the two fastest there are always probed. An engine's cost changes with
    k, but rarely that fast: replayed on the 144 decisions of a 2-core AVX-512 CPU's engine
    cache that had a measured neighbouring size (2026-12-05), this rule at 2.5× changed no
    decision and left out 17 % of the probes (at 2× one decision came out 4.9 % slower)."""
    if "k" not in shape:
        return set(), ""
    k, sizes = int(shape["k"]), _by_class.get(_shape_class(kind, shape), {})
    near = [v for v in (k - 2, k + 2) if v in sizes]
    if not near:
        return set(), ""
    times = sizes[near[0]]
    ranked = sorted((t, e) for e, t in times.items() if e in engines)
    if len(ranked) < 3:
        return set(), ""
    fastest = ranked[0][0]
    skip = {e for t, e in ranked[2:] if t > NEIGHBOUR * fastest}
    if not skip:
        return set(), ""
    return skip, (f"; not probed: {', '.join(sorted(skip))} (over {NEIGHBOUR:g}× the fastest "
                  f"at k = {near[0]})")


def _format_times(times: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {sec * 1e3:.3g} ms" for name, sec in
                     sorted(times.items(), key=lambda kv: kv[1]))


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or not Linux)."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_memory():
    """Hands the probes' freed buffers back to the OS. They were allocated on the measuring
    thread, whose malloc arena glibc keeps (not reused by the caller's thread): without this,
    a first make_machine at CIFAR-10's N kept ~0.7 GB of dead probe memory resident through
    the whole sample."""
    gc.collect()                        # the probes' executables and arrays, unreferenced
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _run_apart(fn):
    """fn() on a thread of its own: no jit trace of the caller is active there (the probes
    must run, not be staged into the caller's program)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD) as pool:
        return pool.submit(fn).result()


def select(kind: str, shape: Mapping, engines: Sequence[str], static: str, static_reason: str,
           probes: Callable[[], tuple] | None = None, prefer: str | None = None) -> Choice:
    """The engine for ``kind`` ("els" | "local" | ...) at ``shape`` among the applicable
    ``engines`` (see the module docstring).

    static, static_reason: the static rule's engine and why (used when autotuning is off or
    nothing can be probed). probes: () → (calls, note, scale): calls maps each engine to a
    blocking zero-argument call on a probe; note describes the probe (e.g. "N = 64");
    scale maps engines to factors applied to their measured times (or None); a fourth
    element, if given, is the probe's units of work (its images), by which the times are
    divided for the interpolation between patch sizes (``_interpolated``). prefer: an engine
    that wins when within ``PREFER_WITHIN``× of the fastest (a cost the probe does not time
    favours it, e.g. a bank the others must build)."""
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
            _remember(kind, shape, choice.times, entry.get("units"))
            return choice
        guess = _interpolated(kind, shape, engines, prefer) or _clear_neighbour(kind, shape,
                                                                                engines)
        if guess is not None:         # not written to disk: only measurements are
            _memory[key] = guess
            return guess
        skip, skipped = _not_worth_probing(kind, shape, engines)

        def run():
            try:
                calls, note, scale, *units = probes()
            except Exception as err:              # noqa: BLE001 - fall back to the rule
                warnings.warn(f"els_jax: building the engine probes failed "
                              f"({type(err).__name__}: {str(err)[:200]}); static rule",
                              RuntimeWarning, stacklevel=2)
                return {}, "", None
            times = measure({name: call for name, call in calls.items() if name not in skip},
                            scale=scale)
            return times, note, (units[0] if units else None)
        start = _clock()
        times, note, units = _run_apart(run)
        _release_freed_memory()
        if not times:
            choice = Choice(static, f"{static_reason}; every probe failed")
            _memory[key] = choice
            return choice
        winner, preferred = _winner(times, prefer)
        reason = (f"measured on a probe ({note}), per call: {_format_times(times)}; "
                  f"{_clock() - start:.2g} s with compilation{skipped}{preferred}")
        choice = Choice(winner, reason, {k: round(v, 6) for k, v in times.items()})
        _memory[key] = choice
        _remember(kind, shape, choice.times, units)
        _write_disk(key, {"engine": winner, "reason": reason, "times": choice.times,
                          "units": units, "fields": fields,
                          "when": datetime.datetime.now().isoformat(timespec="seconds")})
        return choice

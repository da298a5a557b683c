"""The one engine selector: which exact engines apply to a machine, their static rules, and
the probes that time them (the measuring and its cache are ``autotune.py``).

  ELS main pass (``resolve_els_engine``): "window" (``window.py``) | "row" (``row.py``)
      (XLA) | "native" (``interior.py``: the fused CPU kernel of the zero-padded interior,
      ``native.py``: banked machines without merged windows, k < H, W) | "window_native"
      (``window.py`` with the fused CPU kernel of a window bank, merged or not: banked
      machines, any boundary) | "shiftmap" (``shiftmap.py``: every pixel from shift maps
      and box sums, O(C) per pair at every k, straight from the images; its fused CPU kernel,
      or its jnp form elsewhere)
  LS (``local.py``): "kernel" (``native.py``) | "xla" (local.py's passes)

A static rule tuned on one CPU picked, on another (AVX2 instead of AVX-512), an engine 6×
slower than the best (zero-padded ELS, N = 1000, 32×32): so "auto" measures
(``autotune.select``), and the static rule decides only with ``ELS_JAX_AUTOTUNE=0``, without
a probe, or on a mesh. Machines call ``resolve_els_engine`` / ``resolve_local_engine`` before
they build anything; engines never call the selector.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core.data import unit_images
from els_jax.engines import interior as interior_lib
from els_jax.engines import layout as geo
from els_jax.engines import local as local_lib
from els_jax.engines import native, passes
from els_jax.engines import row as row_lib
from els_jax.engines import window as window_lib
from els_jax.engines.autotune import (PROBE_PAIRS, Choice, autotune_enabled, bucket, cpu_info,
                                      select)

__all__ = ["resolve_els_engine", "resolve_local_engine", "els_engine", "local_engine",
           "choose_method", "native_interior_ok", "native_window_ok", "METHODS",
           "LOCAL_ENGINES", "Choice", "autotune_enabled"]

PROBE_BANK_BYTES = 256 << 20    # the most memory one engine's probe bank may take

# Probe queries sit on the noisy manifold of their images at a = b² = 0.5 (t ≈ 0.5): weights
# neither uniform nor one-hot.
_PROBE_A, _PROBE_B2 = 0.5 ** 0.5, 0.5

# ----------------------------------------------------------------------------------------
# The ELS main pass: which engines apply, the static rule, and the choice.

METHODS = ("auto", "window", "row", "native", "window_native", "shiftmap")

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
    return jax.default_backend() == "cpu" and native.available()


def native_interior_ok(k: int, h: int, w: int, boundary: str) -> bool:
    """Whether the fused CPU kernel can compute the main pass: zero padding, an interior
    (k < H, W), the default backend a CPU and the kernel built (``native.available()``)."""
    return (boundary == "zeros" and k < min(h, w) and jax.default_backend() == "cpu"
            and native.available())


def resolve_els_engine(method, k, c, h, boundary, unique_fraction=1.0, banked=False, w=None,
                       *, wrap_patches=False, n=None, batch=1, sharded=False,
                       block=1 << 20, probe_images=None) -> Choice:
    """The engine of the ELS main pass and why: the one place that decides.

    An explicit ``method`` wins ("native" and "window_native" raise where their kernel cannot
    run). "auto": the applicable engines are "window", "row" and "shiftmap" (which needs no
    bank, so a machine that picks it streams from the images); for a banked machine on a CPU
    with the kernels built, "window_native" (the window bank run by the fused kernel), and
    "native" (the fused interior kernel, which does not merge windows) when the machine is
    zero-padded. ``els_engine`` times them on a probe (n = the number of training images,
    B = ``batch``) and caches the winner. With ``ELS_JAX_AUTOTUNE=0``, without n, or
    ``sharded``, the static rule decides. On a CPU with the kernels built: the shift-map
    kernel at k ≥ 7 and for every streamed pass (no bank); a banked k ≤ 5, the interior
    kernel when it applies and windows are not merged (except at k = 3 with C ≥ 2, where the
    window engine's short matmul won when the rule was set), else ``choose_method``'s cost
    model, its "window" run by the window bank's kernel. Elsewhere the cost model ("window"
    or "row"). The measurements behind each rule are in the comments below."""
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
    applicable = ("window", "row", "shiftmap")      # shiftmap: no bank, streamed or not
    window_kernel = banked and native_window_ok()
    if window_kernel:
        applicable += ("window_native",)
    # (the interior kernel reads every window, merged or not: its probe is not scaled)
    kernel = banked and native_interior_ok(k, h, w, boundary)
    if kernel:
        applicable += ("native",)
    kernels_here = native.available() and jax.default_backend() == "cpu"
    if banked and k >= 7 and kernels_here:
        # The shift-map kernel (no bank) won 69 of the 74 banked 32×32 shape classes this
        # project probed at k ≥ 7 (both boundaries, C 1 and 3, B 1…16, N up to 262 144; the
        # window bank's kernel won 3 with merged banks at k = 7, by ≤ 1.6×, and the interior
        # kernel 2 at k = 27, C = 3, by ≤ 1.3×); at k ≤ 5 the window bank's kernel won 33 of
        # 35.
        static = "shiftmap"
        why = "static rule: the shift-map kernel at k ≥ 7 on a CPU with the kernels (no bank)"
    elif kernel and unique_fraction >= 1.0 and not (k <= 3 and c >= 2):
        static = "native"
        why = ("static rule: the fused CPU kernel for a banked zero-padded machine without "
               "merged windows (not at k = 3, C ≥ 2)")
    elif not banked and kernels_here:
        # A streamed pass where the CPU kernels run: the shift-map kernel won every 32×32
        # streamed shape class this project probed (60 classes: both boundaries, k 3…27, C 1
        # and 3, B 1…16, AVX-512 and held to AVX2; 2-core Xeon, 2026-12-06) by ≥ 1.35×, median
        # 4.1×; the XLA engines led only on toy images (H ≤ 12), where a call takes
        # microseconds. (XLA's window engine at CIFAR-10's shape, k = 27: 8.5 s against 0.68 s.)
        static = "shiftmap"
        why = "static rule: the shift-map kernel for a streamed pass on a CPU with the kernels"
    else:
        static = choose_method(k, c, h, boundary, unique_fraction)
        why = "static rule: choose_method's cost model"
        if static == "window" and window_kernel:
            static = "window_native"
            why += ", the window bank run by the fused CPU kernel"
    if kernels_here and static != "row":
        # Where the CPU kernels run, the row engine never won a probe: in the 77 shape
        # classes measured against the shift-map kernel (AVX-512, 2026-12-05; banked and
        # streamed, both boundaries, k 3…27, C 1 and 3) it was at least 1.49× slower than the
        # winner. Probing it cost about a fifth of a cold first run's probes; it is not probed
        # there (method="row" still runs it; off the CPU it is one of the XLA engines).
        applicable = tuple(e for e in applicable if e != "row")
    if kernels_here and not banked:
        # A streamed pass where the CPU kernels run: the shift-map kernel won all 60 streamed
        # 32×32 classes probed (see the static rule above), by ≥ 1.35×; the XLA window engine
        # was most of each size's 0.7–2.3 s of probing (its compilation and its calls, 12× the
        # shift map's at k = 27 with C = 3). Not probed there (method="window" still runs it).
        applicable = tuple(e for e in applicable if e != "window")
    if window_kernel:
        # The same window bank is run by its fused kernel ("window_native") there, and the XLA
        # window engine never came near the winner: on the probes of 24 banked shape classes
        # (experiments/bench_probes.py: both boundaries, k 3…15, C 1 and 3), run twice on a
        # 2-core Xeon (2026-12-06, AVX-512 and held to AVX2), it was at least 1.39× slower
        # than the best other engine (2.0× with AVX-512). Its probe (its own bank, its
        # compilation, its calls) was a third of a cold probe's time; it is not probed
        # (method="window" still runs it; streamed, without a bank kernel, it is probed).
        applicable = tuple(e for e in applicable if e != "window")
    return els_engine(applicable, static, why, k=k, c=c, h=h, w=w, boundary=boundary,
                      wrap_patches=wrap_patches, n=n, batch=batch, banked=banked,
                      unique_fraction=unique_fraction, sharded=sharded, block=block,
                      probe_images=probe_images)


# ----------------------------------------------------------------------------------------
# The machines' probes: the machine's own images spread over the set (else synthetic ones of
# its shape class), the same code paths.


def _probe_inputs(n: int, batch: int, h: int, w: int, c: int, data=None):
    """Images [n, H, W, C]: n of the machine's own training images ``data`` when given (and
    as many), spread evenly over them (``window.spread_sample``: a set sorted by class is
    probed on every class), else uniform in [−1, 1]; queries [B, H, W, C] on their noisy
    manifold and the coefficients a, b² [B] (weights neither uniform nor one-hot),
    reproducible."""
    rng = np.random.default_rng(0)
    if data is not None and len(data) >= n:
        images = np.asarray(unit_images(window_lib.spread_sample(data, n)),
                            np.float32).reshape(n, h, w, c)
    else:
        images = rng.uniform(-1, 1, (n, h, w, c)).astype(np.float32)
    x = 0.7 * images[rng.integers(0, n, batch)] + 0.7 * rng.normal(size=(batch, h, w, c))
    return (images, jnp.asarray(x, jnp.float32), jnp.full((batch,), _PROBE_A, jnp.float32),
            jnp.full((batch,), _PROBE_B2, jnp.float32))


def _probe_images(n: int, pairs_per_image: int, multiple: int = 32, least: int = 0) -> int:
    """Images in a probe: about PROBE_PAIRS pairs per call, at least ``least`` and one block of
    32 per core (the kernels split the images over the cores in blocks of 32), at most n, a
    multiple of ``multiple``."""
    least = max(least, 32 * (cpu_info()["cores"] or 1))
    want = max(least, int(PROBE_PAIRS // max(1, pairs_per_image)))
    want = -(-want // multiple) * multiple
    return int(min(n, want))


def _els_probe_calls(k, c, h, w, boundary, wrap_patches, n, batch, engines, banked, block,
                     data=None):
    """(calls, note, scale, probe images) for ``select``: each ELS engine's main pass (the
    zero-padded border pass is the same for every engine and left out) on training images
    ``data`` (a machine's own, spread over the set; synthetic images without them), banked as
    ``passes.build_bank`` builds it (without merging) or streamed as ``passes.stream_x0``
    streams it.

    Why the machine's own images: on uniform random images the window bank run by its kernel
    and the shift map took about the same time at k = 5 (mnist5k sizes, B = 1 and 16), on the
    digits themselves the bank took 0.17–0.21 s per call against the shift map's 0.29–0.33 s
    (N = 1000, B = 1, t = 0.2…0.8), and the digits' probe says so (13.6 vs 20.4 ms). Why
    spread over the set: mnist5k is sorted by class; on its first images (all zeros) the
    probe and the merge estimate called N = 5000, B = 16, k = 5 a tie (0.275 vs 0.273 s) where
    the bank took 13.6 s against the shift map's 26.1 s; spread, 174 vs 279 ms."""
    main = geo.layout(k, boundary, wrap_patches, h, w)[0]
    per_image = batch * main.query_pixels.size * main.cand_pixels.size
    n_probe = _probe_images(n, per_image)
    # A probe's banks stay small: its window bank (the largest: k²C + C + 2 floats per
    # candidate) within PROBE_BANK_BYTES. At k = 27 on 32×32 a probe of 2·10⁷ pairs would
    # otherwise take all 50 000 CIFAR-sized images and a 16 GB bank.
    per_image_bytes = 4 * main.cand_pixels.size * (k * k * c + c + 2)
    n_probe = int(min(n_probe, max(32, PROBE_BANK_BYTES // per_image_bytes)))
    n_shift, scale = n_probe, None
    if "shiftmap" in engines:
        # The shift-map kernel splits its work into (query image, block of images) items
        # over the cores: a probe with fewer than two items per core leaves a core idle
        # and times the kernel at half its speed, while the other engines use every core on
        # any N. Measured (CIFAR-10 shape, k = 3, zeros, B = 1): on 64 probe images the shift
        # map lost to the window engine (48 vs 39 ms), on all 50 000 images it took 22.2 s per
        # call against the window engine's 36.5 s. So it gets images enough for its items
        # (2·cores blocks of ``native.shift_block()`` images over the batch: 512 at B = 1 on 2
        # AVX-512 cores) and its time is scaled to the others' N: the cost of every
        # engine is linear in N. (Giving every engine those images made each probe call 2–6×
        # longer than PROBE_PAIRS asks, most of a cold first run's probe time.)
        cores = cpu_info()["cores"] or 1
        block_images = native.shift_block()
        n_shift = int(min(n, max(n_probe, block_images * -(-2 * cores // max(1, batch)))))
        if n_shift != n_probe:
            scale = {"shiftmap": n_probe / n_shift}
    shift_images, x, a, b2 = _probe_inputs(n_shift, batch, h, w, c, data)
    images = window_lib.spread_sample(shift_images, n_probe)   # spread over the set too
    mu = images.mean(axis=(0, 1, 2))
    calls = {}
    for engine in engines:
        if not banked and engine != "shiftmap":
            lay = row_lib.row_layout(k, boundary, wrap_patches, h, w) if engine == "row" else None
            groups = geo.grouped_passes(k, boundary, wrap_patches, h, w, False, engine)
            fn = jax.jit(functools.partial(passes.stream_states, k=k, block=block, lay=lay,
                                           groups=groups))
            args = (x, a, b2, jnp.asarray(images), jnp.zeros((n_probe,), jnp.float32),
                    jnp.asarray(mu))
            calls[engine] = functools.partial(lambda fn, args: jax.block_until_ready(fn(*args)),
                                              fn, args)
            continue
        row, windows, interior, chunks, row_images = None, (), None, (), 0
        if engine == "shiftmap":                  # no bank: the whole x̂_0 from the images
            fn = jax.jit(functools.partial(passes.stream_x0, k=k, boundary=boundary,
                                           wrap_patches=bool(wrap_patches), block=block,
                                           method="shiftmap"))
            args = (x, a, b2, jnp.asarray(shift_images), jnp.zeros((n_shift,), jnp.float32))
            calls[engine] = functools.partial(lambda fn, args: jax.block_until_ready(fn(*args)),
                                              fn, args)
            continue
        if engine in ("window", "window_native"):  # build_bank's main pass, not merged
            gp = geo.grouped_passes(k, boundary, wrap_patches, h, w, False, "window")[0]
            bank, ch = window_lib.build_window_bank(images, k, gp, mu, dedup=False, block=block)
            windows, chunks = (bank,), (ch,)
        elif engine == "row":
            lay = row_lib.row_layout(k, boundary, wrap_patches, h, w)
            row, row_images = row_lib.build_row_bank(images, k, lay, mu, block=block)
        else:                                     # "native"
            interior = interior_lib.build_interior_bank(images, k, mu)
        bank = passes.MachineBank(jnp.asarray(mu), row, windows, None, interior)
        spec = passes.BankSpec(int(k), boundary, bool(wrap_patches), False, engine, chunks,
                               int(row_images), 1.0, 0)
        calls[engine] = functools.partial(
            lambda bank, spec: jax.block_until_ready(passes.bank_x0(
                x, a, b2, bank, spec=spec, block=block)), bank, spec)
    own = data is not None and len(data) >= n_shift
    note = f"{n_probe} {'training' if own else 'synthetic'} images, B = {batch}, main pass"
    if scale:
        note += f"; shiftmap on {n_shift}, its time scaled by {n_probe}/{n_shift}"
    return calls, note, scale, n_probe


def els_engine(engines: Sequence[str], static: str, static_reason: str, *, k: int, c: int,
               h: int, w: int, boundary: str, wrap_patches: bool = False, n: int | None = None,
               batch: int = 1, banked: bool = True, unique_fraction: float = 1.0,
               sharded: bool = False, block: int = 1 << 20, probe_images=None) -> Choice:
    """The ELS main pass's engine among ``engines`` (see ``resolve_els_engine``, which
    decides which apply and the static rule). A window bank whose duplicate windows are merged
    holds ``unique_fraction`` of the candidates: its probe time is scaled by that fraction.
    ``probe_images``: the machine's training images (concrete, not traced), probed instead of
    synthetic ones; decisions measured on them are cached apart. Without N (unknown), or
    split over a mesh, the static rule decides."""
    shape = {"boundary": boundary, "wrap_patches": bool(wrap_patches), "k": int(k),
             "C": int(c), "H": int(h), "W": int(w), "N": bucket(n or 1), "B": bucket(batch),
             "path": "bank" if banked else "stream",
             "unique": round(float(unique_fraction), 2), "block": int(block)}
    if probe_images is not None:
        shape["probe"] = "training images"
    probes = None
    if n is not None and not sharded:
        def probes():
            calls, note, scale, units = _els_probe_calls(
                k, c, h, w, boundary, wrap_patches, n, batch, engines, banked, block,
                probe_images)
            scale = dict(scale or {})
            if unique_fraction < 1.0:
                scale.update(window=unique_fraction, window_native=unique_fraction)
            return calls, note, scale or None, units
    # A banked machine that picks the shift map builds no bank: its build time and memory,
    # which no probe times (in a one-sample run of the authors' benchmark the k = 7 window
    # bank, 7–16 % ahead per call, cost 0.4 s more to build than it saved), decide a near tie.
    prefer = "shiftmap" if banked and "shiftmap" in engines else None
    return select("els", shape, engines, static, static_reason, probes, prefer)


def local_engine(*, k: int, c: int, h: int, w: int, n: int, batch: int = 1,
                 block: int = 1 << 20) -> Choice:
    """The LS engine: "kernel" (the fused CPU kernel) or "xla". The kernel applies when it is
    built and the default backend is a CPU; the static rule takes it whenever it applies."""
    if jax.default_backend() != "cpu" or not native.available():
        return Choice("xla", "the only applicable engine (no CPU kernel on this backend)")
    shape = {"k": int(k), "C": int(c), "H": int(h), "W": int(w), "N": bucket(n),
             "B": bucket(batch), "block": int(block)}

    def probes():
        n_probe = _probe_images(n, batch * h * w, least=256)
        images, x, a, b2 = _probe_inputs(n_probe, batch, h, w, c)
        bank = local_lib.build_local_bank(local_lib.transpose_images(images), k=k)
        log_w = jnp.zeros((n_probe,), jnp.float32)
        a, b2 = a.reshape(-1, 1, 1, 1), b2.reshape(-1, 1, 1, 1)
        q = local_lib.local_queries(x, a, bank.mean)
        kernel = jax.jit(lambda q, a, b2, bank, lw: native.local_softmax_state(
            q, a.reshape(-1), b2.reshape(-1), bank.centred_and_ones, bank.half_sq, lw, k))
        xla = jax.jit(lambda q, a, b2, bank, lw: local_lib._local_bank_state_q(
            q, a, b2, bank, lw, k, block))
        args = (q, a, b2, bank, log_w)
        return ({"kernel": lambda: jax.block_until_ready(kernel(*args)),
                 "xla": lambda: jax.block_until_ready(xla(*args))},
                f"{n_probe} synthetic images, B = {batch}", None, n_probe)
    return select("local", shape, ("kernel", "xla"), "kernel",
                  "static rule: the fused CPU kernel whenever it is built", probes)


LOCAL_ENGINES = ("auto",) + local_lib.ENGINES


def resolve_local_engine(engine, *, k, c, h, w, n, batch=1, block=1 << 20) -> Choice:
    """The LS engine for queries [batch, H, W, C] against n images, and why: "kernel" (the
    fused CPU kernel) or "xla" as asked, or for "auto" ``local_engine`` (measured once per
    shape class; with ``ELS_JAX_AUTOTUNE=0`` the kernel whenever it is built)."""
    if engine not in LOCAL_ENGINES:
        raise ValueError(f"unknown LS engine {engine!r}; choose one of {LOCAL_ENGINES}")
    if engine == "kernel":
        if jax.default_backend() != "cpu" or not native.available():
            raise ValueError("engine='kernel' (the fused CPU kernel) needs a CPU backend and a "
                             "C++ compiler (see els_jax.engines.native)")
        return Choice("kernel", "engine='kernel' (explicit)")
    if engine == "xla":
        return Choice("xla", "engine='xla' (explicit)")
    return local_engine(k=k, c=c, h=h, w=w, n=n, batch=batch, block=block)

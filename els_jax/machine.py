"""Analytic machines as sampler models: ``make_machine`` → ``eps_fn(x, t, i)`` (SPEC §2–3).

    eps_fn = make_machine("els", images, scales=[3, 3, 5, ...], boundary="zeros")
    x0 = sample(eps_fn, x_T, uniform_times(len(scales)))

``scales`` holds one patch size per sampler step with index 0 = the lowest-noise (last) step,
as in the authors' scale files: step i of an m-step run uses scales[m − 1 − i]. A plain int
means one size for every step. The step is chosen by the sampler's step index, never by
rounding a float32 t. The machine's ``num_steps`` lets ``sample`` reject a grid of another
length.

Everything that does not depend on x is built once here: the class-conditional selection of
images, and for the ideal and ELS machines one deduplicated candidate bank per distinct patch
size (optionally sharded over the devices of a mesh); each patch size compiles once.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from els_jax import conversions, els, patches
from els_jax import schedules as schedules_lib
from els_jax import equivariant as equivariant_lib
from els_jax import local as local_lib
from els_jax.local import _check_local_k

__all__ = ["Machine", "make_machine", "MACHINES", "candidate_mesh"]

MACHINES = ("ideal", "equivariant", "local", "els")


def candidate_mesh(devices=None):
    """A one-axis mesh ("cands") over ``devices`` (default: all) for sharding candidate banks."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), ("cands",))


class Machine:
    """A callable sampler model ``eps_fn(x, t, i) -> ε̂`` wrapping an analytic machine.

    Attributes:
      kind: "ideal" | "equivariant" | "local" | "els".
      scales: tuple of patch sizes (index 0 = last step) or None (one size / no size).
      num_steps: len(scales) when a list was given, else None (any grid length).
    Methods:
      x0(x, t, i): the machine's x̂_0; score(x, t, i): its score; patch_size(i).
    """

    def __init__(self, kind, x0_fns, scales, schedule, k_const):
        self.kind = kind
        self._x0_fns = x0_fns                     # patch size (or None) -> fn(x, t)
        self.scales = scales
        self.num_steps = None if scales is None else len(scales)
        self.schedule = schedule
        self._k_const = k_const

    def patch_size(self, i: int):
        if self.scales is None:
            return self._k_const
        if not 0 <= i < len(self.scales):
            raise ValueError(f"step index {i} is outside the {len(self.scales)}-step scale list")
        return self.scales[len(self.scales) - 1 - i]

    def lower(self, x, t, i: int):
        """The jitted computation of ``x0(x, t, i)`` lowered for these shapes (``.compile()``
        it to compile ahead of the first call, or for its ``memory_analysis()``)."""
        fn = self._x0_fns[self.patch_size(i)]
        return fn.lower(x, t) if hasattr(fn, "lower") else None

    def compile(self, x, t=0.5) -> float:
        """Compiles the computation of every distinct patch size for queries shaped like x
        [B, H, W, C]. XLA keeps the compiled executables, so the sampler's first call per
        patch size only traces (milliseconds) instead of compiling. Returns the seconds spent."""
        start = time.perf_counter()
        x = jnp.asarray(x, jnp.float32)
        t = jnp.asarray(t, jnp.float32)
        for fn in self._x0_fns.values():
            if hasattr(fn, "lower"):
                fn.lower(x, t).compile()
        return time.perf_counter() - start

    def engine(self, i: int) -> dict:
        """How step i is computed: {"engine": "window" | "row" | "local" | ..., "bank": bool,
        "unique_fraction": estimated fraction of distinct candidate windows}."""
        return dict(getattr(self._x0_fns[self.patch_size(i)], "info", {"engine": self.kind}))

    def bank_spec(self, i: int):
        """The ``els.BankSpec`` used at step i (engine, chunking, dedup), or None (no bank)."""
        return getattr(self._x0_fns[self.patch_size(i)], "spec", None)

    def x0(self, x, t, i: int):
        return self._x0_fns[self.patch_size(i)](x, t)

    def score(self, x, t, i: int):
        return conversions.x0_to_score(self.x0(x, t, i), x, t, schedule=self.schedule)

    def __call__(self, x, t, i: int):
        return conversions.x0_to_eps(self.x0(x, t, i), x, t, schedule=self.schedule)

    def __repr__(self):
        return f"Machine({self.kind!r}, scales={self.scales}, num_steps={self.num_steps})"


def _inputs(x, t, mesh):
    """Queries and times as float32; with a mesh, replicated over it. The sampler's x_T lives
    on one device and every later x on the mesh (a machine's outputs are replicated there):
    placing both the same way gives one input sharding, so one executable per patch size."""
    x, t = jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)
    if mesh is None:
        return x, t
    return jax.device_put((x, t), NamedSharding(mesh, PartitionSpec()))


def _absent_padding(n: int, mesh):
    """How many absent candidates make N a multiple of the mesh's devices, and the log
    weights [N + pad]: 0 for the N images, −inf (contributes exactly nothing) for the pad."""
    pad = 0 if mesh is None else -n % mesh.devices.size
    return pad, jnp.concatenate([jnp.zeros((n,), jnp.float32),
                                 jnp.full((pad,), -jnp.inf, jnp.float32)])


def _pad_axis(a, pad: int, axis: int):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths)


def _split_images(images_j, mesh):
    """Images [N, ...] and zero log weights [N] (unchanged without a mesh); with one, padded
    with absent images to a multiple of the devices and placed split over them once, so no
    call moves them."""
    pad, log_w = _absent_padding(images_j.shape[0], mesh)
    if mesh is None:
        return images_j, log_w
    split = NamedSharding(mesh, PartitionSpec("cands"))
    return jax.device_put(_pad_axis(images_j, pad, 0), split), jax.device_put(log_w, split)


def _stream_fn(images_j, k, boundary, wrap_patches, schedule, method, block, unique,
               mesh=None):
    """ELS x̂_0 with candidates streamed straight from the images (no bank); with a ``mesh``
    the images are split over its devices (the data mean stays that of the whole set)."""
    mu = jnp.mean(images_j, axis=(0, 1, 2))
    images, log_w = _split_images(images_j, mesh)
    kw = dict(k=k, boundary=boundary, wrap_patches=wrap_patches, schedule=schedule,
              block=block, method=method, mesh=mesh)

    def fn(x, t):
        return els._stream_images_x0(*_inputs(x, t, mesh), images, log_w, mu, **kw)
    fn.lower = lambda x, t: els._stream_images_x0.lower(*_inputs(x, t, mesh), images, log_w,
                                                         mu, **kw)
    fn.info = {"engine": method, "bank": False, "unique_fraction": round(unique, 4)}
    fn.bank = images
    return fn


def _local_fn(images_t, k, schedule, block, mesh=None):
    """LS x̂_0 from a ``local.LocalBank`` built once for this patch size; with a ``mesh`` the
    bank is padded with absent images (log w = −inf) to a multiple of the devices and placed
    split over them once, here, so no call moves it."""
    bank = local_lib.build_local_bank(images_t, k=k)
    pad, log_w = _absent_padding(images_t.shape[3], mesh)
    if mesh is not None:                      # images along the last axis; the mean is shared
        bank = bank._replace(centred_and_ones=_pad_axis(bank.centred_and_ones, pad, 3),
                             half_sq=_pad_axis(bank.half_sq, pad, 2))
        bank = jax.device_put(bank, _named(mesh, local_lib.BANK_SHARDING))
        log_w = jax.device_put(log_w, NamedSharding(mesh, PartitionSpec("cands")))
    kw = dict(k=k, schedule=schedule, block=block, mesh=mesh)

    def fn(x, t):
        return local_lib.local_bank_x0(*_inputs(x, t, mesh), bank, log_w, **kw)
    fn.info = {"engine": "local", "bank": True}
    fn.bank = bank
    fn.lower = lambda x, t: local_lib.local_bank_x0.lower(*_inputs(x, t, mesh), bank, log_w,
                                                          **kw)
    return fn


def _equivariant_fn(images_j, schedule, block, mesh=None):
    """ES x̂_0 over all translates of the images (FFT; no bank). With a ``mesh`` the images are
    padded with absent ones (log w = −inf) to a multiple of the devices and placed split over
    them once, here."""
    mu = jnp.mean(images_j, axis=(0, 1, 2))
    images, log_w = _split_images(images_j, mesh)
    kw = dict(schedule=schedule, block=block, mesh=mesh)

    def fn(x, t):
        return equivariant_lib._equivariant_x0(*_inputs(x, t, mesh), images, log_w, mu, **kw)
    fn.info = {"engine": "fft", "bank": False}
    fn.bank = images
    fn.lower = lambda x, t: equivariant_lib._equivariant_x0.lower(*_inputs(x, t, mesh), images,
                                                                  log_w, mu, **kw)
    return fn


class _BackgroundCompiler:
    """Compiles each patch size's x̂_0 on one worker thread as soon as its bank exists, while
    the main thread builds the next bank: XLA's compiler and the (memory-bound) bank building
    overlap on two cores (20-step sample, N = 1000, 7 patch sizes: banks + compile 8.9–10.2 s
    in sequence, 6.9–7.1 s overlapped). XLA keeps the executables, so later calls only trace."""

    def __init__(self, x, image_shape):
        self._x = None
        if x is None:
            return
        shape = tuple(int(d) for d in (x if isinstance(x, (tuple, list)) else np.shape(x)))
        if len(shape) != 4 or shape[1:] != tuple(image_shape):
            raise ValueError(f"compile_for must be queries [B, H, W, C] (or their shape) with "
                             f"H, W, C = {tuple(image_shape)} of the images; got {shape}")
        self._x = jnp.zeros(shape, jnp.float32)
        self._t = jnp.asarray(0.5, jnp.float32)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="els-compile")
        self._futures = []

    def submit(self, fn):
        if self._x is not None and hasattr(fn, "lower"):
            self._futures.append(self._pool.submit(lambda: fn.lower(self._x, self._t).compile()))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if self._x is None:
            return
        try:
            if exc_type is None:
                for f in self._futures:
                    f.result()                    # re-raises a compile error here
        finally:
            self._pool.shutdown(cancel_futures=True)


def _named(mesh, specs):
    """A pytree of PartitionSpecs → the same tree of NamedShardings on ``mesh``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda v: isinstance(v, PartitionSpec))


def _normalise_scales(kind, scales):
    if kind in ("ideal", "equivariant"):
        return None, None
    if scales is None:
        raise ValueError(f"the {kind!r} machine needs scales (an odd patch size or a list)")
    if isinstance(scales, (int, np.integer)):
        return None, int(scales)
    scales = tuple(int(k) for k in scales)
    if not scales:
        raise ValueError("scales is empty")
    return scales, None


def make_machine(kind: str, images, *, scales: int | Sequence[int] | None = None,
                 boundary: str = "circular", wrap_patches: bool = False,
                 schedule=schedules_lib.Cosine(), mask=None, dedup: bool = True,
                 mesh=None, chunk: int | None = None, method: str = "auto",
                 block: int = els.DEFAULT_BLOCK, bank_bytes: int = 2 << 30,
                 dedup_threshold: float = 0.9, compile_for=None) -> Machine:
    """Builds an analytic machine as a sampler model.

    Args:
      kind: "ideal", "equivariant", "local" or "els".
      images: training set [N, H, W, C] in [−1, 1].
      scales: local/els only: an odd patch size, or one per step (index 0 = last step).
      boundary, wrap_patches: els only (see ``els_score``).
      schedule: the noise schedule (a Schedule or its name).
      mask: optional boolean [N] (class-conditional: the images of one label).
      dedup: merge identical candidate windows (exact; ideal and els) when an estimate on
        256 images says merging leaves at most ``dedup_threshold`` of them (digit-like data
        with blank background; random images have no duplicates).
      mesh: optional ``candidate_mesh()``: shard the candidate banks over its devices.
      chunk: candidates per streamed chunk of a window bank (default: from ``block``).
      method: els only: "auto" (the cheaper exact engine per patch size: for zero padding
        without merged windows on a CPU, the fused kernel ``els_jax.native``; otherwise see
        ``els.choose_method``), "window", "row" or "native".
      block: logits per streamed chunk (memory knob).
      bank_bytes: largest bank to precompute (per patch size); larger data sets are streamed
        straight from the images instead (memory independent of N, slower for the window
        engine, which then extracts k×k windows at every call).
      compile_for: optional queries [B, H, W, C] (or their shape): compile every patch size
        for this query shape while the banks are built (on a second thread; the first sampler
        call per patch size then only traces). Same result as ``Machine.compile`` afterwards,
        in less time.
    Returns:
      a Machine: ``eps_fn(x, t, i)`` for ``els_jax.sample``. ``machine.build_seconds`` holds
      the time spent building banks (and compiling, with ``compile_for``).
    """
    if kind not in MACHINES:
        raise ValueError(f"unknown machine {kind!r}; choose one of {MACHINES}")
    if boundary not in patches.BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; choose one of {patches.BOUNDARIES}")
    schedule = schedules_lib.get(schedule)
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != (images.shape[0],):
            raise ValueError(f"mask must be a boolean vector over the {images.shape[0]} "
                             f"training images; got shape {mask.shape}")
        if not mask.any():
            raise ValueError("mask selects no training image")
        images = images[mask]
    n, h, w, c = images.shape
    scale_list, k_const = _normalise_scales(kind, scales)
    sizes = sorted(set(scale_list)) if scale_list is not None else [k_const]
    n_shards = 1 if mesh is None else mesh.devices.size
    images_j = jnp.asarray(images)

    def bank_fn(k, ideal=False, method="auto", unique_fraction=None):
        bank, spec = els.build_bank(images, k=k, boundary=boundary, wrap_patches=wrap_patches,
                                    dedup=dedup, method=method, block=block,
                                    n_shards=n_shards, ideal=ideal, chunk=chunk,
                                    dedup_threshold=dedup_threshold,
                                    unique_fraction=unique_fraction)
        if mesh is not None:        # split over the devices once, here, not at every call
            bank = jax.device_put(bank, _named(mesh, els.bank_partition_specs(bank)))

        def fn(x, t):
            return els.bank_x0(*_inputs(x, t, mesh), bank, spec=spec, schedule=schedule,
                               mesh=mesh, block=block)
        fn.spec, fn.bank = spec, bank
        fn.info = {"engine": spec.method, "bank": True,
                   "unique_fraction": round(spec.unique_fraction, 4)}
        fn.lower = lambda x, t: els.bank_x0.lower(*_inputs(x, t, mesh), bank, spec=spec,
                                                  schedule=schedule, mesh=mesh, block=block)
        return fn

    cache = {}

    def images_t():                       # the LS layout, transposed once per machine
        if "t" not in cache:
            cache["t"] = local_lib.transpose_images(images_j)
        return cache["t"]

    start = time.perf_counter()
    fns = {}
    background = _BackgroundCompiler(compile_for, (h, w, c))

    def add(k, fn):                       # compile it (if asked) while the next bank is built
        fns[k] = fn
        background.submit(fn)

    with background:
        if kind == "ideal":
            add(None, bank_fn(0, ideal=True))
        elif kind == "equivariant":
            add(None, _equivariant_fn(images_j, schedule, block, mesh))
        else:
            for k in sizes:
                if kind == "local" or (boundary == "zeros" and k >= min(h, w)):
                    k = _check_local_k(k, h, w)          # SPEC: zero-padded ELS with k ≥ H is LS
                    add(k, _local_fn(images_t(), k, schedule, block, mesh))
                    continue
                k = els._check_els_k(k, h, w, boundary, wrap_patches)
                unique = (els.estimate_unique_fraction(images, k=k, boundary=boundary,
                                                       wrap_patches=wrap_patches)
                          if dedup else 1.0)
                merged = unique if unique <= dedup_threshold else 1.0
                chosen = els._resolve_method(method, k, c, h, boundary, merged, banked=True,
                                             w=w)
                if chosen == "native":          # the centred images and their window norms
                    size = n * h * w * (c + 2)
                elif chosen == "row":
                    lay = els._row_layout(k, boundary, wrap_patches, h, w)
                    size = h * (k * c + 2) * n * len(lay.c_cols) + n * h * w * c
                else:
                    # (zeros: the interior windows; border.py's bank of the border is small)
                    n_cand = n * (h * w if wrap_patches else (h - k + 1) * (w - k + 1))
                    size = merged * n_cand * (k * k * c + 2 + c)
                if size * 4 <= bank_bytes:
                    add(k, bank_fn(k, method=method, unique_fraction=unique))
                else:
                    add(k, _stream_fn(images_j, k, boundary, wrap_patches, schedule,
                                      els._resolve_method(method, k, c, h, boundary), block,
                                      unique, mesh))
    machine = Machine(kind, fns, scale_list, schedule, k_const)
    machine.build_seconds = time.perf_counter() - start
    return machine

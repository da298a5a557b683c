"""Analytic machines as sampler models: ``make_machine`` → ``eps_fn(x, t, i)`` (docs/theory.md §2–3).

    eps_fn = make_machine("els", images, scales=[3, 3, 5, ...], boundary="zeros")
    x0 = sample(eps_fn, x_T, uniform_times(len(scales)))

``scales`` holds one patch size per sampler step with index 0 = the lowest-noise (last) step,
as in the authors' scale files: step i of an m-step run uses scales[m − 1 − i]. A plain int
means one size for every step. The step is chosen by the sampler's step index, never by
rounding a float32 t. The machine's ``num_steps`` lets ``sample`` reject a grid of another
length.

Everything that does not depend on x is built once here: the class-conditional selection of
images, and for the ELS machine one deduplicated candidate bank per distinct patch size while
they fit ``bank_bytes`` (otherwise it streams from the images), for the ideal machine μ and
the norms (it streams the images; with a mesh, a bank sharded over its devices); each patch
size compiles once. The images are held as given when they are a float32 or uint8 jax array
(docs/theory.md §9.2).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from els_jax.core import patches, validation
from els_jax.core import schedules as schedules_lib
from els_jax.core.data import uint8_mean, unit_images
from els_jax.engines import border as els_border
from els_jax.engines import layout as els_layout
from els_jax.engines import local as local_engine
from els_jax.engines import autotune, passes, select
from els_jax.engines import row as els_row
from els_jax.engines import window as els_window
from els_jax.machines import bank_cache, els, families, soft
from els_jax.machines import equivariant as equivariant_lib
from els_jax.machines import ideal as ideal_lib
from els_jax.machines.base import Machine, candidate_mesh, device_images, host_copies, inputs
from els_jax.machines.local import check_local_k

# What building a bank holds besides its result, in units of the result (transposed and
# padded copies, float64 norms): measured by RSS at CIFAR-10's shape (N = 50 000, k = 3,
# zeros; 2026-12-05): the interior bank +2.7 GB while built for 1.0 GB kept, the border's
# +1.8 GB for 0.74 GB.
_BUILD_EXTRA = 1.7

__all__ = ["Machine", "make_machine", "MACHINES", "candidate_mesh", "clear_bank_cache"]

clear_bank_cache = bank_cache.clear_bank_cache

MACHINES = ("ideal", "equivariant", "local", "els", "gaussian", "nearest", "pca_locality",
            "scfdm")
# docs/theory.md §7's analytic families: no patch size (no ``scales``), one device (no ``mesh``).
FAMILIES = families.FAMILIES
# docs/theory.md §7's learned soft locality: ELS with a Gaussian window, one width σ per step (soft.py).
MACHINES = MACHINES + ("els_soft",)


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


def _stream_fn(images_j, k, boundary, wrap_patches, method, block, unique,
               mesh=None, mu=None):
    """ELS x̂_0 with candidates streamed straight from the images (no bank); with a ``mesh``
    the images are split over its devices (the data mean stays that of the whole set).
    mu: the data mean [C] (default: of ``images_j``, which must then be float)."""
    if mu is None:
        mu = jnp.mean(images_j, axis=(0, 1, 2))
    images, log_w = _split_images(images_j, mesh)
    kw = dict(k=k, boundary=boundary, wrap_patches=wrap_patches, block=block, method=method,
              mesh=mesh)

    def fn(x, coeffs):
        return passes.stream_x0(*inputs(x, coeffs, mesh), images, log_w, mu, **kw)
    fn.lower = lambda x, coeffs: passes.stream_x0.lower(*inputs(x, coeffs, mesh), images,
                                                        log_w, mu, **kw)
    fn.info = {"engine": method, "bank": False, "unique_fraction": round(unique, 4)}
    fn.bank = images
    return fn


def _local_fn(images_t, k, block, engine, mesh=None):
    """LS x̂_0 from a ``local.LocalBank`` built once for this patch size; with a ``mesh`` the
    bank is padded with absent images (log w = −inf) to a multiple of the devices and placed
    split over them once, here, so no call moves it."""
    bank = local_engine.build_local_bank(images_t, k=k)
    pad, log_w = _absent_padding(images_t.shape[3], mesh)
    if mesh is not None:                      # images along the last axis; the mean is shared
        bank = bank._replace(centred_and_ones=_pad_axis(bank.centred_and_ones, pad, 3),
                             half_sq=_pad_axis(bank.half_sq, pad, 2))
        bank = jax.device_put(bank, _named(mesh, local_engine.BANK_SHARDING))
        log_w = jax.device_put(log_w, NamedSharding(mesh, PartitionSpec("cands")))
    kw = dict(k=k, block=block, mesh=mesh)
    h, w = images_t.shape[1], images_t.shape[2]
    n = -(-images_t.shape[3] // (1 if mesh is None else mesh.devices.size))

    def resolved(x):                      # per query batch, as it is first traced (cached)
        return select.resolve_local_engine(engine, k=k, c=images_t.shape[0], h=h, w=w, n=n,
                                           batch=np.shape(x)[0], block=block).engine

    def fn(x, coeffs):
        return local_engine.local_bank_x0(*inputs(x, coeffs, mesh), bank, log_w,
                                          engine=resolved(x), **kw)
    fn.info = {"engine": "local", "bank": True}
    fn.bank = bank
    fn.lower = lambda x, coeffs: local_engine.local_bank_x0.lower(
        *inputs(x, coeffs, mesh), bank, log_w, engine=resolved(x), **kw)
    return fn


def _equivariant_fn(images_j, block, mesh=None):
    """ES x̂_0 over all translates of the images (FFT; no bank). With a ``mesh`` the images are
    padded with absent ones (log w = −inf) to a multiple of the devices and placed split over
    them once, here."""
    mu = jnp.mean(images_j, axis=(0, 1, 2))
    images, log_w = _split_images(images_j, mesh)
    kw = dict(block=block, mesh=mesh)

    def fn(x, coeffs):
        return equivariant_lib.equivariant_x0_at(*inputs(x, coeffs, mesh), images, log_w, mu,
                                                 **kw)
    fn.info = {"engine": "fft", "bank": False}
    fn.bank = images
    fn.lower = lambda x, coeffs: equivariant_lib.equivariant_x0_at.lower(
        *inputs(x, coeffs, mesh), images, log_w, mu, **kw)
    return fn


def _ideal_stream_fn(images_h, block, chunk):
    """IS x̂_0 streamed from the held images (float32 or uint8, no bank, no copy): memory
    O(chunk·D) beyond them whatever N. Only μ and ½‖x_i − μ‖² [N] are computed here."""
    n, dim = images_h.shape[0], int(np.prod(images_h.shape[1:]))
    mu, half_sq = jax.block_until_ready(ideal_lib.image_stats(images_h))
    log_w = jnp.zeros((n,), jnp.float32)
    size = int(min(n, chunk or max(256, els_layout.pow2_floor(max(1, block // dim)))))
    kw = dict(chunk_size=size)

    def fn(x, coeffs):
        return ideal_lib.ideal_prepared_x0(*inputs(x, coeffs, None), images_h, mu, half_sq,
                                           log_w, **kw)
    fn.info = {"engine": "stream", "bank": False, "chunk": size}
    fn.why = {"reason": "one device: the images streamed as held, no bank (a bank is twice "
                        "their float32 bytes; docs/theory.md §9.2)"}
    fn.lower = lambda x, coeffs: ideal_lib.ideal_prepared_x0.lower(
        *inputs(x, coeffs, None), images_h, mu, half_sq, log_w, **kw)
    return fn


class _BackgroundCompiler:
    """Compiles each patch size's x̂_0 on one worker thread as soon as its bank exists, while
    the main thread builds the next bank: XLA's compiler and the (memory-bound) bank building
    overlap on two cores (20-step sample, N = 1000, 7 patch sizes: banks + compile 8.9–10.2 s
    in sequence, 6.9–7.1 s overlapped). XLA keeps the executables, so later calls only trace."""

    def __init__(self, x, image_shape):
        self._x = None
        self.batch = 1                    # queries per call the engines are chosen for
        if x is None:
            return
        shape = tuple(int(d) for d in (x if isinstance(x, (tuple, list)) else np.shape(x)))
        if len(shape) != 4 or shape[1:] != tuple(image_shape):
            raise ValueError(f"compile_for must be queries [B, H, W, C] (or their shape) with "
                             f"H, W, C = {tuple(image_shape)} of the images; got {shape}")
        self._x = jnp.zeros(shape, jnp.float32)
        self.batch = shape[0]
        # Compiling needs only the coefficients' shapes and dtypes, not a time.
        self._coeffs = schedules_lib.Coefficients(jnp.full((self.batch,), 0.5 ** 0.5, jnp.float32),
                                                  jnp.full((self.batch,), 0.5, jnp.float32))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="els-compile")
        self._futures = []

    def submit(self, fn):
        if self._x is not None and hasattr(fn, "lower"):
            self._futures.append(self._pool.submit(lambda: fn.lower(self._x, self._coeffs).compile()))

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
                 block: int = els_layout.DEFAULT_BLOCK, bank_bytes: int = 2 << 30,
                 dedup_threshold: float = 0.9, compile_for=None, rank: int | None = None,
                 tau: float | None = None, sigmas: float | Sequence[float] | None = None,
                 k_max: int | None = None, temperature: float | None = None,
                 num_perturb: int | None = None, noise_scale: float | None = None,
                 top_k: int | None = None, key=None) -> Machine:
    """Builds an analytic machine as a sampler model.

    Args:
      kind: "ideal", "equivariant", "local", "els", or one of docs/theory.md §7's families "gaussian",
        "nearest", "pca_locality", "scfdm" (like "ideal" they ignore ``scales``; they take no
        mesh).
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
      method: "auto" (per patch size the fastest exact engine, measured once per platform and
        shape class and cached on disk, ``els_jax.engines``; with ``ELS_JAX_AUTOTUNE=0`` the
        static rules: for zero padding without merged windows on a CPU the fused kernel
        ``els_jax.native``, otherwise ``engines.choose_method``); els: "window", "row",
        "native" or "window_native"; local (and the zero-padded ELS's LS sizes): "kernel" or "xla".
        ``Machine.explain()`` says which engine runs each patch size and why.
      block: logits per streamed chunk (memory knob).
      bank_bytes: the most memory the candidate banks of ALL patch sizes may take together
        (estimated before anything is built, zero padding's border bands included; sizes are
        banked smallest k first while they fit, with room for the last build's temporaries,
        ``_BUILD_EXTRA`` × its interior and border banks); the other sizes are streamed from the images
        (memory independent of N, slower for the window engine, which then extracts k×k
        windows at every call; the shift-map engine reads only the images).
      compile_for: optional queries [B, H, W, C] (or their shape): compile every patch size
        for this query shape while the banks are built (on a second thread; the first sampler
        call per patch size then only traces). Same result as ``Machine.compile`` afterwards,
        in less time.
      rank: gaussian only: keep the top ``rank`` principal components (default all).
      tau: pca_locality only: the mask threshold (default 0.02; see ``pca_locality_x0``).
      temperature, num_perturb, noise_scale, top_k, key: scfdm only (docs/theory.md §7.6,
        ``scfdm_x0``): τ (default 1), M (10), s (0.1), the k nearest (default None: all
        images) and the PRNG key the ε_m are drawn from, once, at build time (the same ε_m
        at every step; required when s > 0).
      sigmas, k_max: "els_soft" only (docs/theory.md §7, ``els_jax.soft``): the Gaussian window's width,
        one per step (index 0 = last step, as ``scales``) or one for all, on a k_max × k_max
        support; also boundary, wrap_patches, mask, dedup, block, bank_bytes, compile_for,
        and method: "auto" (the shift-map kernel on a CPU), "shiftmap" or "xla"
        (``soft.ENGINES``).
    Returns:
      a Machine: ``eps_fn(x, t, i)`` for ``els_jax.sample``. ``machine.build_seconds`` holds
      the time spent building banks (and compiling, with ``compile_for``). The ideal,
      equivariant, local and els kinds, with every engine, work under jax.jit / jax.vmap and
      are differentiable (jax.grad, jax.jvp) w.r.t. x and t (the fused CPU kernels: values
      from the kernel, derivatives from the XLA path); ``i`` must be a Python int (it picks
      the patch size).
    """
    if kind not in MACHINES:
        raise ValueError(f"unknown machine {kind!r}; choose one of {MACHINES}")
    if rank is not None and kind != "gaussian":
        raise ValueError(f"rank is a parameter of the gaussian machine, not of {kind!r}")
    if tau is not None and kind != "pca_locality":
        raise ValueError(f"tau is a parameter of the pca_locality machine, not of {kind!r}")
    scfdm_kw = dict(temperature=temperature, num_perturb=num_perturb, noise_scale=noise_scale,
                    top_k=top_k, key=key)
    for name, value in scfdm_kw.items():
        if value is not None and kind != "scfdm":
            raise ValueError(f"{name} is a parameter of the scfdm machine, not of {kind!r}")
    if kind in FAMILIES and mesh is not None:
        raise ValueError(f"the {kind!r} machine runs on one device; it takes no mesh")
    if kind == "els_soft":               # docs/theory.md §7: ELS with a Gaussian window, σ per step
        if scales is not None:
            raise ValueError("the 'els_soft' machine takes sigmas (one per step) and k_max, "
                             "not scales")
        return soft.make_soft_machine(images, sigmas=sigmas, k_max=k_max, boundary=boundary,
                                      wrap_patches=wrap_patches, schedule=schedule, mask=mask,
                                      dedup=dedup, dedup_threshold=dedup_threshold,
                                      block=block, bank_bytes=bank_bytes, engine=method,
                                      compile_for=compile_for, mesh=mesh)
    if sigmas is not None or k_max is not None:
        raise ValueError(f"sigmas and k_max are parameters of the 'els_soft' machine, not of "
                         f"{kind!r}")
    if boundary not in patches.BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; choose one of {patches.BOUNDARIES}")
    schedule = schedules_lib.get(schedule)
    shape = np.shape(images)
    # uint8 pixels (docs/theory.md §9) are held as uint8 (a quarter of float32's bytes) and
    # read as (u − 127.5)/127.5 where they are used: a chunk at a time by the shift-map
    # engine, the whole set only while a bank is built from them.
    pixels = np.dtype(getattr(images, "dtype", np.float32)) == np.uint8
    if len(shape) == 4:      # a host copy and one on the device, before any bank
        copies = host_copies(images)
        validation.check_fits(
            copies * (1 if pixels else 4) * int(np.prod(shape)),
            f"the {shape[0]} training images {shape[1:]} as "
            + ("uint8" if pixels else "float32")
            + (", on the host and on the device," if copies == 2 else ","),
            "pass fewer images (a subset or a class mask), or run where more memory is free")
    given = images
    images = np.asarray(images) if pixels else np.asarray(unit_images(images), np.float32)
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
    if kind in FAMILIES:                  # built once: fit, flat images, masks per t
        start = time.perf_counter()
        with _BackgroundCompiler(compile_for, (h, w, c)) as background:
            fn = families.family_fn(kind, device_images(given, images), rank=rank, tau=tau,
                                    block=block, chunk=chunk, **scfdm_kw)
            background.submit(fn)
        machine = Machine(kind, {None: fn}, None, schedule, None)
        machine.build_seconds = time.perf_counter() - start
        return machine
    scale_list, k_const = _normalise_scales(kind, scales)
    sizes = sorted(set(scale_list)) if scale_list is not None else [k_const]
    n_shards = 1 if mesh is None else mesh.devices.size
    cache = {}

    def images_j():                       # the images on the device as float32, once
        if "j" not in cache:
            cache["j"] = device_images(given, np.asarray(unit_images(images), np.float32))
        return cache["j"]

    def pixel_mean():                     # uint8 pixels' mean [C], once per machine
        if "mu8" not in cache:
            cache["mu8"] = jnp.asarray(uint8_mean(images), jnp.float32)
        return cache["mu8"]

    def stream_images(engine):
        """What a streamed size reads: uint8 pixels stay uint8 on the device for the shift-map
        engine (it converts a chunk at a time); every other engine reads float32."""
        if not (pixels and engine == "shiftmap"):
            return images_j()
        if "u8" not in cache:
            cache["u8"] = (given if isinstance(given, jax.Array) and mask is None
                           else jnp.asarray(images))
        return cache["u8"]

    def bank_fn(k, ideal=False, method="auto", unique_fraction=None):
        settings = dict(k=k, boundary=boundary, wrap_patches=wrap_patches, dedup=dedup,
                        method=method, block=block, n_shards=n_shards, ideal=ideal,
                        chunk=chunk, dedup_threshold=dedup_threshold,
                        unique_fraction=unique_fraction)

        def build():
            # (a zero-padded bank's border may read the images as the machine holds them:
            # the same device array as the streamed sizes, uint8 or float32, not a copy)
            bank, spec = els.build_bank(images, held_images=stream_images("shiftmap")
                                        if mesh is None else None, **settings)
            if mesh is not None:    # split over the devices once, here, not at every call
                bank = jax.device_put(bank, _named(mesh, passes.bank_partition_specs(bank)))
            return bank, spec
        # (keyed by the border's rule too: a BorderBank, or the images for the kernel)
        bank, spec = bank_cache.BANKS.get((images_key(), tuple(sorted(settings.items())),
                                           bank_cache.mesh_key(mesh),
                                           els_border.kernel_border_ok(n_shards)), build)

        def fn(x, coeffs):
            return passes.bank_x0(*inputs(x, coeffs, mesh), bank, spec=spec, mesh=mesh,
                                  block=block)
        fn.spec, fn.bank = spec, bank
        fn.info = {"engine": spec.method, "bank": True,
                   "unique_fraction": round(spec.unique_fraction, 4)}
        if boundary == "zeros" and k > 1:
            fn.info["border"] = "shift-map kernel" if spec.border_kernel else "border bank"
        fn.lower = lambda x, coeffs: passes.bank_x0.lower(*inputs(x, coeffs, mesh), bank,
                                                          spec=spec, mesh=mesh, block=block)
        return fn

    def images_key():                     # the images' content, hashed once per machine
        if "key" not in cache:
            cache["key"] = bank_cache.content_key(images)
        return cache["key"]

    def images_t():                       # the LS layout, transposed once per machine
        if "t" not in cache:
            cache["t"] = local_engine.transpose_images(images_j())
        return cache["t"]

    start = time.perf_counter()
    fns = {}
    background = _BackgroundCompiler(compile_for, (h, w, c))

    def add(k, fn):                       # compile it (if asked) while the next bank is built
        fns[k] = fn
        background.submit(fn)

    # Engines first, for every patch size, before any bank is built or compiled: a probe
    # (els_jax.engines) then runs alone, not beside the background compiler.
    batch = background.batch
    ls_engine = method if method in select.LOCAL_ENGINES else "auto"
    plan = []                             # (k, "local" | "bank" | "stream", Choice, unique)
    spent = 0                             # bytes of the banks planned so far (smallest k first)
    shape = dict(w=w, wrap_patches=wrap_patches, n=n, batch=batch, sharded=mesh is not None,
                 block=block, probe_images=images)
    els_sizes = [k for k in sizes if kind == "els" and not (boundary == "zeros" and
                                                            k >= min(h, w))]
    resolved = {}                         # ELS size → (merge fraction, Choice)
    # In probe order (smallest, largest, then middles): a size between two measured ones is
    # interpolated, not probed (autotune.probe_order; a cold run of 3 … 15 probes 3 sizes).
    for k in autotune.probe_order(els_sizes):
        k = els_layout.check_k(k, h, w, boundary, wrap_patches)
        unique = (els_window.estimate_unique_fraction(images, k=k, boundary=boundary,
                                                      wrap_patches=wrap_patches)
                  if dedup else 1.0)
        merged = unique if unique <= dedup_threshold else 1.0
        resolved[k] = unique, select.resolve_els_engine(method, k, c, h, boundary, merged,
                                                        banked=True, **shape)
    for k in (sizes if kind in ("local", "els") else ()):
        if kind == "local" or (boundary == "zeros" and k >= min(h, w)):
            k = check_local_k(k, h, w)    # docs/theory.md §2: zero-padded ELS, k ≥ H, is LS
            plan.append((k, "local", select.resolve_local_engine(
                ls_engine, k=k, c=c, h=h, w=w, n=-(-n // n_shards), batch=batch, block=block),
                None))
            continue
        unique, choice = resolved[k]
        if choice.engine == "shiftmap":   # no bank: the images are all it reads
            plan.append((k, "stream", choice, unique))
            continue
        extra = 0                         # what the build holds besides its bank
        if choice.engine == "native":     # the centred images and their window norms
            size = n * h * w * (c + 2)
            extra = _BUILD_EXTRA * size
        elif choice.engine == "row":
            lay = els_row.row_layout(k, boundary, wrap_patches, h, w)
            size = h * (k * c + 2) * n * len(lay.c_cols) + n * h * w * c
        else:
            # (zeros: the interior windows; the border's bands are added below)
            n_cand = n * (h * w if wrap_patches else (h - k + 1) * (w - k + 1))
            size = merged * n_cand * (k * k * c + 2 + c)
        if boundary == "zeros" and not els_border.kernel_border_ok(n_shards):
            # a border bank (where the CPU kernels run, the border reads the images instead)
            per = els_border.band_chunk_images(n, k, h, w, block) * n_shards   # as build_bank
            border_floats = els_border.border_bank_floats(-(-n // per) * per, k, h, w, c)
            size += border_floats
            extra += _BUILD_EXTRA * border_floats
        # The budget holds every size's bank at once, and the last one's build on top (the
        # interior and border builds' temporaries; window banks are written in place).
        if spent + (size + extra) * 4 <= bank_bytes:
            spent += size * 4
            plan.append((k, "bank", choice, unique))
        else:
            plan.append((k, "stream",
                         select.resolve_els_engine(method, k, c, h, boundary, **shape), unique))

    with background:
        if kind == "ideal":
            # One device: streamed from the images as held (a bank of every image, keys and
            # values, is twice their float32 bytes and its build several times that: 16.7 GB
            # over the images at CelebA's N). A mesh: the bank, split over its devices.
            add(None, bank_fn(0, ideal=True) if mesh is not None else
                _ideal_stream_fn(device_images(given, images), block, chunk))
        elif kind == "equivariant":
            add(None, _equivariant_fn(images_j(), block, mesh))
        for k, path, choice, unique in plan:
            if path == "local":
                fn = _local_fn(images_t(), k, block, ls_engine, mesh)
            elif path == "bank":
                fn = bank_fn(k, method=choice.engine, unique_fraction=unique)
            else:
                src = stream_images(choice.engine)
                fn = _stream_fn(src, k, boundary, wrap_patches, choice.engine, block, unique,
                                mesh, pixel_mean() if src.dtype == jnp.uint8 else None)
            fn.why = {"engine": choice.engine, "reason": choice.reason}
            if choice.times:
                fn.why["times"] = choice.times
            add(k, fn)
    machine = Machine(kind, fns, scale_list, schedule, k_const)
    machine.build_seconds = time.perf_counter() - start
    return machine

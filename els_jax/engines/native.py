"""Fused CPU kernels (XLA FFI custom calls), compiled on first use, with the XLA path as the
fallback everywhere else.

XLA:CPU runs each stage of the local machine (product image, two box sums, logits, max, exp,
weighted sum) as its own pass over a chunk of logits; ``native_local.cc`` carries a block of
images through all of them while it is in cache. It is used only on CPU devices
(``kernel_on_cpu``: GPU and TPU programs lower the XLA path), and only when a C++
compiler is found; results agree with the XLA path to float32 rounding.

The shared library is built once per (source, compiler flags, jaxlib headers, CPU) with the
system C++ compiler (``$CXX``, else ``c++`` / ``g++``) into ``$ELS_JAX_CACHE`` (default
``~/.cache/els_jax``), written atomically. ``ELS_JAX_NATIVE=0`` disables the kernels;
``ELS_JAX_NATIVE_ARCH`` sets the target (default ``native``; e.g. ``x86-64-v3`` builds for
AVX2 without AVX-512, to measure on an AVX-512 CPU what an AVX2 CPU would run).

Differentiation: a custom call has no derivative rule, so every kernel-backed function is
wrapped by ``with_reference_derivatives``: its values come from the kernel, its derivatives
(forward and reverse mode) from the XLA path of the same computation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core.cachedir import cache_dir

__all__ = ["available", "local_softmax_state", "interior_softmax_state",
           "window_softmax_state", "shiftmap_softmax_state", "with_reference_derivatives"]

_SOURCE = Path(__file__).with_name("native_local.cc")
# No -ffast-math: the kernel's exp rounds with a magic-number add that reassociation would
# remove, and absent images are exact −inf logits.
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


def _flags() -> tuple[str, ...]:
    return _FLAGS + (f"-march={os.environ.get('ELS_JAX_NATIVE_ARCH', 'native')}",)
_TARGETS = {"els_local_softmax": "ElsLocalSoftmax",
            "els_interior_softmax": "ElsInteriorSoftmax",
            "els_window_softmax": "ElsWindowSoftmax",
            "els_shiftmap_softmax": "ElsShiftMapSoftmax"}


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cxx: str) -> Path:
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(_flags()), cxx, include,
                                    jax.__version__, _cpu_signature()]).encode()).hexdigest()
    cache = cache_dir()
    lib = cache / f"native_local_{key[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        subprocess.run([cxx, *_flags(), "-I", include, str(_SOURCE), "-o", tmp], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, lib)            # atomic: a concurrent build or reader sees all or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_LIBRARY: dict = {}          # what the loaded library reports about itself


def shift_block() -> int:
    """Images per block of the shift-map kernel as built for this CPU (128 with AVX-512, else
    64; ``native_local.cc`` kShiftBlock): its work items are whole blocks. 64 without the
    kernels."""
    return _LIBRARY.get("shift_block", 64) if available() else 64


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the fused CPU kernels are registered (compiled now if needed). False, with one
    warning saying why, when there is no CPU backend, no compiler, or the build fails."""
    if os.environ.get("ELS_JAX_NATIVE", "1") == "0":
        return False
    try:
        jax.devices("cpu")
    except RuntimeError:
        return False
    cxx = _compiler()
    if cxx is None:
        warnings.warn("els_jax: no C++ compiler found (set $CXX); LS and the zero-padded ELS "
                      "use the XLA path on CPU (slower, same results)", RuntimeWarning,
                      stacklevel=2)
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        lib.ElsShiftBlock.restype = ctypes.c_int64
        _LIBRARY["shift_block"] = int(lib.ElsShiftBlock())
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"els_jax: building the fused CPU kernel failed ({detail.strip()[:500]}); "
                      "LS and the zero-padded ELS use the XLA path on CPU (slower, same results)",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def _call(target, q, a, b2, centred, half_sq, log_w, k, state_shape):
    if not available():
        raise RuntimeError("the fused CPU kernels are not available (see the warning above)")
    bsz, c = q.shape[0], q.shape[3]
    out = (jax.ShapeDtypeStruct((bsz,) + state_shape, jnp.float32),
           jax.ShapeDtypeStruct((bsz,) + state_shape, jnp.float32),
           jax.ShapeDtypeStruct((bsz,) + state_shape + (c,), jnp.float32))
    coef = jnp.stack([jnp.broadcast_to(a, (bsz,)), jnp.broadcast_to(b2, (bsz,))], axis=1)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        q.astype(jnp.float32), coef.astype(jnp.float32), centred.astype(jnp.float32),
        half_sq.astype(jnp.float32), log_w.astype(jnp.float32), k=np.int64(k))


def kernel_on_cpu(kernel, xla):
    """The function that runs ``kernel`` (a CPU custom call) where the program runs on a CPU and
    ``xla`` (the same computation in plain XLA ops) everywhere else.

    Where the default backend is the CPU (no GPU or TPU in the process, or
    ``JAX_PLATFORMS=cpu``) every program lowers for the CPU, so the kernel is chosen now, at
    trace time. ``lax.platform_dependent`` would also trace the XLA twin, which costs
    0.1–0.2 s of Python per patch size in every process (the persistent compilation cache does
    not save tracing) for a branch that never runs. With an accelerator present the choice is
    left to ``lax.platform_dependent`` at lowering: a program placed on the CPU there still gets
    the kernel, one on the accelerator the XLA path."""
    def f(*args):
        if jax.default_backend() == "cpu":
            return kernel(*args)
        return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)
    return f


def with_reference_derivatives(fast, reference):
    """``fast`` with the derivatives of ``reference``: f(*args) = fast(*args) (e.g. a custom
    call, which JAX cannot differentiate), and jax.jvp(f) = (fast(*args), the tangent of
    jax.jvp(reference)). Reverse mode follows: JAX linearizes the tangent (plain XLA ops, hence
    transposable) and transposes it, so ``jax.grad`` and ``jax.vjp`` work; under ``jax.vmap``
    the kernel is mapped as its ffi_call says. Second order works where JAX keeps the rule
    (e.g. ``jax.hessian`` of a machine call), not when f sits in a ``lax.scan`` body that is
    differentiated twice: JAX then inlines the primal, the custom call. Both functions must
    compute the same function of the same pytree of float arrays (equal to float32 rounding)
    with the same output structure. Only the arguments actually differentiated are traced
    through ``reference`` (symbolic zeros): differentiating w.r.t. the queries does not
    differentiate the bank."""
    from jax.custom_derivatives import SymbolicZero

    @jax.custom_jvp
    def f(*args):
        return fast(*args)

    def f_jvp(primals, tangents):
        leaves, tree = jax.tree.flatten(primals)
        t_leaves = tree.flatten_up_to(tangents)
        live = [i for i, tl in enumerate(t_leaves) if not isinstance(tl, SymbolicZero)]

        def reference_of_live(*vals):
            full = list(leaves)
            for i, v in zip(live, vals):
                full[i] = v
            return reference(*jax.tree.unflatten(tree, full))

        # The reference's primal output is discarded: values come from ``fast`` (XLA removes
        # the unused primal work that the tangent does not need).
        _, tangent_out = jax.jvp(reference_of_live, [leaves[i] for i in live],
                                 [t_leaves[i] for i in live])
        return f(*primals), tangent_out

    f.defjvp(f_jvp, symbolic_zeros=True)
    return f


def local_softmax_state(q, a, b2, centred_and_ones, half_sq, log_w, k: int):
    """The LS softmax state over all N images of a ``local.LocalBank`` in one fused pass.

    q [B, H, W, C] queries centred on the bank's mean; a, b² [B] (b² floored);
    centred_and_ones [C+1, H, W, N]; half_sq [H, W, N]; log_w [N] (−inf = absent).
    Returns (max, total, acc): [B, H, W], [B, H, W], [B, H, W, C], i.e. a
    ``softmax.SoftmaxState`` of the logits ((a·⟨W_i(q), W_i(c_n)⟩ − a²·half_sq) / b² + log_w).
    CPU only: callers choose it with ``kernel_on_cpu``.
    """
    _, h, w, _ = q.shape
    return _call("els_local_softmax", q, a, b2, centred_and_ones, half_sq, log_w, k, (h, w))


def interior_softmax_state(q, a, b2, centred, half_sq, log_w, k: int):
    """The zero-padded ELS machine's interior pass (docs/theory.md §2) in one fused pass: for every
    interior query pixel i and every interior position i' of every image n,

        logit = (a·⟨W_i(q), W_i'(c_n)⟩ − a²·half_sq[i', n]) / b² + log_w[n],   value c_n[i'],

    q [B, H, W, C] = x − a·μ, centred [C+1, H, W, N] = images − μ (per-channel mean; the last
    row is not read), half_sq [H, W, N] = ½‖W_i'(c_n)‖² (``local`` box sums of the centred
    images). Returns (max, total, acc) over the (H−2m)×(W−2m) interior pixels:
    [B, H−2m, W−2m], [B, H−2m, W−2m], [B, H−2m, W−2m, C] (acc of the centred values).
    CPU only.
    """
    _, h, w, _ = q.shape
    m = k // 2
    return _call("els_interior_softmax", q, a, b2, centred, half_sq, log_w, k,
                 (h - 2 * m, w - 2 * m))


def window_softmax_state(q, a, b2, keys, values):
    """The ELS main pass from a window bank (``els_window.WindowBank``, one group) in one fused
    pass: for every query window q[b, i] and every bank row c = [c − μ, ½‖c − μ‖², log w],

        logit = (a·⟨q[b, i], c − μ⟩ − a²·½‖c − μ‖²) / b² + log w,   value values[c],

    the window engine's augmented dot product (``els_layout.augment_queries``).
    q [B, P, D] = query windows minus a·μ; a, b² [B] (b² floored); keys [M, D + 2];
    values [M, V]. Returns (max, total, acc): [B, P], [B, P], [B, P, V]. CPU only.
    """
    if not available():
        raise RuntimeError("the fused CPU kernels are not available (see the warning above)")
    bsz, p, _ = q.shape
    v = values.shape[-1]
    out = (jax.ShapeDtypeStruct((bsz, p), jnp.float32),
           jax.ShapeDtypeStruct((bsz, p), jnp.float32),
           jax.ShapeDtypeStruct((bsz, p, v), jnp.float32))
    coef = jnp.stack([jnp.broadcast_to(a, (bsz,)), jnp.broadcast_to(b2, (bsz,))], axis=1)
    return jax.ffi.ffi_call("els_window_softmax", out, vmap_method="sequential")(
        q.astype(jnp.float32), coef.astype(jnp.float32), keys.astype(jnp.float32),
        values.astype(jnp.float32))


def shiftmap_softmax_state(x, a, b2, images, log_w, k: int, mode: int, weights=None,
                           mode_x: int = -1):
    """The shift-map engine (``shiftmap.py``, docs/theory.md §9) in one fused pass: for every query
    pixel i of x and every existing candidate (image n, centre j = i + d) of pair rule
    ``mode`` (0 LS, 1 ELS zeros, 2 ELS circular, 3 ELS circular with wrap_patches;
    ``shiftmap.MODES``),

        logit = −(box_k f_d)(i) / (2b²) + log_w[n],   f_d(p) = Σ_c (x(p) − a·y_n(p + d))²,

    value y_n(j). x [B, H, W, C] (raw, not centred); a, b² [B]; images [N, H, W, C] (float32,
    or uint8 pixels, read as (u − 127.5)/127.5 a block at a time: held at a quarter); log_w
    [N] (−inf = absent). ``weights`` [k], optional: the separable window
    weights[δy]·weights[δx] in place of the k×k box (els_soft's Gaussian; direct sums, k
    multiply-adds per output and axis). ``mode_x`` (default −1: ``mode``): a rule of its own
    for the columns, with ``mode`` then the rows': modes 4 and 5 are mode 1's pairs of the
    coordinates within k//2 of a border and of the interior ones only (the zero-padded border
    pixels, ``shiftmap.border_x0``). Returns (max, total, acc): [B, H, W], [B, H, W],
    [B, H, W, C] (acc of the raw values; pixels without a pair keep max −inf, total 0).
    CPU only.
    """
    if not available():
        raise RuntimeError("the fused CPU kernels are not available (see the warning above)")
    bsz, h, w, c = x.shape
    out = (jax.ShapeDtypeStruct((bsz, h, w), jnp.float32),
           jax.ShapeDtypeStruct((bsz, h, w), jnp.float32),
           jax.ShapeDtypeStruct((bsz, h, w, c), jnp.float32))
    coef = jnp.stack([jnp.broadcast_to(a, (bsz,)), jnp.broadcast_to(b2, (bsz,))], axis=1)
    weights = jnp.zeros((0,), jnp.float32) if weights is None else jnp.asarray(weights,
                                                                             jnp.float32)
    return jax.ffi.ffi_call("els_shiftmap_softmax", out, vmap_method="sequential")(
        x.astype(jnp.float32), coef.astype(jnp.float32),
        images if images.dtype == jnp.uint8 else images.astype(jnp.float32),
        log_w.astype(jnp.float32), weights, k=np.int64(k), mode=np.int64(mode),
        mode_x=np.int64(mode_x))

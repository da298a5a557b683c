"""The local score machine (LS, SPEC §2): locality without equivariance.

Pixel i is denoised using only the k×k window around i, compared with the window at the SAME
location in each training image; windows are cut at the border (outside pixels do not count):

    w_{i,n} = softmax_n(−‖W_i(x) − a·W_i(c_n)‖² / (2b²)),     x̂_0,i = Σ_n w_{i,n} c_n[i].

For a chunk of images, the dot products W_i(x)·W_i(c_n) for all pixels are one k×k window sum
of the product image x ⊙ c_n (two 1-D ``lax.reduce_window`` sums, images along the minor axis),
and ‖W_i(c_n)‖² is the window sum of c_n². Zero padding of the product image is exactly the
"cut at the border" rule. Query and candidates are centred on the per-pixel data mean (exact).
With k ≥ 2·max(H, W) − 1 every window covers the image and LS equals the ideal machine.
On CPU devices the same computation runs as one fused custom call (``native.py``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from els_jax import conversions, native, softmax
from els_jax import engines as engines_lib
from els_jax import schedules as schedules_lib
from els_jax.validation import check_patch_size, check_query_and_images, mask_log_weights

__all__ = ["local_score", "local_x0", "LocalBank", "build_local_bank", "local_bank_x0",
           "local_coefficients", "local_queries", "local_update", "BANK_SHARDING"]

_HI = jax.lax.Precision.HIGHEST


def _box_sum(v, k: int, axis: int):
    """Sum over the k entries centred on each index along ``axis``, zero beyond the ends (the
    border cut). ``lax.reduce_window`` per axis: on XLA:CPU several times faster here than the
    cumulative-sum form of ``patches.window_sum``, whose cumsum lowers to a reduce-window."""
    window, pad = [1] * v.ndim, [(0, 0)] * v.ndim
    window[axis], pad[axis] = k, (k // 2, k // 2)
    return jax.lax.reduce_window(v, 0.0, jax.lax.add, window, (1,) * v.ndim, pad)


def transpose_images(images):
    """[N, H, W, C] → [C, H, W, N], the layout ``_local_x0_t`` streams (images minor)."""
    return jnp.transpose(jnp.asarray(images, jnp.float32), (3, 1, 2, 0))


@functools.partial(jax.jit, static_argnames=("k", "schedule", "block"))
def _local_x0(x, t, images, log_w, *, k, schedule, block):
    return _local_x0_t(x, t, transpose_images(images), log_w, k=k, schedule=schedule,
                       block=block)


class LocalBank(NamedTuple):
    """What a local machine precomputes once per (data set, k), in the streamed layout
    (images along the minor axis): the images centred on the per-pixel data mean with a row of
    ones appended, [C+1, H, W, N] (``centred_and_ones``: ONE per-pixel matmul against it gives
    the weighted sum of centred values and the softmax normaliser; the mean is added back once
    at the end, Σ_n w_n·(c_n − μ) + μ = Σ_n w_n·c_n), the mean [C, H, W, 1], and
    ½‖W_i(c_n − μ)‖² for every pixel and image, [H, W, N]. Per pair a call reads C + 2 floats
    of it (no second copy of the uncentred values: at B = 1 the call is memory-bound)."""

    centred_and_ones: jax.Array
    mean: jax.Array
    half_sq: jax.Array


def _half_sq(centred, k: int):
    return 0.5 * _box_sum(_box_sum(jnp.sum(centred * centred, axis=0), k, 0), k, 1)


@functools.partial(jax.jit, static_argnames=("k",))
def build_local_bank(images_t, *, k: int, mean=None) -> LocalBank:
    """The ``LocalBank`` of images given as ``transpose_images(images)`` [C, H, W, N].

    mean: the shift [C, H, W, 1] (default: the per-pixel mean of these images). Any shift is
    exact; pass a common one when banks of different image subsets must be merged."""
    if mean is None:
        mean = jnp.mean(images_t, axis=3, keepdims=True)
    centred = images_t - mean
    ones = jnp.ones((1,) + images_t.shape[1:], images_t.dtype)
    return LocalBank(jnp.concatenate([centred, ones]), mean, _half_sq(centred, k))


@functools.partial(jax.jit, static_argnames=("k", "schedule", "block"))
def _local_x0_t(x, t, images_t, log_w, *, k, schedule, block):
    """LS x̂_0 with the training set given as ``transpose_images(images)`` [C, H, W, N]."""
    return local_bank_x0(x, t, build_local_bank(images_t, k=k), log_w, k=k,
                         schedule=schedule, block=block)


# How a LocalBank is split over a one-axis "cands" mesh: along the image axis.
BANK_SHARDING = LocalBank(P(None, None, None, "cands"), P(), P(None, None, "cands"))


@functools.partial(jax.jit, static_argnames=("k", "schedule", "block", "mesh", "engine"))
def local_bank_x0(x, t, bank: LocalBank, log_w, *, k, schedule, block, mesh=None,
                  engine="auto"):
    """LS x̂_0 [B, H, W, C] from a precomputed ``LocalBank`` (a machine builds it once, so a
    call only touches the query-dependent work: product images, their window sums, softmax).

    With a ``mesh`` (one axis, "cands"; N divisible by its size) each device streams its share
    of the images (``BANK_SHARDING``; ``log_w`` split the same way) and the partial softmax
    states are merged exactly (``softmax.merge_across``): the result equals one device's.
    engine: "auto" (``resolve_engine``, per query shape), "kernel" or "xla"."""
    def state_of(x, t, bank, log_w):
        return _local_bank_state(x, t, bank, log_w, k, schedule, block, engine)

    if mesh is None:
        state = state_of(x, t, bank, log_w)
    else:
        state = softmax.sharded(state_of, mesh, (P(), P(), BANK_SHARDING, P("cands")))(
            x, t, bank, log_w)
    return softmax.finalize(state) + jnp.transpose(bank.mean[..., 0], (1, 2, 0))[None]


def _local_bank_state(x, t, bank: LocalBank, log_w, k, schedule, block, engine="auto"):
    """The softmax state of the LS machine over the images of ``bank``, [B, H, W].

    On CPU devices, when the fused kernel could be built (``native.available()``) and
    ``resolve_engine`` picks it (measured per shape class), one custom call computes it;
    otherwise, and on other platforms, the XLA path. Both give the same state up to float32
    rounding.

    Differentiable (forward and reverse mode, w.r.t. x and t): the kernel has no derivative
    rule, so its derivatives are those of the XLA path (``native.with_reference_derivatives``)."""
    a, b2 = local_coefficients(t, x.shape[0], schedule)
    q = local_queries(x, a, bank.mean)

    def xla_path(q, a, b2, bank, log_w):
        return _local_bank_state_q(q, a, b2, bank, log_w, k, block)
    bsz, h, w, c = x.shape
    if resolve_engine(engine, k=k, c=c, h=h, w=w, n=bank.half_sq.shape[2], batch=bsz,
                      block=block).engine != "kernel":
        return xla_path(q, a, b2, bank, log_w)

    def fused(q, a, b2, bank, log_w):
        return softmax.SoftmaxState(*native.local_softmax_state(
            q, a.reshape(-1), b2.reshape(-1), bank.centred_and_ones, bank.half_sq, log_w, k))

    def fast(q, a, b2, bank, log_w):
        return jax.lax.platform_dependent(q, a, b2, bank, log_w, cpu=fused, default=xla_path)
    return native.with_reference_derivatives(fast, xla_path)(q, a, b2, bank, log_w)


LOCAL_ENGINES = ("auto", "kernel", "xla")


def resolve_engine(engine, *, k, c, h, w, n, batch=1, block=1 << 20) -> engines_lib.Choice:
    """The LS engine for queries [batch, H, W, C] against n images, and why: "kernel" (the
    fused CPU kernel) or "xla" as asked, or for "auto" ``engines.local_engine`` (measured
    once per shape class; with ``ELS_JAX_AUTOTUNE=0`` the kernel whenever it is built)."""
    if engine not in LOCAL_ENGINES:
        raise ValueError(f"unknown LS engine {engine!r}; choose one of {LOCAL_ENGINES}")
    if engine == "kernel":
        if jax.default_backend() != "cpu" or not native.available():
            raise ValueError("engine='kernel' (the fused CPU kernel) needs a CPU backend and a "
                             "C++ compiler (see els_jax.native)")
        return engines_lib.Choice("kernel", "engine='kernel' (explicit)")
    if engine == "xla":
        return engines_lib.Choice("xla", "engine='xla' (explicit)")
    return engines_lib.local_engine(k=k, c=c, h=h, w=w, n=n, batch=batch, block=block)


def _local_bank_state_q(q, a, b2, bank: LocalBank, log_w, k, block):
    """``_local_bank_state`` from queries q [B, H, W, C] and a, b² [B, 1, 1, 1]."""
    bsz, h, w, c = q.shape
    n = bank.half_sq.shape[2]
    n_img = _images_per_chunk(n, bsz * h * w, block)
    starts, first_new = softmax.chunk_starts(n, n_img)
    rows = jnp.arange(n_img, dtype=jnp.int32)

    def body(state, chunk):
        start, first = chunk
        cen = jax.lax.dynamic_slice_in_dim(bank.centred_and_ones, start, n_img, axis=3)
        half_sq = jax.lax.dynamic_slice_in_dim(bank.half_sq, start, n_img, axis=2)
        lw = jax.lax.dynamic_slice_in_dim(log_w, start, n_img)
        lw = jnp.where(rows >= first, lw, -jnp.inf)
        return local_update(state, q, a, b2, cen, half_sq, lw, k), None

    state, _ = jax.lax.scan(body, softmax.init((bsz, h, w), c), (starts, first_new))
    return state


def local_coefficients(t, bsz: int, schedule):
    """a and b² (floored) per query image, shaped [B, 1, 1, 1]."""
    a, b2, _ = schedules_lib.coefficients(t, schedule)
    a = jnp.broadcast_to(a, (bsz,))[:, None, None, None]
    b2 = jnp.maximum(jnp.broadcast_to(b2, (bsz,)), conversions.B2_FLOOR)[:, None, None, None]
    return a, b2


def local_queries(x, a, mean):
    """Queries x − a·μ [B, H, W, C] for a bank centred on ``mean`` [C, H, W, 1]."""
    return x - a * jnp.transpose(mean[..., 0], (1, 2, 0))[None]


def local_update(state, q, a, b2, cen, half_sq, lw, k: int):
    """Adds one chunk of n images to the LS softmax state [B, H, W].

    q [B, H, W, C] (``local_queries``); cen [C+1, H, W, n] (centred images and a row of ones,
    as ``LocalBank.centred_and_ones``); half_sq [H, W, n]; lw [n] log weights (−inf = absent).
    Images along the minor axis, channels first: every reduction is over the minor axis and
    nothing is transposed here."""
    c = q.shape[-1]
    prod = sum(q[:, :, :, ch, None] * cen[ch][None] for ch in range(c))    # [B, H, W, n]
    qc = _box_sum(_box_sum(prod, k, 1), k, 2)
    logits = (a * qc - (a * a) * half_sq[None]) / b2 + lw[None, None, None, :]

    def weighted_sum_and_total(p):          # [Σ_n p·(c_n[i] − μ_i), Σ_n p], [B, H, W, C+1]
        # One matmul per pixel against the centred values with a row of ones (measured on
        # XLA:CPU: 1.2–5× faster than C + 1 separate multiply-reduce passes over p).
        return jnp.einsum("bhwn,chwn->bhwc", p, cen, precision=_HI)
    return softmax.update_with_total(state, logits, weighted_sum_and_total)


# Images per streamed chunk: at most block / (B·H·W) (memory), and at most 256, so a chunk's
# working set stays near the per-core cache (2-core EPYC, 2026-12-01: 256, 512 and 1024 within
# noise of each other once the bank is centred; 32-image chunks make the per-pixel matmuls
# too short and are 1.5–2× slower).
_MAX_CHUNK_IMAGES = 256


def _images_per_chunk(n: int, queries: int, block: int) -> int:
    return int(min(n, _MAX_CHUNK_IMAGES, max(1, block // queries)))


def _check_local_k(k, h, w):
    k = check_patch_size(k, h, w)
    if k > 2 * max(h, w) - 1:
        raise ValueError(f"patch size k={k} exceeds 2·max(H, W) − 1 = {2 * max(h, w) - 1}: "
                         "such a window already covers the image from every pixel")
    return k


def local_x0(x, t, images, *, k: int, schedule=schedules_lib.Cosine(), mask=None,
             block: int = 1 << 20):
    """Denoised mean x̂_0 of the local score machine, [B, H, W, C]. See ``local_score``."""
    check_query_and_images(x, images)
    k = _check_local_k(k, x.shape[1], x.shape[2])
    log_w = mask_log_weights(mask, images.shape[0])
    return _local_x0(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32),
                     jnp.asarray(images, jnp.float32), log_w, k=k,
                     schedule=schedules_lib.get(schedule), block=int(block))


def local_score(x, t, images, *, k: int, schedule=schedules_lib.Cosine(), mask=None,
                block: int = 1 << 20):
    """Score of the local score machine.

    Args:
      x: noisy queries [B, H, W, C]; t: scalar or [B]; images: training set [N, H, W, C].
      k: odd patch size (window cut at the image border).
      mask: optional boolean [N] (class-conditional).
    Returns:
      score [B, H, W, C].

    Works under jax.jit / jax.vmap; differentiable (jax.grad, jax.jvp, w.r.t. x and t) also
    where the fused CPU kernel computes the values: its derivatives are the XLA path's.
    """
    x0 = local_x0(x, t, images, k=k, schedule=schedule, mask=mask, block=block)
    return conversions.x0_to_score(x0, x, t, schedule=schedule)

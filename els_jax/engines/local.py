"""The local score machine's engine (LS, docs/theory.md §2): one pass over the images per call.

For a chunk of images, the dot products W_i(x)·W_i(c_n) for all pixels are one k×k window sum
of the product image x ⊙ c_n (two 1-D ``lax.reduce_window`` sums, images along the minor axis),
and ‖W_i(c_n)‖² is the window sum of c_n². Zero padding of the product image is exactly the
"cut at the border" rule. Query and candidates are centred on the per-pixel data mean (exact).
On CPU devices the same computation can run as one fused custom call (``native.py``,
engine "kernel"); the XLA path (engine "xla") runs everywhere and gives its derivatives.

Everything here takes the coefficients a, b² [B] (``core.schedules.query_coefficients``) and a
resolved engine name ("kernel" | "xla"; machines resolve "auto" with ``select.py``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from els_jax.core import softmax
from els_jax.core.data import unit_images
from els_jax.engines import native

__all__ = ["LocalBank", "build_local_bank", "build_local_bank_from", "transpose_images",
           "local_bank_x0",
           "local_queries", "local_update", "BANK_SHARDING", "ENGINES"]

_HI = jax.lax.Precision.HIGHEST
ENGINES = ("kernel", "xla")


def _box_sum(v, k: int, axis: int):
    """Sum over the k entries centred on each index along ``axis``, zero beyond the ends (the
    border cut). ``lax.reduce_window`` per axis: on XLA:CPU several times faster here than the
    cumulative-sum form of ``patches.window_sum``, whose cumsum lowers to a reduce-window."""
    window, pad = [1] * v.ndim, [(0, 0)] * v.ndim
    window[axis], pad[axis] = k, (k // 2, k // 2)
    return jax.lax.reduce_window(v, 0.0, jax.lax.add, window, (1,) * v.ndim, pad)


def transpose_images(images):
    """[N, H, W, C] → [C, H, W, N], the layout ``_local_x0_t`` streams (images minor)."""
    return jnp.transpose(jnp.asarray(unit_images(images), jnp.float32), (3, 1, 2, 0))


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


def _local_bank(images_t, k: int, mean) -> LocalBank:
    if mean is None:
        mean = jnp.mean(images_t, axis=3, keepdims=True)
    centred = images_t - mean
    ones = jnp.ones((1,) + images_t.shape[1:], images_t.dtype)
    return LocalBank(jnp.concatenate([centred, ones]), mean, _half_sq(centred, k))


@functools.partial(jax.jit, static_argnames=("k",))
def build_local_bank(images_t, *, k: int, mean=None) -> LocalBank:
    """The ``LocalBank`` of images given as ``transpose_images(images)`` [C, H, W, N].

    mean: the shift [C, H, W, 1] (default: the per-pixel mean of these images). Any shift is
    exact; pass a common one when banks of different image subsets must be merged."""
    return _local_bank(images_t, k, mean)


@functools.partial(jax.jit, static_argnames=("k",))
def build_local_bank_from(images, *, k: int, mean=None) -> LocalBank:
    """``build_local_bank(transpose_images(images), ...)`` for images [N, H, W, C] in one
    program: the transposed copy is fused into the bank instead of held beside it (one
    image-set-sized buffer less at the build's peak: 0.6 GB at CIFAR-10's N)."""
    return _local_bank(transpose_images(images), k, mean)


# How a LocalBank is split over a one-axis "cands" mesh: along the image axis.
BANK_SHARDING = LocalBank(P(None, None, None, "cands"), P(), P(None, None, "cands"))


@functools.partial(jax.jit, static_argnames=("k", "block", "mesh", "engine"))
def local_bank_x0(x, a, b2, bank: LocalBank, log_w, *, k, block, engine, mesh=None):
    """LS x̂_0 [B, H, W, C] from a precomputed ``LocalBank`` (a machine builds it once, so a
    call only touches the query-dependent work: product images, their window sums, softmax).
    a, b2: [B]. engine: "kernel" (the fused CPU kernel; XLA off the CPU) or "xla".

    With a ``mesh`` (one axis, "cands"; N divisible by its size) each device streams its share
    of the images (``BANK_SHARDING``; ``log_w`` split the same way) and the partial softmax
    states are merged exactly (``softmax.merge_across``): the result equals one device's."""
    def state_of(x, a, b2, bank, log_w):
        return _local_bank_state(x, a, b2, bank, log_w, k, block, engine)

    if mesh is None:
        state = state_of(x, a, b2, bank, log_w)
    else:
        state = softmax.sharded(state_of, mesh, (P(), P(), P(), BANK_SHARDING, P("cands")))(
            x, a, b2, bank, log_w)
    return softmax.finalize(state) + jnp.transpose(bank.mean[..., 0], (1, 2, 0))[None]


def _local_bank_state(x, a, b2, bank: LocalBank, log_w, k, block, engine):
    """The softmax state of the LS machine over the images of ``bank``, [B, H, W].

    With engine "kernel", on CPU devices one custom call computes it (other platforms lower
    the XLA path); both give the same state up to float32 rounding. Differentiable (forward
    and reverse mode, w.r.t. x and a, b²): the kernel has no derivative rule, so its
    derivatives are those of the XLA path (``native.with_reference_derivatives``)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown LS engine {engine!r}; choose one of {ENGINES}")
    a = a.reshape(-1, 1, 1, 1)
    b2 = b2.reshape(-1, 1, 1, 1)
    q = local_queries(x, a, bank.mean)

    def xla_path(q, a, b2, bank, log_w):
        return _local_bank_state_q(q, a, b2, bank, log_w, k, block)
    if engine != "kernel":
        return xla_path(q, a, b2, bank, log_w)

    def fused(q, a, b2, bank, log_w):
        return softmax.SoftmaxState(*native.local_softmax_state(
            q, a.reshape(-1), b2.reshape(-1), bank.centred_and_ones, bank.half_sq, log_w, k))

    fast = native.kernel_on_cpu(fused, xla_path)
    return native.with_reference_derivatives(fast, xla_path)(q, a, b2, bank, log_w)


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

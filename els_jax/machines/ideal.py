"""The ideal score machine (IS, docs/theory.md §2): the exact score of the training-set mixture.

p_t(x) = (1/N) Σ_n N(x; a·c_n, b² I), so with w_n = softmax_n(−‖x − a·c_n‖² / (2b²)):

    s(x)   = −(1/b²) Σ_n w_n (x − a·c_n)
    x̂_0(x) = Σ_n w_n c_n

The training set is streamed in chunks through the shared online softmax (els_jax.softmax),
so memory is O(chunk_size·H·W·C) whatever N is.

Numerics: ‖x − a·c‖² = ‖x‖² − 2a x·c + a²‖c‖²; ‖x‖² is the same for every candidate and is
dropped, and both x and the candidates are first centred on the data mean μ (an exact shift:
‖(x − aμ) − a(c − μ)‖² = ‖x − a·c‖²) so that the remaining terms are small and cancel less.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from els_jax.core import conversions
from els_jax.core import schedules as schedules_lib
from els_jax.core import softmax
from els_jax.core.data import unit_images
from els_jax.core.validation import check_query_and_images, mask_log_weights

__all__ = ["ideal_score", "ideal_x0", "ideal_x0_at", "ideal_prepared_x0", "prepare",
           "image_stats", "flat_images", "rows_at", "chunk_scores", "STATS_CHUNK"]


STATS_CHUNK = 4096          # images per chunk of ``image_stats``' passes (memory knob)


def flat_images(images):
    """images [N, ...] → [N, D] as they are held (uint8 pixels stay uint8: docs/theory.md
    §9.2). Inside jit a reshape is free; the machines pass their images [N, H, W, C] and let
    the jitted functions flatten them (an eager reshape, or a jitted function returning the
    flat array, would copy the whole set)."""
    return images.reshape(images.shape[0], -1)


def rows_at(flat, start, size: int):
    """``size`` rows of ``flat`` from ``start`` as float32 pixels, [size, D] (uint8 converted
    here, a chunk at a time)."""
    return unit_images(jax.lax.dynamic_slice_in_dim(flat, start, size)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def image_stats(images, chunk_size: int = STATS_CHUNK):
    """μ [D] and ½‖x_i − μ‖² [N] (from centred values, for accuracy) of images [N, ...],
    uint8 or float, read ``chunk_size`` images at a time: memory O(chunk·D) beyond the
    images, whatever N."""
    flat = flat_images(images)
    n, d = flat.shape
    size = int(min(chunk_size, n))
    starts, first_new = softmax.chunk_starts(n, size)
    rows = jnp.arange(size, dtype=jnp.int32)

    def add(total, chunk):
        start, first = chunk
        c = jnp.where((rows >= first)[:, None], rows_at(flat, start, size), 0.0)
        return total + jnp.sum(c, axis=0), None

    total, _ = jax.lax.scan(add, jnp.zeros((d,), jnp.float32), (starts, first_new))
    mu = total / n

    def norms(out, chunk):
        start, _ = chunk       # rows seen twice (the shifted last chunk) get the same value
        c = rows_at(flat, start, size)
        return jax.lax.dynamic_update_slice_in_dim(
            out, 0.5 * jnp.sum(jnp.square(c - mu[None]), axis=-1), start, 0), None

    half_sq, _ = jax.lax.scan(norms, jnp.zeros((n,), jnp.float32), (starts, first_new))
    return mu, half_sq


def prepare(images):
    """What does not depend on the query: the images flattened [N, D] as held
    (``flat_images``), their mean μ [D] and ‖x_i − μ‖²/2 [N] (``image_stats``). For use inside
    jit; a machine keeps only (μ, ½‖x_i − μ‖²) and its images."""
    mu, half_sq = image_stats(images)
    return flat_images(images), mu, half_sq


def chunk_scores(q, a, flat, half_sq, log_w, start, first, chunk_size: int):
    """One chunk of whole-image candidates, for the machines that stream the training set
    (ideal: softmax; nearest: argmax).

    Args:
      q: centred queries x − a·μ [B, D]; a: [B, 1]; flat, half_sq: ``prepare``'s [N, D], [N];
      log_w: [N] 0 or −inf (class mask); start, first: ``softmax.chunk_starts``' chunk.
    Returns:
      c [M, D] the chunk's images; s [B, M] = a q·c − a²‖c − μ‖²/2, which is −‖x − a·c‖²/2
      plus a term the same for every candidate; lw [M] the log-weights with the rows the
      previous chunk already covered set to −inf.
    """
    rows = jnp.arange(chunk_size, dtype=jnp.int32)
    c = rows_at(flat, start, chunk_size)                                   # [M, D] float32
    hs = jax.lax.dynamic_slice_in_dim(half_sq, start, chunk_size)
    lw = jax.lax.dynamic_slice_in_dim(log_w, start, chunk_size)
    lw = jnp.where(rows >= first, lw, -jnp.inf)                            # seen before
    qc = jnp.matmul(q, c.T, precision=jax.lax.Precision.HIGHEST)           # [B, M]
    return c, a * qc - (a * a) * hs[None], lw


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def ideal_prepared_x0(x, a, b2, images, mu, half_sq, log_w, *, chunk_size):
    """IS x̂_0 [B, H, W, C] from the coefficients a, b² [B], the images [N, ...] (uint8 or
    float, or ``flat_images``' [N, D]), ``image_stats``' μ and ½‖x_i − μ‖² and log weights
    [N]: the images streamed ``chunk_size`` at a time."""
    bsz = x.shape[0]
    flat = flat_images(images)
    n = flat.shape[0]
    a, b2 = a[:, None], b2[:, None]
    # Centred query q = x − a·μ. The logit −‖q − a(c − μ)‖²/(2b²) equals, up to terms that are
    # the same for every candidate, (a q·c − a²‖c − μ‖²/2)/b²; a small q keeps q·c accurate.
    q = x.reshape(bsz, -1) - a * mu[None]                 # [B, D]
    starts, first_new = softmax.chunk_starts(n, chunk_size)

    def body(state, chunk):
        c, score, lw = chunk_scores(q, a, flat, half_sq, log_w, *chunk, chunk_size)
        return softmax.update(state, score / b2 + lw[None], c), None

    state, _ = jax.lax.scan(body, softmax.init((bsz,), flat.shape[1]), (starts, first_new))
    return softmax.finalize(state).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def ideal_x0_at(x, a, b2, images, log_w, *, chunk_size):
    """IS x̂_0 [B, H, W, C] from the coefficients a, b² [B] and log weights [N]."""
    mu, half_sq = image_stats(images)
    return ideal_prepared_x0(x, a, b2, images, mu, half_sq, log_w, chunk_size=chunk_size)


def ideal_x0(x, t, images, *, schedule=schedules_lib.Cosine(), mask=None, chunk_size: int = 256):
    """Denoised mean x̂_0 of the ideal score machine.

    Args:
      x: noisy queries [B, H, W, C].
      t: scalar time or one per query, [B].
      images: training set [N, H, W, C] in [-1, 1].
      schedule: a Schedule or its name.
      mask: optional boolean [N]; only images with True are candidates (class-conditional).
      chunk_size: training images per streamed chunk (memory knob, not a result knob).
    Returns:
      x̂_0 [B, H, W, C].
    """
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return _x0(x, coeffs, images, mask, chunk_size)


def _x0(x, coeffs, images, mask, chunk_size):
    return ideal_x0_at(x, coeffs.a, coeffs.b2, images, mask_log_weights(mask, images.shape[0]),
                       chunk_size=int(min(chunk_size, images.shape[0])))


def ideal_score(x, t, images, *, schedule=schedules_lib.Cosine(), mask=None,
                chunk_size: int = 256):
    """Score s(x) = ∇ log p_t(x) of the ideal machine, [B, H, W, C] (see ``ideal_x0``).
    Like every machine: works under jax.jit and jax.vmap, differentiable (jax.grad, jax.jvp)
    w.r.t. x and t; the training images are data.

        >>> s = ideal_score(x, 0.5, images)        # x [B,H,W,C], images [N,H,W,C]
    """
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return conversions.x0_to_score_at(_x0(x, coeffs, images, mask, chunk_size), x, coeffs)

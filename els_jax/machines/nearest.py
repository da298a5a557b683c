"""The nearest-image machine (docs/theory.md §7): the memorisation baseline.

    x̂_0(x) = x_{i*},   i* = argmin_i ‖x − a·x_i‖²        (first such i on ties)

over the N training images (or those selected by a class mask): the t → 0 limit of the ideal
machine's softmax, taken at every t. Its score −(x − a·x̂_0)/b² has Jacobian −I/b² almost
everywhere (x̂_0 is piecewise constant).

As in the ideal machine, ‖x‖² is dropped and x is centred on the data mean μ (an exact shift):
i* = argmax_i a·q·x_i − a²‖x_i − μ‖²/2 with q = x − a·μ; the images are streamed in chunks with
a running argmax, so memory is O(chunk_size·H·W·C) whatever N is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from els_jax.core import conversions, softmax
from els_jax.machines import ideal
from els_jax.machines.ideal import prepare
from els_jax.core import schedules as schedules_lib
from els_jax.core.data import unit_images
from els_jax.core.validation import check_query_and_images, mask_log_weights

__all__ = ["nearest_x0", "nearest_score", "nearest_index", "prepare", "nearest_prepared_index",
           "nearest_prepared_x0"]


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def nearest_prepared_index(x, a, b2, flat, mu, half_sq, log_w, *, chunk_size):
    """i* [B] (int32) from ``prepare``'s arrays and the coefficients a, b² [B] (b² does not
    change the argmin); log_w [N] is 0 for a candidate, −inf if excluded. ``flat``: the
    images [N, D] or [N, H, W, C], uint8 or float (streamed a chunk at a time)."""
    bsz = x.shape[0]
    flat = ideal.flat_images(flat)
    n = flat.shape[0]
    a = a[:, None]
    q = x.reshape(bsz, -1) - a * mu[None]                                   # [B, D]
    starts, first_new = softmax.chunk_starts(n, chunk_size)

    def body(best, chunk):
        best_val, best_idx = best
        start, _ = chunk
        _, score, lw = ideal.chunk_scores(q, a, flat, half_sq, log_w, *chunk, chunk_size)
        val = score + lw[None]
        j = jnp.argmax(val, axis=1)
        v = jnp.take_along_axis(val, j[:, None], axis=1)[:, 0]
        better = v > best_val                     # strict: the earlier image wins a tie
        return (jnp.where(better, v, best_val), jnp.where(better, start + j, best_idx)), None

    init = (jnp.full((bsz,), -jnp.inf, jnp.float32), jnp.zeros((bsz,), jnp.int32))
    (_, idx), _ = jax.lax.scan(body, init, (starts, first_new))
    return idx


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def nearest_prepared_x0(x, a, b2, flat, mu, half_sq, log_w, *, chunk_size):
    """x̂_0 = x_{i*} [B, H, W, C] from ``prepare``'s arrays (see ``nearest_prepared_index``)."""
    idx = nearest_prepared_index(x, a, b2, flat, mu, half_sq, log_w, chunk_size=chunk_size)
    return unit_images(jnp.take(ideal.flat_images(flat), idx, axis=0)).reshape(x.shape)


def _check(x, images, mask, chunk_size):
    check_query_and_images(x, images)
    return (jnp.asarray(x, jnp.float32), mask_log_weights(mask, images.shape[0]),
            int(max(1, min(chunk_size, images.shape[0]))))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _nearest_index(x, a, b2, images, log_w, *, chunk_size):
    flat, mu, half_sq = prepare(images)
    return nearest_prepared_index(x, a, b2, flat, mu, half_sq, log_w, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _nearest_x0(x, a, b2, images, log_w, *, chunk_size):
    flat, mu, half_sq = prepare(images)
    return nearest_prepared_x0(x, a, b2, flat, mu, half_sq, log_w, chunk_size=chunk_size)


def nearest_index(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, mask=None,
                  schedule=schedules_lib.Cosine(), chunk_size: int = 256):
    """Index i* [B] (int32, into ``images``) of the training image minimising ‖x − a·x_i‖²."""
    x, log_w, chunk = _check(x, images, mask, chunk_size)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return _nearest_index(x, coeffs.a, coeffs.b2, images, log_w, chunk_size=chunk)


def nearest_x0(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, mask=None,
               schedule=schedules_lib.Cosine(), chunk_size: int = 256
               ) -> Float[Array, "b h w c"]:
    """Denoised mean of the nearest-image machine: x̂_0 = x_{i*}, i* = argmin_i ‖x − a·x_i‖².

    Args:
      x: noisy queries [B, H, W, C].
      t: scalar time or one per query, [B].
      images: training set [N, H, W, C].
      mask: optional boolean [N]; only images with True are candidates.
      schedule: a Schedule or its name.
      chunk_size: training images per streamed chunk (memory knob, not a result knob).
    Returns:
      x̂_0 [B, H, W, C], each a training image.

        >>> x0 = nearest_x0(x, 0.3, images)            # x [B,H,W,C], images [N,H,W,C]
    """
    x, log_w, chunk = _check(x, images, mask, chunk_size)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return _nearest_x0(x, coeffs.a, coeffs.b2, images, log_w, chunk_size=chunk)


def nearest_score(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, mask=None,
                  schedule=schedules_lib.Cosine(), chunk_size: int = 256
                  ) -> Float[Array, "b h w c"]:
    """Score of the nearest-image machine, s = −(x − a·x_{i*})/b², [B, H, W, C].

        >>> s = nearest_score(x, 0.3, images, mask=labels == 3)
    """
    x, log_w, chunk = _check(x, images, mask, chunk_size)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    x0 = _nearest_x0(x, coeffs.a, coeffs.b2, images, log_w, chunk_size=chunk)
    return conversions.x0_to_score_at(x0, x, coeffs)

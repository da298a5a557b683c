"""The equivariant score machine (ES, docs/theory.md §2): equivariance without locality.

The candidates are all N·H·W circular translates of the training images; the query is the
whole image. With T_s the circular shift by s, (T_s c)[i] = c[i − s]:

    w_{n,s} = softmax_{n,s}(−‖x − a·T_s c_n‖² / (2b²)),     x̂_0 = Σ_{n,s} w_{n,s} T_s c_n.

‖T_s c_n‖ = ‖c_n‖, and the dot products x·T_s c_n for all shifts s are one circular
cross-correlation, computed with real FFTs; the weighted sum Σ_s w_{n,s} T_s c_n is one
circular convolution, also by FFT. Cost O(N·H·W·log(H·W)) instead of O(N·(H·W)²).
x and the candidates are centred on the per-channel data mean first (exact, as the mean
image is translation invariant).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from els_jax.core import conversions, softmax
from els_jax.core import schedules as schedules_lib
from els_jax.core.validation import check_query_and_images, mask_log_weights
from els_jax.core.data import unit_images

__all__ = ["equivariant_score", "equivariant_x0", "equivariant_x0_at"]

# Every product that feeds a logit at HIGHEST: DEFAULT is TF32/bf16 on GPUs and TPUs.
_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("block", "mesh"))
def equivariant_x0_at(x, a, b2, images, log_w, mu, *, block, mesh=None):
    """ES x̂_0 [B, H, W, C] from the coefficients a, b² [B]; ``mu`` [C] is the data mean (the
    exact shift). With a ``mesh`` (one axis, "cands"; N divisible by its size) each device
    takes its share of the images (and of ``log_w``) and the partial softmax states are
    merged exactly."""
    def state_of(x, a, b2, images, log_w, mu):
        return _equivariant_state(x, a, b2, images, log_w, mu, block)

    if mesh is None:
        state = state_of(x, a, b2, images, log_w, mu)
    else:
        from jax.sharding import PartitionSpec as P
        state = softmax.sharded(state_of, mesh, (P(), P(), P(), P("cands"), P("cands"), P()))(
            x, a, b2, images, log_w, mu)
    return softmax.finalize(state).reshape(x.shape)


def _equivariant_state(x, a, b2, images, log_w, mu, block):
    """The softmax state of the ES machine over all translates of ``images``, [B]."""
    bsz, h, w, c = x.shape
    n = images.shape[0]
    a, b2 = a[:, None], b2[:, None]
    q = x - a[:, :, None, None] * mu[None, None, None]                 # [B, H, W, C]
    q_f = jnp.fft.rfft2(q, axes=(1, 2))                                # [B, H, W/2+1, C]
    n_img = int(min(n, max(1, block // (bsz * h * w))))
    starts, first_new = softmax.chunk_starts(n, n_img)
    rows = jnp.arange(n_img, dtype=jnp.int32)

    def body(state, chunk):
        start, first = chunk
        imgs = jax.lax.dynamic_slice_in_dim(images, start, n_img)      # [n, H, W, C]
        lw = jax.lax.dynamic_slice_in_dim(log_w, start, n_img)
        lw = jnp.where(rows >= first, lw, -jnp.inf)
        cen = imgs - mu[None, None, None]
        c_f = jnp.fft.rfft2(cen, axes=(1, 2))                          # [n, H, W/2+1, C]
        # corr[b, n, s] = Σ_j q_b[j + s]·c_n[j] = x·T_{−s}... indexed so that s is the shift
        # with (T_s c)[i] = c[i − s]: Σ_i q[i] c[i − s] = irfft(Q · conj(C))[s].
        prod = jnp.einsum("bhwc,nhwc->bnhw", q_f, jnp.conj(c_f), precision=_HI)
        corr = jnp.fft.irfft2(prod, s=(h, w), axes=(2, 3))             # [B, n, H, W]
        half_sq = 0.5 * jnp.sum(cen * cen, axis=(1, 2, 3))             # [n]
        logits = (a[:, :, None, None] * corr
                  - (a * a)[:, :, None, None] * half_sq[None, :, None, None]) / b2[:, :, None, None]
        logits = (logits + lw[None, :, None, None]).reshape(bsz, n_img * h * w)

        def weighted_sum(p):  # Σ_{n,s} p[n, s]·c_n[i − s]: circular convolutions, by FFT
            p_f = jnp.fft.rfft2(p.reshape(bsz, n_img, h, w), axes=(2, 3))
            img_f = jnp.fft.rfft2(imgs, axes=(1, 2))
            prod = jnp.einsum("bnhw,nhwc->bhwc", p_f, img_f, precision=_HI)
            out = jnp.fft.irfft2(prod, s=(h, w), axes=(1, 2))
            return out.reshape(bsz, h * w * c)
        return softmax.update_with(state, logits, weighted_sum), None

    state, _ = jax.lax.scan(body, softmax.init((bsz,), h * w * c), (starts, first_new))
    return state


def equivariant_x0(x, t, images, *, schedule=schedules_lib.Cosine(), mask=None,
                   block: int = 1 << 20):
    """Denoised mean x̂_0 of the equivariant score machine, [B, H, W, C]."""
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return _x0(x, coeffs, images, mask, block)


def _x0(x, coeffs, images, mask, block):
    log_w = mask_log_weights(mask, images.shape[0])
    images = jnp.asarray(unit_images(images), jnp.float32)
    return equivariant_x0_at(x, coeffs.a, coeffs.b2, images, log_w,
                             jnp.mean(images, axis=(0, 1, 2)), block=int(block))


def equivariant_score(x, t, images, *, schedule=schedules_lib.Cosine(), mask=None,
                      block: int = 1 << 20):
    """Score of the equivariant machine: the ideal score of the translate-augmented set.
    Works under jax.jit / jax.vmap; differentiable (jax.grad, jax.jvp) w.r.t. x and t.

    Args: x [B, H, W, C]; t scalar or [B]; images [N, H, W, C]; mask optional boolean [N].
    Returns: score [B, H, W, C].
    """
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return conversions.x0_to_score_at(_x0(x, coeffs, images, mask, block), x, coeffs)

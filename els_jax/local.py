"""The local score machine (LS, SPEC §2): locality without equivariance.

Pixel i is denoised using only the k×k window around i, compared with the window at the SAME
location in each training image; windows are cut at the border (outside pixels do not count):

    w_{i,n} = softmax_n(−‖W_i(x) − a·W_i(c_n)‖² / (2b²)),     x̂_0,i = Σ_n w_{i,n} c_n[i].

Cost independent of k: for a chunk of images, the dot products W_i(x)·W_i(c_n) for all pixels
are one window sum (integral image, ``patches.window_sum``) of the product image x ⊙ c_n, and
‖W_i(c_n)‖² is the window sum of c_n². Zero padding of the product image is exactly the
"cut at the border" rule. Query and candidates are centred on the per-pixel data mean (exact).
With k ≥ 2·max(H, W) − 1 every window covers the image and LS equals the ideal machine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from els_jax import conversions, patches, softmax
from els_jax import schedules as schedules_lib
from els_jax.validation import check_patch_size, check_query_and_images, mask_log_weights

__all__ = ["local_score", "local_x0"]

_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("k", "schedule", "block"))
def _local_x0(x, t, images, log_w, *, k, schedule, block):
    bsz, h, w, c = x.shape
    n = images.shape[0]
    a, b2, _ = schedules_lib.coefficients(t, schedule)
    a = jnp.broadcast_to(a, (bsz,))[:, None, None, None]
    b2 = jnp.maximum(jnp.broadcast_to(b2, (bsz,)), conversions.B2_FLOOR)[:, None, None, None]
    mu = jnp.mean(images, axis=0)                                     # [H, W, C]
    q = x - a * mu[None]                                              # [B, H, W, C]
    n_img = int(min(n, max(1, block // (bsz * h * w))))
    starts, first_new = softmax.chunk_starts(n, n_img)
    rows = jnp.arange(n_img, dtype=jnp.int32)

    def body(state, chunk):
        start, first = chunk
        imgs = jax.lax.dynamic_slice_in_dim(images, start, n_img)     # [n, H, W, C]
        lw = jax.lax.dynamic_slice_in_dim(log_w, start, n_img)
        lw = jnp.where(rows >= first, lw, -jnp.inf)
        cen = imgs - mu[None]
        prod = jnp.einsum("bhwc,nhwc->bhwn", q, cen, precision=_HI)  # channel-summed x·c
        prod = jnp.moveaxis(prod, -1, 1)                              # [B, n, H, W]
        qc = patches.window_sum(prod, k, "zeros")
        half_sq = 0.5 * patches.window_sum(jnp.sum(cen * cen, axis=-1), k, "zeros")  # [n, H, W]
        logits = (a * qc - (a * a) * half_sq[None]) / b2 + lw[None, :, None, None]
        logits = jnp.moveaxis(logits, 1, -1)                          # [B, H, W, n]

        def weighted_sum(p):
            return jnp.einsum("bhwn,nhwc->bhwc", p, imgs, precision=_HI)
        return softmax.update_with(state, logits, weighted_sum), None

    state, _ = jax.lax.scan(body, softmax.init((bsz, h, w), c), (starts, first_new))
    return softmax.finalize(state)


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
    """
    x0 = local_x0(x, t, images, k=k, schedule=schedule, mask=mask, block=block)
    return conversions.x0_to_score(x0, x, t, schedule=schedule)

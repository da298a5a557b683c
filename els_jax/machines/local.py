"""The local score machine (LS, docs/theory.md §2): locality without equivariance.

Pixel i is denoised using only the k×k window around i, compared with the window at the SAME
location in each training image; windows are cut at the border (outside pixels do not count):

    w_{i,n} = softmax_n(−‖W_i(x) − a·W_i(c_n)‖² / (2b²)),     x̂_0,i = Σ_n w_{i,n} c_n[i].

For a chunk of images, the dot products W_i(x)·W_i(c_n) for all pixels are one k×k window sum
of the product image x ⊙ c_n (two 1-D ``lax.reduce_window`` sums, images along the minor axis),
and ‖W_i(c_n)‖² is the window sum of c_n². Zero padding of the product image is exactly the
"cut at the border" rule. Query and candidates are centred on the per-pixel data mean (exact).
With k ≥ 2·max(H, W) − 1 every window covers the image and LS equals the ideal machine.
The computation is ``engines/local.py``'s (XLA, or its fused CPU kernel: which one runs is
measured, ``engines/select.py``).
"""

from __future__ import annotations

import jax.numpy as jnp

from els_jax.core import conversions
from els_jax.core import schedules as schedules_lib
from els_jax.core.validation import check_patch_size, check_query_and_images, mask_log_weights
from els_jax.core.data import unit_images
from els_jax.engines import local as engine_lib
from els_jax.engines import select

__all__ = ["local_score", "local_x0", "local_x0_at", "check_local_k"]


def check_local_k(k, h, w):
    k = check_patch_size(k, h, w)
    if k > 2 * max(h, w) - 1:
        raise ValueError(f"patch size k={k} exceeds 2·max(H, W) − 1 = {2 * max(h, w) - 1}: "
                         "such a window already covers the image from every pixel")
    return k


def local_x0_at(x, coeffs, images, log_w, *, k: int, block: int = 1 << 20,
                engine: str = "auto"):
    """LS x̂_0 from the coefficients a, b² [B] (``schedules.query_coefficients``) and log
    weights [N]; ``engine`` "auto" (measured, ``select.resolve_local_engine``), "kernel" or
    "xla". What ``local_x0`` and the zero-padded ELS with k ≥ H call."""
    bsz, h, w, c = x.shape
    engine = select.resolve_local_engine(engine, k=k, c=c, h=h, w=w, n=images.shape[0],
                                         batch=bsz, block=block).engine
    # The bank is its own computation (as a machine's is): the query-dependent program is
    # then the same whatever the batch, so one query's x̂_0 does not depend on the others'
    # (at small t float32 logits are sensitive to how XLA fuses the bank's window sums).
    bank = engine_lib.build_local_bank(engine_lib.transpose_images(images), k=k)
    return engine_lib.local_bank_x0(x, coeffs.a, coeffs.b2, bank, log_w, k=k, block=int(block),
                                    engine=engine)


def local_x0(x, t, images, *, k: int, schedule=schedules_lib.Cosine(), mask=None,
             block: int = 1 << 20):
    """Denoised mean x̂_0 of the local score machine, [B, H, W, C]. See ``local_score``."""
    check_query_and_images(x, images)
    k = check_local_k(k, x.shape[1], x.shape[2])
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return local_x0_at(x, coeffs, jnp.asarray(unit_images(images), jnp.float32),
                       mask_log_weights(mask, images.shape[0]), k=k, block=int(block))


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
    check_query_and_images(x, images)
    k = check_local_k(k, x.shape[1], x.shape[2])
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    x0 = local_x0_at(x, coeffs, jnp.asarray(unit_images(images), jnp.float32),
                     mask_log_weights(mask, images.shape[0]), k=k, block=int(block))
    return conversions.x0_to_score_at(x0, x, coeffs)

"""The fused CPU kernel's engine for the zero-padded main pass ("native"), with its XLA twin.

The kernel (``native.py``, an XLA FFI custom call) computes the interior pass as the LS
computation of every offset between query and candidate, carrying blocks of 32 images through
the product image, its box sums, the logits and the online softmax in cache (XLA:CPU runs each
of these as a separate pass). Cost per pair ∝ C + 2k, without merging duplicates.
``interior_state_xla`` computes the same softmax state with the window engine's arithmetic:
the kernel's derivatives come from it (``native.with_reference_derivatives``), and the tests
hold the kernel to it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from els_jax.engines import layout as geo
from els_jax.engines import local as local_lib
from els_jax.engines import native
from els_jax.core import softmax

_HI = jax.lax.Precision.HIGHEST


class InteriorBank(NamedTuple):
    """The fused CPU kernel's candidates for the zero-padded main pass (``native``): the
    images centred on the per-channel mean with a row of ones, [C+1, H, W, N'] (the layout of
    ``local.LocalBank``), ½‖W_i(c_n − μ)‖² at every pixel, [H, W, N'], and log weights [N']
    (−inf for the padding images)."""

    centred: jax.Array
    half_sq: jax.Array
    log_w: jax.Array


# How an InteriorBank splits over a one-axis "cands" mesh: along its image axes.
INTERIOR_SPECS = InteriorBank(PartitionSpec(None, None, None, "cands"),
                               PartitionSpec(None, None, "cands"), PartitionSpec("cands"))


def interior_state_xla(q, a, b2, ib: InteriorBank, k: int, block: int):
    """The XLA twin of ``native.interior_softmax_state`` (same arguments, same state): the
    window engine's main pass for zero padding, every interior query window against every
    interior window of the bank's images, streamed a chunk of images at a time (at most
    ``block`` logits). The fused kernel takes its derivatives from here."""
    bsz, h, w, c = q.shape
    n = ib.log_w.shape[0]
    pixels = geo.layout(k, "zeros", False, h, w)[0].query_pixels            # interior, row-major
    p = len(pixels)
    rows, cols = np.divmod(pixels, w)
    q_win = geo.gather_windows(q, k, "zeros", pixels)                              # [B, P, k²C]
    images = jnp.transpose(ib.centred[:c], (3, 1, 2, 0))                 # [N', H, W, C]
    half_sq = ib.half_sq[rows, cols]                                     # [P, N']
    n_img = int(min(n, max(1, block // max(1, bsz * p * p))))
    starts, first_new = softmax.chunk_starts(n, n_img)
    seen = jnp.arange(n_img, dtype=jnp.int32)
    a3, b23 = a[:, None, None], b2[:, None, None]

    def body(state, chunk):
        start, first = chunk
        imgs = jax.lax.dynamic_slice_in_dim(images, start, n_img)
        keys = geo.gather_windows(imgs, k, "zeros", pixels).reshape(n_img * p, -1)     # image-major
        hs = jax.lax.dynamic_slice_in_dim(half_sq, start, n_img, axis=1).T.reshape(-1)
        lw = jax.lax.dynamic_slice_in_dim(ib.log_w, start, n_img)
        lw = jnp.repeat(jnp.where(seen >= first, lw, -jnp.inf), p)
        values = imgs.reshape(n_img, h * w, c)[:, pixels].reshape(n_img * p, c)
        qc = jnp.einsum("bpd,md->bpm", q_win, keys, precision=_HI)           # [B, P, n·P]
        logits = (a3 * qc - (a3 * a3) * hs[None, None]) / b23 + lw[None, None]
        return softmax.update(state, logits, values), None

    state, _ = jax.lax.scan(body, softmax.init((bsz, p), c), (starts, first_new))
    m = k // 2
    shape = (bsz, h - 2 * m, w - 2 * m)
    return softmax.SoftmaxState(state.max.reshape(shape), state.total.reshape(shape),
                                state.acc.reshape(shape + (c,)))


def interior_result(x, a, b2, k, bank: InteriorBank, mu, mesh,
                    block: int = geo.DEFAULT_BLOCK):
    """(interior pixels, x̂_0 [B, P, C]) of the fused kernel's main pass (zero padding; mu the
    bank's per-channel mean [C]); the
    kernel's state is over the main pass's query pixels in ``layout`` order (row-major).
    Differentiable: values from the kernel, derivatives from ``interior_state_xla``."""
    bsz, h, w, c = x.shape

    def kernel(q, a, b2, ib):
        return softmax.SoftmaxState(*native.interior_softmax_state(
            q, a, b2, ib.centred, ib.half_sq, ib.log_w, k))

    def reference(q, a, b2, ib):
        return interior_state_xla(q, a, b2, ib, k, block)

    run = native.with_reference_derivatives(kernel, reference)
    if mesh is not None:
        run = geo.sharded_bank_call(run, mesh, INTERIOR_SPECS)
    mu = mu[None, None, None, :]
    state = run(x - a[:, None, None, None] * mu, a, b2, bank)
    x0 = softmax.finalize(state) + mu                           # [B, H−2m, W−2m, C]
    pixels = geo.layout(k, "zeros", False, h, w)[0].query_pixels
    return np.asarray(pixels).reshape(-1), x0.reshape(bsz, -1, c)


def build_interior_bank(images: np.ndarray, k: int, mu: np.ndarray,
                        n_shards: int = 1) -> InteriorBank:
    """The kernel's bank of all images, padded with absent images to a multiple of
    ``n_shards``."""
    n = images.shape[0]
    total = -(-n // n_shards) * n_shards
    padded = images if total == n else np.concatenate(          # no copy unless padding
        [images, np.zeros((total - n,) + images.shape[1:], np.float32)])
    log_w = np.where(np.arange(total) < n, 0.0, -np.inf).astype(np.float32)
    lb = local_lib.build_local_bank_from(padded, k=k, mean=jnp.asarray(mu)[:, None, None, None])
    return InteriorBank(lb.centred_and_ones, lb.half_sq, jnp.asarray(log_w))

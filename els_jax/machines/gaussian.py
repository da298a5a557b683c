"""The Gaussian (Wiener) machine (docs/theory.md §7): the exact denoiser of the training set's Gaussian.

Flatten the images in (H, W, C) order (D = H·W·C); μ and Σ are their mean and covariance with
1/N (the maximum-likelihood Gaussian), Σ = U diag(λ) Uᵀ. If x_0 ~ N(μ, Σ) then
x = a·x_0 + b·ε ~ N(aμ, a²Σ + b²I) and

    x̂_0(x) = μ + a·Σ·(a²Σ + b²I)⁻¹·(x − a·μ) = μ + U diag(aλ / (a²λ + b²)) Uᵀ (x − a·μ)
    s(x)   = −(a²Σ + b²I)⁻¹ (x − a·μ)

A rank r keeps the top-r components; the others shrink to μ. A class mask fits μ, Σ to the
selected images only.

The decomposition (``fit_gaussian``) is done once: the singular value decomposition of the
centred data A = (X − μ)/√N, so that Σ = AᵀA = V diag(σ²) Vᵀ (U = V, λ = σ²) without
forming Σ, whose float32 rounding would put spurious eigenvalues of ≈ 1e-7·λ_max on every
constant pixel (the SVD's are ≈ 1e-13·λ_max: it resolves real ones down to ≈ 1e-9·λ_max on
MNIST). A of up to 2^26 entries is factored directly (LAPACK reduces a tall A by one QR
first); a larger one (N > D) is first reduced to a triangular D×D factor R with RᵀR = AᵀA by
a QR streamed over chunks of rows, centred chunk by chunk, so that memory stays
O(chunk·D + D²). Singular values at or below √D·ε_float32·σ_max are rounding noise and count
as zero.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from els_jax.core import conversions, softmax
from els_jax.core import schedules as schedules_lib
from els_jax.core.validation import check_query_and_images, mask_log_weights
from els_jax.core.data import unit_images
from els_jax.machines import ideal

__all__ = ["GaussianFit", "fit_gaussian", "fit_flat", "selection_weights", "gaussian_fit_x0",
           "gaussian_x0", "gaussian_score", "wiener_gains", "check_rank"]

_HIGHEST = jax.lax.Precision.HIGHEST
SVD_DIRECT_MAX = 1 << 26    # entries of the centred data A factored in one SVD (above: streamed)


class GaussianFit(NamedTuple):
    """The training set's Gaussian. K = min(N, D) components, largest first.

    mean:    [D]     μ.
    eigvals: [K]     λ (0 for directions without variance), descending.
    eigvecs: [D, K]  U, orthonormal columns.
    """

    mean: Float[Array, " d"]
    eigvals: Float[Array, " k"]
    eigvecs: Float[Array, "d k"]


@functools.partial(jax.jit, static_argnames=("rows",))
def _weighted_mean(images, weights, *, rows):
    """Σ_i w_i x_i [D] of images [N, ...] (uint8 or float), ``rows`` images at a time."""
    flat = ideal.flat_images(images)
    n, d = flat.shape
    starts, first_new = softmax.chunk_starts(n, rows)
    idx = jnp.arange(rows, dtype=jnp.int32)

    def body(total, chunk):
        start, first = chunk
        w = jnp.where(idx >= first, jax.lax.dynamic_slice_in_dim(weights, start, rows), 0.0)
        return total + jnp.matmul(w, ideal.rows_at(flat, start, rows), precision=_HIGHEST), None

    total, _ = jax.lax.scan(body, jnp.zeros((d,), jnp.float32), (starts, first_new))
    return total


@functools.partial(jax.jit, static_argnames=("rows",))
def _qr_step(r, images, mean, sqrt_w, start, first, *, rows):
    """R of [R; A_chunk], A_chunk = (x − μ)·√w for the ``rows`` images from ``start`` (those
    before ``first`` already seen: zeroed; uint8 converted here)."""
    flat = ideal.flat_images(images)
    idx = jnp.arange(rows, dtype=jnp.int32)
    block = ideal.rows_at(flat, start, rows) - mean[None]
    scale = jax.lax.dynamic_slice_in_dim(sqrt_w, start, rows)
    block = jnp.where((idx >= first)[:, None], block * scale[:, None], 0.0)
    return jnp.linalg.qr(jnp.concatenate([r, block]), mode="r")


def _r_factor(images, mean, sqrt_w, rows):
    """A triangular R [D, D] with RᵀR = AᵀA, A = (flat − μ)·√w, for a tall set [N, D]: QR of
    the running R stacked on each centred chunk of ``rows`` rows (``_qr_step``; a chunk's rows
    already seen by the previous one are zeroed, see ``softmax.chunk_starts``).

    A loop of jitted steps, not a ``lax.scan``: inside a scan XLA:CPU copied the whole set
    (the QR's in-place LAPACK call made it copy the loop's operands: 2.4 GB of temporaries at
    CelebA's N); a step reads its chunk from the images as they are."""
    n = images.shape[0]
    d = math.prod(images.shape[1:])
    with jax.ensure_compile_time_eval():  # a static plan, also under an outer jit
        starts, first_new = softmax.chunk_starts(n, rows)
    r = jnp.zeros((d, d), jnp.float32)
    for start, first in zip(np.asarray(starts), np.asarray(first_new)):
        r = _qr_step(r, images, mean, sqrt_w, jnp.int32(start), jnp.int32(first), rows=rows)
    return r


@jax.jit
def _fit_direct(images, weights):
    values = unit_images(ideal.flat_images(images)).astype(jnp.float32)
    mean = jnp.matmul(weights, values, precision=_HIGHEST)
    return _fit_svd((values - mean[None]) * jnp.sqrt(weights)[:, None], mean)


@jax.jit
def _fit_svd(a, mean):
    _, s, vh = jnp.linalg.svd(a, full_matrices=False)
    noise = math.sqrt(a.shape[1]) * float(jnp.finfo(jnp.float32).eps) * s[0]
    return GaussianFit(mean=mean, eigvals=jnp.where(s > noise, s * s, 0.0), eigvecs=vh.T)


def fit_flat(flat, weights, *, direct_max: int = SVD_DIRECT_MAX, qr_rows: int | None = None):
    """``GaussianFit`` of the rows of ``flat`` [N, D] (or images [N, H, W, C], flattened in
    (H, W, C) order; uint8 pixels read as ``unit_images``) with weights [N] (≥ 0, summing to
    1): the SVD of A = (x − μ)·√w. Above ``direct_max`` entries the rows are streamed
    ``qr_rows`` at a time into a QR factor R (AᵀA = RᵀR) and the SVD is R's: memory O(D² +
    rows·D) beyond the images (``direct_max``, ``qr_rows``: not result knobs)."""
    n = flat.shape[0]
    d = math.prod(flat.shape[1:])
    if n <= d or n * d <= direct_max:
        return _fit_direct(flat, weights)
    rows = min(n, qr_rows or max(4 * d, 1024))
    mean = _weighted_mean(flat, weights, rows=rows)
    return _fit_svd(_r_factor(flat, mean, jnp.sqrt(weights), rows), mean)


def selection_weights(log_w):
    """Normalised weights of the selected images from their log weights (0 / −inf), [N]."""
    w = jnp.exp(log_w)
    return w / jnp.sum(w)


def fit_gaussian(images, *, mask=None) -> GaussianFit:
    """μ and the eigendecomposition of the (1/N) covariance of ``images`` [N, H, W, C]
    flattened in (H, W, C) order (of the images selected by the boolean ``mask`` [N])."""
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {getattr(images, 'shape', None)}")
    if images.shape[0] == 0:
        raise ValueError("the training set is empty")
    log_w = mask_log_weights(mask, images.shape[0])
    unit_images(images[:1])               # other integer types are rejected here
    # Flattened (and uint8 converted) inside the jitted fit: an eager reshape copies the set.
    return fit_flat(images, selection_weights(log_w))


def check_rank(rank, dim: int) -> int:
    """The number of components to keep: ``rank`` (an int in [1, D]) or D for None."""
    if rank is None:
        return int(dim)
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool):
        raise ValueError(f"rank must be an int (the number of components kept); got {rank!r}")
    if not 1 <= rank <= dim:
        raise ValueError(f"rank must lie in [1, D = {dim}] (D = H·W·C); got {rank}")
    return int(rank)


def wiener_gains(eigvals, a, b2):
    """aλ / (a²λ + b²) per component (broadcasting); 0 where λ = 0, finite at a = 0 and at
    b² = 0 (floored at ``conversions.B2_FLOOR``)."""
    b2 = jnp.maximum(b2, conversions.B2_FLOOR)
    return a * eigvals / (a * a * eigvals + b2)


@jax.jit
def gaussian_fit_x0(x, a, b2, fit: GaussianFit, keep):
    """x̂_0 [B, H, W, C] of the Gaussian ``fit`` keeping its top ``keep`` components
    (an int, may be traced); a, b2: the coefficients [B]."""
    bsz = x.shape[0]
    a, b2 = a[:, None], b2[:, None]
    k = fit.eigvals.shape[0]
    gains = wiener_gains(fit.eigvals[None], a, b2)                        # [B, K]
    gains = jnp.where(jnp.arange(k)[None] < keep, gains, 0.0)
    q = x.reshape(bsz, -1) - a * fit.mean[None]                           # [B, D]
    coords = jnp.matmul(q, fit.eigvecs, precision=_HIGHEST) * gains       # [B, K]
    # U·coordsᵀ with U in its stored layout (coords·Uᵀ makes XLA copy Uᵀ when B = 1).
    x0 = fit.mean[None] + jnp.matmul(fit.eigvecs, coords.T, precision=_HIGHEST).T
    return x0.reshape(x.shape)


def gaussian_x0(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, rank=None,
                mask=None, schedule=schedules_lib.Cosine()) -> Float[Array, "b h w c"]:
    """Denoised mean of the Gaussian (Wiener) machine,
    x̂_0 = μ + U diag(aλ/(a²λ + b²)) Uᵀ (x − a·μ)  (see the module docstring).

    Args:
      x: noisy queries [B, H, W, C].
      t: scalar time or one per query, [B].
      images: training set [N, H, W, C] in [-1, 1].
      rank: keep the top ``rank`` principal components (an int in [1, H·W·C]); None = all.
      mask: optional boolean [N]; μ and Σ of the images with True (class-conditional).
      schedule: a Schedule or its name.
    Returns:
      x̂_0 [B, H, W, C].

        >>> x0 = gaussian_x0(x, 0.5, images, rank=16)     # x [B,H,W,C], images [N,H,W,C]
    """
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return _x0(x, coeffs, images, rank, mask)


def _x0(x, coeffs, images, rank, mask):
    keep = check_rank(rank, int(np.prod(images.shape[1:])))
    return gaussian_fit_x0(x, coeffs.a, coeffs.b2, fit_gaussian(images, mask=mask), keep)


def gaussian_score(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *,
                   rank=None, mask=None,
                   schedule=schedules_lib.Cosine()) -> Float[Array, "b h w c"]:
    """Score of the Gaussian machine, s = −(a²Σ + b²I)⁻¹(x − a·μ), [B, H, W, C]
    (with a rank: of the rank-r Gaussian; see ``gaussian_x0``).

        >>> s = gaussian_score(x, 0.5, images, mask=labels == 3)
    """
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return conversions.x0_to_score_at(_x0(x, coeffs, images, rank, mask), x, coeffs)

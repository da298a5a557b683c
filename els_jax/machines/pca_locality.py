"""The PCA-locality machine (docs/theory.md §7; Lukoianov et al., NeurIPS 2025, "Locality in image
diffusion models emerges from data statistics", as analytic-diffusion-studio computes it).

The locality of each output pixel comes from the data's Gaussian (els_jax.gaussian): with
D = H·W·C, the images flattened in (H, W, C) order and Σ = U diag(λ) Uᵀ their covariance,

    W_t      = a²Σ(a²Σ + b²I)⁻¹ = U diag(a²λ/(a²λ + b²)) Uᵀ                      [D, D]
    M̃[n, m] = W_t[n, m] / W_t[n, n]        (a diagonal entry below 1e-3·max_n |W_t[n, n]| in
                                             magnitude counts as 1: the relative floor)
    M[n, m]  = 1 if |M̃[n, m]| ≥ τ·max|M̃| else 0                              (default τ = 0.02)

and output pixel m is a softmax over ALL N training images with its own mask M[:, m]:

    logit_i[m] = −Σ_n M[n, m]·(x_n − a·x_{i,n})² / (2b²),     x̂_0[m] = Σ_i w_i[m]·x_{i,m}.

With τ = 0 every mask is full and this is the ideal machine.

The floor. A floored entry counts as 1 wherever it enters M̃: as the divisor of its row and as
its own numerator, so M̃[n, n] = 1 for every n. W_t is symmetric positive semi-definite, so
|W_t[n, m]|² ≤ W_t[n, n]·W_t[m, m] and every unfloored row has |M̃[n, m]| ≤ sqrt(1/1e-3) ≈ 31.6,
every floored one |M̃[n, m]| ≤ sqrt(1e-3) < 1: max|M̃| ≤ 31.6, so for τ ≤ 1/31.6 (the default
0.02, their MNIST 0.005) every mask holds its own output pixel. The studio's absolute floor
(1e-6) lets near-constant pixels (the borders of MNIST resized to 32×32, variance ~1e-7) keep
a W_t[n, n] just above it: their rows of M̃ reach 10²–10³ and τ·max|M̃| empties the masks.

Numerics: Σ_n M[n, m]·(x_n − a·r_n)² is the same for every image and is dropped, with r the
query's own guess x/a clipped to each pixel's range over the training images, so each term
(x_n − a·x_{i,n})² − (x_n − a·r_n)² = a·δ·(2(x_n − a·r_n) + a·δ), δ = r_n − x_{i,n}, is computed
without forming a large square: near the data (x/a inside the range) it is exactly a²δ² ≥ 0
(no cancellation at small t), far from it (|x| ≫ 1) it stays O(a·|x|), not O(|x|²).

Cost: per query and image one D-deep masked sum per pixel, B·N·D² multiply-adds, done as one
matmul per chunk of images: those terms [B·M, D] times the mask. One global softmax per pixel
is accumulated over the chunks with the shared online log-sum-exp (els_jax.softmax;
analytic-diffusion-studio averages per-chunk softmaxes instead, which is not the softmax over
all images). Memory is O(B·chunk·D + D²) whatever N is. The masks depend on t only:
``locality_mask_at`` computes one from a prepared ``GaussianFit`` (``make_machine`` keeps the
fit, the ``prepare``d images and each mask it has computed).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from els_jax.core import conversions, softmax
from els_jax.machines import gaussian as gaussian_lib
from els_jax.machines import ideal
from els_jax.core import schedules as schedules_lib
from els_jax.core.data import held_images, unit_images
from els_jax.core.validation import check_query_and_images, mask_log_weights

__all__ = ["pca_locality_x0", "pca_locality_score", "pca_locality_mask", "locality_mask_at",
           "Candidates", "prepare", "masked_x0", "fit_x0", "check_tau", "chunk_images",
           "DEFAULT_TAU", "DIAG_FLOOR", "mask_sizes"]

DEFAULT_TAU = 0.02
DIAG_FLOOR = 1e-3      # |W_t[n, n]| below this times max_n |W_t[n, n]| counts as 1 (§7.3)
BLOCK = 1 << 20        # default logits per streamed chunk: B·chunk·D ≈ BLOCK
_HIGHEST = jax.lax.Precision.HIGHEST


class Candidates(NamedTuple):
    """The training images as the machine streams them (built once by ``prepare``).

    flat:   [N, H, W, C] (or [N, D]) the images as held: float32, or uint8 pixels converted
            a chunk at a time (docs/theory.md §9.2); flattened in (H, W, C) order inside jit.
    log_w:  [N]    0 for a candidate, −inf for an image excluded by a class mask.
    lo, hi: [D]    each pixel's range over the candidates (the reference r's clip).
    """

    flat: jax.Array
    log_w: jax.Array
    lo: jax.Array
    hi: jax.Array


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _pixel_ranges(images, log_w, chunk_size: int = ideal.STATS_CHUNK):
    """Each pixel's min and max over the selected images, [D] each, as float32 pixels, read
    ``chunk_size`` images at a time (as two whole-set reductions XLA:CPU materialised
    both masked copies of the set: 4 GB of temporaries at CelebA's N)."""
    flat = ideal.flat_images(images)
    n, d = flat.shape
    size = int(min(chunk_size, n))
    starts, first_new = softmax.chunk_starts(n, size)

    def body(ranges, chunk):
        lo, hi = ranges
        start, _ = chunk       # rows seen twice (the shifted last chunk) change neither
        c = ideal.rows_at(flat, start, size)
        sel = jnp.isfinite(jax.lax.dynamic_slice_in_dim(log_w, start, size))[:, None]
        return (jnp.minimum(lo, jnp.min(jnp.where(sel, c, jnp.inf), axis=0)),
                jnp.maximum(hi, jnp.max(jnp.where(sel, c, -jnp.inf), axis=0))), None

    init = (jnp.full((d,), jnp.inf, jnp.float32), jnp.full((d,), -jnp.inf, jnp.float32))
    (lo, hi), _ = jax.lax.scan(body, init, (starts, first_new))
    return lo, hi


def prepare(images, log_w) -> Candidates:
    """``Candidates`` of images [N, H, W, C] (float, or uint8 pixels: docs/theory.md §9) with
    log weights [N] (0 / −inf). The images are held as given (a float32 or uint8 jax array
    is not copied; anything else is put on the device once)."""
    images = held_images(images)
    lo, hi = _pixel_ranges(images, log_w)
    return Candidates(flat=images, log_w=log_w, lo=lo, hi=hi)


def check_tau(tau) -> float | jax.Array:
    """τ must be a real number in [0, 1] (a traced τ is passed through unchecked)."""
    if isinstance(tau, jax.core.Tracer):
        return tau
    if isinstance(tau, bool) or not isinstance(tau, (numbers.Real, np.ndarray, jax.Array)) \
            or np.ndim(tau) != 0:
        raise ValueError(f"tau must be a real number in [0, 1]; got {tau!r}")
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:           # also rejects NaN
        raise ValueError(f"tau must lie in [0, 1] (the mask keeps |M̃| ≥ tau·max|M̃|); got {tau}")
    return tau


def chunk_images(chunk_size, bsz: int, dim: int, n: int, block: int = BLOCK) -> int:
    """Training images per streamed chunk: ``chunk_size`` or, for None, about block/(B·D);
    in [1, N]."""
    if chunk_size is None:
        chunk_size = block // max(1, bsz * dim)
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool):
        raise ValueError(f"chunk_size must be an int or None; got {chunk_size!r}")
    return int(max(1, min(chunk_size, n)))


def _mask_t(fit: gaussian_lib.GaussianFit, a, b2, tau):
    """Mᵀ [D(m), D(n)] (bool) at the scalar coefficients a, b²."""
    gains = a * gaussian_lib.wiener_gains(fit.eigvals, a, b2)                # a²λ/(a²λ+b²)
    w = jnp.matmul(fit.eigvecs * gains[None], fit.eigvecs.T, precision=_HIGHEST)   # W_t
    diag = jnp.diagonal(w)
    floored = jnp.abs(diag) < DIAG_FLOOR * jnp.max(jnp.abs(diag))
    mag = jnp.abs(w / jnp.where(floored, 1.0, diag)[:, None])                # |M̃[n, m]|
    # The floored entry counts as 1 as its own numerator too: M̃[n, n] = 1 for every n
    # (W[n, n]/W[n, n] is exactly 1 in float32 for the others), see the module docstring.
    mag = jnp.where(jnp.eye(w.shape[0], dtype=bool), 1.0, mag)
    return (mag >= tau * jnp.max(mag)).T


@jax.jit
def locality_mask_at(fit: gaussian_lib.GaussianFit, a, b2, tau):
    """The transposed mask Mᵀ [D, D] (bool, row m = the input pixels n of output pixel m) at
    the scalar coefficients a, b², from a prepared ``gaussian.GaussianFit``."""
    return _mask_t(fit, a, b2, tau)


def _masked_x0(x, a, b2, mask_t, cands: Candidates, chunk_size):
    """x̂_0 [B, D] for queries x [B, D] at one (a, b²) with one mask Mᵀ [D, D] (float32)."""
    bsz, d = x.shape
    flat, log_w = ideal.flat_images(cands.flat), cands.log_w
    n = flat.shape[0]
    scale = -0.5 / jnp.maximum(b2, conversions.B2_FLOOR)
    # The reference r: x/a clipped to each pixel's range over the selected images.
    r = jnp.clip(x / jnp.maximum(a, 1e-30), cands.lo[None], cands.hi[None])  # [B, D]
    u2 = 2.0 * (x - a * r)                                                   # [B, D]
    starts, first_new = softmax.chunk_starts(n, chunk_size)
    rows = jnp.arange(chunk_size, dtype=jnp.int32)

    def body(state, chunk):
        start, first = chunk
        c = ideal.rows_at(flat, start, chunk_size)                             # [M, D]
        c_t = c.T                                                              # [D, M]
        lw = jax.lax.dynamic_slice_in_dim(log_w, start, chunk_size)
        lw = jnp.where(rows >= first, lw, -jnp.inf)                            # seen before
        # (x_n − a·c_n)² − (x_n − a·r_n)² = a·δ·(2(x_n − a·r_n) + a·δ), δ = r_n − c_n.
        delta = r[:, None, :] - c[None]                                        # [B, M, D]
        sq = (a * delta * (u2[:, None, :] + a * delta)).reshape(bsz * chunk_size, d)
        # dist[m, (b, i)] = Σ_n M[n, m]·sq[(b, i), n]: Mᵀ · sqᵀ, one D-deep matmul.
        dist = jax.lax.dot_general(mask_t, sq, (((1,), (1,)), ((), ())), precision=_HIGHEST)
        logits = dist.reshape(d, bsz, chunk_size) * scale + lw[None, None, :]  # [D, B, M]

        def weighted_sum(p):                                   # Σ_i p[m, b, i]·x_i,m
            return jnp.einsum("mbi,mi->mb", p, c_t, precision=_HIGHEST)[..., None]
        return softmax.update_with(state, logits, weighted_sum), None

    state, _ = jax.lax.scan(body, softmax.init((d, bsz), 1), (starts, first_new))
    return softmax.finalize(state)[..., 0].T


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def masked_x0(x, a, b2, mask_t, cands: Candidates, *, chunk_size):
    """x̂_0 [B, H, W, C] with a precomputed mask Mᵀ [D, D] (``locality_mask_at``) over the
    ``prepare``d candidates; a, b2 [B] the same for every query (the first is used)."""
    a, b2 = a[0], b2[0]
    out = _masked_x0(x.reshape(x.shape[0], -1), a, b2, mask_t.astype(jnp.float32), cands,
                     chunk_size)
    return out.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("chunk_size", "shared"))
def fit_x0(x, a, b2, fit: gaussian_lib.GaussianFit, cands: Candidates, tau, *, chunk_size,
           shared=False):
    """x̂_0 [B, H, W, C] with the masks computed here from ``fit``; a, b2 [B]: one mask per
    query, or with ``shared`` (the same coefficients for every query) one mask for all."""
    bsz = x.shape[0]
    xf = x.reshape(bsz, -1)

    def one_time(xb, ab, b2b):
        mask_t = _mask_t(fit, ab, b2b, tau).astype(jnp.float32)
        return _masked_x0(xb, ab, b2b, mask_t, cands, chunk_size)

    if shared:
        out = one_time(xf, a[0], b2[0])
    else:
        out = jax.vmap(lambda xb, ab, b2b: one_time(xb[None], ab, b2b)[0])(xf, a, b2)
    return out.reshape(x.shape)


def mask_sizes(mask_t) -> np.ndarray:
    """Input pixels per output pixel, [D] (int), of a transposed mask Mᵀ [D, D] (row m = the
    footprint of output pixel m), e.g. ``locality_mask_at``'s."""
    return np.asarray(jnp.sum(mask_t, axis=1))


def pca_locality_mask(t, images: Float[Array, "n h w c"], *, tau=DEFAULT_TAU, mask=None,
                      schedule=schedules_lib.Cosine()) -> Bool[Array, "d d"]:
    """The binary locality mask M [D, D] at the scalar time t: M[n, m] is True where input
    pixel n enters the logits of output pixel m (flat (H, W, C) indices, D = H·W·C).

        >>> m = pca_locality_mask(0.5, images)          # m[:, j]: the footprint of pixel j
    """
    if np.ndim(t) != 0:
        raise ValueError(f"pca_locality_mask takes one scalar time; got shape {np.shape(t)}")
    fit = gaussian_lib.fit_gaussian(images, mask=mask)
    coeffs = schedules_lib.query_coefficients(t, 1, schedule)
    return locality_mask_at(fit, coeffs.a[0], coeffs.b2[0], check_tau(tau)).T


def pca_locality_x0(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *,
                    tau=DEFAULT_TAU, mask=None, schedule=schedules_lib.Cosine(),
                    chunk_size: int | None = None) -> Float[Array, "b h w c"]:
    """Denoised mean of the PCA-locality machine (see the module docstring):

        x̂_0[m] = Σ_i softmax_i(−Σ_n M[n, m]·(x_n − a·x_{i,n})² / (2b²))·x_{i,m}

    Args:
      x: noisy queries [B, H, W, C].
      t: scalar time or one per query, [B] (one mask per distinct query time).
      images: training set [N, H, W, C] in [-1, 1].
      tau: mask threshold in [0, 1] relative to max|M̃| (0: full masks = the ideal machine).
      mask: optional boolean [N]; only images with True are candidates, and Σ is theirs.
      schedule: a Schedule or its name.
      chunk_size: training images per streamed chunk (memory knob, not a result knob);
        None: about 2^20 / (B·D).
    Returns:
      x̂_0 [B, H, W, C].

        >>> x0 = pca_locality_x0(x, 0.5, images, tau=0.005)   # x [B,H,W,C], images [N,H,W,C]
    """
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return _x0(x, coeffs, np.ndim(t) == 0, images, tau, mask, chunk_size)


def _x0(x, coeffs, one_time: bool, images, tau, mask, chunk_size):
    tau = jnp.float32(check_tau(tau))
    n = images.shape[0]
    log_w = mask_log_weights(mask, n)
    chunk = chunk_images(chunk_size, x.shape[0], math.prod(images.shape[1:]), n)
    cands = prepare(images, log_w)
    fit = gaussian_lib.fit_flat(cands.flat, gaussian_lib.selection_weights(log_w))
    if one_time:                  # the machine's path: one mask, then the streamed softmax
        mask_t = locality_mask_at(fit, coeffs.a[0], coeffs.b2[0], tau)
        return masked_x0(x, coeffs.a, coeffs.b2, mask_t, cands, chunk_size=chunk)
    return fit_x0(x, coeffs.a, coeffs.b2, fit, cands, tau, chunk_size=chunk)


def pca_locality_score(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *,
                       tau=DEFAULT_TAU, mask=None, schedule=schedules_lib.Cosine(),
                       chunk_size: int | None = None) -> Float[Array, "b h w c"]:
    """Score of the PCA-locality machine, s = −(x − a·x̂_0)/b², [B, H, W, C]
    (see ``pca_locality_x0``).

        >>> s = pca_locality_score(x, 0.5, images, mask=labels == 3)
    """
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    x0 = _x0(x, coeffs, np.ndim(t) == 0, images, tau, mask, chunk_size)
    return conversions.x0_to_score_at(x0, x, coeffs)

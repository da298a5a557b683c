"""The "els_soft" machine: ELS with a learned soft locality (docs/theory.md §7).

The ELS machine (``els.py``) compares the k×k window of x around each pixel with every
candidate window. Here the hard window is replaced by a Gaussian window of width σ on a
support of k_max × k_max pixels (k_max odd, m = k_max//2):

    g_σ(δ) = exp(−‖δ‖² / (2σ²)),        δ = (dy, dx) ∈ {−m … m}²,

    w_{i,c} = softmax_c( −Σ_δ g_σ(δ)·(q_{i,δ} − a·c_δ)² / (2b²) ),      x̂_0,i = Σ_c w_{i,c} v_c,

over the SAME candidates as ELS with k = k_max (``els_layout.layout``: "circular" with or without
``wrap_patches``; "zeros" with its interior / edge / corner candidate sets, and the local
machine's same-location candidates when k_max ≥ min(H, W)); v_c is the window's centre pixel.
One global softmax per query pixel over all candidates, streamed (``softmax.py``). As σ → ∞
(g ≡ 1; ``sigma=jnp.inf`` is allowed) it is ELS with k = k_max; as σ → 0 it compares centre
pixels only.

Computation. Dropping the per-query constant Σ g q², with q̃ = q − a·μ, c̃ = c − μ (μ the
per-channel data mean; an exact shift, padding included):

    logit_{i,c} = (a/b²)·(g ⊙ q̃_i)·c̃ − (a²/b²)·½ Σ_δ g_δ c̃_δ² + log w_c

The cross term is one matmul [Q, k²C] × [k²C, M] per chunk of candidates (the Gaussian rides
on the query), the ½Σ g c̃² term one matrix-vector product per chunk. Everything is plain jnp
(differentiable in x and σ by ``jax.grad`` and ``jax.jvp``); candidates are streamed with
``lax.scan`` over chunks, and the scan body is rematerialised (``jax.checkpoint``), so reverse
mode keeps one softmax state per chunk (B·H·W·(C + 2) floats) instead of every chunk's
logits: the logits held at once are bounded by ``block``, only the small saved states grow
with N / chunk (N = 1000 random 32×32 images, k_max = 11, B = 1, circular: XLA temporaries
8.5 MB for x̂_0, 17 MB for its gradient; experiments/bench_soft.py).

    x0 = els_soft_x0(x, 0.4, images, sigma=1.5, k_max=7, boundary="zeros")
    eps_fn = make_machine("els_soft", images, sigmas=[...], k_max=7, boundary="zeros")

``make_machine("els_soft", ...)`` precomputes the σ-independent candidate windows once (a
bank, identical windows merged with their count when that saves ≥ 10 %) and compiles one
executable for every step: σ is a traced argument. ``calibration.calibrate_sigma`` fits σ per
step to a network by gradient descent through ``SoftMachine.x0_at``.
"""

from __future__ import annotations

import functools
import math
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from els_jax.core import conversions, softmax
from els_jax.engines import layout as els_layout, native, shiftmap, window as els_window
from els_jax.machines.base import Machine
from els_jax.core import schedules as schedules_lib
from els_jax.core.validation import check_query_and_images, mask_log_weights

__all__ = ["els_soft_x0", "els_soft_score", "gaussian_window", "axis_weights", "sigma_for_scale",
           "resolve_engine", "ENGINES", "pair_count",
           "soft_groups", "SoftBank", "SoftSpec", "build_soft_bank", "soft_bank_x0",
           "SoftMachine", "make_soft_machine"]

_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------
# The window and the candidate layout.


def gaussian_window(sigma, k_max: int, c: int = 1) -> Float[Array, " d"]:
    """g_σ(δ) = exp(−‖δ‖²/(2σ²)) over the k_max × k_max offsets, laid out (dy, dx, c) like a
    window vector (``patches.extract_windows``): [k_max²·C]. σ = inf gives g ≡ 1."""
    m = k_max // 2
    d = np.arange(-m, m + 1, dtype=np.float32)
    r2 = np.repeat((d[:, None] ** 2 + d[None, :] ** 2).reshape(-1), c)        # [k²C]
    inv = 0.5 / jnp.square(jnp.asarray(sigma, jnp.float32))                  # 0 at σ = inf
    return jnp.exp(-inv * jnp.asarray(r2))


def axis_weights(sigma, k_max: int) -> Float[Array, " k"]:
    """g₁(δ) = exp(−δ²/(2σ²)) for δ = −m … m, [k_max]: the window is separable,
    g_σ(δy, δx) = g₁(δy)·g₁(δx) (what the shift-map kernel sums along each axis)."""
    m = k_max // 2
    d = np.arange(-m, m + 1, dtype=np.float32)
    inv = 0.5 / jnp.square(jnp.asarray(sigma, jnp.float32))
    return jnp.exp(-inv * jnp.asarray(d * d))


def sigma_for_scale(k: int) -> float:
    """The Gaussian width matching a k×k box window: equal second moment per axis,
    σ² = (k² − 1)/12 (a box of k = 3 ↦ σ ≈ 0.82, 5 ↦ 1.41, 11 ↦ 3.16); at least 0.3 (k = 1,
    a window of one pixel: g = exp(−5.6) ≈ 0.004 on the neighbours)."""
    return max(math.sqrt((int(k) ** 2 - 1) / 12.0), 0.3)


def soft_groups(k_max: int, boundary: str, wrap_patches: bool, h: int, w: int):
    """The ELS candidate layout for window size k_max as batches of equal groups
    (``els_layout.Grouped``: G groups of Pq query pixels, each with its own Pc candidate centres).

    "circular" and "zeros" with k_max < min(H, W): every pass of ``els_layout.layout`` (for "zeros"
    the interior and the edge/corner groups). "zeros" with k_max ≥ min(H, W): the local
    machine's layout (docs/theory.md §2 notes), each pixel matched only with its own location."""
    if boundary == "zeros" and k_max >= min(h, w):
        pix = np.arange(h * w)
        passes = [els_layout.Pass(pix, "zeros", pix, "zeros", pix, pix)]
    else:
        passes = els_layout.layout(k_max, boundary, wrap_patches, h, w)
    return [gp for ps in passes for gp in els_layout.group_pass(ps)]


def restrict_groups(groups, pixels):
    """The groups of ``soft_groups`` restricted to query pixels: for each batch of groups,
    (Grouped, indices of the kept groups) or None when none is kept. ``pixels``: a tuple of
    flat pixel indices, or None for all. A one-group batch keeps exactly the given pixels; in a
    batch of several groups (each with its own candidates: zero padding's edge and corner
    groups) a group is kept whole when one of its query pixels is given, so that every group
    keeps its equal size. ``computed_pixels`` says which pixels that computes."""
    if pixels is None:
        return [(gp, None) for gp in groups]
    chosen = np.zeros(max(int(gp.query_pixels.max()) for gp in groups) + 1, bool)
    chosen[np.asarray(pixels, np.int64)] = True
    out = []
    for gp in groups:
        qp = gp.query_pixels
        if qp.shape[0] == 1:
            keep = chosen[qp[0]]
            out.append(None if not keep.any() else (els_layout.Grouped(
                qp[0][keep][None], gp.query_mode, gp.cand_pixels, gp.cand_mode), np.arange(1)))
            continue
        sel = np.flatnonzero(chosen[qp].any(axis=1))
        out.append(None if not sel.size else (els_layout.Grouped(
            qp[sel], gp.query_mode, gp.cand_pixels[sel], gp.cand_mode), sel))
    return out


def computed_pixels(k_max: int, boundary: str, wrap_patches: bool, h: int, w: int,
                    pixels) -> np.ndarray:
    """The flat pixel indices (sorted) at which x̂_0 is computed when it is asked for at
    ``pixels`` (``restrict_groups``): the given ones and the rest of their edge groups."""
    groups = restrict_groups(soft_groups(k_max, boundary, wrap_patches, h, w), pixels)
    return np.sort(np.concatenate([g.query_pixels.reshape(-1) for g, _ in
                                   filter(None, groups)]))


def pixel_units(k_max: int, boundary: str, wrap_patches: bool, h: int, w: int):
    """The query pixels in the units ``restrict_groups`` computes them: a list of int arrays,
    one per pixel of a one-group batch, one per group of a several-group batch (zero
    padding's edge and corner groups, computed whole)."""
    units = []
    for gp in soft_groups(k_max, boundary, wrap_patches, h, w):
        qp = gp.query_pixels
        units += [qp[0][j:j + 1] for j in range(qp.shape[1])] if qp.shape[0] == 1 else list(qp)
    return units


def pair_count(k_max: int, boundary: str, wrap_patches: bool, h: int, w: int,
               pixels=None) -> int:
    """(query pixel, candidate position) pairs per query image and training image of the
    layout, over every pixel or over what ``restrict_groups`` computes for ``pixels``."""
    groups = restrict_groups(soft_groups(k_max, boundary, wrap_patches, h, w),
                             None if pixels is None else tuple(int(p) for p in pixels))
    return int(sum(g.query_pixels.size * g.cand_pixels.shape[1]
                   for g, _ in filter(None, groups)))


def sample_pixels(k_max: int, boundary: str, wrap_patches: bool, h: int, w: int, count: int,
                  seed: int = 0) -> np.ndarray:
    """A fixed random set of query pixels (sorted flat indices) whose computed set
    (``computed_pixels``) holds about ``count`` pixels: units (``pixel_units``) are drawn in
    a random order until they cover ``count`` pixels, so ``count`` is the cost."""
    units = pixel_units(k_max, boundary, wrap_patches, h, w)
    chosen, covered = [], 0
    for j in np.random.default_rng(seed).permutation(len(units)):
        if covered >= count:
            break
        chosen.append(units[j])
        covered += len(units[j])
    return np.sort(np.concatenate(chosen))


def _check_sigma(sigma):
    """σ as a float32 scalar; a concrete σ must be > 0 (inf allowed: the hard window)."""
    s = jnp.asarray(sigma, jnp.float32)
    if s.ndim != 0:
        raise ValueError(f"sigma must be a scalar (one width per step); got shape {s.shape}")
    if not isinstance(s, jax.core.Tracer) and not float(s) > 0:
        raise ValueError(f"sigma must be > 0 (the Gaussian window's width in pixels; "
                         f"inf = the hard k_max × k_max window); got {float(s)}")
    return s


def _check_k_max(k_max, h, w, boundary, wrap_patches):
    if boundary not in ("circular", "zeros"):
        raise ValueError(f"unknown boundary {boundary!r}; choose 'circular' or 'zeros'")
    try:
        return els_layout.check_k(k_max, h, w, boundary, wrap_patches)
    except ValueError as err:
        raise ValueError(f"k_max: {err}") from None


# ----------------------------------------------------------------------------------------
# The engine: one chunk of candidates into the running softmax.


def _queries(x, a, b2, g, k, gp, mu):
    """Weighted query windows (a/b²)·g ⊙ (q − a·μ), [G, B·Pq, D], and each query's
    coefficient −a²/b² of ½Σ g c̃², [G, B·Pq] (group first, then batch, then pixel)."""
    bsz, h, w, _ = x.shape
    n_groups, pq = gp.query_pixels.shape
    shift = els_layout.shift_vector(mu, k, gp.query_mode, h, w)
    q = els_layout.gather_windows(x, k, gp.query_mode, gp.query_pixels.reshape(-1))   # [B, G·Pq, D]
    q = (q - a[:, None, None] * shift[None, None]) * (a / b2)[:, None, None] * g[None, None]
    q = jnp.swapaxes(q.reshape(bsz, n_groups, pq, -1), 0, 1).reshape(n_groups, bsz * pq, -1)
    coef = jnp.broadcast_to((-(a * a) / b2)[None, :, None], (n_groups, bsz, pq))
    return q, coef.reshape(n_groups, bsz * pq)


def _image_candidates(images, log_w, k, gp, shift):
    """Candidates of ``gp`` from images [n, H, W, C] with log weights [n]: windows minus the
    mean shift [G, n·Pc, D], centre pixels [G, n·Pc, C], log weights [G, n·Pc]."""
    n, h, w, c = images.shape
    n_groups, pc = gp.cand_pixels.shape
    keys = els_layout.gather_windows(images, k, gp.cand_mode, gp.cand_pixels.reshape(-1)) - shift[None, None]
    values = images.reshape(n, h * w, c)[:, gp.cand_pixels.reshape(-1)]

    def by_group(arr):
        return jnp.swapaxes(arr.reshape(n, n_groups, pc, -1), 0, 1).reshape(
            n_groups, n * pc, arr.shape[-1])
    log_w = jnp.broadcast_to(log_w[None, :, None], (n_groups, n, pc)).reshape(n_groups, n * pc)
    return by_group(keys), by_group(values), log_w


def _update(state, q, coef, g, keys, values, log_w):
    """Adds one chunk: q [G, Q, D], coef [G, Q], g [D], keys [G, M, D], values [G, M, V],
    log_w [G, M] (−inf = absent; added outside the matmul so that a tangent never meets
    0·inf)."""
    half = 0.5 * jnp.matmul(keys * keys, g, precision=_HI)                    # [G, M]
    if q.shape[0] == 1:         # plain 2-D matmuls: XLA lays them out without transposes
        cross = jnp.matmul(q[0], keys[0].T, precision=_HI)[None]

        def weighted_sum(p):
            return jnp.matmul(p[0], values[0], precision=_HI)[None]
    else:
        cross = jnp.einsum("gqd,gmd->gqm", q, keys, precision=_HI)

        def weighted_sum(p):
            return jnp.einsum("gqm,gmv->gqv", p, values, precision=_HI)
    logits = cross + coef[:, :, None] * half[:, None, :] + log_w[:, None, :]
    # The chunk's own softmax state, merged exactly into the running one (softmax.merge). Its
    # reference max is detached from the derivatives, which is exact (the result does not
    # depend on it) and avoids differentiating a max: its derivative divides by the number of
    # logits equal to the max, and through ``softmax.update_with`` jitted jvp gave NaN
    # tangents on zero padding's edge groups (XLA:CPU, jax 0.10.2), presumably a tie count of
    # 0 from logits computed twice with different rounding.
    # logit − max ≤ 0 exactly, but the same double computation can make it a few ulps of a
    # ~1e12 logit (t near 0) above 0: capped by a select (a min would halve the tangent of the
    # maximal logit).
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    d = logits - jnp.where(jnp.isfinite(top), top, 0.0)[..., None]
    p = jnp.exp(jnp.where(d > 0, 0.0, d))
    return softmax.merge(state, softmax.SoftmaxState(top, jnp.sum(p, axis=-1), weighted_sum(p)))


def _halve_to_block(chunk: int, per_candidate: int, block: int) -> int:
    while chunk > 1 and chunk * per_candidate > block:
        chunk //= 2
    return chunk


# ----------------------------------------------------------------------------------------
# Which engine computes the machine.

# "shiftmap": the shift-map form (docs/theory.md §9) in the fused CPU kernel
# (``native.shiftmap_softmax_state`` with the Gaussian's per-axis weights): per pair
# Σ_δ g₁(δy)g₁(δx)·f_d(i + δ) by direct weighted sums, 2·k_max + C multiply-adds whatever
# the channels, no bank (the images themselves), every boundary's pair rule in one call;
# derivatives from the XLA stream (``native.with_reference_derivatives``).
# "xla": the matmul form below, from a bank of candidate windows when it fits ``bank_bytes``
# (else streamed from the images): k_max²·C multiply-adds per pair; any backend.
# "auto" = "shiftmap" when the kernels build and the default device is a CPU, else "xla".
# Measured on mnist5k (N = 5000, 32×32×1, k_max = 9, zeros; experiments/bench_soft.py):
# see the README's els_soft section.
ENGINES = ("auto", "shiftmap", "xla")


def resolve_engine(engine: str) -> str:
    """"shiftmap" or "xla" for ``engine`` (one of ``ENGINES``) on this process's devices."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    on_cpu = jax.default_backend() == "cpu"
    if engine == "shiftmap":
        if not native.available():
            raise RuntimeError("engine='shiftmap': the fused CPU kernels are not available (no "
                               "C++ compiler, or ELS_JAX_NATIVE=0); use engine='auto' or 'xla'")
        return "shiftmap"
    if engine == "auto":
        return "shiftmap" if on_cpu and native.available() else "xla"
    return "xla"


def _shiftmap_kernel_x0(x, a, b2, sigma, images, log_w, mu, *, k, boundary, wrap_patches,
                        block, pixels=None):
    """x̂_0 by the shift-map kernel over all pixels (with ``pixels``: 0 outside
    ``computed_pixels``, as the XLA form)."""
    del block, mu                          # the map sums squares directly: no centring
    bsz, h, w, c = x.shape
    mode = shiftmap.resolve_kind("els", k, h, w, boundary, wrap_patches)
    mx, tot, acc = native.shiftmap_softmax_state(
        x, a, b2, images, log_w, k, shiftmap.MODES.index(mode), weights=axis_weights(sigma, k))
    x0 = softmax.finalize(softmax.SoftmaxState(mx, tot, acc))
    if pixels is not None:
        on = np.zeros(h * w, bool)
        on[computed_pixels(k, boundary, wrap_patches, h, w, pixels)] = True
        x0 = jnp.where(jnp.asarray(on.reshape(1, h, w, 1)), x0, 0.0)
    return x0


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "block",
                                             "pixels"))
def _shiftmap_x0(x, a, b2, sigma, images, log_w, mu, *, k, boundary, wrap_patches, block,
                 pixels=None):
    """x̂_0 [B, H, W, C]: values from the shift-map kernel on a CPU (the XLA stream
    elsewhere), derivatives from the XLA stream (``_stream_x0``; the same function)."""
    kw = dict(k=k, boundary=boundary, wrap_patches=wrap_patches, block=block, pixels=pixels)
    xla = functools.partial(_stream_x0, **kw)
    kern = functools.partial(_shiftmap_kernel_x0, **kw)

    def fused(*args):
        return jax.lax.platform_dependent(*args, cpu=kern, default=xla)
    return native.with_reference_derivatives(fused, xla)(x, a, b2, sigma, images, log_w, mu)


# ----------------------------------------------------------------------------------------
# The functional API: candidates streamed straight from the images.


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "block",
                                             "pixels"))
def _stream_x0(x, a, b2, sigma, images, log_w, mu, *, k, boundary, wrap_patches, block,
               pixels=None):
    """x̂_0 [B, H, W, C] with candidates streamed from the images; with ``pixels`` (a tuple of
    flat indices) only at ``computed_pixels`` (0 elsewhere)."""
    bsz, h, w, c = x.shape
    n = images.shape[0]
    g = gaussian_window(sigma, k, c)
    results = []
    for restricted in restrict_groups(soft_groups(k, boundary, wrap_patches, h, w), pixels):
        if restricted is None:
            continue
        gp, _ = restricted
        q, coef = _queries(x, a, b2, g, k, gp, mu)
        shift = els_layout.shift_vector(mu, k, gp.cand_mode, h, w)
        n_groups, pq = gp.query_pixels.shape
        pc = gp.cand_pixels.shape[1]
        n_img = int(min(n, max(1, block // max(1, bsz * n_groups * pq * pc))))
        n_img = int(min(n_img, max(1, 4 * block // (n_groups * pc * shift.shape[0]))))
        starts, first_new = softmax.chunk_starts(n, n_img)
        rows = jnp.arange(n_img, dtype=jnp.int32)

        @jax.checkpoint
        def body(state, chunk, q=q, coef=coef, gp=gp, shift=shift, n_img=n_img, rows=rows):
            start, first = chunk
            imgs = jax.lax.dynamic_slice_in_dim(images, start, n_img)
            lw = jax.lax.dynamic_slice_in_dim(log_w, start, n_img)
            keys, values, lw = _image_candidates(
                imgs, jnp.where(rows >= first, lw, -jnp.inf), k, gp, shift)
            return _update(state, q, coef, g, keys, values, lw), None

        state, _ = jax.lax.scan(body, softmax.init(q.shape[:2], c), (starts, first_new))
        results.append(els_window.window_result(gp, state, bsz))
    return els_layout.scatter(x.shape, results)


def els_soft_x0(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, sigma,
                k_max: int, boundary: str = "circular", wrap_patches: bool = False, mask=None,
                schedule=schedules_lib.Cosine(), block: int = els_layout.DEFAULT_BLOCK,
                engine: str = "auto") -> Float[Array, "b h w c"]:
    """Denoised mean x̂_0 of the els_soft machine, [B, H, W, C] (module docstring).

    Args:
      x: noisy queries [B, H, W, C].
      t: scalar time or one per query [B].
      images: training set [N, H, W, C].
      sigma: the Gaussian window's width in pixels, a scalar > 0 (inf: the hard window,
        = ``els_x0`` with k = k_max). Differentiable (a traced σ is not range-checked).
      k_max: odd size of the window's support (the ELS window size of the candidate layout).
      boundary: "circular" or "zeros"; wrap_patches: circular only (as ``els_x0``).
      mask: optional boolean [N] selecting candidate images (class-conditional).
      schedule: a Schedule or its name.
      block: logits per streamed chunk (memory knob only).
      engine: "auto", "shiftmap" or "xla" (``ENGINES``: the same values to float32 rounding).

        >>> x0 = els_soft_x0(x, 0.4, images, sigma=1.5, k_max=7, boundary="zeros")
        >>> dx0_dsigma = jax.jacfwd(lambda s: els_soft_x0(x, 0.4, images, sigma=s, k_max=7))(1.5)
    """
    check_query_and_images(x, images)
    h, w = x.shape[1], x.shape[2]
    k = _check_k_max(k_max, h, w, boundary, wrap_patches)
    sigma = _check_sigma(sigma)
    images = jnp.asarray(images, jnp.float32)
    log_w = mask_log_weights(mask, images.shape[0])
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    run = _shiftmap_x0 if resolve_engine(engine) == "shiftmap" else _stream_x0
    return run(x, coeffs.a, coeffs.b2, sigma, images, log_w, jnp.mean(images, axis=(0, 1, 2)),
               k=k, boundary=boundary, wrap_patches=bool(wrap_patches), block=int(block))


def els_soft_score(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, sigma,
                   k_max: int, boundary: str = "circular", wrap_patches: bool = False,
                   mask=None, schedule=schedules_lib.Cosine(),
                   block: int = els_layout.DEFAULT_BLOCK,
                   engine: str = "auto") -> Float[Array, "b h w c"]:
    """Score s = −(x − a·x̂_0)/b² of the els_soft machine, [B, H, W, C]; arguments as
    ``els_soft_x0``.

        >>> s = els_soft_score(x, 0.3, images, sigma=1.0, k_max=5, boundary="circular")
    """
    x0 = els_soft_x0(x, t, images, sigma=sigma, k_max=k_max, boundary=boundary,
                     wrap_patches=wrap_patches, mask=mask, schedule=schedule, block=block,
                     engine=engine)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return conversions.x0_to_score_at(x0, x, coeffs)


# ----------------------------------------------------------------------------------------
# A bank: the σ-independent candidate windows, built once per (data set, k_max, boundary).


class SoftBank(NamedTuple):
    """Per batch of groups (``soft_groups``): keys [G, M, D] (windows minus μ), values
    [G, M, C] (centre pixels), log_w [G, M] (log multiplicity of merged identical windows;
    −inf pads M to whole chunks); mu [C] the data mean."""

    mu: jax.Array
    keys: tuple
    values: tuple
    log_w: tuple


class SoftSpec(NamedTuple):
    """Static facts about a SoftBank (hashable, for jit)."""

    k: int
    boundary: str
    wrap_patches: bool
    chunks: tuple              # candidates per chunk (power of two) of each batch of groups
    unique_fraction: float     # candidates left after merging (1.0: not merged)


def build_soft_bank(images, *, k_max: int, boundary: str = "circular",
                    wrap_patches: bool = False, dedup: bool = True,
                    dedup_threshold: float = 0.9, block: int = els_layout.DEFAULT_BLOCK,
                    images_per_step: int = 64):
    """Precomputes every candidate window of the layout (host numpy, then one transfer).

    With ``dedup``, identical candidates (window and value) are merged into one with log w =
    log(count) — exact — when that leaves at most ``dedup_threshold`` of them. A class mask
    is applied by passing only the selected images. Returns (SoftBank, SoftSpec)."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    k = _check_k_max(k_max, h, w, boundary, wrap_patches)
    if dedup and not (boundary == "zeros" and k >= min(h, w)):     # the ELS layout: estimate
        dedup = els_window.estimate_unique_fraction(images, k=k, boundary=boundary,
                                             wrap_patches=wrap_patches) <= dedup_threshold
    mu = images.mean(axis=(0, 1, 2))
    keys_out, values_out, lw_out, chunks = [], [], [], []
    kept = total = 0
    for gp in soft_groups(k, boundary, wrap_patches, h, w):
        n_groups, pq = gp.query_pixels.shape
        keys, values = els_window.host_window_candidates(images, k, gp, mu, images_per_step)
        d = keys.shape[-1]
        per_group = []
        for gi in range(n_groups):
            if dedup:
                uniq, counts = els_window.unique_rows(np.concatenate([keys[gi], values[gi]], 1))
                per_group.append((uniq[:, :d], uniq[:, d:], counts))
            else:
                per_group.append((keys[gi], values[gi], None))
        total += keys.shape[0] * keys.shape[1]
        merged = sum(len(kk) for kk, _, _ in per_group)
        if not dedup or merged > dedup_threshold * keys.shape[0] * keys.shape[1]:
            per_group = [(keys[gi], values[gi], None) for gi in range(n_groups)]
            merged = keys.shape[0] * keys.shape[1]
        kept += merged
        m = max(len(kk) for kk, _, _ in per_group)
        chunk = min(els_layout.pow2_floor(max(1, block // (n_groups * pq))),
                    1 << int(np.ceil(np.log2(max(1, m)))))
        size = -(-m // chunk) * chunk
        bank_k = np.zeros((n_groups, size, d), np.float32)
        bank_v = np.zeros((n_groups, size, c), np.float32)
        bank_w = np.full((n_groups, size), -np.inf, np.float32)
        for gi, (kk, vv, counts) in enumerate(per_group):
            bank_k[gi, :len(kk)] = kk
            bank_v[gi, :len(kk)] = vv
            bank_w[gi, :len(kk)] = 0.0 if counts is None else np.log(counts)
        keys_out.append(jnp.asarray(bank_k))
        values_out.append(jnp.asarray(bank_v))
        lw_out.append(jnp.asarray(bank_w))
        chunks.append(int(chunk))
    bank = SoftBank(jnp.asarray(mu), tuple(keys_out), tuple(values_out), tuple(lw_out))
    return bank, SoftSpec(k, boundary, bool(wrap_patches), tuple(chunks),
                          round(kept / max(1, total), 4))


@functools.partial(jax.jit, static_argnames=("spec", "block", "pixels"))
def soft_bank_x0(x, a, b2, sigma, bank: SoftBank, *, spec: SoftSpec,
                 block: int = els_layout.DEFAULT_BLOCK, pixels=None):
    """x̂_0 [B, H, W, C] of the els_soft machine from a ``build_soft_bank`` bank and the
    coefficients a, b² [B]; σ a traced scalar (one executable for every σ), differentiable in
    x, a, b² and σ. With ``pixels`` (a tuple of flat indices) only at ``computed_pixels``
    (0 elsewhere): the other query pixels cost nothing (what the width fit uses)."""
    bsz, h, w, c = x.shape
    g = gaussian_window(sigma, spec.k, c)
    results = []
    groups = restrict_groups(soft_groups(spec.k, spec.boundary, spec.wrap_patches, h, w),
                             pixels)
    for restricted, keys, values, log_w, chunk in zip(groups, bank.keys, bank.values,
                                                      bank.log_w, spec.chunks):
        if restricted is None:
            continue
        gp, sel = restricted
        if sel is not None and len(sel) != keys.shape[0]:     # the kept groups' candidates
            keys, values, log_w = keys[sel], values[sel], log_w[sel]
        q, coef = _queries(x, a, b2, g, spec.k, gp, bank.mu)
        n_groups, pq = gp.query_pixels.shape
        ch = _halve_to_block(chunk, max(bsz * n_groups * pq,
                                        n_groups * (keys.shape[-1] + c + 1)), block)

        @jax.checkpoint
        def body(state, j, q=q, coef=coef, keys=keys, values=values, log_w=log_w, ch=ch):
            def take(arr):
                return jax.lax.dynamic_slice_in_dim(arr, j * ch, ch, axis=1)
            return _update(state, q, coef, g, take(keys), take(values), take(log_w)), None

        state, _ = jax.lax.scan(body, softmax.init(q.shape[:2], c),
                                jnp.arange(keys.shape[1] // ch))
        results.append(els_window.window_result(gp, state, bsz))
    return els_layout.scatter(x.shape, results)


# ----------------------------------------------------------------------------------------
# The machine as a sampler model.


def _normalise_sigmas(sigmas):
    """(tuple of σ, index 0 = last step, or None; constant σ or None)."""
    if sigmas is None:
        raise ValueError("the 'els_soft' machine needs sigmas (a width > 0 or one per step)")
    if np.ndim(sigmas) == 0:
        values, const = None, float(sigmas)
        check = [const]
    else:
        values = tuple(float(s) for s in np.asarray(sigmas, np.float64).reshape(-1))
        if not values:
            raise ValueError("sigmas is empty")
        const, check = None, values
    for s in check:
        if not s > 0:
            raise ValueError(f"every sigma must be > 0 (inf = the hard window); got {s}")
    return values, const


class SoftMachine(Machine):
    """The els_soft machine as ``eps_fn(x, t, i) -> ε̂``: step i of an m-step run uses
    ``sigmas[m − 1 − i]`` (index 0 = the last, lowest-noise step, as scale lists).

    Attributes: kind "els_soft", sigmas (tuple or None), k_max, num_steps, schedule.
    Methods: sigma(i); x0(x, t, i); x0_sigma(x, t, sigma) (any σ, differentiable: what the
    calibration differentiates); score; __call__ (ε̂); lower; compile; engine."""

    def __init__(self, fn, sigmas, sigma_const, k_max, schedule, info, boundary="circular",
                 wrap_patches=False):
        super().__init__("els_soft", {int(k_max): fn}, None, schedule, int(k_max))
        self._boundary, self._wrap = boundary, bool(wrap_patches)
        self._fn = fn
        self.sigmas = sigmas
        self._sigma_const = sigma_const
        self.k_max = int(k_max)
        self.num_steps = None if sigmas is None else len(sigmas)
        self._info = info

    def sigma(self, i: int) -> float:
        if self.sigmas is None:
            return self._sigma_const
        if not 0 <= i < len(self.sigmas):
            raise ValueError(f"step index {i} is outside the {len(self.sigmas)}-step sigma list")
        return self.sigmas[len(self.sigmas) - 1 - i]

    def patch_size(self, i: int):
        self.sigma(i)                             # checks i
        return self.k_max

    def x0_sigma(self, x, t, sigma, pixels=None):
        """x̂_0 at any width σ (a scalar > 0, or traced: differentiable in x and σ). With
        ``pixels`` (flat indices) only at ``self.computed_pixels(pixels, x.shape)``, 0
        elsewhere, at a cost in proportion (what the width fit uses)."""
        pixels = None if pixels is None else tuple(int(p) for p in np.sort(pixels))
        return self._fn(x, self.coefficients(x, t), _check_sigma(sigma), pixels)

    def x0_sigma_parts(self):
        """(pure, arrays): x̂_0 = pure(x, coeffs, sigma, arrays, pixels) with the machine's
        arrays (its bank, or its images) an argument, so that a function jitted around it
        (the width fit) takes them as inputs instead of baking GBs of constants into its
        executable."""
        return self._fn.pure, self._fn.arrays

    def sample_pixels(self, count: int, shape, seed: int = 0) -> np.ndarray:
        """``sample_pixels`` for this machine's layout and queries of ``shape``."""
        return sample_pixels(self.k_max, self._boundary, self._wrap, shape[1], shape[2],
                             count, seed)

    def computed_pixels(self, pixels, shape) -> np.ndarray:
        """Where ``x0_sigma(..., pixels=pixels)`` computes x̂_0 for queries of ``shape``."""
        return computed_pixels(self.k_max, self._boundary, self._wrap, shape[1], shape[2],
                               pixels)

    def x0_at(self, x, coeffs, i: int):
        return self._fn(x, coeffs, jnp.float32(self.sigma(i)))   # checked when built

    def lower(self, x, t, i: int):
        return self._fn.lower(x, self.coefficients(x, t), jnp.float32(self.sigma(i)))

    def compile(self, x, t=0.5) -> float:
        """Compiles the one executable every step uses (σ is traced). Returns seconds."""
        start = time.perf_counter()
        x = jnp.asarray(x, jnp.float32)
        self._fn.lower(x, self.coefficients(x, t), jnp.float32(1.0)).compile()
        return time.perf_counter() - start

    def engine(self, i: int) -> dict:
        return dict(self._info)

    def bank_spec(self, i: int):
        return getattr(self._fn, "spec", None)

    def __repr__(self):
        return (f"SoftMachine(k_max={self.k_max}, sigmas={self.sigmas or self._sigma_const}, "
                f"num_steps={self.num_steps})")


def make_soft_machine(images, *, sigmas: float | Sequence[float], k_max: int,
                      boundary: str = "circular", wrap_patches: bool = False,
                      schedule=schedules_lib.Cosine(), mask=None,
                      dedup: bool = True, dedup_threshold: float = 0.9,
                      block: int = els_layout.DEFAULT_BLOCK, bank_bytes: int = 2 << 30,
                      engine: str = "auto", compile_for=None, mesh=None) -> SoftMachine:
    """``make_machine("els_soft", ...)``: the els_soft machine as a sampler model.

    Args:
      images: training set [N, H, W, C].
      sigmas: a width σ > 0, or one per step with index 0 = the last (lowest-noise) step.
      k_max: odd support of the Gaussian window (= the ELS window size of the layout).
      boundary, wrap_patches, schedule, mask: as ``els_soft_x0`` / ``make_machine``.
      dedup, dedup_threshold: merge identical candidate windows (exact) when that leaves at
        most ``dedup_threshold`` of them (first estimated on a sample of the images with
        ``els_window.estimate_unique_fraction``, as the ELS machine does).
      block: logits per streamed chunk. bank_bytes: the largest bank to precompute; above it
        candidates are streamed from the images at every call (memory independent of N).
      engine: "auto", "shiftmap" (the fused CPU kernel from the images: no bank) or "xla"
        (bank or stream); ``ENGINES``.
      compile_for: optional queries [B, H, W, C]: compile now (one executable for all steps).
      mesh: not supported (candidate sharding is for the hard-window machines).
    """
    if mesh is not None:
        raise ValueError("the 'els_soft' machine does not shard its candidates (mesh=None)")
    schedule = schedules_lib.get(schedule)
    sigma_list, sigma_const = _normalise_sigmas(sigmas)
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != (images.shape[0],) or not mask.any():
            raise ValueError(f"mask must be a boolean vector over the {images.shape[0]} "
                             f"training images selecting at least one; got {mask.shape}")
        images = images[mask]
    n, h, w, c = images.shape
    k = _check_k_max(k_max, h, w, boundary, wrap_patches)
    start = time.perf_counter()
    n_cands = sum(gp.cand_pixels.size for gp in soft_groups(k, boundary, wrap_patches, h, w))
    use_kernel = resolve_engine(engine) == "shiftmap"
    if not use_kernel and n * n_cands * (k * k * c + c + 1) * 4 <= bank_bytes:
        bank, spec = build_soft_bank(images, k_max=k, boundary=boundary,
                                     wrap_patches=wrap_patches, dedup=dedup,
                                     dedup_threshold=dedup_threshold, block=block)

        def pure(x, coeffs, sigma, arrays, pixels=None):
            return soft_bank_x0(jnp.asarray(x, jnp.float32), coeffs.a, coeffs.b2, sigma,
                                arrays, spec=spec, block=block, pixels=pixels)

        def fn(x, coeffs, sigma, pixels=None):
            return pure(x, coeffs, sigma, bank, pixels)
        fn.pure, fn.arrays = pure, bank
        fn.lower = lambda x, coeffs, sigma: soft_bank_x0.lower(
            jnp.asarray(x, jnp.float32), coeffs.a, coeffs.b2, jnp.float32(sigma), bank,
            spec=spec, block=block)
        fn.spec = spec
        info = {"engine": "soft", "bank": True, "unique_fraction": spec.unique_fraction}
    else:
        images_j = jnp.asarray(images)
        mu = jnp.mean(images_j, axis=(0, 1, 2))
        log_w = jnp.zeros((n,), jnp.float32)
        kw = dict(k=k, boundary=boundary, wrap_patches=bool(wrap_patches), block=block)
        run = _shiftmap_x0 if use_kernel else _stream_x0

        def pure(x, coeffs, sigma, arrays, pixels=None):
            return run(jnp.asarray(x, jnp.float32), coeffs.a, coeffs.b2, sigma, *arrays,
                       pixels=pixels, **kw)

        def fn(x, coeffs, sigma, pixels=None):
            return pure(x, coeffs, sigma, (images_j, log_w, mu), pixels)
        fn.pure, fn.arrays = pure, (images_j, log_w, mu)
        fn.lower = lambda x, coeffs, sigma: run.lower(
            jnp.asarray(x, jnp.float32), coeffs.a, coeffs.b2, jnp.float32(sigma), images_j,
            log_w, mu, **kw)
        info = {"engine": "soft_shiftmap" if use_kernel else "soft", "bank": False,
                "unique_fraction": 1.0}
    fn.info = info
    soft = SoftMachine(fn, sigma_list, sigma_const, k, schedule, info, boundary, wrap_patches)
    if compile_for is not None:
        soft.compile(jnp.zeros(np.shape(compile_for) if np.ndim(compile_for) == 4
                               else tuple(compile_for), jnp.float32))
    soft.build_seconds = time.perf_counter() - start
    return soft

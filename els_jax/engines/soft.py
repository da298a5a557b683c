"""The engines of the els_soft machine (docs/theory.md §7): x̂_0 from the coefficients a, b²
and the window width σ (the machine, ``els_jax.machines.soft``, turns t into a, b²).

The candidate layout is ELS's with k = k_max (``layout.layout``); the window is the
separable Gaussian g_σ(δy, δx) = g₁(δy)·g₁(δx) on the k_max × k_max support.

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

Three ways to compute it, the same values to float32 rounding:

    stream_x0      the matmul form with candidates cut from the images chunk by chunk
    soft_bank_x0   the matmul form from a bank of precomputed candidate windows
    shiftmap_x0    the shift-map kernel (CPU), derivatives from ``stream_x0``

``resolve_engine`` says which of the last and the first two runs ("auto": the kernel on a
CPU that builds it).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from els_jax.core import softmax
from els_jax.core.data import unit_images
from els_jax.engines import layout as els_layout, native, shiftmap, window as els_window

__all__ = ["gaussian_window", "axis_weights", "soft_groups", "restrict_groups",
           "computed_pixels", "pixel_units", "pair_count", "sample_pixels", "check_k_max",
           "ENGINES", "resolve_engine", "shiftmap_x0", "stream_x0", "pallas_x0", "SoftBank",
           "SoftSpec",
           "build_soft_bank", "soft_bank_x0"]

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


def check_k_max(k_max, h, w, boundary, wrap_patches):
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
    # ~1e12 logit (t near 0) above 0: capped, its tangent kept (softmax.capped_at_zero).
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    d = logits - jnp.where(jnp.isfinite(top), top, 0.0)[..., None]
    p = jnp.exp(softmax.capped_at_zero(d))
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
# "pallas": the shift-map form as the Pallas kernel (``shiftmap_pallas.py``, its banded box
# matrices weighted by the Gaussian): for GPUs and TPUs, asked for explicitly (it has run here
# only in Pallas's interpreter, which is what engine="pallas" runs on a CPU); no bank;
# derivatives from the XLA stream.
# "auto" = "shiftmap" when the kernels build and the default device is a CPU, else "xla".
# Measured on mnist5k (N = 5000, 32×32×1, k_max = 9, zeros; experiments/bench_soft.py):
# see the README's els_soft section.
ENGINES = ("auto", "shiftmap", "xla", "pallas")


def resolve_engine(engine: str) -> str:
    """"shiftmap", "xla" or "pallas" for ``engine`` (one of ``ENGINES``) on this process's
    devices."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if engine == "pallas":
        return "pallas"
    on_cpu = jax.default_backend() == "cpu"
    if engine == "shiftmap":
        if not native.available():
            raise RuntimeError("engine='shiftmap': the fused CPU kernels are not available (no "
                               "C++ compiler, or ELS_JAX_NATIVE=0); use engine='auto' or 'xla'")
        return "shiftmap"
    if engine == "auto":
        return "shiftmap" if on_cpu and native.available() else "xla"
    return "xla"


def _shift_form_x0(form, x, a, b2, sigma, images, log_w, *, k, boundary, wrap_patches,
                   pixels):
    """x̂_0 of the shift-map form (docs/theory.md §9.3, the box weighted by g₁(δy)·g₁(δx)) by
    ``form``: "kernel" (the fused CPU kernel) or "pallas" (``shiftmap_pallas``); over all
    pixels, or with ``pixels`` 0 outside ``computed_pixels`` (as the XLA form). The map sums
    squares directly: no centring on μ."""
    h, w = x.shape[1], x.shape[2]
    mode = shiftmap.resolve_kind("els", k, h, w, boundary, wrap_patches)
    weights = axis_weights(sigma, k)
    if form == "kernel":
        state = softmax.SoftmaxState(*native.shiftmap_softmax_state(
            x, a, b2, images, log_w, k, shiftmap.MODES.index(mode), weights=weights))
    else:
        state = shiftmap.shiftmap_pallas().pallas_state(x, a, b2, images, log_w, k=k,
                                                        mode=mode, weights=weights)
    x0 = softmax.finalize(state)
    if pixels is not None:
        on = np.zeros(h * w, bool)
        on[computed_pixels(k, boundary, wrap_patches, h, w, pixels)] = True
        x0 = jnp.where(jnp.asarray(on.reshape(1, h, w, 1)), x0, 0.0)
    return x0


def shiftmap_kernel_x0(x, a, b2, sigma, images, log_w, mu, *, k, boundary, wrap_patches,
                        block, pixels=None):
    """x̂_0 by the shift-map kernel over all pixels (``_shift_form_x0``)."""
    del block, mu
    return _shift_form_x0("kernel", x, a, b2, sigma, images, log_w, k=k, boundary=boundary,
                          wrap_patches=wrap_patches, pixels=pixels)


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "block",
                                             "pixels"))
def shiftmap_x0(x, a, b2, sigma, images, log_w, mu, *, k, boundary, wrap_patches, block,
                 pixels=None):
    """x̂_0 [B, H, W, C]: values from the shift-map kernel on a CPU (the XLA stream
    elsewhere), derivatives from the XLA stream (``stream_x0``; the same function)."""
    kw = dict(k=k, boundary=boundary, wrap_patches=wrap_patches, block=block, pixels=pixels)
    xla = functools.partial(stream_x0, **kw)
    kern = functools.partial(shiftmap_kernel_x0, **kw)

    fused = native.kernel_on_cpu(kern, xla)
    return native.with_reference_derivatives(fused, xla)(x, a, b2, sigma, images, log_w, mu)


def pallas_values_x0(x, a, b2, sigma, images, log_w, mu, *, k, boundary, wrap_patches,
                     block, pixels=None):
    """x̂_0 by the Pallas kernel over all pixels (``_shift_form_x0``; values only). In Pallas's
    interpreter on a CPU."""
    del block, mu
    return _shift_form_x0("pallas", x, a, b2, sigma, images, log_w, k=k, boundary=boundary,
                          wrap_patches=wrap_patches, pixels=pixels)


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "block",
                                             "pixels"))
def pallas_x0(x, a, b2, sigma, images, log_w, mu, *, k, boundary, wrap_patches, block,
              pixels=None):
    """x̂_0 [B, H, W, C]: values from the Pallas kernel, derivatives from the XLA stream
    (``stream_x0``; the same function)."""
    kw = dict(k=k, boundary=boundary, wrap_patches=wrap_patches, block=block, pixels=pixels)
    return native.with_reference_derivatives(
        functools.partial(pallas_values_x0, **kw), functools.partial(stream_x0, **kw))(
        x, a, b2, sigma, images, log_w, mu)


# ----------------------------------------------------------------------------------------
# The XLA stream: candidates straight from the images.


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "block",
                                             "pixels"))
def stream_x0(x, a, b2, sigma, images, log_w, mu, *, k, boundary, wrap_patches, block,
               pixels=None):
    """x̂_0 [B, H, W, C] with candidates streamed from the images; with ``pixels`` (a tuple of
    flat indices) only at ``computed_pixels`` (0 elsewhere). uint8 images (the shift-map
    forms' derivatives and their off-CPU values) are converted here (``unit_images``)."""
    images = unit_images(images).astype(jnp.float32)
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
    images = np.asarray(unit_images(images), np.float32)
    n, h, w, c = images.shape
    k = check_k_max(k_max, h, w, boundary, wrap_patches)
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

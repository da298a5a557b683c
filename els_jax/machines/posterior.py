"""Where each pixel of a machine's output comes from: the patch mosaic made visible.

For every output pixel i the machine's posterior over candidates (docs/theory.md §2) is

    w_{i,c} = softmax_c(ℓ_{i,c}),   ℓ_{i,c} = −‖q_i − a·c‖² / (2b²) + log(multiplicity).

This module streams the same candidates in the same chunks as the machine and keeps, per
pixel, besides the running log-sum-exp and the weighted mean (so x̂_0 equals the machine's):

  - the top-K candidates (logit and identity: training image n, window centre (u, v)), merged
    chunk by chunk with ``lax.top_k``: exact, no second pass, no N-sized array per pixel;
  - the posterior entropy H_i = −Σ_c w log w = log T − S/T, with T = Σ e^{ℓ−m} and
    S = Σ e^{ℓ−m}(ℓ − m) tracked relative to the running maximum m (so no large logit is
    ever subtracted from another: stable at small t), and N_eff = exp(H).

Supported machines: "els" (circular, with ``wrap_patches``, and zero-padded; k ≥ H with zero
padding is LS, as in the machine), "local" and "ideal". For "ideal" and "local" the candidate
of pixel i in image n is pixel i itself, so (u, v) = (i_row, i_col).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.engines import layout as els_layout
from els_jax.core import softmax
from els_jax.core import schedules as schedules_lib
from els_jax.core.validation import check_query_and_images, mask_log_weights
from els_jax.core.data import held_images, uint8_mean, unit_images

__all__ = ["Provenance", "provenance", "mosaic_image", "creativity", "nearest_training"]

_HI = jax.lax.Precision.HIGHEST


class Provenance(NamedTuple):
    """Per output pixel (all [B, H, W, ...]):

    image:   [.., K] int32  training-image index of the K heaviest candidates (best first;
                            −1 with weight 0 where a pixel has fewer than K candidates)
    row, col:[.., K] int32  centre of each candidate window in its training image
    weight:  [.., K] f32    their posterior weights
    entropy: [..]    f32    posterior entropy (nats); 0 = one candidate takes all
    n_eff:   [..]    f32    exp(entropy): the effective number of candidates
    x0:      [.., C] f32    the machine's x̂_0 (the weighted mean of the candidates' centres)
    """

    image: jax.Array
    row: jax.Array
    col: jax.Array
    weight: jax.Array
    entropy: jax.Array
    n_eff: jax.Array
    x0: jax.Array


class _State(NamedTuple):
    max: jax.Array      # [B, P]
    total: jax.Array    # [B, P]    Σ e^{ℓ−m}
    spread: jax.Array   # [B, P]    Σ e^{ℓ−m}(ℓ − m)
    acc: jax.Array      # [B, P, V] Σ e^{ℓ−m} v
    top_l: jax.Array    # [B, P, K]
    top_id: jax.Array   # [B, P, K] int32 candidate id = image·H·W + centre pixel


def _init(b, p, v, k_top):
    return _State(jnp.full((b, p), -jnp.inf), jnp.zeros((b, p)), jnp.zeros((b, p)),
                  jnp.zeros((b, p, v)), jnp.full((b, p, k_top), -jnp.inf),
                  jnp.full((b, p, k_top), -1, jnp.int32))


def _update(st: _State, logits, ids, values) -> _State:
    """Adds a chunk: logits [B, P, M] (−inf = absent), ids [M] int32, values [M, V]."""
    m_new = jnp.maximum(st.max, logits.max(-1))
    ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    seen = jnp.isfinite(st.max)
    scale = jnp.where(seen, jnp.exp(st.max - ref), 0.0)
    shift = jnp.where(seen, st.max - ref, 0.0)           # ≤ 0: old reference vs new
    u = logits - ref[..., None]
    e = jnp.exp(u)
    u = jnp.where(e > 0, u, 0.0)                          # e = 0 ⇒ no contribution (no 0·∞)
    # Σ e^{ℓ−m'}(ℓ−m') over the old candidates = scale · (spread + shift · total).
    spread = scale * (st.spread + shift * st.total) + jnp.sum(e * u, -1)
    total = scale * st.total + jnp.sum(e, -1)
    acc = scale[..., None] * st.acc + jnp.einsum("bpm,mv->bpv", e, values, precision=_HI)
    k_top = st.top_l.shape[-1]
    cat_l = jnp.concatenate([st.top_l, logits], -1)
    cat_id = jnp.concatenate([st.top_id, jnp.broadcast_to(ids, logits.shape)], -1)
    top_l, idx = jax.lax.top_k(cat_l, k_top)
    return _State(m_new, total, spread, acc, top_l, jnp.take_along_axis(cat_id, idx, -1))


def _passes(kind, k, boundary, wrap_patches, h, w):
    if kind == "ideal":
        return els_layout.ideal_layout(h, w)
    allpix = np.arange(h * w)
    if kind == "local" or (boundary == "zeros" and k >= min(h, w)):
        # LS as a zero-padded pass where every pixel is its own group: the candidate of pixel
        # i is the window at i in each image. Zero padding of both windows, shifted by the
        # same mean, contributes exactly 0, as cutting the window at the border does.
        return [els_layout.Pass(allpix, "zeros", allpix, "zeros", allpix, allpix)]
    return els_layout.layout(k, boundary, wrap_patches, h, w)


@functools.partial(jax.jit, static_argnames=("kind", "k", "boundary", "wrap_patches",
                                             "top_k", "block"))
def _provenance(x, a, b2, images, log_w, mu, *, kind, k, boundary, wrap_patches, top_k,
                block):
    bsz, h, w, c = x.shape
    n = images.shape[0]
    if mu is None:                        # float images; uint8 ones come with their mean
        mu = jnp.mean(images, axis=(0, 1, 2))
    kk = 0 if kind == "ideal" else k
    out = {f: jnp.zeros((bsz, h * w) + s, d) for f, s, d in (
        ("id", (top_k,), jnp.int32), ("weight", (top_k,), jnp.float32),
        ("entropy", (), jnp.float32), ("x0", (c,), jnp.float32))}
    for ps in _passes(kind, k, boundary, wrap_patches, h, w):
        q = els_layout.pass_queries(x, a, kk, ps, mu)
        q_group = None if ps.query_group is None else jnp.asarray(ps.query_group, jnp.int32)
        shift = els_layout.shift_vector(mu, kk, ps.cand_mode, h, w)
        pc = len(ps.cand_pixels)
        cand_pix = jnp.asarray(ps.cand_pixels, jnp.int32)
        n_img = int(min(n, max(1, block // max(1, bsz * q.shape[1] * pc))))
        starts, first_new = softmax.chunk_starts(n, n_img)
        rows = jnp.arange(n_img, dtype=jnp.int32)

        def body(st, chunk, q=q, q_group=q_group, ps=ps, shift=shift, n_img=n_img, pc=pc,
                 cand_pix=cand_pix):
            start, first = chunk
            # (uint8 pixels converted a chunk at a time: no float copy of the set)
            imgs = unit_images(jax.lax.dynamic_slice_in_dim(images, start, n_img))
            lw = jax.lax.dynamic_slice_in_dim(log_w, start, n_img)
            lw = jnp.where(rows >= first, lw, -jnp.inf)
            cand = els_layout.pass_candidates(imgs, lw, kk, ps, shift)
            qc = jnp.einsum("bpd,md->bpm", q, cand.keys, precision=_HI)
            a3, b3 = a[:, None, None], b2[:, None, None]
            logits = (a3 * qc - a3 * a3 * cand.half_sq[None, None]) / b3 + cand.log_w[None, None]
            if q_group is not None:
                logits = jnp.where(q_group[None, :, None] == cand.group[None, None, :], logits,
                                   -jnp.inf)
            img_idx = start + jnp.repeat(rows, pc)
            ids = img_idx * (h * w) + jnp.tile(cand_pix, n_img)
            return _update(st, logits, ids, cand.values), None

        v = h * w * c if ps.cand_mode == "whole" else c
        st, _ = jax.lax.scan(body, _init(bsz, q.shape[1], v, top_k), (starts, first_new))
        total = jnp.maximum(st.total, jnp.finfo(jnp.float32).tiny)
        weight = jnp.exp(st.top_l - st.max[..., None]) / total[..., None]
        entropy = jnp.maximum(jnp.log(total) - st.spread / total, 0.0)
        x0 = st.acc / total[..., None]
        if ps.query_mode == "whole":                      # ideal: one query per image
            out["id"] = jnp.broadcast_to(st.top_id, (bsz, h * w, top_k))
            out["weight"] = jnp.broadcast_to(weight, (bsz, h * w, top_k))
            out["entropy"] = jnp.broadcast_to(entropy, (bsz, h * w))
            out["x0"] = x0.reshape(bsz, h * w, c)
            break
        pix = jnp.asarray(ps.query_pixels)
        out["id"] = out["id"].at[:, pix].set(st.top_id)
        out["weight"] = out["weight"].at[:, pix].set(weight)
        out["entropy"] = out["entropy"].at[:, pix].set(entropy)
        out["x0"] = out["x0"].at[:, pix].set(x0)
    return out


def provenance(x, t, images, *, kind: str = "els", k: int | None = None,
               boundary: str = "circular", wrap_patches: bool = False,
               schedule=schedules_lib.Cosine(), mask=None, top_k: int = 4,
               block: int = 1 << 18) -> Provenance:
    """The posterior of a machine at (x, t), per output pixel: top-K sources, entropy, N_eff.

    Args:
      x: queries [B, H, W, C]; t: scalar time.
      images: training set [N, H, W, C], floats in [−1, 1] or uint8 pixels (held as uint8,
        converted a chunk at a time); mask: optional boolean [N] (class-conditional).
      kind: "els", "local" or "ideal"; k, boundary, wrap_patches: as for the machine.
      top_k: how many candidates to keep per pixel (≤ the number of candidates).
      block: logits per streamed chunk (memory knob only).
    Returns:
      a Provenance (arrays [B, H, W, ...]; see its docstring). ``x0`` equals the machine's.

        >>> p = provenance(x0_final[None], 0.02, images, k=3, boundary="zeros")
        >>> p.image[0, :, :, 0]        # which training image each pixel came from
    """
    check_query_and_images(x, images)
    if kind not in ("els", "local", "ideal"):
        raise ValueError(f"provenance supports kind 'els', 'local' or 'ideal'; got {kind!r}")
    bsz, h, w, c = x.shape
    if kind == "els":
        k = els_layout.check_k(k, h, w, boundary, wrap_patches)
    elif kind == "local":
        from els_jax.machines.local import check_local_k
        k = check_local_k(k, h, w)
    else:
        k = 0
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1; got {top_k}")
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    held = held_images(images)            # uint8 stays uint8 (4× fewer bytes), else float32
    mu = (jnp.asarray(uint8_mean(images), jnp.float32) if held.dtype == jnp.uint8 else None)
    out = _provenance(x, coeffs.a, coeffs.b2, held, mask_log_weights(mask, len(images)), mu,
                      kind=kind, k=int(k),
                      boundary=boundary, wrap_patches=bool(wrap_patches), top_k=int(top_k),
                      block=int(block))
    ids = out["id"].reshape(bsz, h, w, top_k)
    image, pix = ids // (h * w), ids % (h * w)
    row, col = pix // w, pix % w
    if kind in ("ideal", "local"):                        # the source pixel is pixel i itself
        rr, cc = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
        row = jnp.broadcast_to(rr[None, :, :, None], ids.shape)
        col = jnp.broadcast_to(cc[None, :, :, None], ids.shape)
    # Fewer than K candidates (e.g. a corner pixel of a small masked set): id −1, weight 0.
    image, row, col = (jnp.where(ids >= 0, v, -1) for v in (image, row, col))
    entropy = out["entropy"].reshape(bsz, h, w)
    return Provenance(image=image.astype(jnp.int32), row=row.astype(jnp.int32),
                      col=col.astype(jnp.int32), weight=out["weight"].reshape(bsz, h, w, top_k),
                      entropy=entropy, n_eff=jnp.exp(entropy),
                      x0=out["x0"].reshape(bsz, h, w, c))


def mosaic_image(prov: Provenance, images) -> np.ndarray:
    """The patch mosaic: each pixel = the centre pixel of its heaviest candidate, [B, H, W, C]."""
    n, r, c = (np.asarray(a)[..., 0] for a in (prov.image, prov.row, prov.col))
    return np.asarray(unit_images(np.asarray(images)[n, r, c]))     # only the pixels used


def nearest_training(samples, images, *, chunk: int = 2048):
    """The training image nearest to each sample and its RMS distance:

      i*(x) = argmin_n ‖x − x_n‖²  (the first on ties),   d = ‖x − x_{i*}‖ / sqrt(D)

    samples [B, H, W, C], images [N, H, W, C] (float in [−1, 1] or uint8 pixels, read as
    ``unit_images`` does). The images are read ``chunk`` at a time in float64, so memory is
    O(chunk·D) whatever N (a [B, N, D] difference array is 10 GB at CIFAR-10's N and B = 16).
    Returns (i* [B] int64, d [B] float64)."""
    x = np.asarray(samples, np.float64).reshape(len(samples), -1)
    images = images if isinstance(images, np.ndarray) else np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != np.shape(samples)[1:]:
        raise ValueError(f"images must be [N, H, W, C] like the samples {np.shape(samples)}; "
                         f"got {images.shape}")
    best = np.full(len(x), np.inf)
    index = np.zeros(len(x), np.int64)
    x_sq = (x ** 2).sum(1)
    for start in range(0, len(images), int(chunk)):
        tr = np.asarray(unit_images(images[start:start + int(chunk)]),
                        np.float64).reshape(-1, x.shape[1])
        d2 = x_sq[:, None] - 2.0 * x @ tr.T + (tr ** 2).sum(1)[None]
        j = d2.argmin(1)
        v = d2[np.arange(len(x)), j]
        better = v < best                     # strict: the earlier chunk wins a tie
        best, index = np.where(better, v, best), np.where(better, start + j, index)
    nearest = np.asarray(unit_images(images[index]), np.float64).reshape(len(x), -1)
    return index, np.sqrt(((x - nearest) ** 2).mean(1))


def creativity(samples, images, prov: Provenance) -> dict[str, np.ndarray]:
    """Is a sample new, and is it made of old patches? Per sample, RMS distances:

      d_train  = min_n ‖x − x_n‖ / sqrt(D)         to the nearest training image
      d_mosaic = ‖x − mosaic(x)‖ / sqrt(D)          to its own top-1 patch mosaic
      n_sources = number of distinct training images in the mosaic

    "A new image made of old patches" is d_train large and d_mosaic ≈ 0; a memorised image
    has d_train ≈ 0 (and one source).
    """
    x = np.asarray(samples, np.float64)
    flat = x.reshape(len(x), -1)
    nearest, d_train = nearest_training(samples, images)
    mos = mosaic_image(prov, images).reshape(len(x), -1)
    d_mosaic = np.sqrt(((flat - mos) ** 2).mean(1))
    n_sources = np.array([len(np.unique(np.asarray(prov.image)[b, ..., 0]))
                          for b in range(len(x))])
    return {"d_train": d_train, "d_mosaic": d_mosaic, "nearest_train": nearest,
            "n_sources": n_sources}

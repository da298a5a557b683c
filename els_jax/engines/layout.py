"""Geometry and logits shared by every ELS engine (docs/theory.md §2): which query pixels meet which
candidate windows, windows as vectors, the mean shift, and the augmented dot product whose
value is the logit.

For every output pixel i, the query q_i is the k×k window of x centred on i; candidates are
k×k windows c of training images, each with its centre pixel v_c as value:

    ℓ_{i,c} = −‖q_i − a·c‖² / (2b²) + log w_c      (+ a constant per i, dropped)
            = (a·q_i·c − a²‖c‖²/2) / b² + log w_c,
    x̂_0,i  = Σ_c softmax_c(ℓ_{i,c}) v_c.

``layout`` lists the passes: a set of query pixels, a set of candidate centres, and for the
zero-padded border a group id per query and per candidate (a pair counts only when the ids
agree). Every engine computes the main pass (every pixel, or the interior for "zeros"); the
zero-padded border (edges and corners) is ``border.py``'s.

Augmentation: the query [(a/b²)·q, −a²/b², 1] (``augment_queries``) against the key
[c, ‖c‖²/2, log w] (``augment_keys``) gives ℓ in one matmul; ``augmented_logits`` is that
matmul with a derivative that stays finite at absent candidates (log w = −inf).

Numerics: queries and candidates are shifted by the per-channel data mean μ (exact, padding
included), so float32 stays accurate at small t.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core import patches, softmax
from els_jax.core.validation import check_patch_size

_HI = jax.lax.Precision.HIGHEST


# Logits per streamed chunk (B × query pixels × candidates). 2^20 floats = 4 MiB: large enough
# to amortise the per-iteration cost of a scan step (~0.1 ms on CPU), small enough for cache.
DEFAULT_BLOCK = 1 << 20


class Pass(NamedTuple):
    """Static description of one query/candidate pairing (numpy, built outside jit).

    query_pixels: flat pixel indices (row·W + col) of the queries, [Pq].
    query_mode:   how query windows are padded ("circular" | "zeros" | "whole" = the image).
    cand_pixels:  flat pixel indices of the candidate window centres, [Pc].
    cand_mode:    how candidate windows are padded.
    query_group, cand_group: int32 group ids or None (pair counts iff ids are equal).
    """

    query_pixels: np.ndarray
    query_mode: str
    cand_pixels: np.ndarray
    cand_mode: str
    query_group: np.ndarray | None
    cand_group: np.ndarray | None


def layout(k: int, boundary: str, wrap_patches: bool, h: int, w: int) -> list[Pass]:
    """The passes that make up the ELS machine for an H×W image (docs/theory.md §2 boundaries):

    - "circular": q_i wraps around the edges; candidates are every window fully inside an
      image ((H−k+1)(W−k+1) per image), or with ``wrap_patches`` every circular window.
    - "zeros": q_i is zero-padded. Per axis, a coordinate within m = k//2 of a border must be
      matched by a candidate centred at exactly that coordinate; an interior coordinate by
      any interior centre.

    The first pass is the main one (every pixel, or the interior for "zeros")."""
    allpix = np.arange(h * w)
    rows, cols = np.divmod(allpix, w)
    m = k // 2
    inside = (rows >= m) & (rows < h - m) & (cols >= m) & (cols < w - m)
    if boundary == "circular":
        cands = allpix if wrap_patches else allpix[inside]
        return [Pass(allpix, "circular", cands, "circular", None, None)]
    if boundary != "zeros":
        raise ValueError(f"unknown boundary {boundary!r}; choose 'circular' or 'zeros'")
    passes = [Pass(allpix[inside], "zeros", allpix[inside], "zeros", None, None)]
    border = allpix[~inside]
    if border.size:
        rc, cc = patches.border_classes(h, k), patches.border_classes(w, k)
        group = (rc[rows] + 1) * (w + 1) + (cc[cols] + 1)          # unique per (row, col) class
        passes.append(Pass(border, "zeros", border, "zeros", group[border], group[border]))
    return passes


def ideal_layout(h: int, w: int) -> list[Pass]:
    """The ideal machine as one pass: a single query (the whole image) against whole images."""
    zero = np.zeros(1, np.int64)
    return [Pass(zero, "whole", zero, "whole", None, None)]


class Grouped(NamedTuple):
    """G groups of Pq queries, each group matched with its own Pc candidate centres."""

    query_pixels: np.ndarray    # [G, Pq]
    query_mode: str
    cand_pixels: np.ndarray     # [G, Pc]
    cand_mode: str


def group_pass(ps: Pass) -> list[Grouped]:
    """Splits a pass into batches of equal-sized groups (one batch if it has no groups)."""
    if ps.query_group is None:
        return [Grouped(ps.query_pixels[None], ps.query_mode, ps.cand_pixels[None],
                         ps.cand_mode)]
    by_size: dict = {}
    for g in np.unique(ps.query_group):
        qp, cp = ps.query_pixels[ps.query_group == g], ps.cand_pixels[ps.cand_group == g]
        by_size.setdefault((len(qp), len(cp)), []).append((qp, cp))
    return [Grouped(np.stack([q for q, _ in v]), ps.query_mode, np.stack([c for _, c in v]),
                     ps.cand_mode) for _, v in sorted(by_size.items())]


def gather_windows(images, k: int, mode: str, pixels: np.ndarray):
    """[B, H, W, C] → windows centred at ``pixels``: [B, P, D] (D = k²C, or H·W·C for "whole"):
    one gather from the padded images (static indices; see ``patches.extract_windows``)."""
    b, h, w = images.shape[:3]
    if mode == "whole":
        return images.reshape(b, 1, -1)
    rows, cols = np.divmod(np.asarray(pixels), w)
    d = np.arange(k)
    rr = rows[:, None, None] + d[None, :, None]                         # [P, k, 1]
    cc = cols[:, None, None] + d[None, None, :]                         # [P, 1, k]
    win = patches.pad(images, k // 2, mode)[:, rr, cc, :]               # [B, P, k, k, C]
    return win.reshape(b, len(pixels), -1)


class Chunk(NamedTuple):
    keys: jax.Array       # [M, D]  candidate windows minus the mean shift
    half_sq: jax.Array    # [M]     ‖key‖²/2
    values: jax.Array     # [M, V]  value of each candidate (centre pixel, or the whole image)
    log_w: jax.Array      # [M]     log multiplicity; −inf = absent
    group: jax.Array      # [M]     int32 group id (0 when the pass has no groups)


def pass_candidates(images, log_w, k, ps: Pass, shift):
    """All candidates of ``ps`` from a chunk of images [n, H, W, C] with log weights [n]
    (flat, with group ids; the reference layout other modules stream, e.g. posterior.py)."""
    n, h, w, c = images.shape
    keys = gather_windows(images, k, ps.cand_mode, ps.cand_pixels) - shift[None, None]   # [n, P, D]
    pc = keys.shape[1]
    if ps.cand_mode == "whole":
        values = images.reshape(n, 1, h * w * c)
    else:
        values = images.reshape(n, h * w, c)[:, ps.cand_pixels]
    keys = keys.reshape(n * pc, -1)
    group = (jnp.zeros((n * pc,), jnp.int32) if ps.cand_group is None
             else jnp.tile(jnp.asarray(ps.cand_group, jnp.int32), n))
    return Chunk(keys, 0.5 * jnp.sum(keys * keys, axis=-1), values.reshape(n * pc, -1),
                  jnp.repeat(log_w, pc), group)


def shift_vector(mu, k, mode, h, w):
    """The mean shift μ laid out like a window vector (per-channel μ tiled over k² or H·W)."""
    reps = h * w if mode == "whole" else k * k
    return jnp.tile(mu, reps)


def pass_queries(x, a, k, ps: Pass, mu):
    """Query windows of ``ps`` minus the mean shift, [B, Pq, D]."""
    h, w = x.shape[1], x.shape[2]
    shift = shift_vector(mu, k, ps.query_mode, h, w)
    q = gather_windows(x, k, ps.query_mode, ps.query_pixels)
    return q - a[:, None, None] * shift[None, None]


def augment_queries(q, a, b2):
    """q [B, ..., D] → [B, ..., D+2] = [(a/b²)·q, −a²/b², 1] (a, b² per query image, [B]):
    its dot product with an augmented key [c, ‖c‖²/2, log w] is the logit."""
    lead = q.shape[:-1]
    per_b = (-1,) + (1,) * (q.ndim - 1)
    return jnp.concatenate([q * (a / b2).reshape(per_b),
                            jnp.broadcast_to((-(a * a) / b2).reshape(per_b), lead + (1,)),
                            jnp.ones(lead + (1,), q.dtype)], axis=-1)


def augment_keys(keys, log_w):
    """keys [..., D] (mean-shifted), log_w [...] → [..., D+2] = [c, ‖c‖²/2, log w]."""
    return jnp.concatenate([keys, 0.5 * jnp.sum(keys * keys, axis=-1, keepdims=True),
                            log_w[..., None]], axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def augmented_logits(dot, q, keys):
    """dot(q, keys): the logits of augmented queries and keys (``augment_queries``,
    ``augment_keys``, ``row_lib.row_candidates``), ``dot`` a static contraction over q's last axis.

    The derivative is the plain one except at absent candidates: their key holds log w = −inf
    against the query's constant 1, whose tangent is 0, and the plain rule's 0·(−inf) = NaN
    would reach every output through the matmul (forward mode; reverse mode drops it with the
    constant's cotangent). An absent candidate's logit is −inf whatever x is and its weight
    exactly 0, so its tangent does not matter: the tangent uses the keys with non-finite
    entries zeroed (elsewhere the plain tangent). Linear in the tangents, so reverse mode
    transposes it. Limit: first order. The engines call this inside ``lax.scan``, whose
    partial evaluation inlines the primal matmul, so a second derivative through it (e.g. a
    Hessian-vector product) meets the plain rule again: NaN with absent candidates."""
    return dot(q, keys)


def _augmented_logits_jvp(dot, primals, tangents):
    from jax.custom_derivatives import SymbolicZero

    q, keys = primals
    dq, dkeys = tangents
    logits = augmented_logits(dot, q, keys)
    finite = jnp.isfinite(keys)
    tangent = jnp.zeros_like(logits)
    if not isinstance(dq, SymbolicZero):
        tangent = dot(dq, jnp.where(finite, keys, 0.0))
    if not isinstance(dkeys, SymbolicZero):           # (differentiating w.r.t. the images)
        tangent = tangent + dot(q, jnp.where(finite, dkeys, 0.0))
    return logits, tangent


augmented_logits.defjvp(_augmented_logits_jvp, symbolic_zeros=True)


def matmul_keys(q, keys):              # [Q, D'] · [M, D'] → [Q, M]
    return jnp.matmul(q, keys.T, precision=_HI)


def grouped_matmul_keys(q, keys):      # [G, Q, D'] · [G, M, D'] → [G, Q, M]
    return jnp.einsum("gqd,gmd->gqm", q, keys, precision=_HI)


def row_matmul_keys(xs, keys):         # [H, Q, D'] · [H, D', M] → [H, Q, M]
    return jnp.einsum("rqd,rdm->rqm", xs, keys, precision=_HI)


def scatter(x_shape, results):
    """Puts each pass's x̂_0 [B, P, V] back at its pixels [P]; returns [B, H, W, C]."""
    b, h, w, c = x_shape
    out = jnp.zeros((b, h * w, c), jnp.float32)
    for pixels, r in results:
        if pixels is None:                                           # the ideal machine
            return r.reshape(x_shape)
        out = out.at[:, pixels].set(r.reshape(b, -1, c))
    return out.reshape(x_shape)


def check_k(k, h, w, boundary, wrap_patches):
    """The patch size k, checked against the image and the boundary (clear errors)."""
    k = check_patch_size(k, h, w)
    if boundary == "circular" and not wrap_patches and k > min(h, w):
        raise ValueError(f"patch size k={k} is larger than the {h}×{w} image: there is no "
                         "window fully inside it (use wrap_patches=True or a smaller k)")
    if boundary == "circular" and wrap_patches and k > min(h, w):
        raise ValueError(f"patch size k={k} exceeds the {h}×{w} image; a circular window "
                         "would cover pixels twice")
    if boundary == "zeros" and k > 2 * max(h, w) - 1:
        raise ValueError(f"patch size k={k} exceeds 2·max(H, W) − 1 = {2 * max(h, w) - 1}; "
                         "larger windows add nothing")
    return k


def pow2_floor(v: int) -> int:
    """The largest power of two ≤ v (1 for v ≤ 1)."""
    return 1 << max(0, int(v).bit_length() - 1)


def grouped_passes(k, boundary, wrap_patches, h, w, ideal, method):
    """The window-engine passes of a machine, split into batches of equal groups: the main
    pass unless the row engine computes it; never the zero-padded border (``border.py``)."""
    passes = ideal_layout(h, w) if ideal else layout(k, boundary, wrap_patches, h, w)[:1]
    if method in ("row", "native"):
        passes = passes[1:]
    return [gp for ps in passes for gp in group_pass(ps)]


def call_chunk(chunk: int, rows_per_candidate: int, block: int) -> int:
    """Halves a bank's power-of-two chunk until chunk × rows_per_candidate ≤ block."""
    while chunk > 1 and chunk * rows_per_candidate > block:
        chunk //= 2
    return chunk


def sharded_bank_call(fn, mesh, bank_specs):
    """fn(replicated args..., bank) run on each device with its share of the bank's candidate
    axis, the partial softmax states merged exactly (``softmax.sharded``)."""
    from jax.sharding import PartitionSpec as P

    def call(*args):
        return softmax.sharded(fn, mesh, tuple(P() for _ in args[:-1]) + (bank_specs,))(*args)
    return call

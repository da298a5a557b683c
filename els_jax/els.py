"""The equivariant local score machine (ELS, SPEC §2), and the candidate-bank engine it shares
with the ideal machine.

For every output pixel i, the query q_i is the k×k window of x centred on i; candidates are
k×k windows c of training images, each with its centre pixel v_c as value:

    w_{i,c} = softmax_c(−‖q_i − a·c‖² / (2b²)),     x̂_0,i = Σ_c w_{i,c} v_c,
    s_i     = −(x_i − a·x̂_0,i) / b².

Boundaries:
  - "circular": q_i wraps around the edges; candidates are every window of every training
    image fully inside it ((H−k+1)(W−k+1) per image), or with ``wrap_patches=True`` every
    circular window (H·W per image).
  - "zeros" (boundary-broken): q_i is zero-padded. Per axis, a coordinate within m = k//2 of a
    border must be matched by a candidate centred at exactly that coordinate; an interior
    coordinate by any interior centre. Interior pixels thus use all interior windows, edge
    pixels the windows at the same distance from their edge, corners only their own location.
    k ≥ min(H, W) falls back to the local score machine (as the authors' code does).

Engine. A "pass" pairs a set of query pixels with a set of candidate centres (and, for the
zero-padded border, a group id per query and per candidate: a pair counts only when the ids
agree). Candidates come either straight from the images, a chunk of images at a time (memory
independent of N, the pure functional API), or from a precomputed ``CandidateBank`` (built
once per data set, k, boundary and mask, with identical windows merged into one candidate
whose log-multiplicity is added to its logit: exact, and large savings on data with blank
background), optionally sharded over devices. Every chunk goes through ``softmax.update``.

Numerics: logits are (a·q·c − a²‖c‖²/2)/b² (‖q‖² is the same for every candidate), with query
and candidates shifted by the per-channel data mean μ (an exact shift, padding included), so
float32 stays accurate at small t.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from els_jax import conversions, patches, softmax
from els_jax import schedules as schedules_lib
from els_jax.validation import check_patch_size, check_query_and_images, mask_log_weights

__all__ = ["els_score", "els_x0", "CandidateBank", "build_bank", "bank_x0", "layout",
           "Pass", "DEFAULT_BLOCK"]

# Logits per streamed chunk (B × query pixels × candidates). 2^20 floats = 4 MiB: large enough
# to amortise the scan step, small enough to stay in cache.
DEFAULT_BLOCK = 1 << 20
_HI = jax.lax.Precision.HIGHEST


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
    """The passes that make up the ELS machine for an H×W image (see module docstring)."""
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


def _ideal_layout(h: int, w: int) -> list[Pass]:
    """The ideal machine as one pass: a single query (the whole image) against whole images."""
    zero = np.zeros(1, np.int64)
    return [Pass(zero, "whole", zero, "whole", None, None)]


def _windows(images, k: int, mode: str, pixels: np.ndarray):
    """[B, H, W, C] → windows centred at ``pixels``: [B, P, D] (D = k²C, or H·W·C for "whole")."""
    b = images.shape[0]
    if mode == "whole":
        return images.reshape(b, 1, -1)
    win = patches.extract_windows(images, k, mode)
    return win.reshape(b, -1, win.shape[-1])[:, pixels]


class _Chunk(NamedTuple):
    keys: jax.Array       # [M, D]  candidate windows minus the mean shift
    half_sq: jax.Array    # [M]     ‖key‖²/2
    values: jax.Array     # [M, V]  value of each candidate (centre pixel, or the whole image)
    log_w: jax.Array      # [M]     log multiplicity; −inf = absent
    group: jax.Array      # [M]     int32 group id (0 when the pass has no groups)


def _candidates(images, log_w, k, ps: Pass, shift):
    """All candidates of ``ps`` from a chunk of images [n, H, W, C] with log weights [n]."""
    n, h, w, c = images.shape
    keys = _windows(images, k, ps.cand_mode, ps.cand_pixels) - shift[None, None]   # [n, P, D]
    pc = keys.shape[1]
    if ps.cand_mode == "whole":
        values = images.reshape(n, 1, h * w * c)
    else:
        values = images.reshape(n, h * w, c)[:, ps.cand_pixels]
    keys = keys.reshape(n * pc, -1)
    group = (jnp.zeros((n * pc,), jnp.int32) if ps.cand_group is None
             else jnp.tile(jnp.asarray(ps.cand_group, jnp.int32), n))
    return _Chunk(keys, 0.5 * jnp.sum(keys * keys, axis=-1), values.reshape(n * pc, -1),
                  jnp.repeat(log_w, pc), group)


def _accumulate(state, q, q_group, a, b2, cand: _Chunk):
    """One chunk into the running softmax. q [B, Pq, D]; a, b2 [B]."""
    qc = jnp.einsum("bpd,md->bpm", q, cand.keys, precision=_HI)
    a3, b3 = a[:, None, None], b2[:, None, None]
    logits = (a3 * qc - (a3 * a3) * cand.half_sq[None, None]) / b3 + cand.log_w[None, None]
    if q_group is not None:
        same = q_group[None, :, None] == cand.group[None, None, :]
        logits = jnp.where(same, logits, -jnp.inf)
    return softmax.update(state, logits, cand.values)


def _shift_vector(mu, k, mode, h, w):
    """The mean shift μ laid out like a window vector (per-channel μ tiled over k² or H·W)."""
    reps = h * w if mode == "whole" else k * k
    return jnp.tile(mu, reps)


def _coeffs(t, bsz, schedule):
    a, b2, _ = schedules_lib.coefficients(t, schedule)
    return (jnp.broadcast_to(a, (bsz,)),
            jnp.maximum(jnp.broadcast_to(b2, (bsz,)), conversions.B2_FLOOR))


def _queries(x, a, k, ps: Pass, mu):
    h, w = x.shape[1], x.shape[2]
    shift = _shift_vector(mu, k, ps.query_mode, h, w)
    q = _windows(x, k, ps.query_mode, ps.query_pixels)
    return q - a[:, None, None] * shift[None, None]


def _scatter(x_shape, results):
    """Puts each pass's x̂_0 [B, Pq, C] back at its pixels; returns [B, H, W, C]."""
    b, h, w, c = x_shape
    out = jnp.zeros((b, h * w, c), jnp.float32)
    for ps, r in results:
        if ps.query_mode == "whole":
            return r.reshape(x_shape)
        out = out.at[:, ps.query_pixels].set(r)
    return out.reshape(x_shape)


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "schedule",
                                             "block", "ideal"))
def _stream_images_x0(x, t, images, log_w, *, k, boundary, wrap_patches, schedule, block,
                      ideal=False):
    """x̂_0 with candidates extracted from the images chunk by chunk (no bank)."""
    bsz, h, w, c = x.shape
    n = images.shape[0]
    a, b2 = _coeffs(t, bsz, schedule)
    mu = jnp.mean(images, axis=(0, 1, 2))
    passes = _ideal_layout(h, w) if ideal else layout(k, boundary, wrap_patches, h, w)
    results = []
    for ps in passes:
        q = _queries(x, a, k, ps, mu)
        q_group = None if ps.query_group is None else jnp.asarray(ps.query_group, jnp.int32)
        shift = _shift_vector(mu, k, ps.cand_mode, h, w)
        pc = len(ps.cand_pixels)
        n_img = int(min(n, max(1, block // max(1, bsz * q.shape[1] * pc))))
        starts, first_new = softmax.chunk_starts(n, n_img)
        rows = jnp.arange(n_img, dtype=jnp.int32)

        def body(state, chunk, q=q, q_group=q_group, ps=ps, shift=shift, n_img=n_img):
            start, first = chunk
            imgs = jax.lax.dynamic_slice_in_dim(images, start, n_img)
            lw = jax.lax.dynamic_slice_in_dim(log_w, start, n_img)
            lw = jnp.where(rows >= first, lw, -jnp.inf)
            cand = _candidates(imgs, lw, k, ps, shift)
            return _accumulate(state, q, q_group, a, b2, cand), None

        v = h * w * c if ps.cand_mode == "whole" else c
        state, _ = jax.lax.scan(body, softmax.init(q.shape[:2], v), (starts, first_new))
        results.append((ps, softmax.finalize(state)))
    return _scatter(x.shape, results)


def _check_els_k(k, h, w, boundary, wrap_patches):
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


def els_x0(x, t, images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
           schedule=schedules_lib.Cosine(), mask=None, block: int = DEFAULT_BLOCK):
    """Denoised mean x̂_0 of the ELS machine, [B, H, W, C]. See ``els_score``."""
    check_query_and_images(x, images)
    h, w = x.shape[1], x.shape[2]
    k = _check_els_k(k, h, w, boundary, wrap_patches)
    if boundary not in patches.BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; choose one of {patches.BOUNDARIES}")
    if boundary == "zeros" and k >= min(h, w):
        from els_jax.local import local_x0         # SPEC: zero-padded ELS with k ≥ H is LS
        return local_x0(x, t, images, k=k, schedule=schedule, mask=mask)
    log_w = mask_log_weights(mask, images.shape[0])
    return _stream_images_x0(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32),
                             jnp.asarray(images, jnp.float32), log_w, k=k, boundary=boundary,
                             wrap_patches=bool(wrap_patches),
                             schedule=schedules_lib.get(schedule), block=int(block))


def els_score(x, t, images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
              schedule=schedules_lib.Cosine(), mask=None, block: int = DEFAULT_BLOCK):
    """Score of the equivariant local score machine.

    Args:
      x: noisy queries [B, H, W, C].
      t: scalar time or one per query [B].
      images: training set [N, H, W, C].
      k: odd patch size.
      boundary: "circular" or "zeros" (the boundary-broken machine; see module docstring).
      wrap_patches: circular boundary only: also use candidate windows that wrap around.
      schedule: a Schedule or its name.
      mask: optional boolean [N] selecting the candidate images (class-conditional).
      block: logits per streamed chunk (memory knob only).
    Returns:
      score [B, H, W, C].

        >>> s = els_score(x, 0.3, images, k=5, boundary="zeros")
    """
    x0 = els_x0(x, t, images, k=k, boundary=boundary, wrap_patches=wrap_patches,
                schedule=schedule, mask=mask, block=block)
    return conversions.x0_to_score(x0, x, t, schedule=schedule)


# ----------------------------------------------------------------------------------------
# Candidate banks: built once per (data set, k, boundary, mask), reused at every step.


class CandidateBank(NamedTuple):
    """The candidates of one pass, deduplicated and padded to whole chunks (arrays only).

    keys [M, D] (windows minus the mean shift), half_sq [M], values [M, V],
    log_w [M] (log multiplicity; −inf = padding), group [M] int32.
    """

    keys: jax.Array
    half_sq: jax.Array
    values: jax.Array
    log_w: jax.Array
    group: jax.Array


_HASH_MULT = np.random.default_rng(0x5EED).integers(1, 2**63, size=1 << 16, dtype=np.uint64) | 1


def _dedup(rows: np.ndarray, counts: np.ndarray):
    """Merges identical rows, adding their counts. rows [M, F] float32, counts [M].

    Rows are grouped by a 64-bit hash of their bits (one 1-D sort instead of the much slower
    row-wise ``np.unique(axis=0)``); the grouping is then verified row by row, and on the
    (never yet seen) hash collision the exact row-wise unique is used instead. Exact either way.
    """
    rows = np.ascontiguousarray(rows + np.float32(0.0))   # −0.0 → +0.0: equal values, equal bits
    f = rows.shape[1]
    mult = (_HASH_MULT[:f] if f <= _HASH_MULT.size else
            np.random.default_rng(f).integers(1, 2**63, size=f, dtype=np.uint64) | 1)
    with np.errstate(over="ignore"):
        hashes = (rows.view(np.uint32).astype(np.uint64) * mult).sum(axis=1)   # mod 2^64
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not np.array_equal(rows, rows[first][inverse]):
        uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        return uniq, np.bincount(inverse.reshape(-1), weights=counts, minlength=len(uniq))
    return rows[first], np.bincount(inverse, weights=counts, minlength=len(first))


def build_bank(images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
               dedup: bool = True, chunk: int = 4096, n_shards: int = 1, ideal: bool = False,
               images_per_step: int | None = None):
    """Precomputes the candidates of every pass of the ELS machine (or of the ideal machine).

    Built on the host, ``images_per_step`` images at a time (default: about 2^18 windows per
    step, so that re-merging the running set stays cheap); with ``dedup`` identical windows
    (same pixels, same value, same group) are merged as they arrive, so memory holds the
    unique candidates plus one step. The mask (class-conditional) is applied by passing only
    the selected images.

    Returns (mu [C], list of CandidateBank, each padded to a multiple of chunk·n_shards).
    """
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    mu = images.mean(axis=(0, 1, 2))
    passes = _ideal_layout(h, w) if ideal else layout(k, boundary, wrap_patches, h, w)
    banks = []
    for ps in passes:
        shift = np.asarray(_shift_vector(jnp.asarray(mu), k, ps.cand_mode, h, w))
        rows, counts = None, None
        make = jax.jit(lambda im, ps=ps, shift=shift: _candidates(
            im, jnp.zeros(im.shape[0]), k, ps, jnp.asarray(shift)))
        step = images_per_step or max(1, (1 << 18) // max(1, len(ps.cand_pixels)))
        for start in range(0, n, step):
            cand = make(jnp.asarray(images[start:start + step]))
            new = np.concatenate([np.asarray(cand.keys), np.asarray(cand.values),
                                  np.asarray(cand.group, np.float32)[:, None]], axis=1)
            new_counts = np.ones(len(new))
            if rows is not None:
                new, new_counts = np.concatenate([rows, new]), np.concatenate([counts, new_counts])
            rows, counts = _dedup(new, new_counts) if dedup else (new, new_counts)
        d = np.asarray(cand.keys).shape[1]
        v = np.asarray(cand.values).shape[1]
        m = len(rows)
        per = chunk * n_shards
        total = -(-m // per) * per
        pad = total - m
        keys = np.pad(rows[:, :d], ((0, pad), (0, 0)))
        values = np.pad(rows[:, d:d + v], ((0, pad), (0, 0)))
        group = np.pad(rows[:, d + v].astype(np.int32), (0, pad))
        log_w = np.concatenate([np.log(counts), np.full(pad, -np.inf)]).astype(np.float32)
        banks.append(CandidateBank(jnp.asarray(keys), jnp.asarray(0.5 * np.sum(keys * keys, 1)),
                                   jnp.asarray(values), jnp.asarray(log_w), jnp.asarray(group)))
    return jnp.asarray(mu), banks


def _stream_bank(state, q, q_group, a, b2, bank: CandidateBank, chunk: int):
    n_chunks = bank.keys.shape[0] // chunk

    def body(state, j):
        sl = lambda arr: jax.lax.dynamic_slice_in_dim(arr, j * chunk, chunk)
        return _accumulate(state, q, q_group, a, b2, _Chunk(*map(sl, bank))), None

    state, _ = jax.lax.scan(body, state, jnp.arange(n_chunks))
    return state


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "schedule",
                                             "chunk", "mesh", "ideal"))
def bank_x0(x, t, mu, banks, *, k, boundary, wrap_patches, schedule, chunk, mesh=None,
            ideal=False):
    """x̂_0 [B, H, W, C] from precomputed banks (``build_bank``), optionally sharded.

    With a ``mesh`` (one axis, "cands"), each bank's candidates are split over the devices;
    each device streams its own part and the partial softmax states are merged exactly
    (softmax.merge_across), so the result equals the single-device one.
    """
    bsz, h, w, c = x.shape
    a, b2 = _coeffs(t, bsz, schedule)
    passes = _ideal_layout(h, w) if ideal else layout(k, boundary, wrap_patches, h, w)
    results = []
    for ps, bank in zip(passes, banks):
        q = _queries(x, a, k, ps, mu)
        q_group = None if ps.query_group is None else jnp.asarray(ps.query_group, jnp.int32)
        init = softmax.init(q.shape[:2], bank.values.shape[1])
        if mesh is None:
            state = _stream_bank(init, q, q_group, a, b2, bank, chunk)
        else:
            from jax.sharding import PartitionSpec as P

            def local(q, a, b2, bank, q_group=q_group, init=init):
                st = _stream_bank(init, q, q_group, a, b2, bank, chunk)
                return softmax.merge_across(st, "cands")

            spec = CandidateBank(*([P("cands")] * 5))
            state = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), spec),
                                  out_specs=P(), check_vma=False)(q, a, b2, bank)
        results.append((ps, softmax.finalize(state)))
    return _scatter(x.shape, results)

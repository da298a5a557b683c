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

Layout. ``layout`` lists the passes: a set of query pixels, a set of candidate centres, and
for the zero-padded border a group id per query and per candidate (a pair counts only when
the ids agree). The engines here compute the main pass (every pixel, or the interior for
"zeros"); the zero-padded border pass (edges and corners) is computed by ``border.py`` from
row dot products and corner crops, without k×k candidate windows.

Two exact engines compute the logits ℓ = (a·q·c − a²‖c‖²/2)/b² + log w (‖q‖² is the same for
every candidate), and both feed every chunk through ``softmax.update_with``:

  - "window": one dot product per (query pixel, candidate window) of length D = k²C + 2: the
    query is augmented to [(a/b²)·q, −a²/b², 1] and the candidate to [c, ‖c‖²/2, log w], so the
    matmul yields the logits directly. Candidates come either straight from the images, a
    chunk of images at a time (memory independent of N), or from a precomputed
    ``WindowBank`` (identical windows merged into one candidate whose log-multiplicity is its
    log w: exact, and large savings on data with blank background), optionally sharded.
    Cost per pair ∝ k²C.
  - "row": the k×k window dot product split into k row dot products (length kC) summed over
    the window's rows. For a vertical offset s between query and candidate, the row products
    of every query row with the candidate row s below form one batched matmul, and a k-row
    box sum (``lax.reduce_window``) over them gives every window dot product at that offset;
    the row norms and log w/k ride along in the same matmul. Cost per pair ∝ kC + k instead of
    k²C, without dedup (it works on whole images).

  - "native" (zero padding, banked machines on a CPU): the fused kernel of ``native.py``
    (an XLA FFI custom call) computes the interior pass as the LS computation of every offset
    between query and candidate, carrying blocks of 32 images through the product image, its
    box sums, the logits and the online softmax in cache (XLA:CPU runs each of these as a
    separate pass). Cost per pair ∝ C + 2k, without dedup.

``choose_method`` picks the cheaper XLA engine per k from a cost model measured on CPU
(experiments/bench_machines.py); "auto" on a banked zero-padded machine without merged
windows prefers the kernel (``_resolve_method``); ``method="window" | "row" | "native"``
forces one.

Numerics: query and candidates are shifted by the per-channel data mean μ (an exact shift,
padding included), so float32 stays accurate at small t.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from els_jax import border as border_lib
from els_jax import conversions, native, patches, softmax
from els_jax import engines as engines_lib
from els_jax import local as local_lib
from els_jax import schedules as schedules_lib
from els_jax.validation import check_patch_size, check_query_and_images, mask_log_weights

__all__ = ["els_score", "els_x0", "MachineBank", "WindowBank", "RowBank", "BankSpec",
           "build_bank", "bank_x0", "bank_partition_specs", "estimate_unique_fraction",
           "layout", "Pass", "choose_method", "METHODS", "DEFAULT_BLOCK"]

# Logits per streamed chunk (B × query pixels × candidates). 2^20 floats = 4 MiB: large enough
# to amortise the per-iteration cost of a scan step (~0.1 ms on CPU), small enough for cache.
DEFAULT_BLOCK = 1 << 20
METHODS = ("auto", "window", "row", "native")
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
    """The passes that make up the ELS machine for an H×W image (see module docstring).
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


def _ideal_layout(h: int, w: int) -> list[Pass]:
    """The ideal machine as one pass: a single query (the whole image) against whole images."""
    zero = np.zeros(1, np.int64)
    return [Pass(zero, "whole", zero, "whole", None, None)]


class _Grouped(NamedTuple):
    """G groups of Pq queries, each group matched with its own Pc candidate centres."""

    query_pixels: np.ndarray    # [G, Pq]
    query_mode: str
    cand_pixels: np.ndarray     # [G, Pc]
    cand_mode: str


def _grouped(ps: Pass) -> list[_Grouped]:
    """Splits a pass into batches of equal-sized groups (one batch if it has no groups)."""
    if ps.query_group is None:
        return [_Grouped(ps.query_pixels[None], ps.query_mode, ps.cand_pixels[None],
                         ps.cand_mode)]
    by_size: dict = {}
    for g in np.unique(ps.query_group):
        qp, cp = ps.query_pixels[ps.query_group == g], ps.cand_pixels[ps.cand_group == g]
        by_size.setdefault((len(qp), len(cp)), []).append((qp, cp))
    return [_Grouped(np.stack([q for q, _ in v]), ps.query_mode, np.stack([c for _, c in v]),
                     ps.cand_mode) for _, v in sorted(by_size.items())]


def _windows(images, k: int, mode: str, pixels: np.ndarray):
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


class _Chunk(NamedTuple):
    keys: jax.Array       # [M, D]  candidate windows minus the mean shift
    half_sq: jax.Array    # [M]     ‖key‖²/2
    values: jax.Array     # [M, V]  value of each candidate (centre pixel, or the whole image)
    log_w: jax.Array      # [M]     log multiplicity; −inf = absent
    group: jax.Array      # [M]     int32 group id (0 when the pass has no groups)


def _candidates(images, log_w, k, ps: Pass, shift):
    """All candidates of ``ps`` from a chunk of images [n, H, W, C] with log weights [n]
    (flat, with group ids; the reference layout other modules stream, e.g. posterior.py)."""
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


def _shift_vector(mu, k, mode, h, w):
    """The mean shift μ laid out like a window vector (per-channel μ tiled over k² or H·W)."""
    reps = h * w if mode == "whole" else k * k
    return jnp.tile(mu, reps)


def _coeffs(t, bsz, schedule):
    a, b2, _ = schedules_lib.coefficients(t, schedule)
    return (jnp.broadcast_to(a, (bsz,)),
            jnp.maximum(jnp.broadcast_to(b2, (bsz,)), conversions.B2_FLOOR))


def _queries(x, a, k, ps: Pass, mu):
    """Query windows of ``ps`` minus the mean shift, [B, Pq, D]."""
    h, w = x.shape[1], x.shape[2]
    shift = _shift_vector(mu, k, ps.query_mode, h, w)
    q = _windows(x, k, ps.query_mode, ps.query_pixels)
    return q - a[:, None, None] * shift[None, None]


def _augment_queries(q, a, b2):
    """q [B, ..., D] → [B, ..., D+2] = [(a/b²)·q, −a²/b², 1] (a, b² per query image, [B]):
    its dot product with an augmented key [c, ‖c‖²/2, log w] is the logit."""
    lead = q.shape[:-1]
    per_b = (-1,) + (1,) * (q.ndim - 1)
    return jnp.concatenate([q * (a / b2).reshape(per_b),
                            jnp.broadcast_to((-(a * a) / b2).reshape(per_b), lead + (1,)),
                            jnp.ones(lead + (1,), q.dtype)], axis=-1)


def _augment_keys(keys, log_w):
    """keys [..., D] (mean-shifted), log_w [...] → [..., D+2] = [c, ‖c‖²/2, log w]."""
    return jnp.concatenate([keys, 0.5 * jnp.sum(keys * keys, axis=-1, keepdims=True),
                            log_w[..., None]], axis=-1)


# ----------------------------------------------------------------------------------------
# The window engine: one augmented dot product per (query, candidate window).


def _window_queries(x, a, b2, k, gp: _Grouped, mu):
    """Augmented query windows [G, B·Pq, D+2] (group first: the batch axis of the matmuls)."""
    b, h, w, _ = x.shape
    g, pq = gp.query_pixels.shape
    shift = _shift_vector(mu, k, gp.query_mode, h, w)
    q = _windows(x, k, gp.query_mode, gp.query_pixels.reshape(-1))
    q = _augment_queries(q - a[:, None, None] * shift[None, None], a, b2)   # [B, G·Pq, D']
    return jnp.swapaxes(q.reshape(b, g, pq, -1), 0, 1).reshape(g, b * pq, -1)


def _window_candidates(images, log_w, k, gp: _Grouped, shift):
    """Candidates of ``gp`` from images [n, H, W, C] with log weights [n]:
    augmented keys [G, n·Pc, D+2] and values [G, n·Pc, V]."""
    n, h, w, c = images.shape
    g, pc = gp.cand_pixels.shape
    keys = _windows(images, k, gp.cand_mode, gp.cand_pixels.reshape(-1)) - shift[None, None]
    keys = _augment_keys(keys.reshape(n, g, pc, -1),
                         jnp.broadcast_to(log_w[:, None, None], (n, g, pc)))
    if gp.cand_mode == "whole":
        values = images.reshape(n, 1, 1, h * w * c)
    else:
        values = images.reshape(n, h * w, c)[:, gp.cand_pixels.reshape(-1)].reshape(n, g, pc, c)

    def by_group(arr):
        return jnp.swapaxes(arr, 0, 1).reshape(g, n * pc, arr.shape[-1])
    return by_group(keys), by_group(values)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _augmented_logits(dot, q, keys):
    """dot(q, keys): the logits of augmented queries and keys (``_augment_queries``,
    ``_augment_keys``, ``_row_candidates``), ``dot`` a static contraction over q's last axis.

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
    logits = _augmented_logits(dot, q, keys)
    finite = jnp.isfinite(keys)
    tangent = jnp.zeros_like(logits)
    if not isinstance(dq, SymbolicZero):
        tangent = dot(dq, jnp.where(finite, keys, 0.0))
    if not isinstance(dkeys, SymbolicZero):           # (differentiating w.r.t. the images)
        tangent = tangent + dot(q, jnp.where(finite, dkeys, 0.0))
    return logits, tangent


_augmented_logits.defjvp(_augmented_logits_jvp, symbolic_zeros=True)


def _matmul_keys(q, keys):              # [Q, D'] · [M, D'] → [Q, M]
    return jnp.matmul(q, keys.T, precision=_HI)


def _grouped_matmul_keys(q, keys):      # [G, Q, D'] · [G, M, D'] → [G, Q, M]
    return jnp.einsum("gqd,gmd->gqm", q, keys, precision=_HI)


def _row_matmul_keys(xs, keys):         # [H, Q, D'] · [H, D', M] → [H, Q, M]
    return jnp.einsum("rqd,rdm->rqm", xs, keys, precision=_HI)


def _window_update(state, q, keys, values):
    """One chunk into the running softmax. q [G, Q, D'], keys [G, M, D'], values [G, M, V]."""
    if q.shape[0] == 1:         # plain 2-D matmuls: XLA lays them out without transposes
        logits = _augmented_logits(_matmul_keys, q[0], keys[0])[None]
        return softmax.update_with(
            state, logits, lambda p: jnp.matmul(p[0], values[0], precision=_HI)[None])
    logits = _augmented_logits(_grouped_matmul_keys, q, keys)
    return softmax.update_with(
        state, logits, lambda p: jnp.einsum("gqm,gmv->gqv", p, values, precision=_HI))


def _window_result(gp: _Grouped, state, bsz):
    """(pixels [G·Pq] or None for the ideal machine, x̂_0 [B, G·Pq, V])."""
    g, pq = gp.query_pixels.shape
    x0 = softmax.finalize(state).reshape(g, bsz, pq, -1)
    x0 = jnp.swapaxes(x0, 0, 1).reshape(bsz, g * pq, -1)
    return (None if gp.query_mode == "whole" else gp.query_pixels.reshape(-1)), x0


# ----------------------------------------------------------------------------------------
# The row engine: window dot products as k-row box sums of row dot products.


class _RowLayout(NamedTuple):
    """Static description of the main pass for the row engine (centre coordinates)."""

    q_cols: np.ndarray      # query centre columns
    q_col_mode: str         # padding of query rows ("circular" | "zeros")
    q_rows: np.ndarray      # query centre rows kept in the output
    c_cols: np.ndarray      # candidate centre columns
    c_col_mode: str
    c_rows: np.ndarray      # candidate centre rows (contiguous)
    wrap_rows: bool         # candidate windows wrap vertically


def _row_layout(k: int, boundary: str, wrap_patches: bool, h: int, w: int) -> _RowLayout:
    m = k // 2
    inner_r, inner_c = np.arange(m, h - m), np.arange(m, w - m)
    if boundary == "circular" and wrap_patches:
        return _RowLayout(np.arange(w), "circular", np.arange(h), np.arange(w), "circular",
                          np.arange(h), True)
    if boundary == "circular":
        return _RowLayout(np.arange(w), "circular", np.arange(h), inner_c, "zeros", inner_r,
                          False)
    # Zero padding: interior queries only (their windows never touch the padding).
    return _RowLayout(inner_c, "zeros", inner_r, inner_c, "zeros", inner_r, False)


def _row_queries(x, a, b2, k, lay: _RowLayout, mu):
    """Augmented query rows [H, B·Wq, kC+2] (rows first, for the batched row matmul)."""
    b, h = x.shape[0], x.shape[1]
    q = patches.row_windows(x, k, lay.q_col_mode, lay.q_cols)
    q = q - a[:, None, None, None] * jnp.tile(mu, k)[None, None, None]
    q = _augment_queries(q, a, b2)                                       # [B, H, Wq, D']
    return jnp.transpose(q, (1, 0, 2, 3)).reshape(h, b * len(lay.q_cols), q.shape[-1])


def _row_candidates(images, log_w, k, lay: _RowLayout, mu):
    """Candidates from images [n, H, W, C], log weights [n]: keys [H, kC+2, n·Wc] = each row
    window, its half squared norm and log w / k (a window's sum over its k rows gives
    ‖c‖²/2 and log w); values [Hc, n·Wc, C], the centre pixels."""
    n, h, _, c = images.shape
    wc = len(lay.c_cols)
    rows = patches.row_windows(images, k, lay.c_col_mode, lay.c_cols) - jnp.tile(mu, k)[None, None, None]
    lw = jnp.broadcast_to((log_w / k)[:, None, None, None], (n, h, wc, 1))
    keys = jnp.concatenate([rows, 0.5 * jnp.sum(rows * rows, -1, keepdims=True), lw], -1)
    keys = jnp.transpose(keys, (1, 3, 0, 2)).reshape(h, keys.shape[-1], n * wc)
    values = images[:, lay.c_rows][:, :, lay.c_cols]                     # [n, Hc, Wc, C]
    values = jnp.transpose(values, (1, 0, 2, 3)).reshape(len(lay.c_rows), n * wc, c)
    return keys, values


def _row_offset_state(xs, keys, values, k, wrap_rows):
    """Softmax state of every candidate of one chunk at one vertical offset.

    xs [H, Q, D']: query rows, rolled so that row r holds the query row paired with candidate
    row r. Returns a state over [Hc, Q] indexed by candidate centre row."""
    t = _augmented_logits(_row_matmul_keys, xs, keys)                   # [H, Q, M]
    m = k // 2
    if wrap_rows and m:
        t = jnp.concatenate([t[-m:], t, t[:m]], axis=0)
    logits = jax.lax.reduce_window(t, 0.0, jax.lax.add, (k, 1, 1), (1, 1, 1), "VALID")
    init = softmax.init(logits.shape[:2], values.shape[-1])
    return softmax.update_with(
        init, logits, lambda p: jnp.einsum("uqm,umc->uqc", p, values, precision=_HI))


def _row_stream(state, x_rows, n_chunks, get_chunk, k, lay: _RowLayout):
    """Streams candidate chunks (outer) and vertical offsets s (inner) into ``state``, a
    softmax state over [H, Q] indexed by query centre row."""
    h = x_rows.shape[0]
    doubled = jnp.concatenate([x_rows, x_rows], axis=0)
    lo = int(lay.c_rows[0])
    pad_rows = ((lo, h - lo - len(lay.c_rows)),)

    def to_query_rows(st, s):
        # Candidate centre row u pairs with query centre row (u − s) mod H.
        def move(arr, fill):
            full = jnp.pad(arr, pad_rows + ((0, 0),) * (arr.ndim - 1), constant_values=fill)
            return jax.lax.dynamic_slice_in_dim(jnp.concatenate([full, full]), s, h, 0)
        return softmax.SoftmaxState(move(st.max, -jnp.inf), move(st.total, 0.0),
                                    move(st.acc, 0.0))

    def per_chunk(state, j):
        keys, values = get_chunk(j)

        def per_offset(state, s):
            xs = jax.lax.dynamic_slice_in_dim(doubled, h - s, h, 0)     # xs[r] = x_rows[r − s]
            part = _row_offset_state(xs, keys, values, k, lay.wrap_rows)
            return softmax.merge(state, to_query_rows(part, s)), None

        state, _ = jax.lax.scan(per_offset, state, jnp.arange(h))
        return state, None

    state, _ = jax.lax.scan(per_chunk, state, jnp.arange(n_chunks))
    return state


def _row_output(state, bsz, lay: _RowLayout):
    """[H, B·Wq] state → x̂_0 at the query pixels (``_row_pixels``), [B, Hq·Wq, C]."""
    h = state.max.shape[0]
    wq = len(lay.q_cols)
    x0 = softmax.finalize(state).reshape(h, bsz, wq, -1)[lay.q_rows]     # [Hq, B, Wq, C]
    return jnp.transpose(x0, (1, 0, 2, 3)).reshape(bsz, len(lay.q_rows) * wq, -1)


def _row_pixels(lay: _RowLayout, w: int) -> np.ndarray:
    return (lay.q_rows[:, None] * w + lay.q_cols[None, :]).reshape(-1)


# ----------------------------------------------------------------------------------------
# Choosing the engine.

# Cost per computed pair (ns), fitted to wall times measured on the 2-core AMD EPYC (XLA CPU,
# float32, N = 250, B = 1; experiments/bench_machines.py): window ≈ W0 + W1·C^0.63·(k²C + 2),
# the matmul of length k²C + 2 dominating for k ≥ 5; row ≈ R0 + R1·k·C^1.3 (a matmul of
# length kC + 2 and a k-term box sum). With zero padding the row engine also computes
# query rows it discards: H/(H−k+1) more box sums and softmax work and (H/(H−k+1))² more
# row products, modelled as a factor (H/(H−k+1))^1.5.
_W0, _W1 = 0.6, 0.0165
_R0, _R1 = 0.55, 0.125


def choose_method(k: int, c: int, h: int, boundary: str, unique_fraction: float = 1.0) -> str:
    """The cheaper exact engine for the main pass: "window" or "row" (cost model above).

    unique_fraction: fraction of candidate windows left after merging duplicates (window
    engine with a deduplicated bank only)."""
    window = unique_fraction * (_W0 + _W1 * c ** 0.63 * (k * k * c + 2))
    waste = h / max(1, h - k + 1) if boundary == "zeros" else 1.0
    row = waste ** 1.5 * (_R0 + _R1 * k * c ** 1.3)
    return "row" if row < window else "window"


def native_interior_ok(k: int, h: int, w: int, boundary: str) -> bool:
    """Whether the fused CPU kernel can compute the main pass: zero padding, an interior
    (k < H, W), the default backend a CPU and the kernel built (``native.available()``)."""
    return (boundary == "zeros" and k < min(h, w) and jax.default_backend() == "cpu"
            and native.available())


def _resolve_method(method, k, c, h, boundary, unique_fraction=1.0, banked=False, w=None,
                    **shape):
    """The engine of the main pass (``_resolve_engine``'s, without the reason)."""
    return _resolve_engine(method, k, c, h, boundary, unique_fraction, banked, w,
                           **shape).engine


def _resolve_engine(method, k, c, h, boundary, unique_fraction=1.0, banked=False, w=None, *,
                    wrap_patches=False, n=None, batch=1, sharded=False,
                    block=DEFAULT_BLOCK) -> engines_lib.Choice:
    """The engine of the main pass and why (``engines.Choice``). An explicit ``method`` wins.
    "auto": the applicable engines are "window" and "row", and "native" (the fused CPU
    kernel) for a banked zero-padded machine whose windows are not merged when it can run;
    ``engines.els_engine`` measures them on a probe (n = the number of training images; B =
    ``batch``) and caches the winner, or, with ``ELS_JAX_AUTOTUNE=0``, without n, or
    ``sharded``, applies the static rule: the kernel when it applies, except at k = 3 with
    C ≥ 2, where the window engine's short matmul was cheaper (2-core AVX-512 EPYC, N = 1000,
    32×32, ns per pair: C = 3, k = 3 window 0.40, kernel 0.58; k = 7 1.00 vs 0.76; k = 11
    1.96–2.20 vs 1.13–1.21; C = 1, k = 3 0.32–0.54 vs 0.30; k = 11 1.03–1.12 vs 0.71–0.79);
    otherwise ``choose_method``'s cost model."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    w = h if w is None else w
    if method == "native":
        if not banked or not native_interior_ok(k, h, w, boundary):
            raise ValueError("method='native' (the fused CPU kernel) needs a machine "
                             "(make_machine) with boundary='zeros', k < H, W, a CPU backend "
                             "and a C++ compiler (see els_jax.native)")
        return engines_lib.Choice(method, "method='native' (explicit)")
    if method != "auto":
        return engines_lib.Choice(method, f"method={method!r} (explicit)")
    applicable = ("window", "row")
    kernel = banked and unique_fraction >= 1.0 and native_interior_ok(k, h, w, boundary)
    if kernel:
        applicable += ("native",)
    if kernel and not (k <= 3 and c >= 2):
        static = "native"
        why = ("static rule: the fused CPU kernel for a banked zero-padded machine without "
               "merged windows (not at k = 3, C ≥ 2)")
    else:
        static = choose_method(k, c, h, boundary, unique_fraction)
        why = "static rule: choose_method's cost model"
    return engines_lib.els_engine(applicable, static, why, k=k, c=c, h=h, w=w,
                                  boundary=boundary, wrap_patches=wrap_patches, n=n,
                                  batch=batch, banked=banked,
                                  unique_fraction=unique_fraction, sharded=sharded,
                                  block=block)


def _scatter(x_shape, results):
    """Puts each pass's x̂_0 [B, P, V] back at its pixels [P]; returns [B, H, W, C]."""
    b, h, w, c = x_shape
    out = jnp.zeros((b, h * w, c), jnp.float32)
    for pixels, r in results:
        if pixels is None:                                           # the ideal machine
            return r.reshape(x_shape)
        out = out.at[:, pixels].set(r.reshape(b, -1, c))
    return out.reshape(x_shape)


# ----------------------------------------------------------------------------------------
# The functional API: candidates streamed straight from the images (no bank).


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "schedule",
                                             "block", "ideal", "method", "mesh"))
def _stream_images_x0(x, t, images, log_w, mu=None, *, k, boundary, wrap_patches, schedule,
                      block, ideal=False, method="window", mesh=None):
    """x̂_0 with candidates extracted from the images chunk by chunk (no bank).

    mu: the per-channel data mean [C] (default: of ``images``). With a ``mesh`` (one axis,
    "cands"; N divisible by its size) each device streams its share of the images and
    ``log_w``, the per-pass softmax states are merged exactly, and ``mu`` must be the mean of
    the whole data set (it fixes the constant dropped from every logit, so it must be the same
    on every device)."""
    bsz, h, w, c = x.shape
    if mu is None:
        mu = jnp.mean(images, axis=(0, 1, 2))
    lay = _row_layout(k, boundary, wrap_patches, h, w) if method == "row" else None
    groups = _grouped_passes(k, boundary, wrap_patches, h, w, ideal, method)
    with_border = boundary == "zeros" and not ideal and k > 1     # k = 1 has no border

    def states(x, t, images, log_w, mu):
        out = _stream_states(x, t, images, log_w, mu, k=k, schedule=schedule, block=block,
                             lay=lay, groups=groups)
        if with_border:
            a, b2 = _coeffs(t, bsz, schedule)
            out = out + (border_lib.stream_border_states(x, a, b2, images, log_w, k=k, mu=mu,
                                                         block=block),)
        return out

    if mesh is None:
        sts = states(x, t, images, log_w, mu)
    else:
        from jax.sharding import PartitionSpec as P
        sts = softmax.sharded(states, mesh, (P(), P(), P("cands"), P("cands"), P()))(
            x, t, images, log_w, mu)
    results = []
    if lay is not None:
        results.append((_row_pixels(lay, w), _row_output(sts[0], bsz, lay)))
        sts = sts[1:]
    results += [_window_result(gp, st, bsz) for gp, st in zip(groups, sts)]
    if with_border:
        m = k // 2
        shift = jnp.broadcast_to(mu[:, None, None, None], (c, 2 * m, 2 * m, 1))
        results += border_lib.border_results(sts[len(groups)], x.shape, k, shift)
    return _scatter(x.shape, results)


def _stream_states(x, t, images, log_w, mu, *, k, schedule, block, lay, groups):
    """The softmax state of every pass (row engine main pass if ``lay``, then each batch of
    groups) over the candidates of ``images``, streamed a chunk of images at a time."""
    bsz, h, w, c = x.shape
    n = images.shape[0]
    a, b2 = _coeffs(t, bsz, schedule)
    out = []
    if lay is not None:
        x_rows = _row_queries(x, a, b2, k, lay, mu)
        q = x_rows.shape[1]
        n_img = int(min(n, max(1, block // max(1, len(lay.c_rows) * q * len(lay.c_cols)))))
        starts, first_new = softmax.chunk_starts(n, n_img)
        rows = jnp.arange(n_img, dtype=jnp.int32)

        def get_chunk(j):
            imgs = jax.lax.dynamic_slice_in_dim(images, starts[j], n_img)
            lw = jax.lax.dynamic_slice_in_dim(log_w, starts[j], n_img)
            return _row_candidates(imgs, jnp.where(rows >= first_new[j], lw, -jnp.inf), k,
                                   lay, mu)

        out.append(_row_stream(softmax.init((h, q), c), x_rows, len(starts), get_chunk, k, lay))
    for gp in groups:
        q = _window_queries(x, a, b2, k, gp, mu)
        shift = _shift_vector(mu, k, gp.cand_mode, h, w)
        g, pq = gp.query_pixels.shape
        pc = gp.cand_pixels.shape[1]
        n_img = int(min(n, max(1, block // max(1, bsz * g * pq * pc))))
        extract = len(shift) * (g * pc if 4 * g * pc < h * w else h * w)  # floats/image
        n_img = int(min(n_img, max(1, 4 * block // extract)))
        starts, first_new = softmax.chunk_starts(n, n_img)
        rows = jnp.arange(n_img, dtype=jnp.int32)

        def body(state, chunk, q=q, gp=gp, shift=shift, n_img=n_img, rows=rows):
            start, first = chunk
            imgs = jax.lax.dynamic_slice_in_dim(images, start, n_img)
            lw = jax.lax.dynamic_slice_in_dim(log_w, start, n_img)
            keys, values = _window_candidates(imgs, jnp.where(rows >= first, lw, -jnp.inf),
                                              k, gp, shift)
            return _window_update(state, q, keys, values), None

        v = h * w * c if gp.cand_mode == "whole" else c
        state, _ = jax.lax.scan(body, softmax.init(q.shape[:2], v), (starts, first_new))
        out.append(state)
    return tuple(out)


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
           schedule=schedules_lib.Cosine(), mask=None, block: int = DEFAULT_BLOCK,
           method: str = "auto"):
    """Denoised mean x̂_0 of the ELS machine, [B, H, W, C]. See ``els_score``."""
    check_query_and_images(x, images)
    h, w = x.shape[1], x.shape[2]
    k = _check_els_k(k, h, w, boundary, wrap_patches)
    if boundary not in patches.BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; choose one of {patches.BOUNDARIES}")
    if boundary == "zeros" and k >= min(h, w):
        from els_jax.local import local_x0         # SPEC: zero-padded ELS with k ≥ H is LS
        return local_x0(x, t, images, k=k, schedule=schedule, mask=mask)
    method = _resolve_method(method, k, x.shape[3], h, boundary, w=w,
                             wrap_patches=bool(wrap_patches), n=images.shape[0],
                             batch=x.shape[0], block=int(block))
    log_w = mask_log_weights(mask, images.shape[0])
    return _stream_images_x0(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32),
                             jnp.asarray(images, jnp.float32), log_w, k=k, boundary=boundary,
                             wrap_patches=bool(wrap_patches),
                             schedule=schedules_lib.get(schedule), block=int(block),
                             method=method)


def els_score(x, t, images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
              schedule=schedules_lib.Cosine(), mask=None, block: int = DEFAULT_BLOCK,
              method: str = "auto"):
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
      method: "auto" (cheaper engine for this k), "window" or "row" (same result).
    Returns:
      score [B, H, W, C].

    Works under jax.jit / jax.vmap; differentiable (jax.grad, jax.jvp) w.r.t. x and t, every
    engine (absent candidates get a zero tangent: ``_augmented_logits``).

        >>> s = els_score(x, 0.3, images, k=5, boundary="zeros")
    """
    x0 = els_x0(x, t, images, k=k, boundary=boundary, wrap_patches=wrap_patches,
                schedule=schedule, mask=mask, block=block, method=method)
    return conversions.x0_to_score(x0, x, t, schedule=schedule)


# ----------------------------------------------------------------------------------------
# Candidate banks: built once per (data set, k, boundary, mask), reused at every step.


class WindowBank(NamedTuple):
    """The candidates of one batch of groups, deduplicated and padded to whole chunks.

    keys [G, M, D+2]: augmented windows [c − μ, ‖c − μ‖²/2, log multiplicity] (−inf = padding);
    values [G, M, V].
    """

    keys: jax.Array
    values: jax.Array

    @property
    def log_w(self):
        return self.keys[..., -1]


class RowBank(NamedTuple):
    """The row engine's candidates for all images: keys [H, kC+2, N'·Wc], values [Hc, N'·Wc, C]
    (see ``_row_candidates``); N' = N padded with absent images to whole chunks."""

    keys: jax.Array
    values: jax.Array


class InteriorBank(NamedTuple):
    """The fused CPU kernel's candidates for the zero-padded main pass (``native``): the
    images centred on the per-channel mean with a row of ones, [C+1, H, W, N'] (the layout of
    ``local.LocalBank``), ½‖W_i(c_n − μ)‖² at every pixel, [H, W, N'], and log weights [N']
    (−inf for the padding images)."""

    centred: jax.Array
    half_sq: jax.Array
    log_w: jax.Array


class MachineBank(NamedTuple):
    """Everything an ELS (or ideal) machine precomputes: the data mean, a row bank for the main
    pass (row engine) or None, one window bank per remaining batch of groups, for zero
    padding the border engine's bank (``border.BorderBank``) or None, and the fused kernel's
    bank of the main pass (``InteriorBank``, method "native") or None."""

    mu: jax.Array
    row: RowBank | None
    windows: tuple
    border: border_lib.BorderBank | None = None
    interior: InteriorBank | None = None


class BankSpec(NamedTuple):
    """Static (hashable) facts about a MachineBank, for jit."""

    k: int
    boundary: str
    wrap_patches: bool
    ideal: bool
    method: str            # engine of the main pass: "window" | "row" | "native"
    chunks: tuple          # candidates per chunk (power of two) of each window bank
    row_images: int        # images per chunk of the row bank (power of two), 0 if none
    unique_fraction: float
    border_images: int = 0  # images per chunk of the border bank's bands, 0 if none


def _hash_rows(u32):
    mult = np.random.default_rng(0).integers(1, 2 ** 62, size=u32.shape[1], dtype=np.uint64)
    return (u32.astype(np.uint64) * (2 * mult + 1)).sum(axis=1)      # wraps mod 2^64


def _unique_rows(rows: np.ndarray):
    """Unique rows of a float32 [M, F] array (bitwise) and how often each occurs."""
    rows = np.ascontiguousarray(rows, np.float32)
    u32 = rows.view(np.uint32)
    _, first, inverse, counts = np.unique(_hash_rows(u32), return_index=True,
                                          return_inverse=True, return_counts=True)
    if not np.array_equal(u32, u32[first[inverse.reshape(-1)]]):     # a hash collision: rare
        void = u32.view(np.dtype((np.void, 4 * u32.shape[1]))).reshape(-1)
        _, first, counts = np.unique(void, return_index=True, return_counts=True)
    return rows[first], counts


def _pow2_floor(v: int) -> int:
    return 1 << max(0, int(v).bit_length() - 1)


def _grouped_passes(k, boundary, wrap_patches, h, w, ideal, method):
    """The window-engine passes of a machine, split into batches of equal groups: the main
    pass unless the row engine computes it; never the zero-padded border (``border.py``)."""
    passes = _ideal_layout(h, w) if ideal else layout(k, boundary, wrap_patches, h, w)[:1]
    if method in ("row", "native"):
        passes = passes[1:]
    return [gp for ps in passes for gp in _grouped(ps)]


def _host_windows(images: np.ndarray, k: int, mode: str, pixels: np.ndarray) -> np.ndarray:
    """Numpy twin of ``_windows`` for building banks (a gather: no per-k compile):
    [n, H, W, C] → [n, P, D], windows laid out (dy, dx, c) as ``patches.extract_windows``."""
    n, h, w, c = images.shape
    if mode == "whole":
        return images.reshape(n, 1, -1)
    m = k // 2
    padded = np.asarray(patches.pad(jnp.asarray(images), m, mode))          # [n, H+2m, W+2m, C]
    rows, cols = np.divmod(np.asarray(pixels), w)
    d = np.arange(k)
    rr = rows[:, None, None] + d[None, :, None]                             # [P, k, 1]
    cc = cols[:, None, None] + d[None, None, :]                             # [P, 1, k]
    return padded[:, rr, cc, :].reshape(n, len(pixels), k * k * c)


def _host_window_candidates(images, k, gp, mu, images_per_step):
    """All candidates of ``gp`` as numpy: keys [G, N·Pc, D] (mean-shifted), values [G, N·Pc, V]."""
    n, h, w, c = images.shape
    g, pc = gp.cand_pixels.shape
    shift = np.asarray(_shift_vector(jnp.asarray(mu), k, gp.cand_mode, h, w))
    keys, values = [], []
    for start in range(0, n, images_per_step):
        im = images[start:start + images_per_step]
        kk = _host_windows(im, k, gp.cand_mode, gp.cand_pixels.reshape(-1)) - shift
        if gp.cand_mode == "whole":
            vv = im.reshape(len(im), 1, -1)
        else:
            vv = im.reshape(len(im), h * w, c)[:, gp.cand_pixels.reshape(-1)]
        keys.append(np.swapaxes(kk.reshape(len(im), g, pc, -1), 0, 1).reshape(g, -1, kk.shape[-1]))
        values.append(np.swapaxes(vv.reshape(len(im), g, pc, -1), 0, 1).reshape(g, -1, vv.shape[-1]))
    return np.concatenate(keys, axis=1), np.concatenate(values, axis=1)


def _aligned_empty(shape, align: int = 64) -> np.ndarray:
    """An uninitialised float32 array whose data is ``align``-byte aligned: ``jax.device_put``
    on the CPU then uses it in place instead of copying it (a bank can be a gigabyte)."""
    nbytes = int(np.prod(shape)) * 4
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(np.float32).reshape(shape)


def _as_range(values: np.ndarray):
    """A slice equal to the sorted, contiguous integer array ``values``, or None."""
    if values.size and np.array_equal(values, np.arange(values[0], values[0] + values.size)):
        return slice(int(values[0]), int(values[0]) + values.size)
    return None


def _fill_window_bank(images: np.ndarray, k: int, gp: _Grouped, mu: np.ndarray,
                      total: int) -> WindowBank:
    """The window bank of ``gp`` without merging, written once in place: keys [G, total, D+2]
    = [c − μ, ‖c − μ‖²/2, log w] and values [G, total, V], candidates image-major (as
    ``_host_window_candidates``), padded with absent candidates (keys 0, log w = −inf).

    Windows are strided views of the padded, centred images (no gather), copied straight into
    the bank; every group of the ELS layout is a rectangle of centres (interior, one edge row
    or column, one corner), so each is one slice of the view. ‖c − μ‖² comes from an integral
    image of the squared centred images in float64 (not a second pass over the bank; the
    float32 ``patches.window_sum`` would put ~1e-4 of error on ‖c − μ‖², which 1/b² turns into
    a visible logit error at small t)."""
    n, h, w, c = images.shape
    g, pc = gp.cand_pixels.shape
    d, v = k * k * c, c
    m = k // 2
    keys = _aligned_empty((g, total, d + 2))
    values = _aligned_empty((g, total, v))
    mode = "wrap" if gp.cand_mode == "circular" else "constant"
    centred = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode=mode) - mu   # [n, H+2m, W+2m, C]
    view = np.moveaxis(np.lib.stride_tricks.sliding_window_view(centred, (k, k), axis=(1, 2)),
                       3, -1)                                            # [n, H, W, k, k, C]
    sq = np.pad(np.cumsum(np.cumsum((centred.astype(np.float64) ** 2).sum(-1), 1), 2),
                ((0, 0), (1, 0), (1, 0)))
    half_sq = 0.5 * (sq[:, k:, k:] - sq[:, :-k, k:] - sq[:, k:, :-k] + sq[:, :-k, :-k])  # [n, H, W]
    used = n * pc
    for gi in range(g):
        pix = gp.cand_pixels[gi]
        rows, cols = np.divmod(pix, w)
        ur, uc = np.unique(rows), np.unique(cols)
        rect = (_as_range(ur), _as_range(uc))
        if None in rect or not np.array_equal(pix, (ur[:, None] * w + uc[None]).reshape(-1)):
            rect = (rows, cols)                                          # any set: a gather
        src = view[:, rect[0], rect[1]]                   # [n, rows, cols | Pc, k, k, C]
        np.copyto(keys[gi, :used, :d].reshape(src.shape[:-3] + (k, k, c)), src)
        keys[gi, :used, d] = half_sq[:, rect[0], rect[1]].reshape(-1)
        keys[gi, :used, d + 1] = 0.0
        values[gi, :used] = images[:, rect[0], rect[1]].reshape(n * pc, v)
    keys[:, used:] = 0.0
    keys[:, used:, d + 1] = -np.inf
    values[:, used:] = 0.0
    return WindowBank(jax.device_put(keys), jax.device_put(values))

def estimate_unique_fraction(images, *, k, boundary="circular", wrap_patches=False,
                             sample=256, ideal=False, first=64, clear=0.97):
    """Fraction of the main pass's candidate windows left after merging duplicates, estimated
    on the first ``sample`` images (an upper bound: more images hold more duplicates).

    Looks at the first ``first`` images before: a fraction above ``clear`` there means nothing
    worth merging (natural or random images), and is returned as it is (4× less work for
    every patch size of a machine that will not deduplicate anyway)."""
    def fraction(m):
        sub = np.asarray(images[:m], np.float32)
        n, h, w, _ = sub.shape
        gp = _grouped_passes(k, boundary, wrap_patches, h, w, ideal, "window")[0]
        keys, values = _host_window_candidates(sub, k, gp, sub.mean(axis=(0, 1, 2)), 64)
        rows = np.concatenate([keys[0], values[0]], axis=1)
        return len(_unique_rows(rows)[0]) / len(rows)

    if first < min(sample, len(images)):
        early = fraction(first)
        if early > clear:
            return early
    return fraction(sample)


def build_bank(images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
               dedup: bool = True, method: str = "auto", block: int = DEFAULT_BLOCK,
               n_shards: int = 1, ideal: bool = False, chunk: int | None = None,
               dedup_threshold: float = 0.9, images_per_step: int = 64,
               unique_fraction: float | None = None):
    """Precomputes the candidates of the ELS machine (or of the ideal machine).

    With ``dedup``, identical candidate windows (same pixels, same value) are merged into one
    candidate with their count, when an estimate on a sample says that removes at least
    1 − ``dedup_threshold`` of them (set 1.0 to always merge). The main pass uses the engine
    ``method`` ("auto": the cheaper one given that estimate). The mask (class-conditional) is
    applied by passing only the selected images.

    Returns (MachineBank, BankSpec); banks are padded to whole chunks × ``n_shards``.
    ``unique_fraction``: a precomputed ``estimate_unique_fraction`` (skips the estimate).
    """
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    mu = images.mean(axis=(0, 1, 2))
    if not dedup:
        unique_fraction = 1.0
    elif unique_fraction is None:
        unique_fraction = estimate_unique_fraction(images, k=k, boundary=boundary,
                                                   wrap_patches=wrap_patches, ideal=ideal)
    dedup = dedup and unique_fraction <= dedup_threshold
    if ideal:
        method = "window"
    else:
        method = _resolve_method(method, k, c, h, boundary,
                                 unique_fraction if dedup else 1.0, banked=True, w=w,
                                 wrap_patches=bool(wrap_patches), n=n,
                                 sharded=n_shards > 1, block=int(block))
    windows, chunks = [], []
    for gp in _grouped_passes(k, boundary, wrap_patches, h, w, ideal, method):
        g, pq = gp.query_pixels.shape
        d = c * (h * w if gp.cand_mode == "whole" else k * k)
        v = h * w * c if gp.cand_mode == "whole" else c
        if dedup:
            keys, values = _host_window_candidates(images, k, gp, mu, images_per_step)
            groups = [_unique_rows(np.concatenate([keys[gi], values[gi]], axis=1))
                      for gi in range(g)]
            m = max(len(u) for u, _ in groups)
        else:
            m = n * gp.cand_pixels.shape[1]
            if gp.cand_mode == "whole":             # the ideal machine: one candidate per image
                keys, values = _host_window_candidates(images, k, gp, mu, images_per_step)
                groups = [(np.concatenate([keys[0], values[0]], axis=1), np.ones(m))]
        ch = chunk or _pow2_floor(max(1, block // (g * pq)))
        ch = min(ch, 1 << int(np.ceil(np.log2(max(1, m)))))
        per = ch * n_shards
        total = -(-m // per) * per
        if not dedup and gp.cand_mode != "whole":     # no merging: filled in place
            windows.append(_fill_window_bank(images, k, gp, mu, total))
            chunks.append(int(ch))
            continue
        bank_keys = np.zeros((g, total, d + 2), np.float32)
        bank_values = np.zeros((g, total, v), np.float32)
        bank_keys[:, m:, -1] = -np.inf                                  # padding: absent
        for gi, (uniq, counts) in enumerate(groups):
            kk = uniq[:, :d]
            bank_keys[gi, :len(uniq), :d] = kk
            bank_keys[gi, :len(uniq), d] = 0.5 * np.einsum("md,md->m", kk, kk)
            bank_keys[gi, :len(uniq), d + 1] = np.log(counts)
            bank_keys[gi, len(uniq):, d + 1] = -np.inf
            bank_values[gi, :len(uniq)] = uniq[:, d:]
        windows.append(WindowBank(jnp.asarray(bank_keys), jnp.asarray(bank_values)))
        chunks.append(int(ch))
    row, row_images = None, 0
    if method == "row":
        lay = _row_layout(k, boundary, wrap_patches, h, w)
        per_image = len(lay.c_rows) * len(lay.q_cols) * len(lay.c_cols)
        row_images = min(_pow2_floor(max(1, block // per_image)),
                         1 << int(np.ceil(np.log2(n))))
        per = row_images * n_shards
        total = -(-n // per) * per
        padded = np.concatenate([images, np.zeros((total - n,) + images.shape[1:], np.float32)])
        log_w = np.where(np.arange(total) < n, 0.0, -np.inf).astype(np.float32)
        make = jax.jit(lambda im, lw: _row_candidates(im, lw, k, lay, jnp.asarray(mu)))
        parts = [make(jnp.asarray(padded[s:s + row_images]), jnp.asarray(log_w[s:s + row_images]))
                 for s in range(0, total, row_images)]
        row = RowBank(jnp.concatenate([p[0] for p in parts], axis=-1),
                      jnp.concatenate([p[1] for p in parts], axis=1))
    border, border_images = None, 0
    if boundary == "zeros" and not ideal and k > 1:              # k = 1 has no border
        border_images = border_lib.band_chunk_images(n, k, h, w, block)
        per = border_images * n_shards
        border = border_lib.build_border_bank(images, k, mu, -(-n // per) * per)
    interior = None
    if method == "native":
        total = -(-n // n_shards) * n_shards
        padded = np.concatenate([images, np.zeros((total - n,) + images.shape[1:], np.float32)])
        log_w = np.where(np.arange(total) < n, 0.0, -np.inf).astype(np.float32)
        lb = local_lib.build_local_bank(local_lib.transpose_images(padded), k=k,
                                        mean=jnp.asarray(mu)[:, None, None, None])
        interior = InteriorBank(lb.centred_and_ones, lb.half_sq, jnp.asarray(log_w))
    spec = BankSpec(int(k), boundary, bool(wrap_patches), bool(ideal), method, tuple(chunks),
                    int(row_images), float(unique_fraction), int(border_images))
    return MachineBank(jnp.asarray(mu), row, tuple(windows), border, interior), spec


def _call_chunk(chunk: int, rows_per_candidate: int, block: int) -> int:
    """Halves a bank's power-of-two chunk until chunk × rows_per_candidate ≤ block."""
    while chunk > 1 and chunk * rows_per_candidate > block:
        chunk //= 2
    return chunk


def _stream_window_bank(state, q, bank: WindowBank, chunk: int):
    """Streams a window bank's chunks into ``state`` (over [G, Q])."""
    n_chunks = bank.keys.shape[1] // chunk

    def body(state, j):
        keys = jax.lax.dynamic_slice_in_dim(bank.keys, j * chunk, chunk, axis=1)
        values = jax.lax.dynamic_slice_in_dim(bank.values, j * chunk, chunk, axis=1)
        return _window_update(state, q, keys, values), None

    state, _ = jax.lax.scan(body, state, jnp.arange(n_chunks))
    return state


def _stream_row_bank(state, x_rows, bank: RowBank, n_img: int, k: int, lay: _RowLayout):
    wc = len(lay.c_cols)
    size = n_img * wc
    n_chunks = bank.keys.shape[-1] // size

    def get_chunk(j):
        return (jax.lax.dynamic_slice_in_dim(bank.keys, j * size, size, axis=2),
                jax.lax.dynamic_slice_in_dim(bank.values, j * size, size, axis=1))

    return _row_stream(state, x_rows, n_chunks, get_chunk, k, lay)


def bank_partition_specs(bank: MachineBank) -> MachineBank:
    """How ``bank_x0`` splits a MachineBank over a one-axis "cands" mesh (a tree of
    PartitionSpecs shaped like ``bank``): every bank along its candidate axis, μ replicated.
    ``make_machine`` places its banks this way once, so calls do not move them."""
    from jax.sharding import PartitionSpec as P
    row = None if bank.row is None else RowBank(P(None, None, "cands"), P(None, "cands", None))
    border = None if bank.border is None else border_lib.border_partition_specs()
    interior = None if bank.interior is None else _INTERIOR_SPECS
    return MachineBank(P(), row, tuple(WindowBank(P(None, "cands"), P(None, "cands"))
                                       for _ in bank.windows), border, interior)


# How an InteriorBank splits over a one-axis "cands" mesh: along its image axes.
_INTERIOR_SPECS = InteriorBank(PartitionSpec(None, None, None, "cands"),
                               PartitionSpec(None, None, "cands"), PartitionSpec("cands"))


def _interior_state_xla(q, a, b2, ib: InteriorBank, k: int, block: int):
    """The XLA twin of ``native.interior_softmax_state`` (same arguments, same state): the
    window engine's main pass for zero padding, every interior query window against every
    interior window of the bank's images, streamed a chunk of images at a time (at most
    ``block`` logits). The fused kernel takes its derivatives from here."""
    bsz, h, w, c = q.shape
    n = ib.log_w.shape[0]
    pixels = layout(k, "zeros", False, h, w)[0].query_pixels            # interior, row-major
    p = len(pixels)
    rows, cols = np.divmod(pixels, w)
    q_win = _windows(q, k, "zeros", pixels)                              # [B, P, k²C]
    images = jnp.transpose(ib.centred[:c], (3, 1, 2, 0))                 # [N', H, W, C]
    half_sq = ib.half_sq[rows, cols]                                     # [P, N']
    n_img = int(min(n, max(1, block // max(1, bsz * p * p))))
    starts, first_new = softmax.chunk_starts(n, n_img)
    seen = jnp.arange(n_img, dtype=jnp.int32)
    a3, b23 = a[:, None, None], b2[:, None, None]

    def body(state, chunk):
        start, first = chunk
        imgs = jax.lax.dynamic_slice_in_dim(images, start, n_img)
        keys = _windows(imgs, k, "zeros", pixels).reshape(n_img * p, -1)     # image-major
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


def _interior_result(x, a, b2, k, bank: MachineBank, mesh, block: int = DEFAULT_BLOCK):
    """(interior pixels, x̂_0 [B, P, C]) of the fused kernel's main pass (zero padding); the
    kernel's state is over the main pass's query pixels in ``layout`` order (row-major).
    Differentiable: values from the kernel, derivatives from ``_interior_state_xla``."""
    bsz, h, w, c = x.shape

    def kernel(q, a, b2, ib):
        return softmax.SoftmaxState(*native.interior_softmax_state(
            q, a, b2, ib.centred, ib.half_sq, ib.log_w, k))

    def reference(q, a, b2, ib):
        return _interior_state_xla(q, a, b2, ib, k, block)

    run = native.with_reference_derivatives(kernel, reference)
    if mesh is not None:
        run = _sharded(run, mesh, _INTERIOR_SPECS)
    mu = bank.mu[None, None, None, :]
    state = run(x - a[:, None, None, None] * mu, a, b2, bank.interior)
    x0 = softmax.finalize(state) + mu                           # [B, H−2m, W−2m, C]
    pixels = layout(k, "zeros", False, h, w)[0].query_pixels
    return np.asarray(pixels).reshape(-1), x0.reshape(bsz, -1, c)


def _sharded(fn, mesh, bank_specs):
    """fn(replicated args..., bank) run on each device with its share of the bank's candidate
    axis, the partial softmax states merged exactly (``softmax.sharded``)."""
    from jax.sharding import PartitionSpec as P

    def call(*args):
        return softmax.sharded(fn, mesh, tuple(P() for _ in args[:-1]) + (bank_specs,))(*args)
    return call


@functools.partial(jax.jit, static_argnames=("spec", "schedule", "mesh", "block"))
def bank_x0(x, t, bank: MachineBank, *, spec: BankSpec, schedule, mesh=None,
            block: int = DEFAULT_BLOCK):
    """x̂_0 [B, H, W, C] from a precomputed bank (``build_bank``), optionally sharded.

    With a ``mesh`` (one axis, "cands"), each bank's candidates are split over the devices;
    each device streams its own part and the partial softmax states are merged exactly
    (softmax.merge_across), so the result equals the single-device one.
    """
    from jax.sharding import PartitionSpec as P

    bsz, h, w, c = x.shape
    a, b2 = _coeffs(t, bsz, schedule)
    k = spec.k
    results = []
    if spec.method == "row":
        lay = _row_layout(k, spec.boundary, spec.wrap_patches, h, w)
        x_rows = _row_queries(x, a, b2, k, lay, bank.mu)
        q = x_rows.shape[1]
        n_img = _call_chunk(spec.row_images, len(lay.c_rows) * q * len(lay.c_cols), block)
        init = softmax.init((h, q), c)

        def run(x_rows, row_bank):
            return _stream_row_bank(init, x_rows, row_bank, n_img, k, lay)

        if mesh is not None:
            run = _sharded(run, mesh, RowBank(P(None, None, "cands"), P(None, "cands", None)))
        state = run(x_rows, bank.row)
        results.append((_row_pixels(lay, w), _row_output(state, bsz, lay)))
    if spec.method == "native":
        results.append(_interior_result(x, a, b2, k, bank, mesh, block))
    groups = _grouped_passes(k, spec.boundary, spec.wrap_patches, h, w, spec.ideal, spec.method)
    for gp, wbank, chunk in zip(groups, bank.windows, spec.chunks):
        q = _window_queries(x, a, b2, k, gp, bank.mu)
        # A chunk holds B·G·Pq logits per candidate and G·(D+2+V) floats of the bank slice
        # (what dominates for the 1-query corner groups): bound both by ``block``.
        per_cand = max(bsz * gp.query_pixels.size,
                       gp.query_pixels.shape[0] * (wbank.keys.shape[-1] + wbank.values.shape[-1]))
        ch = _call_chunk(chunk, per_cand, block)
        init = softmax.init(q.shape[:2], wbank.values.shape[-1])

        def run(q, wbank, init=init, ch=ch):
            return _stream_window_bank(init, q, wbank, ch)

        if mesh is not None:
            run = _sharded(run, mesh, WindowBank(P(None, "cands"), P(None, "cands")))
        results.append(_window_result(gp, run(q, wbank), bsz))
    if bank.border is not None:
        def run_border(x, a, b2, mu, border_bank):
            return border_lib.border_states(x, a, b2, border_bank, k=k, mu=mu, block=block,
                                            band_images=spec.border_images)
        if mesh is not None:
            run_border = _sharded(run_border, mesh, border_lib.border_partition_specs())
        states = run_border(x, a, b2, bank.mu, bank.border)
        results += border_lib.border_results(states, x.shape, k, bank.border.corners.mean[0])
    return _scatter(x.shape, results)

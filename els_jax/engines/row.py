"""The row engine of the ELS machine: a k×k window dot product split into k row dot
products (length kC) summed over the window's rows.

For a vertical offset s between query and candidate, the row products of every query row with
the candidate row s below form one batched matmul, and a k-row box sum (``lax.reduce_window``)
over them gives every window dot product at that offset; the row norms and log w/k ride along
in the same matmul (``row_candidates``). Cost per pair ∝ kC + k instead of k²C, without
merging duplicates (it works on whole images). Candidates stream from the images
(``passes.stream_states``) or from a ``RowBank`` (``build_row_bank``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from els_jax.engines import layout as geo
from els_jax.core import patches, softmax

_HI = jax.lax.Precision.HIGHEST


class RowLayout(NamedTuple):
    """Static description of the main pass for the row engine (centre coordinates)."""

    q_cols: np.ndarray      # query centre columns
    q_col_mode: str         # padding of query rows ("circular" | "zeros")
    q_rows: np.ndarray      # query centre rows kept in the output
    c_cols: np.ndarray      # candidate centre columns
    c_col_mode: str
    c_rows: np.ndarray      # candidate centre rows (contiguous)
    wrap_rows: bool         # candidate windows wrap vertically


def row_layout(k: int, boundary: str, wrap_patches: bool, h: int, w: int) -> RowLayout:
    m = k // 2
    inner_r, inner_c = np.arange(m, h - m), np.arange(m, w - m)
    if boundary == "circular" and wrap_patches:
        return RowLayout(np.arange(w), "circular", np.arange(h), np.arange(w), "circular",
                          np.arange(h), True)
    if boundary == "circular":
        return RowLayout(np.arange(w), "circular", np.arange(h), inner_c, "zeros", inner_r,
                          False)
    # Zero padding: interior queries only (their windows never touch the padding).
    return RowLayout(inner_c, "zeros", inner_r, inner_c, "zeros", inner_r, False)


def row_queries(x, a, b2, k, lay: RowLayout, mu):
    """Augmented query rows [H, B·Wq, kC+2] (rows first, for the batched row matmul)."""
    b, h = x.shape[0], x.shape[1]
    q = patches.row_windows(x, k, lay.q_col_mode, lay.q_cols)
    q = q - a[:, None, None, None] * jnp.tile(mu, k)[None, None, None]
    q = geo.augment_queries(q, a, b2)                                       # [B, H, Wq, D']
    return jnp.transpose(q, (1, 0, 2, 3)).reshape(h, b * len(lay.q_cols), q.shape[-1])


def row_candidates(images, log_w, k, lay: RowLayout, mu):
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


def row_offset_state(xs, keys, values, k, wrap_rows):
    """Softmax state of every candidate of one chunk at one vertical offset.

    xs [H, Q, D']: query rows, rolled so that row r holds the query row paired with candidate
    row r. Returns a state over [Hc, Q] indexed by candidate centre row."""
    t = geo.augmented_logits(geo.row_matmul_keys, xs, keys)                   # [H, Q, M]
    m = k // 2
    if wrap_rows and m:
        t = jnp.concatenate([t[-m:], t, t[:m]], axis=0)
    logits = jax.lax.reduce_window(t, 0.0, jax.lax.add, (k, 1, 1), (1, 1, 1), "VALID")
    init = softmax.init(logits.shape[:2], values.shape[-1])
    return softmax.update_with(
        init, logits, lambda p: jnp.einsum("uqm,umc->uqc", p, values, precision=_HI))


def row_stream(state, x_rows, n_chunks, get_chunk, k, lay: RowLayout):
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
            part = row_offset_state(xs, keys, values, k, lay.wrap_rows)
            return softmax.merge(state, to_query_rows(part, s)), None

        state, _ = jax.lax.scan(per_offset, state, jnp.arange(h))
        return state, None

    state, _ = jax.lax.scan(per_chunk, state, jnp.arange(n_chunks))
    return state


def row_output(state, bsz, lay: RowLayout):
    """[H, B·Wq] state → x̂_0 at the query pixels (``row_pixels``), [B, Hq·Wq, C]."""
    h = state.max.shape[0]
    wq = len(lay.q_cols)
    x0 = softmax.finalize(state).reshape(h, bsz, wq, -1)[lay.q_rows]     # [Hq, B, Wq, C]
    return jnp.transpose(x0, (1, 0, 2, 3)).reshape(bsz, len(lay.q_rows) * wq, -1)


def row_pixels(lay: RowLayout, w: int) -> np.ndarray:
    return (lay.q_rows[:, None] * w + lay.q_cols[None, :]).reshape(-1)


class RowBank(NamedTuple):
    """The row engine's candidates for all images: keys [H, kC+2, N'·Wc], values [Hc, N'·Wc, C]
    (see ``row_candidates``); N' = N padded with absent images to whole chunks."""

    keys: jax.Array
    values: jax.Array


# How a RowBank splits over a one-axis "cands" mesh: along its candidate axis.
ROW_SPECS = RowBank(P(None, None, "cands"), P(None, "cands", None))


def stream_row_bank(state, x_rows, bank: RowBank, n_img: int, k: int, lay: RowLayout):
    wc = len(lay.c_cols)
    size = n_img * wc
    n_chunks = bank.keys.shape[-1] // size

    def get_chunk(j):
        return (jax.lax.dynamic_slice_in_dim(bank.keys, j * size, size, axis=2),
                jax.lax.dynamic_slice_in_dim(bank.values, j * size, size, axis=1))

    return row_stream(state, x_rows, n_chunks, get_chunk, k, lay)


def build_row_bank(images: np.ndarray, k: int, lay: RowLayout, mu: np.ndarray, *, block: int,
                   n_shards: int = 1) -> tuple[RowBank, int]:
    """The row engine's bank of all images and its images per chunk (a power of two), padded
    with absent images to whole chunks × ``n_shards``."""
    n = images.shape[0]
    per_image = len(lay.c_rows) * len(lay.q_cols) * len(lay.c_cols)
    row_images = int(min(geo.pow2_floor(max(1, block // per_image)),
                         1 << int(np.ceil(np.log2(n)))))
    per = row_images * n_shards
    total = -(-n // per) * per
    padded = np.concatenate([images, np.zeros((total - n,) + images.shape[1:], np.float32)])
    log_w = np.where(np.arange(total) < n, 0.0, -np.inf).astype(np.float32)
    make = jax.jit(lambda im, lw: row_candidates(im, lw, k, lay, jnp.asarray(mu)))
    parts = [make(jnp.asarray(padded[s:s + row_images]), jnp.asarray(log_w[s:s + row_images]))
             for s in range(0, total, row_images)]
    return RowBank(jnp.concatenate([p[0] for p in parts], axis=-1),
                   jnp.concatenate([p[1] for p in parts], axis=1)), row_images


def bank_result(x, a, b2, k, lay: RowLayout, bank: RowBank, row_images: int, mu, mesh,
                block: int):
    """(pixels, x̂_0 [B, Hq·Wq, C]) of the main pass from a row bank, optionally with the
    bank split over a one-axis "cands" mesh."""
    bsz, h, w, c = x.shape
    x_rows = row_queries(x, a, b2, k, lay, mu)
    q = x_rows.shape[1]
    n_img = geo.call_chunk(row_images, len(lay.c_rows) * q * len(lay.c_cols), block)
    init = softmax.init((h, q), c)

    def run(x_rows, bank):
        return stream_row_bank(init, x_rows, bank, n_img, k, lay)

    if mesh is not None:
        run = geo.sharded_bank_call(run, mesh, ROW_SPECS)
    return row_pixels(lay, w), row_output(run(x_rows, bank), bsz, lay)


def images_state(x_rows, images, log_w, mu, k, lay: RowLayout, block: int):
    """The main pass's softmax state over [H, B·Wq] with candidates taken from ``images``
    [N, H, W, C] (log weights [N]) a chunk of images at a time (no bank)."""
    h, q = x_rows.shape[:2]
    n, c = images.shape[0], images.shape[-1]
    n_img = int(min(n, max(1, block // max(1, len(lay.c_rows) * q * len(lay.c_cols)))))
    starts, first_new = softmax.chunk_starts(n, n_img)
    rows = jnp.arange(n_img, dtype=jnp.int32)

    def get_chunk(j):
        imgs = jax.lax.dynamic_slice_in_dim(images, starts[j], n_img)
        lw = jax.lax.dynamic_slice_in_dim(log_w, starts[j], n_img)
        return row_candidates(imgs, jnp.where(rows >= first_new[j], lw, -jnp.inf), k, lay, mu)

    return row_stream(softmax.init((h, q), c), x_rows, len(starts), get_chunk, k, lay)

"""The window engine of the ELS machine: one augmented dot product per (query pixel,
candidate window), of length D = k²C + 2 (``els_layout.augment_queries``/``augment_keys``), so
the matmul yields the logits directly; every chunk goes through ``softmax.update_with``.
Cost per pair ∝ k²C.

Candidates come straight from the images, a chunk of images at a time (memory independent of
N: ``window_candidates``, used by ``passes.stream_states``), or from a precomputed ``WindowBank``
(``build_window_bank``): identical windows merged into one candidate whose log-multiplicity is
its log w (exact; large savings on data with blank background), or filled in place without
merging. The window engine also computes the ideal machine (one "window" = the whole image)
and the zero-padded border groups of the streamed path.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.engines import autotune
from els_jax.engines import layout as geo
from els_jax.engines import native
from els_jax.core import patches, softmax
from els_jax.core.data import unit_images

_HI = jax.lax.Precision.HIGHEST


def window_queries(x, a, b2, k, gp: geo.Grouped, mu):
    """Augmented query windows [G, B·Pq, D+2] (group first: the batch axis of the matmuls)."""
    b, h, w, _ = x.shape
    g, pq = gp.query_pixels.shape
    shift = geo.shift_vector(mu, k, gp.query_mode, h, w)
    q = geo.gather_windows(x, k, gp.query_mode, gp.query_pixels.reshape(-1))
    q = geo.augment_queries(q - a[:, None, None] * shift[None, None], a, b2)   # [B, G·Pq, D']
    return jnp.swapaxes(q.reshape(b, g, pq, -1), 0, 1).reshape(g, b * pq, -1)


def window_candidates(images, log_w, k, gp: geo.Grouped, shift):
    """Candidates of ``gp`` from images [n, H, W, C] with log weights [n]:
    augmented keys [G, n·Pc, D+2] and values [G, n·Pc, V]."""
    n, h, w, c = images.shape
    g, pc = gp.cand_pixels.shape
    keys = geo.gather_windows(images, k, gp.cand_mode, gp.cand_pixels.reshape(-1)) - shift[None, None]
    keys = geo.augment_keys(keys.reshape(n, g, pc, -1),
                         jnp.broadcast_to(log_w[:, None, None], (n, g, pc)))
    if gp.cand_mode == "whole":
        values = images.reshape(n, 1, 1, h * w * c)
    else:
        values = images.reshape(n, h * w, c)[:, gp.cand_pixels.reshape(-1)].reshape(n, g, pc, c)

    def by_group(arr):
        return jnp.swapaxes(arr, 0, 1).reshape(g, n * pc, arr.shape[-1])
    return by_group(keys), by_group(values)


def window_update(state, q, keys, values):
    """One chunk into the running softmax. q [G, Q, D'], keys [G, M, D'], values [G, M, V]."""
    if q.shape[0] == 1:         # plain 2-D matmuls: XLA lays them out without transposes
        logits = geo.augmented_logits(geo.matmul_keys, q[0], keys[0])[None]
        return softmax.update_with(
            state, logits, lambda p: jnp.matmul(p[0], values[0], precision=_HI)[None])
    logits = geo.augmented_logits(geo.grouped_matmul_keys, q, keys)
    return softmax.update_with(
        state, logits, lambda p: jnp.einsum("gqm,gmv->gqv", p, values, precision=_HI))


def window_result(gp: geo.Grouped, state, bsz):
    """(pixels [G·Pq] or None for the ideal machine, x̂_0 [B, G·Pq, V])."""
    g, pq = gp.query_pixels.shape
    x0 = softmax.finalize(state).reshape(g, bsz, pq, -1)
    x0 = jnp.swapaxes(x0, 0, 1).reshape(bsz, g * pq, -1)
    return (None if gp.query_mode == "whole" else gp.query_pixels.reshape(-1)), x0


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


# How a WindowBank splits over a one-axis "cands" mesh: along its candidate axis.
WINDOW_SPECS = WindowBank(jax.sharding.PartitionSpec(None, "cands"),
                          jax.sharding.PartitionSpec(None, "cands"))


def _row_projections(u32: np.ndarray) -> np.ndarray:
    """[M, 2] float64: each row's bits (uint32) projected on two fixed random vectors, a
    chunk of rows at a time (equal rows, equal projections; distinct rows essentially never)."""
    weights = np.random.default_rng(0).uniform(1.0, 2.0, size=(u32.shape[1], 2))
    proj = np.empty((len(u32), 2), np.float64)
    step = 1 << 16
    for start in range(0, len(u32), step):
        proj[start:start + step] = u32[start:start + step].astype(np.float64) @ weights
    return proj


def _row_keys(u32: np.ndarray) -> np.ndarray:
    """[M] uint64: the two projections of each row (``_row_projections``) folded into one
    integer (the bits of one XOR the other's rotated). Equal rows, equal keys; a collision of
    distinct rows is caught by ``unique_row_index``'s bitwise check. One 64-bit key sorts ~3×
    faster than the pair as a complex number (900 000 rows: 0.07 against 0.2 s)."""
    bits = np.ascontiguousarray(_row_projections(u32)).view(np.uint64)
    hi = bits[:, 1]
    return bits[:, 0] ^ ((hi << np.uint64(32)) | (hi >> np.uint64(32)))


def count_unique_rows(rows: np.ndarray) -> int:
    """How many distinct rows a float32 [M, F] array holds, from ``unique_rows``' keys alone
    (no bit-for-bit check, no index of each row's group: for estimates)."""
    u32 = np.ascontiguousarray(rows, np.float32).view(np.uint32)
    return len(np.unique(_row_keys(u32)))


def unique_row_index(rows: np.ndarray):
    """(first, counts): the index of each distinct row's first occurrence in a float32 [M, F]
    array (bitwise; in the order of ``unique_rows``) and how often it occurs.

    Each row's bits, read as integers, are projected on two random vectors in float64 (a
    BLAS product, a chunk of rows at a time), folded into one 64-bit key and the keys
    sorted; the grouping is then checked bit for bit against the rows, a chunk at a time (a
    collision, essentially never, falls back to sorting the rows' bytes)."""
    u32 = np.ascontiguousarray(rows, np.float32).view(np.uint32)
    _, first, inverse, counts = np.unique(_row_keys(u32), return_index=True,
                                          return_inverse=True, return_counts=True)
    rep = first[inverse.reshape(-1)]
    step = 1 << 14                  # rows per comparison: the gathered copy stays in cache
    if not all(np.array_equal(u32[s:s + step], u32[rep[s:s + step]])
               for s in range(0, len(u32), step)):                         # a collision
        void = u32.view(np.dtype((np.void, 4 * u32.shape[1]))).reshape(-1)
        _, first, counts = np.unique(void, return_index=True, return_counts=True)
    return first, counts


def unique_rows(rows: np.ndarray):
    """Unique rows of a float32 [M, F] array (bitwise) and how often each occurs
    (``unique_row_index``)."""
    rows = np.ascontiguousarray(rows, np.float32)
    first, counts = unique_row_index(rows)
    return rows[first], counts


def remembered_unique_rows(rows: np.ndarray, source: dict):
    """``unique_rows(rows)``, its row index kept on disk (``autotune.remembered_arrays``) under
    ``source``: fields that determine ``rows`` bit for bit (a hash of the images and μ they
    were cut from, k, the pass). A warm mnist5k run (N = 1000, k = 3 and 5) skips 0.3 s of
    sorting; the rows themselves are cut again (cheap), only the grouping is read back."""
    rows = np.ascontiguousarray(rows, np.float32)

    def compute():
        first, counts = unique_row_index(rows)
        small = np.int32 if len(rows) < 2 ** 31 else np.int64     # half the file
        return {"first": first.astype(small), "counts": counts.astype(small)}

    got = autotune.remembered_arrays("unique_rows", {**source, "rows": list(rows.shape)},
                                     compute)
    first, counts = got["first"], got["counts"]
    if (first.ndim != 1 or first.shape != counts.shape or int(counts.sum()) != len(rows)
            or (len(first) and int(first.max()) >= len(rows))):
        first, counts = unique_row_index(rows)                  # not this data's: recompute
    return rows[first], counts


def host_windows(images: np.ndarray, k: int, mode: str, pixels: np.ndarray) -> np.ndarray:
    """Numpy twin of ``geo.gather_windows`` for building banks (a gather: no per-k compile):
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


def _centred_windows(images: np.ndarray, k: int, mode: str, mu: np.ndarray):
    """The padded images centred on μ (zero padding: padded with zeros, then centred) and
    their k×k windows as a strided view [n, H, W, k, k, C] (window centred at (y, x)), laid
    out (dy, dx, c) as ``patches.extract_windows``."""
    m = k // 2
    pad = "wrap" if mode == "circular" else "constant"
    centred = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode=pad) - mu
    view = np.moveaxis(np.lib.stride_tricks.sliding_window_view(centred, (k, k), axis=(1, 2)),
                       3, -1)
    return centred, view


def _pixel_rect(pix: np.ndarray, w: int):
    """(rows, cols) selecting the flat pixels ``pix`` from an [.., H, W, ..] array: two
    slices when they form a rectangle in row-major order (a strided copy), else index arrays
    (a gather)."""
    rows, cols = np.divmod(pix, w)
    ur, uc = np.unique(rows), np.unique(cols)
    rect = (_as_range(ur), _as_range(uc))
    if None in rect or not np.array_equal(pix, (ur[:, None] * w + uc[None]).reshape(-1)):
        return rows, cols
    return rect


def host_window_rows(images: np.ndarray, k: int, gp: geo.Grouped, gi: int,
                     mu: np.ndarray) -> np.ndarray:
    """Group ``gi``'s candidates as rows [n·Pc, D + V] = [window − μ, value], image-major (as
    ``host_window_candidates``), copied straight from a strided view of the centred images
    (what ``unique_rows`` merges)."""
    n, h, w, c = images.shape
    if gp.cand_mode == "whole":
        keys, values = host_window_candidates(images, k, gp, mu, 64)
        return np.concatenate([keys[gi], values[gi]], axis=1)
    d = k * k * c
    sel = _pixel_rect(gp.cand_pixels[gi], w)
    _, view = _centred_windows(images, k, gp.cand_mode, mu)
    src = view[:, sel[0], sel[1]]                        # [n, rows, cols | Pc, k, k, C]
    out = np.empty(src.shape[:-3] + (d + c,), np.float32)
    win = out[..., :d].reshape(src.shape)     # (splits the last axis only: always a view)
    if not np.shares_memory(win, out):
        raise RuntimeError("internal: the window rows' view became a copy")
    np.copyto(win, src)
    out[..., d:] = images[:, sel[0], sel[1]]
    return out.reshape(-1, d + c)


def host_window_candidates(images, k, gp, mu, images_per_step):
    """All candidates of ``gp`` as numpy: keys [G, N·Pc, D] (mean-shifted), values [G, N·Pc, V]."""
    n, h, w, c = images.shape
    g, pc = gp.cand_pixels.shape
    shift = np.asarray(geo.shift_vector(jnp.asarray(mu), k, gp.cand_mode, h, w))
    keys, values = [], []
    for start in range(0, n, images_per_step):
        im = images[start:start + images_per_step]
        kk = host_windows(im, k, gp.cand_mode, gp.cand_pixels.reshape(-1)) - shift
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


def fill_window_bank(images: np.ndarray, k: int, gp: geo.Grouped, mu: np.ndarray,
                      total: int) -> WindowBank:
    """The window bank of ``gp`` without merging, written once in place: keys [G, total, D+2]
    = [c − μ, ‖c − μ‖²/2, log w] and values [G, total, V], candidates image-major (as
    ``host_window_candidates``), padded with absent candidates (keys 0, log w = −inf).

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
    centred, view = _centred_windows(images, k, gp.cand_mode, mu)   # view [n, H, W, k, k, C]
    sq = np.pad(np.cumsum(np.cumsum((centred.astype(np.float64) ** 2).sum(-1), 1), 2),
                ((0, 0), (1, 0), (1, 0)))
    half_sq = 0.5 * (sq[:, k:, k:] - sq[:, :-k, k:] - sq[:, k:, :-k] + sq[:, :-k, :-k])  # [n, H, W]
    used = n * pc
    for gi in range(g):
        rect = _pixel_rect(gp.cand_pixels[gi], w)
        src = view[:, rect[0], rect[1]]                   # [n, rows, cols | Pc, k, k, C]
        np.copyto(keys[gi, :used, :d].reshape(src.shape[:-3] + (k, k, c)), src)
        keys[gi, :used, d] = half_sq[:, rect[0], rect[1]].reshape(-1)
        keys[gi, :used, d + 1] = 0.0
        values[gi, :used] = images[:, rect[0], rect[1]].reshape(n * pc, v)
    keys[:, used:] = 0.0
    keys[:, used:, d + 1] = -np.inf
    values[:, used:] = 0.0
    return WindowBank(jax.device_put(keys), jax.device_put(values))


def spread_sample(images, m: int):
    """``m`` of ``images`` at evenly spaced indices (all of them when m ≥ N), in their order.

    Why not the first m: data sets come sorted (mnist5k holds its 5000 digits class by class),
    and the first 256 images were all zeros, whose windows merge less than the whole set's
    (k = 5: 0.73 of the windows left against 0.58 over all 5000)."""
    n = len(images)
    if m >= n:
        return images
    return images[np.linspace(0, n - 1, m).round().astype(np.int64)]


def estimate_unique_fraction(images, *, k, boundary="circular", wrap_patches=False,
                             sample=256, ideal=False, first=64, clear=0.97):
    """Fraction of the main pass's candidate windows left after merging duplicates, estimated
    on ``sample`` images spread evenly over the set (``spread_sample``; an upper bound: more
    images hold more duplicates).

    Looks at ``first`` images before: a fraction above ``clear`` there means nothing worth
    merging (natural or random images), and is returned as it is (4× less work for every
    patch size of a machine that will not deduplicate anyway)."""
    samples = {m: np.asarray(unit_images(spread_sample(images, m)), np.float32)
               for m in (first, sample)}

    def fraction(m):
        sub = samples[m]
        n, h, w, _ = sub.shape
        gp = geo.grouped_passes(k, boundary, wrap_patches, h, w, ideal, "window")[0]
        rows = host_window_rows(sub, k, gp, 0, sub.mean(axis=(0, 1, 2)))
        return count_unique_rows(rows) / len(rows)

    def estimate():
        if first < min(sample, len(images)):
            early = fraction(first)
            if early > clear:
                return early
        return fraction(sample)

    # Kept on disk (``autotune.remembered``): a second run on the same data skips it (0.6 s of
    # a warm mnist5k run's 1.2 s ``make_machine``, seven patch sizes). The key hashes the
    # very images the estimate reads.
    digest = hashlib.sha256()
    for m in (first, sample):
        digest.update(np.ascontiguousarray(samples[m]).tobytes())
    fields = {"images": digest.hexdigest()[:24], "shape": list(np.shape(images)), "k": int(k),
              "boundary": boundary, "wrap_patches": bool(wrap_patches), "sample": int(sample),
              "ideal": bool(ideal), "first": int(first), "clear": float(clear), "version": 1}
    return autotune.remembered("unique_fraction", fields, estimate)


def stream_window_bank(state, q, bank: WindowBank, chunk: int):
    """Streams a window bank's chunks into ``state`` (over [G, Q])."""
    n_chunks = bank.keys.shape[1] // chunk

    def body(state, j):
        keys = jax.lax.dynamic_slice_in_dim(bank.keys, j * chunk, chunk, axis=1)
        values = jax.lax.dynamic_slice_in_dim(bank.values, j * chunk, chunk, axis=1)
        return window_update(state, q, keys, values), None

    state, _ = jax.lax.scan(body, state, jnp.arange(n_chunks))
    return state


def build_window_bank(images: np.ndarray, k: int, gp: geo.Grouped, mu: np.ndarray, *,
                      dedup: bool, block: int, n_shards: int = 1, chunk: int | None = None,
                      images_per_step: int = 64) -> tuple[WindowBank, int]:
    """The bank of one batch of groups and its chunk (candidates per streamed chunk, a power
    of two), padded with absent candidates to whole chunks × ``n_shards``.

    dedup: merge identical (window, value) pairs into one candidate of log w = log count;
    otherwise every window once, written in place (``fill_window_bank``)."""
    n, h, w, c = images.shape
    g, pq = gp.query_pixels.shape
    whole = gp.cand_mode == "whole"
    d = c * (h * w if whole else k * k)
    v = h * w * c if whole else c
    if dedup:
        digest = hashlib.sha256(np.ascontiguousarray(images, np.float32).tobytes())
        digest.update(np.ascontiguousarray(mu, np.float32).tobytes())
        source = {"images": digest.hexdigest()[:32], "k": int(k), "mode": gp.cand_mode,
                  "version": 2}
        groups = [remembered_unique_rows(
            host_window_rows(images, k, gp, gi, mu),
            {**source, "group": gi, "pixels": hashlib.sha256(
                np.ascontiguousarray(gp.cand_pixels[gi]).tobytes()).hexdigest()[:16]})
            for gi in range(g)]
        m = max(len(u) for u, _ in groups)
    else:
        m = n * gp.cand_pixels.shape[1]
        if whole:                                   # the ideal machine: one candidate per image
            keys, values = host_window_candidates(images, k, gp, mu, images_per_step)
            groups = [(np.concatenate([keys[0], values[0]], axis=1), np.ones(m))]
    ch = chunk or geo.pow2_floor(max(1, block // (g * pq)))
    ch = int(min(ch, 1 << int(np.ceil(np.log2(max(1, m))))))
    per = ch * n_shards
    total = -(-m // per) * per
    if not dedup and not whole:                     # no merging: filled in place
        return fill_window_bank(images, k, gp, mu, total), ch
    bank_keys = np.zeros((g, total, d + 2), np.float32)
    bank_values = np.zeros((g, total, v), np.float32)
    bank_keys[:, m:, -1] = -np.inf                                      # padding: absent
    for gi, (uniq, counts) in enumerate(groups):
        kk = uniq[:, :d]
        bank_keys[gi, :len(uniq), :d] = kk
        bank_keys[gi, :len(uniq), d] = 0.5 * np.einsum("md,md->m", kk, kk)
        bank_keys[gi, :len(uniq), d + 1] = np.log(counts)
        bank_keys[gi, len(uniq):, d + 1] = -np.inf
        bank_values[gi, :len(uniq)] = uniq[:, d:]
    return WindowBank(jnp.asarray(bank_keys), jnp.asarray(bank_values)), ch


def bank_result(x, a, b2, k, gp: geo.Grouped, bank: WindowBank, chunk: int, mu, mesh,
                block: int, kernel: bool = False):
    """(pixels, x̂_0 [B, G·Pq, V]) of one batch of groups from its bank, optionally with the
    bank split over a one-axis "cands" mesh.

    kernel: compute it with the fused CPU kernel (``native.window_softmax_state``, engine
    "window_native"; one group, the main pass) instead of XLA's matmul, max, exp and matvec
    passes over chunks of logits; the same state to float32 rounding, derivatives from the
    XLA path (``native.with_reference_derivatives``)."""
    bsz = x.shape[0]
    g = gp.query_pixels.shape[0]
    # A chunk holds B·G·Pq logits per candidate and G·(D+2+V) floats of the bank slice
    # (what dominates for the 1-query corner groups): bound both by ``block``.
    per_cand = max(bsz * gp.query_pixels.size,
                   g * (bank.keys.shape[-1] + bank.values.shape[-1]))
    ch = geo.call_chunk(chunk, per_cand, block)
    v = bank.values.shape[-1]

    def run_xla(x, a, b2, mu, bank):
        q = window_queries(x, a, b2, k, gp, mu)
        return stream_window_bank(softmax.init(q.shape[:2], v), q, bank, ch)

    run = run_xla
    if kernel:
        if g != 1:
            raise ValueError("the window kernel computes one group (the main pass)")

        def run_kernel(x, a, b2, mu, bank):
            h, w = x.shape[1:3]
            shift = geo.shift_vector(mu, k, gp.query_mode, h, w)
            q = geo.gather_windows(x, k, gp.query_mode, gp.query_pixels.reshape(-1))
            mx, total, acc = native.window_softmax_state(
                q - a[:, None, None] * shift[None, None], a, b2, bank.keys[0], bank.values[0])
            return softmax.SoftmaxState(mx.reshape(1, -1), total.reshape(1, -1),
                                        acc.reshape(1, -1, v))

        run = native.with_reference_derivatives(run_kernel, run_xla)
    if mesh is not None:
        run = geo.sharded_bank_call(run, mesh, WINDOW_SPECS)
    return window_result(gp, run(x, a, b2, mu, bank), bsz)


def images_state(x, a, b2, images, log_w, mu, k, gp: geo.Grouped, block: int):
    """The softmax state over [G, B·Pq] of one batch of groups with candidates taken from
    ``images`` [N, H, W, C] (log weights [N]) a chunk of images at a time (no bank): at most
    ``block`` logits and 4·``block`` extracted floats per chunk."""
    bsz, h, w, c = x.shape
    n = images.shape[0]
    q = window_queries(x, a, b2, k, gp, mu)
    shift = geo.shift_vector(mu, k, gp.cand_mode, h, w)
    g, pq = gp.query_pixels.shape
    pc = gp.cand_pixels.shape[1]
    n_img = int(min(n, max(1, block // max(1, bsz * g * pq * pc))))
    extract = len(shift) * (g * pc if 4 * g * pc < h * w else h * w)      # floats/image
    n_img = int(min(n_img, max(1, 4 * block // extract)))
    starts, first_new = softmax.chunk_starts(n, n_img)
    rows = jnp.arange(n_img, dtype=jnp.int32)

    def body(state, chunk):
        start, first = chunk
        imgs = jax.lax.dynamic_slice_in_dim(images, start, n_img)
        lw = jax.lax.dynamic_slice_in_dim(log_w, start, n_img)
        keys, values = window_candidates(imgs, jnp.where(rows >= first, lw, -jnp.inf), k, gp,
                                         shift)
        return window_update(state, q, keys, values), None

    v = h * w * c if gp.cand_mode == "whole" else c
    state, _ = jax.lax.scan(body, softmax.init(q.shape[:2], v), (starts, first_new))
    return state

"""The border pixels of the zero-padded ELS machine (docs/theory.md §2, boundary "zeros"), computed
without materialising k×k candidate windows.

With m = k//2, a border pixel is within m of an edge. docs/theory.md §2's rule splits them into:

  - edge pixels, within m of exactly one edge, say at distance d < m from the top edge and at
    an interior column j: the candidates are the zero-padded windows of every training image
    centred at row d and at any interior column j'. Query and candidate windows cover the SAME
    image rows 0 … d+m (the rows above are padding, the same for every candidate: their
    constant part of the logits cancels in the softmax), so with the row dot products

        T[r, j, j'] = Σ_{dx, c} x[r, j+dx, c] · y[r, j'+dx, c]         (r < 2m)

    the window dot product is Σ_{r ≤ d+m} T[r, j, j']: a running sum over the 2m rows of the
    band gives all m edge rows at once. The other three edges are the top edge of the flipped
    or transposed images ("bands"). Per pair that costs ~2·(kC+1) multiply-adds instead of
    k²C, and a band bank holds (kC+1)·2m floats per candidate column instead of k²C per window.
  - corner pixels, within m of two edges: the candidates are the windows at exactly the same
    location, i.e. the local score machine at that pixel. For the corner at distance (d, e)
    from the top-left, the window lies in the image's top-left 2m×2m crop; LS on the crop is
    exact there (the crop's far sides are never reached), so the four corners are LS on four
    flipped 2m×2m crops (``local.local_update``).

Every candidate shift is by the data mean μ (per channel), as in the interior pass, so float32
stays accurate at small t; the softmax of each pixel is over its own candidates only.

Where the fused CPU kernels run (``kernel_border_ok``), the border pixels come instead from
the shift-map kernel (``kernel_border_results``: the same pairs, read straight from the
images, no bank): per axis the zero-padded rule splits into the coordinates within m of a
border (d = 0) and the interior ones (every interior d), and the border pixels are
(border rows × every column) ∪ (interior rows × border columns): two kernel calls. Why: the
bands' and corners' bank (``BorderBank``) took 0.3–0.4 s to build per patch size at N = 1000
(0.74 GB at CIFAR-10's N and k = 3) and its XLA pass 0.45–0.6 s to compile, most of what a
banked zero-padded size cost a one-sample run beyond its calls; the kernel needs neither.
Its derivatives are this module's streamed pass (``stream_border_states``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from els_jax.engines import local, native
from els_jax.core import patches, softmax
from els_jax.core.data import unit_images

__all__ = ["BorderBank", "build_border_bank", "border_states", "border_results",
           "border_partition_specs", "stream_border_states", "kernel_border_ok",
           "border_pixels", "kernel_border_results"]

_HI = jax.lax.Precision.HIGHEST
BANDS = ("top", "bottom", "left", "right")


def _orient(a, band: int):
    """[..., H, W, C] seen so that ``band`` is its top edge (numpy or jax arrays)."""
    if band >= 2:
        a = a.swapaxes(-3, -2)
    if band % 2:
        a = a[..., ::-1, :, :]
    return a


def _crop(a, corner: int, m: int):
    """The 2m×2m crop [..., 2m, 2m, C] at ``corner`` (0 top-left, 1 top-right, 2 bottom-left,
    3 bottom-right), flipped so that the image corner is at the crop's top-left."""
    if corner % 2:
        a = a[..., :, ::-1, :]
    if corner >= 2:
        a = a[..., ::-1, :, :]
    return a[..., :2 * m, :2 * m, :]


def corner_shift(mu, k: int):
    """The corner crops' shift [C, 2m, 2m, 1]: the data mean μ [C] at every pixel of a crop
    (the layout of ``local.LocalBank.mean``)."""
    m = k // 2
    mu = jnp.asarray(mu)
    return jnp.broadcast_to(mu[:, None, None, None], (mu.shape[0], 2 * m, 2 * m, 1))


class BorderBank(NamedTuple):
    """What the border engine precomputes (N' = N padded with absent images).

    band_keys:   4 × [2m, kC+1, N'·L]: augmented row windows [c_row − μ, ‖c_row − μ‖²/2] of
                 the band's 2m rows at its L interior columns, image-major.
    band_values: 4 × [m, N'·L, C]: the candidates' centre pixels (edge rows d = 0 … m−1).
    corners:     a ``local.LocalBank`` stacked over the 4 corners (each field with a leading
                 axis 4), of the 2m×2m crops, shifted by μ.
    log_w:       [N'] log weight per image (0, or −inf = absent).
    """

    band_keys: tuple
    band_values: tuple
    corners: local.LocalBank
    log_w: jax.Array


def _band_candidates(images, k: int, mu):
    """Candidates of the top band of images [n, H, W, C]: keys [2m, kC+1, n·L], values
    [m, n·L, C] (L = W − 2m interior columns)."""
    m = k // 2
    n, _, w, c = images.shape
    cols = np.arange(m, w - m)
    rows = (patches.row_windows(images[:, :2 * m], k, "zeros", cols)
            - jnp.tile(mu, k)[None, None, None])
    keys = jnp.concatenate([rows, 0.5 * jnp.sum(rows * rows, -1, keepdims=True)], -1)
    keys = jnp.transpose(keys, (1, 3, 0, 2)).reshape(2 * m, k * c + 1, n * len(cols))
    values = jnp.transpose(images[:, :m, m:w - m], (1, 0, 2, 3)).reshape(m, n * len(cols), c)
    return keys, values


def _corner_bank(images, k: int, mu):
    """``local.LocalBank`` of the four 2m×2m corner crops, stacked: [4, ...]."""
    m = k // 2
    shift = corner_shift(mu, k)
    banks = [local.build_local_bank(local.transpose_images(_crop(images, q, m)), k=k, mean=shift)
             for q in range(4)]
    return jax.tree.map(lambda *v: jnp.stack(v), *banks)


def _host_band_candidates(images: np.ndarray, k: int, mu: np.ndarray):
    """Numpy twin of ``_band_candidates`` (no compilation per k; norms in float64)."""
    m = k // 2
    n, _, w, c = images.shape
    top = images[:, :2 * m] - mu                                         # [n, 2m, W, C]
    view = np.lib.stride_tricks.sliding_window_view(top, k, axis=2)      # [n, 2m, L, C, k]
    rows = np.moveaxis(view, -1, -2).reshape(n, 2 * m, w - 2 * m, k * c)   # (dx, c), as row_windows
    half = 0.5 * np.einsum("nrld,nrld->nrl", rows, rows, dtype=np.float64)
    keys = np.concatenate([rows, half[..., None].astype(np.float32)], -1)
    keys = keys.transpose(1, 3, 0, 2).reshape(2 * m, k * c + 1, -1)
    values = images[:, :m, m:w - m].transpose(1, 0, 2, 3).reshape(m, -1, c)
    return np.ascontiguousarray(keys), np.ascontiguousarray(values)


def _host_corner_bank(images: np.ndarray, k: int, mu: np.ndarray) -> local.LocalBank:
    """``_corner_bank`` of numpy images: the four corners' crops as one ``local`` bank of
    4·N images (one small compilation per k instead of four), split back per corner."""
    m = k // 2
    n, c = images.shape[0], images.shape[-1]
    crops = np.concatenate([_crop(images, q, m) for q in range(4)])      # [4N, 2m, 2m, C]
    shift = np.broadcast_to(mu[:, None, None, None], (c, 2 * m, 2 * m, 1))
    bank = local.build_local_bank(local.transpose_images(crops), k=k, mean=jnp.asarray(shift))

    def per_corner(a):                                   # [..., 4N] → [4, ..., N]
        return jnp.moveaxis(a.reshape(a.shape[:-1] + (4, n)), -2, 0)
    return local.LocalBank(per_corner(bank.centred_and_ones),
                           jnp.broadcast_to(bank.mean, (4,) + bank.mean.shape),
                           per_corner(bank.half_sq))


def border_bank_floats(n_total: int, k: int, h: int, w: int, c: int) -> int:
    """Floats of ``build_border_bank``'s result for ``n_total`` (padded) images: per band
    (top and bottom of length W − 2m, left and right of length H − 2m) the augmented row
    windows [2m, kC + 1, n·L] and the values [m, n·L, C]; the four corners' local bank
    [C + 1, 2m, 2m, n] and window norms [2m, 2m, n] (at CIFAR-10's N and k = 3, 0.74 GB)."""
    m = k // 2
    bands = sum(2 * m * (k * c + 1) * n_total * length + m * n_total * length * c
                for length in (w - 2 * m, w - 2 * m, h - 2 * m, h - 2 * m))
    return bands + 4 * n_total * (2 * m) ** 2 * (c + 2)


def build_border_bank(images: np.ndarray, k: int, mu, n_total: int) -> BorderBank:
    """The ``BorderBank`` of images [N, H, W, C] padded with absent images to ``n_total``.
    Built in numpy: a machine builds one per patch size, and compiling a builder per k cost
    more than the build."""
    images = np.asarray(unit_images(images), np.float32)
    mu = np.asarray(mu, np.float32)
    n = images.shape[0]
    padded = np.concatenate([images, np.zeros((n_total - n,) + images.shape[1:], np.float32)])
    log_w = np.where(np.arange(n_total) < n, 0.0, -np.inf).astype(np.float32)
    bands = [_host_band_candidates(_orient(padded, b), k, mu) for b in range(4)]
    return BorderBank(tuple(jnp.asarray(kk) for kk, _ in bands),
                      tuple(jnp.asarray(v) for _, v in bands),
                      _host_corner_bank(padded, k, mu), jnp.asarray(log_w))


def border_partition_specs() -> BorderBank:
    """How a BorderBank splits over a one-axis "cands" mesh: along its image axes."""
    lb = local.LocalBank(P(None, None, None, None, "cands"), P(),
                         P(None, None, None, "cands"))
    return BorderBank(tuple(P(None, None, "cands") for _ in BANDS),
                      tuple(P(None, "cands", None) for _ in BANDS), lb, P("cands"))


def _band_queries(x, a, b2, k: int, mu):
    """Augmented query rows of the top band of x [B, H, W, C]: [2m, B·L, kC+1] =
    [(a/b²)·(q − a·μ), −a²/b²]."""
    m = k // 2
    bsz, _, w, c = x.shape
    cols = np.arange(m, w - m)
    q = patches.row_windows(x[:, :2 * m], k, "zeros", cols)
    q = q - a[:, None, None, None] * jnp.tile(mu, k)[None, None, None]
    q = jnp.concatenate([q * (a / b2)[:, None, None, None],
                         jnp.broadcast_to((-(a * a) / b2)[:, None, None, None],
                                          q.shape[:-1] + (1,))], -1)      # [B, 2m, L, kC+1]
    return jnp.transpose(q, (1, 0, 2, 3)).reshape(2 * m, bsz * len(cols), k * c + 1)


def _band_update(state, q, keys, values, lw, m: int):
    """One chunk of band candidates into the state over [m, B·L] (edge row d, query).

    q [2m, Q, kC+1], keys [2m, kC+1, M]. Edge row d sums the row products of rows 0 … d+m:
    rows 0 … m (every d needs them) as ONE matmul of depth (m+1)(kC+1), then the running sum
    adds rows m+1 … 2m−1 one by one (measured 2.6–4× faster than all 2m row products and a
    running sum over them: the row-product matmuls are output-bound)."""
    n_q, n_c = q.shape[1], keys.shape[2]
    run = jnp.matmul(jnp.transpose(q[:m + 1], (1, 0, 2)).reshape(n_q, -1),
                     keys[:m + 1].reshape(-1, n_c), precision=_HI)            # [Q, M], d = 0
    sums = [run]
    if m > 1:
        rest = jnp.einsum("rqd,rdn->rqn", q[m + 1:], keys[m + 1:], precision=_HI)
        for d in range(1, m):
            run = run + rest[d - 1]
            sums.append(run)
    logits = jnp.stack(sums) + lw[None, None, :]
    return softmax.update_with(
        state, logits, lambda p: jnp.einsum("uqn,unc->uqc", p, values, precision=_HI))


def _band_chunk(n_img: int, m: int, q_len: int, length: int, block: int) -> int:
    return int(max(1, min(n_img, block // max(1, 2 * m * q_len * length))))


def band_chunk_images(n: int, k: int, h: int, w: int, block: int) -> int:
    """Images per chunk of a BorderBank's bands for one query image: a power of two (calls
    with B > 1 halve it), at most the next power of two ≥ n. Banks are padded to multiples."""
    m = k // 2
    length = max(h, w) - 2 * m
    per = max(1, block // max(1, 2 * m * length * length))
    return min(1 << (per.bit_length() - 1), 1 << int(np.ceil(np.log2(max(1, n)))))


def _corner_queries(x, a, k: int, shift):
    m = k // 2
    return jnp.stack([local.local_queries(_crop(x, q, m), a, shift) for q in range(4)])


def border_states(x, a, b2, bank: BorderBank, *, k: int, mu, block: int, band_images: int):
    """Softmax states of the border pixels from a ``BorderBank``: (4 band states [m, B·L],
    the corner state [4, B, 2m, 2m] of which [:, :, :m, :m] are the corner pixels).
    a, b2: [B]; band_images: the bank's chunk (``band_chunk_images``; divides its N')."""
    m = k // 2
    n = bank.log_w.shape[0]
    out = []
    for b in range(4):
        xb = _orient(x, b)
        q = _band_queries(xb, a, b2, k, mu)
        length = xb.shape[2] - 2 * m
        n_img = band_images
        while n_img > 1 and 2 * m * q.shape[1] * length * n_img > block:
            n_img //= 2                       # a power of two dividing the bank's image count
        n_chunks = n // n_img
        keys, values = bank.band_keys[b], bank.band_values[b]
        size = n_img * length

        def body(state, j, keys=keys, values=values, q=q, size=size, length=length,
                 n_img=n_img):
            kk = jax.lax.dynamic_slice_in_dim(keys, j * size, size, axis=2)
            vv = jax.lax.dynamic_slice_in_dim(values, j * size, size, axis=1)
            lw = jnp.repeat(jax.lax.dynamic_slice_in_dim(bank.log_w, j * n_img, n_img), length)
            return _band_update(state, q, kk, vv, lw, m), None

        init = softmax.init((m, q.shape[1]), x.shape[3])
        state, _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
        out.append(state)
    a4, b24 = a[:, None, None, None], b2[:, None, None, None]
    qc = _corner_queries(x, a4, k, bank.corners.mean[0])

    def corner(qq, lbank):                    # block / 4: the four corners run side by side
        return local._local_bank_state_q(qq, a4, b24, lbank, bank.log_w, k, max(1, block // 4))
    corners = jax.vmap(corner)(qc, bank.corners)
    return tuple(out), corners


def stream_border_states(x, a, b2, images, log_w, *, k: int, mu, block: int):
    """``border_states`` with candidates computed from images [N, H, W, C] chunk by chunk
    (memory independent of N): band row windows and corner crops of each chunk."""
    m = k // 2
    bsz, h, w, c = x.shape
    n = images.shape[0]
    out = []
    for b in range(4):
        xb = _orient(x, b)
        q = _band_queries(xb, a, b2, k, mu)
        length = xb.shape[2] - 2 * m
        n_img = int(min(n, _band_chunk(n, m, q.shape[1], length, block)))
        starts, first_new = softmax.chunk_starts(n, n_img)
        rows = jnp.arange(n_img, dtype=jnp.int32)

        def body(state, chunk, b=b, q=q, n_img=n_img, rows=rows, length=length):
            start, first = chunk
            imgs = _orient(jax.lax.dynamic_slice_in_dim(images, start, n_img), b)
            lw = jnp.where(rows >= first, jax.lax.dynamic_slice_in_dim(log_w, start, n_img),
                           -jnp.inf)
            keys, values = _band_candidates(imgs, k, mu)
            return _band_update(state, q, keys, values, jnp.repeat(lw, length), m), None

        state, _ = jax.lax.scan(body, softmax.init((m, q.shape[1]), c), (starts, first_new))
        out.append(state)
    a4, b24 = a[:, None, None, None], b2[:, None, None, None]
    shift = corner_shift(mu, k)
    qc = _corner_queries(x, a4, k, shift)
    n_img = local._images_per_chunk(n, 4 * bsz * 4 * m * m, block)
    starts, first_new = softmax.chunk_starts(n, n_img)
    rows = jnp.arange(n_img, dtype=jnp.int32)

    def corner_body(states, chunk):
        start, first = chunk
        imgs = jax.lax.dynamic_slice_in_dim(images, start, n_img)
        lw = jnp.where(rows >= first, jax.lax.dynamic_slice_in_dim(log_w, start, n_img),
                       -jnp.inf)
        new = []
        for qi in range(4):
            cb = local.build_local_bank(local.transpose_images(_crop(imgs, qi, m)), k=k,
                                        mean=shift)
            st = jax.tree.map(lambda v: v[qi], states)
            new.append(local.local_update(st, qc[qi], a4, b24, cb.centred_and_ones,
                                          cb.half_sq, lw, k))
        return jax.tree.map(lambda *v: jnp.stack(v), *new), None

    init = jax.tree.map(lambda v: jnp.stack([v] * 4), softmax.init((bsz, 2 * m, 2 * m), c))
    corners, _ = jax.lax.scan(corner_body, init, (starts, first_new))
    return tuple(out), corners


def border_results(states, x_shape, k: int, mu_corner):
    """(pixels, x̂_0 [B, P, C]) pairs for ``els_layout.scatter`` from ``border_states``' output.
    mu_corner: the corner banks' shift [C, 2m, 2m, 1] (added back to their means)."""
    bands, corners = states
    bsz, h, w, c = x_shape
    m = k // 2
    results = []
    for b, st in enumerate(bands):
        hh, ww = (h, w) if b < 2 else (w, h)
        length = ww - 2 * m
        d = np.arange(m)[:, None]
        j = np.arange(m, ww - m)[None, :]
        row = d if b % 2 == 0 else hh - 1 - d                   # in the oriented frame
        rr, cc = (row, j) if b < 2 else (j, row)                # back to the image frame
        pixels = (np.broadcast_to(rr, (m, length)) * w + np.broadcast_to(cc, (m, length)))
        x0 = softmax.finalize(st).reshape(m, bsz, length, c)
        x0 = jnp.transpose(x0, (1, 0, 2, 3)).reshape(bsz, m * length, c)
        results.append((pixels.reshape(-1), x0))
    shift = jnp.transpose(mu_corner[..., 0], (1, 2, 0))[:m, :m]           # [m, m, C]
    x0 = softmax.finalize(jax.tree.map(lambda v: v[:, :, :m, :m], corners)) + shift[None, None]
    d = np.arange(m)
    for q in range(4):
        rr = d if q < 2 else h - 1 - d
        cc = d if q % 2 == 0 else w - 1 - d
        pixels = (rr[:, None] * w + cc[None, :]).reshape(-1)
        results.append((pixels, x0[q].reshape(bsz, m * m, c)))
    return results


def kernel_border_ok(n_shards: int = 1) -> bool:
    """Whether a machine's border pixels run on the shift-map CPU kernel
    (``kernel_border_results``) rather than a ``BorderBank``: the default backend a CPU, the
    kernels built, the candidates on one device (a mesh keeps the bank, split over it)."""
    return n_shards == 1 and jax.default_backend() == "cpu" and native.available()


def border_pixels(h: int, w: int, k: int) -> np.ndarray:
    """Flat indices (row-major) of the pixels within k//2 of an edge, in row-major order."""
    m = k // 2
    inner = np.zeros((h, w), bool)
    inner[m:h - m, m:w - m] = True
    return np.flatnonzero(~inner)


# The shift-map kernel's per-axis pair rules (native_local.cc ``axis_shifts``): 1 the
# zero-padded rule, 4 its coordinates within m of a border only, 5 its interior ones only.
_ZEROS, _EDGE, _INNER = 1, 4, 5


def kernel_border_results(x, a, b2, images, log_w, *, k: int, mu, block: int):
    """[(pixels [P], x̂_0 [B, P, C])] of the border pixels (``border_pixels``), for
    ``layout.scatter``, from the shift-map kernel on a CPU and from ``stream_border_states``
    elsewhere; derivatives from the latter. x [B, H, W, C]; a, b2 [B]; images [N, H, W, C]
    float32 or uint8 pixels (as the machine holds them); log_w [N]; mu [C] the data mean (the
    streamed pass's exact shift)."""
    bsz, h, w, c = x.shape
    pixels = border_pixels(h, w, k)

    def fast(x, a, b2, images, log_w, mu):
        edge_rows = native.shiftmap_softmax_state(x, a, b2, images, log_w, k, _EDGE,
                                                  mode_x=_ZEROS)
        edge_cols = native.shiftmap_softmax_state(x, a, b2, images, log_w, k, _INNER,
                                                  mode_x=_EDGE)
        state = softmax.merge(softmax.SoftmaxState(*edge_rows),
                              softmax.SoftmaxState(*edge_cols))      # disjoint pixels
        return softmax.finalize(state).reshape(bsz, h * w, c)[:, pixels]

    def streamed(x, a, b2, images, log_w, mu):
        states = stream_border_states(x, a, b2, unit_images(images), log_w, k=k, mu=mu,
                                      block=block)
        parts = border_results(states, x.shape, k, corner_shift(mu, k))
        order = np.argsort(np.concatenate([p for p, _ in parts]))   # → border_pixels' order
        return jnp.concatenate([v for _, v in parts], axis=1)[:, order]

    mu = jnp.asarray(mu, jnp.float32)
    values = native.with_reference_derivatives(native.kernel_on_cpu(fast, streamed), streamed)(
        x, a, b2, images, log_w.astype(jnp.float32), mu)
    return [(pixels, values)]

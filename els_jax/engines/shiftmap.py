"""The shift-map engine of the patch machines (docs/theory.md §9, issue 23): exact, and its cost per
(query pixel, candidate) pair does not grow with k²·C.

For one training image y and one shift d = j − i (query pixel i, candidate centre j),

    f_d(p) = Σ_c (x(p) − a·y(p + d))²,        ‖q_i − a·c_j‖² = (box_k f_d)(i),

with x extended as the query is (wrapped for "circular", zeros for "zeros" and for LS) and y
as the candidate is. The logit of the pair is −(box_k f_d)(i)/(2b²) + log w(image), its value
y(i + d) (all C channels), and the softmax runs over ALL candidates (every image, every allowed
d) per query image and per pixel, streamed through ``core.softmax``'s online log-sum-exp.

Which pairs exist (docs/theory.md §2), per axis of length n, m = k//2:

  "local" (LS)        d = 0 for every i; windows cut at the border = both x and y zero-extended.
  "zeros" (ELS)       a coordinate i within m of a border pairs only with j = i (d = 0, zero
                      padded); an interior i with every interior j. k ≥ min(H, W) is LS.
  "circular" (ELS)    every i (the query wraps) with every j whose window lies inside the image
                      (m ≤ j < n − m); with ``wrap_patches`` every j (the candidate wraps too).
                      Shifts are taken modulo n: f_d is periodic and its box sum wraps.

A 2-D pair exists iff it exists along both axes, so the shifts are the product of the per-axis
shift lists and the valid query pixels of one shift the product of per-axis masks.

Two forms, one function (``shiftmap_state``):

- the plain-jnp form (``shiftmap_state_xla``, any backend): a ``lax.scan`` over chunks of
  images (memory O(chunk): never all N·(#shifts)·H·W logits at once) and, inside, a scan over
  the shifts; per shift the map f_d of a chunk, its k×k box sums, the logits and one softmax
  update. Its plainest variant (``_state_xla``, used for "wrap") maps the whole
  (H+2m)×(W+2m) extended query frame and masks absent pairs with −inf; "circular" works in
  the candidates' frame (the query rolled by d against the images as they are, only the
  interior centres' pairs, their query pixels' states gathered and scattered back) and
  "local"/"zeros" per group of shifts with one output range each (d = 0: every coordinate;
  d ≠ 0: the interior), so that only existing pairs (up to the zero rule's own mask) take an
  exponential. The tests hold each to the masked variant and all to the float64 oracles.
- the fused C++ CPU kernel (``native.shiftmap_softmax_state``, ``native_local.cc``), chosen by
  ``native.kernel_on_cpu`` on CPU when the kernels build; its derivatives are those of
  the jnp form (``native.with_reference_derivatives``).
- the Pallas kernel (``shiftmap_pallas.py``) for GPUs and TPUs: off the CPU, "auto" runs
  whichever of it and the jnp form a probe on the device measures faster
  (``accelerator_form``; a kernel that fails to lower there is dropped). On the CPU it runs
  only when asked (engine="pallas"), in Pallas's interpreter: that is how it is tested.

The machines reach this engine through ``passes.stream_x0(method="shiftmap")``, which takes
the values from here and the derivatives from the window engine (tested against the
reference; one matmul per chunk differentiates faster than this form's per-shift scan). The
jnp form's own derivatives are exact too (tests/test_autodiff.py): under jit its forward mode
once gave NaN tangents, from differentiating the softmax's running max (XLA computed the
logits twice, rounded differently, so no logit equalled the max and the max's tangent divided
by a count of 0); ``core.softmax`` now holds the max constant under differentiation.

Precision (docs/theory.md §9). The box sums add nonnegative terms only: no prefix sum and no
subtraction, so a window's sum carries a relative rounding error of a few float32 ulps of its
own value, whatever the values elsewhere in the row (a float32 prefix sum instead carries an
absolute error ~ulp of the row's running total, ~1e-4 at totals of 10³, which is tens of nats
at t = 0.01). The jnp form sums a window of k terms by binary decomposition (windows of 1, 2,
4, … terms added side by side: ⌈log₂ k⌉ + popcount(k) additions per output and axis); the
kernel by van Herk / Gil-Werman partial sums (in-segment prefix and suffix sums, restarted
every k terms: three additions per output and axis, whatever k). Each squared difference
x − a·y is formed directly, so nothing cancels when q ≈ a·c (which the expanded matmul form
‖q‖² − 2a⟨q, c⟩ + a²‖c‖² suffers); centring on the data mean would add a rounding, not remove
one, and is not done. The logit is the full distance (no per-query constant dropped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core import softmax
from els_jax.core.validation import check_patch_size
from els_jax.core.data import held_images, unit_images
from els_jax.engines import native
from els_jax.engines.shiftplan import axis_plan
from els_jax.engines.shiftplan import geometry as _geometry

__all__ = ["shiftmap_state", "shiftmap_state_xla", "shiftmap_x0", "axis_plan", "pair_count",
           "pair_logits", "accelerator_form",
           "resolve_kind", "KINDS", "ENGINES", "MODES", "DEFAULT_BLOCK"]

_HI = jax.lax.Precision.HIGHEST

KINDS = ("els", "local")
ENGINES = ("auto", "kernel", "xla", "pallas")
# The pair rule of one call, after LS fall-backs; its index is the kernel's ``mode``.
MODES = ("local", "zeros", "circular", "wrap")

# Floats of the largest per-step array of the jnp form (B × chunk × (H+2m) × (W+2m) × C):
# 2^20 = 4 MiB, large enough to amortise a scan step, small enough for the caches.
DEFAULT_BLOCK = 1 << 20


def resolve_kind(kind: str, k: int, h: int, w: int, boundary: str,
                 wrap_patches: bool) -> str:
    """The pair rule (one of ``MODES``) of machine ``kind`` ("els" | "local") with patch size
    k on H×W images, with docs/theory.md §2's checks: "zeros" with k ≥ min(H, W) is LS."""
    k = check_patch_size(k, h, w)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    if kind == "local":
        return "local"
    if boundary == "circular":
        if k > min(h, w):
            raise ValueError(f"patch size k={k} is larger than the {h}×{w} image (a circular "
                             "window would cover pixels twice, or none lies inside)")
        return "wrap" if wrap_patches else "circular"
    if boundary != "zeros":
        raise ValueError(f"unknown boundary {boundary!r}; choose 'circular' or 'zeros'")
    if k > 2 * max(h, w) - 1:
        raise ValueError(f"patch size k={k} exceeds 2·max(H, W) − 1 = {2 * max(h, w) - 1}")
    return "local" if k >= min(h, w) else "zeros"


def pair_count(h: int, w: int, k: int, mode: str) -> int:
    """Existing (query pixel, candidate centre) pairs of one query image and one training
    image under pair rule ``mode``: the per-axis counts multiplied."""
    return int(axis_plan(h, k, mode)[1].sum()) * int(axis_plan(w, k, mode)[1].sum())


def _box1d(f, k: int, axis: int):
    """Valid k-window sums along ``axis``: out[i] = Σ_{δ<k} f[i + δ], length len − k + 1.
    Binary decomposition: windows of 1, 2, 4, … terms, each the sum of two halves, and the
    windows of k's set bits added side by side. Only additions of the (nonnegative) terms."""
    n_out = f.shape[axis] - k + 1

    def take(v, start, length):
        return jax.lax.slice_in_dim(v, start, start + length, axis=axis)

    out, off, width, s = None, 0, 1, f
    while True:
        if k & width:
            part = take(s, off, n_out)
            out = part if out is None else out + part
            off += width
        if 2 * width > k:
            return out
        length = s.shape[axis] - width
        s = take(s, 0, length) + take(s, width, length)
        width *= 2


def _extend(img, m: int, lo_y: int, hi_y: int, lo_x: int, hi_x: int, periodic: bool):
    """[..., H, W, C] padded by (m + lo, m + hi) rows and columns: wrapped or zeros."""
    widths = [(0, 0)] * (img.ndim - 3) + [(m + lo_y, m + hi_y), (m + lo_x, m + hi_x), (0, 0)]
    return jnp.pad(img, widths, mode="wrap" if periodic else "constant")


def _images_per_chunk(n: int, per_image: int, block: int) -> int:
    """Images per scan step: a power of two (few distinct compiled shapes), at most n."""
    want = max(1, block // max(1, per_image))
    return max(1, min(n, 1 << (want.bit_length() - 1)))


def _shift_logits(x_ext, y_d, a5, scale, lw, valid_y, valid_x, k: int):
    """The logits of one shift d: x_ext [B, H+2m, W+2m, C] the extended queries, y_d [n, H+2m,
    W+2m, C] the images read at p + d (extended as the candidates are), a5 [B, 1, 1, 1, 1],
    scale = −1/(2b²) [B, 1, 1, 1], lw [1, 1, 1, n], valid_y [H], valid_x [W] (which query
    rows / columns pair at this shift). Returns [B, H, W, n], −inf where no pair exists."""
    diff = x_ext[:, None] - a5 * y_d[None]                               # [B, n, H+2m, W+2m, C]
    f = jnp.sum(diff * diff, axis=-1)
    box = _box1d(_box1d(f, k, 2), k, 3)                                  # [B, n, H, W]
    logits = jnp.transpose(box, (0, 2, 3, 1)) * scale + lw               # [B, H, W, n]
    valid = valid_y[:, None] & valid_x[None, :]
    return jnp.where(valid[None, :, :, None], logits, -jnp.inf)


def pair_logits(x, a, b2, images, log_w=None, *, k: int, boundary: str = "circular",
                wrap_patches: bool = False, kind: str = "els"):
    """Every logit of the jnp form at once, for tests on tiny inputs: (logits [B, S, N, H, W]
    (−inf where the pair does not exist), dy [S], dx [S]): shift s pairs query pixel (i, j)
    with candidate centre (i + dy[s], j + dx[s]) (mod H, W for "circular")."""
    x, a, b2, images, log_w = _prepare(x, a, b2, images, log_w)
    _check(x, images, log_w)
    images = jnp.asarray(unit_images(images), jnp.float32)
    bsz, h, w, c = x.shape
    mode = resolve_kind(kind, k, h, w, boundary, bool(wrap_patches))
    m = k // 2
    periodic = mode in ("circular", "wrap")
    dy, dx, oy, ox, vy, vx, pads = _geometry(h, w, k, mode)
    x_ext = _extend(x, m, 0, 0, 0, 0, periodic)
    y_big = _extend(images, m, *pads, periodic)
    a5, scale = a.reshape(bsz, 1, 1, 1, 1), (-0.5 / b2).reshape(bsz, 1, 1, 1)
    out = []
    for s in range(len(dy)):
        y_d = y_big[:, oy[s]:oy[s] + h + 2 * m, ox[s]:ox[s] + w + 2 * m]
        lg = _shift_logits(x_ext, y_d, a5, scale, log_w[None, None, None, :],
                           jnp.asarray(vy[s]), jnp.asarray(vx[s]), k)
        out.append(jnp.transpose(lg, (0, 3, 1, 2)))
    return jnp.stack(out, axis=1), dy, dx


def _over_chunks(state, images, log_w, n_img: int, step):
    """Streams the images ``n_img`` at a time: ``step(state, imgs [n_img, H, W, C], lw
    [1, 1, 1, n_img]) -> state``. The last chunk starts early enough to be whole; the images
    it repeats get log weight −inf (absent)."""
    starts, first_new = softmax.chunk_starts(images.shape[0], n_img)
    rows = jnp.arange(n_img, dtype=jnp.int32)

    def chunk_body(state, chunk):
        start, first = chunk
        imgs = unit_images(jax.lax.dynamic_slice_in_dim(images, start, n_img))  # uint8: here
        lw = jax.lax.dynamic_slice_in_dim(log_w, start, n_img)
        return step(state, imgs, jnp.where(rows >= first, lw, -jnp.inf)[None, None, None, :]), None

    return jax.lax.scan(chunk_body, state, (starts, first_new))[0]


def _update_at(state, index, logits, values):
    """``state`` with its query pixels ``index`` (an index of [B, H, W]; None: all of them)
    updated by one shift's logits [B, h, w, n] and values y(i + d) [n, h, w, C]."""
    def weighted_sum(p):
        return jnp.einsum("bhwn,nhwc->bhwc", p, values, precision=_HI)
    if index is None:
        return softmax.update_with(state, logits, weighted_sum)
    sub = softmax.SoftmaxState(state.max[index], state.total[index], state.acc[index])
    new = softmax.update_with(sub, logits, weighted_sum)
    return softmax.SoftmaxState(state.max.at[index].set(new.max),
                                state.total.at[index].set(new.total),
                                state.acc.at[index].set(new.acc))


@functools.partial(jax.jit, static_argnames=("k", "mode", "block"))
def _state_xla(x, a, b2, images, log_w, *, k, mode, block):
    bsz, h, w, c = x.shape
    n = images.shape[0]
    m = k // 2
    periodic = mode in ("circular", "wrap")
    # Every shift pair (dy, dx), flattened; the valid query pixels of shift s are the outer
    # product vy[s] × vx[s].
    _, _, oy, ox, vy, vx, (lo_y, hi_y, lo_x, hi_x) = _geometry(h, w, k, mode)
    hx, wx = h + 2 * m, w + 2 * m
    xs = (jnp.asarray(oy, jnp.int32), jnp.asarray(ox, jnp.int32), jnp.asarray(vy),
          jnp.asarray(vx))

    x_ext = _extend(x, m, 0, 0, 0, 0, periodic)                        # [B, H+2m, W+2m, C]
    a5 = a.reshape(bsz, 1, 1, 1, 1)
    scale = (-0.5 / b2).reshape(bsz, 1, 1, 1)
    n_img = _images_per_chunk(n, bsz * hx * wx * c, block)

    def step(state, imgs, lw):
        y_big = _extend(imgs, m, lo_y, hi_y, lo_x, hi_x, periodic)

        @jax.checkpoint
        def shift_body(state, s):
            oy, ox, valid_y, valid_x = s
            y_d = jax.lax.dynamic_slice(y_big, (0, oy, ox, 0), (n_img, hx, wx, c))
            logits = _shift_logits(x_ext, y_d, a5, scale, lw, valid_y, valid_x, k)
            values = y_d[:, m:m + h, m:m + w, :]                         # y(i + d), [n, H, W, C]
            return _update_at(state, None, logits, values), None

        return jax.lax.scan(shift_body, state, xs)[0]

    return _over_chunks(softmax.init((bsz, h, w), c), images, log_w, n_img, step)


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _state_xla_inside(x, a, b2, images, log_w, *, k, block):
    """``_state_xla`` for "circular" without wrap_patches, in the candidates' frame: for the
    shift d (mod H, W), g(q) = Σ_c (x(q − d) − a·y(q))² over the H×W image (the query rolled
    by d, the images as they are: their windows lie inside), its valid box sums give the
    distances of the (H−2m)(W−2m) interior candidate centres j to the query pixels
    i = j − d (mod H, W), whose states are gathered, updated and scattered back. Only the
    existing pairs take an exponential (the query-frame form would mask (H·W)/((H−2m)(W−2m))
    times more: 28× at k = 27 on 32×32)."""
    bsz, h, w, c = x.shape
    n = images.shape[0]
    m = k // 2
    ly, lx = h - 2 * m, w - 2 * m
    dy, dx = np.divmod(np.arange(h * w), w)
    cy, cx = np.arange(m, h - m), np.arange(m, w - m)
    xs = (jnp.asarray(dy, jnp.int32), jnp.asarray(dx, jnp.int32))
    x2 = jnp.tile(x, (1, 2, 2, 1))                                        # x2[q + n] = x(q)
    a5 = a.reshape(bsz, 1, 1, 1, 1)
    scale = (-0.5 / b2).reshape(bsz, 1, 1, 1)
    n_img = _images_per_chunk(n, bsz * h * w * c, block)
    assert ly >= 1 and lx >= 1

    def step(state, imgs, lw):
        values = imgs[:, m:h - m, m:w - m, :]                             # y(j), [n, Ly, Lx, C]

        @jax.checkpoint
        def shift_body(state, s):
            sy, sx = s
            xr = jax.lax.dynamic_slice(x2, (0, h - sy, w - sx, 0), (bsz, h, w, c))
            diff = xr[:, None] - a5 * imgs[None]                          # [B, n, H, W, C]
            f = jnp.sum(diff * diff, axis=-1)
            box = _box1d(_box1d(f, k, 2), k, 3)                           # [B, n, Ly, Lx]
            logits = jnp.transpose(box, (0, 2, 3, 1)) * scale + lw        # [B, Ly, Lx, n]
            iy = ((jnp.asarray(cy, jnp.int32) - sy) % h)[:, None]         # query pixels i
            ix = ((jnp.asarray(cx, jnp.int32) - sx) % w)[None, :]
            return _update_at(state, (slice(None), iy, ix), logits, values), None

        return jax.lax.scan(shift_body, state, xs)[0]

    return _over_chunks(softmax.init((bsz, h, w), c), images, log_w, n_img, step)


def _axis_groups(n: int, k: int, mode: str):
    """The shifts of a zero-extended rule ("local", "zeros") along one axis, in groups of one
    output range: (shifts [S], first output coordinate, outputs, valid [S, outputs]). d = 0
    pairs every coordinate (outputs 0 … n−1, the map zero-extended by m); d ≠ 0 ("zeros")
    only interior coordinates with interior i + d (outputs m … n−m−1, the map inside)."""
    m = k // 2
    groups = [(np.zeros(1, np.int64), 0, n, np.ones((1, n), bool))]
    inner = n - 2 * m
    if mode == "zeros" and inner > 1:
        d = np.array([v for v in range(-(inner - 1), inner) if v != 0])
        i = np.arange(m, n - m)
        j = i[None, :] + d[:, None]
        groups.append((d, m, inner, (j >= m) & (j < n - m)))
    return groups


@functools.partial(jax.jit, static_argnames=("k", "mode", "block"))
def _state_xla_padded(x, a, b2, images, log_w, *, k, mode, block):
    """``_state_xla`` for the zero-extended rules ("local", "zeros"), one scan per pair of
    per-axis groups (``_axis_groups``), each over the output range it can pair: the map of a
    shift covers only that range ± m, and only pairs of that range take an exponential (the
    masked query-frame form computes (H+2m)(W+2m) map terms and H·W exponentials per shift)."""
    bsz, h, w, c = x.shape
    n = images.shape[0]
    m = k // 2
    gy, gx = _axis_groups(h, k, mode), _axis_groups(w, k, mode)
    # y padded by m + the largest |d| (zeros): y_d(p) = y(p + d) at p + d + pad.
    pad_y = m + max(int(np.abs(g[0]).max()) for g in gy)
    pad_x = m + max(int(np.abs(g[0]).max()) for g in gx)
    x_pad = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)))
    a5 = a.reshape(bsz, 1, 1, 1, 1)
    scale = (-0.5 / b2).reshape(bsz, 1, 1, 1)
    n_img = _images_per_chunk(n, bsz * (h + 2 * m) * (w + 2 * m) * c, block)

    def step(state, imgs, lw):
        y_big = jnp.pad(imgs, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)))
        for sy, y0, ny, vy in gy:
            for sx, x0, nx, vx in gx:
                ey, ex = ny + 2 * m, nx + 2 * m                   # map extent: outputs ± m
                x_ext = x_pad[:, y0:y0 + ey, x0:x0 + ex]
                iy, ix = np.divmod(np.arange(len(sy) * len(sx)), len(sx))
                xs = (jnp.asarray(sy[iy] + y0 - m + pad_y, jnp.int32),
                      jnp.asarray(sx[ix] + x0 - m + pad_x, jnp.int32),
                      jnp.asarray(vy[iy]), jnp.asarray(vx[ix]))

                @jax.checkpoint
                def shift_body(state, s, x_ext=x_ext, ey=ey, ex=ex, y0=y0, ny=ny, x0=x0, nx=nx):
                    oy, ox, valid_y, valid_x = s
                    y_d = jax.lax.dynamic_slice(y_big, (0, oy, ox, 0), (n_img, ey, ex, c))
                    logits = _shift_logits(x_ext, y_d, a5, scale, lw, valid_y, valid_x, k)
                    values = y_d[:, m:m + ny, m:m + nx, :]                # y(i + d)
                    index = (slice(None), slice(y0, y0 + ny), slice(x0, x0 + nx))
                    return _update_at(state, index, logits, values), None

                state, _ = jax.lax.scan(shift_body, state, xs)
        return state

    return _over_chunks(softmax.init((bsz, h, w), c), images, log_w, n_img, step)


def _xla_form(mode: str):
    """The jnp form for pair rule ``mode``: f(x, a, b2, images, log_w, *, k, block). Every
    rule has the masked query-frame form (``_state_xla``); the rules whose pairs cover only
    part of the query frame per shift run leaner equivalents of it."""
    if mode == "circular":
        return _state_xla_inside
    if mode in ("local", "zeros"):
        return functools.partial(_state_xla_padded, mode=mode)
    return functools.partial(_state_xla, mode=mode)


def _prepare(x, a, b2, images, log_w):
    x = jnp.asarray(x, jnp.float32)
    bsz = x.shape[0]
    a = jnp.broadcast_to(jnp.asarray(a, jnp.float32), (bsz,))
    b2 = jnp.broadcast_to(jnp.asarray(b2, jnp.float32), (bsz,))
    images = held_images(images)                  # uint8 pixels stay uint8: read per chunk
    if log_w is None:
        log_w = jnp.zeros((images.shape[0],), jnp.float32)
    return x, a, b2, images, jnp.asarray(log_w, jnp.float32)


def _check(x, images, log_w):
    if x.ndim != 4 or images.ndim != 4 or tuple(x.shape[1:]) != tuple(images.shape[1:]):
        raise ValueError(f"expected x [B, H, W, C] and images [N, H, W, C] of the same H, W, "
                         f"C; got {x.shape} and {images.shape}")
    if log_w.shape != (images.shape[0],):
        raise ValueError(f"log_w must be [N] = [{images.shape[0]}]; got {log_w.shape}")


def shiftmap_state_xla(x, a, b2, images, log_w=None, *, k: int, boundary: str = "circular",
                       wrap_patches: bool = False, kind: str = "els",
                       block: int = DEFAULT_BLOCK) -> softmax.SoftmaxState:
    """``shiftmap_state`` by the plain-jnp form only (any backend)."""
    x, a, b2, images, log_w = _prepare(x, a, b2, images, log_w)
    _check(x, images, log_w)
    mode = resolve_kind(kind, k, x.shape[1], x.shape[2], boundary, bool(wrap_patches))
    return _xla_form(mode)(x, a, b2, images, log_w, k=int(k), block=int(block))


def shiftmap_state(x, a, b2, images, log_w=None, *, k: int, boundary: str = "circular",
                   wrap_patches: bool = False, kind: str = "els", block: int = DEFAULT_BLOCK,
                   engine: str = "auto") -> softmax.SoftmaxState:
    """The softmax state (``core.softmax.SoftmaxState``: max [B, H, W], total [B, H, W],
    acc [B, H, W, C]) of every query pixel over every existing candidate of the patch machine.

    Args:
      x: queries [B, H, W, C].
      a, b2: the coefficients a = sqrt(ᾱ), b² = 1 − ᾱ, one per query image [B] (or scalars);
        b² as the machine floors it (not floored here).
      images: training images [N, H, W, C]: floats (read as float32), or uint8 pixels, held
        as uint8 and read as (u − 127.5)/127.5 a chunk at a time (docs/theory.md §9).
      log_w: log prior weight per image [N] (−inf = absent: class masks); default 0.
      k: odd patch size.
      boundary: "circular" or "zeros" (ELS; ignored for kind "local").
      wrap_patches: circular only: also the candidate windows that wrap around.
      kind: "els" or "local" (LS: same-location windows cut at the border).
      block: floats of the jnp form's largest per-step array (memory knob only).
      engine: "auto" (the fused kernel on CPU when it builds, else the jnp form; off the CPU
        the faster of the Pallas kernel and the jnp form, measured: ``accelerator_form``),
        "kernel" (CPU kernel; jnp form on other platforms), "xla" (the jnp form) or "pallas"
        (the Pallas kernel; in Pallas's interpreter on the CPU: slow, for tests).

    The state composes with the rest of ``core.softmax`` (``merge``, ``finalize``); its acc
    holds Σ exp(logit − max)·y(j) of the raw (uncentred) values. Works under jit and vmap;
    differentiable in x, a, b² (and log_w) by the jnp form's derivatives.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    x, a, b2, images, log_w = _prepare(x, a, b2, images, log_w)
    _check(x, images, log_w)
    mode = resolve_kind(kind, k, x.shape[1], x.shape[2], boundary, bool(wrap_patches))
    k, block = int(k), int(block)

    def xla_path(x, a, b2, images, log_w):
        return _xla_form(mode)(x, a, b2, images, log_w, k=k, block=block)

    def pallas_path(x, a, b2, images, log_w):
        return shiftmap_pallas().pallas_state(x, a, b2, images, log_w, k=k, mode=mode)

    if engine == "pallas":
        return native.with_reference_derivatives(pallas_path, xla_path)(x, a, b2, images, log_w)
    on_cpu = jax.default_backend() == "cpu"
    if engine == "xla" or (on_cpu and not native.available()):
        return xla_path(x, a, b2, images, log_w)
    # Off the CPU (or for a program an accelerator process places there): the measured form.
    accel = xla_path
    if not on_cpu and engine == "auto":
        bsz, h, w, c = x.shape
        if accelerator_form(h, w, c, k, mode, images.shape[0], bsz) == "pallas":
            accel = native.with_reference_derivatives(pallas_path, xla_path)
    if not native.available():
        return accel(x, a, b2, images, log_w)

    def fused(x, a, b2, images, log_w):
        return softmax.SoftmaxState(*native.shiftmap_softmax_state(
            x, a, b2, images, log_w, k, MODES.index(mode)))

    fast = native.kernel_on_cpu(fused, accel)
    return native.with_reference_derivatives(fast, xla_path)(x, a, b2, images, log_w)


def shiftmap_pallas():
    """The Pallas module, imported on first use (Pallas's import costs start-up time that
    CPU runs never need)."""
    from els_jax.engines import shiftmap_pallas as mod
    return mod


def accelerator_form(h: int, w: int, c: int, k: int, mode: str, n: int, batch: int = 1, *,
                     interpret: bool = False) -> str:
    """Which form runs the shift-map engine on an accelerator: "pallas" (the kernel) or "xla"
    (the jnp form), measured once per shape class on ``jax.devices()[0]`` (``autotune.select``,
    cached on disk) on min(N, 256) synthetic images. The static rule (autotuning off) is the
    jnp form: the kernel has been run here only in the interpreter. A kernel that fails to
    compile for the device raises in its probe and is left out. ``interpret``: probe the
    kernel in Pallas's interpreter (tests on the CPU)."""
    from els_jax.engines import autotune
    shape = {"mode": mode, "k": int(k), "C": int(c), "H": int(h), "W": int(w),
             "N": autotune.bucket(n), "B": autotune.bucket(batch)}

    def probes():
        rng = np.random.default_rng(0)
        n_probe = int(min(n, 256))
        images = jnp.asarray(rng.uniform(-1, 1, (n_probe, h, w, c)), jnp.float32)
        x = jnp.asarray(0.7 * np.asarray(images)[rng.integers(0, n_probe, batch)]
                        + 0.7 * rng.normal(size=(batch, h, w, c)), jnp.float32)
        args = (x, jnp.full((batch,), 0.5 ** 0.5, jnp.float32), jnp.full((batch,), 0.5),
                images, jnp.zeros((n_probe,), jnp.float32))
        xla = functools.partial(_xla_form(mode), k=int(k), block=DEFAULT_BLOCK)
        kern = functools.partial(shiftmap_pallas().pallas_state, k=int(k), mode=mode,
                                 interpret=interpret)
        return ({"xla": lambda: jax.block_until_ready(xla(*args)),
                 "pallas": lambda: jax.block_until_ready(kern(*args))},
                f"{n_probe} synthetic images, B = {batch}", None)

    return autotune.select("shiftmap_form", shape, ("xla", "pallas"), "xla",
                           "static rule: the jnp form (the Pallas kernel is measured first)",
                           probes).engine


def shiftmap_x0(x, a, b2, images, log_w=None, *, k: int, boundary: str = "circular",
                wrap_patches: bool = False, kind: str = "els", block: int = DEFAULT_BLOCK,
                engine: str = "auto"):
    """x̂_0 [B, H, W, C] = Σ_c softmax(logit)_c · y(j_c) per pixel (``shiftmap_state``)."""
    return softmax.finalize(shiftmap_state(x, a, b2, images, log_w, k=k, boundary=boundary,
                                           wrap_patches=wrap_patches, kind=kind, block=block,
                                           engine=engine))

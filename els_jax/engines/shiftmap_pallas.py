"""The shift-map engine's accelerator form: one Pallas kernel (issue 23, docs/theory.md §9).

The same function as ``shiftmap.shiftmap_state`` (its module docstring has the maths): for a
query image x, a training image y and a shift d,

    f_d(p) = Σ_c (x_ext(p) − a·y(p + d))²,      logit(i) = −(box_k f_d)(i)/(2b²) + log w(y),

masked to the pairs that exist (``shiftplan.axis_plan``), and one online softmax per query
pixel over every (image, shift), with the values y(i + d).

Why a kernel. The plain-jnp form (``shiftmap._state_xla*``) is exact on any backend but XLA
materialises every map, box sum and logit array of a shift in memory: the work per pair is a
handful of flops, the traffic several times that. Here one program keeps a query image's
softmax state ([H, W] max and total, C value sums) on chip for a whole group of images and
every shift: each (image, shift) step reads one window of y and writes nothing.

How the program is laid out, for GPUs (Triton) and TPUs (Mosaic) alike:

- grid (B, G): query image b, group g of ``per_program`` training images. Each program
  returns its partial softmax state; the G partial states are merged (exact log-sum-exp) in
  XLA, so programs never share an accumulator (Triton runs the grid in parallel).
- channel-first, power-of-two frames. Every in-kernel array is [P, Q] (the extended frame
  (H + 2m) × (W + 2m) rounded up to powers of two, ≥ 16) or [Hp, Wp] (H × W rounded up): Triton
  needs power-of-two block shapes; rows and columns beyond the image are zeros and masked.
- the shift d is a dynamic offset into the (padded) image: ``y_ref[i, c, pl.ds(oy, P),
  pl.ds(ox, Q)]``, read from tables of offsets and per-axis valid masks.
- box sums as two matmuls with banded 0/1 matrices, Ky [Hp, P] · f · Kx [Q, Wp] (Ky[i, r] = 1
  iff i < H and i ≤ r < i + k): a sum of k² nonnegative terms with float32 accumulation, no
  prefix sums and no subtraction (the precision argument of docs/theory.md §9), at HIGHEST
  precision (DEFAULT is TF32/bf16 on accelerators: several nats at small t). A matmul sums
  the shifted windows without slicing in-register values at unaligned offsets (which Triton
  cannot do), for any k. With ``weights`` the band carries w[δ] (els_soft's Gaussian window
  w[δy]·w[δx]) instead of ones.
- the online softmax per pixel, elementwise; absent pairs carry −inf and add exactly zero.

Memory: the training images are streamed through the kernel in chunks (``lax.scan``), each
chunk padded for the shifts on the fly (uint8 pixels converted there, docs/theory.md §9.2), so
memory is O(chunk), never N·(#shifts).

Status. Tested on the CPU in Pallas's interpret mode against the jnp form and the float64
oracles (tests/test_shiftmap_pallas.py); never compiled for a GPU or TPU here (no accelerator
was available). So it is not assumed to win: off the CPU, ``shiftmap_state(engine="auto")``
measures it against the jnp form on the device (``accelerator_form``) and drops it if it
fails to lower. Its derivatives are the jnp form's (``native.with_reference_derivatives``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from els_jax.core import softmax
from els_jax.core.data import unit_images
from els_jax.engines.shiftplan import geometry

__all__ = ["pallas_state", "frame_plan", "DEFAULT_IMAGES_PER_PROGRAM"]

_HI = jax.lax.Precision.HIGHEST

# Training images one program walks through (all shifts of each): enough work per program to
# amortise its state's set-up, few enough that B·G programs fill a device.
DEFAULT_IMAGES_PER_PROGRAM = 4
# Programs per pallas_call (B × G) at most: bounds the partial states, (2 + C)·B·G·Hp·Wp floats.
_MAX_PROGRAMS = 512


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (int(n) - 1).bit_length())


def frame_plan(h: int, w: int, k: int, mode: str):
    """Everything static of one (H, W, k, mode): a dict with the shift tables (``oy``, ``ox``
    [S] offsets of y_d's frame in the padded image, ``vy`` [S, Hp], ``vx`` [S, Wp] 0/1 valid
    masks of the query rows / columns), the banded box matrices ``ky`` [Hp, P] and ``kx``
    [Q, Wp], the frame sizes and the image padding (before, after) per axis."""
    m = k // 2
    _, _, oy, ox, vy, vx, (lo_y, hi_y, lo_x, hi_x) = geometry(h, w, k, mode)
    big_p, big_q = _pow2(h + 2 * m), _pow2(w + 2 * m)
    hp, wp = _pow2(h), _pow2(w)
    # Padded image rows: m + lo before (the frame of shift oy starts at row oy), and after
    # enough that the frame [oy, oy + P) and the values [oy + m, oy + m + Hp) fit.
    rows = max(int(oy.max()) + big_p, int(oy.max()) + m + hp)
    cols = max(int(ox.max()) + big_q, int(ox.max()) + m + wp)
    pad_y = (m + lo_y, rows - (h + 2 * m + lo_y))
    pad_x = (m + lo_x, cols - (w + 2 * m + lo_x))
    ext_y = (m + lo_y, m + hi_y)                 # the wrapped/zero extension of the rule
    ext_x = (m + lo_x, m + hi_x)
    vy_p = np.zeros((len(oy), hp), np.int32)
    vy_p[:, :h] = vy
    vx_p = np.zeros((len(ox), wp), np.int32)
    vx_p[:, :w] = vx
    i, r = np.arange(hp)[:, None], np.arange(big_p)[None, :]
    ky = ((i < h) & (r >= i) & (r < i + k)).astype(np.float32)
    c, j = np.arange(big_q)[:, None], np.arange(wp)[None, :]
    kx = ((j < w) & (c >= j) & (c < j + k)).astype(np.float32)
    # The window's offset δ = r − i (rows) and c − j (columns) of each band entry, for a
    # weighted window w[δy]·w[δx] (els_soft's Gaussian) in place of the box.
    ky_off = np.clip(r - i, 0, k - 1).astype(np.int32)
    kx_off = np.clip(c - j, 0, k - 1).astype(np.int32)
    return dict(oy=oy.astype(np.int32), ox=ox.astype(np.int32), vy=vy_p, vx=vx_p, ky=ky,
                kx=kx, ky_off=ky_off, kx_off=kx_off,
                P=big_p, Q=big_q, Hp=hp, Wp=wp, pad_y=pad_y, pad_x=pad_x,
                ext_y=ext_y, ext_x=ext_x, rows=rows, cols=cols)


def _kernel(oy_ref, ox_ref, vy_ref, vx_ref, ky_ref, kx_ref, coef_ref, lw_ref, x_ref, y_ref,
            max_ref, tot_ref, acc_ref, *, c: int, m: int, per_program: int, shifts: int,
            big_p: int, big_q: int, hp: int, wp: int):
    """Program (b, g): query image b (x_ref [1, C, P, Q]; a, −1/(2b²) in coef_ref [B, 2])
    against group g's ``per_program`` images (y_ref [per_program, C, rows, cols]; log weights
    lw_ref [G, per_program]) over every shift; writes its partial state (max_ref, tot_ref
    [1, 1, Hp, Wp], acc_ref [1, 1, C, Hp, Wp])."""
    b, g = pl.program_id(0), pl.program_id(1)
    a = coef_ref[b, 0]
    scale = coef_ref[b, 1]                                   # −1 / (2 b²)
    xs = [x_ref[0, ch] for ch in range(c)]                   # C × [P, Q]
    ky = ky_ref[...]
    kx = kx_ref[...]

    def shift_step(s, carry, img):
        mx, tot, acc = carry
        oy = oy_ref[s]
        ox = ox_ref[s]
        f = jnp.zeros((big_p, big_q), jnp.float32)
        for ch in range(c):
            diff = xs[ch] - a * y_ref[img, ch, pl.ds(oy, big_p), pl.ds(ox, big_q)]
            f = f + diff * diff
        box = jnp.dot(jnp.dot(ky, f, precision=_HI, preferred_element_type=jnp.float32), kx,
                      precision=_HI, preferred_element_type=jnp.float32)        # [Hp, Wp]
        valid = (vy_ref[s][:, None] * vx_ref[s][None, :]) > 0
        logit = jnp.where(valid, box * scale + lw_ref[g, img], -jnp.inf)
        new_max = jnp.maximum(mx, logit)
        ref = jnp.where(new_max == -jnp.inf, 0.0, new_max)   # no −inf − (−inf)
        alpha = jnp.exp(mx - ref)
        p = jnp.exp(logit - ref)
        acc = tuple(acc[ch] * alpha + p * y_ref[img, ch, pl.ds(oy + m, hp), pl.ds(ox + m, wp)]
                    for ch in range(c))
        return new_max, tot * alpha + p, acc

    def image_step(img, carry):
        return jax.lax.fori_loop(0, shifts, functools.partial(shift_step, img=img), carry)

    init = (jnp.full((hp, wp), -jnp.inf, jnp.float32), jnp.zeros((hp, wp), jnp.float32),
            tuple(jnp.zeros((hp, wp), jnp.float32) for _ in range(c)))
    mx, tot, acc = jax.lax.fori_loop(0, per_program, image_step, init)
    max_ref[0, 0] = mx
    tot_ref[0, 0] = tot
    for ch in range(c):
        acc_ref[0, 0, ch] = acc[ch]


def _merge_groups(mx, tot, acc):
    """The exact merge of G partial states (max, tot [G, ...], acc [G, ..., C, Hp, Wp])."""
    top = jnp.max(mx, axis=0)
    ref = jnp.where(jnp.isfinite(top), top, 0.0)
    f = jnp.exp(mx - ref[None])                              # 0 for a group with no pair
    return top, jnp.sum(f * tot, axis=0), jnp.sum(f[:, :, None] * acc, axis=0)


@functools.partial(jax.jit, static_argnames=("k", "mode", "per_program", "interpret"))
def _state(x, a, b2, images, log_w, weights, *, k, mode, per_program, interpret):
    bsz, h, w, c = x.shape
    n = images.shape[0]
    m = k // 2
    plan = frame_plan(h, w, k, mode)
    periodic = mode in ("circular", "wrap")
    big_p, big_q, hp, wp = plan["P"], plan["Q"], plan["Hp"], plan["Wp"]
    shifts = len(plan["oy"])

    # Queries: channel-first, extended by m as the rule extends them, zero-padded to P × Q.
    xc = jnp.transpose(x, (0, 3, 1, 2))
    xe = jnp.pad(xc, ((0, 0), (0, 0), (m, m), (m, m)), mode="wrap" if periodic else "constant")
    xe = jnp.pad(xe, ((0, 0), (0, 0), (0, big_p - (h + 2 * m)), (0, big_q - (w + 2 * m))))
    coef = jnp.stack([a, -0.5 / b2], axis=1)                 # [B, 2]

    # Images per scan step: G groups of per_program, at most N (the last chunk starts early
    # enough to be whole; the images it repeats get log weight −inf).
    per_program = int(max(1, min(per_program, n)))
    groups = int(max(1, min(_MAX_PROGRAMS // bsz, n // per_program)))
    chunk = per_program * groups

    call = pl.pallas_call(
        functools.partial(_kernel, c=c, m=m, per_program=per_program, shifts=shifts,
                          big_p=big_p, big_q=big_q, hp=hp, wp=wp),
        grid=(bsz, groups),
        in_specs=[
            pl.BlockSpec((shifts,), lambda b, g: (0,)),
            pl.BlockSpec((shifts,), lambda b, g: (0,)),
            pl.BlockSpec((shifts, hp), lambda b, g: (0, 0)),
            pl.BlockSpec((shifts, wp), lambda b, g: (0, 0)),
            pl.BlockSpec((hp, big_p), lambda b, g: (0, 0)),
            pl.BlockSpec((big_q, wp), lambda b, g: (0, 0)),
            # Small tables whole (a block equal to the array suits every backend's tiling).
            pl.BlockSpec((bsz, 2), lambda b, g: (0, 0)),
            pl.BlockSpec((groups, per_program), lambda b, g: (0, 0)),
            pl.BlockSpec((1, c, big_p, big_q), lambda b, g: (b, 0, 0, 0)),
            pl.BlockSpec((per_program, c, plan["rows"], plan["cols"]),
                         lambda b, g: (g, 0, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((1, 1, hp, wp), lambda b, g: (g, b, 0, 0)),
            pl.BlockSpec((1, 1, hp, wp), lambda b, g: (g, b, 0, 0)),
            pl.BlockSpec((1, 1, c, hp, wp), lambda b, g: (g, b, 0, 0, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((groups, bsz, hp, wp), jnp.float32),
                   jax.ShapeDtypeStruct((groups, bsz, hp, wp), jnp.float32),
                   jax.ShapeDtypeStruct((groups, bsz, c, hp, wp), jnp.float32)],
        interpret=interpret,
        name="els_shiftmap",
    )
    # The banded matrices: 0/1 for the box; w[δ] on the band for a weighted window.
    if weights is None:
        ky, kx = jnp.asarray(plan["ky"]), jnp.asarray(plan["kx"])
    else:
        weights = jnp.asarray(weights, jnp.float32)
        ky = jnp.asarray(plan["ky"]) * weights[jnp.asarray(plan["ky_off"])]
        kx = jnp.asarray(plan["kx"]) * weights[jnp.asarray(plan["kx_off"])]
    tables = tuple(jnp.asarray(plan[key]) for key in ("oy", "ox", "vy", "vx")) + (ky, kx)

    def pad_images(imgs):
        """[n, H, W, C] → [n, C, rows, cols]: extended as the rule extends candidates
        (wrapped or zeros), then zero-padded to the frame loads' reach."""
        ic = jnp.transpose(imgs, (0, 3, 1, 2))
        ic = jnp.pad(ic, ((0, 0), (0, 0), plan["ext_y"], plan["ext_x"]),
                     mode="wrap" if periodic else "constant")
        extra_y = plan["rows"] - ic.shape[2]
        extra_x = plan["cols"] - ic.shape[3]
        return jnp.pad(ic, ((0, 0), (0, 0), (0, extra_y), (0, extra_x)))

    starts, first_new = softmax.chunk_starts(n, chunk)
    rows = jnp.arange(chunk, dtype=jnp.int32)

    # (core.softmax keeps the value axis last: the chunks' states merge channel-last.)
    init = softmax.init((bsz, hp, wp), c)

    def chunk_body(state, item):
        start, first = item
        imgs = unit_images(jax.lax.dynamic_slice_in_dim(images, start, chunk))  # uint8: here
        lw = jax.lax.dynamic_slice_in_dim(log_w, start, chunk)
        lw = jnp.where(rows >= first, lw, -jnp.inf).reshape(groups, per_program)
        mx, tot, acc = call(*tables, coef, lw, xe, pad_images(imgs))
        top, total, summed = _merge_groups(mx, tot, acc)
        part = softmax.SoftmaxState(top, total, jnp.transpose(summed, (0, 2, 3, 1)))
        return softmax.merge(state, part), None

    state = jax.lax.scan(chunk_body, init, (starts, first_new))[0]
    return softmax.SoftmaxState(state.max[:, :h, :w], state.total[:, :h, :w],
                                state.acc[:, :h, :w, :])


def pallas_state(x, a, b2, images, log_w, *, k: int, mode: str, weights=None,
                 per_program: int = DEFAULT_IMAGES_PER_PROGRAM, interpret: bool | None = None):
    """``shiftmap.shiftmap_state`` by the Pallas kernel, for prepared arguments (x [B, H, W, C],
    a, b2 [B], images [N, H, W, C] float32 or uint8 pixels, log_w [N], float32) and a resolved pair rule ``mode``
    (``shiftmap.MODES``). interpret: run the kernel in Pallas's interpreter (default: on the
    CPU, where Pallas has no compiler of its own). weights [k], optional: the separable
    window weights[δy]·weights[δx] in place of the k×k box (els_soft's Gaussian,
    ``soft.axis_weights``). Forward values only: differentiate through
    ``shiftmap.shiftmap_state`` (or ``soft.pallas_x0``)."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _state(x, a, b2, images, log_w, weights, k=int(k), mode=mode,
                  per_program=int(per_program), interpret=bool(interpret))

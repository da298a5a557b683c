"""The reference path: every patch machine of docs/theory.md §2 as one obvious jnp function.

One query image at a time (``jax.vmap`` over the batch), every candidate compared by its
literal squared distance, the training images streamed one at a time through the shared
online softmax (``softmax.update``):

    ℓ_{i,c} = −‖q_i(x) − a·c‖² / (2b²) + log w_c,     x̂_0,i = Σ_c softmax_c(ℓ_{i,c}) v_c.

What differs between the machines is only which vectors are compared and which pairs count:

  machine            query q_i                 candidates (per training image)     pairs
  ideal              the whole image           the image                           all
  equivariant        the whole image           its H·W circular translates         all
  local (k)          k×k window, zero padded   the k×k window at every position    same position
  els circular (k)   k×k window, wrapped       k×k windows, wrapped                centre inside, or
                                                                                   any (wrap_patches)
  els zeros (k)      k×k window, zero padded   k×k windows, zero padded            per axis: a query
      coordinate within k//2 of a border pairs with exactly that coordinate, an interior one
      with any interior coordinate; k ≥ min(H, W) is the local machine (docs/theory.md §2 notes).

(Zero padding on both sides equals docs/theory.md's "cut at the border" for LS: the pixels outside are
0 in the query and in the same-position candidate, so they add nothing to the distance.)

It is exact in float32 where the engines' expanded form a·q·c − a²‖c‖²/2 loses digits, costs
O(N·(HW)²·k²C), and is differentiable by plain autodiff (the allowed-pair mask is a constant).
The engines (``els_window``, ``els_row``, ``els_interior``, ``border``, ``local``, ``ideal``,
``equivariant``) are tested against it and against the float64 oracles of tests/oracles.py.
Tiny inputs only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core import conversions, softmax
from els_jax.core import schedules as schedules_lib
from els_jax.core.validation import check_patch_size, check_query_and_images, mask_log_weights
from els_jax.core.data import unit_images

__all__ = ["reference_x0", "reference_score", "allowed_pairs", "KINDS"]

KINDS = ("ideal", "equivariant", "local", "els")


def _windows(img, k: int, mode: str):
    """img [H, W, C] → the k×k window centred on every pixel, [H·W, k·k·C] (row-major
    centres; "circular" wraps, "zeros" pads with 0)."""
    h, w, c = img.shape
    m = k // 2
    padded = jnp.pad(img, ((m, m), (m, m), (0, 0)), mode="wrap" if mode == "circular" else "constant")
    d = np.arange(k)
    rr = np.arange(h)[:, None, None, None] + d[None, None, :, None]     # [H, 1, k, 1]
    cc = np.arange(w)[None, :, None, None] + d[None, None, None, :]     # [1, W, 1, k]
    return padded[rr, cc].reshape(h * w, k * k * c)


def _axis_class(n: int, m: int) -> np.ndarray:
    """Per coordinate: itself if within m of a border, −1 for the interior."""
    r = np.arange(n)
    return np.where((r < m) | (r >= n - m), r, -1)


def allowed_pairs(kind: str, k: int, h: int, w: int, boundary: str = "circular",
                  wrap_patches: bool = False) -> np.ndarray:
    """Which (query pixel, candidate centre) pairs count, [H·W, H·W] bool (row-major pixels),
    straight from docs/theory.md §2's table for the patch machines."""
    rows, cols = np.divmod(np.arange(h * w), w)
    m = k // 2
    if kind == "local" or (kind == "els" and boundary == "zeros" and k >= min(h, w)):
        return np.eye(h * w, dtype=bool)
    if kind != "els":
        raise ValueError(f"allowed_pairs is for the patch machines, not {kind!r}")
    if boundary == "circular":
        inside = (rows >= m) & (rows < h - m) & (cols >= m) & (cols < w - m)
        cand = np.ones(h * w, bool) if wrap_patches else inside
        return np.broadcast_to(cand[None, :], (h * w, h * w)).copy()
    if boundary != "zeros":
        raise ValueError(f"unknown boundary {boundary!r}; choose 'circular' or 'zeros'")
    rc, cc = _axis_class(h, m)[rows], _axis_class(w, m)[cols]
    return (rc[:, None] == rc[None, :]) & (cc[:, None] == cc[None, :])


def _single_x0(x1, a, b2, images, log_w, kind, k, boundary, wrap_patches):
    """x̂_0 of one query image x1 [H, W, C]; images [N, H, W, C], log weights [N]."""
    h, w, c = x1.shape
    if kind in ("ideal", "equivariant"):
        queries = x1.reshape(1, -1)                                      # [1, D]
        allowed = None

        def candidates(img):
            if kind == "ideal":
                vec = img.reshape(1, -1)
            else:                       # every circular translate (dy, dx) of the image
                shifts = [jnp.roll(img, (dy, dx), axis=(0, 1))
                          for dy in range(h) for dx in range(w)]
                vec = jnp.stack(shifts).reshape(h * w, -1)
            return vec, vec                                              # keys, values
    else:
        mode = "circular" if (kind == "els" and boundary == "circular") else "zeros"
        queries = _windows(x1, k, mode)                                  # [HW, k²C]
        allowed = jnp.asarray(allowed_pairs(kind, k, h, w, boundary, wrap_patches))

        def candidates(img):
            return _windows(img, k, mode), img.reshape(h * w, c)

    def body(state, inputs):
        img, lw = inputs
        keys, values = candidates(img)
        diff = queries[:, None, :] - a * keys[None, :, :]                # [Pq, Pc, D]
        logits = -jnp.sum(diff * diff, axis=-1) / (2 * b2) + lw
        if allowed is not None:
            logits = jnp.where(allowed, logits, -jnp.inf)
        return softmax.update(state, logits, values), None

    init = softmax.init((queries.shape[0],), (h * w * c) if allowed is None else c)
    state, _ = jax.lax.scan(body, init, (images, log_w))
    return softmax.finalize(state).reshape(h, w, c)


@functools.partial(jax.jit, static_argnames=("kind", "k", "boundary", "wrap_patches"))
def _reference_x0(x, a, b2, images, log_w, *, kind, k, boundary, wrap_patches):
    return jax.vmap(lambda x1, a1, b21: _single_x0(x1, a1, b21, images, log_w, kind, k,
                                                   boundary, wrap_patches))(x, a, b2)


def reference_x0(x, t, images, *, kind: str, k: int | None = None, boundary: str = "circular",
                 wrap_patches: bool = False, mask=None, schedule=schedules_lib.Cosine()):
    """x̂_0 [B, H, W, C] of machine ``kind`` ("ideal" | "equivariant" | "local" | "els") by
    the reference computation (module docstring). x [B, H, W, C], t scalar or [B], images
    [N, H, W, C], k the odd patch size (local, els), mask optional bool [N]."""
    if kind not in KINDS:
        raise ValueError(f"unknown machine {kind!r}; choose one of {KINDS}")
    check_query_and_images(x, images)
    if kind in ("local", "els"):
        k = check_patch_size(k, x.shape[1], x.shape[2])
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return _reference_x0(x, coeffs.a, coeffs.b2, jnp.asarray(unit_images(images), jnp.float32),
                         mask_log_weights(mask, images.shape[0]), kind=kind, k=k,
                         boundary=boundary, wrap_patches=bool(wrap_patches))


def reference_score(x, t, images, *, schedule=schedules_lib.Cosine(), **kw):
    """The score −(x − a·x̂_0)/b² of ``reference_x0``."""
    x0 = reference_x0(x, t, images, schedule=schedule, **kw)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return conversions.x0_to_score_at(x0, x, coeffs)

"""The equivariant local score machine (ELS, docs/theory.md §2), and the candidate-bank machinery it
shares with the ideal machine: the public API.

For every output pixel i, the query q_i is the k×k window of x centred on i; candidates are
k×k windows c of training images, each with its centre pixel v_c as value:

    w_{i,c} = softmax_c(−‖q_i − a·c‖² / (2b²)),     x̂_0,i = Σ_c w_{i,c} v_c,
    s_i     = −(x_i − a·x̂_0,i) / b².

Boundaries (``engines/layout.layout``): "circular" (q_i wraps; candidates are the windows fully
inside an image, or every circular window with ``wrap_patches``) and "zeros" (boundary-broken:
q_i zero-padded; a coordinate within k//2 of a border matches only candidates centred at that
coordinate, interior coordinates any interior centre; k ≥ min(H, W) is the local score machine,
as in the authors' code).

Which code runs, and why
------------------------
Time enters here once: ``els_x0``/``els_score`` turn t into the coefficients a, b² per query
(``schedules.query_coefficients``) and hand those to the engines. Two entry points, one
arithmetic (``engines/layout.py``: the logits, the mean shift; ``core/softmax.py``):

- ``els_x0`` / ``els_score`` (functional, no precomputation): candidates are extracted from the
  images a chunk at a time, memory independent of N (``engines/passes.stream_x0``).
- ``build_bank`` + ``engines/passes.bank_x0`` (what ``make_machine`` uses): candidates
  precomputed once per (data set, k, boundary, mask), optionally merged (identical windows
  become one candidate of log w = log count) and split over a device mesh.

The main pass (every pixel; the interior for "zeros") runs on one of four exact engines
("window", "row", "native", "window_native"; what each computes: ``engines/passes.py``).
``engines/select.resolve_els_engine`` picks it, here, before anything is built: an explicit
``method`` wins; "auto" times the applicable engines on a probe of the same shape class once
per platform and caches the winner on disk (``engines/autotune.py``; ``Machine.explain()``
prints the choice and its reason). The zero-padded border (edges and corners) is always
``engines/border.py``'s. Every engine is tested against the float64 oracles (tests/oracles.py)
and against each other; every path is differentiable (jvp and vjp).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from els_jax.core import conversions, patches
from els_jax.core import schedules as schedules_lib
from els_jax.core.validation import check_query_and_images, mask_log_weights
from els_jax.core.data import held_images, unit_images
from els_jax.engines import layout as geo
from els_jax.engines import passes, select
from els_jax.engines.layout import DEFAULT_BLOCK
from els_jax.machines import local as local_lib

__all__ = ["els_score", "els_x0", "els_x0_at", "build_bank"]


def els_x0_at(x, coeffs, images, log_w, *, k: int, boundary: str = "circular",
              wrap_patches: bool = False, block: int = DEFAULT_BLOCK, method: str = "auto"):
    """ELS x̂_0 [B, H, W, C] from the coefficients a, b² [B] (``schedules.query_coefficients``)
    and log weights [N] (−inf = absent image); images float32, or uint8 pixels. ``els_x0``
    and ``els_score`` call it."""
    h, w = x.shape[1], x.shape[2]
    k = geo.check_k(k, h, w, boundary, wrap_patches)
    if boundary not in patches.BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; choose one of {patches.BOUNDARIES}")
    if boundary == "zeros" and k >= min(h, w):       # docs §2: zero-padded ELS with k ≥ H is LS
        return local_lib.local_x0_at(x, coeffs, jnp.asarray(unit_images(images), jnp.float32),
                                     log_w, k=k)
    method = select.resolve_els_engine(
        method, k, x.shape[3], h, boundary, w=w, wrap_patches=bool(wrap_patches),
        n=images.shape[0], batch=x.shape[0], block=int(block)).engine
    return passes.stream_x0(x, coeffs.a, coeffs.b2, images, log_w, k=k, boundary=boundary,
                            wrap_patches=bool(wrap_patches), block=int(block), method=method)


def els_x0(x, t, images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
           schedule=schedules_lib.Cosine(), mask=None, block: int = DEFAULT_BLOCK,
           method: str = "auto"):
    """Denoised mean x̂_0 of the ELS machine, [B, H, W, C]. See ``els_score``."""
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return els_x0_at(x, coeffs, held_images(images),
                     mask_log_weights(mask, images.shape[0]), k=k, boundary=boundary,
                     wrap_patches=wrap_patches, block=block, method=method)


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
      method: "auto" (measured once per shape class), "window" or "row" (same result).
    Returns:
      score [B, H, W, C].

    Works under jax.jit / jax.vmap; differentiable (jax.grad, jax.jvp) w.r.t. x and t, every
    engine (absent candidates get a zero tangent: ``engines/layout.augmented_logits``).

        >>> s = els_score(x, 0.3, images, k=5, boundary="zeros")
    """
    check_query_and_images(x, images)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    x0 = els_x0_at(x, coeffs, held_images(images),
                   mask_log_weights(mask, images.shape[0]), k=k, boundary=boundary,
                   wrap_patches=wrap_patches, block=block, method=method)
    return conversions.x0_to_score_at(x0, x, coeffs)


def build_bank(images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
               dedup: bool = True, method: str = "auto", block: int = DEFAULT_BLOCK,
               n_shards: int = 1, ideal: bool = False, chunk: int | None = None,
               dedup_threshold: float = 0.9, images_per_step: int = 64,
               unique_fraction: float | None = None, held_images=None):
    """The ELS (or ideal) machine's candidate bank with its engine chosen: ``method`` "auto"
    is resolved by ``select.resolve_els_engine`` (given the estimated fraction of distinct
    windows), then ``passes.build_bank`` builds it (``held_images``: see there). Returns
    (MachineBank, BankSpec)."""
    images = np.asarray(unit_images(images), np.float32)
    n, h, w, c = images.shape
    merge, unique_fraction = passes.merge_plan(
        images, k=k, boundary=boundary, wrap_patches=wrap_patches, dedup=dedup, ideal=ideal,
        dedup_threshold=dedup_threshold, unique_fraction=unique_fraction)
    if not ideal:
        method = select.resolve_els_engine(
            method, k, c, h, boundary, unique_fraction if merge else 1.0, banked=True, w=w,
            wrap_patches=bool(wrap_patches), n=n, sharded=n_shards > 1,
            block=int(block), probe_images=images).engine
    return passes.build_bank(images, k=k, method=method, boundary=boundary,
                             wrap_patches=wrap_patches, dedup=dedup, block=block,
                             n_shards=n_shards, ideal=ideal, chunk=chunk,
                             dedup_threshold=dedup_threshold, images_per_step=images_per_step,
                             unique_fraction=unique_fraction, held_images=held_images)

"""The equivariant local score machine (ELS, SPEC §2), and the candidate-bank machinery it
shares with the ideal machine: the public API.

For every output pixel i, the query q_i is the k×k window of x centred on i; candidates are
k×k windows c of training images, each with its centre pixel v_c as value:

    w_{i,c} = softmax_c(−‖q_i − a·c‖² / (2b²)),     x̂_0,i = Σ_c w_{i,c} v_c,
    s_i     = −(x_i − a·x̂_0,i) / b².

Boundaries (``els_layout.layout``): "circular" (q_i wraps; candidates are the windows fully
inside an image, or every circular window with ``wrap_patches``) and "zeros" (boundary-broken:
q_i zero-padded; a coordinate within k//2 of a border matches only candidates centred at that
coordinate, interior coordinates any interior centre; k ≥ min(H, W) is the local score machine,
as in the authors' code).

Which code runs, and why
------------------------
Two entry points, one arithmetic (``els_layout``: the logits, the mean shift, the softmax of
``softmax.py``):

- ``els_x0`` / ``els_score`` (functional, no precomputation): candidates are extracted from the
  images a chunk at a time, memory independent of N (``stream_x0``).
- ``build_bank`` + ``bank_x0`` (what ``make_machine`` uses): candidates precomputed once per
  (data set, k, boundary, mask), optionally merged (identical windows become one candidate of
  log w = log count) and split over a device mesh.

The main pass (every pixel; the interior for "zeros") runs on one of four exact engines, one
module each (two share one):

  "window" (``els_window``)   one dot product of length k²C + 2 per pair; the only engine
                              for merged banks and the ideal machine; any backend.
  "row"    (``els_row``)      k row products of length kC + 2 and a k-row box sum per pair;
                              any backend.
  "native" (``els_interior``) the fused C++ kernel of ``native.py`` (zero padding, banked,
                              CPU only); derivatives from its XLA twin.
  "window_native"             the window engine's bank (merged or not) run by the fused C++
              (``els_window``) kernel of ``native.py`` (banked, CPU only); derivatives from
                              the "window" engine.

``engines.resolve_els_engine`` picks it: an explicit ``method`` wins; "auto" times the
applicable engines on a probe of the same shape class once per platform and caches the winner
on disk (``engines.py``; ``Machine.explain()`` prints the choice and its reason). The
zero-padded border (edges and corners) is always ``border.py``'s. Every engine is tested
against the float64 oracles (tests/oracles.py) and against each other; every path is
differentiable (jvp and vjp).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from els_jax import border as border_lib
from els_jax import conversions, patches, softmax
from els_jax import els_interior as interior_lib
from els_jax import els_layout as geo
from els_jax import els_row as row_lib
from els_jax import els_window as window_lib
from els_jax import engines as engines_lib
from els_jax import schedules as schedules_lib
from els_jax.els_interior import InteriorBank
from els_jax.els_layout import DEFAULT_BLOCK, Pass, layout
from els_jax.els_row import RowBank
from els_jax.els_window import WindowBank, estimate_unique_fraction
from els_jax.engines import METHODS, choose_method
from els_jax.validation import check_query_and_images, mask_log_weights

__all__ = ["els_score", "els_x0", "MachineBank", "WindowBank", "RowBank", "InteriorBank",
           "BankSpec", "build_bank", "bank_x0", "bank_partition_specs",
           "estimate_unique_fraction", "layout", "Pass", "choose_method", "METHODS",
           "DEFAULT_BLOCK"]


# ----------------------------------------------------------------------------------------
# The functional API: candidates streamed straight from the images (no bank).


def els_x0(x, t, images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
           schedule=schedules_lib.Cosine(), mask=None, block: int = DEFAULT_BLOCK,
           method: str = "auto"):
    """Denoised mean x̂_0 of the ELS machine, [B, H, W, C]. See ``els_score``."""
    check_query_and_images(x, images)
    h, w = x.shape[1], x.shape[2]
    k = geo.check_k(k, h, w, boundary, wrap_patches)
    if boundary not in patches.BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; choose one of {patches.BOUNDARIES}")
    if boundary == "zeros" and k >= min(h, w):
        from els_jax.local import local_x0         # SPEC: zero-padded ELS with k ≥ H is LS
        return local_x0(x, t, images, k=k, schedule=schedule, mask=mask)
    method = engines_lib.resolve_els_engine(
        method, k, x.shape[3], h, boundary, w=w, wrap_patches=bool(wrap_patches),
        n=images.shape[0], batch=x.shape[0], block=int(block)).engine
    log_w = mask_log_weights(mask, images.shape[0])
    return stream_x0(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32),
                     jnp.asarray(images, jnp.float32), log_w, k=k, boundary=boundary,
                     wrap_patches=bool(wrap_patches), schedule=schedules_lib.get(schedule),
                     block=int(block), method=method)


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
    engine (absent candidates get a zero tangent: ``els_layout.augmented_logits``).

        >>> s = els_score(x, 0.3, images, k=5, boundary="zeros")
    """
    x0 = els_x0(x, t, images, k=k, boundary=boundary, wrap_patches=wrap_patches,
                schedule=schedule, mask=mask, block=block, method=method)
    return conversions.x0_to_score(x0, x, t, schedule=schedule)


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "schedule",
                                             "block", "ideal", "method", "mesh"))
def stream_x0(x, t, images, log_w, mu=None, *, k, boundary, wrap_patches, schedule,
              block, ideal=False, method="window", mesh=None):
    """x̂_0 [B, H, W, C] with candidates extracted from the images chunk by chunk (no bank);
    ``method`` the main pass's engine ("window" | "row"), already resolved.

    mu: the per-channel data mean [C] (default: of ``images``). With a ``mesh`` (one axis,
    "cands"; N divisible by its size) each device streams its share of the images and
    ``log_w``, the per-pass softmax states are merged exactly, and ``mu`` must be the mean of
    the whole data set (it fixes the constant dropped from every logit, so it must be the same
    on every device)."""
    bsz, h, w, c = x.shape
    if mu is None:
        mu = jnp.mean(images, axis=(0, 1, 2))
    lay = row_lib.row_layout(k, boundary, wrap_patches, h, w) if method == "row" else None
    groups = geo.grouped_passes(k, boundary, wrap_patches, h, w, ideal, method)
    with_border = boundary == "zeros" and not ideal and k > 1     # k = 1 has no border

    def states(x, t, images, log_w, mu):
        out = stream_states(x, t, images, log_w, mu, k=k, schedule=schedule, block=block,
                            lay=lay, groups=groups)
        if with_border:
            a, b2 = geo.coefficients(t, bsz, schedule)
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
        results.append((row_lib.row_pixels(lay, w), row_lib.row_output(sts[0], bsz, lay)))
        sts = sts[1:]
    results += [window_lib.window_result(gp, st, bsz) for gp, st in zip(groups, sts)]
    if with_border:
        m = k // 2
        shift = jnp.broadcast_to(mu[:, None, None, None], (c, 2 * m, 2 * m, 1))
        results += border_lib.border_results(sts[len(groups)], x.shape, k, shift)
    return geo.scatter(x.shape, results)


def stream_states(x, t, images, log_w, mu, *, k, schedule, block, lay, groups):
    """The softmax state of every pass (the row engine's main pass if ``lay``, then each batch
    of window groups) over the candidates of ``images``, streamed a chunk of images at a
    time."""
    a, b2 = geo.coefficients(t, x.shape[0], schedule)
    out = []
    if lay is not None:
        x_rows = row_lib.row_queries(x, a, b2, k, lay, mu)
        out.append(row_lib.images_state(x_rows, images, log_w, mu, k, lay, block))
    for gp in groups:
        out.append(window_lib.images_state(x, a, b2, images, log_w, mu, k, gp, block))
    return tuple(out)


# ----------------------------------------------------------------------------------------
# Candidate banks: built once per (data set, k, boundary, mask), reused at every step.


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
    method: str            # engine of the main pass: "window" | "row" | "native" | "window_native"
    chunks: tuple          # candidates per chunk (power of two) of each window bank
    row_images: int        # images per chunk of the row bank (power of two), 0 if none
    unique_fraction: float
    border_images: int = 0  # images per chunk of the border bank's bands, 0 if none


def build_bank(images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
               dedup: bool = True, method: str = "auto", block: int = DEFAULT_BLOCK,
               n_shards: int = 1, ideal: bool = False, chunk: int | None = None,
               dedup_threshold: float = 0.9, images_per_step: int = 64,
               unique_fraction: float | None = None):
    """Precomputes the candidates of the ELS machine (or of the ideal machine).

    With ``dedup``, identical candidate windows (same pixels, same value) are merged into one
    candidate with their count, when an estimate on a sample says that removes at least
    1 − ``dedup_threshold`` of them (set 1.0 to always merge). The main pass uses the engine
    ``method`` ("auto": ``engines.resolve_els_engine``, given that estimate). The mask
    (class-conditional) is applied by passing only the selected images.

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
        method = engines_lib.resolve_els_engine(
            method, k, c, h, boundary, unique_fraction if dedup else 1.0, banked=True, w=w,
            wrap_patches=bool(wrap_patches), n=n, sharded=n_shards > 1,
            block=int(block)).engine
    windows, chunks = [], []
    for gp in geo.grouped_passes(k, boundary, wrap_patches, h, w, ideal, method):
        bank, ch = window_lib.build_window_bank(images, k, gp, mu, dedup=dedup, block=block,
                                                n_shards=n_shards, chunk=chunk,
                                                images_per_step=images_per_step)
        windows.append(bank)
        chunks.append(ch)
    row, row_images = None, 0
    if method == "row":
        row, row_images = row_lib.build_row_bank(
            images, k, row_lib.row_layout(k, boundary, wrap_patches, h, w), mu, block=block,
            n_shards=n_shards)
    border, border_images = None, 0
    if boundary == "zeros" and not ideal and k > 1:              # k = 1 has no border
        border_images = border_lib.band_chunk_images(n, k, h, w, block)
        per = border_images * n_shards
        border = border_lib.build_border_bank(images, k, mu, -(-n // per) * per)
    interior = None
    if method == "native":
        interior = interior_lib.build_interior_bank(images, k, mu, n_shards)
    spec = BankSpec(int(k), boundary, bool(wrap_patches), bool(ideal), method, tuple(chunks),
                    int(row_images), float(unique_fraction), int(border_images))
    return MachineBank(jnp.asarray(mu), row, tuple(windows), border, interior), spec


def bank_partition_specs(bank: MachineBank) -> MachineBank:
    """How ``bank_x0`` splits a MachineBank over a one-axis "cands" mesh (a tree of
    PartitionSpecs shaped like ``bank``): every bank along its candidate axis, μ replicated.
    ``make_machine`` places its banks this way once, so calls do not move them."""
    from jax.sharding import PartitionSpec as P
    row = None if bank.row is None else row_lib.ROW_SPECS
    border = None if bank.border is None else border_lib.border_partition_specs()
    interior = None if bank.interior is None else interior_lib.INTERIOR_SPECS
    return MachineBank(P(), row, tuple(window_lib.WINDOW_SPECS for _ in bank.windows), border,
                       interior)


@functools.partial(jax.jit, static_argnames=("spec", "schedule", "mesh", "block"))
def bank_x0(x, t, bank: MachineBank, *, spec: BankSpec, schedule, mesh=None,
            block: int = DEFAULT_BLOCK):
    """x̂_0 [B, H, W, C] from a precomputed bank (``build_bank``), optionally sharded.

    With a ``mesh`` (one axis, "cands"), each bank's candidates are split over the devices;
    each device streams its own part and the partial softmax states are merged exactly
    (softmax.merge_across), so the result equals the single-device one.
    """
    bsz, h, w, c = x.shape
    a, b2 = geo.coefficients(t, bsz, schedule)
    k = spec.k
    results = []
    if spec.method == "row":
        lay = row_lib.row_layout(k, spec.boundary, spec.wrap_patches, h, w)
        results.append(row_lib.bank_result(x, a, b2, k, lay, bank.row, spec.row_images,
                                           bank.mu, mesh, block))
    if spec.method == "native":
        results.append(interior_lib.interior_result(x, a, b2, k, bank.interior, bank.mu, mesh,
                                                    block))
    groups = geo.grouped_passes(k, spec.boundary, spec.wrap_patches, h, w, spec.ideal,
                                spec.method)
    for gi, (gp, wbank, chunk) in enumerate(zip(groups, bank.windows, spec.chunks)):
        kernel = gi == 0 and spec.method == "window_native"      # the main pass
        results.append(window_lib.bank_result(x, a, b2, k, gp, wbank, chunk, bank.mu, mesh,
                                              block, kernel=kernel))
    if bank.border is not None:
        def run_border(x, a, b2, mu, border_bank):
            return border_lib.border_states(x, a, b2, border_bank, k=k, mu=mu, block=block,
                                            band_images=spec.border_images)
        if mesh is not None:
            run_border = geo.sharded_bank_call(run_border, mesh,
                                               border_lib.border_partition_specs())
        states = run_border(x, a, b2, bank.mu, bank.border)
        results += border_lib.border_results(states, x.shape, k, bank.border.corners.mean[0])
    return geo.scatter(x.shape, results)

"""The passes of the ELS (and ideal) machines assembled from the engines: candidates streamed
straight from the images (``stream_x0``: memory independent of N) or precomputed once into a
bank (``build_bank`` + ``bank_x0``: what ``make_machine`` uses; identical windows optionally
merged into one candidate of log w = log count; splittable over a device mesh).

The main pass (every pixel; the interior for "zeros") runs on one of four exact engines, one
module each (two share one):

  "window" (``window.py``)    one dot product of length k²C + 2 per pair; the only engine
                              for merged banks and the ideal machine; any backend.
  "row"    (``row.py``)       k row products of length kC + 2 and a k-row box sum per pair;
                              any backend.
  "native" (``interior.py``)  the fused C++ kernel of ``native.py`` (zero padding, banked,
                              CPU only); derivatives from its XLA twin.
  "window_native"             the window engine's bank (merged or not) run by the fused C++
              (``window.py``) kernel of ``native.py`` (banked, CPU only); derivatives from
                              the "window" engine.
  "shiftmap" (``shiftmap.py``) every pixel (border included) from the shift maps
                              f_d = Σ_c (x − a·y(·+d))² and their k×k box sums: O(C) per
                              pair whatever k, straight from the images (no bank); the
                              fused CPU kernel, or its jnp form off the CPU.

The zero-padded border (edges and corners) is always ``border.py``'s. Which engine runs is
decided above this module (``select.resolve_els_engine``, called by the machines): here it
arrives resolved. Everything takes the coefficients a, b² [B], never a time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core import softmax
from els_jax.core.data import unit_images
from els_jax.engines import border as border_lib
from els_jax.engines import interior as interior_lib
from els_jax.engines import layout as geo
from els_jax.engines import native
from els_jax.engines import row as row_lib
from els_jax.engines import shiftmap as shiftmap_lib
from els_jax.engines import window as window_lib
from els_jax.engines.interior import InteriorBank
from els_jax.engines.layout import DEFAULT_BLOCK
from els_jax.engines.row import RowBank
from els_jax.engines.window import estimate_unique_fraction

__all__ = ["stream_x0", "stream_states", "MachineBank", "BankSpec", "merge_plan", "build_bank",
           "bank_x0", "bank_partition_specs", "ENGINES"]

# The exact engines of the main pass (resolved names; "auto" is the selector's).
ENGINES = ("window", "row", "native", "window_native")


@functools.partial(jax.jit, static_argnames=("k", "boundary", "wrap_patches", "block", "ideal",
                                             "method", "mesh"))
def stream_x0(x, a, b2, images, log_w, mu=None, *, k, boundary, wrap_patches, block,
              ideal=False, method="window", mesh=None):
    """x̂_0 [B, H, W, C] with candidates extracted from the images chunk by chunk (no bank);
    a, b2: [B]; ``method`` the main pass's engine ("window" | "row"), or "shiftmap" (every
    pixel by ``shiftmap.py``: no window is extracted, no border pass), already resolved.
    With zero padding on one device where the CPU kernels run, the other engines' border
    pixels come from the shift-map kernel (``border.kernel_border_results``), elsewhere from
    ``border.py``'s streamed pass.

    mu: the per-channel data mean [C] (default: of ``images``). With a ``mesh`` (one axis,
    "cands"; N divisible by its size) each device streams its share of the images and
    ``log_w``, the per-pass softmax states are merged exactly, and ``mu`` must be the mean of
    the whole data set (it fixes the constant dropped from every logit, so it must be the same
    on every device)."""
    bsz, h, w, c = x.shape
    if method == "shiftmap":              # every pixel, border included, in one engine
        def state_of(x, a, b2, images, log_w):
            return shiftmap_lib.shiftmap_state(x, a, b2, images, log_w, k=k, boundary=boundary,
                                               wrap_patches=wrap_patches, block=block)

        def shift_path(x, a, b2, images, log_w, mu):
            if mesh is None:
                return softmax.finalize(state_of(x, a, b2, images, log_w))
            from jax.sharding import PartitionSpec as P
            return softmax.finalize(softmax.sharded(
                state_of, mesh, (P(), P(), P(), P("cands"), P("cands")))(x, a, b2, images, log_w))

        def window_path(x, a, b2, images, log_w, mu):
            return stream_x0(x, a, b2, unit_images(images), log_w, mu, k=k, boundary=boundary,
                             wrap_patches=wrap_patches, block=block, method="window", mesh=mesh)
        # Values from the shift maps, derivatives from the window engine (tested against the
        # reference's): its matmul per chunk differentiates faster than the shift maps' scan
        # over every shift (whose own derivatives are exact as well: tests/test_autodiff.py).
        mu = jnp.mean(unit_images(images), axis=(0, 1, 2)) if mu is None else mu
        return native.with_reference_derivatives(shift_path, window_path)(
            x, a, b2, images, log_w, mu)
    images = unit_images(images)          # uint8 pixels: the window and row engines read floats
    if mu is None:
        mu = jnp.mean(images, axis=(0, 1, 2))
    lay = row_lib.row_layout(k, boundary, wrap_patches, h, w) if method == "row" else None
    groups = geo.grouped_passes(k, boundary, wrap_patches, h, w, ideal, method)
    with_border = boundary == "zeros" and not ideal and k > 1     # k = 1 has no border
    kernel_border = with_border and mesh is None and border_lib.kernel_border_ok()

    def states(x, a, b2, images, log_w, mu):
        out = stream_states(x, a, b2, images, log_w, mu, k=k, block=block, lay=lay,
                            groups=groups)
        if with_border and not kernel_border:
            out = out + (border_lib.stream_border_states(x, a, b2, images, log_w, k=k, mu=mu,
                                                         block=block),)
        return out

    if mesh is None:
        sts = states(x, a, b2, images, log_w, mu)
    else:
        from jax.sharding import PartitionSpec as P
        sts = softmax.sharded(states, mesh, (P(), P(), P(), P("cands"), P("cands"), P()))(
            x, a, b2, images, log_w, mu)
    results = []
    if lay is not None:
        results.append((row_lib.row_pixels(lay, w), row_lib.row_output(sts[0], bsz, lay)))
        sts = sts[1:]
    results += [window_lib.window_result(gp, st, bsz) for gp, st in zip(groups, sts)]
    if kernel_border:
        results += border_lib.kernel_border_results(x, a, b2, images, log_w, k=k, mu=mu,
                                                    block=block)
    elif with_border:
        results += border_lib.border_results(sts[len(groups)], x.shape, k,
                                             border_lib.corner_shift(mu, k))
    return geo.scatter(x.shape, results)


def stream_states(x, a, b2, images, log_w, mu, *, k, block, lay, groups):
    """The softmax state of every pass (the row engine's main pass if ``lay``, then each batch
    of window groups) over the candidates of ``images``, streamed a chunk of images at a
    time; a, b2: [B]."""
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
    padding the border engine's bank (``border.BorderBank``) or None, the fused kernel's
    bank of the main pass (``InteriorBank``, method "native") or None, and, where the
    zero-padded border runs on the shift-map kernel instead of a BorderBank
    (``BankSpec.border_kernel``), the training images it reads [N, H, W, C] (float32, or
    uint8 pixels: the machine's own array, not a copy) or None."""

    mu: jax.Array
    row: RowBank | None
    windows: tuple
    border: border_lib.BorderBank | None = None
    interior: InteriorBank | None = None
    images: jax.Array | None = None


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
    border_kernel: bool = False  # zero padding's border from the shift-map kernel (bank.images)


def merge_plan(images, *, k: int, boundary: str = "circular", wrap_patches: bool = False,
               dedup: bool = True, ideal: bool = False, dedup_threshold: float = 0.9,
               unique_fraction: float | None = None) -> tuple[bool, float]:
    """(merge, unique_fraction): whether a bank merges identical candidate windows, and the
    estimated fraction of distinct ones (1.0 without ``dedup``). Windows are merged when an
    estimate on a sample says that removes at least 1 − ``dedup_threshold`` of them.
    ``unique_fraction``: a precomputed ``estimate_unique_fraction`` (skips the estimate)."""
    if not dedup:
        return False, 1.0
    if unique_fraction is None:
        unique_fraction = estimate_unique_fraction(images, k=k, boundary=boundary,
                                                   wrap_patches=wrap_patches, ideal=ideal)
    return unique_fraction <= dedup_threshold, float(unique_fraction)


def build_bank(images, *, k: int, method: str, boundary: str = "circular",
               wrap_patches: bool = False, dedup: bool = True, block: int = DEFAULT_BLOCK,
               n_shards: int = 1, ideal: bool = False, chunk: int | None = None,
               dedup_threshold: float = 0.9, images_per_step: int = 64,
               unique_fraction: float | None = None, held_images=None):
    """Precomputes the candidates of the ELS machine (or of the ideal machine).

    With ``dedup``, identical candidate windows (same pixels, same value) are merged into one
    candidate with their count (``merge_plan``). The main pass uses the engine ``method``
    ("window" | "row" | "native" | "window_native", resolved by the machine with
    ``select.resolve_els_engine``; the ideal machine always "window"). The mask
    (class-conditional) is applied by passing only the selected images.

    With zero padding, the border pixels get a ``border.BorderBank``, except where the CPU
    kernels run on one device (``border.kernel_border_ok``): there the shift-map kernel
    reads them from the images at every call, and the bank keeps a reference to them,
    ``held_images`` (the same images as the caller holds them on the device, float32 or uint8;
    default: a float32 copy).

    Returns (MachineBank, BankSpec); banks are padded to whole chunks × ``n_shards``.
    """
    images = np.asarray(unit_images(images), np.float32)
    n, h, w, c = images.shape
    mu = images.mean(axis=(0, 1, 2))
    dedup, unique_fraction = merge_plan(images, k=k, boundary=boundary,
                                        wrap_patches=wrap_patches, dedup=dedup, ideal=ideal,
                                        dedup_threshold=dedup_threshold,
                                        unique_fraction=unique_fraction)
    if ideal:
        method = "window"
    if method not in ENGINES:
        raise ValueError(f"build_bank needs a resolved engine, one of {ENGINES}; got "
                         f"{method!r} (machines resolve 'auto' with select.resolve_els_engine)")
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
    border, border_images, held = None, 0, None
    border_kernel = (boundary == "zeros" and not ideal and k > 1
                     and border_lib.kernel_border_ok(n_shards))
    if border_kernel:
        held = jnp.asarray(images) if held_images is None else held_images
        if tuple(held.shape) != (n, h, w, c):
            raise ValueError(f"held_images must be the {n} images {(h, w, c)} of the bank; got "
                             f"shape {tuple(held.shape)}")
    elif boundary == "zeros" and not ideal and k > 1:            # k = 1 has no border
        border_images = border_lib.band_chunk_images(n, k, h, w, block)
        per = border_images * n_shards
        border = border_lib.build_border_bank(images, k, mu, -(-n // per) * per)
    interior = None
    if method == "native":
        interior = interior_lib.build_interior_bank(images, k, mu, n_shards)
    spec = BankSpec(int(k), boundary, bool(wrap_patches), bool(ideal), method, tuple(chunks),
                    int(row_images), float(unique_fraction), int(border_images),
                    bool(border_kernel))
    return MachineBank(jnp.asarray(mu), row, tuple(windows), border, interior, held), spec


def bank_partition_specs(bank: MachineBank) -> MachineBank:
    """How ``bank_x0`` splits a MachineBank over a one-axis "cands" mesh (a tree of
    PartitionSpecs shaped like ``bank``): every bank along its candidate axis, μ replicated.
    ``make_machine`` places its banks this way once, so calls do not move them."""
    from jax.sharding import PartitionSpec as P
    row = None if bank.row is None else row_lib.ROW_SPECS
    border = None if bank.border is None else border_lib.border_partition_specs()
    interior = None if bank.interior is None else interior_lib.INTERIOR_SPECS
    return MachineBank(P(), row, tuple(window_lib.WINDOW_SPECS for _ in bank.windows), border,
                       interior, None if bank.images is None else P())


@functools.partial(jax.jit, static_argnames=("spec", "mesh", "block"))
def bank_x0(x, a, b2, bank: MachineBank, *, spec: BankSpec, mesh=None,
            block: int = DEFAULT_BLOCK):
    """x̂_0 [B, H, W, C] from a precomputed bank (``build_bank``), optionally sharded; a, b2: [B].

    With a ``mesh`` (one axis, "cands"), each bank's candidates are split over the devices;
    each device streams its own part and the partial softmax states are merged exactly
    (softmax.merge_across), so the result equals the single-device one.
    """
    bsz, h, w, c = x.shape
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
    if spec.border_kernel:
        results += border_lib.kernel_border_results(
            x, a, b2, bank.images, jnp.zeros((bank.images.shape[0],), jnp.float32), k=k,
            mu=bank.mu, block=block)
    return geo.scatter(x.shape, results)

"""Analytic machines as sampler models: ``make_machine`` → ``eps_fn(x, t, i)`` (SPEC §2–3).

    eps_fn = make_machine("els", images, scales=[3, 3, 5, ...], boundary="zeros")
    x0 = sample(eps_fn, x_T, uniform_times(len(scales)))

``scales`` holds one patch size per sampler step with index 0 = the lowest-noise (last) step,
as in the authors' scale files: step i of an m-step run uses scales[m − 1 − i]. A plain int
means one size for every step. The step is chosen by the sampler's step index, never by
rounding a float32 t. The machine's ``num_steps`` lets ``sample`` reject a grid of another
length.

Everything that does not depend on x is built once here: the class-conditional selection of
images, and for the ideal and ELS machines one deduplicated candidate bank per distinct patch
size (optionally sharded over the devices of a mesh); each patch size compiles once.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from els_jax import conversions, els, patches
from els_jax import schedules as schedules_lib
from els_jax.equivariant import equivariant_x0
from els_jax.local import _check_local_k, local_x0
from els_jax.validation import check_patch_size

__all__ = ["Machine", "make_machine", "MACHINES", "candidate_mesh"]

MACHINES = ("ideal", "equivariant", "local", "els")


def candidate_mesh(devices=None):
    """A one-axis mesh ("cands") over ``devices`` (default: all) for sharding candidate banks."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), ("cands",))


class Machine:
    """A callable sampler model ``eps_fn(x, t, i) -> ε̂`` wrapping an analytic machine.

    Attributes:
      kind: "ideal" | "equivariant" | "local" | "els".
      scales: tuple of patch sizes (index 0 = last step) or None (one size / no size).
      num_steps: len(scales) when a list was given, else None (any grid length).
    Methods:
      x0(x, t, i): the machine's x̂_0; score(x, t, i): its score; patch_size(i).
    """

    def __init__(self, kind, x0_fns, scales, schedule, k_const):
        self.kind = kind
        self._x0_fns = x0_fns                     # patch size (or None) -> fn(x, t)
        self.scales = scales
        self.num_steps = None if scales is None else len(scales)
        self.schedule = schedule
        self._k_const = k_const

    def patch_size(self, i: int):
        if self.scales is None:
            return self._k_const
        if not 0 <= i < len(self.scales):
            raise ValueError(f"step index {i} is outside the {len(self.scales)}-step scale list")
        return self.scales[len(self.scales) - 1 - i]

    def x0(self, x, t, i: int):
        return self._x0_fns[self.patch_size(i)](x, t)

    def score(self, x, t, i: int):
        return conversions.x0_to_score(self.x0(x, t, i), x, t, schedule=self.schedule)

    def __call__(self, x, t, i: int):
        return conversions.x0_to_eps(self.x0(x, t, i), x, t, schedule=self.schedule)

    def __repr__(self):
        return f"Machine({self.kind!r}, scales={self.scales}, num_steps={self.num_steps})"


def _normalise_scales(kind, scales):
    if kind in ("ideal", "equivariant"):
        return None, None
    if scales is None:
        raise ValueError(f"the {kind!r} machine needs scales (an odd patch size or a list)")
    if isinstance(scales, (int, np.integer)):
        return None, int(scales)
    scales = tuple(int(k) for k in scales)
    if not scales:
        raise ValueError("scales is empty")
    return scales, None


def make_machine(kind: str, images, *, scales: int | Sequence[int] | None = None,
                 boundary: str = "circular", wrap_patches: bool = False,
                 schedule=schedules_lib.Cosine(), mask=None, dedup: bool = True,
                 mesh=None, chunk: int = 2048, bank_bytes: int = 2 << 30) -> Machine:
    """Builds an analytic machine as a sampler model.

    Args:
      kind: "ideal", "equivariant", "local" or "els".
      images: training set [N, H, W, C] in [−1, 1].
      scales: local/els only: an odd patch size, or one per step (index 0 = last step).
      boundary, wrap_patches: els only (see ``els_score``).
      schedule: the noise schedule (a Schedule or its name).
      mask: optional boolean [N] (class-conditional: the images of one label).
      dedup: merge identical candidate windows (exact; ideal and els).
      mesh: optional ``candidate_mesh()``: shard the candidate banks over its devices.
      chunk: candidates per streamed chunk of a bank.
      bank_bytes: largest bank (before dedup) to precompute; larger data sets are streamed
        straight from the images instead (memory independent of N).
    Returns:
      a Machine: ``eps_fn(x, t, i)`` for ``els_jax.sample``.
    """
    if kind not in MACHINES:
        raise ValueError(f"unknown machine {kind!r}; choose one of {MACHINES}")
    if boundary not in patches.BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; choose one of {patches.BOUNDARIES}")
    schedule = schedules_lib.get(schedule)
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != (images.shape[0],):
            raise ValueError(f"mask must be a boolean vector over the {images.shape[0]} "
                             f"training images; got shape {mask.shape}")
        if not mask.any():
            raise ValueError("mask selects no training image")
        images = images[mask]
    n, h, w, c = images.shape
    scale_list, k_const = _normalise_scales(kind, scales)
    sizes = sorted(set(scale_list)) if scale_list is not None else [k_const]
    n_shards = 1 if mesh is None else mesh.devices.size
    images_j = jnp.asarray(images)

    def bank_fn(k, ideal=False):
        mu, banks = els.build_bank(images, k=k, boundary=boundary, wrap_patches=wrap_patches,
                                   dedup=dedup, chunk=chunk, n_shards=n_shards, ideal=ideal)

        def fn(x, t):
            return els.bank_x0(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), mu,
                               banks, k=k, boundary=boundary, wrap_patches=wrap_patches,
                               schedule=schedule, chunk=chunk, mesh=mesh, ideal=ideal)
        return fn

    fns = {}
    if kind == "ideal":
        fns[None] = bank_fn(0, ideal=True)
    elif kind == "equivariant":
        fns[None] = lambda x, t: equivariant_x0(x, t, images_j, schedule=schedule)
    else:
        for k in sizes:
            if kind == "local" or (boundary == "zeros" and k >= min(h, w)):
                k = _check_local_k(k, h, w)          # SPEC: zero-padded ELS with k ≥ H is LS
                fns[k] = lambda x, t, k=k: local_x0(x, t, images_j, k=k, schedule=schedule)
                continue
            k = els._check_els_k(k, h, w, boundary, wrap_patches)
            n_cand = n * (h * w if (wrap_patches or boundary == "zeros") else
                          (h - k + 1) * (w - k + 1))
            if n_cand * (k * k * c + c + 2) * 4 <= bank_bytes:
                fns[k] = bank_fn(k)
            else:
                fns[k] = lambda x, t, k=k: els.els_x0(x, t, images_j, k=k, boundary=boundary,
                                                      wrap_patches=wrap_patches,
                                                      schedule=schedule)
    return Machine(kind, fns, scale_list, schedule, k_const)

"""An analytic machine as a sampler model: ``Machine``, ``eps_fn(x, t, i) -> ε̂`` (docs §3).

Time enters here once per call: ``Machine`` turns t into the coefficients a, b² of its
queries (``schedules.query_coefficients``) and calls the x̂_0 function of the step's patch size
with them; the ε̂ / score conversions use the same coefficients. ``make_machine``
(``factory.py``) builds the functions; ``soft.SoftMachine`` adds a width σ per step.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from els_jax.core import conversions
from els_jax.core import schedules as schedules_lib

__all__ = ["Machine", "candidate_mesh", "inputs", "device_images", "host_copies"]


def candidate_mesh(devices=None):
    """A one-axis mesh ("cands") over ``devices`` (default: all) for sharding candidate banks."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), ("cands",))


class Machine:
    """A callable sampler model ``eps_fn(x, t, i) -> ε̂`` wrapping an analytic machine.

    Attributes:
      kind: "ideal" | "equivariant" | "local" | "els" | "gaussian" | "nearest" | "pca_locality".
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

    def coefficients(self, x, t) -> schedules_lib.Coefficients:
        """a, b² [B] of the queries x [B, H, W, C] at time t (scalar or [B]): the only place
        a machine reads t."""
        return _query_coefficients(t, int(np.shape(x)[0]), self.schedule)

    def lower(self, x, t, i: int):
        """The jitted computation of ``x0(x, t, i)`` lowered for these shapes (``.compile()``
        it to compile ahead of the first call, or for its ``memory_analysis()``)."""
        fn = self._x0_fns[self.patch_size(i)]
        return fn.lower(x, self.coefficients(x, t)) if hasattr(fn, "lower") else None

    def compile(self, x, t=0.5) -> float:
        """Compiles the computation of every distinct patch size for queries shaped like x
        [B, H, W, C]. XLA keeps the compiled executables, so the sampler's first call per
        patch size only traces (milliseconds) instead of compiling. Returns the seconds spent."""
        start = time.perf_counter()
        x = jnp.asarray(x, jnp.float32)
        coeffs = self.coefficients(x, t)
        for fn in self._x0_fns.values():
            if hasattr(fn, "lower"):
                fn.lower(x, coeffs).compile()
        return time.perf_counter() - start

    def engine(self, i: int) -> dict:
        """How step i is computed: {"engine": "window" | "row" | "local" | ..., "bank": bool,
        "unique_fraction": estimated fraction of distinct candidate windows}."""
        return dict(getattr(self._x0_fns[self.patch_size(i)], "info", {"engine": self.kind}))

    def explain(self) -> dict:
        """How every patch size is computed and why: {k: {"engine", "reason", "times", "bank",
        ...}} (k = None for a machine without patch sizes). engine: the ELS main pass's
        "window" | "row" | "native" | "window_native" | "shiftmap", LS's "kernel" | "xla",
        the ideal machine's "stream" (one device) or "window" (a mesh's bank), or the
        machine's one engine;
        reason: what decided (measured probe times, cached or not, the static rule, an
        explicit method; ``els_jax.engines``); times: seconds per probe call of each engine
        when they were measured; border (a banked zero-padded size): "shift-map kernel" or
        "border bank" (``engines/border.py``). LS picks its engine per query batch when first
        traced: this is the pick for the batch of ``compile_for`` (else B = 1)."""
        out = {}
        for k, fn in self._x0_fns.items():
            info = dict(getattr(fn, "info", {"engine": self.kind}))
            info.update(getattr(fn, "why", {"reason": "the only engine of this machine"}))
            out[k] = info
        return out

    def for_size(self, k):
        """The sampler model ``eps_fn(x, t, i)`` of this machine at patch size ``k`` (one of its
        sizes) at every step, e.g. a calibration's candidates from one machine built over all
        of them (its banks built while the previous size compiles)."""
        if k not in self._x0_fns:
            raise ValueError(f"patch size {k} is not one of this machine's "
                             f"{sorted(self._x0_fns)}")
        fn = self._x0_fns[k]

        def eps_fn(x, t, i=None):
            coeffs = self.coefficients(x, t)
            return _x0_to_eps_at(fn(x, coeffs), x, coeffs)
        return eps_fn

    def bank_spec(self, i: int):
        """The ``passes.BankSpec`` used at step i (engine, chunking, dedup), or None (no bank)."""
        return getattr(self._x0_fns[self.patch_size(i)], "spec", None)

    def x0_at(self, x, coeffs, i: int):
        """x̂_0 at step i from the coefficients (``coefficients``)."""
        return self._x0_fns[self.patch_size(i)](x, coeffs)

    def x0(self, x, t, i: int):
        return self.x0_at(x, self.coefficients(x, t), i)

    def score(self, x, t, i: int):
        coeffs = self.coefficients(x, t)
        return _x0_to_score_at(self.x0_at(x, coeffs, i), x, coeffs)

    def __call__(self, x, t, i: int):
        coeffs = self.coefficients(x, t)
        return _x0_to_eps_at(self.x0_at(x, coeffs, i), x, coeffs)

    def __repr__(self):
        return f"Machine({self.kind!r}, scales={self.scales}, num_steps={self.num_steps})"


# A machine's boundary (t → a, b²; x̂_0 → ε̂ or s) as one compiled program each, not a dozen
# eager operations per sampling step (each compiled on its first use: 0.4 s of a cold
# 20-step run, and dispatched one by one at every step). Under an outer jit they inline.
_query_coefficients = jax.jit(schedules_lib.query_coefficients, static_argnums=(1, 2))
_x0_to_eps_at = jax.jit(conversions.x0_to_eps_at)
_x0_to_score_at = jax.jit(conversions.x0_to_score_at)


def inputs(x, coeffs, mesh):
    """Queries and their a, b² [B] as float32 (x, a, b2); with a mesh, replicated over it. The
    sampler's x_T lives on one device and every later x on the mesh (a machine's outputs are
    replicated there): placing both the same way gives one input sharding, so one executable
    per patch size."""
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(coeffs.a, jnp.float32),
            jnp.asarray(coeffs.b2, jnp.float32))
    if mesh is None:
        return args
    return jax.device_put(args, NamedSharding(mesh, PartitionSpec()))


def device_images(images, host) -> jax.Array:
    """The training images on the device for a machine to hold: ``images`` itself when the
    caller passed a float32 (or uint8) jax array and ``host`` is its host view (no mask cut
    it), else a device copy of ``host`` (float32 or uint8 numpy). A jax array is immutable, so holding it is safe
    and, on a CPU, keeps one copy of the images in memory instead of two (the host view of a
    CPU array, ``np.asarray(images)``, shares its buffer): pass a jax array to hold 50 000 or
    162 770 images once."""
    if (isinstance(images, jax.Array) and images.dtype == host.dtype
            and images.dtype in (jnp.float32, jnp.uint8) and host.shape == images.shape):
        return images
    return jnp.asarray(host)


def host_copies(images) -> int:
    """How many copies of ``images`` (in their own dtype, float32 or uint8) a machine built
    from them holds on the host (1 for a float32 or uint8 jax array, held as it is; 2 for
    anything else: the host array and a device copy)."""
    return 1 if isinstance(images, jax.Array) and images.dtype in (jnp.float32, jnp.uint8) else 2

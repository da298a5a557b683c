"""Accelerator rule, checked on the CPU: every dot product a machine computes runs at HIGHEST
precision.

On GPUs and TPUs a float32 ``dot_general`` at DEFAULT precision runs in TF32 or bf16 (10 or 7
mantissa bits); at small t, where |logit| reaches 10³–10⁴, that is several nats of error
(docs/theory.md §9). The CPU ignores the precision flag, so a wrong flag would go unnoticed
here: this test reads it from the traced program instead. It walks the jaxpr of every machine
(functional and ``make_machine``, every kind, both boundaries, the derivative program too) into
every sub-computation (scan bodies, jit calls, custom_jvp rules) and fails on any dot_general
(or convolution) whose precision is not HIGHEST for both operands.
"""

import jax
import jax.extend  # noqa: F401  (jax.extend.core: not imported by `import jax`)
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej

HIGHEST = jax.lax.Precision.HIGHEST
H = W = 6
N = 7


def _subjaxprs(params):
    for v in params.values():
        vals = v if isinstance(v, (tuple, list)) else (v,)
        for u in vals:
            if isinstance(u, jax.extend.core.ClosedJaxpr):
                yield u.jaxpr
            elif isinstance(u, jax.extend.core.Jaxpr):
                yield u


def all_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of its sub-computations (each visited once)."""
    stack, seen = [jaxpr], set()
    while stack:
        jx = stack.pop()
        if id(jx) in seen:
            continue
        seen.add(id(jx))
        for eqn in jx.eqns:
            yield eqn
            stack.extend(_subjaxprs(eqn.params))


def low_precision_dots(jaxpr) -> list[str]:
    """Every dot_general / conv in ``jaxpr`` (recursively) not at HIGHEST for both operands."""
    bad = []
    for eqn in all_eqns(jaxpr):
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            prec = eqn.params.get("precision")
            precs = prec if isinstance(prec, tuple) else (prec, prec)
            if any(p != HIGHEST for p in precs):
                shapes = [tuple(v.aval.shape) for v in eqn.invars]
                bad.append(f"{name} {shapes} precision={prec}")
    return bad


def _data(c=1):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (N, H, W, c)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(2, H, W, c)), jnp.float32)
    return images, x


FUNCTIONAL = {
    "ideal": lambda x, t, im: ej.ideal_score(x, t, im),
    "equivariant": lambda x, t, im: ej.equivariant_score(x, t, im),
    "local": lambda x, t, im: ej.local_score(x, t, im, k=3),
    "els circular": lambda x, t, im: ej.els_score(x, t, im, k=3),
    "els circular wrap": lambda x, t, im: ej.els_score(x, t, im, k=3, wrap_patches=True),
    "els zeros": lambda x, t, im: ej.els_score(x, t, im, k=3, boundary="zeros"),
    "els row": lambda x, t, im: ej.els_score(x, t, im, k=3, method="row"),
    "els shiftmap": lambda x, t, im: ej.els_score(x, t, im, k=3, boundary="zeros",
                                                  method="shiftmap"),
    "gaussian": lambda x, t, im: ej.gaussian_score(x, t, im),
    "nearest": lambda x, t, im: ej.nearest_score(x, t, im),
    "pca_locality": lambda x, t, im: ej.pca_locality_score(x, t, im),
    "els_soft": lambda x, t, im: ej.els_soft_score(x, t, im, sigma=1.0, k_max=3),
    "els_soft xla": lambda x, t, im: ej.els_soft_score(x, t, im, sigma=1.0, k_max=3,
                                                       boundary="zeros", engine="xla"),
    "scfdm": lambda x, t, im: ej.scfdm_score(x, t, im, key=jax.random.PRNGKey(0)),
    "scfdm top-k": lambda x, t, im: ej.scfdm_score(x, t, im, key=jax.random.PRNGKey(0),
                                                   top_k=3),
    "reference els": lambda x, t, im: ej.reference_score(x, t, im, kind="els", k=3),
}


@pytest.fixture(params=["cpu", "accelerator"])
def platform(request, monkeypatch):
    """Each machine traced twice: as on this CPU (its fused kernels, where they build, chosen
    at trace time) and as on a GPU or TPU (no CPU kernels: every XLA twin is traced)."""
    if request.param == "accelerator":
        from els_jax.engines import native
        monkeypatch.setattr(native, "available", lambda: False)
    jax.clear_caches()        # no program traced under the other platform's engines
    yield request.param
    jax.clear_caches()


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_machines_and_their_gradients_use_highest(name, platform):
    images, x = _data(c=2)
    fn = FUNCTIONAL[name]
    jaxpr = jax.make_jaxpr(lambda x: fn(x, jnp.float32(0.05), images))(x).jaxpr
    assert not low_precision_dots(jaxpr), low_precision_dots(jaxpr)
    grad = jax.make_jaxpr(jax.grad(lambda x: fn(x, jnp.float32(0.05), images).sum()))(x).jaxpr
    assert not low_precision_dots(grad), low_precision_dots(grad)


MACHINES = [("ideal", {}), ("equivariant", {}), ("local", {"scales": 3}),
            ("els", {"scales": [3, 5], "boundary": "circular"}),
            ("els", {"scales": [3, 5], "boundary": "zeros"}),
            ("els", {"scales": 3, "boundary": "zeros", "method": "row"}),
            ("els", {"scales": [3, 5], "boundary": "circular", "method": "shiftmap"}),
            ("els", {"scales": 3, "boundary": "circular", "method": "window", "dedup": False}),
            ("gaussian", {}), ("nearest", {}), ("pca_locality", {}),
            ("els_soft", {"sigmas": 1.0, "k_max": 3}),
            ("els_soft", {"sigmas": 1.0, "k_max": 3, "method": "xla"}),
            ("scfdm", {"key": jax.random.PRNGKey(0), "top_k": 4})]


@pytest.mark.parametrize("kind,kw", MACHINES, ids=[f"{k}-{i}" for i, (k, _) in
                                                   enumerate(MACHINES)])
def test_every_make_machine_kind_uses_highest(kind, kw, platform):
    images, x = _data()
    machine = ej.make_machine(kind, images, **kw)
    # A traced t: the whole step, time → coefficients → engines, in one program.
    jaxpr = jax.make_jaxpr(lambda x, t: machine(x, t, 0))(x, jnp.float32(0.05)).jaxpr
    assert not low_precision_dots(jaxpr), low_precision_dots(jaxpr)


def test_the_check_sees_a_default_precision_dot():
    """The walker finds a DEFAULT dot, also inside a scan inside a jit."""
    def f(a):
        def body(c, _):
            return c @ a, None                     # DEFAULT precision
        return jax.jit(lambda a: jax.lax.scan(body, a, None, length=2)[0])(a)
    a = jnp.ones((3, 3))
    assert len(low_precision_dots(jax.make_jaxpr(f)(a).jaxpr)) == 1
    ok = jax.make_jaxpr(lambda a: jnp.matmul(a, a, precision=HIGHEST))(a).jaxpr
    assert low_precision_dots(ok) == []


# ----------------------------------------------------------------------------------------
# Second accelerator rule: off the CPU a sampling step is one device program. An accelerator
# has no fused CPU kernels (``native.available()`` is False there), so every
# machine must fall back to its XLA twin and do nothing on the host inside a step: no numpy on
# a traced value (tracing the whole sample would raise), no host callbacks, no foreign calls.

_LEAVES_DEVICE = ("callback", "ffi", "custom_call")


def host_or_kernel_calls(jaxpr) -> list[str]:
    """Every primitive in ``jaxpr`` (recursively) that leaves the device program: host
    callbacks (pure_callback, io_callback, debug_callback) and foreign calls (ffi_call: the
    CPU-only kernels)."""
    return [eqn.primitive.name for eqn in all_eqns(jaxpr)
            if any(s in eqn.primitive.name for s in _LEAVES_DEVICE)]


SAMPLED = [("ideal", {}), ("local", {"scales": [3, 5]}),
           ("els", {"scales": [3, 5], "boundary": "circular"}),
           ("els", {"scales": [3, 5], "boundary": "zeros"}),
           ("els", {"scales": [3, 5], "boundary": "zeros", "method": "shiftmap"}),
           ("els", {"scales": [3, 5], "boundary": "circular", "wrap_patches": True,
                    "method": "shiftmap"}),
           ("els_soft", {"sigmas": [0.8, 1.5], "k_max": 5, "boundary": "zeros"}),
           ("gaussian", {}), ("nearest", {}), ("pca_locality", {}),
           ("scfdm", {"key": jax.random.PRNGKey(0)})]


@pytest.mark.parametrize("kind,kw", SAMPLED, ids=[f"{k}-{i}" for i, (k, _) in
                                                  enumerate(SAMPLED)])
def test_off_the_cpu_a_whole_sample_is_one_device_program(kind, kw, monkeypatch):
    from els_jax.engines import native
    monkeypatch.setattr(native, "available", lambda: False)     # as on a GPU or TPU
    jax.clear_caches()        # engines chosen at trace time: no program traced with kernels
    try:
        images, x = _data()
        machine = ej.make_machine(kind, images, **kw)
        times = ej.uniform_times(2)

        def run(x):
            return ej.sample(machine, x, times)
        jaxpr = jax.make_jaxpr(run)(x).jaxpr
        assert not host_or_kernel_calls(jaxpr), host_or_kernel_calls(jaxpr)
        np.testing.assert_allclose(np.asarray(jax.jit(run)(x)), np.asarray(run(x)), atol=2e-5)
    finally:
        jax.clear_caches()    # nor, later, one traced without them


def test_the_device_program_check_sees_kernels_and_callbacks():
    """The walker finds a host callback inside a jit, and, where the CPU kernels are built, the
    shift-map kernel's foreign call in a machine's step."""
    def f(a):
        return jax.jit(lambda a: jax.pure_callback(np.sin, a, a))(a) + 1.0
    assert host_or_kernel_calls(jax.make_jaxpr(f)(jnp.ones(3)).jaxpr) == ["pure_callback"]
    from els_jax.engines import native
    if native.available():
        images, x = _data()
        machine = ej.make_machine("els", images, scales=3, boundary="zeros", method="shiftmap")
        jaxpr = jax.make_jaxpr(lambda x: machine(x, jnp.float32(0.3), 0))(x).jaxpr
        assert "ffi_call" in host_or_kernel_calls(jaxpr)

"""The shift-map engine's Pallas kernel (els_jax/engines/shiftmap_pallas.py), run in Pallas's
interpreter on the CPU: against the float64 oracles of docs/theory.md §2 for every pair rule,
against the jnp form over many programs and chunks, its logits at small t and far from every
candidate, its transformations (jit, vmap, jvp, grad), its dots' precision, and the measured
choice that puts it on an accelerator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.core import softmax
from els_jax.engines import autotune
from els_jax.engines import shiftmap as sm
from els_jax.engines import shiftmap_pallas as sp
from tests import oracles
from tests.test_precision import low_precision_dots
from tests.test_shiftmap import _data, _log_w, _oracle_x0, _reference_coeffs

H, W = 6, 7

# One case per pair rule and boundary, k below and at the image size.
CASES = [("local", "zeros", False, 3), ("els", "circular", False, 3),
         ("els", "circular", True, 5), ("els", "zeros", False, 3),
         ("els", "zeros", False, 5), ("els", "zeros", False, 7)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-wrap{int(c[2])}-k{c[3]}")
def test_matches_float64_oracle(case):
    """x̂_0 equals the float64 oracle at t = 0.01 and 0.5 (per-image a, b²), C = 2, with a
    class mask (log w = −inf for two of the five images)."""
    kind, boundary, wrap, k = case
    x, images, a, b2 = _data(2)
    mask = np.array([True, False, True, True, False])
    ref = _oracle_x0(x, images, kind, boundary, wrap, k, mask)
    got = sm.shiftmap_x0(x, a, b2, images, _log_w(mask), k=k, boundary=boundary,
                         wrap_patches=wrap, kind=kind, engine="pallas")
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode,k", [("zeros", 3), ("circular", 5)])
def test_many_programs_and_chunks_equal_the_jnp_form(mode, k):
    """N = 23 images, 2 per program, at most 4 programs per call (so 2 groups per query image,
    several chunks, the last one overlapping): the merged partial states equal the jnp form's
    state (max, total and sums, not only x̂_0)."""
    rng = np.random.default_rng(1)
    h, w, c, n = 9, 8, 3, 23
    images = jnp.asarray(rng.uniform(-1, 1, (n, h, w, c)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)
    a, b2 = jnp.array([0.9, 0.6]), jnp.array([0.19, 0.64])
    log_w = jnp.asarray(np.where(rng.random(n) < 0.3, -np.inf, 0.0), jnp.float32)
    old = sp._MAX_PROGRAMS
    sp._MAX_PROGRAMS = 4
    try:
        jax.clear_caches()
        got = sp.pallas_state(x, a, b2, images, log_w, k=k, mode=mode, per_program=2)
    finally:
        sp._MAX_PROGRAMS = old
        jax.clear_caches()
    ref = sm._xla_form(mode)(x, a, b2, images, log_w, k=k, block=1 << 20)
    np.testing.assert_allclose(np.asarray(got.max), np.asarray(ref.max), rtol=2e-6, atol=1e-5)
    # totals and sums are relative to the max: compare the normalised forms.
    np.testing.assert_allclose(np.asarray(got.total), np.asarray(ref.total), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(softmax.finalize(got)),
                               np.asarray(softmax.finalize(ref)), atol=2e-5, rtol=0)


def test_logits_exact_at_small_t():
    """At t = 0.001 (b² ~ 1e-5) the best logit of every pixel is the float64 one to a few
    float32 ulps of its size: the box sums add nonnegative terms only (docs/theory.md §9)."""
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (4, H, W, 1)).astype(np.float32)
    ab = oracles.alpha_bar(0.001)
    a, b2 = np.float32(np.sqrt(ab)), np.float32(1 - ab)
    x = (a * images[1] + np.sqrt(b2) * rng.normal(size=images[1].shape)).astype(np.float32)[None]
    k = 3
    state = sm.shiftmap_state(x, a, b2, images, k=k, kind="local", engine="pallas")
    # float64: same-location windows, both sides zero-extended (LS).
    xp = np.pad(x[0, ..., 0].astype(np.float64), 1)
    yp = np.pad(images[..., 0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    best = np.full((H, W), -np.inf)
    for i in range(H):
        for j in range(W):
            d = ((xp[i:i + k, j:j + k] - float(a) * yp[:, i:i + k, j:j + k]) ** 2).sum((1, 2))
            best[i, j] = (-d / (2 * float(b2))).max()
    got = np.asarray(state.max[0], np.float64)
    assert (np.abs(got - best) / np.abs(best)).max() < 1e-6


def test_far_query_is_finite():
    """x = 50 at t = 0.01 (logits ~ −10⁸): finite, an average of training pixels."""
    _, images, a, b2 = _data(1)
    x = jnp.full((2, H, W, 1), 50.0, jnp.float32)
    out = np.asarray(sm.shiftmap_x0(x, a, b2, images, k=5, boundary="zeros", engine="pallas"))
    assert np.isfinite(out).all()
    assert out.min() >= images.min() - 1e-5 and out.max() <= images.max() + 1e-5


def test_jit_vmap_jvp_grad():
    """Under jit and vmap the kernel gives its own values; jvp and grad are the jnp form's
    (``native.with_reference_derivatives``), finite and equal to it."""
    x, images, a, b2 = _data(2)
    kw = dict(k=3, boundary="circular")
    direct = np.asarray(sm.shiftmap_x0(x, a, b2, images, engine="pallas", **kw))
    jitted = jax.jit(lambda x: sm.shiftmap_x0(x, a, b2, images, engine="pallas", **kw))(x)
    np.testing.assert_allclose(np.asarray(jitted), direct, atol=1e-6, rtol=0)
    mapped = jax.vmap(lambda x1, a1, b21: sm.shiftmap_x0(
        x1[None], a1, b21, images, engine="pallas", **kw)[0])(
        jnp.asarray(x), jnp.asarray(a), jnp.asarray(b2))
    np.testing.assert_allclose(np.asarray(mapped), direct, atol=1e-6, rtol=0)
    # vmap over batches of two (the second reversed): the kernel reads each query's a, b² by
    # its program id, which must stay the query's, not the mapped axis's.
    xs, as_, b2s = (jnp.stack([jnp.asarray(v), jnp.asarray(v)[::-1]]) for v in (x, a, b2))
    mapped = jax.vmap(lambda x2, a2, b22: sm.shiftmap_x0(x2, a2, b22, images, engine="pallas",
                                                          **kw))(xs, as_, b2s)
    np.testing.assert_allclose(np.asarray(mapped[0]), direct, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(mapped[1]), direct[::-1], atol=1e-6, rtol=0)

    a, b2 = _reference_coeffs(0.3, 2)
    rng = np.random.default_rng(5)
    tangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def run(engine):
        return lambda x: sm.shiftmap_x0(x, a, b2, images, engine=engine, **kw)
    v_p, t_p = jax.jvp(run("pallas"), (jnp.asarray(x),), (tangent,))
    v_x, t_x = jax.jvp(run("xla"), (jnp.asarray(x),), (tangent,))
    np.testing.assert_allclose(np.asarray(v_p), np.asarray(v_x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(t_p), np.asarray(t_x), atol=1e-5, rtol=0)
    g = jax.grad(lambda x: jnp.sum(run("pallas")(x) ** 2))(jnp.asarray(x))
    g_x = jax.grad(lambda x: jnp.sum(run("xla")(x) ** 2))(jnp.asarray(x))
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_x), atol=1e-5, rtol=0)


def test_every_dot_in_the_kernel_is_highest():
    """The box-sum matmuls feed the logits: traced (inside the pallas_call's kernel jaxpr),
    every dot_general runs at HIGHEST, so a GPU/TPU does not drop to TF32/bf16."""
    x, images, a, b2 = _data(1)
    jaxpr = jax.make_jaxpr(lambda x: sm.shiftmap_x0(x, a, b2, images, k=3, boundary="zeros",
                                                    engine="pallas"))(x)
    names = set()
    from tests.test_precision import all_eqns
    for eqn in all_eqns(jaxpr.jaxpr):
        names.add(eqn.primitive.name)
    assert "pallas_call" in names and "dot_general" in names
    assert low_precision_dots(jaxpr.jaxpr) == []


def test_accelerator_form_is_measured_and_a_failing_kernel_dropped(tmp_path, monkeypatch):
    """``accelerator_form`` times both forms on the device and caches the winner; a kernel that
    raises in its probe (as one that fails to lower would) leaves the jnp form, and with
    autotuning off the static rule is the jnp form."""
    monkeypatch.setenv("ELS_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("ELS_JAX_AUTOTUNE", "1")
    autotune.clear_memory_cache()
    try:
        form = sm.accelerator_form(6, 7, 1, 3, "zeros", 8, 1, interpret=True)
        assert form in ("xla", "pallas")
        choice = autotune._memory[next(iter(autotune._memory))]
        assert set(choice.times) == {"xla", "pallas"}
        assert form == min(choice.times, key=choice.times.get)

        autotune.clear_memory_cache()

        def broken(*args, **kwargs):
            raise RuntimeError("Mosaic lowering failed (simulated)")
        monkeypatch.setattr(sp, "pallas_state", broken)
        with pytest.warns(RuntimeWarning):
            assert sm.accelerator_form(6, 7, 1, 5, "zeros", 8, 1, interpret=True) == "xla"
        choice = autotune._memory[next(iter(autotune._memory))]
        assert set(choice.times) == {"xla"}

        autotune.clear_memory_cache()
        monkeypatch.setenv("ELS_JAX_AUTOTUNE", "0")
        assert sm.accelerator_form(6, 7, 1, 7, "zeros", 8, 1, interpret=True) == "xla"
    finally:
        autotune.clear_memory_cache()


def test_frame_plan_box_matrices_sum_exactly_the_windows():
    """Ky·f·Kx sums each query pixel's k×k window of the extended frame and nothing else:
    checked on a map with a distinct power of two per cell."""
    h, w, k = 5, 6, 3
    plan = sp.frame_plan(h, w, k, "zeros")
    p, q = plan["P"], plan["Q"]
    assert p >= h + 2 and q >= w + 2 and p & (p - 1) == 0 and q & (q - 1) == 0
    rng = np.random.default_rng(0)
    f = rng.uniform(0, 1, (p, q))
    box = plan["ky"].astype(np.float64) @ f @ plan["kx"].astype(np.float64)
    for i in range(plan["Hp"]):
        for j in range(plan["Wp"]):
            want = f[i:i + k, j:j + k].sum() if (i < h and j < w) else 0.0
            assert abs(box[i, j] - want) < 1e-12


@pytest.mark.parametrize("boundary,wrap", [("zeros", False), ("circular", False),
                                           ("circular", True)])
def test_els_soft_window_equals_the_xla_form(boundary, wrap):
    """The Gaussian window (the banded matrices weighted by g₁(δ)): els_soft by the Pallas
    kernel equals its XLA matmul form, functional and as a machine, and its derivative in σ
    (the XLA form's, through ``with_reference_derivatives``) is the XLA form's."""
    x, images, a, b2 = _data(2)
    kw = dict(sigma=1.2, k_max=5, boundary=boundary, wrap_patches=wrap)
    got = np.asarray(ej.els_soft_x0(x, 0.3, images, engine="pallas", **kw))
    want = np.asarray(ej.els_soft_x0(x, 0.3, images, engine="xla", **kw))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    if boundary == "zeros":
        m = ej.make_machine("els_soft", images, sigmas=[0.8, 1.5], k_max=3, method="pallas")
        mx = ej.make_machine("els_soft", images, sigmas=[0.8, 1.5], k_max=3, method="xla")
        assert m.explain()[3]["engine"] == "soft_pallas"
        for i in (0, 1):
            np.testing.assert_allclose(np.asarray(m.x0(x, 0.4, i)), np.asarray(mx.x0(x, 0.4, i)),
                                       atol=2e-5, rtol=0)
        d = jax.grad(lambda s: jnp.sum(ej.els_soft_x0(x, 0.3, images, engine="pallas",
                                                      **{**kw, "sigma": s}) ** 2))(1.2)
        dx = jax.grad(lambda s: jnp.sum(ej.els_soft_x0(x, 0.3, images, engine="xla",
                                                       **{**kw, "sigma": s}) ** 2))(1.2)
        np.testing.assert_allclose(float(d), float(dx), rtol=1e-4)

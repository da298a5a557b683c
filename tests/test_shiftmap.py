"""The shift-map engine (els_jax/engines/shiftmap.py, docs/theory.md §9): its plain-jnp form
and its fused CPU kernel against the float64 oracles of docs/theory.md §2, its logits'
precision at small t, and its transformations (jit, vmap, jvp, grad) against the reference
machine."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from els_jax.core import conversions, schedules
from els_jax.engines import native
from els_jax.engines import shiftmap as sm
from els_jax.machines.reference import reference_x0
from tests import oracles

N, H, W = 5, 6, 7
TIMES = (0.01, 0.5)          # one per query image: per-image a, b²

ENGINES = ["xla", pytest.param("kernel", marks=pytest.mark.skipif(
    not native.available(), reason="the fused CPU kernels are not available"))]

# (kind, boundary, wrap_patches, k): odd k from 1 up to k ≥ H (and ≥ W) where the rule allows
# it (circular: k ≤ min(H, W); zeros with k ≥ min(H, W) is LS).
CASES = ([("local", "zeros", False, k) for k in (1, 3, 5, 7, 9)]
         + [("els", "circular", False, k) for k in (1, 3, 5)]
         + [("els", "circular", True, k) for k in (1, 3, 5)]
         + [("els", "zeros", False, k) for k in (1, 3, 5, 7, 9)])


def _coeffs(times):
    """a, b² per query image, float32 (as the machines pass them), and their float64 values."""
    ab = np.array([oracles.alpha_bar(t) for t in times])
    a32 = np.sqrt(ab).astype(np.float32)
    b232 = (1.0 - ab).astype(np.float32)
    return a32, b232


def _data(c, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (N, H, W, c)).astype(np.float32)
    a, b2 = _coeffs(TIMES)
    # Query 0 (t = 0.01) near training image 2, query 1 (t = 0.5) a noisy mix of two.
    x0 = np.stack([images[2], 0.5 * (images[0] + images[3])])
    x = (a[:, None, None, None] * x0
         + np.sqrt(b2)[:, None, None, None] * rng.normal(size=x0.shape)).astype(np.float32)
    return x, images, a, b2


def _oracle_x0(x, images, kind, boundary, wrap, k, mask=None):
    out = []
    for bi, t in enumerate(TIMES):
        xb = x[bi:bi + 1]
        if kind == "local":
            out.append(oracles.local_x0(xb, t, images, k, mask=mask))
        else:
            out.append(oracles.els_x0(xb, t, images, k, boundary, wrap, mask=mask))
    return np.concatenate(out)


def _log_w(mask):
    return None if mask is None else np.where(mask, 0.0, -np.inf).astype(np.float32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-wrap{int(c[2])}-k{c[3]}")
@pytest.mark.parametrize("c", [1, 2])
def test_matches_float64_oracle(case, c):
    """Both engines equal docs/theory.md §2's float64 oracle, per-image (a, b²) at t = 0.01 and
    0.5; for C = 2 with a class mask (log w = −inf for two of the five images)."""
    kind, boundary, wrap, k = case
    x, images, a, b2 = _data(c)
    mask = np.array([True, False, True, True, False]) if c == 2 else None
    ref = _oracle_x0(x, images, kind, boundary, wrap, k, mask)
    for engine in ["xla"] + (["kernel"] if native.available() else []):
        got = sm.shiftmap_x0(x, a, b2, images, _log_w(mask), k=k, boundary=boundary,
                             wrap_patches=wrap, kind=kind, engine=engine)
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0,
                                   err_msg=f"engine {engine}")


@pytest.mark.skipif(not native.available(), reason="the fused CPU kernels are not available")
@pytest.mark.parametrize("boundary,k", [("zeros", 3), ("circular", 3), ("zeros", 7)])
def test_kernel_over_many_blocks_and_items(boundary, k):
    """N = 2 blocks + 37 of the kernel (``native.shift_block()`` images per block: 128 with
    AVX-512, 64 otherwise): several work items over the threads, a last block partly empty
    (its absent images must weigh exactly 0), and a class mask; the kernel equals the float64
    oracle and the jnp form. The other tests hold at most one block."""
    n = 2 * native.shift_block() + 37
    rng = np.random.default_rng(3)
    h, w, c = 9, 8, 1
    images = rng.uniform(-1, 1, (n, h, w, c)).astype(np.float32)
    a, b2 = _coeffs(TIMES)
    x0 = np.stack([images[n - 1], 0.5 * (images[0] + images[n // 2])])
    x = (a[:, None, None, None] * x0
         + np.sqrt(b2)[:, None, None, None] * rng.normal(size=x0.shape)).astype(np.float32)
    mask = rng.uniform(size=n) < 0.8
    mask[n - 1] = True
    ref = np.concatenate([oracles.els_x0(x[i:i + 1], t, images, k, boundary, False, mask=mask)
                          for i, t in enumerate(TIMES)])
    for engine in ("kernel", "xla"):
        got = sm.shiftmap_x0(x, a, b2, images, _log_w(mask), k=k, boundary=boundary,
                             engine=engine)
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0,
                                   err_msg=f"engine {engine}")


@pytest.mark.skipif(not native.available(), reason="the fused CPU kernels are not available")
@pytest.mark.parametrize("mode,k", [("zeros", 7), ("zeros", 9), ("circular", 7), ("circular", 9),
                                    ("wrap", 7), ("wrap", 9), ("local", 11)])
def test_kernel_van_herk_box_sums(mode, k):
    """k > 5: the kernel's box sums by van Herk partial sums (k ≤ 5 sums directly), on 9×11
    images where those k keep every rule: kernel, jnp form and oracle agree (C = 3)."""
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (3, 9, 11, 3)).astype(np.float32)
    x = rng.normal(size=(1, 9, 11, 3)).astype(np.float32)
    t = 0.3
    a, b2 = _coeffs([t])
    kind = "local" if mode == "local" else "els"
    boundary = "circular" if mode in ("circular", "wrap") else "zeros"
    kw = dict(k=k, boundary=boundary, wrap_patches=mode == "wrap", kind=kind)
    ref = (oracles.local_x0(x, t, images, k) if kind == "local"
           else oracles.els_x0(x, t, images, k, boundary, mode == "wrap"))
    for engine in ("kernel", "xla"):
        got = np.asarray(sm.shiftmap_x0(x, a, b2, images, engine=engine, **kw))
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=engine)


def test_pair_count_matches_reference_rule():
    """The per-axis plan reproduces docs/theory.md §2's pair rule (reference.allowed_pairs)."""
    from els_jax.machines.reference import allowed_pairs
    for h, w in ((6, 7), (9, 11), (32, 32)):
        for k in (1, 3, 5, 7, 9):
            for kind, boundary, wrap in (("local", "zeros", False), ("els", "zeros", False),
                                         ("els", "circular", False), ("els", "circular", True)):
                if boundary == "circular" and k > min(h, w):
                    continue
                mode = sm.resolve_kind(kind, k, h, w, boundary, wrap)
                want = allowed_pairs(kind, k, h, w, boundary, wrap).sum()
                assert sm.pair_count(h, w, k, mode) == want, (h, w, k, kind, boundary, wrap)


# --- Precision at small t (docs/theory.md §9) -----------------------------------------------

def _bite_case():
    """t = 0.01 and a scene where a float32 prefix sum over the map loses nats: columns 0–2 of
    the images at scale 30 and the query there far from every image (map terms ~10³–10⁴,
    integral-image totals ~10⁵), the rest of the query a·y_0 + b·ε (the nearest windows at
    distance ~b²·k², logits of a few nats)."""
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (N, H, W, 1)).astype(np.float32)
    images[:, :, :3] *= 30.0
    a, b2 = _coeffs([0.01])
    x = a[0] * images[0] + math.sqrt(b2[0]) * rng.normal(size=(H, W, 1))
    x[:, :3] = -a[0] * images[0, :, :3] + 5.0
    return x[None].astype(np.float32), images, a, b2


def _float64_local_logits(x, images, a, b2, k):
    """LS logits [N, H, W] in float64 from the oracle's windows, with the same (float32) a, b²."""
    a64, b264 = float(a[0]), float(b2[0])
    out = np.zeros((N, H, W))
    for i in range(H):
        for j in range(W):
            q, _ = oracles.window(x[0].astype(np.float64), i, j, k, "zeros")
            for n in range(N):
                cw, _ = oracles.window(images[n].astype(np.float64), i, j, k, "zeros")
                out[n, i, j] = -np.sum((q - a64 * cw) ** 2) / (2 * b264)
    return out


def _integral_image_logits(x, images, a, b2, k):
    """What docs/theory.md §9 warns about: the same LS logits from a float32 integral image of
    f_0."""
    m = k // 2
    f = ((x[0] - a[0] * images) ** 2).sum(-1).astype(np.float32)           # [N, H, W]
    f = np.pad(f, ((0, 0), (m + 1, m), (m + 1, m)))
    ii = np.cumsum(np.cumsum(f, axis=1, dtype=np.float32), axis=2, dtype=np.float32)
    box = (ii[:, k:, k:] - ii[:, :-k, k:] - ii[:, k:, :-k] + ii[:, :-k, :-k]).astype(np.float32)
    return box * np.float32(-0.5 / b2[0])


def _competitive(exact, axis=0):
    """The logits that decide a softmax and that float32 can resolve to 1e-4 nats: within 60
    nats of their pixel's maximum, where that maximum is above −1000 (a logit of −10⁶ has a
    float32 spacing of 0.06 whatever computes it; there only relative errors are meaningful)."""
    best = exact.max(axis=axis, keepdims=True)
    return (exact > best - 60.0) & (best > -1000.0)


def test_logits_exact_at_small_t_where_prefix_sums_fail():
    """At t = 0.01, where a float32 integral image is off by > 1 nat (checked here), the
    shift-map logits (jnp form: every logit; kernel: the per-pixel maximum it keeps) are
    within 1e-3 nats of float64 for the competitive logits and within 1e-6 relative for all."""
    k = 3
    x, images, a, b2 = _bite_case()
    exact = _float64_local_logits(x, images, a, b2, k)
    near = _competitive(exact)

    naive = _integral_image_logits(x, images, a, b2, k)
    assert np.abs(naive - exact)[near].max() > 1.0          # the scene does bite

    logits, dy, dx = sm.pair_logits(x, a, b2, images, k=k, kind="local")
    got = np.asarray(logits)[0, 0]                           # one shift (d = 0): [N, H, W]
    assert (dy == 0).all() and (dx == 0).all()
    err = np.abs(got - exact)
    assert err[near].max() < 1e-3, err[near].max()
    assert (err / np.maximum(np.abs(exact), 1.0)).max() < 1e-6

    best = exact.max(axis=0)
    moderate = best > -1000.0
    engines = ["xla"] + (["kernel"] if native.available() else [])
    for engine in engines:
        state = sm.shiftmap_state(x, a, b2, images, k=k, kind="local", engine=engine)
        got_max = np.asarray(state.max)[0]
        assert np.abs(got_max - best)[moderate].max() < 1e-3, engine
        assert (np.abs(got_max - best) / np.abs(best)).max() < 1e-6, engine


@pytest.mark.parametrize("boundary,wrap", [("circular", False), ("circular", True),
                                           ("zeros", False)])
def test_els_logits_match_float64_candidates(boundary, wrap):
    """Every ELS logit of the jnp form equals the oracle's candidate list (els_candidates:
    image, centre), pixel by pixel, in the bite scene at t = 0.01 (relative 1e-6, and 1e-3
    nats for the competitive logits); the kernel's per-pixel maximum too."""
    k = 3
    x, images, a, b2 = _bite_case()
    logits, dy, dx = sm.pair_logits(x, a, b2, images, k=k, boundary=boundary,
                                    wrap_patches=wrap)
    logits = np.asarray(logits)[0]                                       # [S, N, H, W]
    a64, b264 = float(a[0]), float(b2[0])
    state = (sm.shiftmap_state(x, a, b2, images, k=k, boundary=boundary, wrap_patches=wrap,
                               engine="kernel") if native.available() else None)
    for i in range(H):
        for j in range(W):
            _, _, n, u, v = oracles.els_candidates(x[0], i, j, 0.01, images, k, boundary,
                                                   wrap)
            # The same logits from float64 windows with the float32 a, b².
            q, _ = oracles.window(x[0].astype(np.float64), i, j, k, boundary)
            exact = np.array([-np.sum((q - a64 * oracles.window(
                images[nn].astype(np.float64), uu, vv, k, boundary)[0]) ** 2) / (2 * b264)
                for nn, uu, vv in zip(n, u, v)])
            if boundary == "circular":
                s = [np.flatnonzero((dy == (uu - i) % H) & (dx == (vv - j) % W))[0]
                     for uu, vv in zip(u, v)]
            else:
                s = [np.flatnonzero((dy == uu - i) & (dx == vv - j))[0] for uu, vv in zip(u, v)]
            got = logits[s, n, i, j]
            err = np.abs(got - exact)
            near = _competitive(exact)
            if near.any():
                assert err[near].max() < 1e-3
            assert (err / np.maximum(np.abs(exact), 1.0)).max() < 1e-6
            # Exactly these candidates exist: every other logit of pixel (i, j) is −inf.
            assert np.isfinite(logits[:, :, i, j]).sum() == len(n)
            if state is not None:
                assert abs(float(state.max[0, i, j]) - exact.max()) <= max(
                    1e-3, 1e-6 * abs(exact.max()))


# --- Transformations ------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_jit_and_vmap(engine):
    x, images, a, b2 = _data(2)
    kw = dict(k=3, boundary="zeros", engine=engine)
    direct = np.asarray(sm.shiftmap_x0(x, a, b2, images, **kw))
    jitted = jax.jit(lambda x, a, b2: sm.shiftmap_x0(x, a, b2, images, **kw))(x, a, b2)
    np.testing.assert_allclose(np.asarray(jitted), direct, atol=1e-6, rtol=0)
    mapped = jax.vmap(lambda x1, a1, b21: sm.shiftmap_x0(x1[None], a1, b21, images, **kw)[0])(
        jnp.asarray(x), jnp.asarray(a), jnp.asarray(b2))
    np.testing.assert_allclose(np.asarray(mapped), direct, atol=1e-6, rtol=0)


def _reference_coeffs(t, bsz):
    """a, b² as reference_x0 computes them from t (cosine schedule, b² floored)."""
    a, b2, _ = schedules.coefficients(jnp.float32(t), schedules.Cosine())
    return (jnp.broadcast_to(a, (bsz,)),
            jnp.maximum(jnp.broadcast_to(b2, (bsz,)), conversions.B2_FLOOR))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("boundary,wrap", [("circular", False), ("circular", True),
                                           ("zeros", False)])
def test_derivatives_match_reference(engine, boundary, wrap):
    """jax.jvp and jax.grad w.r.t. x equal those of reference_x0 (the literal machine)."""
    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, (N, H, W, 2)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(2, H, W, 2)), jnp.float32)
    t, k = 0.3, 3
    a, b2 = _reference_coeffs(t, 2)

    def ours(x):
        return sm.shiftmap_x0(x, a, b2, images, k=k, boundary=boundary, wrap_patches=wrap,
                              engine=engine)

    def ref(x):
        return reference_x0(x, t, images, kind="els", k=k, boundary=boundary,
                            wrap_patches=wrap)

    tangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    v_ours, t_ours = jax.jvp(ours, (x,), (tangent,))
    v_ref, t_ref = jax.jvp(ref, (x,), (tangent,))
    np.testing.assert_allclose(np.asarray(v_ours), np.asarray(v_ref), atol=1e-5, rtol=0)
    scale = float(jnp.abs(t_ref).max())
    np.testing.assert_allclose(np.asarray(t_ours), np.asarray(t_ref), atol=1e-4 * scale,
                               rtol=0)

    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    g_ours = jax.grad(lambda x: jnp.sum(ours(x) * weights))(x)
    g_ref = jax.grad(lambda x: jnp.sum(ref(x) * weights))(x)
    scale = float(jnp.abs(g_ref).max())
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), atol=1e-4 * scale,
                               rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_far_query_is_finite(engine):
    """x = 50, far from every candidate, at t = 0.01 (logits ~ −10⁸): finite values (and
    gradient), and x̂_0 is an average of training pixels."""
    _, images, a, b2 = _data(1)
    x = jnp.full((2, H, W, 1), 50.0, jnp.float32)
    for kind, boundary, wrap in (("els", "circular", False), ("els", "circular", True),
                                 ("els", "zeros", False), ("local", "zeros", False)):
        def f(x):
            return sm.shiftmap_x0(x, a, b2, images, k=5, boundary=boundary, wrap_patches=wrap,
                                  kind=kind, engine=engine)
        out = np.asarray(f(x))
        assert np.isfinite(out).all()
        assert out.min() >= images.min() - 1e-5 and out.max() <= images.max() + 1e-5
        if kind == "els" and boundary == "zeros":       # one gradient (compiling is slow)
            g = jax.grad(lambda x: jnp.sum(f(x)))(x)
            assert np.isfinite(np.asarray(g)).all()


@pytest.mark.skipif(not native.available(), reason="the fused CPU kernels are not available")
def test_kernel_weights_are_float32_exponentials():
    """The kernel's softmax weights exp(logit − max), its own polynomial exp, one weight at a
    time against float64. LS pairs at k = 1 with x = 0, a = 1, b² = ½: logit = −y_n(i)² + log
    w_n. Image 0 is 0 (logit 0, the maximum, value 0); image 1 has y(i) = √g_i, so pixel i's
    acc = y(i)·e^(−g_i) isolates one weight, for 256 gaps g_i in [0, 59]. The other images
    share its vector lanes and weigh nothing: absent (log w = −inf, where the AVX-512 form
    computes NaN and masks it) or 70 nats down, below the floor of e^−60, left out lane by lane
    (counted whenever a lane beside them is live, as before this rule, they moved the smallest
    weights here, ~1e-26, by 1.5e-6). Within 2.5e-7 relative: the exp's own ≤ 1 ulp and the
    product's rounding (a polynomial coefficient 4 ulps off fails, at 4.5e-7)."""
    rng = np.random.default_rng(3)
    h = w = 16
    g = rng.permutation(np.linspace(0.0, 59.0, h * w)).reshape(h, w)
    images = rng.uniform(-3, 3, (40, h, w, 1)).astype(np.float32)
    images[0] = 0.0
    images[1, ..., 0] = np.sqrt(g)
    log_w = np.concatenate([[0.0, 0.0], np.where(np.arange(38) % 2, -np.inf, -70.0)])
    mx, tot, acc = native.shiftmap_softmax_state(
        jnp.zeros((1, h, w, 1)), jnp.ones(1), jnp.full((1,), 0.5), jnp.asarray(images),
        jnp.asarray(log_w, jnp.float32), k=1, mode=0)
    y = images[1, ..., 0].astype(np.float64)
    gap = (images[1, ..., 0] * images[1, ..., 0]).astype(np.float64)    # the kernel's float32 y²
    want = np.exp(-gap)
    assert np.all(np.asarray(mx)[0] == 0.0)
    np.testing.assert_allclose(np.asarray(tot)[0], 1.0 + want, rtol=2.5e-7)
    got = np.asarray(acc)[0, ..., 0].astype(np.float64)
    inner = y > 0
    np.testing.assert_allclose(got[inner] / y[inner], want[inner], rtol=2.5e-7)
    assert np.all(got[~inner] == 0.0)


def test_merge_composes_with_softmax():
    """The state is core.softmax's: two halves of the images merged equal the whole."""
    from els_jax.core import softmax
    x, images, a, b2 = _data(1)
    kw = dict(k=3, boundary="circular", engine="xla")
    whole = softmax.finalize(sm.shiftmap_state(x, a, b2, images, **kw))
    halves = softmax.merge(sm.shiftmap_state(x, a, b2, images[:2], **kw),
                           sm.shiftmap_state(x, a, b2, images[2:], **kw))
    np.testing.assert_allclose(np.asarray(softmax.finalize(halves)), np.asarray(whole),
                               atol=1e-6, rtol=0)


def test_streaming_chunks_do_not_change_the_result():
    """The jnp form's chunk size (block) is a memory knob only: one image per step equals all
    at once (the last chunk's repeated images are excluded)."""
    x, images, a, b2 = _data(1)
    kw = dict(k=3, boundary="zeros", engine="xla")
    small = sm.shiftmap_x0(x, a, b2, images, block=1, **kw)
    large = sm.shiftmap_x0(x, a, b2, images, block=1 << 24, **kw)
    np.testing.assert_allclose(np.asarray(small), np.asarray(large), atol=1e-6, rtol=0)
    three = sm.shiftmap_x0(x, a, b2, images, block=3 * 2 * (H + 2) * (W + 2), **kw)
    np.testing.assert_allclose(np.asarray(three), np.asarray(large), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode,k", [("local", 3), ("local", 9), ("zeros", 3), ("zeros", 5),
                                    ("circular", 3), ("circular", 5), ("wrap", 3)])
def test_lean_jnp_forms_equal_the_masked_form(mode, k):
    """The jnp form of each rule (candidates' frame for "circular", per-group output ranges for
    "local" and "zeros") equals the plain masked query-frame form of the same rule."""
    x, images, a, b2 = _data(2)
    args = (jnp.asarray(x), jnp.asarray(a), jnp.asarray(b2), jnp.asarray(images),
            jnp.zeros((N,), jnp.float32))
    lean = sm._xla_form(mode)(*args, k=k, block=sm.DEFAULT_BLOCK)
    masked = sm._state_xla(*args, k=k, mode=mode, block=sm.DEFAULT_BLOCK)
    from els_jax.core import softmax
    np.testing.assert_allclose(np.asarray(softmax.finalize(lean)),
                               np.asarray(softmax.finalize(masked)), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(lean.max), np.asarray(masked.max), rtol=1e-5)

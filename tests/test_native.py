"""The fused CPU kernel of the local machine (native_local.cc) against the XLA path and the
float64 oracle, and its build / fallback behaviour."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from els_jax.engines import local
from els_jax.engines import native
from els_jax.core import schedules, softmax
from tests import oracles

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler here")


def _both_paths(x, t, images, k, log_w):
    """x̂_0 of the fused kernel and of the XLA passes, from the same bank and queries."""
    bank = local.build_local_bank(local.transpose_images(images), k=k)
    coeffs = schedules.query_coefficients(jnp.float32(t), x.shape[0], schedules.Cosine())
    a, b2 = coeffs.a.reshape(-1, 1, 1, 1), coeffs.b2.reshape(-1, 1, 1, 1)
    q = local.local_queries(jnp.asarray(x), a, bank.mean)
    mean = jnp.transpose(bank.mean[..., 0], (1, 2, 0))[None]
    fused = native.local_softmax_state(q, a.reshape(-1), b2.reshape(-1),
                                       bank.centred_and_ones, bank.half_sq, log_w, k)
    xla = local._local_bank_state_q(q, a, b2, bank, log_w, k, 1 << 16)
    return (softmax.finalize(softmax.SoftmaxState(*fused)) + mean,
            softmax.finalize(xla) + mean, fused, xla)


@pytest.mark.parametrize("h,w,c,k", [(9, 7, 3, 3), (9, 7, 1, 5), (6, 8, 2, 15), (5, 5, 3, 9)])
@pytest.mark.parametrize("t", [0.02, 0.5, 0.95])
def test_fused_kernel_matches_oracle_and_xla_path(h, w, c, k, t):
    # N = 300 spans two work items and a partial block; a quarter of the images absent.
    rng = np.random.default_rng(k + c)
    n = 300
    images = rng.uniform(-1, 1, (n, h, w, c)).astype(np.float32)
    ab = oracles.alpha_bar(t)
    x = (np.sqrt(ab) * images[rng.integers(0, n, 3)]
         + np.sqrt(1 - ab) * rng.normal(size=(3, h, w, c))).astype(np.float32)
    mask = rng.random(n) < 0.75
    log_w = jnp.where(jnp.asarray(mask), 0.0, -jnp.inf).astype(jnp.float32)
    fused, xla, state, xla_state = _both_paths(x, t, images, k, log_w)
    want = oracles.local_x0(x.astype(np.float64), t, images[mask].astype(np.float64), k)
    np.testing.assert_allclose(np.asarray(fused), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(xla), atol=2e-5)
    # The state itself (what a sharded machine merges): the same running max.
    np.testing.assert_allclose(np.asarray(state[0]), np.asarray(xla_state.max), rtol=1e-5)


def test_fused_kernel_is_safe_for_far_queries_and_absent_images():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (70, 8, 8, 2)).astype(np.float32)
    x = np.stack([np.full((8, 8, 2), 1e3), np.full((8, 8, 2), -50.0),
                  rng.normal(size=(8, 8, 2))]).astype(np.float32)
    for t in (1e-5, 0.02, 1.0):
        fused, xla, _, _ = _both_paths(x, t, images, 3, jnp.zeros(70))
        assert np.all(np.isfinite(np.asarray(fused)))
        np.testing.assert_allclose(np.asarray(fused), np.asarray(xla), atol=1e-4)
    # Every image absent: max −inf, total 0 and accumulator 0 (no NaN), as the XLA path.
    _, _, state, _ = _both_paths(x, 0.5, images, 3, jnp.full((70,), -jnp.inf))
    assert np.all(np.asarray(state[0]) == -np.inf)
    assert np.all(np.asarray(state[1]) == 0) and np.all(np.asarray(state[2]) == 0)


def test_fused_kernel_rejects_mismatched_shapes():
    q = jnp.zeros((1, 6, 6, 1))
    one = jnp.ones((1,))
    with pytest.raises(Exception, match="bank shapes do not match"):
        native.local_softmax_state(q, one, one, jnp.zeros((2, 6, 6, 10)),
                                   jnp.zeros((6, 6, 9)), jnp.zeros(10), 3)
    with pytest.raises(Exception, match="odd"):
        native.interior_softmax_state(q, one, one, jnp.zeros((2, 6, 6, 10)),
                                      jnp.zeros((6, 6, 10)), jnp.zeros(10), 4)


def test_local_machine_on_cpu_lowers_the_custom_call():
    images = np.random.default_rng(0).uniform(-1, 1, (20, 8, 8, 1)).astype(np.float32)
    bank = local.build_local_bank(local.transpose_images(images), k=3)
    a = jnp.full((1,), 0.5 ** 0.5, jnp.float32)
    hlo = local.local_bank_x0.lower(jnp.zeros((1, 8, 8, 1)), a, a * a, bank, jnp.zeros(20), k=3,
                                    block=1 << 16, engine="kernel").as_text()
    assert "els_local_softmax" in hlo


_SUBPROCESS = textwrap.dedent("""
    import warnings
    import numpy as np, jax.numpy as jnp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from els_jax.engines import native
        import els_jax as ej
        ok = native.available()
        images = np.random.default_rng(0).uniform(-1, 1, (10, 6, 6, 1)).astype(np.float32)
        out = ej.local_score(jnp.zeros((1, 6, 6, 1)), 0.5, images, k=3)
    assert np.all(np.isfinite(np.asarray(out)))
    print("AVAILABLE", ok, "WARNED", any("XLA path" in str(w.message) for w in caught))
""")


@pytest.mark.parametrize("env,expect", [
    ({"ELS_JAX_NATIVE": "0"}, "AVAILABLE False WARNED False"),
    ({"CXX": "/nonexistent/c++", "PATH": "/nonexistent"}, "AVAILABLE False WARNED True"),
    ({}, "AVAILABLE True WARNED False")])
def test_build_cache_and_fallback(tmp_path, env, expect):
    """Disabled, or no compiler: a warning (if unexpected) and the XLA path, same results.
    Otherwise the library is built once into $ELS_JAX_CACHE."""
    run_env = dict(os.environ, ELS_JAX_CACHE=str(tmp_path), **env)
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=run_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout
    built = list(tmp_path.glob("native_local_*.so"))
    assert len(built) == (1 if expect.startswith("AVAILABLE True") else 0)


@pytest.mark.parametrize("k,t", [(7, 0.02), (9, 0.5)])
def test_interior_kernel_at_large_k_matches_oracle(k, t):
    """The interior kernel's window rows summed as two partial sums (k ≥ 7), with far
    candidates skipped (small t), against the float64 oracle on the interior pixels."""
    import els_jax as ej
    rng = np.random.default_rng(k)
    h, w, c, n = 12, 13, 2, 70
    images = rng.uniform(-1, 1, (n, h, w, c)).astype(np.float32)
    ab = oracles.alpha_bar(t)
    x = (np.sqrt(ab) * images[rng.integers(0, n, 2)]
         + np.sqrt(1 - ab) * rng.normal(size=(2, h, w, c))).astype(np.float32)
    m = ej.make_machine("els", images, scales=k, boundary="zeros", method="native")
    got = np.asarray(m.x0(jnp.asarray(x), jnp.float32(t), 0))
    want = oracles.els_x0(x, t, images, k, "zeros", False)
    inner = (slice(None), slice(k // 2, h - k // 2), slice(k // 2, w - k // 2))
    np.testing.assert_allclose(got[inner], want[inner], atol=1e-5)

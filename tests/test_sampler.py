"""The shared sampler (docs/theory.md §3): grid, DDIM update formula, determinism, DDPM marginals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from tests import oracles


def test_uniform_times_is_the_descending_default_grid():
    t = np.asarray(ej.uniform_times(4))
    np.testing.assert_allclose(t, [1.0, 0.75, 0.5, 0.25, 0.0])


def test_one_ddim_step_matches_spec_formula(rng):
    x = jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32)
    t, tn = 0.7, 0.55
    ab, abn = oracles.alpha_bar(t), oracles.alpha_bar(tn)
    r = math.sqrt(abn / ab)
    want = r * np.asarray(x) + (math.sqrt(1 - abn) - r * math.sqrt(1 - ab)) * np.asarray(eps)
    got = ej.ddim_step(x, eps, jnp.float32(t), jnp.float32(tn))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_ddpm_step_has_spec_variance():
    x = jnp.zeros((40000, 1, 1, 1))
    eps = jnp.zeros_like(x)
    t, tn = 0.6, 0.4
    ab, abn = oracles.alpha_bar(t), oracles.alpha_bar(tn)
    sigma2 = (1 - abn) / (1 - ab) * (1 - ab / abn)
    out = ej.ddim_step(x, eps, t, tn, eta=1.0, key=jax.random.PRNGKey(3))
    np.testing.assert_allclose(float(out.var()), sigma2, rtol=0.03)


def test_sampler_passes_step_index_and_time_and_is_deterministic(rng):
    seen = []

    def eps_fn(x, t, i):
        seen.append((i, float(t)))
        return jnp.tanh(x) * 0.5 + 0.1 * t

    x_T = jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32)
    times = ej.uniform_times(5)
    out1 = ej.sample(eps_fn, x_T, times)
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([t for _, t in seen], [1.0, 0.8, 0.6, 0.4, 0.2], rtol=1e-6)
    out2 = ej.sample(eps_fn, x_T, times)
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
    # The same loop by hand, step by step, with the formula of docs/theory.md §3.
    x = np.asarray(x_T, np.float64)
    tt = np.asarray(times, np.float64)
    for i in range(5):
        ab, abn = oracles.alpha_bar(tt[i]), oracles.alpha_bar(tt[i + 1])
        e = np.tanh(x) * 0.5 + 0.1 * tt[i]
        r = math.sqrt(abn / ab)
        x = r * x + (math.sqrt(1 - abn) - r * math.sqrt(1 - ab)) * e
    np.testing.assert_allclose(np.asarray(out1), x, rtol=1e-4, atol=1e-4)


def _one_point_model(x_star):
    """Exact ε̂ for data = one point x*: ε̂ = (x − a·x*)/b."""
    images = jnp.asarray(x_star)[None]

    def eps_fn(x, t, i):
        return ej.score_to_eps(ej.ideal_score(x, t, images), t)
    return eps_fn


def test_ddim_on_one_point_data_lands_on_it(rng):
    x_star = rng.uniform(-1, 1, size=(2, 2, 1)).astype(np.float32)
    x_T = jnp.asarray(rng.normal(size=(5, 2, 2, 1)), jnp.float32)
    res = ej.sample(_one_point_model(x_star), x_T, ej.uniform_times(10), return_trajectory=True)
    np.testing.assert_allclose(np.asarray(res.x0), np.broadcast_to(x_star, (5, 2, 2, 1)), atol=1e-4)
    assert res.trajectory.shape == (11, 5, 2, 2, 1) and res.x0_hat.shape == (10, 5, 2, 2, 1)
    np.testing.assert_allclose(np.asarray(res.x0_hat), np.broadcast_to(x_star, (10, 5, 2, 2, 1)), atol=1e-3)


def test_ddpm_marginals_on_one_point_data(rng):
    """Started from the exact marginal at t = 1, DDPM keeps x_t ~ N(a(t)·x*, b(t)² I)."""
    x_star = np.array([0.5, -0.8], np.float32).reshape(1, 2, 1)
    ab1 = oracles.alpha_bar(1.0)
    n = 20000
    x_T = math.sqrt(ab1) * x_star + math.sqrt(1 - ab1) * rng.normal(size=(n, 1, 2, 1))
    times = jnp.linspace(1.0, 0.3, 8)
    out = ej.sample(_one_point_model(x_star), jnp.asarray(x_T, jnp.float32), times, eta=1.0,
                    key=jax.random.PRNGKey(0))
    ab = oracles.alpha_bar(0.3)
    out = np.asarray(out)
    np.testing.assert_allclose(out.mean(0), math.sqrt(ab) * x_star, atol=0.02)
    np.testing.assert_allclose(out.std(0), np.full((1, 2, 1), math.sqrt(1 - ab)), rtol=0.03)
    # Same seed → same samples; another seed → different samples.
    again = ej.sample(_one_point_model(x_star), jnp.asarray(x_T[:4], jnp.float32), times, eta=1.0, key=jax.random.PRNGKey(0))
    other = ej.sample(_one_point_model(x_star), jnp.asarray(x_T[:4], jnp.float32), times, eta=1.0, key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.asarray(again), out[:4], atol=1e-5)
    assert not np.allclose(np.asarray(other), out[:4])


def test_sampler_rejects_bad_grids_and_missing_key():
    f = lambda x, t, i: x
    x = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match="descending"):
        ej.sample(f, x, jnp.array([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="PRNG key"):
        ej.sample(f, x, ej.uniform_times(3), eta=1.0)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        ej.sample(f, x[0], ej.uniform_times(3))

"""EDM's Heun solver in the one sampler (docs/theory.md §3): second-order convergence to the
exact probability-flow ODE solution for Gaussian data, 2N − 1 model calls with the right step
indices, t = 0 at the end, churn, jit/vmap/grad/jvp, bad inputs, and the Karras grid."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.core import conversions, schedules
from els_jax.core.sampler import (Churn, heun_step, karras_times, sample, sigma_of_time,
                                  time_of_sigma, uniform_times)
from els_jax.core import sampler as sampler_lib
from tests import oracles

# ---------------------------------------------------------------- Gaussian data, exact ODE

_LAMBDA = np.array([1.0, 0.3, 0.05, 0.01])          # covariance eigenvalues (anisotropic)
_MU = np.array([0.3, -0.2, 0.1, 0.4])


def _gaussian_images(n=2000, seed=0):
    """n images [n, 2, 2, 1] from N(μ, Q diag(λ) Qᵀ), Q a random rotation (float32)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    x = _MU + (rng.normal(size=(n, 4)) * np.sqrt(_LAMBDA)) @ q.T
    return x.reshape(n, 2, 2, 1).astype(np.float32)


_IMAGES = _gaussian_images()


def _gaussian_eps(images=_IMAGES):
    """The exact ε̂ of the maximum-likelihood Gaussian of ``images`` (the Wiener machine)."""
    images = jnp.asarray(images)

    def eps_fn(x, t, i):
        return conversions.x0_to_eps(ej.gaussian_x0(x, t, images), x, t)
    return eps_fn


def _exact_flow(x_tilde0, sigma0, sigma1, images=_IMAGES):
    """x̃(σ1) from x̃(σ0) [B, D] under dx̃/dσ = (x̃ − D(x̃; σ))/σ, D = μ + Σ(Σ + σ²I)⁻¹(x̃ − μ)
    (μ, Σ the 1/N mean and covariance of ``images``). In Σ's eigenbasis y = Uᵀ(x̃ − μ):
    dy_k/dσ = y_k·σ/(λ_k + σ²), so y_k(σ) ∝ sqrt(λ_k + σ²). float64."""
    flat = images.reshape(images.shape[0], -1).astype(np.float64)
    mu = flat.mean(0)
    cov = (flat - mu).T @ (flat - mu) / flat.shape[0]
    lam, u = np.linalg.eigh(cov)
    y = (x_tilde0 - mu) @ u
    return mu + (y * np.sqrt((lam + sigma1**2) / (lam + sigma0**2))) @ u.T


def _flow_error(solver, n, x_tilde0):
    """RMS error of ``solver`` with n steps on the Karras grid σ 80 → 0.01 (no σ = 0 point)
    against the exact flow, both at the grid's last time."""
    times = karras_times(n, sigma_min=0.01, sigma_max=80.0, final_zero=False)
    s0, s1 = (float(sigma_of_time(times[k])) for k in (0, -1))
    a0, a1 = (math.sqrt(float(schedules.cosine().alpha_bar(times[k]))) for k in (0, -1))
    x_T = jnp.asarray((a0 * x_tilde0).reshape(-1, 2, 2, 1), jnp.float32)
    got = np.asarray(sample(_gaussian_eps(), x_T, times, solver=solver), np.float64)
    want = a1 * _exact_flow(x_tilde0, s0, s1)
    return float(np.sqrt(np.mean((got.reshape(want.shape) - want) ** 2)))


def test_heun_is_second_order_on_the_exact_gaussian_flow():
    """Heun's error falls ≈ 4× per halving of the step (second order), DDIM's ≈ 2× (first
    order, DDIM = Euler in σ), and Heun beats DDIM at the same number of steps. The grid
    ends at σ = 0.01 > 0, so the comparison is on one σ range for every N."""
    rng = np.random.default_rng(1)
    x_tilde0 = _MU + 80.0 * rng.normal(size=(64, 4))        # x̃ at σ_max: ≈ N(μ, σ²I)
    err = {(s, n): _flow_error(s, n, x_tilde0) for s in ("heun", "ddim") for n in (9, 18, 36)}
    heun = (err["heun", 9] / err["heun", 18], err["heun", 18] / err["heun", 36])
    ddim = (err["ddim", 9] / err["ddim", 18], err["ddim", 18] / err["ddim", 36])
    print(f"\nerrors: {err}\nHeun ratios 9→18, 18→36: {heun[0]:.3f}, {heun[1]:.3f}; "
          f"DDIM: {ddim[0]:.3f}, {ddim[1]:.3f}; "
          f"Heun/DDIM at 18 steps: {err['heun', 18] / err['ddim', 18]:.3f}")
    assert all(3.0 <= r <= 5.5 for r in heun)
    assert all(1.6 <= r <= 2.4 for r in ddim)
    assert err["heun", 18] < 0.5 * err["ddim", 18]
    assert err["heun", 36] > 1e-4                   # far above float32 rounding


# ---------------------------------------------------------------- model calls and indices


def test_heun_makes_2n_minus_1_calls_with_the_grid_points_indices():
    calls = []

    def eps_fn(x, t, i):
        calls.append((i, float(t)))
        return jnp.tanh(x) * 0.5 + 0.1 * t

    x_T = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 1)), jnp.float32)
    times = karras_times(5)                          # ends at t = 0
    tt = np.asarray(times)
    sample(eps_fn, x_T, times, solver="heun")
    assert len(calls) == 2 * 5 - 1
    # Step i: (i, t_i), then the Euler point at (i + 1, t_{i+1}); the last step only (4, t_4).
    assert [i for i, _ in calls] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    np.testing.assert_allclose([t for _, t in calls], tt[[0, 1, 1, 2, 2, 3, 3, 4, 4]])
    assert all(t > 0 for _, t in calls)              # never evaluated at t = 0
    calls.clear()
    sample(eps_fn, x_T, uniform_times(1), solver="heun")      # one step: Euler, one call
    assert [i for i, _ in calls] == [0]
    # heun_step by hand = the DDIM step with the averaged ε̂.
    calls.clear()
    t0, t1 = jnp.float32(tt[1]), jnp.float32(tt[2])
    got, eps = heun_step(eps_fn, x_T, t0, t1, 1)
    x_e = ej.ddim_step(x_T, eps_fn(x_T, t0, 1), t0, t1)
    want = ej.ddim_step(x_T, 0.5 * (eps_fn(x_T, t0, 1) + eps_fn(x_e, t1, 2)), t0, t1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert [i for i, _ in calls[:2]] == [1, 2]


def test_heun_runs_a_machine_with_one_patch_size_per_step():
    """A machine with a scale list (num_steps = 3) runs the 3-step Heun grid: every index the
    solver passes (0 … 2, the second call of step i at i + 1) picks an existing patch size."""
    images = _IMAGES[:16]
    machine = ej.make_machine("local", images, scales=[1, 3, 3])
    out = sample(machine, jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 1)),
                                      jnp.float32), karras_times(3), solver="heun")
    assert np.all(np.isfinite(np.asarray(out)))


# ---------------------------------------------------------------- t = 0, x̂_0, churn


def _one_point_eps(x_star):
    images = jnp.asarray(x_star)[None]

    def eps_fn(x, t, i):
        return ej.score_to_eps(ej.ideal_score(x, t, images), t)
    return eps_fn


def test_heun_to_t0_on_a_uniform_grid_is_finite_and_x0_consistent(rng):
    x_T = jnp.asarray(rng.normal(size=(4, 2, 2, 1)), jnp.float32)
    res = sample(_gaussian_eps(), x_T, uniform_times(10), solver="heun", return_trajectory=True)
    assert res.trajectory.shape == (11, 4, 2, 2, 1) and res.x0_hat.shape == (10, 4, 2, 2, 1)
    assert np.all(np.isfinite(np.asarray(res.trajectory)))
    assert np.all(np.isfinite(np.asarray(res.x0_hat)))
    # The last step is Euler to t = 0 (a' = 1, b' = 0): it returns that step's x̂_0.
    np.testing.assert_allclose(np.asarray(res.x0), np.asarray(res.x0_hat[-1]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.trajectory[-1]), np.asarray(res.x0))
    # One-point data: every x̂_0 is the point, and so is the sample (also on EDM's grid).
    x_star = rng.uniform(-1, 1, size=(2, 2, 1)).astype(np.float32)
    for times in (uniform_times(6), karras_times(6)):
        res = sample(_one_point_eps(x_star), x_T, times, solver="heun", return_trajectory=True)
        np.testing.assert_allclose(np.asarray(res.x0), np.broadcast_to(x_star, x_T.shape),
                                   atol=1e-4)
        np.testing.assert_allclose(np.asarray(res.x0_hat),
                                   np.broadcast_to(x_star, (6,) + x_T.shape), atol=1e-3)


def test_churn_is_seeded_needs_a_key_and_zero_churn_is_no_churn(rng):
    eps_fn = _gaussian_eps()
    x_T = jnp.asarray(rng.normal(size=(3, 2, 2, 1)), jnp.float32)
    times = karras_times(8, sigma_max=20.0)
    churn = Churn(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    a = sample(eps_fn, x_T, times, solver="heun", churn=churn, key=k0)
    b = sample(eps_fn, x_T, times, solver="heun", churn=churn, key=k0)
    c = sample(eps_fn, x_T, times, solver="heun", churn=churn, key=k1)
    plain = sample(eps_fn, x_T, times, solver="heun")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c), atol=1e-3)
    assert not np.allclose(np.asarray(a), np.asarray(plain), atol=1e-3)
    assert np.all(np.isfinite(np.asarray(a)))
    with pytest.raises(ValueError, match="PRNG key"):
        sample(eps_fn, x_T, times, solver="heun", churn=churn)
    # s_churn = 0, or a window [s_tmin, s_tmax] that holds no grid σ: exactly no churn.
    for none in (Churn(0.0), Churn(40.0, s_tmin=1e3, s_tmax=1e4)):
        got = sample(eps_fn, x_T, times, solver="heun", churn=none, key=k0)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))
    # One-point data: the exact denoiser removes any added noise.
    x_star = rng.uniform(-1, 1, size=(2, 2, 1)).astype(np.float32)
    got = sample(_one_point_eps(x_star), x_T, times, solver="heun", churn=churn, key=k0)
    np.testing.assert_allclose(np.asarray(got), np.broadcast_to(x_star, x_T.shape), atol=1e-4)
    # Under jit: the eager values.
    jitted = jax.jit(lambda x, k: sample(eps_fn, x, times, solver="heun", churn=churn, key=k))
    np.testing.assert_allclose(np.asarray(jitted(x_T, k0)), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_churn_raises_sigma_by_one_plus_gamma_with_the_right_noise():
    """x at t with data 0 is N(0, b²); churned, it is at t̂ with σ(t̂) = σ(1 + γ) and
    N(0, b(t̂)²), γ = min(S_churn/N, √2 − 1)."""
    t = jnp.float32(0.5)
    s = schedules.cosine()
    _, _, b = schedules.coefficients(t, s)
    x = b * jax.random.normal(jax.random.PRNGKey(5), (20000, 1, 2, 1))
    churn = Churn(s_churn=3.0)                       # N = 10: γ = 0.3
    x_hat, t_hat = sampler_lib._apply_churn(x, t, jax.random.PRNGKey(6), 10, churn, s)
    np.testing.assert_allclose(float(sigma_of_time(t_hat)), 1.3 * float(sigma_of_time(t)),
                               rtol=1e-5)
    _, _, b_hat = schedules.coefficients(t_hat, s)
    np.testing.assert_allclose(float(jnp.std(x_hat)), float(b_hat), rtol=0.02)
    _, t_cap = sampler_lib._apply_churn(x, t, jax.random.PRNGKey(6), 1, Churn(1e3), s)
    np.testing.assert_allclose(float(sigma_of_time(t_cap)),
                               math.sqrt(2.0) * float(sigma_of_time(t)), rtol=1e-5)


# ---------------------------------------------------------------- jit, vmap, grad, jvp


@pytest.mark.parametrize("model", ["els", "gaussian"])
def test_heun_composes_with_jit_vmap_grad_and_jvp(model):
    rng = np.random.default_rng(3)
    if model == "els":
        images = rng.uniform(-1, 1, size=(8, 4, 4, 1)).astype(np.float32)
        eps_fn = ej.make_machine("els", images, scales=3)
        # Ends at σ = 0.3, where the sample still depends smoothly on x_T (at σ → 0 the
        # machine snaps to a training patch: gradient 0).
        times = karras_times(3, sigma_min=0.3, sigma_max=10.0, final_zero=False)
        shape = (1, 4, 4, 1)
    else:
        # σ_min = 0.05: on a 4-step grid to EDM's σ_min = 0.002 the last Heun step multiplies
        # the float32 rounding of ε̂ at σ' by (σ − σ')/(2σ') ≈ 100, so jit and eager (which
        # round differently) then differ by ≈ 1e-4 instead of ≈ 1e-6.
        eps_fn, shape, times = _gaussian_eps(), (1, 2, 2, 1), karras_times(4, sigma_min=0.05)
    x_T = rng.normal(size=(3,) + shape).astype(np.float32)            # 3 seeds
    run = lambda x: sample(eps_fn, x, times, solver="heun")            # noqa: E731
    eager = np.stack([np.asarray(run(x)) for x in x_T])
    np.testing.assert_allclose(np.asarray(jax.jit(run)(x_T[0])), eager[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(run))(x_T)), eager,
                               rtol=1e-5, atol=1e-5)

    def pixel(x):
        return run(x)[0, 0, 0, 0]
    v = rng.normal(size=shape).astype(np.float32)
    jv, g = jax.jit(lambda x, v: (jax.jvp(pixel, (x,), (v,))[1], jax.grad(pixel)(x)))(x_T[0], v)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-3
    np.testing.assert_allclose(float(jv), np.vdot(g, v), rtol=1e-4, atol=1e-5)
    if model == "gaussian":          # the Gaussian flow is affine in x_T: jvp = the difference
        # A traced grid (a jit argument), and a grid built inside jit: the eager values.
        traced = jax.jit(lambda x, tt: (sample(eps_fn, x, tt, solver="heun"),
                                        sample(eps_fn, x, karras_times(4, sigma_min=0.05),
                                               solver="heun")))(x_T[0], times)
        for got in traced:
            np.testing.assert_allclose(np.asarray(got), eager[0], rtol=1e-5, atol=1e-5)
        diff = float(pixel(x_T[0] + v) - pixel(x_T[0]))
        np.testing.assert_allclose(float(jv), diff, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- bad inputs


def test_bad_solver_eta_churn_and_karras_arguments():
    f = lambda x, t, i: x                                              # noqa: E731
    x = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match="unknown solver"):
        sample(f, x, uniform_times(3), solver="rk4")
    with pytest.raises(ValueError, match="eta"):
        sample(f, x, uniform_times(3), solver="heun", eta=0.5, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="heun"):
        sample(f, x, uniform_times(3), churn=Churn(1.0), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="s_churn"):
        sample(f, x, uniform_times(3), solver="heun", churn=Churn(-1.0))
    with pytest.raises(ValueError, match="descending"):
        sample(f, x, jnp.array([0.0, 0.5, 1.0]), solver="heun")
    for kwargs in ({"n": 0}, {"n": 2.5}, {"n": True}, {"n": 4, "sigma_min": 0.0},
                   {"n": 4, "sigma_min": 5.0, "sigma_max": 1.0},
                   {"n": 4, "sigma_max": math.inf}, {"n": 4, "rho": 0.0},
                   {"n": 4, "rho": -7.0}, {"n": 4, "sigma_min": float("nan")}):
        with pytest.raises(ValueError):
            karras_times(**kwargs)
    # Linear's t = 0 is σ ≈ 0.1005: EDM's σ_min = 0.002 is out of its range.
    with pytest.raises(ValueError, match="smallest noise level"):
        karras_times(4, schedule="linear")
    # Exponential reaches only σ(1) ≈ 2.53: σ_min above it is out of range.
    with pytest.raises(ValueError, match="largest noise level"):
        karras_times(4, sigma_min=3.0, schedule="exponential")


# ---------------------------------------------------------------- the Karras grid


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_karras_times_follow_the_formula_in_every_schedule(name):
    sigma_min, sigma_max, rho, n = 0.2, 80.0, 7.0, 12
    s = schedules.get(name)
    sigma_top = float(sigma_of_time(1.0, s))                          # σ(1), may be inf
    reach = min(sigma_max, sigma_top)                                 # σ_max clipped to it
    for final_zero in (True, False):
        times = np.asarray(karras_times(n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                        schedule=name, final_zero=final_zero))
        assert times.dtype == np.float32 and times.shape == (n + 1,)
        assert np.all(np.diff(times) < 0) and 0.0 <= times[-1] and times[0] <= 1.0
        m = n if final_zero else n + 1
        frac = np.arange(m) / (m - 1)
        want = (reach ** (1 / rho) + frac * (sigma_min ** (1 / rho) - reach ** (1 / rho))) ** rho
        got = np.asarray(sigma_of_time(times[:m], s), np.float64)      # as the sampler sees it
        # float32 ᾱ resolves b² = 1 − ᾱ to ≈ 6e-8: σ to a relative 3e-8/σ².
        np.testing.assert_array_less(np.abs(got / want - 1), 1e-4 + 6e-8 / want**2)
        ab = oracles.alpha_bar(times[:m], name)
        exact = np.sqrt((1 - ab) / ab)
        np.testing.assert_allclose(exact, want, rtol=1e-3)               # float64 schedule
        if final_zero:
            assert times[-1] == 0.0
        if sigma_top < sigma_max:                                       # clipped: starts at 1
            assert times[0] == 1.0
    # σ_max itself, where the schedule reaches it: σ(t_0) = σ_max.
    if sigma_top > 80.0:
        np.testing.assert_allclose(float(sigma_of_time(times[0], s)), 80.0, rtol=1e-4)
    # The traced inverse (used by churn) agrees with the host one.
    traced = jax.jit(lambda sg: time_of_sigma(sg, s))(jnp.asarray(want, jnp.float32))
    np.testing.assert_allclose(np.asarray(traced), times[:m], atol=3e-6)


def test_karras_times_edge_cases():
    t1 = np.asarray(karras_times(1))                                  # σ_max, then 0
    assert t1.shape == (2,) and t1[-1] == 0.0
    np.testing.assert_allclose(float(sigma_of_time(t1[0])), 80.0, rtol=1e-4)
    t1 = np.asarray(karras_times(1, sigma_min=0.5, final_zero=False))  # σ_max, σ_min
    np.testing.assert_allclose(np.asarray(sigma_of_time(t1)), [80.0, 0.5], rtol=1e-4)
    # ρ = 1 is uniform in σ; the default grid is EDM's (σ_max = 80 → 0.002 → 0).
    t = karras_times(5, sigma_min=1.0, sigma_max=5.0, rho=1.0, final_zero=False)
    np.testing.assert_allclose(np.asarray(sigma_of_time(t)), [5, 4.2, 3.4, 2.6, 1.8, 1.0],
                               rtol=1e-4)
    t = np.asarray(karras_times(18))
    assert t.shape == (19,) and t[-1] == 0.0
    np.testing.assert_allclose(float(sigma_of_time(t[-2])), 0.002, rtol=2e-2)
    # Out-of-range σ is clipped by time_of_sigma: to t = 1 above σ(1), to t = 0 at 0.
    np.testing.assert_array_equal(time_of_sigma(np.array([0.0, 1e6]), "linear"), [0.0, 1.0])

"""els_jax: analytic diffusion machines (Kamb & Ganguli, ICML 2025) and the convolutional
networks they predict, in JAX. See README.md and ../shared/SPEC.md for the contract."""

from els_jax import conversions, data, schedules, softmax
from els_jax.conversions import (eps_to_score, eps_to_x0, score_to_eps, score_to_x0,
                                 x0_to_eps, x0_to_score)
from els_jax.data import load_dataset
from els_jax.forward import add_noise
from els_jax.ideal import ideal_score, ideal_x0
from els_jax.sampler import SampleResult, ddim_step, sample, uniform_times

__version__ = "0.1.0"

__all__ = [
    "schedules", "conversions", "data", "softmax",
    "add_noise",
    "score_to_eps", "eps_to_score", "score_to_x0", "x0_to_score", "eps_to_x0", "x0_to_eps",
    "ideal_score", "ideal_x0",
    "uniform_times", "ddim_step", "sample", "SampleResult",
    "load_dataset",
]

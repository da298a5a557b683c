"""els_jax: analytic diffusion machines (Kamb & Ganguli, ICML 2025) and the convolutional
networks they predict, in JAX. See README.md and ../shared/SPEC.md for the contract."""

from els_jax import conversions, data, schedules, softmax
from els_jax.conversions import (eps_to_score, eps_to_x0, score_to_eps, score_to_x0,
                                 x0_to_eps, x0_to_score)
from els_jax.data import load_dataset
from els_jax.forward import add_noise
from els_jax.ideal import ideal_score, ideal_x0
from els_jax.els import els_score, els_x0
from els_jax.equivariant import equivariant_score, equivariant_x0
from els_jax.local import local_score, local_x0
from els_jax.gaussian import gaussian_score, gaussian_x0
from els_jax.nearest import nearest_score, nearest_x0
from els_jax.pca_locality import pca_locality_score, pca_locality_x0
from els_jax.machine import Machine, candidate_mesh, make_machine
from els_jax.sampler import SampleResult, ddim_step, sample, uniform_times
from els_jax.networks import ResNet, UNet, make_network, receptive_field
from els_jax.train import (TrainConfig, create_train_state, load_trained,
                           train_and_evaluate, train_step)
from els_jax import calibration, experiment, metrics
from els_jax.calibration import Calibration, calibrate, candidate_machines
from els_jax import soft
from els_jax.soft import els_soft_score, els_soft_x0
from els_jax.calibration import SigmaCalibration, calibrate_sigma
from els_jax.experiment import ReproduceConfig, reproduce
from els_jax.posterior import Provenance, creativity, mosaic_image, provenance
from els_jax import reference
from els_jax.reference import reference_score, reference_x0

__version__ = "0.1.0"

__all__ = [
    "schedules", "conversions", "data", "softmax",
    "add_noise",
    "score_to_eps", "eps_to_score", "score_to_x0", "x0_to_score", "eps_to_x0", "x0_to_eps",
    "ideal_score", "ideal_x0",
    "local_score", "local_x0", "equivariant_score", "equivariant_x0", "els_score", "els_x0",
    "gaussian_score", "gaussian_x0", "nearest_score", "nearest_x0",
    "pca_locality_score", "pca_locality_x0",
    "make_machine", "Machine", "candidate_mesh",
    "uniform_times", "ddim_step", "sample", "SampleResult",
    "load_dataset",
    "ResNet", "UNet", "make_network", "receptive_field",
    "TrainConfig", "create_train_state", "train_step", "train_and_evaluate", "load_trained",
    "metrics", "calibration", "experiment",
    "Calibration", "calibrate", "candidate_machines", "ReproduceConfig", "reproduce",
    "Provenance", "provenance", "mosaic_image", "creativity",
    "soft", "els_soft_score", "els_soft_x0", "SigmaCalibration", "calibrate_sigma",
    "reference", "reference_x0", "reference_score",
]

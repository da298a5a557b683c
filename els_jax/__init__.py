"""els_jax: analytic diffusion machines (Kamb & Ganguli, ICML 2025) and the convolutional
networks they predict, in JAX. The mathematics is docs/theory.md; README.md maps it to code.

Layers, each importing only the ones below it (tests/test_layers.py checks this):

    experiment/  calibration, comparison, report, figures      (the paper's experiment)
    machines/    one module per analytic machine + make_machine | nets/  networks, training
    engines/     exact engines, banks, fused kernels, the engine selector
    core/        schedules, forward process, conversions, softmax, sampler, patches, data

The public API is the explicit list below (``ej.*``)."""

from els_jax.core import conversions, data, patches, schedules, softmax
from els_jax.core.conversions import (eps_to_score, eps_to_x0, score_to_eps, score_to_x0,
                                      x0_to_eps, x0_to_score)
from els_jax.core.data import load_dataset
from els_jax.core.forward import add_noise
from els_jax.core.sampler import (Churn, SampleResult, authors_grid, ddim_step, heun_step,
                                  karras_times, sample, sigma_of_time, time_of_sigma,
                                  uniform_times)
from els_jax.machines import reference, soft
from els_jax.machines.ideal import ideal_score, ideal_x0
from els_jax.machines.equivariant import equivariant_score, equivariant_x0
from els_jax.machines.local import local_score, local_x0
from els_jax.machines.els import els_score, els_x0
from els_jax.machines.gaussian import gaussian_score, gaussian_x0
from els_jax.machines.nearest import nearest_score, nearest_x0
from els_jax.machines.pca_locality import pca_locality_score, pca_locality_x0
from els_jax.machines.soft import els_soft_score, els_soft_x0
from els_jax.machines.scfdm import scfdm_score, scfdm_x0
from els_jax.machines.reference import reference_score, reference_x0
from els_jax.machines.posterior import (Provenance, creativity, mosaic_image, nearest_training,
                                        provenance)
from els_jax.machines.factory import Machine, candidate_mesh, make_machine

# The networks (Flax, optax, orbax) and the experiment are imported on first use of one of
# their names (PEP 562): ``els-jax sample`` and a script that only runs machines do not pay
# the ~0.3 s those imports take. ``ej.UNet``, ``from els_jax import reproduce`` and
# ``dir(ej)`` work as if they were imported here.
_LAZY = {
    "networks": ("els_jax.nets.networks", None),
    "ResNet": ("els_jax.nets.networks", "ResNet"),
    "UNet": ("els_jax.nets.networks", "UNet"),
    "make_network": ("els_jax.nets.networks", "make_network"),
    "receptive_field": ("els_jax.nets.networks", "receptive_field"),
    "TrainConfig": ("els_jax.nets.train", "TrainConfig"),
    "create_train_state": ("els_jax.nets.train", "create_train_state"),
    "load_trained": ("els_jax.nets.train", "load_trained"),
    "train_and_evaluate": ("els_jax.nets.train", "train_and_evaluate"),
    "train_step": ("els_jax.nets.train", "train_step"),
    "experiment": ("els_jax.experiment", None),
    "calibration": ("els_jax.experiment.calibration", None),
    "metrics": ("els_jax.experiment.metrics", None),
    "Calibration": ("els_jax.experiment.calibration", "Calibration"),
    "SigmaCalibration": ("els_jax.experiment.calibration", "SigmaCalibration"),
    "calibrate": ("els_jax.experiment.calibration", "calibrate"),
    "calibrate_sigma": ("els_jax.experiment.calibration", "calibrate_sigma"),
    "candidate_machines": ("els_jax.experiment.calibration", "candidate_machines"),
    "ReproduceConfig": ("els_jax.experiment", "ReproduceConfig"),
    "reproduce": ("els_jax.experiment", "reproduce"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'els_jax' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value              # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "schedules", "conversions", "data", "softmax", "patches",
    "add_noise",
    "score_to_eps", "eps_to_score", "score_to_x0", "x0_to_score", "eps_to_x0", "x0_to_eps",
    "ideal_score", "ideal_x0",
    "local_score", "local_x0", "equivariant_score", "equivariant_x0", "els_score", "els_x0",
    "gaussian_score", "gaussian_x0", "nearest_score", "nearest_x0",
    "pca_locality_score", "pca_locality_x0", "scfdm_score", "scfdm_x0",
    "make_machine", "Machine", "candidate_mesh",
    "uniform_times", "karras_times", "authors_grid", "ddim_step", "heun_step", "sample",
    "SampleResult",
    "Churn", "sigma_of_time", "time_of_sigma",
    "load_dataset",
    "networks", "ResNet", "UNet", "make_network", "receptive_field",
    "TrainConfig", "create_train_state", "train_step", "train_and_evaluate", "load_trained",
    "metrics", "calibration", "experiment",
    "Calibration", "calibrate", "candidate_machines", "ReproduceConfig", "reproduce",
    "Provenance", "provenance", "mosaic_image", "creativity", "nearest_training",
    "soft", "els_soft_score", "els_soft_x0", "SigmaCalibration", "calibrate_sigma",
    "reference", "reference_x0", "reference_score",
]

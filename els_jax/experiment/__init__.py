"""The paper's experiment (docs/theory.md §4, §8): calibrate the locality scale to a network,
sample the network and every machine from the same seeds, compare, report.

    ``pipeline``       ``reproduce``: network → calibration → comparison → report, resumable
    ``config``         ``ReproduceConfig``, the compared families, the training recipes
                       (``paper_train_config``) and the shipped networks
    ``calibrate_run``  stage 2: the run's scales.json (drives ``calibration``)
    ``calibration``    per-step patch size (and els_soft width) that best matches a network
    ``compare``        stage 3: every model sampled from the same seeds, checked
    ``report``         stage 4: report.json, report.md, samples.npz
    ``figures``        image grids and the report's figures
    ``metrics``        r, r², R² per seed, bootstrap medians
    ``seeds``          x_T and labels per seed;  ``files``  atomic writers, timings.json
    ``mosaic``         the patch-mosaic run

Layers, each module importing only from the layers below it:
pipeline; report, calibrate_run; compare, calibration, mosaic; config, figures, metrics, seeds,
files. Top layer of the package (only ``els_jax.cli`` is above it)."""

from els_jax.experiment.config import DATASET_DEFAULTS, MACHINE_NAMES, ReproduceConfig
from els_jax.experiment.seeds import seed_noise

__all__ = ["ReproduceConfig", "reproduce", "seed_noise", "MACHINE_NAMES", "DATASET_DEFAULTS"]


def __getattr__(name):
    # ``reproduce`` (the pipeline: networks, training, orbax) is imported on first use, so that
    # the figures and the config (``els-jax sample``, the CLI's parser) do not pay for Flax.
    if name == "reproduce":
        from els_jax.experiment.pipeline import reproduce
        return reproduce
    raise AttributeError(f"module 'els_jax.experiment' has no attribute {name!r}")

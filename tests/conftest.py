"""Strict numerics for every test: implicit rank promotion raises, float32 stays the default."""

import os

# Engine choice by its static rules, not by timing (els_jax.engines): results and the engine
# each test sees do not depend on the machine's load. test_engines.py tests the measuring.
os.environ.setdefault("ELS_JAX_AUTOTUNE", "0")
# The CLI turns on JAX's persistent compilation cache in the user's cache directory; tests
# that call it do not (the CLI's cache stays untouched by the suite).
os.environ.setdefault("ELS_JAX_COMPILE_CACHE", "0")
# The suite's own compilation cache instead: one fresh directory per run, shared by the xdist
# workers (they inherit this process's environment) and removed at its end. Many tests
# compile the same programs (each machine's passes, the oracles' comparisons); reading them
# back took the suite from 477 to 422 s and from 453 to 414 s on 2 cores (two pairs of runs
# one after the other, AMD EPYC, 2026-12-06; clean-clone CI 479 s). Compilation is
# deterministic, so a program read back is the one a compilation would have produced.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="els_jax_test_xla_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):   # (in case a plugin imported jax first)
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture
def rng():
    return np.random.default_rng(0)

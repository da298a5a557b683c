"""Strict numerics for every test: implicit rank promotion raises, float32 stays the default."""

import os

# Engine choice by its static rules, not by timing (els_jax.engines): results and the engine
# each test sees do not depend on the machine's load. test_engines.py tests the measuring.
os.environ.setdefault("ELS_JAX_AUTOTUNE", "0")
# The CLI turns on JAX's persistent compilation cache; tests that call it stay hermetic.
os.environ.setdefault("ELS_JAX_COMPILE_CACHE", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    return np.random.default_rng(0)

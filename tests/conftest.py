"""Shared pytest setup: quiet TensorFlow, deterministic seeds, headless plots."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_global_seeds():
    # Library code uses stateless seeds; this only pins incidental randomness in tests.
    tf.random.set_seed(0)
    np.random.seed(0)
    yield

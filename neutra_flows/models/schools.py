"""Rubin's eight schools, centred: the classic funnel inside a real hierarchical model.

References
----------
* Rubin, D. B. "Estimation in parallel randomized experiments." Journal of
  Educational Statistics 6(4), 1981.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows._utils import canonical_dtype
from neutra_flows.targets import Target

tfd = tfp.distributions

__all__ = ["eight_schools"]

_EIGHT_SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
_EIGHT_SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(*, dtype: Any = tf.float32) -> Target:
    """Eight schools, centred parameterization (the classic funnel in a real model).

    ::

        mu ~ N(0, 5),  tau ~ HalfCauchy(0, 5),
        theta[i] ~ N(mu, tau),  y[i] ~ N(theta[i], sigma[i]),  i < 8

    Built from a pinned ``JointDistributionCoroutine``: the variables
    are ``mu``, ``tau`` (positive, unconstrained by TFP's default bijector) and
    ``theta`` (shape ``[8]``); ``d = 10``. Ground truth: ``None``.
    """
    dtype = canonical_dtype(dtype)
    y = tf.constant(_EIGHT_SCHOOLS_Y, dtype)
    sigma = tf.constant(_EIGHT_SCHOOLS_SIGMA, dtype)
    zero, five = tf.constant(0.0, dtype), tf.constant(5.0, dtype)

    root = tfd.JointDistributionCoroutine.Root

    # Written batch-aware by hand (not AutoBatched): eager calls stay cheap.
    @tfd.JointDistributionCoroutine
    def model():
        mu = yield root(tfd.Normal(zero, five, name="mu"))
        tau = yield root(tfd.HalfCauchy(zero, five, name="tau"))
        ones = tf.ones([8], dtype)
        theta = yield tfd.Independent(
            tfd.Normal(mu[..., tf.newaxis] * ones, tau[..., tf.newaxis] * ones), 1, name="theta"
        )
        yield tfd.Independent(tfd.Normal(theta, sigma), 1, name="y")

    return Target.from_joint_distribution(model.experimental_pin(y=y), name="eight_schools")

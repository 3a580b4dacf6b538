"""Textbook targets with closed-form ground truth and exact samplers: Neal's funnel, the banana.

Both are the standard hard geometries for HMC: the funnel's scale changes by
orders of magnitude along one coordinate, the banana bends a Gaussian along a
parabola. Their means and standard deviations are known exactly.

Example:

>>> import numpy as np
>>> from neutra_flows.models import banana
>>> t = banana()
>>> t.event_size, t.dtype.name
(2, 'float32')
>>> sorted(t.ground_truth_std)
['x']
>>> t.unnormalized_log_prob(np.zeros([4, 2], np.float32)).shape
TensorShape([4])

References
----------
* Neal, R. M. "Slice sampling." Annals of Statistics 31(3), 2003 (the funnel).
* Haario, H., Saksman, E. and Tamminen, J. "Adaptive proposal distribution for
  random walk Metropolis algorithm." Computational Statistics 14, 1999 (the banana).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows._utils import canonical_dtype, check_positive_int, split_seed
from neutra_flows.targets import Target

tfd = tfp.distributions

__all__ = ["banana", "neals_funnel"]


def neals_funnel(ndims: int = 10, *, dtype: Any = tf.float32) -> Target:
    """Neal's funnel: ``x0 ~ N(0, 3)``, ``x_i ~ N(0, exp(x0 / 2))`` for ``i = 1..ndims-1``.

    One variable ``"x"`` of shape ``[ndims]``. Ground truth (exact): ``x0`` has
    mean 0 and standard deviation 3; each ``x_i`` has mean 0 and
    ``Var(x_i) = E[exp(x0)] = exp(9 / 2)``, so standard deviation ``exp(9 / 4)``.
    Has an exact sampler.
    """
    ndims = check_positive_int(ndims, "ndims", minimum=2)
    dtype = canonical_dtype(dtype)

    def log_prob_fn(x):
        x0 = x[..., 0]
        rest = x[..., 1:]
        lp0 = tfd.Normal(tf.constant(0.0, dtype), tf.constant(3.0, dtype)).log_prob(x0)
        scale = tf.exp(x0 / 2)[..., tf.newaxis]
        lp_rest = tfd.Normal(tf.zeros([], dtype), scale).log_prob(rest)
        return lp0 + tf.reduce_sum(lp_rest, axis=-1)

    def sample_fn(n, seed):
        s0, s1 = split_seed(seed, 2)
        x0 = 3.0 * tf.random.stateless_normal([n, 1], seed=s0, dtype=dtype)
        rest = tf.exp(x0 / 2) * tf.random.stateless_normal([n, ndims - 1], seed=s1, dtype=dtype)
        return tf.concat([x0, rest], axis=-1)

    std = np.full([ndims], math.exp(9.0 / 4.0))
    std[0] = 3.0
    return Target(
        log_prob_fn,
        [ndims],
        dtype,
        name=f"neals_funnel_{ndims}d",
        ground_truth_mean=np.zeros([ndims]),
        ground_truth_std=std,
        sample_fn=sample_fn,
    )


def banana(ndims: int = 2, curvature: float = 0.03, *, dtype: Any = tf.float32) -> Target:
    """The banana: ``x0 ~ N(0, 10)``, ``x1 ~ N(b (x0^2 - 100), 1)`` with ``b = curvature``.

    Coordinates beyond the second (``ndims > 2``) are independent ``N(0, 1)``.
    Normalised (``log p`` integrates to 1), so ``-ELBO`` estimates ``KL(q || p)``
    up to the ELBO's bias. Ground truth (exact): ``E[x1] = b (E[x0^2] - 100) = 0``
    and ``Var(x1) = 1 + b^2 Var(x0^2) = 1 + 2 b^2 10^4``. Has an exact sampler.
    """
    ndims = check_positive_int(ndims, "ndims", minimum=2)
    dtype = canonical_dtype(dtype)
    b = float(curvature)
    if not math.isfinite(b):
        raise ValueError(f"curvature must be finite, got {curvature}")

    def log_prob_fn(x):
        x0, x1 = x[..., 0], x[..., 1]
        normal = tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype))
        lp = tfd.Normal(tf.zeros([], dtype), tf.constant(10.0, dtype)).log_prob(x0)
        lp = lp + normal.log_prob(x1 - b * (tf.square(x0) - 100.0))
        if ndims > 2:
            lp = lp + tf.reduce_sum(normal.log_prob(x[..., 2:]), axis=-1)
        return lp

    def sample_fn(n, seed):
        eps = tf.random.stateless_normal([n, ndims], seed=seed, dtype=dtype)
        x0 = 10.0 * eps[:, :1]
        x1 = eps[:, 1:2] + b * (tf.square(x0) - 100.0)
        return tf.concat([x0, x1, eps[:, 2:]], axis=-1)

    std = np.ones([ndims])
    std[0] = 10.0
    std[1] = math.sqrt(1.0 + 2.0 * b**2 * 1e4)
    return Target(
        log_prob_fn,
        [ndims],
        dtype,
        name=f"banana_{ndims}d",
        ground_truth_mean=np.zeros([ndims]),
        ground_truth_std=std,
        sample_fn=sample_fn,
    )

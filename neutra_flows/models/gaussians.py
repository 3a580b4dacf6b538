"""Gaussian targets with their exact covariance: equicorrelated and ill-conditioned.

A Gaussian is the one target whose every moment is known, so it tests a sampler's
means, standard deviations and correlations at once; :class:`GaussianTarget`
keeps the exact covariance next to the exact ground truth and sampler.

Example:

>>> from neutra_flows.models import correlated_gaussian
>>> t = correlated_gaussian(2, 0.5, scale=[1.0, 2.0])
>>> t.covariance
array([[1., 1.],
       [1., 4.]])

References
----------
* Hoffman, M., Sountsov, P., Dillon, J. V., Langmore, I., Tran, D. and Vasudevan, S.
  "NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using neural transport."
  2019, arXiv:1903.03704 (the ill-conditioned Gaussian).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows._utils import canonical_dtype, check_positive_int
from neutra_flows.targets import Target

tfd = tfp.distributions

__all__ = ["GaussianTarget", "correlated_gaussian", "ill_conditioned_gaussian"]


class GaussianTarget(Target):
    """The Gaussian ``N(mean, L L^T)`` on ``R^d`` as a :class:`~neutra_flows.Target`.

    One variable ``"x"`` of shape ``[d]``, with exact ground truth (``mean`` and
    ``sqrt(diag(L L^T))``) and an exact sampler ``mean + L eps``.

    Args:
      mean: ``[d]``, the mean.
      scale_tril: ``[d, d]``, the lower-triangular Cholesky factor ``L`` of the
        covariance (positive diagonal).
      name: a label used in messages and reports.
      dtype: ``tf.float32`` or ``tf.float64``.

    Attributes:
      covariance: ``[d, d]``, the exact covariance ``L L^T`` (float64 numpy).
    """

    def __init__(self, mean: Any, scale_tril: Any, *, name: str = "gaussian", dtype: Any = tf.float32):
        mean = np.asarray(mean, np.float64)
        scale_tril = np.asarray(scale_tril, np.float64)
        if mean.ndim != 1 or scale_tril.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"mean must be [d] and scale_tril [d, d], got {mean.shape} and {scale_tril.shape}")
        if not np.all(np.diag(scale_tril) > 0):
            raise ValueError(f"scale_tril must have a positive diagonal, got {np.diag(scale_tril)}")
        dtype = canonical_dtype(dtype)
        d = mean.shape[0]
        cov = scale_tril @ scale_tril.T
        mvn_mean = tf.constant(mean, dtype)
        mvn_tril = tf.constant(scale_tril, dtype)

        def log_prob_fn(x):
            return tfd.MultivariateNormalTriL(mvn_mean, mvn_tril).log_prob(x)

        def sample_fn(n, seed):
            eps = tf.random.stateless_normal([n, d], seed=seed, dtype=dtype)
            return mvn_mean + tf.linalg.matvec(mvn_tril, eps)

        super().__init__(
            log_prob_fn,
            [d],
            dtype,
            name=name,
            ground_truth_mean=mean,
            ground_truth_std=np.sqrt(np.diag(cov)),
            sample_fn=sample_fn,
        )
        self._covariance = cov

    @property
    def covariance(self) -> np.ndarray:
        """``[d, d]``: the exact covariance (float64 numpy, a copy)."""
        return self._covariance.copy()


def correlated_gaussian(
    ndims: int = 2,
    rho: float = 0.9,
    *,
    mean: Any = 0.0,
    scale: Any = 1.0,
    dtype: Any = tf.float32,
) -> GaussianTarget:
    """An equicorrelated Gaussian: ``Cov = diag(s) ((1 - rho) I + rho 11^T) diag(s)``.

    ``mean`` and ``scale`` (``s``) broadcast to ``[ndims]``; ``rho`` must lie in
    ``(-1 / (ndims - 1), 1)``. Exact ground truth, sampler and covariance
    (:attr:`GaussianTarget.covariance`).
    """
    ndims = check_positive_int(ndims, "ndims")
    dtype = canonical_dtype(dtype)
    rho = float(rho)
    low = -1.0 / (ndims - 1) if ndims > 1 else -1.0
    if not (low < rho < 1.0):
        raise ValueError(f"rho must lie in ({low:.4g}, 1) for ndims={ndims}, got {rho}")
    mean = np.broadcast_to(np.asarray(mean, np.float64), [ndims]).copy()
    scale = np.broadcast_to(np.asarray(scale, np.float64), [ndims]).copy()
    if not np.all(scale > 0):
        raise ValueError(f"scale must be positive, got {scale}")
    corr = (1.0 - rho) * np.eye(ndims) + rho * np.ones([ndims, ndims])
    cov = corr * np.outer(scale, scale)
    return GaussianTarget(mean, np.linalg.cholesky(cov), name=f"correlated_gaussian_{ndims}d", dtype=dtype)


def ill_conditioned_gaussian(ndims: int = 100, *, seed: int = 1, dtype: Any = tf.float32) -> GaussianTarget:
    """The NeuTra paper's ill-conditioned Gaussian ``N(0, Q diag(1 / lam) Q^T)``.

    The precision's eigenvalues ``lam`` are drawn from ``Gamma(0.8, rate=1)`` and
    ``Q`` is a uniformly random rotation (QR of a Gaussian matrix with the sign
    fix), both from ``numpy.random.default_rng(seed)``, so the target is fixed for
    a given ``seed``. Exact ground truth, sampler and covariance
    (:attr:`GaussianTarget.covariance`).
    """
    ndims = check_positive_int(ndims, "ndims")
    dtype = canonical_dtype(dtype)
    rng = np.random.default_rng(check_positive_int(seed, "seed", minimum=0))
    lam = rng.gamma(shape=0.8, scale=1.0, size=ndims)
    q, r = np.linalg.qr(rng.standard_normal([ndims, ndims]))
    q = q * np.sign(np.diag(r))
    # Cholesky of the covariance via QR of its square root, for numerical safety
    # when the condition number is large.
    root = q * (1.0 / np.sqrt(lam))
    _, r2 = np.linalg.qr(root.T)
    tril = r2.T * np.sign(np.diag(r2))
    return GaussianTarget(np.zeros(ndims), tril, name=f"ill_conditioned_gaussian_{ndims}d", dtype=dtype)

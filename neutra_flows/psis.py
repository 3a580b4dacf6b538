"""Pareto-smoothed importance sampling (PSIS): the k-hat that says whether a flow fits.

Vehtari, Simpson, Gelman, Yao and Gabry, "Pareto smoothed importance sampling",
JMLR 2024: fit a generalized Pareto distribution to the largest importance
ratios, replace them by its quantiles, and read the fitted shape ``k``: below
0.5 the importance estimates (and a flow as a proposal) are reliable, above 0.7
they are not. The Pareto fit is Zhang and Stephens' empirical-Bayes estimate
("A new and efficient estimation method for the generalized Pareto
distribution", Technometrics 2009) with the paper's weakly informative prior
on ``k``, as in ArviZ's ``psislw`` and the ``loo`` package.

NumPy only: ``fit`` and the whitening stage score flows without importing
ArviZ (1-1.7 s on a cold CPU, as it loads matplotlib), which a user of ``fit``
alone then never pays for. (Importing it in a background thread while the
sampler compiles was tried and measured slower: the threads contend for the
GIL and the two cores.)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["psis_log_weights"]

# The prior's strength (as pseudo-observations) and centre for the shape k (Vehtari et al., App. C).
_PRIOR_K_WEIGHT, _PRIOR_K_CENTRE = 10.0, 0.5
_PRIOR_SCALE = 3.0


def psis_log_weights(log_ratios: np.ndarray, r_eff: float = 1.0) -> tuple[np.ndarray, float]:
    """``(smoothed log weights, normalised to sum 1, k-hat)`` of finite log importance ratios ``[n]``.

    The tail is the ``min(0.2 n, 3 sqrt(n / r_eff))`` largest ratios; with 4 or
    fewer of them above the threshold, ``k-hat`` is ``inf`` and the weights are
    only normalised.
    """
    lw = np.array(log_ratios, dtype=np.float64).reshape(-1)
    if lw.size == 0 or not np.all(np.isfinite(lw)):
        raise ValueError("psis_log_weights needs a non-empty array of finite log ratios")
    n = lw.size
    lw -= lw.max()
    tail = int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n / r_eff))))
    order = np.argsort(lw, kind="stable")
    threshold = max(lw[order[max(n - tail - 1, 0)]], math.log(np.finfo(np.float64).tiny))
    in_tail = np.flatnonzero(lw > threshold)
    khat = math.inf
    if in_tail.size > 4:
        by_size = in_tail[np.argsort(lw[in_tail], kind="stable")]
        exceed = np.exp(lw[by_size]) - math.exp(threshold)
        khat, sigma = _fit_generalized_pareto(exceed)
        if math.isfinite(khat):
            quantiles = _pareto_quantile((np.arange(in_tail.size) + 0.5) / in_tail.size, khat, sigma)
            lw[by_size] = np.log(quantiles + math.exp(threshold))
            # No smoothed ratio above the largest raw one (which is 1 after the shift).
            lw = np.minimum(lw, 0.0)
    top = lw.max()
    return lw - (top + math.log(np.exp(lw - top).sum())), float(khat)


def _fit_generalized_pareto(x: np.ndarray) -> tuple[float, float]:
    """``(k, sigma)`` of a generalized Pareto fitted to sorted exceedances ``x`` (ascending, > 0)."""
    n = x.size
    m = 30 + int(math.sqrt(n))
    # A grid of theta = -k / sigma around the data's scale, weighted by the profile likelihood.
    theta = 1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    theta = theta / (_PRIOR_SCALE * x[int(n / 4 + 0.5) - 1]) + 1.0 / x[-1]
    k = np.log1p(-theta[:, None] * x).mean(axis=1)
    profile = n * (np.log(-theta / k) - k - 1.0)
    weights = 1.0 / np.exp(profile - profile[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(np.float64).eps
    weights, theta = weights[keep], theta[keep]
    theta_hat = float(np.sum(theta * weights / weights.sum()))
    k_hat = float(np.log1p(-theta_hat * x).mean())
    sigma = -k_hat / theta_hat
    k_hat = (n * k_hat + _PRIOR_K_WEIGHT * _PRIOR_K_CENTRE) / (n + _PRIOR_K_WEIGHT)
    return k_hat, sigma


def _pareto_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    """The generalized Pareto's quantiles at probabilities ``p`` in (0, 1)."""
    if not (sigma > 0 and math.isfinite(sigma)):
        return np.full_like(p, np.nan)
    if abs(k) < np.finfo(np.float64).eps:
        return -sigma * np.log1p(-p)
    return sigma * np.expm1(-k * np.log1p(-p)) / k

"""The NeuTra paper's sparse logistic regression on the German credit data (numeric), 51-D.

Its global-local scale prior makes a funnel-like posterior in 51 dimensions;
the ground truth is inference_gym's published Stan estimates
(:mod:`neutra_flows.models._german_credit_truth`).

References
----------
* Hoffman, M., Sountsov, P., Dillon, J. V., Langmore, I., Tran, D. and Vasudevan, S.
  "NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using neural transport."
  2019, arXiv:1903.03704.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows._utils import canonical_dtype
from neutra_flows.models import _german_credit_truth
from neutra_flows.targets import Target

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["german_credit_numeric_regression", "german_credit_sparse_logistic_regression", "load_german_credit"]

_SCALE_BIJECTORS: dict[str, Callable[[], tfb.Bijector]] = {"exp": tfb.Exp, "softplus": tfb.Softplus}


def load_german_credit() -> tuple[np.ndarray, np.ndarray]:
    """The German credit data (numeric) shipped with the package, prepared as the model uses it.

    Returns:
      ``(features, labels)``: ``[1000, 25]`` float64, the 24 features standardised
      with the population standard deviation (as inference_gym does) and a bias
      column of ones last; ``[1000]`` float64 labels ``class - 1`` in ``{0, 1}``.
    """
    resource = importlib.resources.files("neutra_flows").joinpath("data/german_credit_numeric.csv")
    with resource.open("r") as f:
        raw = np.loadtxt(f, delimiter=",")
    features, labels = raw[:, :-1], raw[:, -1]
    # Population standard deviation, as TFP's inference_gym does.
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    features = np.concatenate([features, np.ones([features.shape[0], 1])], axis=1)
    return features, labels - 1.0


def german_credit_sparse_logistic_regression(*, dtype: Any = tf.float32, scale_bijector: str = "exp") -> Target:
    """The NeuTra paper's 51-D sparse logistic regression on German credit (numeric).

    ::

        global_scale ~ Gamma(0.5, 0.5)
        local_scales[i] ~ Gamma(0.5, 0.5),   unscaled_weights[i] ~ N(0, 1),   i < 25
        weights = unscaled_weights * local_scales * global_scale
        label[j] ~ Bernoulli(logits = features[j] @ weights)

    1000 points, 24 standardised features (population std) plus a bias column,
    labels = class - 1. The positive scales are unconstrained with
    ``scale_bijector``: ``"exp"`` (the default) or ``"softplus"``, the two
    options of TFP's inference_gym ``GermanCreditNumericSparseLogisticRegression``
    (``positive_constraint_fn``), the same model. The flat vector is
    ``[b^-1(global_scale), b^-1(local_scales) (25), unscaled_weights (25)]``.

    Ground truth: inference_gym's published Stan estimates of the posterior mean
    and standard deviation of ``global_scale``, ``local_scales`` and
    ``unscaled_weights`` (see :mod:`neutra_flows.models._german_credit_truth`);
    estimates from long runs, not exact values.
    """
    if scale_bijector not in _SCALE_BIJECTORS:
        raise ValueError(f"scale_bijector must be one of {sorted(_SCALE_BIJECTORS)}, got {scale_bijector!r}")
    dtype = canonical_dtype(dtype)
    features_np, labels_np = load_german_credit()
    features = tf.constant(features_np, dtype)
    labels = tf.constant(labels_np, dtype)
    k = features_np.shape[1]
    half = tf.constant(0.5, dtype)
    prior = tfd.JointDistributionNamed(
        dict(
            unscaled_weights=tfd.Sample(tfd.Normal(tf.zeros([], dtype), 1.0), k),
            local_scales=tfd.Sample(tfd.Gamma(half, half), k),
            global_scale=tfd.Gamma(half, half),
        )
    )

    def log_prob_fn(x):
        weights = x["unscaled_weights"] * x["local_scales"] * x["global_scale"][..., tf.newaxis]
        logits = tf.einsum("nd,...d->...n", features, weights)
        # Bernoulli log-likelihood written with softplus for stability at large |logits|.
        loglik = labels * logits - tf.nn.softplus(logits)
        return prior.log_prob(x) + tf.reduce_sum(loglik, axis=-1)

    positive = _SCALE_BIJECTORS[scale_bijector]
    bijectors = dict(unscaled_weights=tfb.Identity(), local_scales=positive(), global_scale=positive())
    return Target(
        log_prob_fn,
        prior.event_shape,
        prior.dtype,
        tfb.JointMap(bijectors),
        sorted(bijectors),
        name="german_credit_sparse_logistic_regression",
        ground_truth_mean=_german_credit_truth.MEAN,
        ground_truth_std=_german_credit_truth.STD,
    )


def german_credit_numeric_regression(link: str = "logistic", *, dtype: Any = tf.float32) -> Target:
    """Logistic or probit regression on German credit (numeric), 25-D: inference_gym's
    ``GermanCreditNumericLogisticRegression`` / ``...ProbitRegression``.

    ::

        weights[i] ~ N(0, 1),   i < 25
        label[j] ~ Bernoulli(logit(p_j) = features[j] @ weights)     (link="logistic")
        label[j] ~ Bernoulli(p_j = Phi(features[j] @ weights))       (link="probit")

    on :func:`load_german_credit`'s data (inference_gym downloads it with
    TensorFlow Datasets; it ships here). Ground truth: inference_gym's published
    CmdStan estimates with their standard errors
    (:mod:`neutra_flows.models._german_credit_numeric_truth`).
    """
    from neutra_flows.models import _german_credit_numeric_truth as truth

    if link not in ("logistic", "probit"):
        raise ValueError(f"link must be 'logistic' or 'probit', got {link!r}")
    dtype = canonical_dtype(dtype)
    features_np, labels_np = load_german_credit()
    features = tf.constant(features_np, dtype)
    labels = tf.constant(labels_np, dtype)

    def log_prob_fn(w):
        eta = tf.einsum("nd,...d->...n", features, w)
        if link == "logistic":
            loglik = labels * eta - tf.nn.softplus(eta)
        else:
            # log Phi(eta) and log Phi(-eta) = log(1 - Phi(eta)), stable in both tails.
            loglik = labels * tfd.Normal(tf.zeros([], dtype), 1.0).log_cdf(eta) + (1.0 - labels) * tfd.Normal(
                tf.zeros([], dtype), 1.0).log_cdf(-eta)
        return -0.5 * tf.reduce_sum(w * w, axis=-1) + tf.reduce_sum(loglik, axis=-1)

    key = link.upper()
    return Target(log_prob_fn, features_np.shape[1], dtype, name=f"german_credit_numeric_{link}_regression",
                  ground_truth_mean=getattr(truth, f"{key}_MEAN"),
                  ground_truth_std=getattr(truth, f"{key}_STD"),
                  ground_truth_mean_se=getattr(truth, f"{key}_MEAN_STANDARD_ERROR"))

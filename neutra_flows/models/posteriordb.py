"""Ten real Bayesian models from posteriordb, translated from Stan, with reference posteriors.

Why: the built-in toy targets (funnel, banana, Gaussians) have exact answers but
not the geometry of real regressions and time series: uncentred covariates whose
posterior scales differ by 1000x with correlations near -1, constrained
time-series parameters, a Gaussian process, a mixture with an ordering
constraint. posteriordb (stan-dev/posteriordb, BSD-3-Clause) ships such models
with well-converged Stan reference posteriors, which become each target's
``ground_truth_mean`` / ``ground_truth_std``.

Each model is a faithful translation of the Stan program kept next to its data
in ``neutra_flows/data/posteriordb/<name>/`` (``model.stan``, ``data.json``,
``reference.json``). The log density on the unconstrained space equals Stan's up
to an additive constant:

* proper priors are written with ``tfd`` distributions; a parameter with no
  sampling statement keeps Stan's improper flat prior (it contributes nothing);
* each constrained parameter uses Stan's own transform, whose log-Jacobian the
  :class:`~neutra_flows.Target` adds: ``<lower=0>`` is ``exp``,
  ``<lower=0, upper=1>`` the logistic sigmoid, ``ordered`` is ``tfb.Ascending``
  (``y1 = x1``, ``y_k = y_{k-1} + exp(x_k)``), and garch's
  ``beta1 <upper=1 - alpha1>`` a sigmoid scaled by ``1 - alpha1``
  (:class:`_GarchBounds`). TFP's default event-space bijectors would not do:
  ``HalfNormal``'s is ``softplus``, and no distribution expresses the
  dependent bound, so the targets are built as structured ``Target`` objects
  with these explicit bijectors rather than with ``Target.from_joint_distribution``.

The recursions of the time-series models (arma11's errors, garch11's variances)
are linear, so they are computed with a parallel associative scan
(``tfp.math.scan_associative``): vectorised over batch dimensions, XLA
compatible, differentiable.

Example:

>>> from neutra_flows.models.posteriordb import load_posteriordb
>>> t = load_posteriordb("kidiq-kidscore_interaction")
>>> t.event_size, t.names, t.dtype.name
(5, ('beta', 'sigma'), 'float64')
>>> round(float(t.ground_truth_mean["beta"][1]), 3)
51.033
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows._utils import canonical_dtype
from neutra_flows.models._regression_data import REGRESSIONS, ark_lags
from neutra_flows.targets import Target

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["POSTERIORDB_MODELS", "load_posteriordb"]

POSTERIORDB_MODELS: tuple[str, ...] = (
    "arK-arK",
    "arma-arma11",
    "earnings-logearn_interaction",
    "garch-garch11",
    "gp_pois_regr-gp_regr",
    "kidiq-kidscore_interaction",
    "low_dim_gauss_mix-low_dim_gauss_mix",
    "mesquite-logmesquite_logvas",
    "nes2000-nes",
    "sblrc-blr",
)

_DATA_DIR = "data/posteriordb"


# -- data and reference ---------------------------------------------------------------


def _read_json(name: str, filename: str) -> dict[str, Any]:
    resource = importlib.resources.files("neutra_flows").joinpath(f"{_DATA_DIR}/{name}/{filename}")
    with resource.open("r") as f:
        return json.load(f)


def _reference(name: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict, dict]:
    """reference.json's ``mean`` / ``std`` (Stan names, ``beta[1]`` first) as arrays per variable."""
    ref = _read_json(name, "reference.json")

    def gather(stats: Mapping[str, float]) -> dict[str, np.ndarray]:
        out = {}
        for var, shape in shapes.items():
            if shape == ():
                out[var] = np.asarray(stats[var], np.float64)
            else:
                out[var] = np.asarray([stats[f"{var}[{i + 1}]"] for i in range(shape[0])], np.float64)
        return out

    return gather(ref["mean"]), gather(ref["std"])


# -- building blocks --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Model:
    """One translated Stan program: variable shapes, bijectors, priors and log-likelihood.

    ``bijectors`` maps each variable to Stan's constraining transform (``None``:
    garch's joint :class:`_GarchBounds`). ``priors`` maps a variable to a ``tfd``
    distribution whose ``log_prob`` of the variable's value (event included) is
    its prior term; a variable missing from ``priors`` has Stan's flat prior.
    ``log_likelihood(x, c)`` takes the dict of constrained values (leading batch
    dims allowed) and the data ``constants`` cast to the target's dtype.
    """

    shapes: dict[str, tuple[int, ...]]
    bijectors: dict[str, tfb.Bijector] | None
    priors: dict[str, tfd.Distribution]
    log_likelihood: Callable[[dict, dict], tf.Tensor]
    constants: dict[str, np.ndarray]


def _normal_lpdf(y, loc, scale):
    return tfd.Normal(loc, scale).log_prob(y)


def _sum_last(x):
    return tf.reduce_sum(x, axis=-1)


def _linear_scan(coeff, offset):
    """``s[t] = coeff[t] * s[t-1] + offset[t]`` with ``s[-1] = 0``, along the last axis.

    Affine maps compose associatively: applying ``(c1, b1)`` then ``(c2, b2)`` is
    ``(c1 c2, c2 b1 + b2)``, so a parallel scan gives every ``s[t]`` in log depth.
    """

    def compose(earlier, later):
        c1, b1 = earlier
        c2, b2 = later
        return c1 * c2, c2 * b1 + b2

    coeff = coeff + tf.zeros_like(offset)
    offset = offset + tf.zeros_like(coeff)
    return tfp.math.scan_associative(compose, (coeff, offset), axis=-1)[1]


class _GarchBounds(tfb.Bijector):
    """Stan's transforms for garch11's ``alpha1 <lower=0, upper=1>`` and ``beta1 <upper=1 - alpha1>``.

    ``alpha1 = sigmoid(u1)``, ``beta1 = (1 - alpha1) sigmoid(u2)``; ``alpha0`` is
    ``exp`` and ``mu`` unconstrained. log|J| = ``log alpha0`` + log sigmoid'(u1)
    + log(1 - alpha1) + log sigmoid'(u2).
    """

    _KEYS = ("alpha0", "alpha1", "beta1", "mu")

    def __init__(self):
        ndims = dict.fromkeys(self._KEYS, 0)
        super().__init__(
            forward_min_event_ndims=ndims,
            inverse_min_event_ndims=dict(ndims),
            is_constant_jacobian=False,
            validate_args=False,
            parameters={},
            name="garch_bounds",
        )

    def _forward(self, u):
        alpha1 = tf.sigmoid(u["alpha1"])
        return dict(
            alpha0=tf.exp(u["alpha0"]),
            alpha1=alpha1,
            beta1=(1.0 - alpha1) * tf.sigmoid(u["beta1"]),
            mu=tf.identity(u["mu"]),
        )

    def _inverse(self, x):
        frac = x["beta1"] / (1.0 - x["alpha1"])
        return dict(
            alpha0=tf.math.log(x["alpha0"]),
            alpha1=tf.math.log(x["alpha1"]) - tf.math.log1p(-x["alpha1"]),
            beta1=tf.math.log(frac) - tf.math.log1p(-frac),
            mu=tf.identity(x["mu"]),
        )

    def _forward_log_det_jacobian(self, u):
        def log_dsigmoid(v):
            return -tf.nn.softplus(-v) - tf.nn.softplus(v)

        log_one_minus_alpha1 = -tf.nn.softplus(u["alpha1"])
        return u["alpha0"] + log_dsigmoid(u["alpha1"]) + log_one_minus_alpha1 + log_dsigmoid(u["beta1"])


def _regression(design, y, priors=None) -> _Model:
    """``y ~ normal(design @ beta, sigma)`` with ``sigma <lower=0>``; flat priors unless given."""
    design = np.asarray(design, np.float64)

    def log_likelihood(x, c):
        loc = tf.einsum("nk,...k->...n", c["X"], x["beta"])
        return _sum_last(_normal_lpdf(c["y"], loc, x["sigma"][..., tf.newaxis]))

    return _Model(
        shapes=dict(beta=(design.shape[1],), sigma=()),
        bijectors=dict(beta=tfb.Identity(), sigma=tfb.Exp()),
        priors=priors or {},
        log_likelihood=log_likelihood,
        constants=dict(X=design, y=np.asarray(y, np.float64)),
    )


# -- the ten models ---------------------------------------------------------------------


def _ark(d, dtype) -> _Model:
    k = int(d["K"])
    lags, y_modelled = ark_lags(d)

    def log_likelihood(x, c):
        loc = x["alpha"][..., tf.newaxis] + tf.einsum("tk,...k->...t", c["lags"], x["beta"])
        return _sum_last(_normal_lpdf(c["y"], loc, x["sigma"][..., tf.newaxis]))

    ten = tf.constant(10.0, dtype)
    return _Model(
        shapes=dict(alpha=(), beta=(k,), sigma=()),
        bijectors=dict(alpha=tfb.Identity(), beta=tfb.Identity(), sigma=tfb.Exp()),
        priors=dict(
            alpha=tfd.Normal(tf.zeros([], dtype), ten),
            beta=tfd.Sample(tfd.Normal(tf.zeros([], dtype), ten), k),
            sigma=tfd.HalfCauchy(tf.zeros([], dtype), tf.constant(2.5, dtype)),
        ),
        log_likelihood=log_likelihood,
        constants=dict(lags=lags, y=y_modelled),
    )


def _arma11(d, dtype) -> _Model:
    y = np.asarray(d["y"], np.float64)

    def log_likelihood(x, c):
        mu, phi, theta = (x[k][..., tf.newaxis] for k in ("mu", "phi", "theta"))
        # nu[1] = mu + phi * mu (err[0] = 0); nu[t] = mu + phi * y[t-1] + theta * err[t-1].
        prev_y = tf.concat([mu, tf.zeros_like(mu) + c["y"][:-1]], axis=-1)
        offset = c["y"] - mu - phi * prev_y
        err = _linear_scan(-theta, offset)
        return _sum_last(_normal_lpdf(err, tf.zeros([], err.dtype), x["sigma"][..., tf.newaxis]))

    zero = tf.zeros([], dtype)
    two = tf.constant(2.0, dtype)
    return _Model(
        shapes=dict(mu=(), phi=(), theta=(), sigma=()),
        bijectors=dict(mu=tfb.Identity(), phi=tfb.Identity(), theta=tfb.Identity(), sigma=tfb.Exp()),
        priors=dict(
            mu=tfd.Normal(zero, tf.constant(10.0, dtype)),
            phi=tfd.Normal(zero, two),
            theta=tfd.Normal(zero, two),
            sigma=tfd.HalfCauchy(zero, tf.constant(2.5, dtype)),
        ),
        log_likelihood=log_likelihood,
        constants=dict(y=y),
    )


def _earnings(d, dtype) -> _Model:
    return _regression(*REGRESSIONS["earnings-logearn_interaction"](d))


def _garch11(d, dtype) -> _Model:
    y = np.asarray(d["y"], np.float64)

    def log_likelihood(x, c):
        mu, alpha0, alpha1, beta1 = (x[k][..., tf.newaxis] for k in ("mu", "alpha0", "alpha1", "beta1"))
        # sigma[t]^2 = alpha0 + alpha1 (y[t-1] - mu)^2 + beta1 sigma[t-1]^2, sigma[1] = sigma1.
        shocks = alpha0 + alpha1 * tf.square(c["y"][:-1] - mu)
        first = tf.zeros_like(mu) + tf.square(c["sigma1"])
        offset = tf.concat([first, shocks], axis=-1)
        coeff = tf.concat([tf.zeros_like(mu), beta1 + tf.zeros_like(shocks)], axis=-1)
        variance = _linear_scan(coeff, offset)
        return _sum_last(_normal_lpdf(c["y"], mu, tf.sqrt(variance)))

    return _Model(
        shapes=dict(mu=(), alpha0=(), alpha1=(), beta1=()),
        bijectors=None,  # the joint _GarchBounds bijector; all four priors are flat.
        priors={},
        log_likelihood=log_likelihood,
        constants=dict(y=y, sigma1=np.float64(d["sigma1"])),
    )


def _gp_regr(d, dtype) -> _Model:
    x_obs = np.asarray(d["x"], np.float64)
    sq_dist = np.square(x_obs[:, None] - x_obs[None, :])

    def log_likelihood(x, c):
        alpha, rho, sigma = (x[k][..., tf.newaxis, tf.newaxis] for k in ("alpha", "rho", "sigma"))
        # gp_exp_quad_cov(x, alpha, rho) + diag_matrix(rep_vector(sigma, N)): Stan adds sigma itself
        # (not sigma^2) to the diagonal, which also keeps the Cholesky factorisation well posed.
        eye = tf.eye(sq_dist.shape[0], dtype=c["sq_dist"].dtype)
        cov = tf.square(alpha) * tf.exp(-0.5 * c["sq_dist"] / tf.square(rho)) + sigma * eye
        scale_tril = tf.linalg.cholesky(cov)
        return tfd.MultivariateNormalTriL(scale_tril=scale_tril).log_prob(c["y"])

    return _Model(
        shapes=dict(rho=(), alpha=(), sigma=()),
        bijectors=dict(rho=tfb.Exp(), alpha=tfb.Exp(), sigma=tfb.Exp()),
        priors=dict(
            rho=tfd.Gamma(tf.constant(25.0, dtype), tf.constant(4.0, dtype)),
            alpha=tfd.HalfNormal(tf.constant(2.0, dtype)),
            sigma=tfd.HalfNormal(tf.constant(1.0, dtype)),
        ),
        log_likelihood=log_likelihood,
        constants=dict(sq_dist=sq_dist, y=np.asarray(d["y"], np.float64)),
    )


def _kidiq(d, dtype) -> _Model:
    prior = dict(sigma=tfd.HalfCauchy(tf.zeros([], dtype), tf.constant(2.5, dtype)))
    return _regression(*REGRESSIONS["kidiq-kidscore_interaction"](d), priors=prior)


def _low_dim_gauss_mix(d, dtype) -> _Model:
    def log_likelihood(x, c):
        mu, sigma = x["mu"][..., tf.newaxis, :], x["sigma"][..., tf.newaxis, :]
        theta = x["theta"][..., tf.newaxis]
        lp = _normal_lpdf(c["y"][:, tf.newaxis], mu, sigma)
        # log_mix(theta, lp1, lp2) = log(theta exp(lp1) + (1 - theta) exp(lp2)).
        mixed = tf.stack([tf.math.log(theta) + lp[..., 0], tf.math.log1p(-theta) + lp[..., 1]], axis=-1)
        return _sum_last(tf.reduce_logsumexp(mixed, axis=-1))

    zero, two = tf.zeros([], dtype), tf.constant(2.0, dtype)
    return _Model(
        shapes=dict(mu=(2,), sigma=(2,), theta=()),
        bijectors=dict(mu=tfb.Ascending(), sigma=tfb.Exp(), theta=tfb.Sigmoid()),
        priors=dict(
            mu=tfd.Sample(tfd.Normal(zero, two), 2),
            sigma=tfd.Sample(tfd.HalfNormal(two), 2),
            theta=tfd.Beta(tf.constant(5.0, dtype), tf.constant(5.0, dtype)),
        ),
        log_likelihood=log_likelihood,
        constants=dict(y=np.asarray(d["y"], np.float64)),
    )


def _mesquite(d, dtype) -> _Model:
    return _regression(*REGRESSIONS["mesquite-logmesquite_logvas"](d))


def _nes(d, dtype) -> _Model:
    return _regression(*REGRESSIONS["nes2000-nes"](d))


def _sblrc(d, dtype) -> _Model:
    ten = tf.constant(10.0, dtype)
    design, y = REGRESSIONS["sblrc-blr"](d)
    priors = dict(
        beta=tfd.Sample(tfd.Normal(tf.zeros([], dtype), ten), design.shape[1]),
        sigma=tfd.HalfNormal(ten),
    )
    return _regression(design, y, priors=priors)


_BUILDERS: dict[str, Callable[[dict, tf.DType], _Model]] = {
    "arK-arK": _ark,
    "arma-arma11": _arma11,
    "earnings-logearn_interaction": _earnings,
    "garch-garch11": _garch11,
    "gp_pois_regr-gp_regr": _gp_regr,
    "kidiq-kidscore_interaction": _kidiq,
    "low_dim_gauss_mix-low_dim_gauss_mix": _low_dim_gauss_mix,
    "mesquite-logmesquite_logvas": _mesquite,
    "nes2000-nes": _nes,
    "sblrc-blr": _sblrc,
}


# -- public entry point -----------------------------------------------------------------


def _log_prob_fn(model: _Model, dtype: tf.DType) -> Callable[[dict], tf.Tensor]:
    constants = {k: tf.constant(v, dtype) for k, v in model.constants.items()}

    def log_prob_fn(x):
        lp = model.log_likelihood(x, constants)
        for var, prior in model.priors.items():
            lp = lp + prior.log_prob(x[var])
        return lp

    return log_prob_fn


def load_posteriordb(name: str, *, dtype: Any = tf.float64) -> Target:
    """The posteriordb model ``name`` (one of :data:`POSTERIORDB_MODELS`) as a :class:`Target`.

    Variables are named and shaped as in the Stan program (``beta`` a vector,
    ``sigma`` a scalar, ...); the flat unconstrained vector holds them in sorted
    name order. ``ground_truth_mean`` / ``ground_truth_std`` come from
    posteriordb's reference posterior. ``dtype`` defaults to float64: several of
    these posteriors have correlations near -1 that float32 resolves poorly.

    Raises:
      ValueError: for an unknown ``name`` (the message lists the available ones)
        or a dtype other than float32 / float64.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown posteriordb model {name!r}; available: {', '.join(POSTERIORDB_MODELS)}")
    dtype = canonical_dtype(dtype)
    model = _BUILDERS[name](_read_json(name, "data.json"), dtype)
    mean, std = _reference(name, model.shapes)
    bijector = _GarchBounds() if model.bijectors is None else tfb.JointMap(model.bijectors)
    return Target(
        _log_prob_fn(model, dtype),
        {k: tf.TensorShape(s) for k, s in model.shapes.items()},
        dict.fromkeys(model.shapes, dtype),
        bijector,
        sorted(model.shapes),
        name=name,
        ground_truth_mean=mean,
        ground_truth_std=std,
    )

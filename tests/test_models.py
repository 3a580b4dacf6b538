"""The built-in targets of neutra_flows.models against independent computations.

Textbook targets: ground truth against closed forms, quadrature and exact
samplers with MCSE-based tolerances. posteriordb models: against numpy/scipy
translations of their Stan programs, re-translated here by hand, point by point
with plain loops where Stan loops, together with Stan's unconstraining
transforms and their log-Jacobians; the target's log density must differ from
it by one constant.
"""

import importlib.resources
import json
import math
import re

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from neutra_flows import Target, models
from neutra_flows.models.german_credit import load_german_credit
from neutra_flows.models.posteriordb import POSTERIORDB_MODELS, load_posteriordb

Z_CRIT = 4.0  # two-sided normal quantile for statistical checks (false alarm ~6e-5)


def _package_json(name, filename):
    path = importlib.resources.files("neutra_flows").joinpath(f"data/posteriordb/{name}/{filename}")
    with path.open() as f:
        return json.load(f)


def _norm(y, loc, scale):
    return np.sum(stats.norm.logpdf(y, loc, scale))


def _assert_mean_within_mcse(draws, truth, label):
    draws = np.asarray(draws, np.float64)
    mcse = draws.std(axis=0) / math.sqrt(draws.shape[0])
    z = np.abs(draws.mean(axis=0) - truth) / mcse
    assert np.all(z < Z_CRIT), f"{label}: mean z-scores {z}"


def _assert_std_within_mcse(draws, truth, label):
    # Delta method: se(s) ~= sqrt(Var((x - m)^2)) / (2 s sqrt(n)), valid with finite 4th moments.
    draws = np.asarray(draws, np.float64)
    centred = draws - draws.mean(axis=0)
    s = centred.std(axis=0)
    se = (centred**2).std(axis=0) / (2 * s * math.sqrt(draws.shape[0]))
    z = np.abs(s - truth) / se
    assert np.all(z < Z_CRIT), f"{label}: std z-scores {z}"


# -- textbook targets (funnel, banana, Gaussians, eight schools) ------------------------------


def test_neals_funnel_ground_truth_by_quadrature_and_sampler():
    t = models.neals_funnel(ndims=4, dtype=tf.float64)
    # Var(x_i) = E[exp(x0)] with x0 ~ N(0, 3), by Gauss-Hermite quadrature.
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    e_exp = np.sum(weights * np.exp(3.0 * nodes)) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(t.ground_truth_std["x"][1:], math.sqrt(e_exp), rtol=1e-10)
    np.testing.assert_allclose(t.ground_truth_std["x"][0], 3.0)
    np.testing.assert_array_equal(t.ground_truth_mean["x"], np.zeros(4))
    # The exact sampler: x0 ~ N(0, 3) and x_i / exp(x0 / 2) ~ N(0, 1) independently.
    x = t.sample(20_000, seed=3).numpy()
    assert x.shape == (20_000, 4)
    standardised = np.concatenate([x[:, :1] / 3.0, x[:, 1:] / np.exp(x[:, :1] / 2)], axis=1)
    _assert_mean_within_mcse(standardised, np.zeros(4), "funnel")
    _assert_std_within_mcse(standardised, np.ones(4), "funnel")
    # The density is the one in the docstring (independent numpy formula).
    lp_np = (
        -0.5 * (x[:, 0] / 3) ** 2
        - math.log(3.0)
        - 0.5 * np.sum(x[:, 1:] ** 2 / np.exp(x[:, :1]), axis=1)
        - 1.5 * x[:, 0]
        - 2.0 * math.log(2 * math.pi)
    )
    np.testing.assert_allclose(t.unnormalized_log_prob(x), lp_np, rtol=1e-10)


def test_banana_ground_truth_by_grid_integration():
    t = models.banana(dtype=tf.float64)
    x0 = np.linspace(-80.0, 80.0, 801)
    x1 = np.linspace(-40.0, 200.0, 1201)
    g0, g1 = np.meshgrid(x0, x1, indexing="ij")
    pts = np.stack([g0, g1], axis=-1).reshape(-1, 2)
    dens = np.exp(t.unnormalized_log_prob(pts).numpy()).reshape(g0.shape)

    def integrate(f):
        return np.trapezoid(np.trapezoid(f, x1, axis=1), x0)

    mass = integrate(dens)
    np.testing.assert_allclose(mass, 1.0, rtol=1e-6)  # normalised: -ELBO estimates KL
    m1 = integrate(g1 * dens)
    v1 = integrate((g1 - m1) ** 2 * dens)
    np.testing.assert_allclose(t.ground_truth_mean["x"], [0.0, 0.0])
    np.testing.assert_allclose(m1, t.ground_truth_mean["x"][1], atol=1e-6)
    np.testing.assert_allclose(math.sqrt(v1), t.ground_truth_std["x"][1], rtol=1e-6)
    np.testing.assert_allclose(t.ground_truth_std["x"][0], 10.0)


def test_banana_sampler_matches_ground_truth_in_higher_dims():
    t = models.banana(ndims=4, curvature=0.05)
    x = t.sample(50_000, seed=7).numpy()
    _assert_mean_within_mcse(x, t.ground_truth_mean["x"], "banana")
    _assert_std_within_mcse(x, t.ground_truth_std["x"], "banana")
    np.testing.assert_allclose(t.ground_truth_std["x"][1], math.sqrt(1 + 2 * 0.05**2 * 1e4))


def test_correlated_gaussian():
    t = models.correlated_gaussian(3, 0.6, mean=[1.0, -2.0, 0.0], scale=[1.0, 2.0, 0.5])
    s = np.array([1.0, 2.0, 0.5])
    cov = np.array([[1.0, 0.6, 0.6], [0.6, 1.0, 0.6], [0.6, 0.6, 1.0]]) * np.outer(s, s)
    np.testing.assert_allclose(t.covariance, cov, rtol=1e-12)
    np.testing.assert_allclose(t.ground_truth_std["x"], s)
    x = t.sample(20_000, seed=1).numpy().astype(np.float64)
    _assert_mean_within_mcse(x, [1.0, -2.0, 0.0], "correlated")
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.05 * 4)
    with pytest.raises(ValueError, match="rho"):
        models.correlated_gaussian(3, -0.6)


def test_ill_conditioned_gaussian():
    t = models.ill_conditioned_gaussian(ndims=20, seed=5, dtype=tf.float64)
    again = models.ill_conditioned_gaussian(ndims=20, seed=5, dtype=tf.float64)
    np.testing.assert_array_equal(t.covariance, again.covariance)
    precision = np.linalg.inv(t.covariance)
    # As documented: precision eigenvalues are Gamma(0.8, 1) draws from default_rng(seed).
    lam = np.random.default_rng(5).gamma(0.8, 1.0, size=20)
    np.testing.assert_allclose(np.linalg.eigvalsh(precision), np.sort(lam), rtol=1e-6)
    np.testing.assert_allclose(t.ground_truth_std["x"], np.sqrt(np.diag(t.covariance)))
    x = np.random.default_rng(2).normal(size=[5, 20])
    _, logdet = np.linalg.slogdet(precision)
    lp = -0.5 * np.einsum("ni,ij,nj->n", x, precision, x) + 0.5 * logdet - 10 * math.log(2 * math.pi)
    np.testing.assert_allclose(t.unnormalized_log_prob(x), lp, rtol=1e-8)
    draws = t.sample(20_000, seed=0).numpy()
    _assert_std_within_mcse(draws, t.ground_truth_std["x"], "ill-conditioned")


def test_gaussian_target_keeps_its_covariance_and_checks_its_arguments():
    cov = np.array([[4.0, 1.0], [1.0, 1.0]])
    t = models.GaussianTarget([1.0, -1.0], np.linalg.cholesky(cov), name="g", dtype=tf.float64)
    assert isinstance(t, Target) and t.name == "g" and t.names == ("x",)
    np.testing.assert_allclose(t.covariance, cov, rtol=1e-12)
    t.covariance[0, 0] = 99.0  # a copy: the target's covariance cannot be changed from outside
    np.testing.assert_allclose(t.covariance, cov, rtol=1e-12)
    np.testing.assert_allclose(t.ground_truth_std["x"], [2.0, 1.0], rtol=1e-12)
    with pytest.raises(ValueError, match=r"scale_tril \[d, d\]"):
        models.GaussianTarget([0.0, 0.0], np.eye(3))
    with pytest.raises(ValueError, match="positive diagonal"):
        models.GaussianTarget([0.0, 0.0], -np.eye(2))


def test_eight_schools():
    t = models.eight_schools()
    assert t.names == ("mu", "tau", "theta") and t.event_size == 10
    assert t.event_shapes == {"mu": (), "tau": (), "theta": (8,)}
    z = np.random.default_rng(4).normal(scale=3.0, size=[6, 10]).astype(np.float32)
    d = t.named_draws(z)
    assert np.all(d["tau"] > 0) and d["theta"].shape == (6, 8)
    y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    mu, tau, theta = (d[k].astype(np.float64) for k in ("mu", "tau", "theta"))

    def normal_lp(x, m, s):
        return -0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi)

    half_cauchy = math.log(2 / (math.pi * 5)) - np.log1p((tau / 5) ** 2)
    joint = (
        normal_lp(mu, 0, 5)
        + half_cauchy
        + normal_lp(theta, mu[:, None], tau[:, None]).sum(-1)
        + normal_lp(y, theta, sigma).sum(-1)
    )
    np.testing.assert_allclose(d["tau"], np.exp(z[:, 1]), rtol=1e-6)
    expected = joint + z[:, 1]  # tau = exp(z_1): log|det| = z_1
    np.testing.assert_allclose(t.unnormalized_log_prob(z), expected, rtol=1e-4, atol=1e-3)


# -- Stan's constrained log densities, written independently ---------------------------------


def _lp_ark(p, d):
    y, k = np.asarray(d["y"]), d["K"]
    lp = _norm(p["alpha"], 0, 10) + _norm(p["beta"], 0, 10) + stats.cauchy.logpdf(p["sigma"], 0, 2.5)
    for t in range(k, d["T"]):
        mu = p["alpha"]
        for j in range(k):
            mu = mu + p["beta"][j] * y[t - j - 1]
        lp += stats.norm.logpdf(y[t], mu, p["sigma"])
    return lp


def _lp_arma(p, d):
    y = np.asarray(d["y"])
    mu, phi, theta, sigma = p["mu"], p["phi"], p["theta"], p["sigma"]
    lp = _norm(mu, 0, 10) + _norm(phi, 0, 2) + _norm(theta, 0, 2) + stats.cauchy.logpdf(sigma, 0, 2.5)
    err = np.zeros(d["T"])
    err[0] = y[0] - (mu + phi * mu)
    for t in range(1, d["T"]):
        err[t] = y[t] - (mu + phi * y[t - 1] + theta * err[t - 1])
    return lp + _norm(err, 0, sigma)


def _lp_earnings(p, d):
    height, male = np.asarray(d["height"]), np.asarray(d["male"])
    b = p["beta"]
    loc = b[0] + b[1] * height + b[2] * male + b[3] * height * male
    return _norm(np.log(d["earn"]), loc, p["sigma"])


def _lp_garch(p, d):
    y = np.asarray(d["y"])
    sigma = np.zeros(d["T"])
    sigma[0] = d["sigma1"]
    for t in range(1, d["T"]):
        sigma[t] = math.sqrt(
            p["alpha0"] + p["alpha1"] * (y[t - 1] - p["mu"]) ** 2 + p["beta1"] * sigma[t - 1] ** 2
        )
    return _norm(y, p["mu"], sigma)


def _lp_gp(p, d):
    x = np.asarray(d["x"], float)
    n = len(x)
    cov = np.empty([n, n])
    for i in range(n):
        for j in range(n):
            cov[i, j] = p["alpha"] ** 2 * math.exp(-((x[i] - x[j]) ** 2) / (2 * p["rho"] ** 2))
    cov += np.diag(np.full(n, p["sigma"]))
    lp = stats.gamma.logpdf(p["rho"], 25, scale=1 / 4) + _norm(p["alpha"], 0, 2) + _norm(p["sigma"], 0, 1)
    return lp + stats.multivariate_normal.logpdf(d["y"], np.zeros(n), cov)


def _lp_kidiq(p, d):
    hs, iq = np.asarray(d["mom_hs"]), np.asarray(d["mom_iq"])
    b = p["beta"]
    loc = b[0] + b[1] * hs + b[2] * iq + b[3] * hs * iq
    return stats.cauchy.logpdf(p["sigma"], 0, 2.5) + _norm(d["kid_score"], loc, p["sigma"])


def _lp_mix(p, d):
    mu, sigma, theta = p["mu"], p["sigma"], p["theta"]
    lp = _norm(sigma, 0, 2) + _norm(mu, 0, 2) + stats.beta.logpdf(theta, 5, 5)
    for y in d["y"]:
        a = math.log(theta) + stats.norm.logpdf(y, mu[0], sigma[0])
        b = math.log1p(-theta) + stats.norm.logpdf(y, mu[1], sigma[1])
        lp += np.logaddexp(a, b)
    return lp


def _lp_mesquite(p, d):
    v = {k: np.asarray(d[k], float) for k in d if k != "N"}
    b = p["beta"]
    loc = (
        b[0]
        + b[1] * np.log(v["diam1"] * v["diam2"] * v["canopy_height"])
        + b[2] * np.log(v["diam1"] * v["diam2"])
        + b[3] * np.log(v["diam1"] / v["diam2"])
        + b[4] * np.log(v["total_height"])
        + b[5] * np.log(v["density"])
        + b[6] * v["group"]
    )
    return _norm(np.log(v["weight"]), loc, p["sigma"])


def _lp_nes(p, d):
    v = {k: np.asarray(d[k], float) for k in d if k != "N"}
    b, age = p["beta"], v["age_discrete"]
    loc = (
        b[0]
        + b[1] * v["real_ideo"]
        + b[2] * v["race_adj"]
        + b[3] * (age == 2)
        + b[4] * (age == 3)
        + b[5] * (age == 4)
        + b[6] * v["educ1"]
        + b[7] * v["gender"]
        + b[8] * v["income"]
    )
    return _norm(v["partyid7"], loc, p["sigma"])


def _lp_sblrc(p, d):
    x = np.asarray(d["X"], float)
    return _norm(p["beta"], 0, 10) + _norm(p["sigma"], 0, 10) + _norm(d["y"], x @ p["beta"], p["sigma"])


# Stan's constraint of each variable: identity, lower=0, (0, 1), ordered, or garch's (0, 1 - alpha1).
_MODELS = {
    "arK-arK": (_lp_ark, dict(alpha="id", beta="id", sigma="pos")),
    "arma-arma11": (_lp_arma, dict(mu="id", phi="id", theta="id", sigma="pos")),
    "earnings-logearn_interaction": (_lp_earnings, dict(beta="id", sigma="pos")),
    "garch-garch11": (_lp_garch, dict(mu="id", alpha0="pos", alpha1="unit", beta1="garch_beta1")),
    "gp_pois_regr-gp_regr": (_lp_gp, dict(rho="pos", alpha="pos", sigma="pos")),
    "kidiq-kidscore_interaction": (_lp_kidiq, dict(beta="id", sigma="pos")),
    "low_dim_gauss_mix-low_dim_gauss_mix": (_lp_mix, dict(mu="ordered", sigma="pos", theta="unit")),
    "mesquite-logmesquite_logvas": (_lp_mesquite, dict(beta="id", sigma="pos")),
    "nes2000-nes": (_lp_nes, dict(beta="id", sigma="pos")),
    "sblrc-blr": (_lp_sblrc, dict(beta="id", sigma="pos")),
}


def _logit(v):
    return math.log(v) - math.log1p(-v)


def _unconstrain(kind, x, p):
    """Stan's unconstraining transform of ``x`` and the log|Jacobian| of its inverse at ``x``."""
    x = np.asarray(x, float)
    if kind == "id":
        return x, 0.0
    if kind == "pos":  # x = exp(u)
        return np.log(x), float(np.sum(np.log(x)))
    if kind == "unit":  # x = inv_logit(u)
        return np.asarray(_logit(float(x))), math.log(x) + math.log1p(-x)
    if kind == "ordered":  # x1 = u1, x_k = x_{k-1} + exp(u_k)
        gaps = np.log(np.diff(x))
        return np.concatenate([x[:1], gaps]), float(np.sum(gaps))
    if kind == "garch_beta1":  # x = (1 - alpha1) inv_logit(u)
        upper = 1.0 - p["alpha1"]
        f = float(x) / upper
        return np.asarray(_logit(f)), math.log(upper) + math.log(f) + math.log1p(-f)
    raise AssertionError(kind)


def _points(name, n=4):
    """``n`` constrained points near the reference mean: mean + reference std x N(0, 1), kept
    when they satisfy the constraints (wide enough that a wrong Jacobian shows)."""
    _, kinds = _MODELS[name]
    ref = _package_json(name, "reference.json")
    rng = np.random.default_rng(sum(map(ord, name)))
    pts = []
    while len(pts) < n:
        draw = {k: ref["mean"][k] + ref["std"][k] * rng.standard_normal() for k in ref["mean"]}
        p = {}
        for var in kinds:
            keys = sorted((k for k in draw if re.fullmatch(rf"{var}(\[\d+\])?", k)), key=_stan_index)
            p[var] = np.asarray([draw[k] for k in keys]) if "[" in keys[0] else np.asarray(draw[keys[0]])
        if _satisfies(p, kinds):
            pts.append(p)
    return pts


def _satisfies(p, kinds):
    ok = {
        "id": lambda v: True,
        "pos": lambda v: np.all(v > 0),
        "unit": lambda v: 0 < v < 1,
        "ordered": lambda v: np.all(np.diff(v) > 0),
        "garch_beta1": lambda v: 0 < v < 1 - p["alpha1"],
    }
    return all(ok[kind](p[var]) for var, kind in kinds.items())


def _stan_index(key):
    m = re.search(r"\[(\d+)\]", key)
    return int(m.group(1)) if m else 0


def _expected_and_z(name, target, p, data):
    lp_fn, kinds = _MODELS[name]
    parts, log_jac = {}, 0.0
    for var, kind in kinds.items():
        u, lj = _unconstrain(kind, p[var], p)
        parts[var], log_jac = u, log_jac + lj
    z = np.concatenate([np.reshape(parts[v], [-1]) for v in target.names])
    return lp_fn(p, data) + log_jac, z


@pytest.mark.parametrize("name", POSTERIORDB_MODELS)
def test_log_density_matches_stan_up_to_a_constant(name):
    target = load_posteriordb(name)
    data = _package_json(name, "data.json")
    pts = _points(name, n=6)
    expected, zs = zip(*[_expected_and_z(name, target, p, data) for p in pts], strict=True)
    expected, zs = np.asarray(expected), np.stack(zs)
    got = target.unnormalized_log_prob(zs).numpy()
    diff = got - expected
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert np.ptp(diff) <= 1e-6 * scale, (diff, expected)
    # Batch shapes: [3] and [2, 3] give the same values as the flat batch.
    np.testing.assert_allclose(target.unnormalized_log_prob(zs[:3]).numpy(), got[:3], rtol=1e-12)
    batched = target.unnormalized_log_prob(zs.reshape([2, 3, -1])).numpy()
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(batched.reshape(-1), got, rtol=1e-12)
    # Stan's unconstraining transforms agree with the target's bijectors.
    named = {v: np.stack([p[v] for p in pts]) for v in target.names}
    np.testing.assert_allclose(target.unconstrain(named).numpy(), zs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", POSTERIORDB_MODELS)
def test_ground_truth_is_the_reference(name):
    target = load_posteriordb(name)
    ref = _package_json(name, "reference.json")
    assert target.name == name
    assert sorted(target.names) == sorted(_MODELS[name][1])
    for key in ref["mean"]:
        var = key.split("[")[0]
        idx = (_stan_index(key) - 1,) if "[" in key else ()
        assert target.ground_truth_mean[var][idx] == pytest.approx(ref["mean"][key], rel=1e-12)
        assert target.ground_truth_std[var][idx] == pytest.approx(ref["std"][key], rel=1e-12)
    index_dims = {"arK-arK": 7, "arma-arma11": 4, "garch-garch11": 4, "gp_pois_regr-gp_regr": 3}
    assert target.event_size == index_dims.get(name, len(ref["mean"]))


def test_spot_checks_of_the_reference():
    kid = load_posteriordb("kidiq-kidscore_interaction")
    assert kid.ground_truth_mean["beta"][1] == pytest.approx(51.03276379981094)
    assert kid.event_shapes == {"beta": (4,), "sigma": ()}
    mix = load_posteriordb("low_dim_gauss_mix-low_dim_gauss_mix")
    assert mix.ground_truth_std["mu"][0] == pytest.approx(0.042045003268618965)
    assert mix.event_shapes == {"mu": (2,), "sigma": (2,), "theta": ()}


def test_unknown_name_lists_the_models():
    with pytest.raises(ValueError, match="unknown posteriordb model") as err:
        load_posteriordb("kidiq")
    for name in POSTERIORDB_MODELS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", POSTERIORDB_MODELS)
def test_float32_build(name):
    t64 = load_posteriordb(name)
    t32 = load_posteriordb(name, dtype=tf.float32)
    assert t32.dtype == tf.float32
    assert all(v.dtype == np.float32 for v in t32.ground_truth_mean.values())
    z = t64.unconstrain(t64.ground_truth_mean).numpy()[np.newaxis]
    lp32 = t32.unnormalized_log_prob(z.astype(np.float32)).numpy()
    np.testing.assert_allclose(lp32, t64.unnormalized_log_prob(z).numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", ["arma-arma11", "garch-garch11", "gp_pois_regr-gp_regr"])
def test_jit_compiled_gradients(name):
    target = load_posteriordb(name)
    z0 = target.unconstrain(target.ground_truth_mean).numpy()
    z = tf.constant(z0 + 0.01 * np.arange(6 * z0.size).reshape([2, 3, z0.size]) / z0.size)

    @tf.function(jit_compile=True)
    def value_and_grad(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            lp = target.unnormalized_log_prob(z)
        return lp, tape.gradient(lp, z)

    lp, grad = value_and_grad(z)
    np.testing.assert_allclose(lp.numpy(), target.unnormalized_log_prob(z).numpy(), rtol=1e-10)
    assert grad.shape == z.shape and np.all(np.isfinite(grad.numpy()))
    # The gradient agrees with a central difference along one direction.
    v = np.linspace(-1.0, 1.0, z0.size)
    h = 1e-6
    fd = (target.unnormalized_log_prob(z + h * v) - target.unnormalized_log_prob(z - h * v)).numpy() / (2 * h)
    np.testing.assert_allclose(np.sum(grad.numpy() * v, axis=-1), fd, rtol=1e-5, atol=1e-5)


# -- German credit ---------------------------------------------------------------------------


def test_german_credit():
    t = models.german_credit_sparse_logistic_regression()
    assert t.event_size == 51
    assert t.names == ("global_scale", "local_scales", "unscaled_weights")
    assert t.event_shapes == {"global_scale": (), "local_scales": (25,), "unscaled_weights": (25,)}
    assert set(t.ground_truth_mean) == set(t.names) and not t.has_exact_sampler
    # An independent numpy version of the model and the data preparation.
    with importlib.resources.files("neutra_flows").joinpath("data/german_credit_numeric.csv").open() as f:
        raw = np.loadtxt(f, delimiter=",")
    feats = (raw[:, :-1] - raw[:, :-1].mean(0)) / raw[:, :-1].std(0)
    feats = np.hstack([feats, np.ones([1000, 1])])
    labels = raw[:, -1] - 1
    assert set(np.unique(labels)) == {0.0, 1.0}
    z = np.random.default_rng(0).normal(scale=0.5, size=[3, 51])
    g, ls, w = np.exp(z[:, 0]), np.exp(z[:, 1:26]), z[:, 26:]

    def gamma_half_lp(v):  # Gamma(0.5, rate 0.5)
        return 0.5 * math.log(0.5) - math.lgamma(0.5) - 0.5 * np.log(v) - 0.5 * v

    logits = feats @ (w * ls * g[:, None]).T  # [1000, 3]
    loglik = np.sum(labels[:, None] * logits - np.logaddexp(0, logits), axis=0)
    prior = gamma_half_lp(g) + gamma_half_lp(ls).sum(-1) - 0.5 * (w**2).sum(-1) - 12.5 * math.log(2 * math.pi)
    log_det = z[:, 0] + z[:, 1:26].sum(-1)  # exp for the scales
    expected = loglik + prior + log_det
    np.testing.assert_allclose(t.unnormalized_log_prob(z.astype(np.float32)), expected, rtol=2e-4)
    draws = t.named_draws(z)
    np.testing.assert_allclose(draws["global_scale"], g, rtol=1e-5)


def test_german_credit_softplus_differs_from_exp_by_the_jacobian():
    t_exp = models.german_credit_sparse_logistic_regression(dtype=tf.float64)
    t_sp = models.german_credit_sparse_logistic_regression(dtype=tf.float64, scale_bijector="softplus")
    rng = np.random.default_rng(1)
    x = {
        "global_scale": rng.uniform(0.2, 1.0, [3]),
        "local_scales": rng.uniform(0.2, 2.0, [3, 25]),
        "unscaled_weights": rng.normal(size=[3, 25]),
    }
    z_exp, z_sp = t_exp.unconstrain(x).numpy(), t_sp.unconstrain(x).numpy()
    positives = np.concatenate([x["global_scale"][:, None], x["local_scales"]], axis=1)
    np.testing.assert_allclose(z_exp[:, :26], np.log(positives), rtol=1e-12)
    np.testing.assert_allclose(z_sp[:, :26], np.log(np.expm1(positives)), rtol=1e-12)
    # log|d exp(u)/du| = u = log x;  log|d softplus(u)/du| = log sigmoid(u) = log(1 - exp(-x)).
    jac_gap = np.sum(np.log(positives) - np.log1p(-np.exp(-positives)), axis=1)
    gap = t_exp.unnormalized_log_prob(z_exp).numpy() - t_sp.unnormalized_log_prob(z_sp).numpy()
    np.testing.assert_allclose(gap, jac_gap, rtol=1e-10)


def test_german_credit_default_is_exp_and_bad_option_raises():
    t = models.german_credit_sparse_logistic_regression()
    assert t.dtype == tf.float32
    z = np.zeros([1, 51], np.float32)
    np.testing.assert_allclose(t.constrain(z)["global_scale"], [1.0])
    with pytest.raises(ValueError, match="scale_bijector must be one of"):
        models.german_credit_sparse_logistic_regression(scale_bijector="relu")


def test_german_credit_ground_truth():
    t = models.german_credit_sparse_logistic_regression(scale_bijector="softplus")
    shapes = {"global_scale": (), "local_scales": (25,), "unscaled_weights": (25,)}
    assert {k: v.shape for k, v in t.ground_truth_mean.items()} == shapes
    assert {k: v.shape for k, v in t.ground_truth_std.items()} == shapes
    assert t.ground_truth_mean["global_scale"] == pytest.approx(0.34659073894573333, rel=1e-6)
    assert t.ground_truth_std["unscaled_weights"][-1] == pytest.approx(0.5773283660916191, rel=1e-6)
    # Orientation (label coding, column order, bias last): a ridge logistic regression on our data
    # has the signs of the ground truth's weights wherever those are clearly non-zero.
    features, labels = load_german_credit()
    w = np.zeros(25)
    for _ in range(25):
        prob = 1.0 / (1.0 + np.exp(-features @ w))
        grad = features.T @ (labels - prob) - 0.01 * w
        hess = -(features.T * (prob * (1 - prob))) @ features - 0.01 * np.eye(25)
        w -= np.linalg.solve(hess, grad)
    m = t.ground_truth_mean
    gt_w = m["unscaled_weights"] * m["local_scales"] * m["global_scale"]
    clear = np.abs(gt_w) > 0.1
    assert clear.sum() >= 10
    np.testing.assert_array_equal(np.sign(w[clear]), np.sign(gt_w[clear]))


# -- slow: plain NUTS recovers the reference posterior -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", POSTERIORDB_MODELS)
def test_nuts_recovers_the_reference(name):
    import arviz as az

    import neutra_flows

    target = load_posteriordb(name)
    idata = neutra_flows.sample(
        target, None, kernel="nuts", num_chains=4, num_warmup=1000, num_samples=1000, seed=0, progress=False
    )
    mcse = az.mcse(idata)
    for var in target.names:
        draws = idata.posterior[var].values
        mean = draws.mean(axis=(0, 1))
        std = draws.std(axis=(0, 1))
        ref_mean, ref_std = target.ground_truth_mean[var], target.ground_truth_std[var]
        err = np.abs(mean - ref_mean)
        assert np.all(err < 5 * mcse[var].values), (var, mean, ref_mean, mcse[var].values)
        np.testing.assert_allclose(std, ref_std, rtol=0.15, err_msg=var)

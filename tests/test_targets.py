"""Tests for neutra_flows.targets: the Target contract and the built-in targets.

Ground truth is checked against independent computations (closed forms,
quadrature, exact samplers with MCSE-based tolerances), never against code
under test in another module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows import targets
from neutra_flows.targets import Target

tfb = tfp.bijectors
tfd = tfp.distributions

Z_CRIT = 4.0  # two-sided normal quantile for statistical checks (false alarm ~6e-5)


def _std_normal_lp(x):
    return tf.reduce_sum(-0.5 * tf.square(x) - 0.5 * math.log(2 * math.pi), axis=-1)


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


def _flat_log_det(target, z):
    """log|det dc/dz| by autodiff of the flattened constrained vector (same size as z)."""
    z = tf.convert_to_tensor(z, target.dtype)
    with tf.GradientTape() as tape:
        tape.watch(z)
        leaves = tf.nest.flatten(target.constrain(z))
        flat = tf.concat([tf.reshape(v, [z.shape[0], -1]) for v in leaves], axis=-1)
    jac = tape.batch_jacobian(flat, z)
    return tf.linalg.slogdet(jac)[1]


# -- plain targets ----------------------------------------------------------------------


def test_plain_target_contract():
    t = Target(_std_normal_lp, 3, name="gauss")
    assert t.event_size == 3 and t.dtype == tf.float32 and t.names == ("x",)
    z = np.random.default_rng(0).normal(size=[4, 5, 3]).astype(np.float32)
    lp = t.unnormalized_log_prob(z)
    assert lp.shape == (4, 5)
    np.testing.assert_allclose(lp, -0.5 * (z**2).sum(-1) - 1.5 * math.log(2 * math.pi), rtol=1e-5)
    draws = t.named_draws(z)
    assert set(draws) == {"x"} and draws["x"].shape == (4, 5, 3)
    np.testing.assert_array_equal(draws["x"], z)
    assert not t.has_exact_sampler
    with pytest.raises(NotImplementedError):
        t.sample(10, seed=0)
    assert t.ground_truth_mean is None and t.ground_truth_std is None
    assert "gauss" in repr(t)


def test_plain_target_per_coordinate_names_and_ground_truth_array():
    t = Target(
        _std_normal_lp,
        [2],
        tf.float64,
        names=["a", "b"],
        ground_truth_mean=[0.0, 0.0],
        ground_truth_std={"a": 1.0, "b": 1.0},
    )
    assert t.dtype == tf.float64 and t.names == ("a", "b")
    draws = t.named_draws(np.arange(12.0).reshape(2, 3, 2))
    assert draws["a"].shape == (2, 3)
    np.testing.assert_array_equal(draws["b"], np.arange(12.0).reshape(2, 3, 2)[..., 1])
    assert t.ground_truth_mean == {"a": 0.0, "b": 0.0}
    assert set(t.ground_truth_std) == {"a", "b"}


def test_matrix_event_shape_is_flattened():
    t = Target(lambda x: tf.reduce_sum(-0.5 * tf.square(x), axis=[-2, -1]), [2, 3])
    assert t.event_size == 6
    assert t.named_draws(np.zeros([7, 6]))["x"].shape == (7, 2, 3)


def test_constraining_bijector_adds_log_det_and_integrates_to_one():
    # Exponential(1) on x > 0 pulled back through exp: p(z) = exp(z - e^z), mass 1.
    t = Target(
        lambda x: tf.reduce_sum(-x, axis=-1),
        1,
        tf.float64,
        constraining_bijector=tfb.Exp(),
        names="rate",
    )
    z = np.linspace(-25.0, 5.0, 200_001)[:, None]
    lp = t.unnormalized_log_prob(z).numpy()
    np.testing.assert_allclose(lp, z[:, 0] - np.exp(z[:, 0]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.trapezoid(np.exp(lp), z[:, 0]), 1.0, rtol=1e-6)
    assert np.all(t.named_draws(z)["rate"] > 0)
    np.testing.assert_allclose(t.unconstrain({"rate": [[2.0]]}).numpy(), [[math.log(2.0)]])


def test_minus_inf_is_allowed():
    def box(x):
        # A Gaussian cut to a box (a flat box has no gradient: rejected, see test_reliability).
        inside = tf.reduce_all(tf.abs(x) < 1.0, axis=-1)
        return tf.where(inside, _std_normal_lp(x), -np.inf * tf.ones_like(x[..., 0]))

    t = Target(box, 2)
    t.check(np.array([[5.0, 5.0], [0.1, 0.1]]))


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda x: x, r"shape \(3, 2\).*forget to sum"),
        (lambda x: tf.reduce_sum(x), r"must be batched"),
        (lambda x: tf.reduce_sum(x, -1) * np.nan, "NaN"),
        (lambda x: tf.reduce_sum(x, -1) + np.inf, r"\+inf"),
    ],
)
def test_bad_log_prob_raises_at_construction(fn, match):
    with pytest.raises(ValueError, match=match):
        Target(fn, 2)


def test_check_names_the_offending_point():
    def nan_right(x):
        return tf.where(x[..., 0] > 2.0, np.nan, _std_normal_lp(x))

    t = Target(nan_right, 2)  # fine at the probe points
    with pytest.raises(ValueError, match=r"NaN at z = \[3\.25, -1\.5\]"):
        t.check(np.array([[0.0, 0.0], [3.25, -1.5]], np.float32))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 2\]"):
        t.check(np.zeros([3, 5]))


def test_check_wraps_evaluation_errors():
    def broken(x):
        return tf.reduce_sum(x @ tf.ones([5, 1]), axis=-1)  # wrong inner size

    with pytest.raises(ValueError, match="failed at points"):
        Target(broken, 2)


@pytest.mark.parametrize("event_shape", [0, -1, [], [2, 0], "abc", [None]])
def test_bad_event_shape(event_shape):
    with pytest.raises(ValueError, match="event_shape"):
        Target(_std_normal_lp, event_shape)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="callable"):
        Target("not a function", 2)
    with pytest.raises(ValueError, match="dtype"):
        Target(_std_normal_lp, 2, tf.int32)
    with pytest.raises(ValueError, match="constraining_bijector"):
        Target(_std_normal_lp, 2, constraining_bijector=np.exp)
    with pytest.raises(ValueError, match="names"):
        Target(_std_normal_lp, 3, names=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        Target(_std_normal_lp, 2, names=["a", "a"])
    with pytest.raises(ValueError, match=r"ground_truth_mean\['x'\] must have shape"):
        Target(_std_normal_lp, 2, ground_truth_mean=np.zeros(3))
    with pytest.raises(ValueError, match="keys"):
        Target(_std_normal_lp, 2, ground_truth_std={"y": np.ones(2)})


# -- joint distributions and inference_gym-like models ------------------------------------


def _named_scale_model():
    jd = tfd.JointDistributionNamed(
        dict(
            scale=tfd.HalfNormal(2.0),
            loc=tfd.Sample(tfd.Normal(0.0, 1.0), 3),
            y=lambda scale, loc: tfd.Independent(tfd.Normal(loc, scale[..., None]), 1),
        )
    )
    return jd.experimental_pin(y=[0.5, -1.0, 2.0])


def _coroutine_model():
    root = tfd.JointDistributionCoroutine.Root

    @tfd.JointDistributionCoroutine
    def model():
        sigma = yield root(tfd.LogNormal(0.0, 1.0, name="sigma"))
        w = yield root(tfd.Sample(tfd.Normal(0.0, 1.0), 2, name="w"))
        yield tfd.Normal(w[..., 0] + w[..., 1], sigma, name="obs")

    return model.experimental_pin(obs=1.5)


def _sequential_model():
    # All variables latent: the data is built into the likelihood term.
    return tfd.JointDistributionSequential(
        [
            tfd.Gamma(2.0, 2.0, name="prec"),
            tfd.Sample(tfd.Normal(0.0, 1.0), [2, 2], name="m"),
        ]
    )


@pytest.mark.parametrize(
    "make, names, shapes, positive",
    [
        (_named_scale_model, ("loc", "scale"), {"loc": (3,), "scale": ()}, "scale"),
        (_coroutine_model, ("sigma", "w"), {"sigma": (), "w": (2,)}, "sigma"),
        (_sequential_model, ("prec", "m"), {"prec": (), "m": (2, 2)}, "prec"),
    ],
)
def test_from_joint_distribution(make, names, shapes, positive):
    jd = make()
    t = Target.from_joint_distribution(jd)
    assert t.names == names
    assert t.event_shapes == shapes
    assert t.event_size == sum(int(np.prod(s)) for s in shapes.values())
    z = np.random.default_rng(1).normal(scale=2.0, size=[4, 5, t.event_size]).astype(np.float32)
    draws = t.named_draws(z)
    assert set(draws) == set(names)
    for k, s in shapes.items():
        assert draws[k].shape == (4, 5, *s)
    assert np.all(draws[positive] > 0)
    # The density on R^d is the JD's density at c(z) plus log|det c'(z)| (autodiff).
    zf = z.reshape(-1, t.event_size)
    log_prob = getattr(jd, "unnormalized_log_prob", jd.log_prob)
    expected = log_prob(t.constrain(zf)) + _flat_log_det(t, zf)
    np.testing.assert_allclose(t.unnormalized_log_prob(zf), expected, rtol=1e-4, atol=1e-4)
    # Round trip through the user's names.
    back = t.unconstrain({k: v.reshape(20, *shapes[k]) for k, v in draws.items()})
    np.testing.assert_allclose(back, zf, rtol=1e-4, atol=1e-4)


def test_from_joint_distribution_autobatched():
    @tfd.JointDistributionCoroutineAutoBatched
    def model():
        scale = yield tfd.HalfNormal(1.0, name="scale")
        yield tfd.Normal(0.0, scale, name="y")

    t = Target.from_joint_distribution(model.experimental_pin(y=0.5))
    assert t.names == ("scale",) and t.event_size == 1
    draws = t.named_draws(np.linspace(-20.0, 5.0, 12).reshape(3, 4, 1))
    assert draws["scale"].shape == (3, 4) and np.all(draws["scale"] > 0)


def test_from_joint_distribution_rejects_non_jd():
    with pytest.raises(ValueError, match="JointDistribution"):
        Target.from_joint_distribution(object())


class _FakeTransformation:
    def __init__(self, mean, std):
        self.ground_truth_mean = mean
        self.ground_truth_standard_deviation = std


class _FakeStructuredGymModel:
    """Shaped like an inference_gym model with a dict-valued event."""

    name = "fake_structured"
    dtype = {"log_rate": tf.float32, "rate": tf.float32}
    event_shape = {"log_rate": tf.TensorShape([2]), "rate": tf.TensorShape([])}
    default_event_space_bijector = {"log_rate": tfb.Identity(), "rate": tfb.Exp()}
    sample_transformations = {
        "identity": _FakeTransformation(
            {"log_rate": np.zeros(2), "rate": np.array(1.0)},
            {"log_rate": np.ones(2), "rate": np.array(1.0)},
        )
    }

    def unnormalized_log_prob(self, x):
        return _std_normal_lp(x["log_rate"]) - x["rate"]


class _FakeVectorGymModel:
    dtype = tf.float64
    event_shape = tf.TensorShape([3])
    default_event_space_bijector = tfb.Softplus()

    def unnormalized_log_prob(self, x):
        return tf.reduce_sum(-x, axis=-1)


def test_from_inference_gym_structured():
    t = Target.from_inference_gym(_FakeStructuredGymModel())
    assert t.name == "fake_structured"
    assert t.names == ("log_rate", "rate") and t.event_size == 3
    np.testing.assert_array_equal(t.ground_truth_mean["log_rate"], np.zeros(2))
    np.testing.assert_array_equal(t.ground_truth_std["rate"], 1.0)
    z = np.array([[0.1, -0.2, 0.7]], np.float32)
    draws = t.named_draws(z)
    np.testing.assert_allclose(draws["rate"], [math.exp(0.7)], rtol=1e-6)
    expected = _std_normal_lp(z[:, :2]) - math.exp(0.7) + 0.7
    np.testing.assert_allclose(t.unnormalized_log_prob(z), expected, rtol=1e-5)


def test_from_inference_gym_single_tensor():
    t = Target.from_inference_gym(_FakeVectorGymModel())
    assert t.names == ("x",) and t.event_size == 3 and t.dtype == tf.float64
    assert t.ground_truth_mean is None
    z = np.array([[-1.0, 0.0, 2.0]])
    x = np.log1p(np.exp(z))
    log_det = np.sum(-np.log1p(np.exp(-z)))  # d softplus / dz = sigmoid(z)
    np.testing.assert_allclose(t.unnormalized_log_prob(z), -x.sum(-1) + log_det, rtol=1e-10)
    np.testing.assert_allclose(t.named_draws(z)["x"], x, rtol=1e-12)


def test_from_inference_gym_rejects_incomplete_model():
    class Incomplete:
        def unnormalized_log_prob(self, x):
            return x

    with pytest.raises(ValueError, match="lacks"):
        Target.from_inference_gym(Incomplete())


# -- built-in targets: exact ground truth -------------------------------------------------


def test_neals_funnel_ground_truth_by_quadrature_and_sampler():
    t = targets.neals_funnel(ndims=4, dtype=tf.float64)
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
    t = targets.banana(dtype=tf.float64)
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
    t = targets.banana(ndims=4, curvature=0.05)
    x = t.sample(50_000, seed=7).numpy()
    _assert_mean_within_mcse(x, t.ground_truth_mean["x"], "banana")
    _assert_std_within_mcse(x, t.ground_truth_std["x"], "banana")
    np.testing.assert_allclose(t.ground_truth_std["x"][1], math.sqrt(1 + 2 * 0.05**2 * 1e4))


def test_correlated_gaussian():
    t = targets.correlated_gaussian(3, 0.6, mean=[1.0, -2.0, 0.0], scale=[1.0, 2.0, 0.5])
    s = np.array([1.0, 2.0, 0.5])
    cov = np.array([[1.0, 0.6, 0.6], [0.6, 1.0, 0.6], [0.6, 0.6, 1.0]]) * np.outer(s, s)
    np.testing.assert_allclose(t.covariance, cov, rtol=1e-12)
    np.testing.assert_allclose(t.ground_truth_std["x"], s)
    x = t.sample(20_000, seed=1).numpy().astype(np.float64)
    _assert_mean_within_mcse(x, [1.0, -2.0, 0.0], "correlated")
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.05 * 4)
    with pytest.raises(ValueError, match="rho"):
        targets.correlated_gaussian(3, -0.6)


def test_ill_conditioned_gaussian():
    t = targets.ill_conditioned_gaussian(ndims=20, seed=5, dtype=tf.float64)
    again = targets.ill_conditioned_gaussian(ndims=20, seed=5, dtype=tf.float64)
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


def test_german_credit():
    t = targets.german_credit_sparse_logistic_regression()
    assert t.event_size == 51
    assert t.names == ("global_scale", "local_scales", "unscaled_weights")
    assert t.event_shapes == {"global_scale": (), "local_scales": (25,), "unscaled_weights": (25,)}
    assert set(t.ground_truth_mean) == set(t.names) and not t.has_exact_sampler
    # An independent numpy version of the model and the data preparation.
    raw = np.loadtxt(
        __import__("importlib.resources")
        .resources.files("neutra_flows")
        .joinpath("data/german_credit_numeric.csv")
        .open(),
        delimiter=",",
    )
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


def test_eight_schools():
    t = targets.eight_schools()
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
    expected = joint + _flat_log_det(t, z).numpy()
    np.testing.assert_allclose(t.unnormalized_log_prob(z), expected, rtol=1e-4, atol=1e-3)

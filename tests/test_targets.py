"""Tests for neutra_flows.targets: the Target contract, its layouts and its checks.

Densities are checked against independent computations (closed forms, autodiff
log-determinants), never against code under test in another module. The
built-in targets are tested in test_models.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows.targets import Target

tfb = tfp.bijectors
tfd = tfp.distributions


def _std_normal_lp(x):
    return tf.reduce_sum(-0.5 * tf.square(x) - 0.5 * math.log(2 * math.pi), axis=-1)


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


# -- structured targets: several variables ------------------------------------------------


def _dict_lp(x):
    return _std_normal_lp(x["loc"]) - x["rate"]


def test_structured_target_from_the_constructor():
    t = Target(
        _dict_lp,
        {"loc": [2], "rate": []},
        {"loc": tf.float64, "rate": tf.float64},
        tfb.JointMap({"loc": tfb.Identity(), "rate": tfb.Exp()}),
        ground_truth_mean={"loc": [0.0, 0.0], "rate": 1.0},
    )
    assert t.names == ("loc", "rate") and t.event_shapes == {"loc": (2,), "rate": ()}
    assert t.event_size == 3 and t.dtype == tf.float64
    z = np.array([[0.1, -0.2, 0.7], [1.0, 2.0, -3.0]])
    # Flat order: variables in tf.nest order (sorted keys), each flattened.
    expected = _std_normal_lp(z[:, :2]) - np.exp(z[:, 2]) + z[:, 2]
    np.testing.assert_allclose(t.unnormalized_log_prob(z), expected, rtol=1e-12)
    draws = t.named_draws(z)
    np.testing.assert_allclose(draws["rate"], np.exp(z[:, 2]), rtol=1e-12)
    np.testing.assert_allclose(t.unconstrain(draws), z, rtol=1e-12)
    assert t.ground_truth_mean["rate"].shape == ()


def test_structured_target_without_bijector_is_the_identity():
    t = Target(lambda x: _std_normal_lp(x[0]) + _std_normal_lp(x[1]), [[2], [1]], [tf.float32, tf.float32])
    assert t.names == ("x0", "x1") and t.event_size == 3
    z = np.array([[0.5, -1.0, 2.0]], np.float32)
    np.testing.assert_allclose(t.unnormalized_log_prob(z), _std_normal_lp(z), rtol=1e-6)
    np.testing.assert_array_equal(t.named_draws(z)["x1"], z[:, 2:])


def test_structured_target_bad_arguments():
    dtype = {"loc": tf.float32, "rate": tf.float32}
    with pytest.raises(ValueError, match="one float dtype"):
        Target(_dict_lp, {"loc": [2], "rate": []}, {"loc": tf.float32, "rate": tf.float64})
    with pytest.raises(ValueError, match=r"one name per variable \(2\), got 3"):
        Target(_dict_lp, {"loc": [2], "rate": []}, dtype, names=["a", "b", "c"])
    with pytest.raises(ValueError, match="unique"):
        Target(_dict_lp, {"loc": [2], "rate": []}, dtype, names=["a", "a"])
    with pytest.raises(ValueError, match="constraining_bijector"):
        Target(_dict_lp, {"loc": [2], "rate": []}, dtype, constraining_bijector={"rate": tfb.Exp()})


def test_targets_module_imports_nothing_above_it():
    # Data flows one way: targets (and its layout and checks) sit below models, vi and mcmc.
    import ast
    import importlib.util

    # derived (a target's derived quantities) sits beside targets, on the layout alone.
    allowed = {"neutra_flows", "neutra_flows._utils", "neutra_flows._layout", "neutra_flows._checks",
               "neutra_flows.derived"}
    for module in ("neutra_flows.targets", "neutra_flows._layout", "neutra_flows._checks",
                   "neutra_flows.derived"):
        tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("neutra_flows"):
                assert node.module in allowed, f"{module} imports {node.module}"
                if node.module == "neutra_flows":
                    names = {a.name for a in node.names}
                    assert names <= {"_checks", "_layout"}, f"{module} imports {names}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("neutra_flows") for a in node.names), module


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


def _discrete_latent_models():
    root = tfd.JointDistributionCoroutine.Root

    @tfd.JointDistributionCoroutine
    def poisson():
        rate = yield root(tfd.HalfNormal(1.0, name="rate"))
        k = yield tfd.Poisson(rate, name="k")  # float32, but discrete: no event-space bijector
        yield tfd.Normal(k, 1.0, name="y")

    return {
        "poisson": (poisson.experimental_pin(y=0.3), "'k' (Poisson)"),
        "bernoulli": (tfd.JointDistributionNamed(dict(
            b=tfd.Bernoulli(probs=0.3), y=lambda b: tfd.Normal(tf.cast(b, tf.float32), 1.0),
        )).experimental_pin(y=0.2), "'b' is discrete (int32)"),
        "categorical": (tfd.JointDistributionSequential([
            tfd.Categorical(probs=[0.2, 0.8], name="c"), tfd.Normal(0.0, 1.0, name="x"),
        ]), "'c' is discrete (int32)"),
    }


@pytest.mark.parametrize("kind", ["poisson", "bernoulli", "categorical"])
def test_from_joint_distribution_refuses_a_discrete_latent(kind):
    jd, match = _discrete_latent_models()[kind]
    with pytest.raises(ValueError, match="discrete") as info:
        Target.from_joint_distribution(jd)
    assert match in str(info.value) and "experimental_pin" in str(info.value)


def test_from_joint_distribution_accepts_discrete_observed_data():
    # A discrete likelihood pinned to counts is an ordinary model: only latents must be continuous.
    jd = tfd.JointDistributionNamed(dict(rate=tfd.HalfNormal(2.0),
                                         y=lambda rate: tfd.Sample(tfd.Poisson(rate), 3)))
    t = Target.from_joint_distribution(jd.experimental_pin(y=[1.0, 0.0, 4.0]))
    assert t.names == ("rate",) and t.event_size == 1


@pytest.mark.parametrize("autobatched", [False, True])
def test_from_joint_distribution_refuses_a_batched_model(autobatched):
    latent = dict(loc=tfd.Normal(tf.zeros(3), 1.0), y=lambda loc: tfd.Normal(loc, 1.0))
    jd = (tfd.JointDistributionNamedAutoBatched(latent, batch_ndims=1) if autobatched
          else tfd.JointDistributionNamed(latent))
    with pytest.raises(ValueError, match=r"batch shape \[3\]") as info:
        Target.from_joint_distribution(jd.experimental_pin(y=[0.1, 0.2, 0.3]))
    assert ("the model" if autobatched else "'loc'") in str(info.value) and "tfd.Sample" in str(info.value)


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

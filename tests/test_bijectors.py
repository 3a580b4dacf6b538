"""Property tests of every registered flow, driven by one registry (`FLOWS`, tests/flow_training.py).

For each flow, at event sizes 1, 2 and 5 with batch shapes of rank 0, 1 and
2: the round trip both ways, ``fldj(x) == -ildj(f(x))``, the log-det against
``slogdet`` of the autodiff Jacobian in float64, finite values and gradients
far out in the tails, eager == `tf.function` == XLA, the identity at
initialisation and a non-zero gradient there. Flows are first trained a few
Adam steps away from the identity (a round trip of the identity proves
nothing), and every call that must not be answered by TFP's bijector cache
gets a fresh tensor (`tf.identity`). Trained flows are cached per (name,
event size, dtype) to keep the suite fast.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from flow_training import FLOWS, TRAIN_RATE, jacobian, perturb, train_away

from neutra_flows import bijectors as nfb
from neutra_flows.flows import FLOW_NAMES, make_flow
from neutra_flows.nn import MADE, MLP

tfb = tfp.bijectors
tfd = tfp.distributions

NAMES = list(FLOWS)
# (event size, batch shape): every size meets a batch shape of another rank.
CASES = [(1, ()), (2, (7,)), (5, (3, 4))]
SIZES = [d for d, _ in CASES]
TOL64 = dict(rtol=1e-9, atol=1e-9)
# Far out (|x| = 50) the networks' raw outputs grow linearly and a trained
# layer's scale saturates at e^5: float32 cannot invert such a map to 1e-4.
# The tail checks train at a milder rate.
MILD_RATE = 0.005


@functools.cache
def trained_flow(name: str, event_size: int, dtype: tf.DType = tf.float64, rate: float = TRAIN_RATE):
    """The flow after a few Adam steps (tests/flow_training.py): far from the identity, as in use."""
    return train_away(FLOWS[name](event_size, dtype=dtype), event_size, dtype, rate=rate)


def draw(shape, dtype, *, seed=0, scale=2.0, clip=5.0):
    rng = np.random.default_rng(seed)
    return tf.constant(np.clip(scale * rng.normal(size=shape), -clip, clip), dtype)


def test_every_registered_flow_is_under_test():
    assert set(FLOWS) == set(FLOW_NAMES)


def test_jacobian_matches_batch_jacobian():
    flow = trained_flow("iaf", 5)
    x = draw((4, 5), tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = flow.forward(tf.identity(x))
    expected = tape.batch_jacobian(y, x, experimental_use_pfor=False)
    np.testing.assert_allclose(jacobian(flow.forward, x), expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ round trips and log-dets


@pytest.mark.parametrize("event_size,batch_shape", CASES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_and_log_det_signs(name, event_size, batch_shape):
    flow = trained_flow(name, event_size)
    x = draw((*batch_shape, event_size), tf.float64, seed=event_size)
    y = flow.forward(x)
    assert y.shape == x.shape and y.dtype == tf.float64
    np.testing.assert_allclose(flow.inverse(tf.identity(y)), x, **TOL64)
    # The other way round, from a point of the output space.
    y2 = draw((*batch_shape, event_size), tf.float64, seed=100 + event_size)
    np.testing.assert_allclose(flow.forward(tf.identity(flow.inverse(y2))), y2, **TOL64)

    fldj = flow.forward_log_det_jacobian(x, event_ndims=1)
    ildj = flow.inverse_log_det_jacobian(tf.identity(y), event_ndims=1)
    assert fldj.shape == batch_shape and ildj.shape == batch_shape
    assert np.all(np.isfinite(fldj))
    np.testing.assert_allclose(ildj, -fldj, **TOL64)
    if name != "identity":
        # A trained flow must really move points, or the checks above are void.
        assert np.max(np.abs(y - x)) > 1e-3


@pytest.mark.parametrize("event_size,batch_shape", CASES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_log_det_matches_autodiff_jacobian(name, event_size, batch_shape):
    flow = trained_flow(name, event_size)
    x = draw((*batch_shape, event_size), tf.float64, seed=7)
    _, expected = tf.linalg.slogdet(jacobian(flow.forward, x))
    fldj = flow.forward_log_det_jacobian(tf.identity(x), event_ndims=1)
    np.testing.assert_allclose(fldj, expected, rtol=1e-8, atol=1e-8)
    if name != "identity" and (event_size > 1 or name != "lu_linear"):
        # Trained: the log-det is far from trivial too.
        assert np.max(np.abs(fldj)) > 1e-3


@pytest.mark.parametrize("name", ["iaf", "maf", "nsf_ar", "naf", "bnaf"])
def test_autoregressive_jacobian_is_triangular(name):
    layer = trained_flow(name, 5).layers[0]
    jac = jacobian(layer.forward, draw((3, 5), tf.float64)).numpy()
    np.testing.assert_array_equal(np.triu(jac, k=1), 0.0)
    assert np.max(np.abs(np.tril(jac, k=-1))) > 1e-6


@pytest.mark.parametrize("event_size", [2, 5])
def test_coupling_spline_inverts_after_training(event_size):
    # make_flow("nsf", d) with its defaults after 10 Adam steps at rate 0.05
    # missed by O(1) in a round trip before the logits were scaled.
    flow = train_away(make_flow("nsf", event_size), event_size)
    x = draw((64, event_size), tf.float32, seed=3, clip=6.0)
    y = flow.forward(x)
    assert np.max(np.abs(y - x)) > 0.1
    np.testing.assert_allclose(flow.inverse(tf.identity(y)), x, rtol=1e-3, atol=1e-3)
    ldj = flow.forward_log_det_jacobian(x, event_ndims=1)
    np.testing.assert_allclose(flow.inverse_log_det_jacobian(tf.identity(y), event_ndims=1), -ldj, atol=1e-3)


# ------------------------------------------------------------------ tails and gradients


@pytest.mark.parametrize("event_size", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_tails_finite_invertible_and_gradients_finite(name, event_size):
    flow = trained_flow(name, event_size, tf.float32, MILD_RATE)
    signs = np.where(np.random.default_rng(3).random((4, event_size)) < 0.5, -1.0, 1.0)
    points = tf.concat([draw((6, event_size), tf.float32, seed=11), tf.constant(50.0 * signs, tf.float32)], 0)
    with tf.GradientTape() as tape:
        tape.watch(points)
        y = flow.forward(points)
        fldj = flow.forward_log_det_jacobian(points, event_ndims=1)
        image = tf.identity(points)
        u = flow.inverse(image)
        ildj = flow.inverse_log_det_jacobian(image, event_ndims=1)
        loss = tf.reduce_sum(y**2) + tf.reduce_sum(u**2) + tf.reduce_sum(fldj) + tf.reduce_sum(ildj)
    for value in (y, fldj, u, ildj):
        assert np.all(np.isfinite(value))
    np.testing.assert_allclose(flow.inverse(tf.identity(y)), points, rtol=1e-4, atol=5e-3)

    variables = flow.trainable_variables
    if name != "identity":
        assert len(variables) > 0
    grads = tape.gradient(loss, [points, *variables])
    for var, grad in zip([points, *variables], grads, strict=True):
        label = getattr(var, "name", "inputs")
        assert grad is not None, f"no gradient for {label}"
        assert np.all(np.isfinite(grad)), f"non-finite gradient for {label}"


# ------------------------------------------------------------------ compiled modes


def _all_directions(flow, with_gradients):
    def fn(x):
        with tf.GradientTape() as tape:
            y = flow.forward(x)
            u = flow.inverse(x)
            loss = tf.reduce_sum(y**2) + tf.reduce_sum(u**2)
        grads = tape.gradient(loss, flow.trainable_variables) if with_gradients else []
        return (
            y,
            flow.forward_log_det_jacobian(x, event_ndims=1),
            u,
            flow.inverse_log_det_jacobian(x, event_ndims=1),
            *grads,
        )

    return fn


# Tracing and XLA-compiling cost seconds per flow, so this runs one layer at
# one batch shape, for every flow at d = 5, and at d = 1 for the coupling
# layer whose conditioner then has an empty input. For IAF, the NeuTra
# default, the compiled function also differentiates through its d-step
# inverse loop (the loop that MAF's forward and the AR spline's inverse
# share); compiling that gradient for every looping flow would double the
# cost of this test.
XLA_CASES = [(name, 5) for name in NAMES] + [("realnvp", 1)]


@pytest.mark.parametrize("name,event_size", XLA_CASES)
def test_eager_function_and_xla_agree(name, event_size):
    # One layer: XLA compile time grows with the graph, and stacking is
    # exercised eagerly by every other test.
    one_layer = {"num_layers": 1} if "num_layers" in FLOWS[name].keywords else {}
    flow = perturb(FLOWS[name](event_size, dtype=tf.float64, **one_layer), seed=4321)
    x = draw((3, 4, event_size), tf.float64, seed=5)
    fn = _all_directions(flow, with_gradients=name == "iaf")
    eager = fn(x)
    graph = tf.function(fn, autograph=False)(tf.identity(x))
    xla = tf.function(fn, autograph=False, jit_compile=True)(tf.identity(x))
    for e, g, c in zip(eager, graph, xla, strict=True):
        np.testing.assert_allclose(g, e, **TOL64)
        np.testing.assert_allclose(c, e, **TOL64)
    if name == "iaf":
        assert len(eager) == 4 + len(flow.trainable_variables)
        assert all(np.max(np.abs(g)) > 0 for g in eager[4:])


# ------------------------------------------------------------------ initialisation


@pytest.mark.parametrize("event_size", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_untrained_flow_is_the_identity(name, event_size):
    flow = FLOWS[name](event_size)
    x = draw((7, event_size), tf.float32, seed=2)
    # NAF and BNAF are the identity up to rounding (a logit of a sigmoid, a
    # product of exponentials); the others exactly.
    atol = 2e-6 if name in ("naf", "bnaf") else 1e-6
    np.testing.assert_allclose(flow.forward(x), x, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(flow.forward_log_det_jacobian(x, event_ndims=1), np.zeros(7), atol=2e-6)
    np.testing.assert_allclose(flow.inverse(tf.identity(x)), x, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("event_size", [1, 5])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "identity"])
def test_untrained_flow_can_start_learning(name, event_size):
    # Zero output layers must not be a dead point for training: the loss of
    # a VI step has a non-zero gradient.
    flow = FLOWS[name](event_size)
    x = draw((7, event_size), tf.float32, seed=2)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum((flow.forward(x) - 1.0) ** 2) - tf.reduce_sum(
            flow.forward_log_det_jacobian(x, event_ndims=1)
        )
    grads = tape.gradient(loss, flow.trainable_variables)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grads if g is not None) > 1e-3


# ------------------------------------------------------------------ pieces


@pytest.mark.parametrize("event_size,hidden", [(1, [4]), (5, [8, 8]), (6, [3])])
def test_made_is_autoregressive(event_size, hidden):
    made = MADE(event_size, 3, hidden_units=hidden, dtype=tf.float64)
    rng = np.random.default_rng(0)
    for var in made.trainable_variables:
        var.assign(rng.normal(size=var.shape))
    x = draw((4, event_size), tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        out = made(x)
        flat = tf.reshape(out, [4, -1])
    assert out.shape == (4, event_size, 3)
    jac = tape.batch_jacobian(flat, x, experimental_use_pfor=False).numpy()
    jac = jac.reshape(4, event_size, 3, event_size)
    for i in range(event_size):
        # Row i may depend on x[:i] only.
        np.testing.assert_array_equal(jac[:, i, :, i:], 0.0)
    if event_size > 1:
        assert np.max(np.abs(jac)) > 1e-6


def test_mlp_with_empty_input_is_a_learned_constant():
    mlp = MLP(0, (1, 2), hidden_units=[8], dtype=tf.float32)
    assert [tuple(v.shape) for v in mlp.trainable_variables] == [(2,)]
    mlp.trainable_variables[0].assign([0.5, -1.0])
    out = mlp(tf.zeros([3, 4, 0]))
    assert out.shape == (3, 4, 1, 2)
    np.testing.assert_allclose(out[..., 0, :], np.broadcast_to([0.5, -1.0], (3, 4, 2)))


def test_spline_layers_are_coupling_or_iaf_layers_with_the_spline():
    made = MADE(3, 3 * 4 - 1, hidden_units=[8])
    layer = nfb.NeuralSplineFlow(made, num_bins=4, bound=3.0, autoregressive=True)
    assert isinstance(layer, nfb.IAF) and isinstance(layer.transformer, nfb.RationalQuadraticTransformer)
    mlp = MLP(1, (2, 11), hidden_units=[8])
    layer = nfb.NeuralSplineFlow(mlp, num_bins=4, num_masked=1, logit_scale=0.5, name="spline")
    assert isinstance(layer, nfb.Coupling) and layer.name == "spline"
    assert layer.transformer.num_params == 11 and layer.transformer.logit_scale == 0.5
    with pytest.raises(ValueError, match="num_masked"):
        nfb.NeuralSplineFlow(mlp)
    with pytest.raises(ValueError, match="num_masked"):
        nfb.NeuralSplineFlow(made, autoregressive=True, num_masked=1)
    with pytest.raises(ValueError, match="AffineTransformer"):
        nfb.RealNVP(mlp, num_masked=1, transformer=layer.transformer)


def test_spline_tails_are_identity_with_finite_gradients():
    transformer = nfb.RationalQuadraticTransformer(num_bins=5, bound=2.0)
    rng = np.random.default_rng(0)
    params = tf.Variable(rng.normal(size=(8, transformer.num_params)))
    x = tf.constant([-1e30, -50.0, -2.0, -1.0, 0.3, 2.0, 50.0, 1e30], tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        spline = transformer(params)
        y = spline.forward(x)
        ldj = spline.forward_log_det_jacobian(x, event_ndims=0)
        x_back = spline.inverse(tf.identity(x))
    outside = np.abs(x.numpy()) >= 2.0
    np.testing.assert_array_equal(y.numpy()[outside], x.numpy()[outside])
    np.testing.assert_array_equal(ldj.numpy()[outside], 0.0)
    np.testing.assert_array_equal(x_back.numpy()[outside], x.numpy()[outside])
    assert np.all(np.abs(y.numpy()[~outside] - x.numpy()[~outside]) > 1e-6)
    for target in (y, ldj, x_back):
        for grad in tape.gradient(target, [x, params]):
            assert np.all(np.isfinite(grad))
    # Continuity at the edges of the interval.
    edge = tf.constant([-2.0 + 1e-9, 2.0 - 1e-9], tf.float64)
    np.testing.assert_allclose(transformer(params[:2]).forward(edge), edge, atol=1e-7)


def test_spline_matches_tfp_rational_quadratic_spline():
    transformer = nfb.RationalQuadraticTransformer(num_bins=6, bound=3.0)
    params = tf.constant(np.random.default_rng(1).normal(size=(9, transformer.num_params)))
    ours = transformer(params)
    k = transformer.num_bins
    span = 2 * 3.0 - k * transformer.min_bin_size
    reference = tfb.RationalQuadraticSpline(
        bin_widths=transformer.min_bin_size + span * tf.math.softmax(params[:, :k]),
        bin_heights=transformer.min_bin_size + span * tf.math.softmax(params[:, k : 2 * k]),
        knot_slopes=transformer.min_slope
        + tf.math.softplus(params[:, 2 * k :] + np.log(np.expm1(1 - transformer.min_slope))),
        range_min=-3.0,
    )
    x = tf.constant(np.linspace(-2.9, 2.9, 9), tf.float64)
    np.testing.assert_allclose(ours.forward(x), reference.forward(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours.inverse(x), reference.inverse(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        ours.forward_log_det_jacobian(x, 0),
        reference.forward_log_det_jacobian(x, 0),
        rtol=1e-10,
        atol=1e-10,
    )


def test_affine_lower_triangular_matches_its_matrix():
    d = 4
    rng = np.random.default_rng(0)
    raw = rng.normal(size=d * (d + 1) // 2)
    shift = rng.normal(size=d)
    bij = nfb.AffineLowerTriangular(tf.constant(shift), tf.constant(raw))
    scale = bij.scale_tril.numpy()
    assert np.allclose(scale, np.tril(scale)) and np.all(np.diag(scale) > 0)
    x = rng.normal(size=(3, d))
    np.testing.assert_allclose(bij.forward(x), x @ scale.T + shift, rtol=1e-12)
    np.testing.assert_allclose(
        bij.forward_log_det_jacobian(x, event_ndims=1),
        np.full(3, np.log(np.abs(np.linalg.det(scale)))),
        rtol=1e-10,
    )


# ------------------------------------------------------------------ TFP citizenship


@pytest.mark.parametrize("name", ["iaf", "nsf", "naf"])
def test_flow_works_inside_tfp_distributions_and_chains(name):
    flow = trained_flow(name, 5)
    base = tfd.MultivariateNormalDiag(loc=tf.zeros(5, tf.float64))
    dist = tfd.TransformedDistribution(base, flow)
    u = draw((4, 5), tf.float64, seed=4)
    z = flow.forward(u)
    expected = base.log_prob(u) - flow.forward_log_det_jacobian(tf.identity(u), event_ndims=1)
    np.testing.assert_allclose(dist.log_prob(tf.identity(z)), expected, rtol=1e-9, atol=1e-9)
    assert dist.sample(4, seed=[1, 2]).shape == (4, 5)
    chain = tfb.Chain([tfb.Shift(tf.constant(1.0, tf.float64)), flow])
    np.testing.assert_allclose(chain.forward(u), z + 1.0, rtol=1e-12)


def test_layers_reject_the_wrong_event_size():
    flow = FLOWS["iaf"](3)
    with pytest.raises(ValueError, match="event size 3"):
        flow.forward(tf.zeros([2, 4]))

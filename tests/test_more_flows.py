"""Property tests for the issue-6 flows: naf, bnaf, sylvester, lu_linear, residual.

One small registry (`FLOWS`) drives the same checks the base flows get: round
trips through the (iterative) inverse with `tf.identity` between the calls so
the bijector cache cannot answer, log-dets against `slogdet` of the autodiff
Jacobian in float64, `ildj == -fldj`, finite gradients (also far out in the
tails), eager == `tf.function` == XLA, identity at initialisation; plus the
convergence behaviour of the iterative inversions. The round-trip and
log-det checks first train each flow for a few Adam steps
(tests/flow_training.py), as in use; the other checks randomly perturb the
parameters away from the (identity) initialisation.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from flow_training import train_away

import neutra_flows as nf
from neutra_flows.bijectors._root_finding import (
    ConvergenceError,
    check_converged,
    fixed_point,
    solve_monotone,
)
from neutra_flows.bijectors.bnaf import BlockNeuralAutoregressive
from neutra_flows.bijectors.linear import LULinear
from neutra_flows.bijectors.naf import NAF, DeepSigmoidalTransformer
from neutra_flows.bijectors.residual import InvertibleResidual, spectral_norm_bound
from neutra_flows.bijectors.sylvester import HouseholderSylvester
from neutra_flows.nn import MADE

# Small options: the checks are about correctness, not capacity. One layer
# keeps the eager iterative inverses cheap; the d = 5 round trip runs
# two-layer stacks (with their permutations).
FLOWS = {
    "naf": dict(num_layers=1, hidden_units=[8], num_components=3),
    "bnaf": dict(num_layers=1, hidden_factor=2),
    "sylvester": dict(num_layers=1),
    "lu_linear": dict(permutation="random", seed=3),
    "residual": dict(num_layers=1, hidden_units=[8]),
}
ITERATIVE = ("naf", "bnaf", "sylvester", "residual")
CHEAP = ("lu_linear", "residual")
# (event size, batch shape): every size and every batch shape is covered.
CASES = [(1, []), (2, [7]), (5, [3, 4])]
CASES_WITH_16 = [(name, d, b) for name in FLOWS for d, b in CASES] + [(name, 16, [7]) for name in CHEAP]


def make(name: str, d: int, dtype=tf.float64, **extra) -> tf.Module:
    return nf.make_flow(name, d, dtype=dtype, **{**FLOWS[name], **extra})


def perturb(flow: tf.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Moves every trainable variable away from its (identity) initial value."""
    rng = np.random.default_rng(seed)
    for v in flow.trainable_variables:
        v.assign(v + rng.normal(0.0, scale, v.shape).astype(v.dtype.as_numpy_dtype))


def points(shape, dtype=tf.float64, scale: float = 2.0, seed: int = 1) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(scale * rng.standard_normal(shape), dtype)


def autodiff_jacobian(fn, x):
    """`J[..., i, j] = d fn(x)[..., i] / d x[..., j]` by reverse-mode autodiff.

    Row `i` is the gradient of output `i`; stacking `d` copies of `x` (one per
    row, independent in the batch) gives all rows from one reverse pass, much
    faster eagerly than `batch_jacobian`'s `pfor`, which traces a graph each
    call. Checked against `batch_jacobian` below.
    """
    d = x.shape[-1]
    copies = tf.broadcast_to(x, [d, *x.shape])
    with tf.GradientTape() as tape:
        tape.watch(copies)
        y = fn(copies)
        picked = tf.reduce_sum(tf.linalg.diag_part(tf.experimental.numpy.moveaxis(y, 0, -2)))
    rows = tape.gradient(picked, copies)  # [d (row), ..., d (column)]
    return tf.experimental.numpy.moveaxis(rows, 0, -2)


def slogdet_jacobian(flow, x):
    """log|det d flow(x) / dx| from the autodiff Jacobian, any batch shape."""
    return tf.linalg.slogdet(autodiff_jacobian(flow.forward, x))[1]


# ---------------------------------------------------------------- registry


def test_registered_with_config_and_exactness():
    for name in FLOWS:
        assert name in nf.FLOW_NAMES
        flow = make(name, 3)
        config = flow.flow_config
        assert config["name"] == name and config["event_size"] == 3
        assert config["dtype"] == "float64"
        assert flow.exact_log_det is True
        rebuilt = nf.make_flow(**config)
        assert [v.shape for v in rebuilt.trainable_variables] == [v.shape for v in flow.trainable_variables]
    stochastic = nf.make_flow("residual", 3, log_det="stochastic", hidden_units=[8])
    assert stochastic.exact_log_det is False


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("naf", dict(num_components=0), "num_components"),
        ("naf", dict(min_slope=1.5), "min_slope"),
        ("bnaf", dict(hidden_factor=0), "hidden_factor"),
        ("sylvester", dict(tol=-1.0), "tol"),
        ("sylvester", dict(max_iterations=0), "max_iterations"),
        ("lu_linear", dict(permutation="sideways"), "permutation"),
        ("residual", dict(lipschitz=1.0), "lipschitz"),
        ("residual", dict(log_det="approximate"), "log_det"),
        ("residual", dict(activation="relu6"), "activation"),
        ("residual", dict(unknown=1), "allowed"),
    ],
)
def test_bad_options_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        nf.make_flow(name, 3, **options)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", FLOWS)
def test_identity_at_init(name):
    # lu_linear with a random permutation is a permutation at init; the
    # registry default (identity permutation) is the identity.
    extra = {"permutation": "identity"} if name == "lu_linear" else {}
    flow = make(name, 5, dtype=tf.float32, **extra)
    x = points([3, 4, 5], tf.float32)
    # NAF and BNAF are the identity up to rounding (a logit of a sigmoid, a
    # product of exponentials); the others exactly.
    atol = 2e-6 if name in ("naf", "bnaf") else 0.0
    np.testing.assert_allclose(flow.forward(x), x, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(flow.forward_log_det_jacobian(x, event_ndims=1), 0.0, atol=2e-6)


@pytest.mark.parametrize("name, d, batch", CASES_WITH_16)
def test_round_trip_and_log_det_float64(name, d, batch):
    flow = make(name, d, **({"num_layers": 2} if d == 5 and name != "lu_linear" else {}))
    train_away(flow, d, tf.float64, seed=d)
    x = points([*batch, d], seed=d)
    y = flow.forward(x)
    assert y.shape == x.shape and y.dtype == tf.float64
    np.testing.assert_allclose(flow.inverse(tf.identity(y)), x, rtol=1e-9, atol=1e-9)
    # The other way round, from a point of the output space.
    y2 = points([*batch, d], seed=d + 100)
    x2 = flow.inverse(y2)
    np.testing.assert_allclose(flow.forward(tf.identity(x2)), y2, rtol=1e-9, atol=1e-9)

    fldj = flow.forward_log_det_jacobian(tf.identity(x), event_ndims=1)
    assert fldj.shape == tuple(batch)
    # Trained parameters: the map and its log-det are far from trivial.
    assert np.max(np.abs(y - x)) > 1e-3
    if d > 1 or name != "lu_linear":
        assert np.max(np.abs(fldj)) > 1e-3
    np.testing.assert_allclose(fldj, slogdet_jacobian(flow, x), rtol=1e-8, atol=1e-8)
    # Same y2 object: the inverse log-det reuses the inverse just computed.
    ildj = flow.inverse_log_det_jacobian(y2, event_ndims=1)
    expected = -flow.forward_log_det_jacobian(tf.identity(x2), event_ndims=1)
    np.testing.assert_allclose(ildj, expected, rtol=1e-8, atol=1e-8)


def test_stacked_jacobian_matches_batch_jacobian():
    flow = make("sylvester", 3, num_layers=1)
    perturb(flow, seed=3)
    x = points([4, 3], seed=3)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = flow.forward(x)
    expected = tape.batch_jacobian(y, x, experimental_use_pfor=False)
    np.testing.assert_allclose(autodiff_jacobian(flow.forward, tf.identity(x)), expected, atol=1e-12)


@pytest.mark.parametrize("name", FLOWS)
def test_round_trip_float32_and_tails(name):
    flow = make(name, 3, dtype=tf.float32)
    train_away(flow, 3, tf.float32, seed=5)
    x = tf.clip_by_value(points([3, 4, 3], tf.float32), -5.0, 5.0)
    y = flow.forward(x)
    np.testing.assert_allclose(flow.inverse(tf.identity(y)), x, rtol=1e-4, atol=1e-4)
    far = tf.constant([[50.0, -50.0, 50.0], [-50.0] * 3, [50.0] * 3], tf.float32)
    y_far = flow.forward(far)
    assert np.all(np.isfinite(y_far))
    assert np.all(np.isfinite(flow.forward_log_det_jacobian(far, event_ndims=1)))
    np.testing.assert_allclose(flow.inverse(tf.identity(y_far)), far, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", FLOWS)
def test_gradients_finite(name):
    flow = make(name, 2, dtype=tf.float32)
    perturb(flow, seed=2)
    x = tf.constant([[0.3, -1.2], [50.0, -50.0], [-3.0, 2.0]], tf.float32)
    with tf.GradientTape() as tape:
        y = flow.forward(x)
        loss = tf.reduce_sum(y**2) + tf.reduce_sum(flow.forward_log_det_jacobian(x, event_ndims=1))
        loss += tf.reduce_sum(flow.inverse(tf.identity(y) + 0.1) ** 2)
    grads = tape.gradient(loss, flow.trainable_variables)
    assert len(grads) == len(flow.trainable_variables) > 0
    for v, g in zip(flow.trainable_variables, grads, strict=True):
        assert g is not None, v.name
        assert np.all(np.isfinite(g)), v.name


@pytest.mark.parametrize("name", FLOWS)
def test_eager_graph_xla_agree(name):
    flow = make(name, 2)
    perturb(flow, seed=7)
    x = points([3, 2], seed=7)

    def run(x):
        y = flow.forward(x)
        return y, flow.forward_log_det_jacobian(x, event_ndims=1), flow.inverse(tf.identity(y) + 0.5)

    eager = run(x)
    graph = tf.function(run, autograph=False)(x)
    xla = tf.function(run, autograph=False, jit_compile=True)(x)
    for e, g, c in zip(eager, graph, xla, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(c, e, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- convergence


def _single_layers(d: int):
    """One perturbed layer of each iterative family (float64)."""
    k = 3
    layers = {
        "naf": NAF(
            MADE(d, 3 * k, hidden_units=[8], seed=1, dtype=tf.float64),
            transformer=DeepSigmoidalTransformer(k),
        ),
        "bnaf": BlockNeuralAutoregressive(d, hidden_factor=2, dtype=tf.float64),
        "sylvester": HouseholderSylvester(d, dtype=tf.float64),
        "residual": InvertibleResidual(d, hidden_units=[8], dtype=tf.float64),
    }
    for i, layer in enumerate(layers.values()):
        perturb(layer, seed=10 + i, scale=0.5)
    return layers


def test_inverse_reports_residual_and_tolerance():
    d = 3
    y = points([6, d], seed=3, scale=3.0)
    for name, layer in _single_layers(d).items():
        info = layer.inverse_with_info(y)
        assert np.all(info.converged), name
        assert np.all(info.residual <= info.tolerance), name
        # The stated tolerance: tol * (1 + |target|) with tol = 1e-12 in float64.
        assert np.max(info.tolerance) <= 1e-12 * (1 + np.max(np.abs(y))) * 10, name
        assert int(info.num_iterations) > 0, name
        np.testing.assert_allclose(layer.forward(tf.identity(info.x)), y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ITERATIVE)
def test_too_few_iterations_is_an_error_not_a_wrong_answer(name):
    # d = 1: the triangular sweeps cannot make up for the capped iterations
    # (for d > 1 the cap applies per sweep, and sweeps continue the solve).
    y = points([5, 1], seed=4, scale=1.5)
    flow = make(name, 1)
    perturb(flow, seed=4, scale=0.5)
    capped = make(name, 1, max_iterations=1)
    for v, w in zip(capped.trainable_variables, flow.trainable_variables, strict=True):
        v.assign(w)
    np.testing.assert_allclose(flow.forward(tf.identity(flow.inverse(y))), y, atol=1e-9)
    with pytest.raises(ConvergenceError, match="did not converge.*tolerance"):
        capped.inverse(tf.identity(y))
    assert issubclass(ConvergenceError, ValueError)


def test_too_few_iterations_in_graph_and_xla():
    layer = _single_layers(3)["residual"]
    layer._max_iterations = 1
    y = points([5, 3], seed=4, scale=20.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="ConvergenceError"):
        tf.function(layer.inverse, autograph=False)(y)

    # Under XLA nothing can be raised: unconverged entries come back as NaN.
    def solve(target):
        res = solve_monotone(lambda x: (x**3 + x, 3 * x**2 + 1), target, max_iterations=2)
        return check_converged(res, what="cubic")

    target = tf.constant([0.0, 5.0, 1e4], tf.float64)
    out = tf.function(solve, autograph=False, jit_compile=True)(target)
    assert out[0] == 0.0 and np.isnan(out[2])
    full = solve_monotone(lambda x: (x**3 + x, 3 * x**2 + 1), target)
    assert np.all(full.converged)
    np.testing.assert_allclose(full.x**3 + full.x, target, rtol=1e-11)


def test_root_finder_grows_bracket_and_flags_failure():
    # A root far outside the first bracket [y - 1, y + 1] of a very flat map.
    def fn(x):
        return 1e-3 * x + tf.tanh(x), 1e-3 + 1.0 - tf.tanh(x) ** 2

    target = tf.constant([0.5, 2.0, -2.0], tf.float64)
    res = solve_monotone(fn, target)
    assert np.all(res.converged)
    np.testing.assert_allclose(fn(res.x)[0], target, atol=1e-11)
    # A bracket that cannot reach the root is a failure, not an answer.
    capped = solve_monotone(fn, target, max_iterations=3)
    assert not np.all(capped.converged)
    with pytest.raises(ConvergenceError):
        check_converged(capped, what="flat")


def test_fixed_point_contraction():
    def g(x):
        return 0.5 * tf.sin(x)

    y = tf.constant([[0.0, 1.0, -4.0]], tf.float64)
    res = fixed_point(g, y)
    assert np.all(res.converged)
    np.testing.assert_allclose(res.x + g(res.x), y, atol=1e-11)
    with pytest.raises(ConvergenceError):
        check_converged(fixed_point(g, y, max_iterations=2), what="sin")


# ---------------------------------------------------------------- family specifics


def test_inverse_is_differentiable_with_implicit_gradients():
    # d inverse / d y is the inverse of the forward Jacobian at the solution.
    y = points([2, 2], seed=8)
    for name, layer in _single_layers(2).items():
        x = layer.inverse(tf.identity(y))
        jac_inv = autodiff_jacobian(layer.inverse, y)
        jac = autodiff_jacobian(layer.forward, tf.identity(x))
        assert np.max(np.abs(jac - np.eye(2))) > 1e-2, name
        np.testing.assert_allclose(
            tf.matmul(jac_inv, jac), np.broadcast_to(np.eye(2), [2, 2, 2]), atol=1e-8, err_msg=name
        )


def test_outputs_cover_the_real_line():
    # No tanh ceiling: far inputs map to far outputs, roughly linearly.
    x = tf.constant([[-1e3, -1e3], [1e3, 1e3], [2e3, 2e3]], tf.float64)
    for name in ("naf", "bnaf"):
        flow = make(name, 2)
        perturb(flow, seed=9)
        y = flow.forward(x).numpy()
        assert np.all(np.isfinite(y)), name
        assert np.all(y[2] - y[1] > 1.0) and np.all(y[0] < y[1]), name


def test_naf_components_do_not_stay_identical():
    # A zero-initialised conditioner gives all DSF components the same
    # gradient; the transformer's fixed multipliers must break that symmetry.
    flow = make("naf", 2)
    x = points([16, 2], seed=11)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(flow.forward(x) ** 3)
    made = flow.layers[0].conditioner
    kernel = made.trainable_variables[-2]  # output kernel [hidden, d * 3K]
    grad = tape.gradient(loss, kernel).numpy().reshape(kernel.shape[0], 2, 3, 3)
    assert not np.allclose(grad[..., 0, 0], grad[..., 0, 1])


@pytest.mark.parametrize("name", FLOWS)
def test_save_and_load_give_identical_outputs(name, tmp_path):
    flow = make(name, 2)
    perturb(flow, seed=15)
    nf.save_flow(flow, tmp_path / name)
    loaded = nf.load_flow(tmp_path / name)
    assert loaded.flow_config == flow.flow_config
    x = points([4, 2], seed=15)
    np.testing.assert_array_equal(loaded.forward(tf.identity(x)), flow.forward(tf.identity(x)))
    np.testing.assert_array_equal(
        loaded.forward_log_det_jacobian(tf.identity(x), event_ndims=1),
        flow.forward_log_det_jacobian(tf.identity(x), event_ndims=1),
    )
    for a, b in zip(loaded.variables, flow.variables, strict=True):
        np.testing.assert_array_equal(a, b)


def test_lu_linear_is_exact_and_composes():
    layer = LULinear(4, permutation="reverse", dtype=tf.float64)
    x = points([5, 4], seed=12)
    np.testing.assert_array_equal(layer.forward(x), x[:, ::-1])
    perturb(layer, seed=12)
    w = layer.matrix().numpy()
    np.testing.assert_allclose(layer.forward(x), x.numpy() @ w.T + layer.shift.numpy(), atol=1e-12)
    np.testing.assert_allclose(
        layer.forward_log_det_jacobian(x, event_ndims=1), np.linalg.slogdet(w)[1], atol=1e-12
    )
    # As a learned mixing layer between two flows (tfb.Chain: last acts first).
    stack = tfp.bijectors.Chain([make("naf", 4), layer, make("sylvester", 4)])
    np.testing.assert_allclose(stack.inverse(tf.identity(stack.forward(x))), x, atol=1e-9)


def test_spectral_bound_is_an_upper_bound():
    rng = np.random.default_rng(13)
    for shape in [(8, 2), (2, 8), (16, 16), (1, 1)]:
        w = rng.standard_normal(shape)
        bound = float(spectral_norm_bound(tf.constant(w)))
        sigma = np.linalg.norm(w, 2)
        assert sigma * (1 - 1e-12) <= bound <= sigma * 1.1


def test_residual_lipschitz_and_stochastic_log_det():
    flow = nf.make_flow("residual", 3, dtype=tf.float64, num_layers=1, hidden_units=[8])
    perturb(flow, seed=14, scale=3.0)
    block = flow.layers[0]
    x = points([4, 3], seed=14)
    with tf.GradientTape() as tape:
        tape.watch(x)
        g = block.forward(x) - x
    jac_g = tape.batch_jacobian(g, x).numpy()
    assert np.max(np.linalg.norm(jac_g, 2, axis=(-2, -1))) < 0.9 + 1e-9

    stochastic = nf.make_flow(
        "residual", 3, dtype=tf.float64, num_layers=1, hidden_units=[8], log_det="stochastic"
    )
    for v, w in zip(stochastic.trainable_variables, flow.trainable_variables, strict=True):
        v.assign(w)
    exact = flow.forward_log_det_jacobian(x, event_ndims=1).numpy()
    # Each call draws one roulette length for the batch and one probe vector
    # per row: average 64 copies of each point per call, then treat the calls
    # (independent) as the draws.
    tiled = tf.tile(x, [64, 1])

    @tf.function(autograph=False)
    def estimate(z):
        return tf.reduce_mean(
            tf.reshape(stochastic.forward_log_det_jacobian(z, event_ndims=1), [64, 4]), axis=0
        )

    draws = np.stack([estimate(tf.identity(tiled)).numpy() for _ in range(60)])
    mean, se = draws.mean(axis=0), draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - exact) < 4.0 * se + 1e-12)
    assert np.all(draws.std(axis=0) > 0)  # it is random, and flagged as such:
    assert stochastic.exact_log_det is False


def test_sampler_refuses_stochastic_log_det():
    target = nf.Target(lambda z: -0.5 * tf.reduce_sum(z**2, axis=-1), [3], dtype=tf.float64)
    flow = nf.make_flow("residual", 3, dtype=tf.float64, log_det="stochastic", hidden_units=[8])
    with pytest.raises(ValueError, match="exact"):
        nf.sample(target, flow, num_warmup=2, num_samples=2, num_chains=1, seed=0)

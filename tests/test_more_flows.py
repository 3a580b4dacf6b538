"""The iterative inverses (naf, bnaf, sylvester, residual) and what is special to each family.

The properties every flow shares (round trips, log-dets against autodiff,
tails, XLA) are checked for these flows too, by tests/test_bijectors.py. Here:
the convergence behaviour of the solvers (diagnostics, loud failure eagerly,
in graphs and under XLA), implicit-function gradients of the inverse, and the
families' own promises (linear tails, symmetry breaking, exact LU algebra,
the residual block's Lipschitz bound and its stochastic log-det).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from flow_training import FLOWS, ITERATIVE, jacobian, perturb

import neutra_flows as nf
from neutra_flows.bijectors import IterativeInverse
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


def points(shape, dtype=tf.float64, scale: float = 2.0, seed: int = 1) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(scale * rng.standard_normal(shape), dtype)


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
        assert info.converged.shape == y.shape and np.all(info.converged), name
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
    flow = perturb(FLOWS[name](1, dtype=tf.float64, num_layers=1), seed=4, scale=0.5)
    capped = FLOWS[name](1, dtype=tf.float64, num_layers=1, max_iterations=1)
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
        assert isinstance(layer, IterativeInverse), name
        x = layer.inverse(tf.identity(y))
        jac_inv = jacobian(layer.inverse, y)
        jac = jacobian(layer.forward, tf.identity(x))
        assert np.max(np.abs(jac - np.eye(2))) > 1e-2, name
        np.testing.assert_allclose(
            tf.matmul(jac_inv, jac), np.broadcast_to(np.eye(2), [2, 2, 2]), atol=1e-8, err_msg=name
        )


def test_outputs_cover_the_real_line():
    # No tanh ceiling: far inputs map to far outputs, roughly linearly.
    x = tf.constant([[-1e3, -1e3], [1e3, 1e3], [2e3, 2e3]], tf.float64)
    for name in ("naf", "bnaf"):
        flow = perturb(FLOWS[name](2, dtype=tf.float64), seed=9)
        y = flow.forward(x).numpy()
        assert np.all(np.isfinite(y)), name
        assert np.all(y[2] - y[1] > 1.0) and np.all(y[0] < y[1]), name


def test_naf_components_do_not_stay_identical():
    # A zero-initialised conditioner gives all DSF components the same
    # gradient; the transformer's fixed multipliers must break that symmetry.
    flow = FLOWS["naf"](2, dtype=tf.float64)
    x = points([16, 2], seed=11)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(flow.forward(x) ** 3)
    made = flow.layers[0].conditioner
    kernel = made.trainable_variables[-2]  # output kernel [hidden, d * 3K]
    grad = tape.gradient(loss, kernel).numpy().reshape(kernel.shape[0], 2, 3, 3)
    assert not np.allclose(grad[..., 0, 0], grad[..., 0, 1])


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
    stack = tfp.bijectors.Chain(
        [FLOWS["naf"](4, dtype=tf.float64), layer, FLOWS["sylvester"](4, dtype=tf.float64)]
    )
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

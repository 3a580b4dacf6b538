"""What the flow tests share: the registry of flows under test, training them, their Jacobian.

`FLOWS` maps every name of `FLOW_NAMES` to a factory
``(event_size, dtype=tf.float32, **overrides) -> flow`` with small options
(width 8, two layers); tests/test_bijectors.py checks that the two agree, so
a new flow costs one line here.

Random perturbations of the weights are not what a flow looks like after
training: Adam moves every weight by about the learning rate per step, so
outputs that sum many hidden units (a coupling MLP) grow much faster than a
perturbation of the same size suggests. That is how the coupling spline's
failure to invert after 10 steps slipped past perturbation-based tests. The
property tests therefore train each flow with tf_keras Adam for a few steps on
an arbitrary smooth loss (fixed data, so the result is deterministic).
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
import tf_keras

from neutra_flows.flows import make_flow

TRAIN_STEPS = 10
TRAIN_RATE = 0.05


def small(name: str, **options):
    """A factory of `make_flow(name, ...)` with `options`; keywords given to it override them."""
    return functools.partial(make_flow, name, **options)


# whitening="none": the whitening layer is an AffineLowerTriangular, checked by
# the affine_tril entry; `fit` sets it by a Gaussian fit, not by Adam.
NETWORK = {"num_layers": 2, "hidden_units": [8, 8], "whitening": "none"}
FLOWS = {
    "iaf": small("iaf", **NETWORK),
    "maf": small("maf", **NETWORK),
    "realnvp": small("realnvp", **NETWORK),
    "nsf": small("nsf", **NETWORK, num_bins=4, bound=3.0, permutation="random", seed=3),
    "nsf_ar": small("nsf_ar", **NETWORK, num_bins=4, bound=3.0),
    "affine_diag": small("affine_diag"),
    "affine_tril": small("affine_tril"),
    "identity": small("identity"),
    "naf": small("naf", **NETWORK, num_components=3),
    "bnaf": small("bnaf", num_layers=2, hidden_factor=2, whitening="none"),
    "sylvester": small("sylvester", num_layers=2, whitening="none"),
    "lu_linear": small("lu_linear"),
    "residual": small("residual", num_layers=2, hidden_units=[8], whitening="none"),
}
ITERATIVE = ("naf", "bnaf", "sylvester", "residual")


def smooth_loss(flow, u):
    """A smooth, non-Gaussian objective that pulls the flow far from the identity."""
    y = flow.forward(u)
    fldj = flow.forward_log_det_jacobian(u, event_ndims=1)
    return tf.reduce_mean(tf.sin(3.0 * y) + 0.5 * tf.square(y)) - tf.reduce_mean(fldj)


def train_away(
    flow,
    event_size: int,
    dtype=tf.float32,
    *,
    steps: int = TRAIN_STEPS,
    rate: float = TRAIN_RATE,
    seed: int = 0,
):
    """Trains `flow` in place with `steps` Adam steps at `rate`; returns it."""
    variables = list(flow.trainable_variables)
    if not variables:
        return flow
    x = tf.constant(np.random.default_rng(seed).normal(size=(64, event_size)), dtype)
    optimizer = tf_keras.optimizers.Adam(rate)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            # A fresh tensor each step: the bijector cache must not hand back
            # the previous step's (untaped) forward pass.
            loss = smooth_loss(flow, tf.identity(x))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables, strict=True) if g is not None])
    return flow


def perturb(flow: tf.Module, seed: int = 0, scale: float = 0.3) -> tf.Module:
    """Moves every trainable variable away from its (identity) initial value; returns `flow`."""
    rng = np.random.default_rng(seed)
    for v in flow.trainable_variables:
        v.assign(v + rng.normal(0.0, scale, v.shape).astype(v.dtype.as_numpy_dtype))
    return flow


def jacobian(fn, x):
    """``J[..., i, j] = d fn(x)[..., i] / d x[..., j]`` by reverse-mode autodiff, any batch shape.

    Row ``i`` is the gradient of output ``i``; stacking ``d`` copies of ``x``
    (one per row, independent in the batch) gives all rows from one reverse
    pass, much faster eagerly than `batch_jacobian`, which runs ``d`` passes
    or traces a `pfor` graph on every call. tests/test_bijectors.py checks it
    against `batch_jacobian`.
    """
    d = x.shape[-1]
    copies = tf.broadcast_to(x, [d, *x.shape])
    with tf.GradientTape() as tape:
        tape.watch(copies)
        y = fn(copies)
        picked = tf.reduce_sum(tf.linalg.diag_part(tf.experimental.numpy.moveaxis(y, 0, -2)))
    rows = tape.gradient(picked, copies)  # [d (row), ..., d (column)]
    return tf.experimental.numpy.moveaxis(rows, 0, -2)

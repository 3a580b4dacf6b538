"""Training flows away from the identity for the property tests.

Random perturbations of the weights are not what a flow looks like after
training: Adam moves every weight by about the learning rate per step, so
outputs that sum many hidden units (a coupling MLP) grow much faster than a
perturbation of the same size suggests. That is how the coupling spline's
failure to invert after 10 steps slipped past perturbation-based tests. The
property tests therefore train each flow with tf_keras Adam for a few steps on
an arbitrary smooth loss (fixed data, so the result is deterministic).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras

TRAIN_STEPS = 10
TRAIN_RATE = 0.05


def smooth_loss(flow, u):
    """A smooth, non-Gaussian objective that pulls the flow far from the identity."""
    y = flow.forward(u)
    fldj = flow.forward_log_det_jacobian(u, event_ndims=1)
    return tf.reduce_mean(tf.sin(3.0 * y) + 0.5 * tf.square(y)) - tf.reduce_mean(fldj)


def train_away(flow, event_size: int, dtype=tf.float32, *, steps: int = TRAIN_STEPS, rate: float = TRAIN_RATE,
               seed: int = 0):
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

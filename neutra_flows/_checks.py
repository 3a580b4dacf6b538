"""Checks of a target's log density: finite values, batch shape, a gradient, traceable by ``tf.function``.

``fit`` and ``sample`` run the density for minutes inside ``tf.function``; a
density that returns NaN, forgets to sum over the event, has no gradient or only
works eagerly should fail at once, with a message that says what to change.
The functions take any object with ``name``, ``event_size``, ``dtype`` and
``unnormalized_log_prob`` (a :class:`~neutra_flows.Target`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf


def validate_at_start(target: Any) -> None:
    """Checks ``target`` at three fixed points and that ``tf.function`` can trace its density.

    Raises ``ValueError`` as :func:`check_points` does, or when the density calls
    numpy or cannot be traced.
    """
    d = target.event_size
    # Deterministic probe points: the origin and two small, non-symmetric points.
    ramp = np.linspace(-0.5, 0.5, d) if d > 1 else np.array([0.3])
    z = np.stack([np.zeros(d), ramp, -0.7 * ramp[::-1]]).astype(target.dtype.as_numpy_dtype)
    # fit and sample run the density inside tf.function: a density that only
    # works eagerly (numpy calls, Python branches on values) must fail here,
    # not after minutes of set-up. Tracing is cheap: nothing is executed.
    graph_error = _trace_error(target, z.shape)
    if graph_error is not None and _looks_like_numpy(graph_error):
        raise ValueError(
            f"{target.name}: the log density calls numpy on a TensorFlow tensor when traced by "
            "tf.function (as fit and sample do): write log_prob_fn with TensorFlow ops "
            f"(tf.math, tf.linalg, tfp.distributions), not numpy. The error: {_first_line(graph_error)}"
        ) from graph_error
    check_points(target, z)
    if graph_error is not None:
        raise ValueError(
            f"{target.name}: the log density works eagerly but not inside tf.function, where fit and "
            "sample run it; use TensorFlow ops only (no numpy, no Python `if` on tensor values). "
            f"The error: {_first_line(graph_error)}"
        ) from graph_error


def check_points(target: Any, z: Any) -> None:
    """Raises ``ValueError`` if the log density at ``z`` (``[..., d]``) is NaN or ``+inf``,
    has the wrong shape, cannot be evaluated, or has no gradient (see :meth:`Target.check`)."""
    z = np.asarray(z, dtype=target.dtype.as_numpy_dtype)
    d = target.event_size
    if z.ndim == 0 or z.shape[-1] != d:
        raise ValueError(f"{target.name}: points must have shape [..., {d}], got {z.shape}")
    z_tensor = tf.convert_to_tensor(z)
    try:
        with tf.GradientTape() as tape:
            tape.watch(z_tensor)
            lp_tensor = target.unnormalized_log_prob(z_tensor)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as err:
        raise ValueError(
            f"{target.name}: the log density failed at points of shape {z.shape} "
            f"(first point {_format_point(z.reshape(-1, d)[0])}): {err}"
        ) from err
    lp = np.asarray(lp_tensor)
    _check_shape(target.name, lp, z.shape)
    bad = np.isnan(lp) | (lp == np.inf)
    if bad.any():
        idx = np.unravel_index(int(np.argmax(bad)), lp.shape) if lp.ndim else ()
        value = lp[idx]
        what = "NaN" if np.isnan(value) else "+inf"
        raise ValueError(
            f"{target.name}: the log density is {what} at z = {_format_point(z[idx])}"
            f" ({int(bad.sum())} of {bad.size} points bad); -inf (outside the "
            "support) is allowed, NaN and +inf are not"
        )
    _check_gradient(target.name, tape.gradient(lp_tensor, z_tensor), lp)


def _check_shape(name: str, lp: np.ndarray, z_shape: tuple[int, ...]) -> None:
    expected = z_shape[:-1]
    if lp.shape == expected:
        return
    hint = ""
    if lp.shape == z_shape or (lp.ndim > len(expected)):
        hint = " (did log_prob_fn forget to sum over the event dimensions?)"
    elif lp.ndim < len(expected):
        hint = " (log_prob_fn must be batched: reduce over the event axes only)"
    raise ValueError(
        f"{name}: the log density has shape {lp.shape} for points of shape {z_shape}; expected {expected}{hint}"
    )


def _check_gradient(name: str, grad: tf.Tensor | None, lp: np.ndarray) -> None:
    """Raises when the density has no gradient: None, or zero at every point where it is finite.

    fit and sample follow the gradient; a density built from ops without one
    (tf.round, a cast to int, tf.stop_gradient, numpy) would otherwise train
    to garbage or leave the chains where they started, without an error.
    """
    finite = np.isfinite(lp)
    if grad is not None:
        g = np.asarray(grad)[finite]
        if g.size == 0 or not np.all(g == 0):
            return
        what = f"zero at all {int(finite.sum())} points checked"
    else:
        what = "missing (None: no differentiable path from z to log p)"
    raise ValueError(
        f"{name}: the gradient of the log density is {what}. fit and sample need "
        "gradients: write log_prob_fn with differentiable TensorFlow ops (tf.math, tfp); "
        "tf.round, casts to int, tf.stop_gradient and numpy have none. A density that is "
        "truly flat (a uniform on an interval) should be given a constraining_bijector "
        "(e.g. tfb.Sigmoid(low, high)) instead of -inf outside its support."
    )


def _trace_error(target: Any, shape: tuple[int, ...]) -> Exception | None:
    spec = tf.TensorSpec(shape, target.dtype)
    try:
        tf.function(target.unnormalized_log_prob, autograph=False).get_concrete_function(spec)
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported, with its text
        return err
    return None


def _format_point(z: np.ndarray, max_items: int = 12) -> str:
    z = np.asarray(z).reshape(-1)
    shown = ", ".join(f"{float(v):.6g}" for v in z[:max_items])
    if z.size > max_items:
        shown += f", ... ({z.size} values)"
    return f"[{shown}]"


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _looks_like_numpy(err: Exception) -> bool:
    text = str(err).lower()
    return "numpy" in text or "__array__" in text

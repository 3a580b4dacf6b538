"""Small shared helpers: seeds, dtypes and argument validation."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from threadpoolctl import threadpool_limits

__all__ = ["as_seed", "split_seed", "canonical_dtype", "check_positive_int", "one_blas_thread"]


# Ints below _INT32_LIMIT map to [0, seed], as they always have (every seeded
# stream and published figure depends on it); larger ints use the first
# element too, so the mapping stays one-to-one up to MAX_INT_SEED.
_INT32_LIMIT = 2**31 - 1
MAX_INT_SEED = 2**62 - 2


def _int_seed(seed: int) -> list[int]:
    if seed < 0 or seed > MAX_INT_SEED:
        raise ValueError(f"an int seed must lie in [0, 2**62 - 2], got {seed}")
    if seed < _INT32_LIMIT:
        return [0, seed]
    high, low = divmod(seed - _INT32_LIMIT, 2**31)
    return [high + 1, low]


def as_seed(seed: Any) -> tf.Tensor:
    """Turns an int, a pair of ints or a stateless seed tensor into a `[2]` int32 seed.

    Every function that draws takes a `seed`; the same seed always gives the
    same numbers because only stateless TF ops consume it. Distinct int seeds
    in ``[0, 2**62 - 2]`` give distinct stateless seeds (``n < 2**31 - 1`` maps
    to ``[0, n]``); a negative or larger int, a bool, a float or a string is a
    ``ValueError``.
    """
    if seed is None:
        raise ValueError("a seed is required (an int or a pair of ints); got None")
    if isinstance(seed, (bool, np.bool_)):
        raise ValueError(f"seed must be an int or a pair of ints, got {seed!r}")
    if isinstance(seed, (int, np.integer)):
        return tf.constant(_int_seed(int(seed)), dtype=tf.int32)
    if isinstance(seed, (str, bytes, float, np.floating)):
        raise ValueError(f"seed must be an int or a pair of ints, got {type(seed).__name__} {seed!r}")
    try:
        out = tfp.random.sanitize_seed(seed)
    except (TypeError, ValueError, tf.errors.InvalidArgumentError) as err:
        raise ValueError(f"seed must be an int or a pair of ints, got {seed!r}: {err}") from err
    if out.shape.rank is not None and out.shape.as_list() != [2]:
        raise ValueError(f"a seed tensor must have shape [2], got {seed!r}")
    return out


def split_seed(seed: Any, n: int = 2) -> list[tf.Tensor]:
    """Splits a seed into `n` independent stateless seeds."""
    return list(tf.unstack(tfp.random.split_seed(as_seed(seed), n=n)))


def canonical_dtype(dtype: Any) -> tf.DType:
    """Accepts tf/np dtypes or their names; only float32 and float64 are allowed."""
    try:
        d = tf.as_dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from err
    if d not in (tf.float32, tf.float64):
        raise ValueError(f"dtype must be float32 or float64, got {d.name}")
    return d


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Returns `int(value)` or raises `ValueError` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def stan_regularised(estimate: np.ndarray, n: int) -> np.ndarray:
    """Stan's regularisation of a windowed mass-matrix estimate from ``n`` draws.

    ``n / (n + 5) * estimate + 1e-3 * 5 / (n + 5)`` times the identity: a variance
    vector ``[d]`` or a covariance ``[d, d]``, pulled towards ``1e-3 I`` when
    the window is short.
    """
    estimate = np.asarray(estimate)
    floor = 1e-3 * (5.0 / (n + 5.0))
    if estimate.ndim == 2:
        return (n / (n + 5.0)) * estimate + floor * np.eye(estimate.shape[0])
    return (n / (n + 5.0)) * estimate + floor


def one_blas_thread(fn):
    """``fn`` with NumPy's and SciPy's BLAS on one thread (the caller's setting restored after).

    With TensorFlow loaded, OpenBLAS's own threads contend with TensorFlow's for
    the cores: SciPy's L-BFGS-B took 7 ms an iteration on a 5-D quadratic on
    this 2-core CPU, against 0.03 ms on one BLAS thread, and the whitening stage
    of kidiq 1.3-2.7 s against 0.9 s. The matrices here are at most ``d x d``,
    too small for BLAS's threads to pay.
    """

    @functools.wraps(fn)
    def on_one_thread(*args, **kwargs):
        with threadpool_limits(1, user_api="blas"):
            return fn(*args, **kwargs)

    return on_one_thread

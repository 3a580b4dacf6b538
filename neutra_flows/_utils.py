"""Small shared helpers: seeds, dtypes and argument validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

__all__ = ["as_seed", "split_seed", "canonical_dtype", "dtype_name", "check_positive_int"]


def as_seed(seed: Any) -> tf.Tensor:
    """Turns an int, a pair of ints or a stateless seed tensor into a `[2]` int32 seed.

    Every function that draws takes a `seed`; the same seed always gives the
    same numbers because only stateless TF ops consume it.
    """
    if seed is None:
        raise ValueError("a seed is required (an int or a pair of ints); got None")
    if isinstance(seed, (int, np.integer)):
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        return tf.constant([0, int(seed) % (2**31 - 1)], dtype=tf.int32)
    return tfp.random.sanitize_seed(seed)


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


def dtype_name(dtype: Any) -> str:
    return canonical_dtype(dtype).name


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Returns `int(value)` or raises `ValueError` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)

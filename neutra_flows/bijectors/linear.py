"""An invertible dense layer parameterised by its LU decomposition.

The vector analogue of Glow's invertible 1x1 convolution (Kingma and Dhariwal
2018): a learned linear mixing of all coordinates, cheap to invert and with a
log-determinant that costs O(d). Between coupling or autoregressive layers it
replaces (or follows) a fixed permutation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows._utils import canonical_dtype, check_positive_int
from neutra_flows.bijectors._core import VectorBijector

tfb = tfp.bijectors

__all__ = ["LULinear", "make_permutation"]

_PERMUTATIONS = ("identity", "reverse", "random")


def make_permutation(
    event_size: int, permutation: str | Sequence[int] = "identity", *, seed: int = 0
) -> np.ndarray:
    """Returns a permutation of `range(event_size)` as an int32 array.

    Args:
      event_size: `d`.
      permutation: `"identity"`, `"reverse"`, `"random"` (seeded by `seed`) or
        an explicit sequence holding each of `0 .. d-1` once.
      seed: the seed of a `"random"` permutation.
    """
    d = check_positive_int(event_size, "event_size")
    if isinstance(permutation, str):
        if permutation == "identity":
            return np.arange(d, dtype=np.int32)
        if permutation == "reverse":
            return np.arange(d - 1, -1, -1, dtype=np.int32)
        if permutation == "random":
            return np.random.default_rng(int(seed)).permutation(d).astype(np.int32)
        raise ValueError(
            f"permutation must be one of {_PERMUTATIONS} or a sequence of ints, got {permutation!r}"
        )
    perm = np.asarray(permutation)
    if perm.shape != (d,) or sorted(perm.tolist()) != list(range(d)):
        raise ValueError(f"permutation must hold each of 0..{d - 1} once, got {permutation!r}")
    return perm.astype(np.int32)


class LULinear(VectorBijector):
    r"""Invertible dense layer `y = P L U x + b` with a fixed permutation `P`.

    **Parameters.** One trainable `[d, d]` matrix `lower_upper = M` and a shift
    `b` (`[d]`): `L = I + strict_lower(M)` (unit lower triangular),
    `U = strict_upper(M) + diag(exp(diag(M)))` (upper triangular, positive
    diagonal), so `W = P L U` is invertible for every value of `M`. `P` is a
    fixed permutation (not trained). `M = 0, b = 0` at construction, so with the
    default identity permutation a fresh layer is exactly the identity; a
    `"reverse"` or `"random"` permutation makes it a fixed permutation at init.

    **Formulas.**

    * forward: `y = P L U x + b`;
    * inverse: `x = U^{-1} L^{-1} P^T (y - b)` by two triangular solves;
    * log-det: `log|det dy/dx| = sum_i M_ii`, the same at every `x`
      (`is_constant_jacobian`).

    **Cost** per event: forward O(d^2), inverse O(d^2) (closed form, no
    iteration), log-det O(d). Parameters: d^2 + d.

    **Shapes.** Event rank 1 (`[..., d]`), any batch shape; the layer itself
    has batch shape `[]`.

    **Composition.** `tfb.Chain([coupling_2, LULinear(d), coupling_1])` mixes
    all coordinates between two layers (`tfb.Chain` applies right to left).

    >>> import tensorflow as tf
    >>> layer = LULinear(3, dtype=tf.float64)
    >>> x = tf.constant([[1.0, -2.0, 0.5]], tf.float64)
    >>> bool(tf.reduce_all(layer.forward(x) == x))
    True
    >>> float(layer.forward_log_det_jacobian(x, event_ndims=1)[0])
    0.0

    References:
      D. P. Kingma and P. Dhariwal. Glow: Generative flow with invertible 1x1
      convolutions. NeurIPS 2018. arXiv:1807.03039.
    """

    _constant_jacobian = True

    def __init__(
        self,
        event_size: int,
        *,
        permutation: str | Sequence[int] = "identity",
        seed: int = 0,
        dtype: tf.DType = tf.float32,
        validate_args: bool = False,
        name: str = "lu_linear",
    ):
        """Builds the layer.

        Args:
          event_size: `d >= 1`.
          permutation: the fixed `P`: `"identity"` (default; identity at init),
            `"reverse"`, `"random"` or an explicit sequence, see
            :func:`make_permutation`.
          seed: seed of a `"random"` permutation.
          dtype: float32 or float64.
          validate_args: passed to `tfb.Bijector`.
          name: name scope of the variables.
        """
        parameters = dict(locals())
        d = check_positive_int(event_size, "event_size")
        dtype = canonical_dtype(dtype)
        perm = make_permutation(d, permutation, seed=seed)
        with tf.name_scope(name):
            self._event_size = d
            self._perm = tf.constant(perm)
            self._inverse_perm = tf.constant(np.argsort(perm).astype(np.int32))
            self.lower_upper = tf.Variable(tf.zeros([d, d], dtype), name="lower_upper")
            self.shift = tf.Variable(tf.zeros([d], dtype), name="shift")
            super().__init__(dtype=dtype, validate_args=validate_args, parameters=parameters, name=name)

    @property
    def event_size(self) -> int:
        return self._event_size

    @property
    def permutation(self) -> tf.Tensor:
        """The fixed permutation: `(P v)_i = v[permutation[i]]`."""
        return self._perm

    def _factors(self) -> tuple[tf.Tensor, tf.Tensor]:
        m = tf.convert_to_tensor(self.lower_upper)
        eye = tf.eye(self._event_size, dtype=m.dtype)
        lower = tf.linalg.band_part(m, -1, 0) - tf.linalg.band_part(m, 0, 0) + eye
        upper = tf.linalg.band_part(m, 0, -1) - tf.linalg.band_part(m, 0, 0)
        upper = upper + tf.linalg.diag(tf.exp(tf.linalg.diag_part(m)))
        return lower, upper

    def matrix(self) -> tf.Tensor:
        """The dense `W = P L U`, `[d, d]`."""
        lower, upper = self._factors()
        return tf.gather(tf.matmul(lower, upper), self._perm, axis=0)

    def _forward(self, x):
        lower, upper = self._factors()
        v = tf.einsum("...j,ij->...i", x, upper)
        v = tf.einsum("...j,ij->...i", v, lower)
        return tf.gather(v, self._perm, axis=-1) + self.shift

    def _inverse(self, y):
        lower, upper = self._factors()
        r = tf.gather(y - self.shift, self._inverse_perm, axis=-1)
        shape = tf.shape(r)
        # triangular_solve wants the right-hand sides as columns of one matrix,
        # so any batch shape is flattened into them.
        cols = tf.transpose(tf.reshape(r, [-1, self._event_size]))
        cols = tf.linalg.triangular_solve(lower, cols, lower=True)
        cols = tf.linalg.triangular_solve(upper, cols, lower=False)
        return tf.reshape(tf.transpose(cols), shape)

    def _forward_log_det_jacobian(self, x):
        ldj = tf.reduce_sum(tf.linalg.diag_part(self.lower_upper))
        return tf.broadcast_to(ldj, tf.shape(x)[:-1])

    def _inverse_log_det_jacobian(self, y):
        return -self._forward_log_det_jacobian(y)

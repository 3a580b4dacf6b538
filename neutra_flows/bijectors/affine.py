r"""Affine flows: the elementwise affine transformer and the affine baselines.

* `AffineTransformer` turns conditioner outputs into the elementwise map
  :math:`y = x e^{s} + m` used inside `MAF`, `IAF` and `RealNVP` (with a
  softly bounded log-scale :math:`s`).
* `AffineDiagonal` (mean-field Gaussian preconditioning) and
  `AffineLowerTriangular` (full-rank Gaussian) are the cheap baselines of the
  NeuTra paper; `Identity` is plain HMC/NUTS.

All three bijectors are the identity when their raw parameters are zero.

References:
  Hoffman, M., Sountsov, P., Dillon, J. V., Langmore, I., Tran, D. and
  Vasudevan, S. (2019). NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo
  Using Neural Transport. arXiv:1903.03704.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows.bijectors._core import Transformer, VectorBijector, as_parameter, broadcast_ldj

tfb = tfp.bijectors

__all__ = ["AffineDiagonal", "AffineLowerTriangular", "AffineTransformer", "Identity"]


class AffineTransformer(Transformer):
    r"""Elementwise affine transformer with a softly bounded log-scale.

    ``params[..., 0]`` is the shift :math:`m`, ``params[..., 1]`` the raw
    log-scale :math:`r`; the log-scale is :math:`s = c \tanh(r / c)` with
    :math:`c` = ``max_log_scale`` (:math:`s = r` when it is ``None``):

    * forward :math:`y = x e^{s} + m`, inverse :math:`x = (y - m) e^{-s}`;
    * log-det :math:`\log|dy/dx| = s` per element.

    The soft bound (slope 1 at 0, so zero parameters still give the identity
    exactly) keeps a layer's scale within :math:`e^{\pm c}`: a network whose
    raw output grows linearly far out in the tails can then not overflow
    ``exp``, so flows stay finite and invertible there (the soft clamp of
    Ardizzone et al. 2019).

    Args:
      max_log_scale: :math:`c > 0`, or ``None`` for the unbounded
        :math:`e^{r}` of the original IAF/MAF/Real NVP.

    Shapes: ``x`` ``[...]``, ``params`` ``[..., 2]``.

    References:
      Ardizzone, L., Lüth, C., Kruse, J., Rother, C. and Köthe, U. (2019).
      Guided Image Generation with Conditional Invertible Neural Networks.
      arXiv:1907.02392.
    """

    num_params: int = 2

    def __init__(self, max_log_scale: float | None = 5.0):
        if max_log_scale is not None and not max_log_scale > 0:
            raise ValueError(f"max_log_scale must be > 0 or None, got {max_log_scale!r}")
        self.max_log_scale = None if max_log_scale is None else float(max_log_scale)

    def _shift_and_log_scale(self, params: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        shift, raw = params[..., 0], params[..., 1]
        if self.max_log_scale is None:
            return shift, raw
        return shift, self.max_log_scale * tf.tanh(raw / self.max_log_scale)

    def forward(self, x: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        shift, log_scale = self._shift_and_log_scale(params)
        return x * tf.exp(log_scale) + shift

    def inverse(self, y: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        shift, log_scale = self._shift_and_log_scale(params)
        return (y - shift) * tf.exp(-log_scale)

    def forward_log_det(self, x: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        return self._shift_and_log_scale(params)[1] + tf.zeros_like(x)

    def inverse_log_det(self, y: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        return -self._shift_and_log_scale(params)[1] + tf.zeros_like(y)

    def __repr__(self) -> str:
        return f"AffineTransformer(max_log_scale={self.max_log_scale})"


class _ConstantAffine(VectorBijector):
    r"""Shared constructor of the affine baselines: a shift :math:`m` and one raw parameter tensor.

    A subclass names its raw parameter in ``_raw_name``: the constructor
    argument, its `_parameter_properties` entry and the attribute
    ``_<raw_name>`` that holds it (attribute names fix the order of
    `tf.Module.variables`, hence of saved weights). Both tensors are vectors,
    ``[..., k]``, in the raw parameter's dtype (float32 when it has none). The
    Jacobian is constant.
    """

    _constant_jacobian = True
    _raw_name: str

    def __init__(self, shift: Any, raw: Any, *, validate_args: bool, parameters: dict[str, Any], name: str):
        with tf.name_scope(name) as name:
            dtype = tf.as_dtype(getattr(raw, "dtype", None) or tf.float32)
            self._shift = as_parameter(shift, dtype, "shift")
            setattr(self, f"_{self._raw_name}", as_parameter(raw, dtype, self._raw_name))
            super().__init__(dtype=dtype, validate_args=validate_args, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return {
            "shift": tfp.util.ParameterProperties(event_ndims=1),
            cls._raw_name: tfp.util.ParameterProperties(event_ndims=1),
        }

    @property
    def shift(self):
        return self._shift


class AffineDiagonal(_ConstantAffine):
    r"""Diagonal affine flow :math:`z = u \odot e^{s} + m`.

    * forward :math:`z = u \odot e^{s} + m`; inverse :math:`u = (z - m) \odot e^{-s}`;
    * log-det :math:`\log|\det J| = \sum_i s_i` (constant).

    Both directions cost :math:`O(d)`. Zero parameters give the identity.

    Args:
      shift: :math:`m`, shape ``[..., d]`` (a `tf.Variable` to train it).
      log_scale: :math:`s`, shape ``[..., d]``.
      validate_args: check arguments at run time.
      name: name of the bijector.

    Inputs are ``[..., d]``; parameter batch dims broadcast against them.
    """

    _raw_name = "log_scale"

    def __init__(
        self, shift: Any, log_scale: Any, *, validate_args: bool = False, name: str = "affine_diagonal"
    ):
        super().__init__(shift, log_scale, validate_args=validate_args, parameters=dict(locals()), name=name)

    @property
    def log_scale(self):
        return self._log_scale

    def _forward(self, x):
        return x * tf.exp(self._log_scale) + self._shift

    def _inverse(self, y):
        return (y - self._shift) * tf.exp(-self._log_scale)

    def _forward_log_det_jacobian(self, x):
        return broadcast_ldj(tf.reduce_sum(self._log_scale, axis=-1), x)

    def _inverse_log_det_jacobian(self, y):
        return broadcast_ldj(-tf.reduce_sum(self._log_scale, axis=-1), y)


class AffineLowerTriangular(_ConstantAffine):
    r"""Full-rank affine flow :math:`z = L u + m` with lower-triangular :math:`L`.

    The raw vector :math:`r` (length :math:`d(d+1)/2`) fills a lower-triangular
    matrix :math:`R` row by row (`tfp.math.fill_triangular`); then
    :math:`L = \mathrm{tril}(R, -1) + \mathrm{diag}(e^{\mathrm{diag}(R)})`, so the
    diagonal is positive and :math:`r = 0` gives :math:`L = I`.

    * forward :math:`z = L u + m`, :math:`O(d^2)`;
    * inverse :math:`u = L^{-1}(z - m)` by a triangular solve, :math:`O(d^2)`;
    * log-det :math:`\log|\det J| = \sum_i R_{ii}` (constant).

    Args:
      shift: :math:`m`, shape ``[..., d]``.
      tril_params: :math:`r`, shape ``[..., d (d + 1) / 2]``.
      validate_args: check arguments at run time.
      name: name of the bijector.
    """

    _raw_name = "tril_params"

    def __init__(
        self,
        shift: Any,
        tril_params: Any,
        *,
        validate_args: bool = False,
        name: str = "affine_lower_triangular",
    ):
        super().__init__(shift, tril_params, validate_args=validate_args, parameters=dict(locals()), name=name)

    @property
    def tril_params(self):
        return self._tril_params

    def _raw_tril(self) -> tf.Tensor:
        return tfp.math.fill_triangular(tf.convert_to_tensor(self._tril_params))

    @property
    def scale_tril(self) -> tf.Tensor:
        """:math:`L`, shape ``[..., d, d]``."""
        raw = self._raw_tril()
        return tf.linalg.set_diag(raw, tf.exp(tf.linalg.diag_part(raw)))

    def _forward(self, x):
        return tf.linalg.matvec(self.scale_tril, x) + self._shift

    def _inverse(self, y):
        rhs = (y - self._shift)[..., tf.newaxis]
        return tf.linalg.triangular_solve(self.scale_tril, rhs, lower=True)[..., 0]

    def _forward_log_det_jacobian(self, x):
        return broadcast_ldj(tf.reduce_sum(tf.linalg.diag_part(self._raw_tril()), axis=-1), x)

    def _inverse_log_det_jacobian(self, y):
        return -self._forward_log_det_jacobian(y)


class Identity(VectorBijector):
    """The identity on vectors: :math:`z = u`, log-det 0 (plain HMC/NUTS).

    Unlike `tfb.Identity` it has ``forward_min_event_ndims = 1`` like every
    other flow here, and its log-det is shaped ``[...]`` for inputs ``[..., d]``.
    """

    _constant_jacobian = True

    def __init__(self, *, dtype: Any = None, validate_args: bool = False, name: str = "identity"):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            dtype = None if dtype is None else tf.as_dtype(dtype)
            super().__init__(dtype=dtype, validate_args=validate_args, parameters=parameters, name=name)

    def _forward(self, x):
        return tf.identity(x)

    def _inverse(self, y):
        return tf.identity(y)

    def _forward_log_det_jacobian(self, x):
        return tf.zeros_like(x[..., 0])

    def _inverse_log_det_jacobian(self, y):
        return tf.zeros_like(y[..., 0])

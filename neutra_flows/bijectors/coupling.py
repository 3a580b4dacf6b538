r"""Coupling flows: a generic `Coupling` layer and `RealNVP` (affine coupling).

Split :math:`x = (x_{1:m}, x_{m+1:d})`; the first block passes through and
parameterises an elementwise transformer of the second:

* forward :math:`y_{1:m} = x_{1:m}`,
  :math:`y_{m+1:d} = \tau(x_{m+1:d}; \theta(x_{1:m}))`;
* inverse :math:`x_{m+1:d} = \tau^{-1}(y_{m+1:d}; \theta(y_{1:m}))`;
* log-det :math:`\sum_{i>m} \log \tau'(x_i; \theta_i(x_{1:m}))`.

Every direction is one conditioner pass (parallel in :math:`d`). Stacks
alternate the blocks with permutations. With :math:`m = 0` (e.g. a 1-D event)
the conditioner sees an empty input and acts as a learned constant, so the
layer is a trainable elementwise map rather than a silent identity.

The conditioner maps ``[..., m] -> [..., d - m, num_params]`` (e.g.
`neutra_flows.nn.MLP`); the transformer is as in
`neutra_flows.bijectors.autoregressive`.

References:
  Dinh, L., Sohl-Dickstein, J. and Bengio, S. (2016). Density Estimation Using
  Real NVP. arXiv:1605.08803.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from neutra_flows._utils import check_positive_int
from neutra_flows.bijectors._core import ConditionedBijector, Transformer, check_event_size
from neutra_flows.bijectors.affine import AffineTransformer

__all__ = ["Coupling", "RealNVP"]


class Coupling(ConditionedBijector):
    r"""Coupling layer with any elementwise transformer (parallel both ways).

    Args:
      conditioner: network ``[..., num_masked] -> [..., d - num_masked, num_params]``.
      num_masked: :math:`m`, the size of the block that passes through (>= 0).
      transformer: elementwise transformer (default `AffineTransformer`).
      validate_args: check arguments at run time.
      name: name of the bijector (default ``"coupling"``).

    Inputs ``[..., d]`` with any batch shape; log-dets ``[...]``.
    """

    _default_name = "coupling"

    def __init__(
        self,
        conditioner: Callable[[tf.Tensor], tf.Tensor],
        *,
        num_masked: int,
        transformer: Transformer | None = None,
        validate_args: bool = False,
        name: str | None = None,
    ):
        parameters = dict(locals())
        self._num_masked = check_positive_int(num_masked, "num_masked", minimum=0)
        super().__init__(
            conditioner, transformer=transformer, validate_args=validate_args, parameters=parameters, name=name
        )

    @property
    def num_masked(self) -> int:
        return self._num_masked

    def _split(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(x0, params(x0), x1)``: the passive block, the parameters, the active block."""
        size = check_event_size(x, self._event_size, self.name)
        if self._num_masked >= size:
            raise ValueError(
                f"{self.name}: num_masked={self._num_masked} leaves nothing to transform for event size {size}"
            )
        x0, x1 = x[..., : self._num_masked], x[..., self._num_masked :]
        return x0, self._conditioner(x0), x1

    def _forward(self, x):
        x0, params, x1 = self._split(x)
        return tf.concat([x0, self._transformer.forward(x1, params)], axis=-1)

    def _inverse(self, y):
        y0, params, y1 = self._split(y)
        return tf.concat([y0, self._transformer.inverse(y1, params)], axis=-1)

    def _forward_log_det_jacobian(self, x):
        _, params, x1 = self._split(x)
        return tf.reduce_sum(self._transformer.forward_log_det(x1, params), axis=-1)

    def _inverse_log_det_jacobian(self, y):
        _, params, y1 = self._split(y)
        return tf.reduce_sum(self._transformer.inverse_log_det(y1, params), axis=-1)


class RealNVP(Coupling):
    r"""Affine coupling (Real NVP): :math:`y_{m+1:d} = x_{m+1:d} \odot e^{s(x_{1:m})} + t(x_{1:m})`.

    log-det :math:`\sum_{i>m} s_i(x_{1:m})`; forward and inverse are one
    conditioner pass each. Behaves like `tfb.RealNVP` with ``num_masked=m``,
    but takes an injected conditioner ``[..., m] -> [..., d - m, 2]`` and
    supports ``m = 0``.

    Args:
      conditioner: network ``[..., num_masked] -> [..., d - num_masked, 2]``.
      num_masked: :math:`m`, the size of the block that passes through.
      transformer: an `AffineTransformer` (default: ``AffineTransformer()``,
        log-scale softly bounded by 5; ``AffineTransformer(None)`` is the
        unbounded original).
      validate_args: check arguments at run time.
      name: name of the bijector (default ``"real_nvp"``).
    """

    _default_name = "real_nvp"

    def _make_transformer(self, transformer: Transformer | None) -> Transformer:
        transformer = super()._make_transformer(transformer)
        if not isinstance(transformer, AffineTransformer):
            raise ValueError(f"transformer must be an AffineTransformer, got {transformer!r}")
        return transformer

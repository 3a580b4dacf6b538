"""Private helpers shared by the flow bijectors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = [
    "ConditionedBijector",
    "Transformer",
    "TransformerBijector",
    "VectorBijector",
    "as_parameter",
    "broadcast_ldj",
    "check_event_size",
    "layer_dtype",
    "static_event_size",
]


def as_parameter(value: Any, dtype: tf.DType | None, name: str) -> Any:
    """Keeps variables (and other trackable tensors) as they are, converts the rest.

    Variables must stay variables so that `tf.Module` tracking lists them and
    every call reads their current value.
    """
    if isinstance(value, (tf.Variable, tfp.util.DeferredTensor)):
        return value
    return tf.convert_to_tensor(value, dtype=dtype, name=name)


def layer_dtype(module: Any) -> tf.DType | None:
    """The float dtype of a conditioner (Keras layers store it as a string)."""
    dtype = getattr(module, "dtype", None)
    return None if dtype is None else tf.as_dtype(dtype)


def static_event_size(x: tf.Tensor) -> int:
    """The static size of the last axis; flows need it to build their loops."""
    if x.shape.rank is not None and x.shape.rank < 1:
        raise ValueError(f"flow inputs need an event axis: shape [..., event_size], got {x.shape}")
    size = x.shape[-1] if x.shape.rank is not None else None
    if size is None:
        raise ValueError(f"the event size (last axis) must be known statically, got {x.shape}")
    return int(size)


def check_event_size(x: tf.Tensor, event_size: int | None, owner: str) -> int:
    """Raises a clear `ValueError` when `x` does not end in `event_size`."""
    size = static_event_size(x)
    if event_size is not None and size != event_size:
        raise ValueError(f"{owner} was built for event size {event_size}, got input shape {x.shape}")
    return size


def broadcast_ldj(ldj: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Gives a constant log-det the batch shape of `x` (event axis dropped).

    Constant-Jacobian layers return one value per parameter batch; broadcasting
    it keeps `forward_log_det_jacobian` shaped `[...]` like every other flow.
    """
    return ldj + tf.zeros_like(x[..., 0])


class Transformer:
    r"""Base class of elementwise transformers :math:`y = \tau(x; \theta)`.

    A transformer is a family of monotone increasing scalar bijections indexed
    by ``num_params`` raw parameters per element, equal to the identity when
    the raw parameters are zero. Flow layers (`IAF`, `MAF`, `Coupling`) get the
    parameters from a conditioner network and call the three methods below
    directly; ``transformer(params)`` wraps them as an elementwise TFP bijector.

    Shapes: ``x``/``y`` are ``[...]`` and ``params`` is ``[..., num_params]``
    with the same leading shape.
    """

    num_params: int

    def forward(self, x: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def inverse(self, y: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def forward_log_det(self, x: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        """:math:`\\log \\tau'(x; \\theta)`, elementwise."""
        raise NotImplementedError

    def inverse_log_det(self, y: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        """:math:`-\\log \\tau'(\\tau^{-1}(y; \\theta); \\theta)`, elementwise."""
        return -self.forward_log_det(self.inverse(y, params), params)

    def __call__(self, params: tf.Tensor) -> tfb.Bijector:
        return TransformerBijector(self, params)


class TransformerBijector(tfb.Bijector):
    """A `Transformer` with fixed parameters as an elementwise TFP bijector."""

    def __init__(self, transformer: Transformer, params: tf.Tensor, name: str = "transformer"):
        parameters = dict(locals())
        self._transformer = transformer
        self._params = params
        super().__init__(forward_min_event_ndims=0, dtype=params.dtype, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict()

    def _forward(self, x):
        return self._transformer.forward(x, self._params)

    def _inverse(self, y):
        return self._transformer.inverse(y, self._params)

    def _forward_log_det_jacobian(self, x):
        return self._transformer.forward_log_det(x, self._params)

    def _inverse_log_det_jacobian(self, y):
        return self._transformer.inverse_log_det(y, self._params)


class VectorBijector(tfb.Bijector):
    """Base of the flow layers: events are vectors, ``forward_min_event_ndims == 1``.

    It holds what every layer here passes to `tfb.Bijector` the same way. A
    layer whose log-det does not depend on its input sets
    ``_constant_jacobian = True``. By default a layer declares no parameters
    that TFP may batch-slice (its variables are its own, or its
    conditioner's); a layer with batched parameters (`AffineDiagonal`)
    overrides `_parameter_properties`.
    """

    _constant_jacobian: bool = False

    def __init__(self, *, dtype: tf.DType | None, validate_args: bool, parameters: dict[str, Any], name: str):
        super().__init__(
            forward_min_event_ndims=1,
            is_constant_jacobian=self._constant_jacobian,
            dtype=dtype,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict()


class ConditionedBijector(VectorBijector):
    """Shared machinery of the layers that feed a conditioner's output to a `Transformer`.

    `IAF`, `MAF`, `NAF`, `Coupling` and `RealNVP` hold a conditioner network
    (whose variables `tf.Module` tracking finds) and a transformer (affine by
    default, see `_make_transformer`); their dtype is the conditioner's. A
    subclass names its default ``name`` in ``_default_name``; ``parameters``
    (the subclass constructor's locals) records the name actually used.
    """

    _default_name: str

    def __init__(
        self,
        conditioner: Callable[[tf.Tensor], tf.Tensor],
        *,
        transformer: Transformer | None,
        validate_args: bool,
        parameters: dict[str, Any],
        name: str | None,
    ):
        name = self._default_name if name is None else name
        parameters = {**parameters, "name": name}
        self._conditioner = conditioner
        self._transformer = self._make_transformer(transformer)
        with tf.name_scope(name) as name:
            self._event_size = getattr(conditioner, "event_size", None)
            super().__init__(
                dtype=layer_dtype(conditioner), validate_args=validate_args, parameters=parameters, name=name
            )

    def _make_transformer(self, transformer: Transformer | None) -> Transformer:
        """The transformer to use (``None``: the default); subclasses add checks here."""
        # Imported here: affine.py imports this module.
        from neutra_flows.bijectors.affine import AffineTransformer

        return AffineTransformer() if transformer is None else transformer

    @property
    def conditioner(self) -> Callable[[tf.Tensor], tf.Tensor]:
        return self._conditioner

    @property
    def transformer(self) -> Transformer:
        return self._transformer

"""`Flow`: the named stack of layers that `make_flow` returns."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = ["Flow"]


class Flow(tfb.Composition):
    r"""A stack of flow layers, applied to the base draw in the order given.

    With layers :math:`f_1, \dots, f_L` (permutations included),

    * forward: :math:`z = f_L \circ \dots \circ f_1(u)`;
    * inverse: :math:`u = f_1^{-1} \circ \dots \circ f_L^{-1}(z)`;
    * log-det: :math:`\log|\det J_f(u)| = \sum_l \log|\det J_{f_l}(u_{l-1})|`
      with :math:`u_0 = u`, :math:`u_l = f_l(u_{l-1})`.

    Note the order: ``layers[0]`` acts first on ``u`` (the reverse of
    `tfb.Chain`, whose last bijector acts first).

    Shapes: events are vectors, ``[..., event_size] -> [..., event_size]``;
    log-dets are ``[...]`` (any batch shape broadcasts).

    Args:
      layers: bijectors with ``forward_min_event_ndims <= 1`` that preserve the
        event shape, in the order the forward pass applies them.
      flow_config: JSON-able ``{"name", "event_size", "dtype", "options"}`` from
        which ``make_flow(**flow_config)`` rebuilds this flow untrained; ``None``
        for hand-built stacks (which `save_flow` then refuses).
      exact_log_det: ``False`` when a layer's log-det is a stochastic estimate;
        samplers refuse such flows.
      validate_args: check arguments at run time (slower).
      name: name of the flow and of its ops.
    """

    def __init__(
        self,
        layers: Sequence[tfb.Bijector],
        *,
        flow_config: Mapping[str, Any] | None = None,
        exact_log_det: bool = True,
        validate_args: bool = False,
        name: str = "flow",
    ):
        parameters = dict(locals())
        layers = list(layers)
        if not layers:
            raise ValueError("a Flow needs at least one layer")
        for layer in layers:
            if not isinstance(layer, tfb.Bijector):
                raise ValueError(f"Flow layers must be tfb.Bijector instances, got {layer!r}")
        # A JSON string, not a dict: tf.Module would wrap a dict attribute in a
        # tracking proxy, and a string cannot be mutated by callers.
        self._flow_config_json = None if flow_config is None else json.dumps(dict(flow_config), sort_keys=True)
        self._exact_log_det = bool(exact_log_det)
        with tf.name_scope(name) as name:
            super().__init__(
                bijectors=layers,
                validate_args=validate_args,
                validate_event_size=False,
                parameters=parameters,
                name=name,
            )

    @property
    def flow_config(self) -> dict[str, Any] | None:
        """A fresh copy of the JSON-able configuration (``None`` if hand-built)."""
        if self._flow_config_json is None:
            return None
        return json.loads(self._flow_config_json)

    @property
    def exact_log_det(self) -> bool:
        """Whether ``forward_log_det_jacobian`` is exact (not a stochastic estimate)."""
        return self._exact_log_det

    @property
    def layers(self) -> list[tfb.Bijector]:
        """The layers in the order the forward pass applies them."""
        return list(self._bijectors)

    def _walk_forward(self, step_fn, x, **kwargs):
        for layer in self._bijectors:
            x = step_fn(layer, x, **kwargs.get(layer.name, {}))
        return x

    def _walk_inverse(self, step_fn, y, **kwargs):
        for layer in reversed(self._bijectors):
            y = step_fn(layer, y, **kwargs.get(layer.name, {}))
        return y

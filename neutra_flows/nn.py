r"""Conditioner networks for the flow bijectors, built with `tf_keras` (Keras 2).

* `MADE` maps ``x: [..., d]`` to ``params: [..., d, num_params]`` where row
  ``i`` depends on ``x[..., :i]`` only (the autoregressive property).
* `MLP` maps ``x: [..., m]`` to ``[..., *output_shape]`` (coupling layers).

Both create their weights at construction (the input size is known), accept
any batch shape, and zero-initialise their output layer, so the flow layer they
condition starts as the identity. Hidden layers use Glorot-uniform weights
drawn from explicit integer seeds, so the same seed gives the same network.

Keras 3 objects break TFP silently, hence `tf_keras` everywhere.

**Why not `tfb.AutoregressiveNetwork`.** TFP's MADE has the same output
layout, but it gives the hidden units other degrees (``"equal"``: sorted
blocks, ``ceil(k (d - 1) / (units + 1))``, where `made_masks` cycles through
``1..d-1``) and one kernel initializer for every layer, so neither a
zero-initialised output layer under Glorot hidden layers (a fresh flow is the
identity and can still learn) nor per-layer seeds can be had from it. Above
all, a saved flow's weights only mean the network they were trained in: with
other masks every `weights.npz` written so far would load into a different
flow.

References:
  Germain, M., Gregor, K., Murray, I. and Larochelle, H. (2015). MADE: Masked
  Autoencoder for Distribution Estimation. arXiv:1502.03509.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from neutra_flows._utils import canonical_dtype, check_positive_int

__all__ = ["MADE", "MLP", "made_masks"]


def _check_hidden_units(hidden_units: Sequence[int]) -> list[int]:
    if isinstance(hidden_units, (str, bytes)) or not isinstance(hidden_units, Sequence):
        raise ValueError(f"hidden_units must be a non-empty list of ints, got {hidden_units!r}")
    units = [check_positive_int(h, "each hidden_units entry") for h in hidden_units]
    if not units:
        raise ValueError("hidden_units must be a non-empty list of ints, got []")
    return units


def _layer_seeds(seed: int, count: int) -> list[int]:
    state = np.random.SeedSequence([check_positive_int(seed, "seed", minimum=0), 0x4D414445])
    return [int(s) % (2**31 - 1) for s in state.generate_state(max(count, 1))]


def made_masks(event_size: int, num_params: int, hidden_units: Sequence[int]) -> list[np.ndarray]:
    """The MADE connectivity masks, one ``[fan_in, fan_out]`` 0/1 array per layer.

    Inputs have degrees ``1..d``; hidden units get degrees cycling through
    ``1..d-1`` (all 0 when ``d == 1``); a hidden unit sees inputs of degree
    ``<=`` its own; output ``(i, p)`` (column ``i * num_params + p``) sees hidden
    units of degree ``< i + 1``. So ``params[..., i, :]`` depends on
    ``x[..., :i]`` only, and for ``d == 1`` the output is a learned constant.
    """
    degrees = [np.arange(1, event_size + 1)]
    for units in hidden_units:
        degrees.append(np.arange(units) % max(1, event_size - 1) + min(1, event_size - 1))
    masks = [(d_out[None, :] >= d_in[:, None]) for d_in, d_out in zip(degrees[:-1], degrees[1:], strict=True)]
    out_degrees = np.repeat(np.arange(1, event_size + 1), num_params)
    masks.append(out_degrees[None, :] > degrees[-1][:, None])
    return [m.astype(np.float64) for m in masks]


def _flatten_batch(x: tf.Tensor, size: int) -> tf.Tensor:
    """``[..., size] -> [N, size]`` (a no-op for rank-2 inputs)."""
    if x.shape.rank == 2:
        return x
    return tf.reshape(x, [-1, size])


def _output_shape(like: tf.Tensor, trailing: Sequence[int]) -> list[int] | tf.Tensor:
    """``[*like.shape[:-1], *trailing]``, as Python ints when known statically."""
    batch = like.shape[:-1]
    # Static shapes (always the case eagerly) avoid shape ops on every call.
    if batch.is_fully_defined():
        return [*batch.as_list(), *trailing]
    return tf.concat([tf.shape(like)[:-1], trailing], axis=0)


def _unflatten_batch(h: tf.Tensor, like: tf.Tensor, trailing: Sequence[int]) -> tf.Tensor:
    """``[N, prod(trailing)] -> [*like.shape[:-1], *trailing]``."""
    out = tf.reshape(h, _output_shape(like, trailing))
    out.set_shape(like.shape[:-1].concatenate(trailing))
    return out


class _Dense(tf_keras.layers.Layer):
    """Shared machinery: a stack of (optionally masked) dense layers on ``[N, fan_in]``."""

    def __init__(
        self, hidden_units: Sequence[int], activation: str, seed: int, *, dtype: Any, name: str | None, **kwargs
    ):
        super().__init__(dtype=canonical_dtype(dtype), name=name, **kwargs)
        self.hidden_units = _check_hidden_units(hidden_units)
        self.activation = activation
        self.seed = seed
        self._activation_fn = tf_keras.activations.get(activation)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(hidden_units=list(self.hidden_units), activation=self.activation, seed=self.seed)
        return config

    def _make_weights(self, sizes: list[int], *, seed: int) -> None:
        seeds = _layer_seeds(seed, len(sizes) - 1)
        self._kernels, self._biases = [], []
        last = len(sizes) - 2
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            # Zero output layer: the flow layer starts as the identity exactly.
            kernel_init = (
                tf_keras.initializers.Zeros()
                if i == last
                else tf_keras.initializers.GlorotUniform(seed=seeds[i])
            )
            self._kernels.append(
                self.add_weight(
                    name=f"kernel_{i}", shape=(fan_in, fan_out), initializer=kernel_init, trainable=True
                )
            )
            self._biases.append(
                self.add_weight(
                    name=f"bias_{i}",
                    shape=(fan_out,),
                    initializer=tf_keras.initializers.Zeros(),
                    trainable=True,
                )
            )
        self.built = True

    def _run(self, h: tf.Tensor, masks: tuple | None) -> tf.Tensor:
        last = len(self._kernels) - 1
        for i, (kernel, bias) in enumerate(zip(self._kernels, self._biases, strict=True)):
            if masks is not None:
                kernel = kernel * tf.cast(masks[i], kernel.dtype)
            h = tf.matmul(h, kernel) + bias
            if i < last:
                h = self._activation_fn(h)
        return h


class MADE(_Dense):
    r"""Masked autoencoder: ``x [..., d] -> params [..., d, num_params]``.

    For layers :math:`h_0 = x`, :math:`h_{k+1} = a((W_k \odot M_k) h_k + b_k)`
    and a linear, zero-initialised output layer, the masks :math:`M_k`
    (`made_masks`) make ``params[..., i, :]`` a function of ``x[..., :i]``.

    Args:
      event_size: ``d``, the size of the input and the number of output rows.
      num_params: parameters per dimension (2 for affine, ``3K - 1`` for a
        ``K``-bin spline).
      hidden_units: widths of the hidden layers, e.g. ``[32, 32]``.
      activation: a `tf_keras.activations` name, e.g. ``"elu"``.
      seed: integer seed of the hidden-layer initialisation.
      dtype: float32 or float64.
      name: Keras layer name.
    """

    def __init__(
        self,
        event_size: int,
        num_params: int,
        *,
        hidden_units: Sequence[int],
        activation: str = "elu",
        seed: int = 0,
        dtype: Any = tf.float32,
        name: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(hidden_units, activation, seed, dtype=dtype, name=name, **kwargs)
        self.event_size = check_positive_int(event_size, "event_size")
        self.num_params = check_positive_int(num_params, "num_params")
        masks = made_masks(self.event_size, self.num_params, self.hidden_units)
        # Converted once: a flow's sequential direction calls the network d times.
        self._masks = tuple(tf.constant(m, dtype=self.dtype) if tf.executing_eagerly() else m for m in masks)
        sizes = [self.event_size, *self.hidden_units, self.event_size * self.num_params]
        self._make_weights(sizes, seed=seed)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        h = self._run(_flatten_batch(x, self.event_size), self._masks)
        return _unflatten_batch(h, x, [self.event_size, self.num_params])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(event_size=self.event_size, num_params=self.num_params)
        return config


class MLP(_Dense):
    """Dense network ``x [..., input_size] -> [..., *output_shape]`` for coupling layers.

    With ``input_size == 0`` (a coupling layer on a 1-D event has nothing to
    condition on) the network is a single learned constant: the output bias,
    broadcast to the batch shape. The output layer starts at zero.

    Args:
      input_size: size of the last input axis (may be 0).
      output_shape: trailing output shape, e.g. ``(d - m, num_params)``.
      hidden_units: widths of the hidden layers.
      activation: a `tf_keras.activations` name.
      seed: integer seed of the hidden-layer initialisation.
      dtype: float32 or float64.
      name: Keras layer name.
    """

    def __init__(
        self,
        input_size: int,
        output_shape: Sequence[int],
        *,
        hidden_units: Sequence[int],
        activation: str = "elu",
        seed: int = 0,
        dtype: Any = tf.float32,
        name: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(hidden_units, activation, seed, dtype=dtype, name=name, **kwargs)
        self.input_size = check_positive_int(input_size, "input_size", minimum=0)
        self.target_shape = [check_positive_int(s, "output_shape entry") for s in output_shape]
        num_out = int(np.prod(self.target_shape))
        if self.input_size > 0:
            self._make_weights([self.input_size, *self.hidden_units, num_out], seed=seed)
        else:
            self._kernels = []
            self._biases = [
                self.add_weight(
                    name="bias_0",
                    shape=(num_out,),
                    initializer=tf_keras.initializers.Zeros(),
                    trainable=True,
                )
            ]
            self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        if self.input_size == 0:
            constant = tf.reshape(self._biases[-1], self.target_shape)
            out = tf.broadcast_to(constant, _output_shape(x, self.target_shape))
            out.set_shape(x.shape[:-1].concatenate(self.target_shape))
            return out
        h = self._run(_flatten_batch(x, self.input_size), None)
        return _unflatten_batch(h, x, self.target_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(input_size=self.input_size, output_shape=list(self.target_shape))
        return config

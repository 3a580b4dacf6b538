"""The layout of a target's variables: one flat vector in ``R^d`` <-> the user's named values.

Every algorithm works on one flat unconstrained vector ``z`` of shape ``[..., d]``;
the user's log density takes its own value: one array of shape ``event_shape``, or
a structure (dict, list, namedtuple) of arrays. A :class:`Layout` holds the
bijector between the two (the user's constraining bijector, then reshapes) and
the names under which draws are handed back:

* one array: ``z -> c(reshape(z, unconstrained_shape))``, one variable (default
  name ``"x"``) or, for a vector event, one scalar variable per coordinate;
* a structure: ``z`` is split into one block per variable, each reshaped to its
  unconstrained shape, restructured and passed through the joint constraining
  bijector, so ``z = concat([flatten(c_k^{-1}(x_k)) for k])`` in ``tf.nest``
  order (dict keys sorted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows._utils import canonical_dtype

tfb = tfp.bijectors


@dataclasses.dataclass(frozen=True)
class Layout:
    """The map between flat ``[..., d]`` and the user's value, and the variables' names.

    Attributes:
      bijector: flat ``[..., d]`` to the user's (constrained) value; ``None`` for
        the identity.
      event_size: ``d``.
      names: one name per variable, in the order of the flat vector.
      event_shapes: ``{name: shape}`` of each variable in the constrained space.
      structure: the (dtype) structure of the user's value; ``None`` for one array.
      split: for one vector, whether each coordinate is a variable of its own.
    """

    bijector: tfb.Bijector | None
    event_size: int
    names: tuple[str, ...]
    event_shapes: dict[str, tuple[int, ...]]
    structure: Any = None
    split: bool = False

    def leaves(self, value: Any) -> list[Any]:
        """The user's value to one leaf per name."""
        if self.structure is not None:
            return tf.nest.flatten(value)
        return list(tf.unstack(value, axis=-1)) if self.split else [value]

    def pack(self, leaves: Sequence[Any]) -> Any:
        """The inverse of :meth:`leaves`."""
        if self.structure is not None:
            return tf.nest.pack_sequence_as(self.structure, list(leaves))
        return tf.stack(leaves, axis=-1) if self.split else leaves[0]

    def named_values(self, value: Any, what: str, dtype: tf.DType) -> dict[str, np.ndarray] | None:
        """``value`` (a dict keyed by name or one value in the user's structure) as ``{name: array}``.

        Raises ``ValueError`` for other keys or a variable of the wrong shape.
        """
        if value is None:
            return None
        np_dtype = dtype.as_numpy_dtype
        if isinstance(value, Mapping) and set(value) == set(self.names):
            out = {k: np.asarray(value[k], dtype=np_dtype) for k in self.names}
        elif isinstance(value, Mapping):
            raise ValueError(f"{what} must have the keys {sorted(self.names)}, got {sorted(value)}")
        else:
            try:
                leaves = self.leaves(tf.nest.map_structure(np.asarray, value))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{what} must be a dict keyed by {list(self.names)} or one array per "
                    f"the event structure; got {value!r}"
                ) from err
            out = {k: np.asarray(leaf, dtype=np_dtype) for k, leaf in zip(self.names, leaves, strict=True)}
        for k in self.names:
            if out[k].shape != self.event_shapes[k]:
                raise ValueError(f"{what}[{k!r}] must have shape {self.event_shapes[k]}, got {out[k].shape}")
        return out


def common_dtype(dtype: Any) -> tf.DType:
    """The one floating dtype of ``dtype`` (a dtype, or a structure of equal dtypes)."""
    dtypes = {canonical_dtype(d) for d in tf.nest.flatten(dtype)}
    if len(dtypes) != 1:
        raise ValueError(f"all latent variables must share one float dtype, got {dtypes}")
    return dtypes.pop()


def make_layout(event_shape: Any, dtype: Any, constraining_bijector: tfb.Bijector | None, names: Any) -> Layout:
    """The layout of one array (``dtype`` a dtype) or of a structure (``dtype`` a structure of dtypes)."""
    if tf.nest.is_nested(dtype):
        layout = _structure_layout(event_shape, dtype, constraining_bijector, names)
    else:
        layout = _array_layout(event_shape, constraining_bijector, names)
    if layout.event_size < 1:
        raise ValueError(f"the unconstrained space must have size >= 1, got {layout.event_size}")
    return layout


def variable_names(structure: Any, resolve: Callable[[], Sequence[str] | None] | None = None) -> list[str]:
    """Default names for the leaves of ``structure``: dict keys (sorted), namedtuple fields,
    ``resolve()`` when those do not name every leaf, else ``x0, x1, ...``."""
    n = len(tf.nest.flatten(structure))
    if isinstance(structure, Mapping):
        return [str(k) for k in sorted(structure)] if n == len(structure) else _fallback(n)
    fields = getattr(structure, "_fields", None)
    if fields is not None and len(fields) == n:
        return [str(f) for f in fields]
    resolved = resolve() if resolve is not None else None
    if resolved is not None and len(resolved) == n and len(set(resolved)) == n:
        return [str(r) for r in resolved]
    return _fallback(n)


def _fallback(n: int) -> list[str]:
    return [f"x{i}" for i in range(n)]


def _as_shape(event_shape: Any) -> tuple[int, ...]:
    if isinstance(event_shape, (int, np.integer)) and not isinstance(event_shape, bool):
        shape = (int(event_shape),)
    else:
        try:
            shape = tuple(tf.TensorShape(event_shape).as_list())
        except (TypeError, ValueError) as err:
            raise ValueError(f"event_shape must be an int or a sequence of ints, got {event_shape!r}") from err
    if len(shape) == 0:
        raise ValueError(
            "event_shape must have at least one dimension; use event_shape=1 (or [1]) for a scalar variable"
        )
    if any(s is None or s < 1 for s in shape):
        raise ValueError(f"event_shape must be fully known and positive, got {shape}")
    return shape


def _check_bijector(bijector: Any) -> None:
    if bijector is not None and not isinstance(bijector, tfb.Bijector):
        raise ValueError(
            f"constraining_bijector must be a tfp.bijectors.Bijector or None, got {type(bijector).__name__}"
        )


def _unique_names(names: Any, default: Sequence[str]) -> tuple[str, ...]:
    if names is None:
        out = tuple(default)
    elif isinstance(names, str):
        out = (names,)
    else:
        out = tuple(str(n) for n in names)
    if len(set(out)) != len(out):
        raise ValueError(f"names must be unique, got {out}")
    return out


def _array_layout(event_shape: Any, constraining_bijector: tfb.Bijector | None, names: Any) -> Layout:
    shape = _as_shape(event_shape)
    _check_bijector(constraining_bijector)
    if constraining_bijector is None:
        unconstrained = shape
    else:
        unconstrained = tuple(tf.TensorShape(constraining_bijector.inverse_event_shape(shape)).as_list())
    d = int(np.prod(unconstrained))
    parts = [] if constraining_bijector is None else [constraining_bijector]
    if len(unconstrained) != 1:
        parts.append(tfb.Reshape(event_shape_out=unconstrained, event_shape_in=[d]))
    bijector = None if not parts else (parts[0] if len(parts) == 1 else tfb.Chain(parts))
    names_t = _unique_names(names, ("x",))
    if len(names_t) == 1:
        return Layout(bijector, d, names_t, {names_t[0]: shape})
    if len(shape) == 1 and len(names_t) == shape[0]:
        return Layout(bijector, d, names_t, {n: () for n in names_t}, split=True)
    raise ValueError(
        f"names must be one name or one per coordinate of a vector event "
        f"(event_shape={shape}); got {len(names_t)} names"
    )


def _structure_layout(
    event_shape: Any, structure: Any, constraining_bijector: tfb.Bijector | None, names: Any
) -> Layout:
    _check_bijector(constraining_bijector)
    if constraining_bijector is None:
        constraining_bijector = tfb.JointMap(tf.nest.map_structure(lambda _: tfb.Identity(), structure))
    names_t = _unique_names(names, variable_names(structure))
    n = len(tf.nest.flatten(structure))
    if len(names_t) != n:
        raise ValueError(f"names must give one name per variable ({n}), got {len(names_t)}")
    # TensorShape is a leaf for tf.nest; map it through the dtype structure.
    constrained = [tuple(tf.TensorShape(s).as_list()) for s in _flatten_up_to(structure, event_shape)]
    unconstrained = [
        tuple(tf.TensorShape(s).as_list())
        for s in _flatten_up_to(structure, constraining_bijector.inverse_event_shape(event_shape))
    ]
    for name, s in zip(names_t, unconstrained, strict=True):
        if any(v is None for v in s):
            raise ValueError(f"the shape of {name!r} must be fully known, got {s}")
    sizes = [int(np.prod(s)) for s in unconstrained]
    index_struct = tf.nest.pack_sequence_as(structure, list(range(len(sizes))))
    reshapes = [
        tfb.Reshape(event_shape_out=s, event_shape_in=[k]) for s, k in zip(unconstrained, sizes, strict=True)
    ]
    bijector = tfb.Chain(
        [constraining_bijector, tfb.Restructure(index_struct), tfb.JointMap(reshapes), tfb.Split(sizes)]
    )
    event_shapes = dict(zip(names_t, constrained, strict=True))
    return Layout(bijector, sum(sizes), names_t, event_shapes, structure=structure)


def _flatten_up_to(structure: Any, value: Any) -> list[Any]:
    """Flattens `value` only as deep as `structure` (its leaves may be lists, shapes)."""
    if isinstance(structure, Mapping):
        return [x for k in sorted(structure) for x in _flatten_up_to(structure[k], value[k])]
    if isinstance(structure, (list, tuple)):
        if len(structure) != len(value):
            raise ValueError(f"structure mismatch: {structure} vs {value}")
        return [x for s, v in zip(structure, value, strict=True) for x in _flatten_up_to(s, v)]
    return [value]

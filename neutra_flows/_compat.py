"""Compatibility shims for the pinned stack, applied once when neutra_flows is imported.

TFP 0.25's ``tfb.Pad`` (used by ``tfb.SoftmaxCentered``, hence by every simplex
variable: a ``Dirichlet`` in a ``JointDistribution``, a ``Multinomial``'s
probabilities, ...) calls ``np.reshape(x, newshape=...)``. NumPy 2.1 deprecated
that keyword and NumPy 2.4 removed it, so building the bijector raises
``TypeError: reshape() got an unexpected keyword argument 'newshape'``.
TensorFlow 2.21 itself asks only for ``numpy>=1.26`` and works with 2.4, so an
upper bound on numpy would be the wrong fix. Instead the ``np`` name *inside
TFP's pad module only* is pointed at a thin proxy of NumPy whose ``reshape``
also accepts ``newshape``; NumPy itself and every other module are untouched.
Nothing is patched when the installed NumPy still takes the keyword.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import numpy as np

__all__ = ["apply"]


def _reshape_accepts_newshape() -> bool:
    try:
        return "newshape" in inspect.signature(np.reshape).parameters
    except (TypeError, ValueError):
        return True


def _reshape(a: Any, shape: Any = None, *args: Any, newshape: Any = None, **kwargs: Any) -> np.ndarray:
    return np.reshape(a, newshape if shape is None else shape, *args, **kwargs)


class _NumpyProxy(types.ModuleType):
    """NumPy, except that ``reshape`` still takes the removed ``newshape`` keyword."""

    reshape = staticmethod(_reshape)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _patch_tfp_pad() -> None:
    from tensorflow_probability.python.bijectors import pad as pad_lib

    if not isinstance(pad_lib.np, _NumpyProxy):
        pad_lib.np = _NumpyProxy("numpy")


def apply() -> None:
    """Applies the shims this NumPy needs (idempotent)."""
    if not _reshape_accepts_newshape():
        _patch_tfp_pad()

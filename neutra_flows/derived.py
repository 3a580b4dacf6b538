"""Derived quantities: functions of the draws whose posterior is known, such as
``inference_gym``'s sample transformations.

A benchmark's truth is often not of the sampled variables themselves: the
stochastic-volatility models of ``inference_gym`` sample a non-centred
log-volatility and know the moments of the centred one; the Brownian-motion
models sample ``x_0 ... x_29`` and know a ``locs`` vector. A
:class:`DerivedQuantity` carries the function and its truth (mean, standard
deviation, and the truth's own Monte Carlo standard error). ``sample`` applies
it to the draws and stores the result as the InferenceData group
``derived_posterior``; ``compare`` checks that group against the truth, with
the truth's error in the bias test (``|mean - truth| / sqrt(MCSE^2 + SE^2)``).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from neutra_flows import _layout

__all__ = ["DerivedQuantity", "named_leaves"]

#: The InferenceData group ``sample`` stores derived draws in.
GROUP = "derived_posterior"
# Draws per call of the function (bounded memory for long runs of big models).
_CHUNK = 4096


def named_leaves(value: Any, single: str = "x") -> dict[str, Any]:
    """A structure (dict, namedtuple, list) as ``{name: leaf}``; one array as ``{single: value}``.

    Names as the target's own variables get them: dict keys (sorted, as
    ``tf.nest`` orders them), namedtuple fields, else ``x0, x1, ...``.
    """
    if not tf.nest.is_nested(value):
        return {single: value}
    return dict(zip(_layout.variable_names(value), tf.nest.flatten(value), strict=True))


@dataclasses.dataclass(frozen=True)
class DerivedQuantity:
    """A function of the target's constrained value, with the truth of its posterior.

    Attributes:
      fn: the target's constrained value (what its ``log_prob_fn`` receives,
        batched ``[n, ...]``) to a structure of arrays ``[n, *shape]``.
      name: what the quantity is (for messages), e.g. ``"identity"``.
      shapes: ``{name: shape}`` of one draw of each output.
      ground_truth_mean, ground_truth_std, ground_truth_mean_se: ``{name: array}``
        (any of them None); a name missing from one is simply not checked.
    """

    fn: Callable[[Any], Any]
    name: str
    shapes: dict[str, tuple[int, ...]]
    ground_truth_mean: dict[str, np.ndarray] | None = None
    ground_truth_std: dict[str, np.ndarray] | None = None
    ground_truth_mean_se: dict[str, np.ndarray] | None = None

    @classmethod
    def build(cls, fn: Callable[[Any], Any], example: Any, *, name: str, mean: Any = None, std: Any = None,
              mean_se: Any = None, owner: str = "target") -> DerivedQuantity:
        """Evaluates ``fn`` on ``example`` (a batch of constrained values) for the shapes and
        matches each part of the truth to them; a part that does not match is dropped
        with a ``UserWarning`` that says why."""
        out = named_leaves(fn(example))
        shapes = {k: tuple(np.shape(v))[1:] for k, v in out.items()}
        parts = {}
        for what, value in (("mean", mean), ("standard deviation", std), ("mean's standard error", mean_se)):
            parts[what] = _matched(value, shapes, f"{owner}'s {name} transformation: the truth's {what}")
        return cls(fn=fn, name=name, shapes=shapes, ground_truth_mean=parts["mean"],
                   ground_truth_std=parts["standard deviation"],
                   ground_truth_mean_se=parts["mean's standard error"])

    @property
    def has_truth(self) -> bool:
        return self.ground_truth_mean is not None or self.ground_truth_std is not None

    def draws(self, target: Any, z: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: [chain, draw, *shape]}`` of the quantity at unconstrained draws ``z [chain, draw, d]``."""
        z = np.asarray(z)
        lead, d = z.shape[:-1], z.shape[-1]
        flat = z.reshape(-1, d)
        pieces: dict[str, list[np.ndarray]] = {k: [] for k in self.shapes}
        for start in range(0, flat.shape[0], _CHUNK):
            out = named_leaves(self.fn(target.constrain(flat[start:start + _CHUNK])))
            for k in self.shapes:
                pieces[k].append(np.asarray(out[k], np.float64))
        return {k: np.concatenate(v).reshape(lead + self.shapes[k]) for k, v in pieces.items()}

    def truth_json(self) -> str:
        """The truth as JSON (the attrs ``derived_ground_truth``), read back by ``compare``."""
        return truth_json(self.ground_truth_mean, self.ground_truth_std, self.ground_truth_mean_se,
                          name=self.name)


def truth_json(mean: Mapping | None, std: Mapping | None, mean_se: Mapping | None = None, **extra: Any) -> str:
    """``{name: array}`` truths as the JSON ``sample`` writes to the attrs (``mean_se`` only where known)."""

    def listify(part):
        return None if part is None else {k: np.asarray(v, np.float64).tolist() for k, v in part.items()}

    truth = {**extra, "mean": listify(mean), "std": listify(std)}
    if mean_se is not None:
        truth["mean_se"] = listify(mean_se)
    return json.dumps(truth)


def _matched(value: Any, shapes: Mapping[str, tuple[int, ...]], what: str) -> dict[str, np.ndarray] | None:
    """``value`` as ``{name: array}`` for the outputs it matches in shape; None (and a warning) if none."""
    if value is None:
        return None
    try:
        given = {k: np.asarray(v, np.float64) for k, v in named_leaves(value).items()}
    except (TypeError, ValueError) as err:
        warnings.warn(f"{what} could not be read ({err}); it is dropped", UserWarning, stacklevel=4)
        return None
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes.values()]
    if len(shapes) > 1 and len(given) == 1 and next(iter(given.values())).size == sum(sizes):
        # One array for a structure of outputs (inference_gym stacks a structured
        # truth): its entries follow the outputs in tf.nest order, as ``shapes`` does.
        flat = next(iter(given.values())).reshape(-1)
        pieces = np.split(flat, np.cumsum(sizes)[:-1])
        return {k: piece.reshape(shape) for (k, shape), piece in zip(shapes.items(), pieces, strict=True)}
    kept, skipped = {}, []
    for k, shape in shapes.items():
        if k in given and given[k].shape == shape:
            kept[k] = given[k]
        elif k in given:
            skipped.append(f"{k} has shape {given[k].shape}, the quantity {shape}")
    missing = sorted(set(given) - set(shapes))
    if missing:
        skipped.append(f"{missing} name no output of the transformation {sorted(shapes)}")
    if skipped:
        warnings.warn(f"{what} does not match the quantity: " + "; ".join(skipped)
                      + ("; those parts are dropped" if kept else "; it is dropped: no truth is checked"),
                      UserWarning, stacklevel=4)
    return kept or None

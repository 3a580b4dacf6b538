"""The TFP team's benchmark models (``inference_gym``) of 25 to 2519 parameters, with Stan truths.

``pip install "neutra-flows[gym]"`` adds ``inference_gym``; the core package
never needs it. :data:`GYM_MODELS` lists those that need no download: the gym's
synthetic-data and bundled-data models, through
:meth:`~neutra_flows.Target.from_inference_gym`, and its two German credit
numeric regressions, which the gym loads with TensorFlow Datasets and which are
built here from the data the package ships
(:func:`~neutra_flows.models.german_credit.german_credit_numeric_regression`,
so they need no extra at all).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from neutra_flows.targets import Target

__all__ = ["GYM_LARGE_MODELS", "GYM_MODELS", "load_gym"]


def _german_credit(link: str) -> Callable[[], Target]:
    def build() -> Target:
        from neutra_flows.models.german_credit import german_credit_numeric_regression

        return german_credit_numeric_regression(link)

    return build


#: ``{name: unconstrained dimension}`` of the gym suite's models, by their gym class names.
GYM_MODELS: dict[str, int] = {
    "GermanCreditNumericLogisticRegression": 25,
    "GermanCreditNumericProbitRegression": 25,
    "BrownianMotionMissingMiddleObservations": 30,
    "ConvectionLorenzBridge": 90,
    "SyntheticLogGaussianCoxProcess": 102,
    "VectorizedStochasticVolatilitySP500Small": 103,
    "SyntheticItemResponseTheory": 501,
    "VectorizedStochasticVolatilitySP500": 2519,
}
#: Models left out of the default gym suite (``suite --gym-large`` adds them): too slow for a default run.
GYM_LARGE_MODELS: tuple[str, ...] = ("VectorizedStochasticVolatilitySP500",)

_BUILT_HERE: dict[str, Callable[[], Target]] = {
    "GermanCreditNumericLogisticRegression": _german_credit("logistic"),
    "GermanCreditNumericProbitRegression": _german_credit("probit"),
}


def load_gym(name: str) -> Target:
    """The gym model ``name`` (a key of :data:`GYM_MODELS`) as a :class:`~neutra_flows.Target`.

    Raises:
      ValueError: an unknown name, or ``inference_gym`` is not installed (the
        message says how to install it).
    """
    if name not in GYM_MODELS:
        raise ValueError(f"unknown gym model {name!r}; choose from {sorted(GYM_MODELS)}")
    if name in _BUILT_HERE:
        return _BUILT_HERE[name]()
    return Target.from_inference_gym(getattr(_gym().targets, name)())


def _gym() -> Any:
    try:
        return importlib.import_module("inference_gym.using_tensorflow")
    except ImportError as err:
        raise ValueError(
            "the inference_gym models need the optional package inference-gym: "
            'pip install "neutra-flows[gym]" (or pip install inference-gym)'
        ) from err

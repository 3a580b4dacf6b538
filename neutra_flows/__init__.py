"""neutra_flows: normalizing flows trained by VI, used to precondition HMC and NUTS.

The public API:

* flows: :func:`make_flow`, :data:`FLOW_NAMES`, :func:`save_flow`, :func:`load_flow`
  and the bijector classes in :mod:`neutra_flows.bijectors`;
* targets: :class:`Target`; the built-ins in :mod:`neutra_flows.models`, textbook
  targets with exact truth and real models with reference posteriors;
* variational inference: :func:`fit` (with its whitening stage,
  :mod:`neutra_flows.whitening`), :func:`fit_to_data`, :class:`FitResult`;
* NeuTra sampling: :class:`NeuTraKernel`, :func:`sample`;
* diagnostics: :func:`compare`; pictures in :mod:`neutra_flows.plots`.

The benchmark pipeline, the real-model suite and the ``neutra-flows`` command
live in :mod:`neutra_flows.app`, on top of this API: importing the package
loads none of them.
"""

import os as _os

from neutra_flows import _quiet

# The neutra-flows command's first screen is its own (neutra_flows._quiet); for a
# library import this does nothing.
_quiet.quiet_command_start()

# TensorFlow's C++ start-up chatter (CUDA probing on CPU-only machines, XLA
# banners) buries our own output; only raise the threshold if the user has not
# chosen one. It must be set before TensorFlow is first imported.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from neutra_flows import _compat  # noqa: E402

# Before anything builds a bijector: TFP 0.25's Pad needs it under NumPy >= 2.4.
_compat.apply()

from neutra_flows import adaptation, bijectors, models, plots, targets, whitening  # noqa: E402
from neutra_flows._version import __version__  # noqa: E402
from neutra_flows.adaptation import FlowAdaptation  # noqa: E402
from neutra_flows.diagnostics import compare  # noqa: E402
from neutra_flows.flows import FLOW_NAMES, make_flow  # noqa: E402
from neutra_flows.io import load_flow, save_flow  # noqa: E402
from neutra_flows.mcmc import NeuTraKernel, sample  # noqa: E402
from neutra_flows.targets import Target  # noqa: E402
from neutra_flows.vi import DataFitResult, FitResult, fit, fit_to_data  # noqa: E402

__all__ = [
    "FLOW_NAMES",
    "DataFitResult",
    "FlowAdaptation",
    "FitResult",
    "NeuTraKernel",
    "Target",
    "adaptation",
    "bijectors",
    "models",
    "plots",
    "whitening",
    "compare",
    "fit",
    "fit_to_data",
    "load_flow",
    "make_flow",
    "sample",
    "save_flow",
    "targets",
    "__version__",
]

"""Real Bayesian models shipped with their data and reference posteriors.

:mod:`neutra_flows.models.posteriordb` holds ten posteriordb models translated
from Stan (:func:`~neutra_flows.models.posteriordb.load_posteriordb`).
"""

from neutra_flows.models.posteriordb import POSTERIORDB_MODELS, load_posteriordb

__all__ = ["POSTERIORDB_MODELS", "load_posteriordb"]

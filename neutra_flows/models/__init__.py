"""Built-in targets: textbook ones with exact truth, and real models with reference posteriors.

* :mod:`~neutra_flows.models.textbook`: :func:`neals_funnel`, :func:`banana`
  (closed-form ground truth, exact samplers);
* :mod:`~neutra_flows.models.gaussians`: :class:`GaussianTarget`,
  :func:`correlated_gaussian`, :func:`ill_conditioned_gaussian` (exact
  covariance);
* :mod:`~neutra_flows.models.german_credit`:
  :func:`german_credit_sparse_logistic_regression` (Stan reference estimates);
* :mod:`~neutra_flows.models.schools`: :func:`eight_schools` (no ground truth);
* :mod:`~neutra_flows.models.posteriordb`: ten posteriordb models translated
  from Stan (:func:`load_posteriordb`, :data:`POSTERIORDB_MODELS`).
"""

from neutra_flows.models.gaussians import GaussianTarget, correlated_gaussian, ill_conditioned_gaussian
from neutra_flows.models.german_credit import german_credit_sparse_logistic_regression
from neutra_flows.models.posteriordb import POSTERIORDB_MODELS, load_posteriordb
from neutra_flows.models.schools import eight_schools
from neutra_flows.models.textbook import banana, neals_funnel

__all__ = [
    "POSTERIORDB_MODELS",
    "GaussianTarget",
    "banana",
    "correlated_gaussian",
    "eight_schools",
    "german_credit_sparse_logistic_regression",
    "ill_conditioned_gaussian",
    "load_posteriordb",
    "neals_funnel",
]

"""Comparing MCMC runs: ESS per gradient evaluation, per second, R-hat and bias.

:func:`compare` turns several :class:`arviz.InferenceData` (from
:func:`neutra_flows.sample`, or any ArviZ posterior) into one table, one row per
run. Efficiency is judged by the *worst* parameter: every figure is a minimum
(ESS) or maximum (R-hat, bias) over all variables and coordinates of the
posterior.

ESS and R-hat are ArviZ's rank-normalised estimators (Vehtari et al. 2021),
computed in float64 whatever the draws' dtype: float32 draws lose the digits
the autocovariance of a long, well-mixed chain needs.

References
----------
* Vehtari, A., Gelman, A., Simpson, D., Carpenter, B. and Buerkner, P.-C.
  "Rank-normalization, folding, and localization: an improved R-hat for
  assessing convergence of MCMC." Bayesian Analysis 16(2), 2021,
  arXiv:1903.08008.
* Kumar, R., Carroll, C., Hartikainen, A. and Martin, O. "ArviZ a unified
  library for exploratory analysis of Bayesian models in Python." JOSS 4(33), 2019.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

__all__ = ["COMPARE_COLUMNS", "compare", "phase_times"]

#: The columns of :func:`compare`'s table, in order, with their meaning.
COMPARE_COLUMNS: dict[str, str] = {
    "sampler": "the run's sampler (attrs['sampler']), e.g. 'NeuTra-HMC' or 'NUTS'",
    "flow": "the flow's name, 'none' for the baseline",
    "num_draws": "kept draws over all chains",
    "min_ess_bulk": "smallest bulk ESS over all parameters and coordinates",
    "min_ess_tail": "smallest tail ESS (5 % and 95 % quantiles)",
    "max_rhat": "largest rank-normalised split R-hat",
    "divergences": "divergent transitions after warm-up",
    "grad_evals": "gradient evaluations (leapfrog steps) after warm-up, all chains",
    "grad_evals_warmup": "gradient evaluations during warm-up, all chains",
    "ess_per_grad": "min_ess_bulk / grad_evals",
    "density_evals": "density-only target evaluations after warm-up, all chains (independence "
    "proposals); 0 where none were made",
    "ess_per_eval": "min_ess_bulk / (grad_evals + density_evals): every target evaluation of the sampling",
    "grad_evals_training": "target gradients spent fitting the flow (whitening, steps x batch, "
    "diagnostic draws); 0 for the baseline",
    "ess_per_grad_total": "min_ess_bulk / (grad_evals_training + grad_evals_warmup + grad_evals): "
    "the honest cost of the whole run",
    "sampling_time": "seconds spent drawing the kept draws",
    "total_time": "all-in seconds: flow training, set-up, compilation, warm-up, sampling (attrs total_time)",
    "time_to_first_draw": "seconds from the call (and the flow's training) to the first kept draw",
    "ess_per_second": "min_ess_bulk / sampling_time",
    "ess_per_second_total": "min_ess_bulk / total_time",
    "max_abs_error_mcse": "largest |mean - true mean| / sqrt(MCSE^2 + SE^2), SE the truth's own standard "
    "error where known (needs the truth; a derived quantity's too)",
    "min_std_ratio": "smallest posterior std / true std (needs the truth)",
    "max_std_ratio": "largest posterior std / true std (needs the truth)",
}

_NAN = float("nan")


def _float64_posterior(idata: Any) -> xr.Dataset:
    if not hasattr(idata, "posterior"):
        raise ValueError(
            f"compare expects arviz.InferenceData with a posterior group, got {type(idata).__name__}"
        )
    posterior = idata.posterior
    return posterior.map(lambda v: v.astype(np.float64), keep_attrs=True)


def _flat(dataset: xr.Dataset) -> np.ndarray:
    """All values of all variables of a (reduced) dataset, as one float64 vector."""
    if not dataset.data_vars:
        return np.zeros([0])
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in dataset.data_vars.values()])


def _nanmin(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.min()) if x.size else _NAN


def _nanmax(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.max()) if x.size else _NAN


def _attr(idata: Any, name: str, default: Any = None) -> Any:
    for group in ("posterior", "sample_stats"):
        if hasattr(idata, group) and name in getattr(idata, group).attrs:
            return getattr(idata, group).attrs[name]
    return default


def _as_truth(ground_truth: Any) -> tuple[dict | None, dict | None] | None:
    """Normalises a ground truth to `(mean_dict | None, std_dict | None)` or None."""
    if ground_truth is None:
        return None
    if hasattr(ground_truth, "ground_truth_mean") and hasattr(ground_truth, "ground_truth_std"):
        mean, std = ground_truth.ground_truth_mean, ground_truth.ground_truth_std
        se = getattr(ground_truth, "ground_truth_mean_se", None)
        if se is not None and mean is not None:
            return mean, std, se
    elif isinstance(ground_truth, (tuple, list)) and len(ground_truth) == 2:
        mean, std = ground_truth
    else:
        raise ValueError(
            "ground_truth must be None, a Target, or a pair (mean_dict, std_dict); got "
            f"{type(ground_truth).__name__}"
        )
    for part, what in ((mean, "mean"), (std, "std")):
        if part is not None and not isinstance(part, Mapping):
            raise ValueError(f"the ground-truth {what} must be a dict keyed by variable name")
    if mean is None and std is None:
        return None
    return mean, std


def _truth_from_attrs(idata: Any, key: str = "ground_truth") -> tuple | None:
    """``(mean, std, mean_se)`` dicts from the attrs ``sample`` wrote (``mean_se`` may be None)."""
    raw = _attr(idata, key)
    if raw is None:
        return None
    parsed = json.loads(raw)
    truth = _as_truth((parsed.get("mean"), parsed.get("std")))
    return None if truth is None else (*truth, parsed.get("mean_se"))


def _derived_truth_of(target: Any) -> tuple | None:
    """A given Target's derived quantity's truth ``(mean, std, mean_se)``, or None."""
    derived = getattr(target, "derived", None)
    if derived is None or not derived.has_truth:
        return None
    return derived.ground_truth_mean, derived.ground_truth_std, derived.ground_truth_mean_se


def _derived_posterior(idata: Any) -> xr.Dataset | None:
    from neutra_flows.derived import GROUP

    return getattr(idata, GROUP, None) if GROUP in getattr(idata, "groups", lambda: [])() else None


def _truth_figures(posterior: xr.Dataset, truth) -> dict[str, float]:
    """Bias in units of ``sqrt(MCSE^2 + SE^2)`` (``SE`` the truth's own error, where known) and std ratios."""
    import arviz as az

    mean_truth, std_truth, *rest = truth
    se_truth = rest[0] if rest else None
    errors, ratios = [], []
    mcse = az.mcse(posterior, method="mean")
    for name in posterior.data_vars:
        draws = np.asarray(posterior[name], np.float64)
        flat = draws.reshape(draws.shape[0] * draws.shape[1], -1)
        if mean_truth is not None and name in mean_truth:
            true_mean = np.broadcast_to(np.asarray(mean_truth[name], np.float64), draws.shape[2:])
            se = np.asarray(mcse[name], np.float64).reshape(-1)
            if se_truth is not None and name in se_truth:
                own = np.broadcast_to(np.asarray(se_truth[name], np.float64), draws.shape[2:]).reshape(-1)
                se = np.sqrt(se**2 + own**2)
            errors.append(np.abs(flat.mean(axis=0) - true_mean.reshape(-1)) / se)
        if std_truth is not None and name in std_truth:
            true_std = np.broadcast_to(np.asarray(std_truth[name], np.float64), draws.shape[2:])
            ratios.append(flat.std(axis=0, ddof=1) / true_std.reshape(-1))
    out = {}
    if errors:
        out["max_abs_error_mcse"] = _nanmax(np.concatenate(errors))
    if ratios:
        r = np.concatenate(ratios)
        out["min_std_ratio"] = _nanmin(r)
        out["max_std_ratio"] = _nanmax(r)
    return out


def _row(idata: Any, truth, derived_truth=None) -> dict[str, Any]:
    import arviz as az

    posterior = _float64_posterior(idata)
    n_chains, n_draws = posterior.sizes["chain"], posterior.sizes["draw"]
    ess_bulk = _nanmin(_flat(az.ess(posterior, method="bulk")))
    ess_tail = _nanmin(_flat(az.ess(posterior, method="tail")))
    rhat = _nanmax(_flat(az.rhat(posterior)))

    stats = getattr(idata, "sample_stats", None)
    if stats is not None and "diverging" in stats:
        divergences = float(np.asarray(stats["diverging"]).sum())
    else:
        divergences = float(_attr(idata, "num_divergences_sampling", _NAN))
    grads = _attr(idata, "num_grad_evals_sampling")
    if grads is None and stats is not None and "n_steps" in stats:
        grads = float(np.asarray(stats["n_steps"], np.float64).sum())
    grads = _NAN if grads is None else float(grads)
    density_evals = float(_attr(idata, "num_density_evals_sampling", 0.0))
    grads_warmup = float(_attr(idata, "num_grad_evals_warmup", _NAN))
    grads_training = float(_attr(idata, "num_grad_evals_training", 0.0))

    sampling_time = float(_attr(idata, "sampling_time", _NAN))
    # sample's own all-in clock where it wrote one; runs from before it, the phases' sum.
    total_time = _attr(idata, "total_time")
    total_time = float(total_time) if total_time is not None else sampling_time + sum(
        float(_attr(idata, k, 0.0)) for k in ("flow_training_time", "compile_time", "warmup_time")
    )

    def ratio(a: float, b: float) -> float:
        return a / b if b and math.isfinite(b) and b > 0 else _NAN

    row = dict(
        sampler=str(_attr(idata, "sampler", "")),
        flow=str(_attr(idata, "flow", "")),
        num_draws=int(n_chains * n_draws),
        min_ess_bulk=ess_bulk,
        min_ess_tail=ess_tail,
        max_rhat=rhat,
        divergences=divergences,
        grad_evals=grads,
        grad_evals_warmup=grads_warmup,
        ess_per_grad=ratio(ess_bulk, grads),
        density_evals=density_evals,
        ess_per_eval=ratio(ess_bulk, grads + density_evals),
        grad_evals_training=grads_training,
        ess_per_grad_total=ratio(ess_bulk, grads_training + grads_warmup + grads),
        sampling_time=sampling_time,
        total_time=total_time,
        time_to_first_draw=float(_attr(idata, "time_to_first_draw", _NAN)),
        ess_per_second=ratio(ess_bulk, sampling_time),
        ess_per_second_total=ratio(ess_bulk, total_time),
    )
    figures = [] if truth is None else [_truth_figures(posterior, truth)]
    derived = _derived_posterior(idata)
    if derived_truth is not None and derived is not None:
        figures.append(_truth_figures(derived.map(lambda v: v.astype(np.float64)), derived_truth))
    for key, worst in (("max_abs_error_mcse", max), ("min_std_ratio", min), ("max_std_ratio", max)):
        values = [f[key] for f in figures if key in f and not math.isnan(f[key])]
        if values:
            row[key] = worst(values)
    return row


def compare(runs: Mapping[str, Any], ground_truth: Any = None) -> pd.DataFrame:
    """One row per run: worst-case ESS, R-hat, divergences, cost and bias.

    Args:
      runs: ``{label: arviz.InferenceData}``, e.g. ``{"NeuTra-IAF": a, "NUTS": b}``.
        Cost figures come from the attrs :func:`neutra_flows.sample` writes
        (``num_grad_evals_sampling``, ``sampling_time``, ...); where they are
        missing the cell is NaN (gradient counts fall back to the sum of
        ``sample_stats.n_steps``).
      ground_truth: ``None`` (use each run's ``attrs["ground_truth"]`` if
        ``sample`` stored the target's), a :class:`~neutra_flows.Target` with
        known truth, or a pair ``(mean_dict, std_dict)`` keyed like the
        posterior's variables (either may be ``None``). Variables missing from
        the truth are skipped in the truth columns; a given truth that names
        none of the runs' variables is an error. A run with a
        ``derived_posterior`` group (a target's
        :class:`~neutra_flows.derived.DerivedQuantity`, e.g. inference_gym's
        transformations) is also checked against that quantity's truth (from
        the attrs, or from a given Target's ``derived``); the truth columns then
        report the worst of both. A truth's own standard error
        (``ground_truth_mean_se``) widens the bias test.

    Returns:
      A ``pandas.DataFrame`` indexed by label with the columns of
      :data:`COMPARE_COLUMNS` (the truth columns only when some run has a truth).

    Raises:
      ValueError: ``runs`` is not a non-empty mapping of InferenceData (a bare
        InferenceData included: pass ``{"label": idata}``); ``ground_truth`` is
        malformed or names none of the runs' variables.

    Example:

    >>> import arviz as az, numpy as np
    >>> rng = np.random.default_rng(0)
    >>> idata = az.from_dict(posterior={"x": rng.normal(size=(4, 500))})
    >>> table = compare({"iid": idata}, ground_truth=({"x": 0.0}, {"x": 1.0}))
    >>> bool(1500 < table.loc["iid", "min_ess_bulk"] < 2500)
    True
    >>> bool(table.loc["iid", "max_abs_error_mcse"] < 4)
    True
    """
    # pandas (and ArviZ, which imports it) load on the first comparison, not
    # with the package: ``import neutra_flows`` should not pay for them.
    import pandas as pd

    # An InferenceData is itself a mapping (of groups): say what was meant.
    if hasattr(runs, "posterior") or not isinstance(runs, Mapping) or not runs:
        raise ValueError(
            "runs must be a non-empty mapping {label: InferenceData}, e.g. compare({'NeuTra': idata}); "
            f"got {'an InferenceData' if hasattr(runs, 'posterior') else type(runs).__name__}"
        )
    for label, idata in runs.items():
        if not hasattr(idata, "posterior"):
            raise ValueError(f"runs[{label!r}] is a {type(idata).__name__}, not an InferenceData with a "
                             "posterior group: runs must be a mapping {label: InferenceData}")
    common = _as_truth(ground_truth)
    derived_common = _derived_truth_of(ground_truth)
    if common is not None:
        _check_truth_names(common, {name for idata in runs.values() for name in idata.posterior.data_vars})
    rows = {}
    for label, idata in runs.items():
        truth = common if common is not None else _truth_from_attrs(idata)
        # A derived quantity's truth (sample's derived_posterior group) counts unless a truth was given.
        derived = (derived_common if ground_truth is not None
                   else _truth_from_attrs(idata, "derived_ground_truth"))
        rows[str(label)] = _row(idata, truth, derived)
    table = pd.DataFrame.from_dict(rows, orient="index")
    columns = [c for c in COMPARE_COLUMNS if c in table.columns]
    return table[columns]


def _check_truth_names(truth: tuple[dict | None, dict | None], variables: set[str]) -> None:
    """Refuses a given ground truth none of whose names is a variable of any run (no truth column)."""
    names = {str(k) for part in truth if part is not None for k in part}
    if names and not names & variables:
        raise ValueError(
            f"ground_truth names {sorted(names)}, but the runs' posterior variables are "
            f"{sorted(variables)}: none matches, so no bias or std column could be computed. Key the "
            "truth by the posterior's variable names (those of target.named_draws)"
        )


def phase_times(idata: Any) -> dict[str, float]:
    """``{phase: seconds}`` of a :func:`~neutra_flows.sample` run, in the order they ran.

    Read from ``attrs["phase_times"]``; a run made before it was recorded gets
    what its other attrs say (training, compilation, warm-up, sampling).
    """
    import json

    recorded = _attr(idata, "phase_times")
    if recorded is not None:
        return {str(k): float(v) for k, v in json.loads(recorded).items()}
    names = {"flow_training_time": "training", "compile_time": "compilation", "warmup_time": "warm-up",
             "sampling_time": "sampling"}
    return {phase: float(_attr(idata, key)) for key, phase in names.items() if _attr(idata, key) is not None}

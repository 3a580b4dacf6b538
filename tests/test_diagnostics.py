"""Tests of compare on synthetic InferenceData whose answers are known in closed form."""

from __future__ import annotations

import json
import math

import arviz as az
import numpy as np
import pandas as pd
import pytest

from neutra_flows import models
from neutra_flows.diagnostics import COMPARE_COLUMNS, compare

CHAINS, DRAWS = 4, 1000


def iid_normal(seed: int = 0, d: int = 3, loc: float = 0.0, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (loc + rng.standard_normal((CHAINS, DRAWS, d))).astype(dtype)


def ar1(rho: float, seed: int = 1) -> np.ndarray:
    """Stationary AR(1) chains with unit marginal variance: ESS = N (1 - rho) / (1 + rho)."""
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((CHAINS, DRAWS)) * math.sqrt(1 - rho**2)
    x = np.empty((CHAINS, DRAWS))
    x[:, 0] = rng.standard_normal(CHAINS)
    for t in range(1, DRAWS):
        x[:, t] = rho * x[:, t - 1] + eps[:, t]
    return x


def with_attrs(posterior: dict, stats: dict | None = None, **attrs) -> az.InferenceData:
    idata = az.from_dict(posterior=posterior, sample_stats=stats)
    idata.posterior.attrs.update(attrs)
    return idata


def test_iid_draws_ess_close_to_number_of_draws():
    table = compare({"iid": with_attrs({"x": iid_normal()})})
    n = CHAINS * DRAWS
    row = table.loc["iid"]
    assert row["num_draws"] == n
    assert 0.85 * n < row["min_ess_bulk"] < 1.1 * n
    assert 0.8 * n < row["min_ess_tail"] < 1.15 * n
    assert row["max_rhat"] < 1.01
    # No cost attrs: the cost columns are NaN, not made up.
    for col in ("grad_evals", "ess_per_grad", "sampling_time", "ess_per_second"):
        assert math.isnan(row[col]), col
    assert list(table.columns) == [c for c in COMPARE_COLUMNS if c in table.columns]


def test_ar1_ess_matches_closed_form():
    rho = 0.6
    table = compare({"ar1": with_attrs({"x": ar1(rho)})})
    expected = CHAINS * DRAWS * (1 - rho) / (1 + rho)
    np.testing.assert_allclose(table.loc["ar1", "min_ess_bulk"], expected, rtol=0.2)


def test_min_is_over_all_variables_and_coordinates():
    x = iid_normal(d=2)
    table = compare({"mixed": with_attrs({"x": x, "slow": ar1(0.9)})})
    expected = CHAINS * DRAWS * 0.1 / 1.9
    np.testing.assert_allclose(table.loc["mixed", "min_ess_bulk"], expected, rtol=0.3)


def test_rhat_flags_a_shifted_chain():
    x = iid_normal(d=1)
    x[0] += 3.0
    table = compare({"stuck": with_attrs({"x": x})})
    assert table.loc["stuck", "max_rhat"] > 1.1


def test_cost_columns_from_attrs_and_sample_stats():
    x = iid_normal(d=2)
    diverging = np.zeros((CHAINS, DRAWS), bool)
    diverging[1, :7] = True
    n_steps = np.full((CHAINS, DRAWS), 3, np.int64)
    idata = with_attrs(
        {"x": x},
        {"diverging": diverging, "n_steps": n_steps},
        sampler="NeuTra-HMC",
        flow="iaf",
        num_grad_evals_sampling=12000,
        num_grad_evals_warmup=5000,
        sampling_time=2.0,
        warmup_time=1.0,
        compile_time=3.0,
        flow_training_time=4.0,
    )
    row = compare({"run": idata}).loc["run"]
    ess = row["min_ess_bulk"]
    assert row["sampler"] == "NeuTra-HMC" and row["flow"] == "iaf"
    assert row["divergences"] == 7
    assert row["grad_evals"] == 12000 and row["grad_evals_warmup"] == 5000
    np.testing.assert_allclose(row["ess_per_grad"], ess / 12000)
    np.testing.assert_allclose(row["ess_per_second"], ess / 2.0)
    np.testing.assert_allclose(row["total_time"], 10.0)
    np.testing.assert_allclose(row["ess_per_second_total"], ess / 10.0)

    # Without the attrs the gradient count falls back to the sum of n_steps.
    bare = az.from_dict(posterior={"x": x}, sample_stats={"n_steps": n_steps})
    np.testing.assert_allclose(compare({"bare": bare}).loc["bare", "grad_evals"], 12000)


def test_ground_truth_figures():
    x = iid_normal(d=3) * np.array([1.0, 2.0, 0.5]) + np.array([0.0, 1.0, -1.0])
    idata = with_attrs({"x": x})
    truth = ({"x": [0.0, 1.0, -1.0]}, {"x": [1.0, 2.0, 0.5]})
    row = compare({"ok": idata}, ground_truth=truth).loc["ok"]
    assert row["max_abs_error_mcse"] < 4
    assert 0.95 < row["min_std_ratio"] <= row["max_std_ratio"] < 1.05

    # A biased mean is many MCSEs off; a wrong scale shows in the std ratios.
    wrong = ({"x": [0.0, 1.5, -1.0]}, {"x": [1.0, 4.0, 0.5]})
    row = compare({"bad": idata}, ground_truth=wrong).loc["bad"]
    assert row["max_abs_error_mcse"] > 10
    np.testing.assert_allclose(row["min_std_ratio"], 0.5, rtol=0.05)

    # Only the mean known: the std columns are absent.
    table = compare({"m": idata}, ground_truth=({"x": [0.0, 1.0, -1.0]}, None))
    assert "max_abs_error_mcse" in table and "min_std_ratio" not in table


def test_ground_truth_from_target_and_from_attrs():
    target = models.correlated_gaussian(3, 0.0)
    x = iid_normal(seed=3)
    from_target = compare({"r": with_attrs({"x": x})}, ground_truth=target)
    stored = json.dumps({"mean": {"x": [0.0] * 3}, "std": {"x": [1.0] * 3}})
    from_attrs = compare({"r": with_attrs({"x": x}, ground_truth=stored)})
    for col in ("max_abs_error_mcse", "min_std_ratio", "max_std_ratio"):
        np.testing.assert_allclose(from_attrs.loc["r", col], from_target.loc["r", col])
    # No truth anywhere: no truth columns.
    assert "max_abs_error_mcse" not in compare({"r": with_attrs({"x": x})})


def test_float32_draws_with_large_offset_give_float64_figures():
    x64 = iid_normal(seed=5, d=2, loc=1e3)
    x32 = x64.astype(np.float32)
    t64 = compare({"a": with_attrs({"x": x64})})
    t32 = compare({"a": with_attrs({"x": x32})})
    np.testing.assert_allclose(t32.loc["a", "min_ess_bulk"], t64.loc["a", "min_ess_bulk"], rtol=0.02)
    assert 0.85 * CHAINS * DRAWS < t32.loc["a", "min_ess_bulk"]


def test_several_runs_keep_order_and_types():
    runs = {"NeuTra": with_attrs({"x": iid_normal(1)}), "NUTS": with_attrs({"x": iid_normal(2)})}
    table = compare(runs)
    assert isinstance(table, pd.DataFrame)
    assert list(table.index) == ["NeuTra", "NUTS"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        compare({})
    with pytest.raises(ValueError, match="InferenceData"):
        compare({"x": np.zeros(3)})
    with pytest.raises(ValueError, match="ground_truth"):
        compare({"r": with_attrs({"x": iid_normal()})}, ground_truth=3.0)


def test_a_bare_inference_data_is_refused_with_the_call_to_make():
    idata = with_attrs({"x": iid_normal()})
    with pytest.raises(ValueError, match=r"got an InferenceData") as info:
        compare(idata)
    assert "compare({'NeuTra': idata})" in str(info.value)
    with pytest.raises(ValueError, match=r"runs\['a'\] is a Dataset"):
        compare({"a": idata.posterior})


def test_a_ground_truth_that_names_no_variable_is_an_error():
    runs = {"a": with_attrs({"x": iid_normal()}), "b": with_attrs({"y": iid_normal()})}
    with pytest.raises(ValueError, match=r"ground_truth names \['theta'\].*\['x', 'y'\]"):
        compare(runs, ground_truth=({"theta": [0.0] * 3}, {"theta": [1.0] * 3}))
    # One name matching one run is enough: the other run gets no truth columns (documented).
    table = compare(runs, ground_truth=({"x": [0.0] * 3}, None))
    assert table.loc["a", "max_abs_error_mcse"] < 5 and np.isnan(table.loc["b", "max_abs_error_mcse"])

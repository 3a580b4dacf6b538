"""The suite's table and the benchmark report: honest ratios and lower bounds."""

from __future__ import annotations

import pandas as pd

from neutra_flows.app.bench import BenchResult
from neutra_flows.app.suite import SUITE_MODELS, suite_table_markdown


def _table(nuts_rhat: float) -> pd.DataFrame:
    return pd.DataFrame.from_dict({
        "NeuTra": dict(sampler="NeuTra-HMC", divergences=0.0, max_rhat=1.002, min_ess_bulk=2000.0,
                       ess_per_grad=0.4, ess_per_grad_total=0.004, ess_per_second=1000.0,
                       ess_per_second_total=20.0),
        "NUTS": dict(sampler="NUTS", divergences=3.0, max_rhat=nuts_rhat, min_ess_bulk=40.0,
                     ess_per_grad=0.002, ess_per_grad_total=0.0015, ess_per_second=50.0,
                     ess_per_second_total=10.0),
    }, orient="index")


def test_report_labels_a_ratio_against_an_unconverged_baseline_a_lower_bound():
    converged = BenchResult(table=_table(1.004), goals=[], fit=None, idatas={}, settings={}).report()
    assert "ESS per gradient: 200x" in converged and "lower bound" not in converged
    assert "ESS per gradient incl. training: 2.67x" in converged
    stuck = BenchResult(table=_table(1.3), goals=[], fit=None, idatas={}, settings={}).report()
    assert "ESS per gradient: >= 200x (a lower bound: the baseline's R-hat is 1.3)" in stuck


def _row(**kw):
    row = dict(model="m", d=3, neutra_ess_per_grad=0.4, nuts_ess_per_grad=0.002, ratio=200.0,
               ratio_is_lower_bound=False, neutra_ess_per_grad_total=0.004, nuts_ess_per_grad_total=0.0015,
               ratio_ess_per_second_total=2.0, neutra_divergences=0.0, nuts_divergences=3.0,
               neutra_max_rhat=1.002, nuts_max_rhat=1.004, neutra_max_bias_mcse=1.2,
               neutra_std_ratio=[0.97, 1.02],
               khat=0.3, whitening="laplace", goals=[{"goal": "g", "met": True}], neutra_correct=True)
    row.update(kw)
    return row


def test_suite_table_marks_lower_bounds_missed_goals_and_failures():
    text = suite_table_markdown([
        _row(),
        _row(model="stuck", ratio_is_lower_bound=True),
        _row(model="bad", goals=[{"goal": "every std within 15 % of the truth", "met": False}]),
        {"model": "broken", "error": "ValueError: boom"},
    ])
    lines = text.splitlines()
    assert len(lines) == 6
    assert "| 200x |" in lines[2] and "all met" in lines[2]
    assert "| >= 200x |" in lines[3]
    assert "MISSED: every std within 15 % of the truth" in lines[4]
    assert "FAILED: ValueError: boom" in lines[5]


def test_suite_covers_every_posteriordb_model_and_the_built_ins_with_a_truth():
    from neutra_flows.app.bench import BENCHMARKS
    from neutra_flows.models.posteriordb import POSTERIORDB_MODELS

    assert set(POSTERIORDB_MODELS) <= set(SUITE_MODELS)
    for name in ("banana", "funnel", "german-credit"):
        assert name in SUITE_MODELS
        assert BENCHMARKS[name].make_target().ground_truth_mean is not None

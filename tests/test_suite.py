"""The suite's table and the benchmark report: honest ratios and lower bounds."""

from __future__ import annotations

import json

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
    # The all-in seconds of both runs, where the row has them ("n/a" where not).
    timed = suite_table_markdown([_row(neutra_total_time=8.04, nuts_total_time=24.1,
                                       neutra_time_to_first_draw=7.6, nuts_time_to_first_draw=20.3)])
    timed = timed.splitlines()[2]
    assert "| 8.0 / 24.1 | 7.6 / 20.3 |" in timed and "| n/a / n/a | n/a / n/a |" in lines[2]


def test_suite_row_and_figure_carry_each_runs_phase_times(tmp_path):
    from types import SimpleNamespace

    from neutra_flows.app.suite import _plot_phases, _time_figures

    def idata(total, phases):
        attrs = {"total_time": total, "time_to_first_draw": total - 1.0, "phase_times": json.dumps(phases)}
        return SimpleNamespace(posterior=SimpleNamespace(attrs=attrs))

    result = SimpleNamespace(idatas={"NeuTra": idata(8.0, {"whitening": 3.0, "compilation": 5.0}),
                                     "NUTS": idata(20.0, {"compilation": 12.0, "sampling": 8.0})})
    figures = _time_figures(result)
    assert figures["neutra_total_time"] == 8.0 and figures["nuts_time_to_first_draw"] == 19.0
    assert figures["nuts_phase_times"] == {"compilation": 12.0, "sampling": 8.0}
    _plot_phases([_row(**figures)], str(tmp_path / "phases.png"))
    assert (tmp_path / "phases.png").stat().st_size > 0


def test_suite_covers_every_posteriordb_model_and_the_built_ins_with_a_truth():
    from neutra_flows.app.bench import BENCHMARKS
    from neutra_flows.models.posteriordb import POSTERIORDB_MODELS

    assert set(POSTERIORDB_MODELS) <= set(SUITE_MODELS)
    for name in ("banana", "funnel", "german-credit"):
        assert name in SUITE_MODELS
        assert BENCHMARKS[name].make_target().ground_truth_mean is not None


def test_suite_row_says_whether_the_adapted_flow_was_refitted():
    # suite --adapt: a flow adapted on the draws reports its kept refits; above
    # FlowAdaptation.fit_above_dims the flow is fit's, with no refit planned, and
    # the row must not read "adapted".
    import json
    from types import SimpleNamespace

    from neutra_flows.app.suite import _fit_figures

    def result(refits, kept, start):
        attrs = {"flow_refits": json.dumps(refits), "flow_refits_accepted": kept,
                 "flow_adaptation_start": start}
        posterior = SimpleNamespace(attrs=attrs)
        return SimpleNamespace(fit=None, idatas={"NeuTra": SimpleNamespace(posterior=posterior)})

    adapted = _fit_figures(result([{"accepted": True}, {"accepted": False}], 1, "auto"))
    assert adapted["fit_stop"] == "adapted on the draws: 1 refits kept" and adapted["whitening"] == "auto"
    fitted = _fit_figures(result([], 0, "a 2000-step VI fit of an IAF, not refitted on the draws"))
    assert fitted["fit_stop"] == "not refitted on the draws" and "IAF" in fitted["whitening"]


def test_leapfrog_cost_ratio_divides_the_sampling_seconds_per_batched_gradient_by_the_bare_one():
    import arviz as az
    import numpy as np
    import tensorflow as tf

    from neutra_flows import models
    from neutra_flows._timing import seconds_per_gradient
    from neutra_flows.app.bench import _add_leapfrog_costs, _time_line

    target = models.correlated_gaussian(ndims=3, dtype=tf.float64)
    bare = seconds_per_gradient(target, 4)
    assert 0 < bare < 0.1
    idata = az.from_dict(posterior={"x": np.zeros((4, 10))}, sample_stats={"n_steps": np.ones((4, 10))})
    idata.posterior.attrs.update(sampling_time=1.0, num_grad_evals_sampling=4000,
                                 num_density_evals_sampling=4000, total_time=3.0, time_to_first_draw=2.0)
    _add_leapfrog_costs({"run": idata}, target, 4)
    attrs = idata.posterior.attrs
    # 2000 batched evaluations (gradients and densities) in one second.
    np.testing.assert_allclose(attrs["leapfrog_cost_ratio"] * attrs["target_gradient_seconds"], 1.0 / 2000)
    assert idata.sample_stats.attrs["leapfrog_cost_ratio"] == attrs["leapfrog_cost_ratio"]
    assert "one leapfrog step costs" in _time_line("run", idata)


def test_suite_table_shows_the_leapfrog_costs():
    line = suite_table_markdown([_row(neutra_leapfrog_cost_ratio=1.84, nuts_leapfrog_cost_ratio=1.1)])
    assert "| 1.8 / 1.1 |" in line.splitlines()[2]

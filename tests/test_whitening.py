"""The whitening stage: Gaussian fits that survive bad scaling, and fit's use of them."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from neutra_flows import fit, make_flow, models, sample
from neutra_flows.whitening import fit_gaussian, whitening_layer

QUICK = dict(progress=False, num_diagnostic_draws=2048)


def _badly_scaled(dtype=tf.float64):
    # An uncentred regression's posterior: sds 30 and 0.0075 with correlation -0.99.
    sd = np.array([30.0, 0.0075, 0.1])
    corr = np.eye(3)
    corr[0, 1] = corr[1, 0] = -0.99
    cov = corr * np.outer(sd, sd)
    mean = np.array([10.0, 0.5, -1.0])
    return models.GaussianTarget(mean, np.linalg.cholesky(cov), name="badly_scaled", dtype=dtype), mean, cov


def test_gaussian_fit_recovers_a_badly_scaled_gaussian():
    target, mean, cov = _badly_scaled()
    g = fit_gaussian(target, seed=0)
    assert g.map_found and g.method != "identity"
    np.testing.assert_allclose(g.loc, mean, rtol=1e-6, atol=1e-8)
    fitted = g.scale_tril @ g.scale_tril.T
    scale = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(fitted / np.outer(scale, scale), cov / np.outer(scale, scale), atol=1e-3)
    np.testing.assert_allclose(np.sqrt(np.diag(fitted)), scale, rtol=1e-3)
    assert g.elbo > -0.05  # a normalised target in the family: ELBO = -KL ~ 0
    assert g.num_grad_evals > 0


def test_gaussian_fit_without_a_map_keeps_the_identity_and_says_why():
    # The funnel's density is unbounded as x0 -> -inf: no MAP. Never a crash.
    # (In float32 L-BFGS may stop at a spurious "MAP" deep in the neck, with a
    # Hessian condition number of 1e18 and more: that is no MAP either.)
    g = fit_gaussian(models.neals_funnel(ndims=4, dtype=tf.float64), seed=1)
    # No true MAP: either L-BFGS stops in the neck with a degenerate Hessian (no
    # whitening at all) or the candidates' ELBOs on fresh draws prefer the identity.
    assert g.method.startswith("identity"), g.notes
    assert any("no whitening" in n or n.startswith("whitening candidates' ELBO: identity") for n in g.notes)
    np.testing.assert_array_equal(g.scale_tril, np.eye(4))
    assert np.all(np.isfinite(g.loc)) and np.all(np.isfinite(g.scale_tril))


def test_fit_sets_and_freezes_the_whitening_layer_then_neutra_is_right():
    target, mean, cov = _badly_scaled(tf.float32)
    flow = make_flow("iaf", 3, hidden_units=[8, 8], num_layers=2)
    r = fit(target, flow, num_steps=200, batch_size=64, seed=0, **QUICK)
    assert r.whitening is not None and r.whitening.map_found
    # A Gaussian target: the whitening already fits, so the flow is not trained.
    assert r.whitening.khat < 0.5 and r.num_steps == 0 and r.stop_reason.startswith("not trained")
    assert "skip_training_if_gaussian=False" in r.summary()
    layer = whitening_layer(flow)
    np.testing.assert_allclose(layer.shift.numpy(), r.whitening.loc.astype(np.float32), rtol=1e-5)
    assert r.khat < 0.7, r.summary()
    assert "whitening:" in r.summary() and "stopped:" in r.summary()
    assert r.num_grad_evals >= r.num_steps * 64 + r.whitening.num_grad_evals
    idata = sample(target, r, kernel="hmc", num_warmup=300, num_samples=300, seed=1, progress=False)
    draws = idata.posterior["x"].values.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(draws.std(0), np.sqrt(np.diag(cov)), rtol=0.2)
    assert idata.posterior.attrs["num_grad_evals_training"] == r.num_grad_evals


def test_fit_whiten_false_leaves_the_layer_to_adam():
    target, _, _ = _badly_scaled(tf.float32)
    flow = make_flow("iaf", 3, hidden_units=[4], num_layers=1)
    r = fit(target, flow, num_steps=20, batch_size=16, seed=0, whiten=False, **QUICK)
    assert r.whitening is None
    # Adam moved the layer (it is trained with the rest), but nowhere near the truth.
    assert abs(float(whitening_layer(flow).shift.numpy()[0]) - 10.0) > 5.0


def test_stopping_rule_stops_a_converged_fit_and_says_so():
    target = models.correlated_gaussian(2, 0.0)
    flow = make_flow("iaf", 2, hidden_units=[4], num_layers=1)
    quick = dict(batch_size=32, steps_per_chunk=25, seed=0, skip_training_if_gaussian=False, **QUICK)
    r = fit(target, flow, num_steps=1000, **quick)
    assert r.num_steps < 1000 and r.stop_reason.startswith("converged"), r.stop_reason
    assert len(r.losses) == r.num_steps
    full = fit(target, make_flow("iaf", 2, hidden_units=[4], num_layers=1), num_steps=150,
               early_stopping=False, **quick)
    assert full.num_steps == 150 and full.stop_reason.startswith("budget")


@pytest.mark.parametrize("flow_name", ["affine_tril", "identity"])
def test_flows_without_a_whitening_layer_are_trained_as_before(flow_name):
    target = models.correlated_gaussian(2, 0.5)
    r = fit(target, make_flow(flow_name, 2), num_steps=20, batch_size=16, seed=0, **QUICK)
    assert r.whitening is None


def test_a_failing_map_search_is_a_note_not_a_crash(monkeypatch):
    import neutra_flows.whitening as w

    def broken(*args, **kwargs):
        raise tf.errors.InvalidArgumentError(None, None, "line search blew up")

    monkeypatch.setattr(w, "_find_map", broken)
    target, mean, _ = _badly_scaled()
    g = fit_gaussian(target, seed=0)
    assert not g.map_found
    assert any("MAP search failed" in n for n in g.notes)
    # Without a MAP the whitening is the identity, with a note saying why.
    assert g.method == "identity (no MAP)"
    assert np.all(np.isfinite(g.loc))


def test_a_non_gaussian_target_is_still_trained():
    flow = make_flow("iaf", 2, hidden_units=[8], num_layers=2)
    r = fit(models.banana(), flow, num_steps=200, batch_size=64, seed=0, **QUICK)
    assert r.whitening.khat > 0.5 and r.num_steps > 0


def test_dadvi_when_needed_stops_at_a_good_laplace_fit_and_counts_only_what_ran():
    target, mean, cov = _badly_scaled()
    full = fit_gaussian(target, seed=0)
    lean = fit_gaussian(target, seed=0, num_elbo_draws=256, dadvi="when_needed")
    # A Gaussian target: Laplace is exact (k-hat ~ 0), so DADVI never runs.
    assert lean.method == "laplace" and lean.khat < 0.7
    assert any("DADVI not needed" in n for n in lean.notes)
    np.testing.assert_allclose(lean.loc, mean, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(lean.scale_tril @ lean.scale_tril.T, cov, rtol=1e-4, atol=1e-9)
    # MAP and Hessian cost the same either way; then two candidates (identity, Laplace)
    # are scored on num_elbo_draws each.
    scored_on_2048 = fit_gaussian(target, seed=0, dadvi="when_needed")
    assert lean.num_grad_evals - 2 * 256 == scored_on_2048.num_grad_evals - 2 * 2048 > 0
    assert lean.num_grad_evals < full.num_grad_evals / 5


def test_dadvi_when_needed_runs_where_laplace_misses_the_skew():
    # The banana: its Laplace fit has ELBO ~ -14 against DADVI's ~ -1 (k-hat > 0.7).
    g = fit_gaussian(models.banana(dtype=tf.float64), seed=0, num_elbo_draws=256, dadvi="when_needed")
    assert g.method == "dadvi from laplace", g.notes
    assert not any("DADVI not needed" in n for n in g.notes)
    assert g.elbo > -3.0


@pytest.mark.parametrize("kwargs, words", [
    (dict(dadvi="sometimes"), "dadvi must be one of"),
    (dict(num_elbo_draws=1), "num_elbo_draws must be an int >= 2"),
    (dict(num_elbo_draws=2.5), "num_elbo_draws must be an int"),
])
def test_fit_gaussian_refuses_bad_options(kwargs, words):
    target, _, _ = _badly_scaled()
    with pytest.raises(ValueError, match=words):
        fit_gaussian(target, seed=0, **kwargs)


def test_the_laplace_hessian_by_differences_matches_the_exact_precision():
    # A float64 Gaussian's Hessian is minus its precision everywhere; central
    # differences of L-BFGS's compiled gradient recover it, as autodiff does, and the
    # Laplace fit's scale is the covariance's Cholesky factor.
    import neutra_flows.whitening as w

    target = models.correlated_gaussian(4, 0.9, mean=[1.0, -2.0, 0.5, 3.0], scale=[1.0, 20.0, 0.05, 2.0],
                                        dtype=tf.float64)
    cov = np.asarray(target.covariance, np.float64)
    z_map, _, compiled = w._find_map(target, tf.constant([0, 1]), 2, w._Counter(), [])
    exact = w._hessian_by_autodiff(target, z_map)
    by_differences = w._hessian_by_differences(compiled, z_map.numpy())
    np.testing.assert_allclose(by_differences, exact, rtol=1e-6, atol=1e-8 * np.abs(exact).max())
    np.testing.assert_allclose(exact, np.linalg.inv(cov), rtol=1e-6)
    tril = w._laplace_tril(target, z_map, w._Counter(), [], compiled)
    np.testing.assert_allclose(tril @ tril.T, np.linalg.inv(exact), rtol=1e-6)


def test_the_whitening_stage_runs_blas_on_one_thread_and_gives_the_setting_back():
    # With TensorFlow loaded, OpenBLAS's threads fought TF's for the cores: SciPy's
    # L-BFGS-B ran 30-100x slower (see neutra_flows._utils.one_blas_thread).
    from threadpoolctl import threadpool_info

    from neutra_flows._utils import one_blas_thread

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    if not before:
        pytest.skip("threadpoolctl finds no BLAS library here")
    seen = []
    one_blas_thread(lambda: seen.extend(blas_threads()))()
    assert seen and all(n == 1 for n in seen)
    assert blas_threads() == before
    assert fit_gaussian.__wrapped__ is not None  # the stage itself runs under it

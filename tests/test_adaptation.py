"""Adapting the flow on the warm-up draws: the loss, the keep-or-reject rule, bad input, and a run."""

import json

import numpy as np
import pytest
import tensorflow as tf

import neutra_flows as nf
from neutra_flows.adaptation import (
    _FIT_DIAGNOSTIC_DRAWS,
    FlowAdaptation,
    FlowAdapter,
    _FlowTrainer,
    default_fit_batch_size,
    default_tail_scale,
)
from neutra_flows.targets import Target


def _gaussian(mean, std, dtype=tf.float64):
    mean, std = np.asarray(mean, float), np.asarray(std, float)

    def log_prob(z):
        return -0.5 * tf.reduce_sum(tf.square((z - mean) / std), axis=-1)

    return Target(log_prob, [len(mean)], dtype=dtype, name="gaussian",
                  ground_truth_mean={"x": mean}, ground_truth_std={"x": std})


@pytest.mark.parametrize("kwargs, words", [
    (dict(objective="reverse_kl"), "objective"),
    (dict(flow="iaf"), "fast inverse"),
    (dict(first_refit=0.7, last_refit=0.2), "first_refit"),
    (dict(num_refits=0), "num_refits"),
    (dict(validation_fraction=0.9), "validation_fraction"),
    (dict(tail_points=5000), "tail_points"),
    (dict(start="vi"), "start"),
    (dict(fit_batch_size=0), "fit_batch_size"),
    (dict(fit_above_dims=0), "fit_above_dims"),
])
def test_bad_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        FlowAdaptation(**kwargs)


def test_sample_refuses_a_short_warm_up_and_slow_inverses():
    target = _gaussian([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="num_warmup >= 200"):
        nf.sample(target, "adapt", num_warmup=100, num_samples=10, seed=0, progress=False)
    with pytest.raises(ValueError, match="fast"):
        nf.sample(target, nf.make_flow("iaf", 2, dtype=tf.float64), adapt_flow=True, num_warmup=300,
                  num_samples=10, seed=0, progress=False)
    with pytest.raises(ValueError, match="'adapt'"):
        nf.sample(target, "fit", seed=0, progress=False)


def _trainer(target, flow_name="affine_diag", **kwargs):
    flow = nf.make_flow(flow_name, target.event_size, dtype=tf.float64)
    return flow, _FlowTrainer(target, flow, FlowAdaptation(flow=flow_name, max_points=256, tail_points=64,
                                                           **kwargs))


def test_fisher_loss_is_zero_at_the_exact_transport_and_analytic_at_the_identity():
    mean, std = np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.5, 3.0])
    target = _gaussian(mean, std)
    flow, trainer = _trainer(target)
    x = np.random.default_rng(0).normal(size=[50, 3]) * std + mean
    g = -(x - mean) / std**2
    # Identity flow: u = x, so the latent score is g and the loss is log(1 + ||g + x||^2).
    loss = trainer.point_loss(tf.constant(x), tf.constant(g)).numpy()
    np.testing.assert_allclose(loss, np.log1p(np.sum((g + x) ** 2, axis=1)), rtol=1e-10)
    # The exact transport z = mean + std * u pulls the target back to N(0, I): zero loss.
    layer = flow.layers[0]
    layer.shift.assign(mean)
    layer.log_scale.assign(np.log(std))
    loss = trainer.point_loss(tf.constant(x), tf.constant(g)).numpy()
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)


def test_a_refit_that_produces_nan_is_rejected_and_the_flow_kept():
    target = _gaussian([0.0, 0.0], [2.0, 0.5])
    flow, trainer = _trainer(target, train_steps=50)
    before = [v.numpy().copy() for v in flow.trainable_variables]
    x = np.random.default_rng(1).normal(size=[100, 2])
    g = trainer.gradients(x)
    # Every step's loss is NaN: the guarded steps skip, and the held-out loss is NaN.
    trainer.point_loss = lambda xb, gb: tf.fill(tf.shape(xb)[:1], tf.constant(np.nan, tf.float64))
    trainer._train = tf.function(trainer._train_chunk, autograph=False)
    trainer._held_out_loss = tf.function(trainer._masked_loss, autograph=False)
    record, _ = trainer.refit(10, x, g, tf.constant([1, 2]), from_moments=True)
    assert not record.accepted and "NaN" in record.note
    for v, b in zip(flow.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)


def test_too_few_points_skip_the_refit_with_a_note():
    target = _gaussian([0.0, 0.0], [1.0, 1.0])
    _, trainer = _trainer(target)
    x = np.zeros([5, 2])
    record, _ = trainer.refit(3, x, x, tf.constant([1, 2]), from_moments=False)
    assert not record.accepted and "refit skipped" in record.note


def test_the_refit_learns_a_badly_scaled_gaussian():
    mean, std = np.array([3.0, -1.0]), np.array([10.0, 0.1])
    target = _gaussian(mean, std)
    flow, trainer = _trainer(target, train_steps=400, learning_rate=0.1)
    x = np.random.default_rng(2).normal(size=[200, 2]) * std + mean
    record, _ = trainer.refit(100, x, trainer.gradients(x), tf.constant([3, 4]), from_moments=False)
    assert record.accepted and record.loss_after < 0.05 * record.loss_before
    # The truth is the target's, not the trainer's: z = mean + std * u.
    layer = flow.layers[0]
    np.testing.assert_allclose(np.exp(layer.log_scale.numpy()), std, rtol=0.1)
    # In latent units (sds of the target) the location is off by less than 0.15.
    np.testing.assert_array_less(np.abs(layer.shift.numpy() - mean), 0.15 * std)


def test_a_refit_runs_all_its_steps_and_rejects_what_does_not_beat_the_current_flow():
    mean, std = np.array([1.0, -2.0]), np.array([2.0, 0.5])
    target = _gaussian(mean, std)
    flow, trainer = _trainer(target, train_steps=300, learning_rate=0.05)
    # The flow is the exact transport: no check can beat its held-out loss of 0.
    flow.layers[0].shift.assign(mean)
    flow.layers[0].log_scale.assign(np.log(std))
    before = [v.numpy().copy() for v in flow.trainable_variables]
    x = np.random.default_rng(3).normal(size=[200, 2]) * std + mean
    record, _ = trainer.refit(100, x, trainer.gradients(x), tf.constant([5, 6]), from_moments=False)
    # No early stop after checks without progress: every one of the 300 Adam steps ran.
    assert int(trainer.optimizer.iterations.numpy()) == 300
    assert not record.accepted and "no better" in record.note
    for v, b in zip(flow.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)


def test_sample_adapt_is_correct_on_a_correlated_gaussian_and_counts_its_gradients():
    mean = np.array([1.0, -1.0, 0.0])
    cov = np.array([[4.0, 1.9, 0.0], [1.9, 1.0, 0.0], [0.0, 0.0, 0.01]])
    prec = np.linalg.inv(cov)

    def log_prob(z):
        r = z - mean
        return -0.5 * tf.einsum("...i,ij,...j->...", r, prec, r)

    target = Target(log_prob, [3], dtype=tf.float64, name="corr3",
                    ground_truth_mean={"x": mean}, ground_truth_std={"x": np.sqrt(np.diag(cov))})
    idata = nf.sample(target, "adapt", adapt_flow=FlowAdaptation(flow="affine_tril", train_steps=150),
                      num_chains=4, num_warmup=300, num_samples=500, seed=3, progress=False)
    attrs = idata.posterior.attrs
    refits = json.loads(attrs["flow_refits"])
    assert len(refits) == 4 and attrs["flow_refits_accepted"] >= 1
    # The gathered draws' gradients are the sampler's (free); 512 tail points per refit cost one each.
    assert attrs["num_grad_evals_training"] == 4 * 512
    table = nf.compare({"adapt": idata})
    row = table.loc["adapt"]
    assert row["max_rhat"] < 1.01
    assert row["max_abs_error_mcse"] < 4.0
    assert 0.85 < row["min_std_ratio"] and row["max_std_ratio"] < 1.15


def test_adapter_observes_only_the_window_draws():
    target = _gaussian([0.0], [1.0])
    adapter = FlowAdapter(target, None, config=FlowAdaptation(flow="affine_diag"), num_warmup=400,
                          num_chains=2, seed=0)
    assert adapter.boundaries == (60, 120, 180, 240)
    buffers = {"z": tf.reshape(tf.range(20 * 2, dtype=tf.float64), [20, 2, 1])}
    adapter.observe(20, 20, buffers)  # steps 20-39: the first 10 are the transient (before step 30)
    np.testing.assert_array_equal(adapter._points[0].ravel(), np.arange(20, 40))
    adapter.observe(240, 20, buffers)  # after the last refit: not kept
    assert len(adapter._points) == 1


@pytest.mark.parametrize("d, scale", [(2, 2.0), (100, 1.3)])
def test_tail_points_reach_a_fixed_distance_beyond_the_typical_radius(d, scale):
    # Before the first refit the identity start's flow is the identity, so the tail
    # points are s u: about 3 units beyond sqrt(d) in every dimension, s <= 2.
    target = _gaussian([0.0] * d, [1.0] * d)
    adapter = FlowAdapter(target, None, config=FlowAdaptation(flow="affine_diag", start="identity"),
                          num_warmup=400, num_chains=2, seed=0)
    adapter.observe(30, 10, {"z": tf.zeros([10, 2, d], tf.float64)})
    x, g, groups = adapter._data(tf.constant([1, 2]))
    tail = x[-512:]
    assert np.isclose(default_tail_scale(d), scale)
    np.testing.assert_allclose(tail.std(), scale, rtol=0.05)
    # Each tail point's gradient is the target's there (N(0, I): -x), and counted.
    np.testing.assert_allclose(g[-512:], -tail, rtol=1e-6)
    assert adapter.num_grad_evals == 20 + 512 and len(np.unique(groups[-512:])) == 512


def test_short_fit_batch_grows_with_the_dimension():
    assert [default_fit_batch_size(d) for d in (2, 10, 11, 51, 100, 320, 1000)] == [8, 8, 16, 48, 80, 256, 256]


def test_bench_adapt_mode_skips_vi_and_writes_its_outputs(tmp_path):
    from neutra_flows.app.bench import run_benchmark

    result = run_benchmark("banana", adapt=True, flow="affine_tril", num_warmup=200, num_samples=100,
                           baseline=False, progress=False, log=None, out=tmp_path)
    assert result.fit is None and list(result.idatas) == ["NeuTra-ADAPT-HMC"]
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["fit"] is None and payload["settings"]["adapt"] is True
    row = payload["table"]["NeuTra-ADAPT-HMC"]
    # The refits' gradients are counted: the draws' are the sampler's (free), 4 x 512 tail points.
    assert row["grad_evals_training"] == 4 * 512
    assert nf.load_flow(tmp_path / "flow").flow_config["name"] == "affine_tril"
    assert "refits kept" in result.report()
    assert "NeuTra-ADAPT-HMC: " in result.report() and "s all-in, first draw at" in result.report()
    assert (tmp_path / "phase_times.png").exists()
    # A flow without a fast inverse is refused before any sampling.
    with pytest.raises(ValueError, match="fast inverse"):
        run_benchmark("banana", adapt=True, flow="iaf", baseline=False, progress=False, log=None)


def test_the_held_out_split_takes_whole_blocks_of_steps():
    target = _gaussian([0.0, 0.0], [1.0, 1.0])
    _, trainer = _trainer(target)
    x = np.random.default_rng(3).normal(size=[200, 2])
    groups = np.arange(200) // 20
    num_train, num_val = trainer._load(x, x, groups, tf.constant([5, 6]))
    held = trainer.buffers.val_x.numpy()[trainer.buffers.val_mask.numpy()]
    rows = [int(np.flatnonzero(np.all(x == h, axis=1))[0]) for h in held]
    # Every held-out group is held out whole, and training keeps the rest.
    held_groups = np.unique(groups[rows])
    assert len(held_groups) and all(np.sum(groups[rows] == k) == 20 for k in held_groups)
    assert num_train + num_val == 200 and 20 <= num_val <= 60


def test_auto_start_fits_briefly_where_the_posterior_has_no_mode():
    # No Gaussian fits the funnel better than the identity, which fails PSIS: the auto
    # start then runs fit_steps of VI, all of whose gradients count: the whitening stage,
    # fit_steps x fit_batch_size, and the fit's few diagnostic draws.
    funnel = nf.models.neals_funnel(3, dtype=tf.float64)
    config = FlowAdaptation(fit_steps=20, fit_batch_size=8)
    adapter = FlowAdapter(funnel, None, config=config, num_warmup=400, num_chains=2, seed=0)
    assert adapter.whitening.method.startswith("identity") and "20-step VI fit" in adapter.start
    assert adapter.num_grad_evals == adapter.whitening.num_grad_evals + 20 * 8 + _FIT_DIAGNOSTIC_DRAWS
    # Its seconds join the run's training time.
    attrs = {"flow_training_time": 1.0}
    adapter.report(attrs)
    assert adapter.start_time > 0 and attrs["flow_training_time"] == 1.0 + adapter.start_time
    # A Gaussian has a mode: the whitening stage alone (here with the refits kept on).
    gaussian = _gaussian([1.0, 2.0], [3.0, 0.5])
    adapter = FlowAdapter(gaussian, None, config=FlowAdaptation(gaussian_khat=None), num_warmup=400,
                          num_chains=2, seed=0)
    assert adapter.whitening.khat < 0.5 and adapter.start == "auto"
    assert adapter.num_grad_evals == adapter.whitening.num_grad_evals
    assert adapter.boundaries and adapter.flow.flow_config["name"] == "realnvp"


def test_auto_start_samples_with_the_gaussian_where_it_passes_psis():
    # The whitening stage's Gaussian passes PSIS: NeuTra samples with it (an affine flow
    # holding the Laplace fit), no refit is planned, and the start's seconds are reported.
    gaussian = _gaussian([1.0, 2.0], [3.0, 0.5])
    adapter = FlowAdapter(gaussian, None, config=FlowAdaptation(), num_warmup=400, num_chains=2, seed=0)
    assert adapter.whitening.method == "laplace" and adapter.whitening.khat < 0.5
    assert adapter.boundaries == () and "whitening stage's Gaussian" in adapter.start
    assert adapter.flow.flow_config["name"] in ("affine_tril", "affine_diag")
    z = tf.constant([[0.5, -1.0]], tf.float64)
    # The flow is the Gaussian: N(0, I) draws pushed through it are N(loc, diag(scale^2)).
    np.testing.assert_allclose(adapter.flow.forward(tf.identity(tf.zeros([1, 2], tf.float64))), [[1.0, 2.0]],
                               rtol=1e-6)
    np.testing.assert_allclose(adapter.flow.inverse(tf.identity(z)), [[(0.5 - 1.0) / 3.0, (-1.0 - 2.0) / 0.5]],
                               rtol=1e-6)
    attrs: dict = {}
    adapter.report(attrs)
    assert json.loads(attrs["flow_start_times"])["whitening"] > 0
    with pytest.raises(ValueError, match="gaussian_khat"):
        FlowAdaptation(gaussian_khat=0.0)


def test_auto_start_fits_instead_where_the_draws_are_too_few(monkeypatch):
    # A funnel above fit_above_dims: no Gaussian passes PSIS, so the flow sample builds
    # is an IAF trained by fit, no refit is planned, and every gradient and second of
    # that fit is reported. Small stand-ins for the 2000 x 256 fit keep the test short.
    import neutra_flows.adaptation as adaptation

    monkeypatch.setattr(adaptation, "_FULL_FIT", {"flow": "iaf", "num_steps": 30, "batch_size": 16})
    funnel = nf.models.neals_funnel(6, dtype=tf.float64)
    fits_instead = FlowAdaptation(fit_above_dims=5)
    adapter = FlowAdapter(funnel, None, config=fits_instead, num_warmup=400, num_chains=2, seed=0)
    assert adapter.flow.flow_config["name"] == "iaf" and adapter.boundaries == ()
    assert "30-step VI fit of an IAF, not refitted" in adapter.start and "6 dimensions" in adapter.start
    assert adapter.num_grad_evals > 30 * 16 and adapter.start_time > 0
    # At the limit, or with the limit off, it adapts as before.
    for limit in (6, None):
        config = FlowAdaptation(fit_above_dims=limit, fit_steps=10)
        adapter = FlowAdapter(funnel, None, config=config, num_warmup=400, num_chains=2, seed=0)
        assert adapter.flow.flow_config["name"] == "realnvp" and len(adapter.boundaries) == 4
    # A flow the user gives is refined as asked, whatever the dimension.
    given = nf.make_flow("realnvp", 6, dtype=tf.float64)
    adapter = FlowAdapter(funnel, given, config=FlowAdaptation(fit_above_dims=5, fit_steps=10), num_warmup=400,
                          num_chains=2, seed=0)
    assert adapter.flow is given and len(adapter.boundaries) == 4
    # Through sample: the run is fit + NeuTra, its attrs say so and hold the fit's cost;
    # return_flow hands back the flow sampled with: the IAF, not the RealNVP asked for.
    idata, flow = nf.sample(funnel, "adapt", adapt_flow=fits_instead, kernel="hmc", num_chains=2,
                            num_warmup=200, num_samples=50, seed=1, progress=False, return_flow=True)
    attrs = idata.posterior.attrs
    assert "not refitted" in attrs["flow_adaptation_start"] and json.loads(attrs["flow_refits"]) == []
    assert attrs["num_grad_evals_training"] > 30 * 16 and attrs["flow_training_time"] > 0
    assert "refits" not in attrs["adaptation"]
    assert flow.flow_config["name"] == "iaf"


def test_bench_adapt_runs_what_sample_adapt_runs(monkeypatch, tmp_path):
    # bench --adapt (and suite --adapt) measure sample(target, "adapt") itself: above
    # fit_above_dims (40) on a funnel it is fit + NeuTra with an IAF, which the report
    # names and the outputs save.
    import neutra_flows.adaptation as adaptation
    from neutra_flows.app.bench import run_benchmark

    monkeypatch.setattr(adaptation, "_FULL_FIT", {"flow": "iaf", "num_steps": 30, "batch_size": 16})
    result = run_benchmark(nf.models.neals_funnel(41), adapt=True, num_warmup=200, num_samples=20,
                           baseline=False, progress=False, log=None, out=tmp_path)
    assert result.fit is None and result.flow.flow_config["name"] == "iaf"
    assert "30-step VI fit of an IAF, not refitted" in result.report()
    assert nf.load_flow(tmp_path / "flow").flow_config["name"] == "iaf"
    assert result.table.iloc[0]["grad_evals_training"] > 30 * 16


def test_the_adaptations_flow_options_reach_make_flow():
    target = _gaussian([0.0, 0.0], [1.0, 1.0])
    config = FlowAdaptation(start="identity", flow_options={"num_layers": 2, "hidden_units": [8]})
    adapter = FlowAdapter(target, None, config=config, num_warmup=400, num_chains=2, seed=0)
    assert adapter.flow.flow_config["options"]["num_layers"] == 2
    with pytest.raises(ValueError, match="flow_options must be a dict"):
        FlowAdaptation(flow_options=[("num_layers", 2)])


def test_the_draws_gradients_are_the_samplers_own_turned_into_the_targets():
    # A nonlinear flow (every weight perturbed) and a few NeuTra-HMC steps: the gradients
    # the adapter keeps for the draws, recovered from the sampler's latent gradients
    # through the flow, are the target's own at those points, and cost no evaluation.
    from neutra_flows import mcmc

    target = nf.models.banana(dtype=tf.float64)
    adapter = FlowAdapter(target, None, config=FlowAdaptation(start="identity"), num_warmup=400,
                          num_chains=3, seed=0)
    for i, v in enumerate(adapter.flow.trainable_variables):
        v.assign(v + 0.3 * tf.random.stateless_normal(v.shape, [i, 7], dtype=v.dtype))
    kernel = nf.NeuTraKernel(target, adapter.flow, kernel="hmc", num_adaptation_steps=400)
    z0, results = kernel.init_chains(3, seed=1)
    advance = mcmc._make_advance(kernel, 20, jit_compile=True, latent_gradient=True)
    *_, buffers = advance(z0, results, tf.constant([1, 2]), tf.constant(20), tf.constant(1))
    adapter.observe(30, 20, buffers)
    x, g = adapter._points[0], adapter._gradients[0]
    assert x.shape == (60, 2) and adapter.num_grad_evals == 0
    direct = adapter._trainer.gradients(x)
    assert np.abs(direct).max() > 1.0  # a banana's gradients, not zeros
    # 1e-5: the recovery subtracts the log-det's gradient (cancellation), and the two
    # run in different programs (the sampler's XLA loop, the trainer's graph).
    np.testing.assert_allclose(g, direct, rtol=1e-5, atol=1e-8)



def test_warnings_after_an_adapted_flow_say_what_to_do_about_it():
    import arviz as az

    from neutra_flows.mcmc import _warn_if_divergent, _warn_if_not_converged

    with pytest.warns(RuntimeWarning, match="adapted on the warm-up draws has weak spots.*another seed"):
        _warn_if_divergent(30, 4000, "NeuTra-HMC", "funnel", "adapted")
    # Two chains in different places: R-hat far above 1.01.
    draws = np.concatenate([np.random.default_rng(0).normal(size=(1, 200)),
                            5.0 + np.random.default_rng(1).normal(size=(1, 200))])
    idata = az.from_dict(posterior={"x": draws})
    with pytest.warns(RuntimeWarning, match="x \\(R-hat .*adapted on the warm-up draws is not good enough"):
        _warn_if_not_converged(idata, "NeuTra-HMC", "funnel", "adapted")
    with pytest.warns(RuntimeWarning, match="train it longer"):
        _warn_if_not_converged(idata, "NeuTra-HMC", "funnel", "neutra")

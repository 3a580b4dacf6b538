"""Tests of NeuTraKernel and sample: exactness against known truths, seeds, errors.

Every statistical check takes its truth from the exact target (``ground_truth_*``
of the built-in targets), never from the chain under test. Flows here are exact
or deliberately imperfect analytic bijectors, so the tests run without training;
the trained-IAF funnel run is marked slow.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import arviz as az
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows import Target, make_flow, models
from neutra_flows._utils import split_seed
from neutra_flows.diagnostics import phase_times
from neutra_flows.mcmc import NeuTraKernel, sample

tfb = tfp.bijectors
tfd = tfp.distributions


# -- analytic flows -------------------------------------------------------------


class FunnelFlow(tfb.Bijector):
    """``u -> (s u0, c exp(s u0 / 2) u_rest)``: Neal's funnel exactly when ``s=3, c=1``.

    Log-det ``log s + (d - 1) (log c + s u0 / 2)`` depends on ``u``, so a sign
    error in how the sampler uses it moves ``x0``.
    """

    def __init__(self, scale0: float = 3.0, c: float = 1.0, dtype=tf.float32):
        parameters = dict(locals())
        self._s = scale0
        self._c = c
        super().__init__(forward_min_event_ndims=1, parameters=parameters, dtype=dtype, name="funnel_flow")

    def _forward(self, u):
        x0 = self._s * u[..., :1]
        return tf.concat([x0, self._c * tf.exp(x0 / 2) * u[..., 1:]], axis=-1)

    def _inverse(self, x):
        x0 = x[..., :1]
        return tf.concat([x0 / self._s, x[..., 1:] * tf.exp(-x0 / 2) / self._c], axis=-1)

    def _forward_log_det_jacobian(self, u):
        d = u.shape[-1]
        return math.log(self._s) + (d - 1) * (math.log(self._c) + self._s * u[..., 0] / 2)


class BananaFlow(tfb.Bijector):
    """``u -> (10 u0, u1 + b (100 u0^2 - 100))``: the banana exactly when ``b`` matches."""

    def __init__(self, b: float, dtype=tf.float32):
        parameters = dict(locals())
        self._b = b
        super().__init__(forward_min_event_ndims=1, parameters=parameters, dtype=dtype, name="banana_flow")

    def _forward(self, u):
        x0 = 10.0 * u[..., 0]
        return tf.stack([x0, u[..., 1] + self._b * (tf.square(x0) - 100.0)], axis=-1)

    def _inverse(self, x):
        x0 = x[..., 0]
        return tf.stack([x0 / 10.0, x[..., 1] - self._b * (tf.square(x0) - 100.0)], axis=-1)

    def _forward_log_det_jacobian(self, u):
        return tf.fill(tf.shape(u)[:-1], tf.constant(math.log(10.0), u.dtype))


def affine_flow(target, dtype=tf.float32) -> tfb.Bijector:
    """The exact whitening map ``u -> mean + L u`` of a Gaussian target."""
    mean = tf.constant(target.ground_truth_mean["x"], dtype)
    tril = tf.constant(np.linalg.cholesky(target.covariance), dtype)
    return tfb.Chain([tfb.Shift(mean), tfb.ScaleMatvecTriL(tril)])


def check_truth(idata, target, *, names=None, z_max=4.0, std_tol=0.10, rhat_max=1.01):
    """|mean - truth| / MCSE < z_max, |std / true std - 1| < std_tol, R-hat < rhat_max."""
    post = idata.posterior
    mcse = az.mcse(post.astype(np.float64), method="mean")
    rhat = az.rhat(post.astype(np.float64))
    for name in names or list(post.data_vars):
        coords = slice(None)
        if isinstance(name, tuple):
            name, coords = name
        x = np.asarray(post[name], np.float64)[..., coords]
        flat = x.reshape(-1, *x.shape[2:])
        true_mean = np.asarray(target.ground_truth_mean[name])[coords]
        true_std = np.asarray(target.ground_truth_std[name])[coords]
        se = np.asarray(mcse[name])[coords]
        z = np.abs(flat.mean(0) - true_mean) / se
        assert np.all(z < z_max), f"{name}: |mean - truth| / MCSE = {z}"
        np.testing.assert_allclose(flat.std(0, ddof=1), true_std, rtol=std_tol)
        assert np.all(np.asarray(rhat[name])[coords] < rhat_max), f"R-hat {rhat[name].values}"


# -- fixtures: one target and flow object per module, so compiled loops are reused ---


@pytest.fixture(scope="module")
def gaussian():
    target = models.correlated_gaussian(3, 0.9, mean=[1.0, -2.0, 0.5], scale=[1.0, 2.0, 0.5])
    return target, affine_flow(target)


@pytest.fixture(scope="module")
def gaussian_hmc(gaussian):
    target, flow = gaussian
    return sample(
        target,
        flow,
        kernel="hmc",
        num_chains=4,
        num_warmup=300,
        num_samples=1000,
        seed=7,
        progress=False,
    )


# -- correctness ------------------------------------------------------------------


def test_gaussian_hmc_chees_matches_truth(gaussian, gaussian_hmc):
    target, _ = gaussian
    check_truth(gaussian_hmc, target)
    attrs = gaussian_hmc.posterior.attrs
    assert attrs["sampler"] == "NeuTra-HMC"
    assert "ChEES" in attrs["adaptation"]
    # On an exactly whitened Gaussian the adapted trajectory is O(1) latent units.
    assert 0.3 < attrs["trajectory_length"] < 5.0
    assert attrs["mean_leapfrog_steps"] >= 1.0


def test_sample_stats_and_attrs(gaussian, gaussian_hmc):
    target, _ = gaussian
    idata = gaussian_hmc
    stats = idata.sample_stats
    for key in ("diverging", "acceptance_rate", "step_size", "n_steps", "lp", "energy"):
        assert stats[key].dims == ("chain", "draw"), key
        assert stats[key].shape == (4, 1000)
    assert "tree_depth" not in stats
    assert idata.posterior["x"].shape == (4, 1000, 3)
    assert stats["diverging"].dtype == bool
    attrs = idata.posterior.attrs
    assert attrs["num_grad_evals_sampling"] == int(stats["n_steps"].sum())
    assert attrs["num_grad_evals_warmup"] > 0
    assert attrs["num_divergences_sampling"] == int(stats["diverging"].sum())
    for key in ("compile_time", "warmup_time", "sampling_time"):
        assert attrs[key] >= 0.0
    assert attrs["num_chains"] == 4 and attrs["seed"] == 7 and attrs["kernel"] == "hmc"
    assert "ground_truth" in attrs and "flow_training_time" not in attrs
    # lp is the target's density at the draws, not the latent density.
    z = idata.posterior["x"].values[:, :5].reshape(-1, 3)
    np.testing.assert_allclose(
        stats["lp"].values[:, :5].reshape(-1), target.unnormalized_log_prob(z).numpy(), rtol=1e-5
    )
    # All draws after warm-up use the frozen step size.
    assert np.unique(stats["step_size"].values).size == 1
    acc = stats["acceptance_rate"].values
    assert np.all((acc >= 0) & (acc <= 1)) and 0.5 < acc.mean() <= 1.0
    # The exact whitening flow makes the latent exactly N(0, I_3), so the energy
    # H = -log N(u) + |p|^2 / 2 averages 3/2 log(2 pi) + 3/2 + 3/2 (pins its sign
    # and its space), and E-BFMI is near 1.
    np.testing.assert_allclose(stats["energy"].values.mean(), 1.5 * np.log(2 * np.pi) + 3.0, atol=0.25)
    assert np.all(az.bfmi(idata) > 0.6)


def test_same_seed_same_draws_other_seed_differs(gaussian, gaussian_hmc):
    target, flow = gaussian
    again = sample(
        target,
        flow,
        kernel="hmc",
        num_chains=4,
        num_warmup=300,
        num_samples=1000,
        seed=7,
        progress=True,
    )
    np.testing.assert_array_equal(again.posterior["x"].values, gaussian_hmc.posterior["x"].values)
    np.testing.assert_array_equal(
        again.sample_stats["n_steps"].values, gaussian_hmc.sample_stats["n_steps"].values
    )
    other = sample(
        target,
        flow,
        kernel="hmc",
        num_chains=4,
        num_warmup=300,
        num_samples=1000,
        seed=8,
        progress=False,
    )
    assert not np.allclose(other.posterior["x"].values, gaussian_hmc.posterior["x"].values)


def test_fit_result_training_time_is_recorded(gaussian, gaussian_hmc):
    from neutra_flows import compare

    target, flow = gaussian
    fit_like = SimpleNamespace(flow=flow, wall_time=12.5)
    idata = sample(
        target,
        fit_like,
        kernel="hmc",
        num_chains=4,
        num_warmup=300,
        num_samples=1000,
        seed=7,
        progress=False,
    )
    assert idata.posterior.attrs["flow_training_time"] == 12.5
    np.testing.assert_array_equal(idata.posterior["x"].values, gaussian_hmc.posterior["x"].values)
    row = compare({"r": idata}).loc["r"]
    attrs = idata.posterior.attrs
    # The all-in clock counts the flow's training, then every second of the call.
    np.testing.assert_allclose(row["total_time"], attrs["total_time"])
    assert attrs["total_time"] > 12.5 + attrs["compile_time"] + attrs["warmup_time"] + attrs["sampling_time"]
    phases = phase_times(idata)
    assert phases["training"] == 12.5 and list(phases)[0] == "training"
    np.testing.assert_allclose(sum(phases.values()), attrs["total_time"], rtol=1e-9)
    first = attrs["time_to_first_draw"]
    assert 12.5 + attrs["compile_time"] + attrs["warmup_time"] < first < attrs["total_time"]
    assert row["time_to_first_draw"] == attrs["time_to_first_draw"]


def test_phase_times_add_up_to_the_all_in_clock(gaussian, gaussian_hmc):
    # Every second of the call is in one phase, in the order they ran, and the
    # stacked-bar picture draws them.
    from neutra_flows.plots import plot_phase_times

    attrs = gaussian_hmc.posterior.attrs
    phases = phase_times(gaussian_hmc)
    assert list(phases) == ["set-up", "compilation", "warm-up", "sampling", "assembly", "other"]
    assert all(v >= 0 for v in phases.values())
    assert phases["compilation"] == attrs["compile_time"] and phases["sampling"] == attrs["sampling_time"]
    np.testing.assert_allclose(sum(phases.values()), attrs["total_time"], rtol=1e-9)
    assert attrs["compile_time"] < attrs["time_to_first_draw"] < attrs["total_time"]
    fig = plot_phase_times({"NeuTra": gaussian_hmc, "by hand": {"compilation": 1.0, "sampling": 2.0}})
    assert len(fig.axes[0].patches) == len(phases) + 2
    with pytest.raises(ValueError, match="mapping"):
        plot_phase_times(gaussian_hmc)


def test_user_init_state_is_pulled_back(gaussian):
    target, flow = gaussian
    z0 = np.tile(np.array([[1.0, -2.0, 0.5]], np.float32), [4, 1]) + 0.1
    idata = sample(
        target,
        flow,
        kernel="hmc",
        num_chains=4,
        num_warmup=300,
        num_samples=1000,
        seed=3,
        init_state=z0,
        progress=False,
    )
    check_truth(idata, target)


def test_banana_float64_nuts_matches_truth():
    target = models.banana(dtype=tf.float64)
    idata = sample(
        target,
        BananaFlow(0.03, dtype=tf.float64),
        kernel="nuts",
        num_chains=4,
        num_warmup=200,
        num_samples=1000,
        seed=1,
        progress=False,
    )
    assert idata.posterior["x"].dtype == np.float64
    assert idata.sample_stats["lp"].dtype == np.float64
    assert idata.posterior.attrs["dtype"] == "float64"
    check_truth(idata, target)
    stats = idata.sample_stats
    assert int(stats["diverging"].sum()) == 0
    n, depth = stats["n_steps"].values, stats["tree_depth"].values
    # A NUTS tree of depth j (j doublings) holds 2^(j-1) ... 2^j - 1 leapfrog steps
    # (Stan's treedepth convention); the depth never exceeds max_tree_depth.
    assert np.all((2 ** (depth - 1) <= n) & (n <= 2**depth - 1)) and depth.max() <= 10 and depth.min() >= 1
    assert idata.posterior.attrs["max_tree_depth"] == 10
    assert math.isnan(idata.posterior.attrs["trajectory_length"])
    # The exact flow makes the latent N(0, I_2): E[H] = log(2 pi) + 2 (see above).
    np.testing.assert_allclose(stats["energy"].values.mean(), np.log(2 * np.pi) + 2.0, atol=0.2)


def test_funnel_10d_no_divergences_and_x0_matches():
    target = models.neals_funnel(10)
    # A flow that gets the funnel's neck right but x0's scale wrong (2.5 vs 3).
    idata = sample(
        target,
        FunnelFlow(2.5),
        kernel="hmc",
        num_chains=4,
        num_warmup=300,
        num_samples=1000,
        seed=2,
        progress=False,
    )
    assert int(idata.sample_stats["diverging"].sum()) == 0
    check_truth(idata, target, names=[("x", 0)])


def test_log_det_sign_pulled_back_density_is_standard_normal():
    # NumPyro issue 340: with the exact funnel flow the pulled-back density
    # log p(f(u)) + log|det f'(u)| is exactly N(0, I); the opposite sign would be
    # off by 2 log|det f'(u)|, which varies with u0.
    target = models.neals_funnel(5, dtype=tf.float64)
    kernel = NeuTraKernel(target, FunnelFlow(dtype=tf.float64), kernel="nuts", num_adaptation_steps=0)
    u = tf.random.stateless_normal([6, 5], seed=[1, 2], dtype=tf.float64) * 1.5
    results = kernel.bootstrap_results(transformed_init_state=u)
    latent_lp = results.inner_results.inner_results.target_log_prob
    expected = tf.reduce_sum(tfd.Normal(tf.constant(0.0, tf.float64), 1.0).log_prob(u), -1)
    np.testing.assert_allclose(latent_lp.numpy(), expected.numpy(), rtol=1e-10, atol=1e-10)
    z0, _ = kernel.init_chains(3, seed=5)
    np.testing.assert_allclose(results.inner_results.transformed_state.numpy(), u.numpy())
    assert z0.shape == (3, 5) and z0.dtype == tf.float64


def test_kernel_in_sample_chain_equals_sample(gaussian):
    target, flow = gaussian
    warmup, draws = 300, 25
    # Without the latent-scale window `sample` is sample_chain with a NeuTraKernel.
    plain = sample(target, flow, kernel="hmc", num_chains=4, num_warmup=warmup, num_samples=draws, seed=7,
                   progress=False, adapt_latent_scale=False)
    kernel = NeuTraKernel(target, flow, kernel="hmc", num_adaptation_steps=warmup)
    init_seed, run_seed = split_seed(7)
    # The starts are drawn outside the compiled loop, as `sample` does: XLA's
    # stateless RNG differs from eager's (so draws also differ between
    # jit_compile=True and False; each is reproducible).
    z0, results = kernel.init_chains(4, seed=init_seed)

    @tf.function(autograph=False, jit_compile=True)
    def run(z0, results):
        return tfp.mcmc.sample_chain(
            draws,
            z0,
            results,
            kernel=kernel,
            num_burnin_steps=warmup,
            trace_fn=None,
            seed=run_seed,
        )

    expected = np.swapaxes(run(z0, results).numpy(), 0, 1)
    # Two XLA programs may fuse float ops differently: equal up to rounding.
    np.testing.assert_allclose(plain.posterior["x"].values, expected, rtol=1e-4, atol=1e-5)


def test_latent_scale_window_absorbs_a_flow_that_is_too_narrow():
    # A flow that maps N(0, I) to a quarter of the target's scale: the window
    # must find a latent scale near 4 on every coordinate, and the draws stay right.
    target = models.correlated_gaussian(3, 0.0, scale=[1.0, 2.0, 0.5], dtype=tf.float64)
    flow = make_flow("affine_diag", 3, dtype=tf.float64)
    flow.layers[0].log_scale.assign(np.log([0.25, 0.5, 0.125]))
    idata = sample(target, flow, kernel="hmc", num_chains=4, num_warmup=400, num_samples=500, seed=3,
                   progress=False)
    attrs = idata.posterior.attrs
    assert "latent diagonal scale" in attrs["adaptation"]
    assert 3.0 < attrs["latent_scale_min"] and attrs["latent_scale_max"] < 5.5
    draws = idata.posterior["x"].values.reshape(-1, 3)
    np.testing.assert_allclose(draws.std(0), [1.0, 2.0, 0.5], rtol=0.15)
    off = sample(target, flow, kernel="hmc", num_chains=4, num_warmup=400, num_samples=500, seed=3,
                 progress=False, adapt_latent_scale=False)
    assert "latent_scale_min" not in off.posterior.attrs
    # The cached kernel starts each run at s = 1 again.
    assert "latent diagonal scale" not in off.posterior.attrs["adaptation"]


def test_rhat_warning_names_the_variable():
    target = models.correlated_gaussian(2, 0.0, dtype=tf.float64)
    flow = make_flow("affine_diag", 2, dtype=tf.float64)
    # Two chains far apart that cannot mix in 30 steps of a tiny step size.
    z0 = np.array([[-30.0, 0.0], [30.0, 0.0]])
    with pytest.warns(RuntimeWarning, match=r"have not converged.*x \(R-hat"):
        sample(target, flow, kernel="hmc", num_leapfrog_steps=1, num_chains=2, num_warmup=0,
               num_samples=30, step_size=1e-3, init_state=z0, seed=0, progress=False)


def test_baseline_nuts_windowed_adaptation():
    target = models.correlated_gaussian(2, 0.3, scale=[1.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        # Graph mode: XLA-compiling the windowed adaptation costs more than this short run.
        idata = sample(
            target,
            None,
            kernel="nuts",
            num_chains=4,
            num_warmup=100,
            num_samples=300,
            seed=5,
            progress=False,
            jit_compile=False,
        )
    attrs = idata.posterior.attrs
    assert attrs["sampler"] == "NUTS" and attrs["flow"] == "none"
    assert "windowed" in attrs["adaptation"]
    assert set(idata.sample_stats.data_vars) >= {"tree_depth", "energy", "lp", "n_steps"}
    check_truth(idata, target, std_tol=0.15, rhat_max=1.02)


def test_divergent_run_returns_and_warns():
    target = models.correlated_gaussian(2, 0.0)
    with pytest.warns(RuntimeWarning, match="diverged"):
        idata = sample(
            target,
            tfb.Identity(),
            kernel="hmc",
            num_chains=2,
            num_warmup=0,
            num_samples=20,
            seed=0,
            step_size=5.0,
            num_leapfrog_steps=10,
            progress=False,
            jit_compile=False,
        )
    div = idata.sample_stats["diverging"].values
    assert div.sum() > 20
    assert idata.posterior.attrs["num_divergences_sampling"] == int(div.sum())
    np.testing.assert_array_equal(idata.sample_stats["n_steps"].values, 10)
    assert idata.posterior.attrs["trajectory_length"] == pytest.approx(50.0)


# -- bad input ------------------------------------------------------------------------


def _nan_outside(width: float) -> Target:
    def log_prob(x):
        inside = tf.reduce_all(tf.abs(x) < width, axis=-1)
        lp = -0.5 * tf.reduce_sum(tf.square(x), -1)
        return tf.where(inside, lp, tf.constant(np.nan, x.dtype))

    return Target(log_prob, 2, name="nan_outside")


def test_bad_inputs_raise_value_error():
    target = models.correlated_gaussian(2, 0.5)
    wrong = tfb.ScaleMatvecTriL(tf.eye(3))
    with pytest.raises(ValueError, match="event size"):
        sample(target, wrong, num_chains=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="event size"):
        NeuTraKernel(target, wrong, num_adaptation_steps=10)
    with pytest.raises(ValueError, match="num_chains"):
        sample(target, tfb.Identity(), num_chains=0, seed=0, progress=False)
    bad = np.zeros([2, 2], np.float32)
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        sample(target, tfb.Identity(), num_chains=2, seed=0, init_state=bad, progress=False)
    with pytest.raises(ValueError, match="shape"):
        sample(target, tfb.Identity(), num_chains=2, seed=0, init_state=np.zeros([3, 2]))
    with pytest.raises(ValueError, match="kernel"):
        sample(target, tfb.Identity(), kernel="mala", seed=0)
    with pytest.raises(ValueError, match="num_chains >= 2"):
        sample(target, tfb.Identity(), kernel="hmc", num_chains=1, seed=0, progress=False)
    with pytest.raises(ValueError, match="num_leapfrog_steps"):
        sample(target, None, kernel="hmc", seed=0, progress=False)
    stochastic = tfb.Identity()
    stochastic.exact_log_det = False
    with pytest.raises(ValueError, match="exact"):
        sample(target, stochastic, seed=0, progress=False)


def test_target_nan_at_starting_draws_raises():
    target = _nan_outside(1.0)
    with pytest.raises(ValueError, match="log density is nan"):
        sample(target, tfb.Identity(), num_chains=8, seed=0, progress=False)
    with pytest.raises(ValueError, match="log density is nan"):
        sample(target, None, num_chains=8, seed=0, progress=False)


# -- the real pipeline, slow ------------------------------------------------------------


@pytest.mark.slow
def test_funnel_10d_trained_iaf_no_divergences():
    from neutra_flows import fit, make_flow

    target = models.neals_funnel(10)
    flow = make_flow("iaf", 10)
    # The NeuTra paper's budget (batch 1024, 5000 steps). With 3000 steps of batch 512
    # the IAF's tails stay steep enough for a few divergences per 16000 transitions.
    result = fit(target, flow, num_steps=5000, batch_size=1024, seed=0, progress=False, global_clipnorm=10.0)
    idata = sample(
        target, result, kernel="hmc", num_chains=16, num_warmup=500, num_samples=1000, seed=1, progress=False
    )
    assert int(idata.sample_stats["diverging"].sum()) == 0
    assert idata.posterior.attrs["flow_training_time"] == pytest.approx(result.wall_time)
    check_truth(idata, target, names=[("x", 0)])


@pytest.mark.slow
def test_banana_trained_iaf_matches_truth():
    from neutra_flows import fit, make_flow

    target = models.banana()
    result = fit(target, make_flow("iaf", 2), num_steps=2000, batch_size=512, seed=0, progress=False)
    with warnings.catch_warnings():
        # A handful of divergences at the flow's tails is expected; the truth must hold.
        warnings.simplefilter("ignore", RuntimeWarning)
        idata = sample(
            target,
            result,
            kernel="hmc",
            num_chains=16,
            num_warmup=500,
            num_samples=1000,
            seed=1,
            progress=False,
        )
    check_truth(idata, target)
    assert int(idata.sample_stats["diverging"].sum()) < 0.005 * 16 * 1000


# -- argument checks that come before any work -----------------------------------------------


def _refuse_to_start_a_flow(monkeypatch):
    """Makes any flow adaptation's start fail loudly: a check that must come first shows it did."""
    import neutra_flows.mcmc as mcmc

    def started(*_args, **_kwargs):
        raise AssertionError("the flow adaptation started before the arguments were checked")

    monkeypatch.setattr(mcmc, "FlowAdapter", started)


def test_trace_size_and_init_state_are_checked_before_the_flow_adaptation_starts(monkeypatch):
    _refuse_to_start_a_flow(monkeypatch)
    target = models.correlated_gaussian(2, 0.5)
    common = dict(num_chains=2, num_warmup=200, num_samples=100, seed=0, progress=False)
    with pytest.raises(ValueError, match="above max_trace_bytes"):
        sample(target, "adapt", max_trace_bytes=1000, **common)
    with pytest.raises(ValueError, match=r"init_state must have shape \[num_chains, d\] = \[2, 2\]"):
        sample(target, "adapt", init_state=np.zeros([3, 2]), **common)
    with pytest.raises(ValueError, match="init_state: chain 0 starts at a non-finite point"):
        sample(target, "adapt", init_state=np.full([2, 2], np.nan), **common)


@pytest.mark.parametrize("limit", [0, -1, 2.5e9, True, "4GiB"])
def test_max_trace_bytes_must_be_a_positive_int_or_none(limit):
    with pytest.raises(ValueError, match="max_trace_bytes must be a positive int"):
        sample(models.correlated_gaussian(2, 0.5), None, max_trace_bytes=limit, seed=0, progress=False)


def test_trace_size_advice_suggests_a_thin_that_divides_num_samples():
    from neutra_flows.mcmc import _check_trace_size

    # 4 chains x (2 x 3 + 7) x 4 bytes = 208 bytes per kept draw; 100 draws = 20800 bytes.
    with pytest.raises(ValueError, match=r"thin=4 keeps 25 per chain") as info:
        _check_trace_size(4, 100, 1, 3, tf.float32, 208 * 30)  # 30 draws fit: thin 4 (25), not 3 (33)
    assert "20.31 KiB" in str(info.value)
    with pytest.raises(ValueError, match=r"thin=100 keeps 1 per chain"):
        _check_trace_size(4, 100, 2, 3, tf.float32, 208)  # exactly one kept draw fits
    # Not even one draw per chain fits: no thin can help, only fewer chains or a larger limit.
    with pytest.raises(ValueError, match="one kept draw per chain takes 208 bytes: run fewer chains") as info:
        _check_trace_size(4, 100, 1, 3, tf.float32, 207)
    assert "thin=" not in str(info.value)
    _check_trace_size(4, 100, 4, 3, tf.float32, 208 * 25)  # the suggestion passes


@pytest.mark.parametrize("flow", [None, tfb.Identity()], ids=["baseline", "neutra"])
@pytest.mark.parametrize(
    "bad, match",
    [(dict(target_accept_prob=1.5), "target_accept_prob must lie in"),
     (dict(target_accept_prob=0.0), "target_accept_prob must lie in"),
     (dict(step_size=-0.1), "step_size must be a positive finite float"),
     (dict(step_size=float("nan")), "step_size must be a positive finite float"),
     (dict(step_size="big"), "step_size must be a positive finite float")],
    ids=["accept_1.5", "accept_0", "step_negative", "step_nan", "step_string"])
def test_step_size_and_target_accept_prob_are_checked_for_every_sampler(flow, bad, match):
    with pytest.raises(ValueError, match=match):
        sample(models.correlated_gaussian(2, 0.5), flow, num_chains=2, num_warmup=10, num_samples=10, seed=0,
               progress=False, **bad)


def test_a_flow_start_that_gives_up_is_a_value_error_of_sample(monkeypatch):
    # -inf on the half-space x0 < 0 (no constraining bijector): every batch of the start's short fit
    # has draws there, so fit gives up; sample says which of its steps failed, and passes jit_compile on.
    import neutra_flows.vi as vi
    from neutra_flows.adaptation import FlowAdaptation

    def log_prob(x):
        lp = -0.5 * tf.reduce_sum(tf.square(x), axis=-1)
        return tf.where(x[..., 0] > 0, lp, tf.constant(-np.inf, x.dtype))

    calls, real_fit = [], vi.fit

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(vi, "fit", spy)
    config = FlowAdaptation(start="fit", fit_steps=10, fit_batch_size=64,
                            flow_options=dict(num_layers=2, hidden_units=[4]))
    with pytest.raises(ValueError, match=r"sample\(target, 'adapt'\): the flow's start \(a 10-step VI fit\)") \
            as info:
        sample(Target(log_prob, 2, name="half_space"), "adapt", adapt_flow=config, num_chains=2,
               num_warmup=200, num_samples=10, seed=0, progress=False, jit_compile=False)
    assert isinstance(info.value.__cause__, RuntimeError) and "constraining_bijector" in str(info.value)
    assert [c["jit_compile"] for c in calls] == [False]


def test_the_compiled_loop_is_never_reused_for_another_target_flow_or_chain_count():
    # Same shapes, same flow object, same settings: the cache keyed on what the graph
    # bakes in must still recompile for a new target (its density is in the graph) and
    # a new chain count, and draw each target's own posterior.
    from neutra_flows import mcmc

    def shifted(mean):
        return Target(lambda z: -0.5 * tf.reduce_sum(tf.square(z - mean), -1), [2], dtype=tf.float64,
                      name=f"shifted_{mean}")

    flow = make_flow("affine_diag", 2, dtype=tf.float64)
    common = dict(kernel="hmc", num_leapfrog_steps=3, num_warmup=100, num_samples=300, progress=False)
    keys = []
    for mean, chains in ((0.0, 2), (50.0, 2), (50.0, 3)):
        target = shifted(mean)
        idata = sample(target, flow, num_chains=chains, seed=0, **common)
        x = idata.posterior["x"].values
        assert x.shape == (chains, 300, 2)
        np.testing.assert_allclose(x.mean(axis=(0, 1)), [mean, mean], atol=0.5)
        keys.append(mcmc._Settings.check(target, kernel="hmc", num_chains=chains, num_warmup=100,
                                         num_samples=300, seed=0, step_size=None, target_accept_prob=None,
                                         num_leapfrog_steps=3, max_tree_depth=10, thin=1, jit_compile=True,
                                         progress=False, strategy=None).cache_key(target, flow))
    other_flow = make_flow("affine_diag", 2, dtype=tf.float64)
    assert len(set(keys)) == 3 and keys[-1] != keys[-1][:1] + (id(other_flow),) + keys[-1][2:]

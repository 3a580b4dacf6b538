"""Tests of the independence proposals mixed with NeuTra (``independence_steps``).

Truths come from the exact Gaussian targets; flows are analytic (an exact
Cholesky factor, or one 30 % too wide), so no test trains anything.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows import Target, independence, models
from neutra_flows.mcmc import NeuTraKernel, sample

tfb = tfp.bijectors


def _gaussian(d=3):
    target = models.correlated_gaussian(ndims=d, dtype=tf.float64)
    chol = np.linalg.cholesky(np.asarray(target.covariance))
    return target, chol


def _errors_in_mcse(idata, target):
    import arviz as az

    post = idata.posterior["x"].values.reshape(-1, target.event_size)
    ess = np.asarray(az.ess(idata.posterior)["x"])
    truth = np.asarray(target.ground_truth_mean["x"])
    sd = np.asarray(target.ground_truth_std["x"])
    return np.abs(post.mean(0) - truth) / (sd / np.sqrt(ess)), post.std(0) / sd


@pytest.mark.parametrize("kernel", ["hmc", "nuts"])
def test_an_exact_flow_accepts_every_proposal_and_the_draws_are_right(kernel):
    target, chol = _gaussian()
    flow = tfb.ScaleMatvecTriL(tf.constant(chol))
    idata = sample(target, flow, kernel=kernel, num_chains=4, num_warmup=200, num_samples=800, seed=3,
                   independence_steps=3, progress=False)
    attrs = idata.posterior.attrs
    stats = idata.sample_stats
    proposals = np.asarray(stats["n_steps"]) == 0
    # Three of every four post-warm-up transitions are proposals.
    assert proposals.sum() == 4 * 600
    assert attrs["num_density_evals_sampling"] == 4 * 600
    # The weight is constant for an exact flow: every proposal is accepted.
    assert attrs["independence_acceptance_rate"] > 0.999
    assert np.asarray(stats["independence_accepted"])[proposals].all()
    assert not np.asarray(stats["independence_accepted"])[~proposals].any()
    assert np.isnan(np.asarray(stats["energy"])[proposals]).all()
    assert np.isfinite(np.asarray(stats["energy"])[~proposals]).all()
    # Gradients: the NeuTra steps' leapfrogs plus one refresh per chain before each of the
    # 200 NeuTra steps but the first (the warm-up, not a proposal, came before it).
    leapfrogs = int(np.asarray(stats["n_steps"]).sum())
    assert attrs["num_grad_evals_sampling"] == leapfrogs + 4 * 199
    err, std_ratio = _errors_in_mcse(idata, target)
    assert err.max() < 4.0
    np.testing.assert_allclose(std_ratio, 1.0, atol=0.08)


def test_a_too_wide_flow_rejects_some_proposals_and_stays_exact():
    target, chol = _gaussian()
    flow = tfb.ScaleMatvecTriL(tf.constant(1.3 * chol))
    idata = sample(target, flow, kernel="hmc", num_chains=4, num_warmup=200, num_samples=1200, seed=5,
                   independence_steps=2, adapt_latent_scale=False, progress=False)
    rate = idata.posterior.attrs["independence_acceptance_rate"]
    # q = N(0, 1.69 S) against p = N(0, S): an acceptance well below one, far above zero.
    assert 0.4 < rate < 0.95
    err, std_ratio = _errors_in_mcse(idata, target)
    assert err.max() < 4.0
    np.testing.assert_allclose(std_ratio, 1.0, atol=0.08)


def test_a_proposal_with_a_non_finite_log_density_is_rejected():
    # NaN below x0 = -0.5: a proposal there must never be accepted (HMC itself treats NaN as a rejection).
    def log_prob(x):
        lp = -0.5 * tf.reduce_sum(x * x, axis=-1)
        return tf.where(x[..., 0] < -0.5, tf.constant(np.nan, x.dtype), lp)

    target = Target(log_prob, 2, dtype=tf.float64, name="nan_below", validate=False)
    start = np.full((4, 2), 0.5)
    with warnings.catch_warnings():
        # HMC's trajectories that reach the NaN wall are divergences, rightly reported.
        warnings.simplefilter("ignore", RuntimeWarning)
        idata = sample(target, tfb.Identity(), kernel="hmc", num_chains=4, num_warmup=100, num_samples=400,
                       seed=2, independence_steps=2, init_state=start, progress=False)
    x = idata.posterior["x"].values
    assert (x[..., 0] >= -0.5).all()
    stats = idata.sample_stats
    proposals = np.asarray(stats["n_steps"]) == 0
    # About a third of N(0, 1) lies below -0.5: proposals were made there, and rejected.
    assert 0.3 < idata.posterior.attrs["independence_acceptance_rate"] < 0.9
    assert np.isfinite(np.asarray(stats["lp"])).all()
    assert proposals.any()


def test_the_kernel_works_in_tfp_sample_chain_and_bootstraps_the_wrapper():
    target, chol = _gaussian(2)
    kernel = NeuTraKernel(target, tfb.ScaleMatvecTriL(tf.constant(chol)), kernel="hmc",
                          num_adaptation_steps=50, independence_steps=1)
    z0, results = kernel.init_chains(4, seed=1)
    assert isinstance(results, independence.NeuTraIndependenceResults)
    draws, accepted = tfp.mcmc.sample_chain(
        40, z0, results, kernel=kernel, num_burnin_steps=50, seed=(1, 2),
        trace_fn=lambda _, r: r.independence_accepted)
    assert draws.shape == (40, 4, 2)
    # Every other post-warm-up transition is a proposal, all accepted with the exact flow.
    assert int(tf.reduce_sum(tf.cast(accepted, tf.int32))) == 4 * 20


def test_count_proposals_matches_the_schedule():
    for k in (1, 2, 3):
        for warm in (0, 5):
            flags = independence.is_independence_step(tf.range(40), warm, k).numpy()
            for first, n in ((0, 40), (3, 20), (7, 1), (12, 28)):
                assert independence.count_proposals(first, n, warm, k) == flags[first:first + n].sum()
    assert independence.count_proposals(0, 40, 5, 0) == 0


def test_bad_independence_settings_are_refused():
    target, chol = _gaussian(2)
    flow = tfb.ScaleMatvecTriL(tf.constant(chol))
    with pytest.raises(ValueError, match="independence_steps"):
        sample(target, flow, kernel="hmc", num_chains=2, num_warmup=10, num_samples=10, seed=1,
               independence_steps=-1, progress=False)
    with pytest.raises(ValueError, match="baseline"):
        sample(target, None, kernel="nuts", num_chains=2, num_warmup=10, num_samples=10, seed=1,
               independence_steps=2, progress=False)
    with pytest.raises(ValueError, match="independence_steps"):
        NeuTraKernel(target, flow, num_adaptation_steps=10, independence_steps=1.5)


def test_a_run_with_proposals_never_reuses_the_program_without_them():
    target, chol = _gaussian(2)
    flow = tfb.ScaleMatvecTriL(tf.constant(chol))
    common = dict(kernel="hmc", num_chains=2, num_warmup=50, num_samples=60, seed=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = sample(target, flow, **common)
        mixed = sample(target, flow, independence_steps=1, **common)
    assert "independence_accepted" not in plain.sample_stats
    assert (np.asarray(mixed.sample_stats["n_steps"]) == 0).sum() == 2 * 30

"""Tests for neutra_flows.vi: fit (reverse KL), fit_to_data (maximum likelihood).

Training runs are kept short (small networks, few steps, graph mode where XLA
compilation would dominate); long statistical runs are marked slow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from neutra_flows import DataFitResult, FitResult, Target, fit, fit_to_data, make_flow, models
from neutra_flows.vi import default_learning_rate

tfb = tfp.bijectors
tfd = tfp.distributions

QUICK = dict(progress=False, jit_compile=False)


def _std_normal_lp(x):
    return tf.reduce_sum(-0.5 * tf.square(x) - 0.5 * math.log(2 * math.pi), axis=-1)


# -- fit: accuracy ------------------------------------------------------------------------


def test_affine_tril_recovers_correlated_gaussian_with_xla():
    t = models.correlated_gaussian(3, 0.8, mean=[1.0, -2.0, 0.5], scale=[1.0, 2.0, 0.5])
    flow = make_flow("affine_tril", 3)
    lr = default_learning_rate(800, initial=3e-2)
    r = fit(t, flow, num_steps=800, batch_size=256, learning_rate=lr, seed=0, progress=False)
    assert isinstance(r, FitResult) and r.losses.shape == (800,) and r.num_steps == 800
    u0 = tf.zeros([1, 3])
    with tf.GradientTape() as tape:
        tape.watch(u0)
        z0 = flow.forward(u0)
    jac = tape.batch_jacobian(z0, u0)[0].numpy().astype(np.float64)
    mean, cov = z0.numpy()[0], jac @ jac.T
    np.testing.assert_allclose(mean, [1.0, -2.0, 0.5], atol=0.05)
    scale = np.sqrt(np.diag(t.covariance))
    np.testing.assert_allclose(cov / np.outer(scale, scale), t.covariance / np.outer(scale, scale), atol=0.05)
    # The target is normalised and in the family: KL ~ 0, weights ~ uniform.
    assert -r.elbo < 0.01
    assert r.khat < 0.5 and r.ess_is > 0.9 * r.num_diagnostic_draws
    assert r.wall_time > 0 and not r.notes


def _affine_then_nsf():
    # A spline maps [-bound, bound] onto itself (identity outside), so it cannot
    # stretch N(0, 1) to the banana's spread (x0 has sd 10) by itself: a trainable
    # diagonal affine layer after it sets the scale, the spline the shape.
    # whitening="none": inside a hand-built Chain, fit sees no whitening layer to set.
    nsf = make_flow("nsf", 2, hidden_units=[16, 16], num_layers=2, bound=10.0, whitening="none")
    return tfb.Chain([make_flow("affine_diag", 2), nsf])


# name: (flow factory, batch size, initial learning rate, seed) for 1000 steps on a CPU.
# Measured k-hat with seeds 0, 1, 2: iaf 0.52, 0.30, 0.46; affine+nsf 0.60, 0.40, 0.47 before the
# coupling spline's logit scaling, 0.55, 0.73, 0.78 after it (KL 0.0085-0.0099 in all three).
BANANA_FLOWS = {
    "iaf": (lambda: make_flow("iaf", 2, hidden_units=[16, 16]), 1024, 3e-2, 0),
    "nsf": (_affine_then_nsf, 512, 3e-2, 0),
}


@pytest.mark.parametrize("name", sorted(BANANA_FLOWS))
def test_banana_reaches_small_kl_and_good_khat(name):
    t = models.banana()
    make, batch_size, lr, seed = BANANA_FLOWS[name]
    schedule = default_learning_rate(1000, initial=lr)
    r = fit(t, make(), num_steps=1000, batch_size=batch_size, learning_rate=schedule, seed=seed, **QUICK)
    kl = -r.elbo  # banana is normalised: -ELBO estimates KL(q || p)
    assert kl < 0.05, r.summary()
    assert kl > -4 * r.elbo_se  # an estimate of a KL, up to noise
    assert r.khat < 0.7, r.summary()
    assert "usable as a VI posterior" in r.summary()


def test_funnel_reports_khat():
    t = models.neals_funnel(ndims=3)
    flow = make_flow("iaf", 3, hidden_units=[8, 8], num_layers=2)
    r = fit(t, flow, num_steps=200, batch_size=256, seed=1, **QUICK)
    assert np.isfinite(r.khat)
    assert 0 < r.ess_is <= r.num_diagnostic_draws
    text = r.summary()
    assert f"k-hat = {r.khat:.3f}" in text
    if r.khat >= 0.7:
        assert "neutra_flows.sample" in text


def test_joint_distribution_surrogate_in_support_under_user_names():
    jd = tfd.JointDistributionNamed(
        dict(
            scale=tfd.HalfNormal(2.0),
            loc=tfd.Sample(tfd.Normal(0.0, 1.0), 2),
            y=lambda scale, loc: tfd.Independent(tfd.Normal(loc, scale[..., None]), 1),
        )
    ).experimental_pin(y=[0.3, -0.4])
    t = Target.from_joint_distribution(jd)
    r = fit(t, make_flow("affine_diag", t.event_size), num_steps=200, batch_size=256, seed=2, **QUICK)
    draws = r.surrogate.sample(500, seed=[1, 2])
    assert set(draws) == {"scale", "loc"}
    assert draws["scale"].shape == (500,) and draws["loc"].shape == (500, 2)
    assert np.all(draws["scale"].numpy() > 0)
    assert np.all(np.isfinite(r.surrogate.log_prob(draws).numpy()))
    named = t.named_draws(r.flow.forward(tf.random.stateless_normal([7, 3], [3, 4])).numpy())
    assert named["scale"].shape == (7,) and np.all(named["scale"] > 0)


# -- fit: failures ------------------------------------------------------------------------


def test_rare_nan_region_is_skipped_and_recorded():
    def nan_far_right(x):
        return tf.where(x[..., 0] > 3.0, tf.constant(np.nan, x.dtype), _std_normal_lp(x))

    t = Target(nan_far_right, 2, name="nan_right")
    flow = make_flow("affine_diag", 2)
    r = fit(t, flow, num_steps=200, batch_size=64, seed=0, steps_per_chunk=50, **QUICK)
    assert any("skipped" in n and "NaN" in n for n in r.notes), r.notes
    assert not np.all(np.isfinite(r.losses))  # skipped steps are visible in the trace
    for v in flow.trainable_variables:
        assert np.all(np.isfinite(v.numpy()))
    assert np.isfinite(r.elbo) and np.isfinite(r.khat)  # NaN diagnostic draws are dropped


def test_divergence_is_rolled_back_with_a_lower_learning_rate():
    def nan_far_out(x):
        return tf.where(tf.abs(x[..., 0]) > 30.0, tf.constant(np.nan, x.dtype), _std_normal_lp(x))

    t = Target(nan_far_out, 2)
    flow = make_flow("affine_diag", 2)
    # Adam moves each parameter by about the learning rate per step: 100 jumps into the
    # NaN region at once; rollbacks divide it by 4 until training is stable.
    r = fit(t, flow, num_steps=200, batch_size=64, learning_rate=100.0, seed=0, steps_per_chunk=50, **QUICK)
    assert any("rolled back" in n for n in r.notes), r.notes
    for v in flow.trainable_variables:
        assert np.all(np.isfinite(v.numpy()))
    assert np.all(np.isfinite(r.losses[-50:]))


def test_persistent_nan_raises_naming_the_step_and_keeps_finite_parameters():
    def nan_beyond_two(x):
        # Pulls the flow to x0 ~ 4, where the density is NaN.
        lp = _std_normal_lp(x - tf.constant([4.0, 0.0], x.dtype))
        return tf.where(x[..., 0] > 2.0, tf.constant(np.nan, x.dtype), lp)

    t = Target(nan_beyond_two, 2)
    flow = make_flow("affine_diag", 2)
    with pytest.raises(RuntimeError, match=r"at step \d+"):
        fit(
            t,
            flow,
            num_steps=400,
            batch_size=64,
            learning_rate=0.05,
            seed=0,
            steps_per_chunk=50,
            max_recoveries=1,
            **QUICK,
        )
    for v in flow.trainable_variables:
        assert np.all(np.isfinite(v.numpy()))


def _py_identity(x):
    # tf.py_function has no XLA kernel (and is differentiable).
    y = tf.py_function(tf.identity, [x], x.dtype)
    y.set_shape(x.shape)
    return y


class _PyIdentity(tfb.Bijector):
    def __init__(self):
        super().__init__(forward_min_event_ndims=0, is_constant_jacobian=True, name="py_identity")

    def _forward(self, x):
        return _py_identity(x)

    def _inverse(self, y):
        return _py_identity(y)

    def _forward_log_det_jacobian(self, x):
        return tf.zeros([], x.dtype)


def test_an_op_xla_cannot_compile_falls_back_to_graph_mode_with_a_note():
    t = Target(lambda x: _std_normal_lp(_py_identity(x)), 2, name="py")
    r = fit(t, make_flow("affine_diag", 2), num_steps=20, batch_size=16, seed=0, progress=False,
            num_diagnostic_draws=256)
    fell_back = "XLA could not compile the training step; fell back to graph mode"
    assert any(n.startswith(fell_back) for n in r.notes), r.notes
    assert r.losses.shape == (20,) and np.all(np.isfinite(r.losses))
    # fit_to_data also evaluates its log-likelihood without XLA from then on.
    data = np.random.default_rng(0).normal(size=[200, 2]).astype(np.float32) + 3.0
    flow = tfb.Chain([make_flow("affine_diag", 2), _PyIdentity()])
    d = fit_to_data(flow, data, num_epochs=3, batch_size=50, learning_rate=0.05, seed=0, progress=False)
    assert any(n.startswith(fell_back) for n in d.notes), d.notes
    assert d.num_epochs == 3 and d.train_log_likelihood[-1] > d.train_log_likelihood[0]


def test_fit_rejects_bad_inputs():
    t = models.banana()
    flow = make_flow("affine_diag", 2)
    with pytest.raises(ValueError, match="Target"):
        fit(_std_normal_lp, flow, seed=0, **QUICK)
    with pytest.raises(ValueError, match="event_size=2"):
        fit(t, make_flow("affine_diag", 3), seed=0, **QUICK)
    with pytest.raises(ValueError, match="float64"):
        fit(t, make_flow("affine_diag", 2, dtype=tf.float64), seed=0, **QUICK)
    with pytest.raises(ValueError, match="Bijector"):
        fit(t, "iaf", seed=0, **QUICK)
    with pytest.raises(ValueError, match="learning_rate"):
        fit(t, flow, learning_rate=-1.0, seed=0, **QUICK)
    with pytest.raises(ValueError, match="learning_rate"):
        fit(t, flow, learning_rate="fast", seed=0, **QUICK)
    with pytest.raises(ValueError, match="num_steps"):
        fit(t, flow, num_steps=-5, seed=0, **QUICK)
    with pytest.raises(ValueError, match="seed"):
        fit(t, flow, seed=None, **QUICK)
    # A target that is NaN at the first points (validation skipped at construction).
    bad = Target(lambda x: _std_normal_lp(x) * np.nan, 2, validate=False, name="all_nan")
    with pytest.raises(ValueError, match=r"all_nan: the log density is NaN at z = \["):
        fit(bad, flow, seed=0, **QUICK)


def test_same_seed_same_flow_and_losses():
    t = models.banana()
    common = dict(num_steps=60, batch_size=32, steps_per_chunk=25, num_diagnostic_draws=1024, **QUICK)
    flows = [make_flow("iaf", 2, hidden_units=[8], num_layers=1, seed=0) for _ in range(3)]
    a = fit(t, flows[0], seed=5, **common)
    b = fit(t, flows[1], seed=5, **common)
    c = fit(t, flows[2], seed=6, **common)
    np.testing.assert_array_equal(a.losses, b.losses)
    for va, vb in zip(a.flow.trainable_variables, b.flow.trainable_variables, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert a.elbo == b.elbo and a.khat == b.khat
    assert not np.array_equal(a.losses, c.losses)


def test_learning_rate_schedule_progress_and_zero_steps(capsys):
    t = models.banana()
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)
    r = fit(
        t,
        make_flow("affine_diag", 2),
        num_steps=20,
        learning_rate=schedule,
        seed=0,
        progress=True,
        jit_compile=False,
        num_diagnostic_draws=256,
    )
    assert "fit banana_2d" in capsys.readouterr().err
    assert np.all(np.isfinite(r.losses))
    r0 = fit(t, make_flow("identity", 2), num_steps=0, seed=0, **QUICK)
    assert r0.losses.shape == (0,) and np.isfinite(r0.elbo)
    assert capsys.readouterr().err == ""


def test_summary_verdicts():
    common = dict(flow=None, surrogate=None, losses=np.zeros(10), wall_time=1.0, elbo=-0.1, elbo_se=0.01)
    good = FitResult(khat=0.3, ess_is=900.0, num_steps=10, num_diagnostic_draws=1000, **common)
    bad = FitResult(khat=1.3, ess_is=12.0, num_steps=10, num_diagnostic_draws=1000, notes=["x"], **common)
    assert good.usable_as_posterior and "usable as a VI posterior" in good.summary()
    assert not bad.usable_as_posterior
    assert "NOT reliable" in bad.summary() and "neutra_flows.sample" in bad.summary()
    assert "note: x" in bad.summary()


# -- fit_to_data ---------------------------------------------------------------------------


def _two_moons(n, seed):
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, math.pi, n)
    upper = rng.uniform(size=n) < 0.5
    x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    return (np.stack([x, y], 1) + 0.1 * rng.normal(size=[n, 2])).astype(np.float32)


def _gaussian_mean_log_lik(train, test):
    mean, cov = train.mean(0), np.cov(train.T, bias=True)
    diff = test - mean
    _, logdet = np.linalg.slogdet(cov)
    quad = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    return float(np.mean(-0.5 * quad - 0.5 * logdet - math.log(2 * math.pi)))


def test_fit_to_data_two_moons_beats_a_gaussian():
    train, test = _two_moons(3000, 0), _two_moons(2000, 1)
    flow = make_flow("nsf", 2, hidden_units=[16, 16], num_layers=2)
    r = fit_to_data(flow, train, num_epochs=10, batch_size=128, learning_rate=1e-2, seed=0, patience=5, **QUICK)
    assert isinstance(r, DataFitResult)
    assert r.train_log_likelihood.shape == r.validation_log_likelihood.shape == (r.num_epochs,)
    assert r.best_epoch == int(np.argmax(r.validation_log_likelihood))
    flow_ll = float(np.mean(r.distribution.log_prob(test).numpy()))
    gauss_ll = _gaussian_mean_log_lik(train, test)
    assert flow_ll > gauss_ll + 0.4, (flow_ll, gauss_ll)
    _assert_flow_holds_epoch(r, train, r.best_epoch)


def _assert_flow_holds_epoch(r, data, epoch, validation_fraction=0.1):
    """The returned flow reproduces the log-likelihoods recorded after ``epoch``.

    Evaluated here from the flow itself on all of ``data``: the total equals
    ``n_train * train_ll[epoch] + n_val * val_ll[epoch]`` whichever points were held out.
    """
    n_val = int(round(validation_fraction * len(data)))
    total = float(np.sum(_log_lik(r.flow, data)))
    recorded = (len(data) - n_val) * r.train_log_likelihood[epoch] + n_val * r.validation_log_likelihood[epoch]
    np.testing.assert_allclose(total, recorded, rtol=1e-5)


def _log_lik(flow, x):
    # log N(f^{-1}(x); 0, I) + log|det (f^{-1})'(x)|, in float64 from the flow's own maps.
    x = tf.constant(x)
    u = flow.inverse(x).numpy().astype(np.float64)
    ildj = flow.inverse_log_det_jacobian(x, event_ndims=1).numpy().astype(np.float64)
    return np.sum(-0.5 * u**2 - 0.5 * math.log(2 * math.pi), axis=-1) + ildj


def test_fit_to_data_early_stopping_and_errors():
    data = np.random.default_rng(0).normal(size=[400, 2]).astype(np.float32)
    flow = make_flow("affine_diag", 2)
    r = fit_to_data(flow, data, num_steps=40, batch_size=100, learning_rate=0.05, seed=1, patience=1, **QUICK)
    assert r.num_epochs <= 14 and r.num_steps == r.num_epochs * 3
    assert r.stopped_early and r.best_epoch == r.num_epochs - 2  # patience=1: one epoch past the best
    assert r.best_epoch == int(np.argmax(r.validation_log_likelihood))
    # The best epoch's weights were restored, not the last epoch's.
    _assert_flow_holds_epoch(r, data, r.best_epoch)
    with pytest.raises(AssertionError):
        _assert_flow_holds_epoch(r, data, r.num_epochs - 1)
    assert "held-out" in r.summary()
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        fit_to_data(flow, data[:, 0], seed=0, **QUICK)
    with pytest.raises(ValueError, match="not both"):
        fit_to_data(flow, data, num_epochs=2, num_steps=3, seed=0, **QUICK)
    with pytest.raises(ValueError, match="NaN"):
        fit_to_data(flow, np.full([10, 2], np.nan), seed=0, **QUICK)
    with pytest.raises(ValueError, match="validation_fraction"):
        fit_to_data(flow, data, validation_fraction=1.0, seed=0, **QUICK)


def test_fit_to_data_honours_max_recoveries():
    data = np.random.default_rng(0).normal(size=[400, 2]).astype(np.float32)
    # Finite data whose squares overflow float32: every step's loss is inf.
    flow = make_flow("affine_diag", 2)
    before = [v.numpy() for v in flow.trainable_variables]
    with pytest.raises(RuntimeError, match="in epoch 0 persisted after 0 rollbacks"):
        fit_to_data(flow, data * 1e20, num_epochs=2, batch_size=100, seed=1, max_recoveries=0, **QUICK)
    for v, b in zip(flow.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)  # rolled back to the start of the epoch
    # A learning rate far too high for data this tight overflows the scale; two
    # rollbacks (learning rate x1/16) are needed, so one is not enough.
    common = dict(num_epochs=3, batch_size=100, learning_rate=100.0, seed=1, **QUICK)
    with pytest.raises(RuntimeError, match="after 1 rollbacks"):
        fit_to_data(make_flow("affine_diag", 2), data * 1e-3, max_recoveries=1, **common)
    r = fit_to_data(make_flow("affine_diag", 2), data * 1e-3, max_recoveries=2, **common)
    assert sum("rolled back" in n for n in r.notes) == 2, r.notes
    assert np.all(np.isfinite(r.train_log_likelihood))


# -- long runs -------------------------------------------------------------------------------


@pytest.mark.slow
def test_banana_defaults_slow():
    # Measured: KL 0.0041 +/- 0.0007, k-hat 0.66 (docs/vi.md).
    t = models.banana()
    r = fit(t, make_flow("iaf", 2), seed=0, progress=False)
    assert -r.elbo < 0.02 and r.khat < 0.7, r.summary()


@pytest.mark.slow
def test_funnel_10d_defaults_slow():
    # Measured: KL 0.0057 +/- 0.0007, k-hat 0.61 (docs/vi.md).
    t = models.neals_funnel(10)
    r = fit(t, make_flow("iaf", 10), seed=0, progress=False)
    assert np.isfinite(r.khat)
    assert -4 * r.elbo_se < -r.elbo < 0.02, r.summary()  # the funnel is normalised: -ELBO is a KL

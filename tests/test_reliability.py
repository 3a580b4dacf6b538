"""Reliability: no result that is silently wrong, no user file lost, every model family loads.

One test (or a few) per case of the "Bad input" table in docs/guide.md.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import neutra_flows as nf
from neutra_flows._utils import as_seed, split_seed
from neutra_flows.targets import Target

tfb = tfp.bijectors
tfd = tfp.distributions


def _std_normal_lp(x):
    return tf.reduce_sum(-0.5 * tf.square(x) - 0.5 * math.log(2 * math.pi), axis=-1)


# -- 1. simplex models (TFP's Pad against NumPy 2.4) -------------------------------------


def test_softmax_centered_builds():
    y = tfb.SoftmaxCentered().forward(tf.zeros([2, 2]))
    np.testing.assert_allclose(y.numpy(), np.full([2, 3], 1 / 3), rtol=1e-6)


def test_dirichlet_joint_distribution_target_builds_evaluates_and_has_finite_gradient():
    jd = tfd.JointDistributionNamed(
        dict(
            probs=tfd.Dirichlet(tf.ones([3])),
            counts=lambda probs: tfd.Multinomial(10.0, probs=probs),
        )
    )
    t = Target.from_joint_distribution(jd.experimental_pin(counts=tf.constant([2.0, 3.0, 5.0])))
    assert t.event_size == 2 and t.names == ("probs",)
    z = tf.constant([[0.0, 0.0], [0.3, -0.4]])
    with tf.GradientTape() as tape:
        tape.watch(z)
        lp = t.unnormalized_log_prob(z)
    grad = tape.gradient(lp, z)
    assert np.all(np.isfinite(lp.numpy())) and np.all(np.isfinite(grad.numpy()))
    draws = t.named_draws(z.numpy())["probs"]
    np.testing.assert_allclose(draws.sum(axis=-1), 1.0, rtol=1e-6)


# -- 2. a log density without gradient ------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: _std_normal_lp(tf.round(x)),
        lambda x: _std_normal_lp(tf.cast(tf.cast(3.0 * x, tf.int32), tf.float32)),
        lambda x: _std_normal_lp(tf.stop_gradient(x)),
        lambda x: tf.zeros_like(x[..., 0]),
    ],
    ids=["round", "int_cast", "stop_gradient", "constant"],
)
def test_log_density_without_gradient_is_rejected_at_construction(fn):
    with pytest.raises(ValueError, match="gradient of the log density is .*differentiable TensorFlow ops"):
        Target(fn, 2)


def test_check_rejects_a_density_without_gradient_in_fit_even_unvalidated():
    t = Target(lambda x: _std_normal_lp(tf.round(x)), 2, validate=False, name="rounded")
    flow = nf.make_flow("affine_diag", 2)
    with pytest.raises(ValueError, match="rounded: the gradient of the log density is missing"):
        nf.fit(t, flow, num_steps=1, batch_size=4, num_diagnostic_draws=16, seed=0, progress=False)


def test_zero_gradient_at_some_points_only_is_fine():
    # Flat between -1 and 1 in the first coordinate, Gaussian in the second.
    t = Target(lambda x: -0.5 * tf.square(x[..., 1]) - 0.5 * tf.nn.relu(tf.abs(x[..., 0]) - 1) ** 2, 2)
    t.check(np.zeros([4, 2], np.float32) + [0.0, 0.5])


# -- 3. a log density written in numpy -------------------------------------------------


def test_numpy_log_density_is_rejected_at_construction():
    def numpy_lp(x):
        return np.sum(-0.5 * np.asarray(x) ** 2, axis=-1)

    with pytest.raises(ValueError, match=r"numpy.*TensorFlow ops|TensorFlow ops.*not numpy"):
        Target(numpy_lp, 2)


def test_python_branch_on_a_tensor_is_rejected_at_construction():
    def branchy(x):
        return _std_normal_lp(x) if bool(tf.reduce_all(x < 100.0)) else tf.zeros_like(x[..., 0])

    with pytest.raises(ValueError, match="not inside tf.function"):
        Target(branchy, 2)


# -- 4. +inf during sampling ------------------------------------------------------------


def _plus_inf_beyond(x):
    return tf.where(x[..., 0] > 1.5, tf.constant(np.inf, x.dtype), _std_normal_lp(x))


def test_plus_inf_reached_while_sampling_is_an_error_naming_plus_inf():
    t = Target(_plus_inf_beyond, 2, name="plus_inf_beyond")  # finite at the probe points
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"plus_inf_beyond: the log density is \+inf at \d+ of 40 kept"):
            nf.sample(t, None, num_chains=2, num_warmup=20, num_samples=20, seed=0, progress=False,
                      jit_compile=False)


def test_check_draws_lp_accepts_finite_draws():
    from neutra_flows.mcmc import _check_draws_lp

    _check_draws_lp(np.zeros([2, 3]), np.zeros([2, 3, 1]), "t")
    with pytest.raises(ValueError, match="NaN at 1 of 6"):
        _check_draws_lp(np.array([[0.0, 0.0, np.nan], [0.0, 0.0, 0.0]]), np.zeros([2, 3, 1]), "t")


# -- 8 and 10. seeds -----------------------------------------------------------------------


def test_small_int_seeds_map_as_before():
    # The published figures depend on this mapping: [0, n] for n < 2**31 - 1.
    for n in (0, 1, 42, 2**31 - 2):
        assert as_seed(n).numpy().tolist() == [0, n]


def test_int_seeds_do_not_collide():
    seeds = [0, 1, 2**31 - 2, 2**31 - 1, 2**31, 2**32, 2**40 + 3, 2**62 - 2]
    pairs = {tuple(as_seed(s).numpy().tolist()) for s in seeds}
    assert len(pairs) == len(seeds)
    a = tf.random.stateless_normal([4], seed=as_seed(0))
    b = tf.random.stateless_normal([4], seed=as_seed(2**31 - 1))
    assert not np.allclose(a.numpy(), b.numpy())


@pytest.mark.parametrize("seed", ["abc", 1.5, True, -1, 2**62 - 1, [1, 2, 3], [[1, 2]], None])
def test_bad_seeds_are_value_errors(seed):
    with pytest.raises(ValueError, match="seed"):
        as_seed(seed)
    with pytest.raises(ValueError, match="seed"):
        split_seed(seed)


# -- 5 and 6. saved flows ---------------------------------------------------------------


def _small_trained(name="iaf", d=3):
    flow = nf.make_flow(name, d, num_layers=2, hidden_units=[8])
    rng = np.random.default_rng(1)
    for var in flow.variables:
        var.assign(rng.normal(scale=0.3, size=var.shape).astype(var.dtype.as_numpy_dtype))
    return flow


@pytest.mark.parametrize(
    "old,new",
    [('"name": "iaf"', '"name": "maf"'), ('"activation": "elu"', '"activation": "tanh"'),
     ('"permutation": "reverse"', '"permutation": "random"'), ('"seed": 0', '"seed": 1')],
    ids=["iaf_to_maf", "elu_to_tanh", "permutation", "seed"],
)
def test_hand_edited_header_is_refused(old, new, tmp_path):
    path = nf.save_flow(_small_trained(), tmp_path / "flow")
    text = (path / "flow.json").read_text()
    assert old in text
    (path / "flow.json").write_text(text.replace(old, new))
    with pytest.raises(ValueError, match=r"flow.json does not match its checksum \(content_sha256\)"):
        nf.load_flow(path)


def _as_version_1(path):
    import json

    header = json.loads((path / "flow.json").read_text())
    header.pop("content_sha256")
    header["version"] = 1
    (path / "flow.json").write_text(json.dumps(header))


def test_version_1_folders_load_with_a_warning_and_resave_as_version_2(tmp_path):
    flow = _small_trained()
    path = nf.save_flow(flow, tmp_path / "flow")
    _as_version_1(path)
    with pytest.warns(UserWarning, match="format version 1"):
        loaded = nf.load_flow(path)
    x = tf.constant([[0.1, -0.2, 0.3]])
    np.testing.assert_array_equal(loaded.forward(x).numpy(), flow.forward(x).numpy())
    nf.save_flow(loaded, path, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nf.load_flow(path)


def test_version_1_coupling_spline_is_refused(tmp_path):
    path = nf.save_flow(_small_trained("nsf"), tmp_path / "flow")
    _as_version_1(path)
    with pytest.raises(ValueError, match="parameterisation changed"):
        nf.load_flow(path)


def test_overwrite_keeps_the_users_other_files(tmp_path):
    path = nf.save_flow(_small_trained(), tmp_path / "flow")
    (path / "notes.txt").write_text("my notes")
    (path / "plots").mkdir()
    (path / "plots" / "loss.png").write_bytes(b"png")
    nf.save_flow(nf.make_flow("affine_diag", 3), path, overwrite=True)
    assert (path / "notes.txt").read_text() == "my notes"
    assert (path / "plots" / "loss.png").read_bytes() == b"png"
    assert nf.load_flow(path).flow_config["name"] == "affine_diag"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow"]  # no temporary folder left


# -- 7. the CLI's --out is checked before any work ------------------------------------------


def _no_run(*_args, **_kwargs):
    raise AssertionError("the run started although --out is unusable")


@pytest.mark.parametrize("command", [["bench", "banana"], ["sample", "no_such_model.py:model"]])
@pytest.mark.parametrize("where", ["file", "under_file", "flow_is_file"])
def test_unusable_out_fails_before_any_work(command, where, tmp_path, capsys, monkeypatch):
    from neutra_flows.app import bench, cli

    monkeypatch.setattr(bench, "run_benchmark", _no_run)
    blocker = tmp_path / "results"
    if where == "flow_is_file":
        blocker.mkdir()
        (blocker / "flow").write_text("a file where the trained flow goes")
        out = blocker
    else:
        blocker.write_text("an existing file")
        out = blocker if where == "file" else blocker / "sub"
    code = cli.main([*command, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--out {out}" in err and err.count("\n") == 1
    assert blocker.exists() and (blocker.is_dir() or blocker.read_text() == "an existing file")


# -- 8. the surrogate samples statelessly -------------------------------------------------


@pytest.fixture(scope="module")
def small_fit():
    t = nf.models.banana()
    flow = nf.make_flow("iaf", 2, num_layers=1, hidden_units=[8])
    return nf.fit(t, flow, num_steps=20, batch_size=16, num_diagnostic_draws=64, seed=0, progress=False)


def test_surrogate_int_seed_is_stateless_and_distinct(small_fit):
    q = small_fit.surrogate
    a, b = q.sample(4, seed=1).numpy(), q.sample(4, seed=1).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(q.sample(4, seed=0).numpy(), q.sample(4, seed=2**31 - 1).numpy())
    assert not np.allclose(a, q.sample(4, seed=2).numpy())
    x, lp = q.experimental_sample_and_log_prob(4, seed=1)
    np.testing.assert_array_equal(x.numpy(), a)
    assert lp.shape == (4,)
    assert q.sample(3).shape == (3, 2)  # seed=None: TFP's fresh draws, still allowed


def test_hand_built_fit_result_gets_the_stateless_surrogate():
    base = tfd.MultivariateNormalDiag(tf.zeros([2]), tf.ones([2]))
    q = tfd.TransformedDistribution(base, tfb.Shift([1.0, 2.0]))
    r = nf.FitResult(flow=None, surrogate=q, losses=np.zeros(3), wall_time=0.0, elbo=0.0, elbo_se=0.0,
                     khat=0.2, ess_is=1.0, num_steps=3)
    np.testing.assert_array_equal(r.surrogate.sample(2, seed=5).numpy(), r.surrogate.sample(2, seed=5).numpy())


# -- 10 and 11. FitResult: no steps, failure -------------------------------------------------


def _result(losses, khat=0.3):
    return nf.FitResult(flow=None, surrogate=None, losses=np.asarray(losses, float), wall_time=1.0,
                        elbo=-1.0, elbo_se=0.1, khat=khat, ess_is=100.0, num_steps=len(losses),
                        num_diagnostic_draws=1000)


def test_zero_steps_summary_is_clean():
    t = nf.models.banana()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = nf.fit(t, nf.make_flow("affine_diag", 2), num_steps=0, num_diagnostic_draws=256, seed=0,
                   progress=False)
        text = r.summary()
    assert "no training steps" in text and "final loss" not in text
    assert not re.search(r"\bnan\b", text.split("ELBO")[0])


def test_rising_loss_is_a_failure_with_advice():
    rng = np.random.default_rng(0)
    rising = np.linspace(1.0, 5.0, 200) + 0.1 * rng.standard_normal(200)
    r = _result(rising)
    assert r.failed and "rose" in r.failure_reasons[0]
    assert "FIT FAILED" in r.summary() and "try:" in r.summary()


def test_falling_or_noisy_flat_loss_is_not_a_failure():
    rng = np.random.default_rng(0)
    assert not _result(np.linspace(5.0, 1.0, 200) + 0.1 * rng.standard_normal(200)).failed
    assert not _result(2.0 + 0.1 * rng.standard_normal(200)).failed
    assert not _result([3.0, 2.0, 4.0]).failed  # too short to tell
    assert "FIT FAILED" not in _result(np.linspace(5.0, 1.0, 200)).summary()


def test_khat_above_one_and_plus_inf_density_are_failures():
    r = _result(np.linspace(5.0, 1.0, 200), khat=1.4)
    assert r.failed and "k-hat = 1.4 > 1" in r.failure_reasons[0]
    assert not _result(np.linspace(5.0, 1.0, 200), khat=float("nan")).failed
    losses = np.linspace(5.0, 1.0, 200)
    losses[50] = -np.inf
    assert any("+inf" in reason for reason in _result(losses).failure_reasons)
    assert _result(np.full(20, np.nan)).failed

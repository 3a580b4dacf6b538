"""Property-based tests: random shapes, dtypes and values thrown at the public API.

Every failure must be a ValueError or TypeError (FileExistsError /
FileNotFoundError where save_flow / load_flow document them) with a message,
never an error from deep inside TensorFlow; a returned result never holds a NaN
where a number is promised. Bounded: few examples each, no deadline, < 60 s.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import neutra_flows as nf

ALLOWED = (ValueError, TypeError)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=4),
    st.lists(st.integers(-2, 4), max_size=3),
)
DTYPES = st.sampled_from([tf.float32, tf.float64, "float32", np.float64, tf.float16, tf.int32, "abc", None, 3])


def _assert_clear(err: BaseException, allowed=ALLOWED) -> None:
    assert isinstance(err, allowed), f"{type(err).__name__}: {err}"
    assert str(err).strip(), f"{type(err).__name__} without a message"
    assert not isinstance(err, tf.errors.OpError), f"a raw TensorFlow error: {err}"


def _gauss(x):
    return -0.5 * tf.reduce_sum(tf.square(x), axis=-1)


LOG_PROBS = {
    "gauss": _gauss,
    "unsummed": lambda x: -0.5 * tf.square(x),
    "scalar": lambda x: tf.reduce_sum(x),
    "nan": lambda x: _gauss(x) * np.nan,
    "plus_inf": lambda x: _gauss(x) + np.inf,
    "rounded": lambda x: _gauss(tf.round(x)),
    "numpy": lambda x: np.sum(np.asarray(x), axis=-1),
    "int_out": lambda x: tf.cast(_gauss(x), tf.int32),
    "raises": lambda x: tf.reshape(x, [-1, 7]),
}


@FAST
@given(fn=st.sampled_from(sorted(LOG_PROBS)), event_shape=st.one_of(JUNK, st.just(2), st.just([2, 2])),
       dtype=DTYPES, names=st.one_of(st.none(), st.text(min_size=1, max_size=3), st.lists(st.text(max_size=2),
                                                                                           max_size=3)))
@example(fn="gauss", event_shape=2, dtype=tf.float64, names=["a", "b"])
@example(fn="gauss", event_shape=[2, 2], dtype="float32", names=None)
def test_target_construction(fn, event_shape, dtype, names):
    try:
        t = nf.Target(LOG_PROBS[fn], event_shape, dtype, names=names)
    except Exception as err:  # noqa: BLE001 - the property under test
        _assert_clear(err)
        return
    lp = t.unnormalized_log_prob(np.zeros([2, t.event_size]))
    assert lp.shape == (2,) and np.all(np.isfinite(lp))


@FAST
@given(
    name=st.sampled_from([*nf.FLOW_NAMES, "nope", ""]),
    event_size=st.one_of(st.integers(-1, 4), JUNK),
    options=st.dictionaries(
        st.sampled_from(["num_layers", "hidden_units", "activation", "bound", "num_bins", "permutation", "seed",
                         "output_affine", "no_such_option"]),
        JUNK,
        max_size=2,
    ),
)
@example(name="nsf", event_size=3, options={"num_bins": 3, "hidden_units": [4]})
@example(name="iaf", event_size=1, options={"activation": "tanh"})
def test_make_flow_options(name, event_size, options):
    try:
        flow = nf.make_flow(name, event_size, **options)
    except Exception as err:  # noqa: BLE001
        _assert_clear(err)
        return
    x = tf.zeros([2, flow.flow_config["event_size"]], flow.dtype or tf.float32)
    assert np.all(np.isfinite(flow.forward(x)))


@pytest.fixture(scope="module")
def tiny():
    target = nf.models.correlated_gaussian(2, 0.5)
    return target, nf.make_flow("affine_diag", 2)


@SLOW
@given(num_steps=st.integers(-1, 2), batch_size=st.one_of(st.integers(1, 4), st.integers(-1, 4), JUNK),
       seed=st.one_of(st.integers(0, 5), st.integers(-2, 2**63), st.text(max_size=2), st.floats(width=32)),
       learning_rate=st.one_of(st.none(), st.floats(1e-3, 0.1), st.floats(-1.0, 1.0), st.just(float("nan")),
                               st.text(max_size=2)))
@example(num_steps=2, batch_size=4, seed=3, learning_rate=0.01)
@example(num_steps=0, batch_size=1, seed=2**31 - 1, learning_rate=None)
def test_fit_arguments(tiny, num_steps, batch_size, seed, learning_rate):
    target, flow = tiny
    try:
        r = nf.fit(target, flow, num_steps=num_steps, batch_size=batch_size, seed=seed,
                   learning_rate=learning_rate, num_diagnostic_draws=32, progress=False, jit_compile=False)
    except Exception as err:  # noqa: BLE001
        _assert_clear(err)
        return
    assert np.all(np.isfinite(r.losses)) and math.isfinite(r.elbo)
    assert isinstance(r.failed, bool) and "nan" not in r.summary().split("ELBO")[0].split()


@SLOW
@given(num_chains=st.one_of(st.integers(1, 2), st.integers(-1, 2), JUNK), num_warmup=st.integers(-1, 2),
       num_samples=st.one_of(st.integers(1, 3), st.integers(-1, 3)),
       seed=st.one_of(st.integers(0, 5), st.integers(-2, 5), st.text(max_size=2)),
       kernel=st.sampled_from(["nuts", "hmc", "gibbs"]))
@example(num_chains=2, num_warmup=2, num_samples=3, seed=1, kernel="nuts")
@example(num_chains=2, num_warmup=0, num_samples=1, seed=2**40, kernel="hmc")
def test_sample_arguments(tiny, num_chains, num_warmup, num_samples, seed, kernel):
    target, flow = tiny
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idata = nf.sample(target, flow, kernel=kernel, num_chains=num_chains, num_warmup=num_warmup,
                              num_samples=num_samples, seed=seed, progress=False, jit_compile=False)
    except Exception as err:  # noqa: BLE001
        _assert_clear(err)
        return
    assert np.all(np.isfinite(idata.posterior["x"].values))


SAFE_NAME = st.text(alphabet="abcXYZ019_-. ", min_size=1, max_size=12).filter(lambda s: s.strip(" .") != "")


@FAST
@given(name=SAFE_NAME, setup=st.sampled_from(["fresh", "file", "foreign_folder", "under_file", "saved"]),
       overwrite=st.booleans())
def test_save_and_load_paths(name, setup, overwrite):
    flow = nf.make_flow("affine_diag", 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / name
        if setup == "file":
            path.write_text("user data")
        elif setup == "foreign_folder":
            path.mkdir()
            (path / "notes.txt").write_text("user data")
        elif setup == "under_file":
            (root / "blocker").write_text("user data")
            path = root / "blocker" / name
        elif setup == "saved":
            nf.save_flow(flow, path)
        try:
            nf.save_flow(flow, path, overwrite=overwrite)
        except Exception as err:  # noqa: BLE001
            _assert_clear(err, (*ALLOWED, FileExistsError))
        try:
            loaded = nf.load_flow(path)
        except Exception as err:  # noqa: BLE001
            _assert_clear(err, (*ALLOWED, FileNotFoundError))
        else:
            assert loaded.flow_config == flow.flow_config
        # The user's files are never touched.
        for data in root.rglob("*"):
            if data.is_file() and data.suffix in ("", ".txt") and data.name not in ("flow.json",):
                assert data.read_text() == "user data"

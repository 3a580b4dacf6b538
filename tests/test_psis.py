"""Our PSIS against ArviZ's ``psislw``: the same k-hat and weights, without importing ArviZ."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pytest

from neutra_flows.psis import psis_log_weights


def _cases():
    rng = np.random.default_rng(0)
    for n in (20, 100, 1000, 4096):
        yield rng.normal(size=n) * 2.0                        # light tail: k < 0.5
        yield np.log(np.abs(rng.standard_t(0.8, size=n)))     # heavy tail: k > 0.7
        yield rng.gumbel(size=n) * 3.0 + 200.0                # far from 0, as raw ELBO weights are
        yield -np.abs(rng.normal(size=n)) * 50.0


@pytest.mark.parametrize("case", list(_cases()))
def test_k_hat_and_weights_match_arviz(case):
    ours, khat = psis_log_weights(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_khat = az.psislw(case.copy(), reff=1.0)
    assert khat == pytest.approx(float(ref_khat), abs=1e-10)
    np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-10)
    assert np.exp(ours).sum() == pytest.approx(1.0)


def test_a_heavy_tail_reads_as_a_large_k_hat_and_a_light_one_as_small():
    rng = np.random.default_rng(1)
    assert psis_log_weights(rng.normal(size=2000) * 0.3)[1] < 0.5
    assert psis_log_weights(np.log(np.abs(rng.standard_t(0.7, size=2000))))[1] > 0.7


def test_too_short_a_tail_gives_an_infinite_k_hat_and_normalised_weights():
    lw, khat = psis_log_weights(np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    assert khat == np.inf
    assert np.exp(lw).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [np.array([]), np.array([0.0, np.nan, 1.0]), np.array([0.0, np.inf])])
def test_non_finite_or_empty_ratios_are_refused(bad):
    with pytest.raises(ValueError, match="finite"):
        psis_log_weights(bad)

"""sample and fit under tf.distribute, thinning and the trace-size guard.

Strategies over several logical CPU devices need the devices configured before
TensorFlow initialises, so those runs happen in fresh processes
(tests/distribute_worker.py); the reference (no strategy) runs in the same
process, so both use the same TensorFlow and the same kernels.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import neutra_flows as nf
from neutra_flows import models

WORKER = Path(__file__).with_name("distribute_worker.py")
ROOT = WORKER.parent.parent


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _mirrored(tmp_path, replicas: int, kernel: str = "hmc", timeout: int = 300) -> dict:
    out = tmp_path / f"mirrored{replicas}{kernel}.npz"
    proc = subprocess.run(
        [sys.executable, str(WORKER), "mirrored", str(out), str(replicas), kernel],
        env=_env(), capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def _check_same(r: dict, ref: dict, tol: float = 1e-4) -> None:
    # Same seed, same random numbers for every chain; the arithmetic rounds
    # differently (all-reduced sums, kernels that depend on the batch size), and
    # MCMC amplifies that, so the runs are short and the comparison is to a tolerance.
    np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["draws"], ref["draws"], rtol=tol, atol=tol)
    np.testing.assert_allclose(r["step"], ref["step"], rtol=tol)
    # Discrete decisions (leapfrog counts, NUTS tree sizes) are the same.
    np.testing.assert_array_equal(r["n_steps"], ref["n_steps"])


def test_mirrored_two_replicas_match_one_device(tmp_path):
    r = _mirrored(tmp_path, 2)
    _check_same(r, {k[4:]: v for k, v in r.items() if k.startswith("ref_")})
    assert r["draws"].shape[:2] == (8, 4)
    assert "not divisible by the strategy's 2 replicas" in str(r["err_divisible"])
    assert "strategy.scope()" in str(r["err_scope"])


@pytest.mark.slow
@pytest.mark.parametrize("replicas,kernel", [(1, "hmc"), (4, "hmc"), (4, "nuts")])
def test_mirrored_replicas_match_one_device(tmp_path, replicas, kernel):
    r = _mirrored(tmp_path, replicas, kernel, timeout=900)
    # NUTS's longer trajectories amplify rounding more (6e-4 measured with 4 replicas).
    _check_same(r, {k[4:]: v for k, v in r.items() if k.startswith("ref_")}, 1e-4 if kernel == "hmc" else 5e-3)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_multiworker_two_processes_match_one_device(tmp_path):
    ref = {k[4:]: v for k, v in _mirrored(tmp_path, 1, timeout=900).items() if k.startswith("ref_")}
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, outs = [], []
    for i in range(2):
        out = tmp_path / f"worker{i}.npz"
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "multiworker", str(out)], env=_env(TF_CONFIG=tf_config),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    deadline = time.monotonic() + 900
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for out in outs:
        _check_same(dict(np.load(out)), ref)


# -- in-process: thinning, the trace-size guard, refusals --------------------------


def _identity_flow(d):
    import tensorflow_probability as tfp

    return tfp.bijectors.Identity()


def test_thin_keeps_every_kth_draw():
    target = models.banana(2)
    flow = _identity_flow(2)
    kw = dict(kernel="hmc", num_leapfrog_steps=3, num_chains=2, num_warmup=4, seed=3, progress=False,
              jit_compile=False, adapt_latent_scale=False)
    full = nf.sample(target, flow, num_samples=12, **kw)
    thinned = nf.sample(target, flow, num_samples=12, thin=3, **kw)
    assert thinned.posterior.sizes["draw"] == 4
    assert thinned.posterior.attrs["thin"] == 3
    for v in full.posterior.data_vars:
        np.testing.assert_array_equal(thinned.posterior[v].values, full.posterior[v].values[:, 2::3])
    np.testing.assert_array_equal(thinned.sample_stats["n_steps"].values,
                                  full.sample_stats["n_steps"].values[:, 2::3])
    assert thinned.posterior.attrs["num_grad_evals_sampling"] == full.posterior.attrs["num_grad_evals_sampling"]


def test_thin_must_divide_num_samples():
    with pytest.raises(ValueError, match="multiple of thin"):
        nf.sample(models.banana(2), _identity_flow(2), num_samples=10, thin=3, seed=1, progress=False)


def test_trace_too_large_is_refused_with_the_estimate():
    with pytest.raises(ValueError, match=r"about 1\.01 GiB .*10000 chains x 1000 kept draws.*thin="):
        nf.sample(models.neals_funnel(10), _identity_flow(10), num_chains=10_000, num_samples=1000,
                  max_trace_bytes=2**30, seed=1, progress=False)
    # Thinning brings it under the limit: the guard passes (the run itself is not made here).
    nf.mcmc._check_trace_size(10_000, 1000, 10, 10, tf.float32, 2**30)


def test_strategy_refusals_in_process():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    target = models.banana(2)
    flow = nf.make_flow("iaf", 2, num_layers=1, hidden_units=[4])
    with pytest.raises(ValueError, match=r"(?s)created outside this strategy's scope.*with strategy.scope\(\)"):
        nf.sample(target, flow, kernel="hmc", num_chains=2, num_warmup=2, num_samples=2, seed=1,
                  progress=False, strategy=strategy)
    with pytest.raises(ValueError, match="tf.distribute.Strategy"):
        nf.fit(target, flow, num_steps=2, batch_size=8, seed=1, progress=False, strategy="mirrored")
    with pytest.raises(ValueError, match="NeuTra sampling"):
        nf.sample(target, None, num_chains=2, num_warmup=2, num_samples=2, seed=1, progress=False,
                  strategy=strategy)

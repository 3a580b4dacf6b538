"""Runs sample/fit under tf.distribute in a fresh process (TensorFlow devices must be set first).

Used by tests/test_distribute.py, never imported by pytest's collection for its
side effects: everything happens under ``__main__``.

    python tests/distribute_worker.py mirrored OUT.npz REPLICAS [KERNEL]   # REPLICAS logical CPUs
    python tests/distribute_worker.py multiworker OUT.npz   # one worker of a TF_CONFIG cluster
"""

from __future__ import annotations

import os
import sys


def _flow_and_target(strategy, d=3):
    import neutra_flows as nf

    target = nf.models.banana(d) if d >= 2 else None
    with strategy.scope() if strategy is not None else _null():
        flow = nf.make_flow("iaf", d, num_layers=2, hidden_units=[8], seed=3)
    return target, flow


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def _run(strategy, kernel="hmc", chains=8, jit=False):
    import time

    import numpy as np

    import neutra_flows as nf

    target, flow = _flow_and_target(strategy)
    t0 = time.perf_counter()
    fit = nf.fit(target, flow, num_steps=6, batch_size=16, steps_per_chunk=3, seed=5, progress=False,
                 num_diagnostic_draws=64, whiten=False, early_stopping=False, jit_compile=jit,
                 strategy=strategy)
    t1 = time.perf_counter()
    idata = nf.sample(target, flow, kernel=kernel, num_chains=chains, num_warmup=6, num_samples=4, seed=7,
                      progress=False, jit_compile=jit, adapt_latent_scale=False, strategy=strategy)
    t2 = time.perf_counter()
    x = np.stack([np.asarray(idata.posterior[v]) for v in idata.posterior.data_vars], -1)
    return dict(losses=fit.losses, draws=x, step=np.asarray(idata.sample_stats["step_size"]),
                n_steps=np.asarray(idata.sample_stats["n_steps"]),
                fit_seconds=np.array(t1 - t0), sample_seconds=np.array(t2 - t1),
                compile_seconds=np.array(idata.posterior.attrs["compile_time"]),
                warmup_seconds=np.array(idata.posterior.attrs["warmup_time"]))


def _bad_inputs(strategy) -> dict:
    """The messages of the two refusals (chains not divisible, flow built outside the scope)."""
    import numpy as np

    import neutra_flows as nf

    target, flow = _flow_and_target(strategy)
    out = {}
    try:
        nf.sample(target, flow, kernel="hmc", num_chains=strategy.num_replicas_in_sync + 1, num_warmup=2,
                  num_samples=2, seed=1, progress=False, strategy=strategy)
    except ValueError as err:
        out["err_divisible"] = np.array(str(err))
    outside = nf.make_flow("iaf", target.event_size, num_layers=1, hidden_units=[4])
    try:
        nf.fit(target, outside, num_steps=2, batch_size=8, seed=1, progress=False, strategy=strategy)
    except ValueError as err:
        out["err_scope"] = np.array(str(err))
    return out


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings

    warnings.simplefilter("ignore")
    import time

    import numpy as np
    import tensorflow as tf

    start = time.perf_counter()
    if mode == "mirrored":
        # sys.argv[3]: replicas, sys.argv[4]: kernel. The same run without a strategy
        # (keys "ref_...") is the reference. One strategy per process: TensorFlow's
        # collective groups do not survive a second one.
        replicas = int(sys.argv[3])
        kernel = sys.argv[4] if len(sys.argv) > 4 else "hmc"
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        results = {f"ref_{k}": v for k, v in _run(None, kernel).items()}
        strategy = tf.distribute.MirroredStrategy(devices)
        results.update(_run(strategy, kernel))
        if replicas > 1:
            results.update(_bad_inputs(strategy))
    elif mode == "multiworker":
        results = _run(tf.distribute.MultiWorkerMirroredStrategy())
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    results["seconds"] = np.array(time.perf_counter() - start)
    np.savez(out, **results)


if __name__ == "__main__":
    main()

"""GPU check: the hot loops run on the GPU, and how fast (fit steps/s, transitions/s vs chains).

Confirms that ``fit``'s compiled Adam loop and ``sample``'s compiled transition
loop execute on the GPU, not silently on the host: the flow's variables must
live on a GPU, the GPU's peak memory (``tf.config.experimental.get_memory_info``)
must grow while each loop runs, and the sampler's outputs must come back from a
GPU. Then measures fit steps per second and NeuTra-HMC transitions per second
for 1 to 4,096 chains (and, with ``--mirrored`` on a machine with several GPUs,
the same under ``tf.distribute.MirroredStrategy``). Stops starting new runs once
``--budget`` seconds (default 270) are spent, so the whole check stays under
5 minutes. Without a visible GPU it says so and exits with status 0.

    python benchmarks/gpu_check.py [--chains 1 4 16 64 256 1024 4096] [--mirrored]
        [--budget 270] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def _peak(device: str) -> int:
    return int(tf.config.experimental.get_memory_info(device)["peak"])


def _on_gpu(what: str, device: str, run) -> tuple[object, int]:
    """Runs ``run()`` and fails loudly unless the GPU's peak memory grew meanwhile."""
    tf.config.experimental.reset_memory_stats(device)
    before = _peak(device)
    out = run()
    grown = _peak(device) - before
    if grown <= 0:
        raise SystemExit(f"FAIL: {what} did not allocate on {device}: it ran on the host")
    return out, grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--mirrored", action="store_true", help="also run under MirroredStrategy (all GPUs)")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds after which no new run starts")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    start = time.perf_counter()

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print("gpu_check: no GPU is visible to TensorFlow (tf.config.list_physical_devices('GPU') is empty); "
              "nothing to check. Install a CUDA build of TensorFlow (pip install 'tensorflow[and-cuda]') "
              "and check nvidia-smi.")
        sys.exit(0)
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    warnings.simplefilter("ignore")
    import neutra_flows as nf
    from neutra_flows import models

    device = "GPU:0"
    report: dict = dict(gpus=[g.name for g in gpus], tensorflow=tf.__version__,
                        details=[tf.config.experimental.get_device_details(g) for g in gpus])
    print(f"gpu_check: {len(gpus)} GPU(s): {report['details']}")

    target = models.neals_funnel(10)
    flow = nf.make_flow("iaf", target.event_size)
    for v in flow.trainable_variables:
        if "GPU" not in v.device.upper():
            raise SystemExit(f"FAIL: flow variable {v.name} lives on {v.device!r}, not on a GPU")

    # Two fits of different lengths: their difference is steps/s without compile time.
    fit_kw = dict(batch_size=args.batch_size, seed=0, progress=False, whiten=False, early_stopping=False,
                  num_diagnostic_draws=4096)
    short_steps = max(1, args.fit_steps // 5)
    short, _ = _on_gpu("fit", device, lambda: nf.fit(target, flow, num_steps=short_steps, **fit_kw))
    result, grown = _on_gpu("fit", device, lambda: nf.fit(target, flow, num_steps=args.fit_steps, **fit_kw))
    fit_rate = (args.fit_steps - short_steps) / max(1e-9, result.wall_time - short.wall_time)
    report["fit"] = dict(steps=args.fit_steps, batch_size=args.batch_size, wall_time=result.wall_time,
                         steps_per_s=fit_rate, peak_bytes=grown, elbo=result.elbo)
    print(f"fit: {fit_rate:.1f} steps/s at batch {args.batch_size} (peak GPU memory +{grown / 2**20:.1f} MiB)")

    def sample_rows(strategy, sampling_flow, label):
        rows = []
        replicas = 1 if strategy is None else strategy.num_replicas_in_sync
        for chains in args.chains:
            if time.perf_counter() - start > args.budget:
                print(f"{label}: budget of {args.budget:.0f} s spent; skipping {chains} chains and more")
                break
            if chains % replicas:
                continue
            idata, grown = _on_gpu(
                f"sample({chains} chains)", device,
                lambda c=chains: nf.sample(target, sampling_flow, kernel="hmc", num_leapfrog_steps=8,
                                           num_chains=c, num_warmup=args.warmup, num_samples=args.samples,
                                           seed=1, progress=False, strategy=strategy))
            a = idata.posterior.attrs
            row = dict(chains=chains, replicas=replicas, compile_s=a["compile_time"], warmup_s=a["warmup_time"],
                       sampling_s=a["sampling_time"],
                       transitions_per_s=chains * args.samples / a["sampling_time"],
                       gradients_per_s=a["num_grad_evals_sampling"] / a["sampling_time"], peak_bytes=grown)
            rows.append(row)
            print(f"{label}: {chains:5d} chains: {row['transitions_per_s']:12.0f} transitions/s "
                  f"({row['gradients_per_s']:.3g} gradients/s), peak +{grown / 2**20:.1f} MiB", flush=True)
        return rows

    report["sample"] = sample_rows(None, result.flow, "sample")
    if args.mirrored and len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        with strategy.scope():
            mirrored_flow = nf.make_flow("iaf", target.event_size)
        for dst, src in zip(mirrored_flow.variables, result.flow.variables, strict=True):
            dst.assign(src)
        report["sample_mirrored"] = sample_rows(strategy, mirrored_flow, f"mirrored x{len(gpus)}")
    elif args.mirrored:
        print("--mirrored needs at least 2 GPUs; skipped")

    report["total_s"] = time.perf_counter() - start
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    print(f"gpu_check: OK, the loops ran on the GPU; {report['total_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()

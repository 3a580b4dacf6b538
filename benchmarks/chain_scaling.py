"""Chain-count scaling of NeuTra-HMC on one device: transitions/s and ESS/s against chains.

Trains one small IAF on a small target once, then runs ``neutra_flows.sample``
(NeuTra-HMC with ChEES, XLA) for each chain count with few warm-up steps and
draws per chain, and records the sampling-phase wall time (compile and warm-up
excluded), chain transitions per second (chains x draws / sampling time),
leapfrog gradients per second, and the bulk ESS per second (the smallest over
the coordinates, ArviZ's rank-normalised estimate). Writes a JSON and a PNG.

    python benchmarks/chain_scaling.py [--chains 4 16 64 256 1024 4096 16384] [--warmup 100]
        [--samples 400] [--out docs/img/chain_scaling]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import neutra_flows as nf  # noqa: E402
from neutra_flows import models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, nargs="+", default=[4, 16, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--dims", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/img/chain_scaling")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    target = models.banana(args.dims)
    flow = nf.make_flow("iaf", target.event_size, num_layers=2, hidden_units=[16, 16])
    start = time.perf_counter()
    fit = nf.fit(target, flow, num_steps=args.train_steps, batch_size=256, seed=args.seed, progress=False,
                 num_diagnostic_draws=1024)
    print(f"trained IAF on {target.name}: {time.perf_counter() - start:.1f} s, ELBO {fit.elbo:.3f}")

    rows = []
    for chains in args.chains:
        idata = nf.sample(target, fit, kernel="hmc", num_chains=chains, num_warmup=args.warmup,
                          num_samples=args.samples, seed=args.seed, progress=False)
        attrs = idata.posterior.attrs
        t = float(attrs["sampling_time"])
        ess = az.ess(idata.posterior.astype(np.float64), method="bulk")
        min_ess = float(min(np.nanmin(np.asarray(ess[v])) for v in ess.data_vars))
        row = dict(
            chains=chains,
            compile_s=float(attrs["compile_time"]),
            warmup_s=float(attrs["warmup_time"]),
            sampling_s=t,
            transitions_per_s=chains * args.samples / t,
            gradients_per_s=float(attrs["num_grad_evals_sampling"]) / t,
            mean_leapfrog_steps=float(attrs["mean_leapfrog_steps"]),
            min_bulk_ess=min_ess,
            ess_per_s=min_ess / t,
        )
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    machine = dict(platform=platform.platform(), processor=platform.processor(), cpu_count=os.cpu_count(),
                   tensorflow=tf.__version__, devices=[d.name for d in tf.config.list_logical_devices()])
    out = dict(target=target.name, flow="iaf(2 layers, [16, 16])", kernel="NeuTra-HMC (ChEES), XLA",
               warmup=args.warmup, samples=args.samples, seed=args.seed, machine=machine, rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(out, fh, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["chains"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].loglog(x, [r["transitions_per_s"] for r in rows], "o-", label="transitions / s")
    ax[0].loglog(x, [r["gradients_per_s"] for r in rows], "s--", label="gradients / s")
    ax[0].set_xlabel("chains")
    ax[0].legend()
    ax[0].set_title("throughput")
    ax[1].loglog(x, [r["ess_per_s"] for r in rows], "o-")
    ax[1].set_xlabel("chains")
    ax[1].set_ylabel("min bulk ESS / s")
    ax[1].set_title("ESS per second")
    fig.suptitle(f"NeuTra-HMC on {target.name}, {os.cpu_count()} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()

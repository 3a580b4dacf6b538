"""Smoke benchmark of the sampler: NeuTra (IAF) against the plain-NUTS baseline.

Fits an IAF to ``banana`` and ``neals_funnel(10)`` by VI, then samples each
target with NeuTra-HMC (ChEES trajectory), NeuTra-NUTS and the baseline NUTS,
and prints :func:`neutra_flows.compare`'s table. Not a test; the figures it
prints go into the sampler docs.

    python benchmarks/sampler_smoke.py [--chains 16] [--warmup 500] [--samples 1000]
        [--train-steps 3000] [--batch-size 512] [--targets banana funnel]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd  # noqa: E402

import neutra_flows as nf  # noqa: E402
from neutra_flows import models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", nargs="+", default=["banana", "funnel"])
    parser.add_argument("--no-nuts-neutra", action="store_true")
    args = parser.parse_args()
    builders = {"banana": lambda: models.banana(), "funnel": lambda: models.neals_funnel(10)}
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    for name in args.targets:
        target = builders[name]()
        flow = nf.make_flow("iaf", target.event_size)
        start = time.perf_counter()
        fit = nf.fit(
            target,
            flow,
            num_steps=args.train_steps,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=False,
            global_clipnorm=10.0,
        )
        print(
            f"\n== {target.name}: trained an IAF in "
            f"{time.perf_counter() - start:.1f} s, ELBO {fit.elbo:.3f}, k-hat {fit.khat:.2f}"
        )
        common = dict(
            num_chains=args.chains,
            num_warmup=args.warmup,
            num_samples=args.samples,
            seed=args.seed + 1,
            progress=False,
        )
        runs = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            runs["NeuTra-HMC (ChEES)"] = nf.sample(target, fit, kernel="hmc", **common)
            if not args.no_nuts_neutra:
                runs["NeuTra-NUTS"] = nf.sample(target, fit, kernel="nuts", **common)
            runs["NUTS"] = nf.sample(target, None, kernel="nuts", **common)
        table = nf.compare(runs)
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
        for label, idata in runs.items():
            a = idata.posterior.attrs
            print(
                f"  {label}: step {a['step_size']:.3g}, trajectory {a['trajectory_length']:.3g},"
                f" mean leapfrog {a['mean_leapfrog_steps']:.2f}, compile {a['compile_time']:.1f}"
                f" s, warm-up {a['warmup_time']:.1f} s, sampling {a['sampling_time']:.1f} s"
            )


if __name__ == "__main__":
    main()

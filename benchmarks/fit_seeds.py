"""How much a flow's VI fit depends on the seed: -ELBO and k-hat over seeds.

Each seed trains a fresh flow exactly as `neutra-flows bench TARGET --seed S`
does (`nf.fit(target, flow, num_steps, batch_size, seed=S)`), so a row here is
that run's fit. Reverse KL can stall in a poor local optimum; one seed in a
table hides that, this script shows it.

    python benchmarks/fit_seeds.py banana realnvp --seeds 0 1 2 3 --steps 1000
    python benchmarks/fit_seeds.py banana realnvp --seeds 0 1 --option num_layers=6
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import neutra_flows as nf  # noqa: E402
from neutra_flows.app.bench import BENCHMARKS, resolve_target  # noqa: E402
from neutra_flows.app.cli import parse_flow_options  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(BENCHMARKS))
    parser.add_argument("flow", choices=list(nf.FLOW_NAMES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=None, help="constant rate (default: cosine)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a make_flow option, VALUE read as JSON when it parses")
    args = parser.parse_args()

    options = parse_flow_options(args.option)
    target, _ = resolve_target(args.target)
    print(f"{args.target} / {args.flow} {options or ''}: {args.steps} steps x {args.batch_size}")
    print("| seed | -ELBO | ELBO SE | k-hat | fit s |")
    print("|---|---|---|---|---|")
    losses = []
    for seed in args.seeds:
        flow = nf.make_flow(args.flow, target.event_size, dtype=target.dtype, **options)
        kwargs = {} if args.learning_rate is None else {"learning_rate": args.learning_rate}
        start = time.perf_counter()
        result = nf.fit(target, flow, num_steps=args.steps, batch_size=args.batch_size, seed=seed,
                        progress=False, **kwargs)
        losses.append(-result.elbo)
        print(f"| {seed} | {-result.elbo:.4g} | {result.elbo_se:.2g} | {result.khat:.2f} "
              f"| {time.perf_counter() - start:.0f} |", flush=True)
    print(f"median -ELBO {np.median(losses):.4g}, worst {np.max(losses):.4g}")


if __name__ == "__main__":
    main()

"""All-in wall-clock to 1000 min-bulk ESS: NeuTra's modes against plain NUTS, each in a fresh process.

For each model and method a new Python process imports the package, builds the
target and starts a stopwatch; then it runs the method with the suite's
protocol (4 chains, or ``--chains``, 1000 warm-up + 1000 draws, seed 1 for NeuTra, 2 for NUTS):

* ``adapt``: ``sample(target, "adapt", kernel="hmc")``, the recommended call
  (the whitening stage's Gaussian where it passes PSIS, else a flow adapted on
  the warm-up draws, or fit's IAF above 40 dimensions);
* ``adapt-nuts``: the same call with ``kernel="nuts"`` (NUTS in the flow's latent space);
* ``adapt-imh``: the same call with ``independence_steps=K`` (``--independence-steps``,
  default 3): after the warm-up, K independence proposals from the flow follow
  each NeuTra transition;
* ``vi``: ``fit`` of a 3-layer IAF (2000 x 256, whitening first), then
  ``sample(target, fit_result, kernel="hmc")``;
* ``nuts``: ``sample(target, None, kernel="nuts")``, windowed diagonal adaptation.

Time to 1000 ESS is ``time_to_first_draw + sampling_time x 1000 / ESS``: the
fixed cost until the first kept draw (training, compilation, warm-up), then the
sampling phase's own rate, extrapolated linearly (a chain's ESS grows linearly
with its length once it has mixed). The script prints one line per run and a
markdown table, and writes JSON with every run's phase times. Every run also
reports its sampling's ESS per target evaluation (gradients + density-only
evaluations: ``ess_per_eval``), the figure independence proposals are judged by.

    python benchmarks/time_to_ess.py [--models kidiq-kidscore_interaction ...] [--methods adapt nuts]
        [--independence-steps 3] [--chains 4] [--out docs/time_to_ess.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_METHODS = ("adapt", "adapt-nuts", "adapt-imh", "vi", "nuts")


def _one(model: str, method: str, independence_steps: int = 3, num_chains: int = 4) -> dict:
    """Runs ``method`` on ``model`` in this process; every second after the import is counted."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings

    warnings.simplefilter("ignore")
    import neutra_flows as nf
    from neutra_flows.app.bench import resolve_target

    target, _ = resolve_target(model)
    start = time.perf_counter()
    common = dict(num_chains=num_chains, num_warmup=1000, num_samples=1000, progress=False)
    if method == "adapt":
        idata = nf.sample(target, "adapt", kernel="hmc", seed=1, **common)
    elif method == "adapt-nuts":
        idata = nf.sample(target, "adapt", kernel="nuts", seed=1, **common)
    elif method == "adapt-imh":
        idata = nf.sample(target, "adapt", kernel="hmc", seed=1, independence_steps=independence_steps,
                          **common)
    elif method == "vi":
        result = nf.fit(target, nf.make_flow("iaf", target.event_size, dtype=target.dtype), num_steps=2000,
                        batch_size=256, seed=0, progress=False)
        idata = nf.sample(target, result, kernel="hmc", seed=1, **common)
    else:
        idata = nf.sample(target, None, kernel="nuts", seed=2, **common)
    wall = time.perf_counter() - start
    row = nf.compare({method: idata}).iloc[0]
    attrs = idata.posterior.attrs
    ess, first, sampling = float(row["min_ess_bulk"]), float(attrs["time_to_first_draw"]), float(
        attrs["sampling_time"])
    return dict(model=model, method=method, d=int(target.event_size), num_chains=num_chains, wall=wall,
                total_time=float(attrs["total_time"]), time_to_first_draw=first, sampling_time=sampling,
                min_ess_bulk=ess, max_rhat=float(row["max_rhat"]), divergences=float(row["divergences"]),
                ess_per_second_total=ess / float(attrs["total_time"]),
                time_to_1000_ess=first + sampling * 1000.0 / ess if ess > 0 else float("inf"),
                gradients=float(row["grad_evals_training"] + row["grad_evals_warmup"] + row["grad_evals"]),
                grad_evals_sampling=float(row["grad_evals"]),
                density_evals_sampling=float(row["density_evals"]),
                ess_per_eval=float(row["ess_per_eval"]),
                independence_acceptance_rate=float(attrs.get("independence_acceptance_rate", float("nan"))),
                max_abs_error_mcse=float(row.get("max_abs_error_mcse", float("nan"))),
                phase_times=json.loads(attrs["phase_times"]))


def _table(rows: list[dict]) -> str:
    lines = ["| model | d | chains | method | all-in s | first draw s | min ESS | time to 1000 ESS, s | "
             "all-in ESS/s | ESS per eval (sampling) | R-hat | max bias/MCSE |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['d']} | {r.get('num_chains', 4)} | {r['method']} | "
                     f"{r['total_time']:.1f} | "
                     f"{r['time_to_first_draw']:.1f} | {r['min_ess_bulk']:.0f} | {r['time_to_1000_ess']:.1f} | "
                     f"{r['ess_per_second_total']:.1f} | {r.get('ess_per_eval', float('nan')):.3f} | "
                     f"{r['max_rhat']:.3f} | {r['max_abs_error_mcse']:.2g} |")
    return "\n".join(lines)


def main() -> None:
    from neutra_flows.models.posteriordb import POSTERIORDB_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(POSTERIORDB_MODELS))
    parser.add_argument("--methods", nargs="+", choices=_METHODS, default=["adapt", "nuts"])
    parser.add_argument("--independence-steps", type=int, default=3,
                        help="independence proposals per NeuTra transition for the adapt-imh method")
    parser.add_argument("--chains", type=int, default=4,
                        help="chains for every method (the ESS counts them all); the protocol's is 4")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(_one(*args.one, independence_steps=args.independence_steps,
                                       num_chains=args.chains)))
        return
    rows = []
    for model in args.models:
        for method in args.methods:
            # A fresh process each: no compilation cache or warm import favours one method.
            done = subprocess.run([sys.executable, __file__, "--one", model, method, "--independence-steps",
                                   str(args.independence_steps), "--chains", str(args.chains)],
                                  capture_output=True, text=True, check=False)
            line = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
            if not line:
                print(f"{model} {method}: FAILED\n{done.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(line[-1][4:])
            rows.append(row)
            print(f"{model} {method}: {row['total_time']:.1f} s all-in, first draw "
                  f"{row['time_to_first_draw']:.1f} s, ESS {row['min_ess_bulk']:.0f}, "
                  f"to 1000 ESS {row['time_to_1000_ess']:.1f} s, "
                  f"ESS/eval {row['ess_per_eval']:.3f}, R-hat {row['max_rhat']:.3f}", flush=True)
            if args.out:
                with open(args.out, "w") as fh:
                    json.dump({"rows": rows}, fh, indent=1)
    print(_table(rows))


if __name__ == "__main__":
    main()

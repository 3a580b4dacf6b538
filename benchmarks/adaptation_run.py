"""One run of NeuTra with the flow adapted on the warm-up draws, with its refits.

The single runs behind the ablation table of docs/sampling.md ("Adapting the
flow on the warm-up draws"):

    python benchmarks/adaptation_run.py banana '{"tail_points": 0}'
    python benchmarks/adaptation_run.py funnel '{"start": "whitening"}'
    python benchmarks/adaptation_run.py eight-schools '{}'
    python benchmarks/adaptation_run.py funnel-50 '{"fit_above_dims": null}'   # adapt above 40-D too

The second argument is a JSON dict of :class:`neutra_flows.FlowAdaptation`
settings; ``--kernel`` (default hmc), ``--seed`` (default 1) and
``--target-accept`` (default 0.8), ``--chains`` (default 4) and ``--warmup`` (default
1000) are the sampler's.
"""

import argparse
import json
import warnings

import neutra_flows as nf

TARGETS = {
    "banana": lambda: nf.models.banana(),
    "funnel": lambda: nf.models.neals_funnel(10),
    "funnel-100": lambda: nf.models.neals_funnel(100),
    # Between them: where the adaptation stops working (FlowAdaptation.fit_above_dims).
    "funnel-20": lambda: nf.models.neals_funnel(20),
    "funnel-30": lambda: nf.models.neals_funnel(30),
    "funnel-50": lambda: nf.models.neals_funnel(50),
    "eight-schools": lambda: nf.models.eight_schools(),
    "german-credit": lambda: nf.models.german_credit_sparse_logistic_regression(),
    # The two posteriordb regressions of the peers benchmark.
    "kidiq": lambda: nf.models.load_posteriordb("kidiq-kidscore_interaction"),
    "earnings": lambda: nf.models.load_posteriordb("earnings-logearn_interaction"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("settings", nargs="?", default="{}", help="FlowAdaptation settings as JSON")
    parser.add_argument("--kernel", default="hmc", choices=["hmc", "nuts"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--target-accept", type=float, default=0.8)
    parser.add_argument("--warmup", type=int, default=1000)
    args = parser.parse_args()
    target = TARGETS[args.target]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = nf.sample(target, "adapt", adapt_flow=nf.FlowAdaptation(**json.loads(args.settings)),
                          kernel=args.kernel, seed=args.seed, progress=False, num_chains=args.chains,
                          target_accept_prob=args.target_accept, num_warmup=args.warmup)
    attrs = idata.posterior.attrs
    print("start:", attrs["flow_adaptation_start"])
    for refit in json.loads(attrs["flow_refits"]):
        print("refit:", refit)
    for key in ("num_grad_evals_training", "num_grad_evals_warmup", "num_grad_evals_sampling",
                "num_divergences_warmup", "num_divergences_sampling", "step_size", "trajectory_length",
                "mean_leapfrog_steps", "latent_scale_min", "latent_scale_max", "flow_training_time",
                "flow_adaptation_time"):
        print(f"{key}: {attrs.get(key)}")
    row = nf.compare({"adapt": idata}).loc["adapt"]
    for key in ("ess_per_grad", "ess_per_grad_total", "max_rhat", "max_abs_error_mcse", "min_std_ratio",
                "max_std_ratio"):
        if key in row:
            print(f"{key}: {float(row[key]):.4g}")


if __name__ == "__main__":
    main()

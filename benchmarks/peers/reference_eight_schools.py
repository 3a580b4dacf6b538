"""A reference posterior for centred eight schools, which has no ground truth in neutra_flows.

``neutra_flows.models.eight_schools()`` has ``ground_truth_mean = None``. The
posterior of ``mu``, ``tau``, ``theta`` does not depend on the parameterisation,
so a long run of the *non-centred* model (``theta = mu + tau * eta``, the easy
geometry) estimates it: nutpie's plain NUTS, 8 chains x 25 000 draws, seed 12345
(not the benchmark's seed). Runs in the peers' venv::

    .venv-peers/bin/python benchmarks/peers/reference_eight_schools.py

and writes ``results/eight_schools_reference.json`` (mean, std, the Monte
Carlo standard errors of the means, R-hat and ESS). It is an estimate, not an exact
truth: the table judges eight schools against it with the suite's tolerances
(5 MCSE, 15 %), and says so.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

CHAINS, DRAWS, TUNE, SEED = 8, 25_000, 1000, 12345


def main() -> None:
    import arviz as az
    import jax
    import nutpie
    import pymc as pm

    jax.config.update("jax_enable_x64", True)
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 5.0)
        tau = pm.HalfCauchy("tau", 5.0)
        eta = pm.Normal("eta", 0.0, 1.0, shape=8)
        theta = pm.Deterministic("theta", mu + tau * eta)
        pm.Normal("y", theta, common.EIGHT_SCHOOLS_SIGMA, observed=common.EIGHT_SCHOOLS_Y)
    t0 = time.perf_counter()
    compiled = nutpie.compile_pymc_model(model, backend="jax", gradient_backend="jax")
    trace = nutpie.sample(
        compiled, chains=CHAINS, draws=DRAWS, tune=TUNE, seed=SEED, progress_bar=False, target_accept=0.95
    )
    seconds = time.perf_counter() - t0
    post = trace.posterior[["mu", "tau", "theta"]]
    mean = {k: np.asarray(post[k].mean(("chain", "draw"))) for k in post.data_vars}
    std = {k: np.asarray(post[k].std(("chain", "draw"), ddof=1)) for k in post.data_vars}
    mcse_mean = az.mcse(post, method="mean")
    ess = az.ess(post, method="bulk")
    rhat = az.rhat(post)
    out = {
        "what": "eight schools (mu ~ N(0, 5), tau ~ HalfCauchy(0, 5), y_i ~ N(theta_i, sigma_i)) posterior, "
        "estimated by a long non-centred nutpie NUTS run",
        "settings": {
            "chains": CHAINS,
            "draws": DRAWS,
            "tune": TUNE,
            "seed": SEED,
            "target_accept": 0.95,
            "parameterisation": "non-centred (theta = mu + tau * eta)",
        },
        "mean": {k: v.tolist() for k, v in mean.items()},
        "std": {k: v.tolist() for k, v in std.items()},
        "mcse_mean": {k: np.asarray(mcse_mean[k]).tolist() for k in post.data_vars},
        "min_ess_bulk": float(min(np.min(np.asarray(ess[k])) for k in post.data_vars)),
        "max_rhat": float(max(np.max(np.asarray(rhat[k])) for k in post.data_vars)),
        "divergences": int(np.asarray(trace.sample_stats["diverging"]).sum()),
        "seconds": seconds,
        "versions": common.package_versions(["nutpie", "pymc", "jax"]),
    }
    os.makedirs(common.RESULTS_DIR, exist_ok=True)
    path = os.path.join(common.RESULTS_DIR, "eight_schools_reference.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(
        f"wrote {path}: min ESS {out['min_ess_bulk']:.0f}, max R-hat {out['max_rhat']:.4f}, "
        f"{out['divergences']} divergences, {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()

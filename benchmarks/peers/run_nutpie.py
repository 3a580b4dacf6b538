"""nutpie on the peers benchmark's targets: its normalizing-flow adaptation, and its plain NUTS.

Runs in the peers' venv (``bash benchmarks/peers/setup.sh``)::

    .venv-peers/bin/python benchmarks/peers/run_nutpie.py [TARGET ...] [--methods nutpie-flow nutpie-nuts]

The targets are written natively in PyMC, term by term the densities of
``neutra_flows.targets`` / ``neutra_flows.models.posteriordb`` (same priors,
same constraining transforms: ``log`` for positive scales, as TFP's and Stan's).
Each model is compiled with ``nutpie.compile_pymc_model(model, backend="jax",
gradient_backend="jax")``, the combination nutpie's flow adaptation requires.

Methods (one ``runs/<target>/<method>.{npz,json}`` each):

``nutpie-flow``
    ``compiled.with_transform_adapt()`` with nutpie's defaults, then
    ``nutpie.sample(compiled, transform_adapt=True, tune=TUNE, ...)``. ``TUNE``
    is nutpie's own default for the flow adaptation, 1500 warm-up draws (its
    plain NUTS defaults to 400): the flow is trained during warm-up, and its
    docs ask for enough warm-up draws to let it converge. ``cores=1`` as in
    nutpie's flow-adaptation docs ("Running chains in parallel can be slow").
``nutpie-nuts``
    nutpie's default sampler (diagonal mass matrix from draws and gradients),
    ``tune=1000`` like the rest of the protocol.

Cost accounting. A gradient evaluation is one leapfrog step of one chain:
``n_steps`` of every warm-up and kept draw (``save_warmup=True``). nutpie's flow
is fitted to the positions, gradients and log densities the sampler already
computed (its Fisher-divergence loss in ``nutpie.transform_adapter``), so the
fit evaluates no extra target gradients; what nutpie does not count is the one
gradient per chain at each (re)initialisation of a chain's point under a new
transform (``init_from_untransformed_position``), at most one per chain per
flow update (a few dozen per chain), left out here as in nutpie's ``n_steps``.
Wall-clock: ``compile`` is ``compile_pymc_model``; ``warmup_and_sampling`` is
the whole ``nutpie.sample`` call (JAX compilation of the log density and the
flow, flow training, warm-up, sampling): nutpie does not report the phases
apart, so ESS per second in sampling alone is not available for nutpie.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

FLOW_TUNE = 1500  # nutpie's default num_tune for PyNutsSettings.Transform (checked below)
if common.QUICK:
    FLOW_TUNE = 300
NUTS_TUNE = common.NUM_WARMUP


def build_model(target: str):
    """``(pm.Model, to_ours)``; ``to_ours(posterior) -> {our name: [chains, draws, ...]}``."""
    import pymc as pm

    with pm.Model() as model:
        if target.startswith("funnel-"):
            d = common.funnel_dim(target)
            x0 = pm.Normal("x0", 0.0, 3.0)
            pm.Normal("x_rest", 0.0, pm.math.exp(x0 / 2.0), shape=d - 1)

            def to_ours(post):
                x0 = np.asarray(post["x0"])[..., None]
                return {"x": np.concatenate([x0, np.asarray(post["x_rest"])], axis=-1)}
        elif target == "banana":
            b = common.BANANA_CURVATURE
            x0 = pm.Normal("x0", 0.0, 10.0)
            pm.Normal("x1", b * (x0**2 - 100.0), 1.0)

            def to_ours(post):
                return {"x": np.stack([np.asarray(post["x0"]), np.asarray(post["x1"])], axis=-1)}
        elif target == "eight-schools":
            mu = pm.Normal("mu", 0.0, 5.0)
            tau = pm.HalfCauchy("tau", 5.0)  # log transform, as TFP's default for HalfCauchy
            theta = pm.Normal("theta", mu, tau, shape=8)  # centred
            pm.Normal("y", theta, common.EIGHT_SCHOOLS_SIGMA, observed=common.EIGHT_SCHOOLS_Y)

            def to_ours(post):
                return {k: np.asarray(post[k]) for k in ("mu", "tau", "theta")}
        elif target in ("kidiq", "earnings"):
            x, y = common.regression_data(target)
            beta = pm.Flat("beta", shape=x.shape[1])  # Stan's implicit flat prior
            if target == "kidiq":
                sigma = pm.HalfCauchy("sigma", 2.5)  # sigma ~ cauchy(0, 2.5), sigma > 0
            else:
                sigma = pm.HalfFlat("sigma")  # no sampling statement: flat on sigma > 0
            pm.Normal("y", pm.math.dot(x, beta), sigma, observed=y)

            def to_ours(post):
                return {k: np.asarray(post[k]) for k in ("beta", "sigma")}
        else:
            raise ValueError(target)
    return model, to_ours


def run_one(target: str, method: str, clock_model_cache: dict) -> None:
    import jax
    import nutpie

    jax.config.update("jax_enable_x64", True)
    flow = method == "nutpie-flow"
    tune = FLOW_TUNE if flow else NUTS_TUNE
    cores = 1 if flow else min(common.NUM_CHAINS, os.cpu_count() or 1)
    base = {
        "label": "nutpie flow adaptation" if flow else "nutpie NUTS (diag)",
        "settings": {
            "backend": "jax",
            "gradient_backend": "jax",
            "transform_adapt": flow,
            "with_transform_adapt": "nutpie defaults" if flow else None,
            "chains": common.NUM_CHAINS,
            "tune": tune,
            "draws": common.NUM_SAMPLES,
            "seed": common.SEED,
            "cores": cores,
            "jax_enable_x64": True,
        },
        "versions": common.package_versions(
            ["nutpie", "pymc", "pytensor", "jax", "jaxlib", "flowjax", "equinox", "numpy"]
        ),
    }

    def go():
        clock = common.Clock()
        model, to_ours = build_model(target)
        with clock("compile"):
            compiled = nutpie.compile_pymc_model(model, backend="jax", gradient_backend="jax")
            if flow:
                compiled = compiled.with_transform_adapt(verbose=False, show_progress=False)
        with clock("warmup_and_sampling"):
            trace = nutpie.sample(
                compiled,
                transform_adapt=flow,
                chains=common.NUM_CHAINS,
                tune=tune,
                draws=common.NUM_SAMPLES,
                seed=common.SEED,
                cores=cores,
                save_warmup=True,
                progress_bar=False,
            )
        stats, wstats = trace.sample_stats, trace.warmup_sample_stats
        n_steps = np.asarray(stats["n_steps"], np.int64)
        n_steps_warm = np.asarray(wstats["n_steps"], np.int64)
        div = np.asarray(stats["diverging"], bool)
        div_warm = np.asarray(wstats["diverging"], bool)
        record = dict(base)
        record.update(
            status="ok",
            grad_evals_training=0,
            grad_evals_warmup=int(n_steps_warm.sum()),
            grad_evals_sampling=int(n_steps.sum()),
            divergences_warmup=int(div_warm.sum()),
            divergences_sampling=int(div.sum()),
            times={
                "compile": clock.seconds["compile"],
                "training": None,
                "warmup": None,
                "sampling": None,
                "warmup_and_sampling": clock.seconds["warmup_and_sampling"],
                "total": clock.seconds["compile"] + clock.seconds["warmup_and_sampling"],
            },
            counting=(
                "gradients = sum of n_steps over warm-up and kept draws (save_warmup=True); "
                "the flow is fitted to those draws' positions and gradients (no extra target "
                "gradients); not counted: one gradient per chain per flow update when a chain's "
                "point is re-expressed under the new transform"
                if flow
                else "gradients = sum of n_steps over warm-up and kept draws"
            ),
            notes=[
                f"nutpie.sample wall time includes JAX compilation{' and flow training' if flow else ''};"
                " its phases are not reported apart"
            ],
            sample_stats_fields=sorted(stats.data_vars),
        )
        save_run(target, method, record, to_ours(trace.posterior), {"diverging": div, "n_steps": n_steps})

    common.guarded(target, method, base, go)


save_run = common.save_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"default: all of {list(common.TARGETS)}")
    parser.add_argument(
        "--methods", nargs="+", default=["nutpie-flow", "nutpie-nuts"], choices=["nutpie-flow", "nutpie-nuts"]
    )
    args = parser.parse_args()
    import nutpie._lib as lib

    default_tune = lib.PyNutsSettings.Transform(0).num_tune
    if default_tune != FLOW_TUNE:
        print(f"note: this nutpie's default flow warm-up is {default_tune}, the harness uses {FLOW_TUNE}")
    for target in common.parse_targets(args.targets):
        for method in args.methods:
            t0 = time.perf_counter()
            run_one(target, method, {})
            print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()

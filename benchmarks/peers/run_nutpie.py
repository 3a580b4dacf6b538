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
apart, so ESS per second in sampling alone is not available for nutpie. For the
time to 1000 ESS (``benchmarks/time_to_ess.py``'s definition), :class:`ChainClock`
reads the sampling phase off nutpie's progress reports: ``sampling_seconds`` and
``time_to_first_draw`` (= total - sampling_seconds) in the record.

The posteriordb models (``kidiq``, ``earnings``, ``mesquite``, ``nes``, ``sblrc``,
``ark``, ``arma11``, ``garch11``, ``gp-regr``, ``gauss-mix``) are the Stan programs
of ``neutra_flows/data/posteriordb/`` with the transforms of
``neutra_flows.models.posteriordb``; ``check_models.py`` checks that each one's log
density equals ours up to a constant on the same unconstrained space.
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


# Where a model's default start (its support point) is not in the support: gauss-mix's
# ordered mu would start at [0, 0], whose ordered transform is log(0). nutpie adds its
# U(-1, 1) jitter (in the unconstrained space) to these, as to the default start.
INITIAL_POINTS = {"gauss-mix": {"mu": np.array([-1.0, 1.0])}}


def build_model(target: str):
    """``(pm.Model, to_ours)``; ``to_ours(posterior) -> {our name: [chains, draws, ...]}``."""
    import pymc as pm
    import pytensor
    import pytensor.tensor as pt
    from pymc.distributions.transforms import ordered

    names = None  # the variables, under our names, where to_ours just picks them
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
        elif target in common.REGRESSIONS:
            # y ~ normal(X beta, sigma); the design matrices as neutra_flows builds them.
            x, y = common.regression_data(target)
            if target == "sblrc":
                beta = pm.Normal("beta", 0.0, 10.0, shape=x.shape[1])  # target += normal_lpdf(beta | 0, 10)
                sigma = pm.HalfNormal("sigma", 10.0)  # target += normal_lpdf(sigma | 0, 10), sigma > 0
            else:
                beta = pm.Flat("beta", shape=x.shape[1])  # Stan's implicit flat prior
                if target == "kidiq":
                    sigma = pm.HalfCauchy("sigma", 2.5)  # sigma ~ cauchy(0, 2.5), sigma > 0
                else:  # earnings, mesquite, nes: no sampling statement, flat on sigma > 0
                    sigma = pm.HalfFlat("sigma")
            pm.Normal("y", pm.math.dot(x, beta), sigma, observed=y)
            names = ("beta", "sigma")
        elif target == "ark":
            # y[t] ~ normal(alpha + sum_k beta[k] y[t-k], sigma), t = K+1..T: vectorised over t.
            lags, y = common.ark_data()
            alpha = pm.Normal("alpha", 0.0, 10.0)
            beta = pm.Normal("beta", 0.0, 10.0, shape=lags.shape[1])
            sigma = pm.HalfCauchy("sigma", 2.5)
            pm.Normal("y", alpha + pm.math.dot(lags, beta), sigma, observed=y)
            names = ("alpha", "beta", "sigma")
        elif target == "arma11":
            y = np.asarray(common.read_posteriordb(target)["y"], np.float64)
            mu = pm.Normal("mu", 0.0, 10.0)
            phi = pm.Normal("phi", 0.0, 2.0)
            theta = pm.Normal("theta", 0.0, 2.0)
            sigma = pm.HalfCauchy("sigma", 2.5)
            # nu[1] = mu + phi mu (err[0] = 0), nu[t] = mu + phi y[t-1] + theta err[t-1];
            # err[t] = y[t] - nu[t] = offset[t] - theta err[t-1], with offset[t] = y[t] - mu - phi y[t-1].
            prev_y = pt.concatenate([pt.stack([mu]), pt.as_tensor(y[:-1])])
            offset = pt.as_tensor(y) - mu - phi * prev_y
            err = pytensor.scan(
                lambda off, err_prev, th: off - th * err_prev,
                sequences=[offset],
                outputs_info=[pt.zeros((), dtype=offset.dtype)],
                non_sequences=[theta],
                return_updates=False,
            )
            # err ~ normal(0, sigma): err is a function of the parameters, so a Potential, not observed.
            pm.Potential("err_lik", pm.logp(pm.Normal.dist(0.0, sigma), err).sum())
            names = ("mu", "phi", "theta", "sigma")
        elif target == "garch11":
            d = common.read_posteriordb(target)
            y = np.asarray(d["y"], np.float64)
            sigma1 = float(d["sigma1"])
            # Every prior is Stan's implicit flat one on the constrained parameter; the transforms
            # are Stan's (and neutra_flows' _GarchBounds): mu identity, alpha0 log, alpha1 logit,
            # beta1 = (1 - alpha1) sigmoid(u) (PyMC's interval transform with the dependent bound).
            mu = pm.Flat("mu")
            alpha0 = pm.HalfFlat("alpha0")
            alpha1 = pm.Uniform("alpha1", 0.0, 1.0)  # density 1 on (0, 1): flat
            beta1 = pm.Uniform("beta1", 0.0, 1.0 - alpha1)
            # Uniform's density is 1 / (1 - alpha1); Stan's beta1 has no sampling statement (flat),
            # so that term is taken back out.
            pm.Potential("beta1_flat", pt.log1p(-alpha1))
            # sigma[1] = sigma1; sigma[t]^2 = alpha0 + alpha1 (y[t-1] - mu)^2 + beta1 sigma[t-1]^2.
            shocks = alpha0 + alpha1 * pt.square(pt.as_tensor(y[:-1]) - mu)
            var_rest = pytensor.scan(
                lambda shock, var_prev, b: shock + b * var_prev,
                sequences=[shocks],
                outputs_info=[pt.as_tensor(np.float64(sigma1**2))],
                non_sequences=[beta1],
                return_updates=False,
            )
            variance = pt.concatenate([pt.as_tensor(np.array([sigma1**2])), var_rest])
            pm.Normal("y", mu, pt.sqrt(variance), observed=y)
            names = ("mu", "alpha0", "alpha1", "beta1")
        elif target == "gp-regr":
            d = common.read_posteriordb(target)
            x_obs = np.asarray(d["x"], np.float64)
            y = np.asarray(d["y"], np.float64)
            sq_dist = np.square(x_obs[:, None] - x_obs[None, :])
            rho = pm.Gamma("rho", alpha=25.0, beta=4.0)  # Stan's gamma(shape, rate)
            alpha = pm.HalfNormal("alpha", 2.0)
            sigma = pm.HalfNormal("sigma", 1.0)
            # gp_exp_quad_cov(x, alpha, rho) + diag_matrix(rep_vector(sigma, N)): sigma itself, not
            # sigma^2, on the diagonal, as in the Stan program.
            cov = pt.square(alpha) * pt.exp(-0.5 * sq_dist / pt.square(rho)) + sigma * np.eye(len(y))
            pm.MvNormal("y", mu=np.zeros(len(y)), chol=pt.linalg.cholesky(cov), observed=y)
            names = ("rho", "alpha", "sigma")
        elif target == "gauss-mix":
            y = np.asarray(common.read_posteriordb(target)["y"], np.float64)
            # ordered[2] mu: y1 = x1, y2 = y1 + exp(x2) (TFP's Ascending, PyMC's ordered transform).
            mu = pm.Normal("mu", 0.0, 2.0, shape=2, transform=ordered)  # started at INITIAL_POINTS
            sigma = pm.HalfNormal("sigma", 2.0, shape=2)
            theta = pm.Beta("theta", 5.0, 5.0)
            lp1 = pt.log(theta) + pm.logp(pm.Normal.dist(mu[0], sigma[0]), y)
            lp2 = pt.log1p(-theta) + pm.logp(pm.Normal.dist(mu[1], sigma[1]), y)
            pm.Potential("log_mix", pt.logaddexp(lp1, lp2).sum())  # target += log_mix(theta, ...)
            names = ("mu", "sigma", "theta")
        else:
            raise ValueError(target)
    if names is not None:

        def to_ours(post):
            return {k: np.asarray(post[k]) for k in names}

    return model, to_ours


class ChainClock:
    """When each chain leaves its warm-up and when it ends, from nutpie's own progress reports.

    nutpie reports no phase seconds, but its progress display is fed every
    ``rate_ms`` with every chain's ``finished_draws`` (warm-up included). While
    active, this replaces the terminal progress bar that ``progress_bar=True``
    selects outside a notebook (``nutpie._lib.ProgressType.indicatif``) by a
    template callback (``ProgressType.template_callback``, the notebook's
    mechanism) that records ``(seconds, [finished_draws per chain])``; the
    crossing of ``tune`` and of ``tune + draws`` is interpolated linearly between
    two reports. Nothing is printed. ``phases`` returns each chain's sampling
    seconds and their sum over the chains divided by the chains run at once
    (``min(cores, chains)``): the wall-clock seconds the sampling phase took.
    """

    TEMPLATE = "{% for chain in chains %}{{ chain.finished_draws }},{% endfor %}"

    def __init__(self, cores: int, rate_ms: int = 25):
        self.cores, self.rate_ms = cores, rate_ms
        self.events: list[tuple[float, list[int]]] = []
        self.t0 = None

    def _callback(self, text: str) -> None:
        now = time.perf_counter()
        try:
            self.events.append((now, [int(v) for v in text.split(",") if v.strip()]))
        except ValueError:
            pass

    def __enter__(self):
        import nutpie._lib as lib

        self._lib, self._saved = lib, lib.ProgressType.indicatif
        progress = lib.ProgressType.template_callback(self.rate_ms, self.TEMPLATE, self.cores, self._callback)
        lib.ProgressType.indicatif = staticmethod(lambda *a, **k: progress)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._lib.ProgressType.indicatif = self._saved
        self.t1 = time.perf_counter()
        return False

    def _crossing(self, chain: int, level: int) -> float | None:
        prev = None
        for t, draws in self.events:
            if chain >= len(draws):
                continue
            if draws[chain] >= level:
                if prev is None or draws[chain] == prev[1]:
                    return t
                (tp, dp) = prev
                return tp + (t - tp) * (level - dp) / (draws[chain] - dp)
            prev = (t, draws[chain])
        return None

    def phases(self, chains: int, tune: int, draws: int) -> dict | None:
        per_chain = []
        for c in range(chains):
            t_tuned, t_end = self._crossing(c, tune), self._crossing(c, tune + draws)
            if t_tuned is None or t_end is None:
                return None
            per_chain.append(dict(warmup_end=t_tuned - self.t0, end=t_end - self.t0, sampling=t_end - t_tuned))
        concurrent = max(1, min(self.cores, chains))
        return dict(
            sampling_seconds=sum(c["sampling"] for c in per_chain) / concurrent,
            concurrent_chains=concurrent,
            per_chain=per_chain,
            num_reports=len(self.events),
            rate_ms=self.rate_ms,
        )


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
            compiled = nutpie.compile_pymc_model(
                model, backend="jax", gradient_backend="jax", initial_points=INITIAL_POINTS.get(target)
            )
            if flow:
                compiled = compiled.with_transform_adapt(verbose=False, show_progress=False)
        chain_clock = ChainClock(cores)
        with clock("warmup_and_sampling"), chain_clock:
            # progress_bar=True only so that nutpie feeds ChainClock (which prints nothing).
            trace = nutpie.sample(
                compiled,
                transform_adapt=flow,
                chains=common.NUM_CHAINS,
                tune=tune,
                draws=common.NUM_SAMPLES,
                seed=common.SEED,
                cores=cores,
                save_warmup=True,
                progress_bar=True,
            )
        phases = chain_clock.phases(common.NUM_CHAINS, tune, common.NUM_SAMPLES)
        total = clock.seconds["compile"] + clock.seconds["warmup_and_sampling"]
        sampling_seconds = phases["sampling_seconds"] if phases else None
        first_draw = total - sampling_seconds if phases else None
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
                "total": total,
            },
            # From ChainClock (nutpie's progress reports): the sampling phase's wall-clock
            # seconds (per-chain sampling seconds summed / chains run at once) and the rest.
            time_to_first_draw=first_draw,
            sampling_seconds=sampling_seconds,
            chain_phases=phases,
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
                " its phases are not reported apart; sampling_seconds is measured from its progress "
                "reports (ChainClock), time_to_first_draw = total - sampling_seconds"
            ],
            sample_stats_fields=sorted(stats.data_vars),
        )
        draws = to_ours(trace.posterior)
        record["ess_summary"] = common.ess_summary(draws, total, first_draw, sampling_seconds)
        save_run(target, method, record, draws, {"diverging": div, "n_steps": n_steps})

    common.guarded(target, method, base, go)


save_run = common.save_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=common.TARGETS_HELP)
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

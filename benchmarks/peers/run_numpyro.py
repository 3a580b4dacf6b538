"""NumPyro's NeuTra (``NeuTraReparam`` with an ``AutoIAFNormal`` guide) on the peers benchmark's targets.

Runs in the peers' venv (``bash benchmarks/peers/setup.sh``)::

    .venv-peers/bin/python benchmarks/peers/run_numpyro.py [TARGET ...]

The targets are written natively in NumPyro, term by term the densities of
``neutra_flows.targets`` / ``neutra_flows.models.posteriordb`` (same priors;
positive scales unconstrained with ``exp``, NumPyro's default as TFP's and
Stan's; Stan's implicit flat priors as ``ImproperUniform``). The toy targets run
in float32 as ours do, the posteriordb regressions in float64 (``jax_enable_x64``)
as ours do.

The protocol is NumPyro's own NeuTra recipe (the ``NeuTraReparam`` docstring and
``examples/neutra.py``) with the IAF guide the issue names:

1. ``guide = AutoIAFNormal(model)`` with its defaults (3 IAF layers, hidden
   widths ``[d, d]``); ``SVI(model, guide, optim.Adam(3e-3), Trace_ELBO())``,
   ``svi.run(key, TRAIN_STEPS, stable_update=True)`` (10 000 steps, one
   particle: the example's budget and step size; ``stable_update`` skips a
   non-finite step instead of failing the run);
2. ``NeuTraReparam(guide, params).reparam(model)`` sampled with ``NUTS``
   (defaults: diagonal mass matrix, target acceptance 0.8), 4 chains,
   1000 warm-up + 1000 kept draws, ``chain_method="sequential"`` (what
   NumPyro falls back to on one CPU device);
3. the draws of the shared latent pushed through the flow and the constraining
   transforms (``neutra.transform_sample``) back to the model's variables.

Cost accounting. Training: ``TRAIN_STEPS x num_particles`` target gradients
(one ELBO gradient per particle per step). Warm-up and sampling: the sum of
NUTS's ``num_steps`` (leapfrog steps = gradient evaluations) over warm-up
(``collect_warmup=True``) and kept draws. Seconds: ``training`` (SVI, its JIT
compilation included), ``warmup`` (``mcmc.warmup``, NUTS's compilation
included) and ``sampling`` (``mcmc.run`` after warm-up).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

TRAIN_STEPS = 200 if common.QUICK else 10_000
NUM_PARTICLES = 1
LEARNING_RATE = 3e-3
X64_TARGETS = ("kidiq", "earnings")
# The targets written in NumPyro here; any other (the rest of the posteriordb models) is
# recorded as skipped.
NUMPYRO_TARGETS = ("funnel-10", "funnel-100", "banana", "eight-schools", *X64_TARGETS)


def build_model(target: str):
    """``(model, to_ours)``; ``to_ours(samples dict) -> {our name: [..., *shape]}``."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    if target.startswith("funnel-"):
        d = common.funnel_dim(target)

        def model():
            x0 = numpyro.sample("x0", dist.Normal(0.0, 3.0))
            numpyro.sample("x_rest", dist.Normal(0.0, jnp.exp(x0 / 2.0)).expand([d - 1]).to_event(1))

        def to_ours(s):
            return {"x": np.concatenate([np.asarray(s["x0"])[..., None], np.asarray(s["x_rest"])], axis=-1)}
    elif target == "banana":
        b = common.BANANA_CURVATURE

        def model():
            x0 = numpyro.sample("x0", dist.Normal(0.0, 10.0))
            numpyro.sample("x1", dist.Normal(b * (x0**2 - 100.0), 1.0))

        def to_ours(s):
            return {"x": np.stack([np.asarray(s["x0"]), np.asarray(s["x1"])], axis=-1)}
    elif target == "eight-schools":
        y = jnp.asarray(common.EIGHT_SCHOOLS_Y, jnp.float32)
        sigma = jnp.asarray(common.EIGHT_SCHOOLS_SIGMA, jnp.float32)

        def model():
            mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
            tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
            theta = numpyro.sample("theta", dist.Normal(mu, tau).expand([8]).to_event(1))  # centred
            numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)

        def to_ours(s):
            return {k: np.asarray(s[k]) for k in ("mu", "tau", "theta")}
    elif target in X64_TARGETS:
        x_np, y_np = common.regression_data(target)
        x, y = jnp.asarray(x_np), jnp.asarray(y_np)
        k = x_np.shape[1]

        def model():
            beta = numpyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (k,)))
            if target == "kidiq":
                sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
            else:
                sigma = numpyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
            numpyro.sample("y", dist.Normal(x @ beta, sigma).to_event(1), obs=y)

        def to_ours(s):
            return {kk: np.asarray(s[kk]) for kk in ("beta", "sigma")}
    else:
        raise ValueError(target)
    return model, to_ours


def run_one(target: str) -> None:
    method = "numpyro-neutra"
    if target not in NUMPYRO_TARGETS:
        common.save_run(target, method, {"label": "NumPyro NeuTraReparam (AutoIAFNormal)", "status": "skipped",
                                         "reason": f"no NumPyro model of {target} in run_numpyro.py"})
        return
    base = {
        "label": "NumPyro NeuTraReparam (AutoIAFNormal)",
        "settings": {
            "guide": "AutoIAFNormal (defaults: num_flows=3, hidden_dims=[d, d])",
            "elbo": "Trace_ELBO",
            "num_particles": NUM_PARTICLES,
            "train_steps": TRAIN_STEPS,
            "optimizer": f"Adam({LEARNING_RATE})",
            "stable_update": True,
            "kernel": "NUTS (defaults)",
            "chains": common.NUM_CHAINS,
            "num_warmup": common.NUM_WARMUP,
            "num_samples": common.NUM_SAMPLES,
            "chain_method": "sequential",
            "seed": common.SEED,
            "jax_enable_x64": target in X64_TARGETS,
        },
        "versions": common.package_versions(["numpyro", "jax", "jaxlib", "numpy"]),
    }

    def go():
        import jax
        import numpyro
        from numpyro import optim
        from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
        from numpyro.infer.autoguide import AutoIAFNormal
        from numpyro.infer.reparam import NeuTraReparam

        numpyro.enable_x64(target in X64_TARGETS)
        clock = common.Clock()
        model, to_ours = build_model(target)
        key_train, key_mcmc = jax.random.split(jax.random.PRNGKey(common.SEED))
        guide = AutoIAFNormal(model)
        svi = SVI(model, guide, optim.Adam(LEARNING_RATE), Trace_ELBO(num_particles=NUM_PARTICLES))
        with clock("training"):
            svi_result = svi.run(key_train, TRAIN_STEPS, progress_bar=False, stable_update=True)
            params = jax.block_until_ready(svi_result.params)
        losses = np.asarray(svi_result.losses, np.float64)
        neutra = NeuTraReparam(guide, params)
        kernel = NUTS(neutra.reparam(model))
        mcmc = MCMC(
            kernel,
            num_warmup=common.NUM_WARMUP,
            num_samples=common.NUM_SAMPLES,
            num_chains=common.NUM_CHAINS,
            chain_method="sequential",
            progress_bar=False,
        )
        fields = ("num_steps", "diverging")
        with clock("warmup"):
            mcmc.warmup(key_mcmc, collect_warmup=True, extra_fields=fields)
            warm = mcmc.get_extra_fields(group_by_chain=True)
            warm_steps = np.asarray(warm["num_steps"], np.int64)
            warm_div = np.asarray(warm["diverging"], bool)
        with clock("sampling"):
            mcmc.run(mcmc.post_warmup_state.rng_key, extra_fields=fields)
            samples = mcmc.get_samples(group_by_chain=True)
            jax.block_until_ready(samples)
        extra = mcmc.get_extra_fields(group_by_chain=True)
        n_steps = np.asarray(extra["num_steps"], np.int64)
        div = np.asarray(extra["diverging"], bool)
        latent = samples[f"{guide.prefix}_shared_latent"]
        chains, draws = latent.shape[:2]
        flat = latent.reshape((chains * draws,) + latent.shape[2:])
        values = neutra.transform_sample(flat)
        ours = {k: v.reshape((chains, draws) + v.shape[1:]) for k, v in to_ours(values).items()}
        tail = losses[-max(1, len(losses) // 10) :]
        record = dict(base)
        record.update(
            status="ok",
            grad_evals_training=TRAIN_STEPS * NUM_PARTICLES,
            grad_evals_warmup=int(warm_steps.sum()),
            grad_evals_sampling=int(n_steps.sum()),
            divergences_warmup=int(warm_div.sum()),
            divergences_sampling=int(div.sum()),
            times={
                "compile": None,
                "training": clock.seconds["training"],
                "warmup": clock.seconds["warmup"],
                "sampling": clock.seconds["sampling"],
                "warmup_and_sampling": None,
                "total": sum(clock.seconds.values()),
            },
            counting=(
                "training = steps x num_particles ELBO gradients; warm-up and sampling = sum of "
                "NUTS num_steps (collect_warmup=True)"
            ),
            fit={
                "final_loss_mean_last_10pct": float(np.nanmean(tail)),
                "nonfinite_losses": int((~np.isfinite(losses)).sum()),
            },
            notes=["compilation is inside the training (SVI) and warm-up (NUTS) seconds"],
        )
        common.save_run(target, method, record, ours, {"diverging": div, "n_steps": n_steps})

    common.guarded(target, method, base, go)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=common.TARGETS_HELP)
    args = parser.parse_args()
    for target in common.parse_targets(args.targets):
        t0 = time.perf_counter()
        run_one(target)
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()

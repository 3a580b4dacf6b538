"""neutra_flows on the peers benchmark's targets: NeuTra with a fitted IAF, the adaptive flow, plain NUTS.

Runs in the Python that has neutra_flows (the system one), from the repo root::

    PYTHONPATH=. python benchmarks/peers/run_ours.py [TARGET ...] [--methods ours-fit ours-adapt ours-nuts]

Methods (one ``runs/<target>/<method>.{npz,json}`` each), all with 4 chains,
1000 warm-up + 1000 kept draws per chain:

``ours-fit``
    what ``neutra-flows bench <target>`` runs (``neutra_flows.app.bench.run_benchmark``,
    its defaults for the target from ``BENCHMARKS``): ``nf.fit(target,
    nf.make_flow("iaf", d), num_steps=2000, batch_size=256, seed=0)`` (whitening
    stage included), then ``nf.sample(target, fit_result, kernel="hmc", seed=1)``
    (NeuTra-HMC with ChEES and the latent-scale window).
``ours-adapt``
    ``nf.sample(target, flow="adapt", num_chains=4, ..., seed=1)``, with sample's
    own default kernel (NUTS; the recommended call ``sample(target, "adapt",
    seed=1)``, as ``benchmarks/time_to_ess.py``'s ``adapt-nuts``); ``--adapt-kernel
    bench`` (or ``PEERS_ADAPT_KERNEL=bench``) passes the bench's kernel (HMC), which
    is how the committed table's ours-adapt rows (2026-12-06) ran. The flow is trained
    on the warm-up draws (above 40 dimensions with no Gaussian that fits, an IAF
    trained by ``fit`` instead). If this version of neutra_flows does not have it
    (no ``FlowAdaptation``, and a TypeError / ValueError about ``flow="adapt"``), the
    row is recorded as skipped, with the error; any other error is a failed run.
``ours-nuts``
    the bench's baseline: ``nf.sample(target, None, kernel="nuts", seed=2)``
    (TFP NUTS with Stan-style windowed diagonal adaptation).

Cost: the attrs ``nf.sample`` writes (``num_grad_evals_training`` from the
fit, ``num_grad_evals_warmup``, ``num_grad_evals_sampling``, divergences, and the
seconds ``flow_training_time``, ``compile_time``, ``warmup_time``,
``sampling_time``); every attr is kept in the record. Also recorded:
``time_to_first_draw`` (sample's attr) and ``sampling_seconds``, and
``ess_summary`` (min bulk ESS, all-in ESS/s, time to 1000 ESS: see
``common.ess_summary``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

METHODS = ("ours-fit", "ours-adapt", "ours-nuts")


def _attrs(idata) -> dict:
    out = {}
    for group in ("sample_stats", "posterior"):
        if hasattr(idata, group):
            for k, v in getattr(idata, group).attrs.items():
                out.setdefault(k, v.tolist() if isinstance(v, np.ndarray) else v)
    return out


def _num(attrs: dict, key: str, default=None):
    v = attrs.get(key, default)
    return None if v is None else float(v)


def _record_from_idata(base: dict, idata, extra: dict | None = None) -> tuple[dict, dict, dict]:
    attrs = _attrs(idata)
    stats = idata.sample_stats
    div = np.asarray(stats["diverging"], bool)
    n_steps = np.asarray(stats["n_steps"], np.int64)
    times = {
        "compile": _num(attrs, "compile_time"),
        "training": _num(attrs, "flow_training_time"),
        "warmup": _num(attrs, "warmup_time"),
        "sampling": _num(attrs, "sampling_time"),
        "warmup_and_sampling": None,
    }
    times["phases_sum"] = sum(v for v in times.values() if v is not None)
    # All-in: sample's total_time attr (from the call, a FitResult's seconds included, to the
    # return: the draws' assembly too), as benchmarks/time_to_ess.py counts it; the four
    # phases' sum where this neutra_flows has no such attr.
    times["total"] = _num(attrs, "total_time", times["phases_sum"])
    record = dict(base)
    record.update(
        status="ok",
        grad_evals_training=int(attrs.get("num_grad_evals_training", 0) or 0),
        grad_evals_warmup=int(attrs["num_grad_evals_warmup"]),
        grad_evals_sampling=int(attrs.get("num_grad_evals_sampling", n_steps.sum())),
        divergences_warmup=int(attrs.get("num_divergences_warmup", 0)),
        divergences_sampling=int(div.sum()),
        times=times,
        counting=(
            "nf.sample's attrs: training = the fit's target gradients (whitening, steps x batch); "
            "warm-up and sampling = leapfrog steps of all chains"
        ),
        attrs={k: v for k, v in attrs.items() if k != "ground_truth"},
    )
    record.update(extra or {})
    draws = {name: np.asarray(idata.posterior[name], np.float64) for name in idata.posterior.data_vars}
    # benchmarks/time_to_ess.py's figures: sample's time_to_first_draw attr (a FitResult's
    # seconds included) and its sampling phase.
    record["time_to_first_draw"] = _num(attrs, "time_to_first_draw")
    record["sampling_seconds"] = times["sampling"]
    record["ess_summary"] = common.ess_summary(
        draws, times["total"], record["time_to_first_draw"], record["sampling_seconds"]
    )
    return record, draws, {"diverging": div, "n_steps": n_steps}


def run_one(target_key: str, method: str, adapt_kernel: str | None = None) -> None:
    import neutra_flows as nf

    try:
        from neutra_flows.app.bench import BENCHMARKS
    except ModuleNotFoundError:  # neutra_flows before the app/ layout
        from neutra_flows.bench import BENCHMARKS

    spec = BENCHMARKS[common.TARGETS[target_key]]
    seed = common.SEED
    common_kw = dict(
        num_chains=common.NUM_CHAINS,
        num_warmup=common.NUM_WARMUP,
        num_samples=common.NUM_SAMPLES,
        progress=False,
    )
    # adapt_kernel None: sample's own default kernel (the recommended call,
    # sample(target, "adapt", seed=1)); "bench": the bench's kernel, as the committed
    # table's rows ran (HMC); else that kernel.
    kernel_kw = {}
    if adapt_kernel is not None:
        kernel_kw["kernel"] = spec.kernel if adapt_kernel == "bench" else adapt_kernel
    adapt_kernel_name = kernel_kw.get("kernel") or _default_kernel(nf.sample)
    label = {
        "ours-fit": f"neutra_flows NeuTra-{spec.flow.upper()}-{spec.kernel.upper()} (fit, then sample)",
        "ours-adapt": f'neutra_flows sample(flow="adapt"), kernel {adapt_kernel_name}',
        "ours-nuts": "neutra_flows baseline NUTS (TFP, windowed diagonal)",
    }[method]
    base = {
        "label": label,
        "versions": common.package_versions(["tensorflow", "tensorflow-probability", "arviz", "numpy"])
        | {"neutra_flows": nf.__version__, "neutra_flows_path": nf.__file__},
    }

    def go():
        target = spec.make_target()
        if method == "ours-fit":
            flow = nf.make_flow(spec.flow, target.event_size, dtype=target.dtype, **dict(spec.flow_options))
            fit_kw = dict(
                num_steps=100 if common.QUICK else spec.train_steps,
                batch_size=spec.batch_size,
                seed=seed,
                progress=False,
            )
            if spec.learning_rate is not None:
                fit_kw["learning_rate"] = spec.learning_rate
            fit_result = nf.fit(target, flow, **fit_kw)
            idata = nf.sample(target, fit_result, kernel=spec.kernel, seed=seed + 1, **common_kw)
            settings = {
                "flow": spec.flow,
                "flow_options": dict(spec.flow_options),
                "train_steps": spec.train_steps,
                "batch_size": spec.batch_size,
                "learning_rate": spec.learning_rate,
                "kernel": spec.kernel,
                "fit_seed": seed,
                "sample_seed": seed + 1,
            }
            fit_info = {
                "khat": float(fit_result.khat),
                "elbo": float(fit_result.elbo),
                "num_grad_evals": int(fit_result.num_grad_evals),
                "wall_time": float(fit_result.wall_time),
                "stop_reason": str(getattr(fit_result, "stop_reason", "")),
                "whitening": (
                    fit_result.whitening.method
                    if getattr(fit_result, "whitening", None) is not None
                    else "none"
                ),
            }
            extra = {
                "settings": settings | {k: common_kw[k] for k in ("num_chains", "num_warmup", "num_samples")},
                "fit": fit_info,
            }
        elif method == "ours-adapt":
            adapt_kw = dict(common_kw)
            if common.QUICK:
                # The adaptation refits the flow on the warm-up draws and needs at least 200 of them.
                adapt_kw["num_warmup"] = max(adapt_kw["num_warmup"], 200)
            try:
                idata = nf.sample(target, flow="adapt", seed=seed + 1, **kernel_kw, **adapt_kw)
            except (TypeError, ValueError) as err:
                text = str(err)
                # Skipped only where this neutra_flows has no adaptation at all (no
                # FlowAdaptation); any other error of a version that has it is a failure.
                if not hasattr(nf, "FlowAdaptation") and ("adapt" in text or "flow" in text):
                    record = dict(base)
                    record.update(
                        status="skipped",
                        reason=f'this neutra_flows has no sample(flow="adapt"): {type(err).__name__}: '
                        f"{text.strip()[:400]}",
                    )
                    common.save_run(target_key, method, record)
                    return
                raise
            extra = {"settings": {"flow": "adapt", "kernel": adapt_kernel_name,
                                  "kernel_option": adapt_kernel or "default",
                                  "seed": seed + 1} | adapt_kw}
        else:
            idata = nf.sample(target, None, kernel="nuts", seed=seed + 2, **common_kw)
            extra = {"settings": {"kernel": "nuts", "seed": seed + 2} | common_kw}
        record, draws, stats = _record_from_idata(base, idata, extra)
        common.save_run(target_key, method, record, draws, stats)

    common.guarded(target_key, method, base, go)


def _default_kernel(fn) -> str:
    import inspect

    return str(inspect.signature(fn).parameters["kernel"].default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=common.TARGETS_HELP)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--adapt-kernel",
        default=os.environ.get("PEERS_ADAPT_KERNEL", "default"),
        help="ours-adapt's kernel: 'default' (sample's own, NUTS: sample(target, 'adapt', seed=1)), "
        "'bench' (the bench's, HMC: how the committed table's ours-adapt rows ran), or a kernel name "
        "(env PEERS_ADAPT_KERNEL)",
    )
    args = parser.parse_args()
    adapt_kernel = None if args.adapt_kernel == "default" else args.adapt_kernel
    for target in common.parse_targets(args.targets):
        for method in args.methods:
            t0 = time.perf_counter()
            run_one(target, method, adapt_kernel)
            print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()

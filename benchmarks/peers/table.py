"""The peers benchmark's one table: every (target, method) run, judged with one definition.

Runs in the Python that has neutra_flows (the system one), from the repo root::

    PYTHONPATH=. python benchmarks/peers/table.py

Reads ``benchmarks/peers/runs/<target>/<method>.{json,npz}`` (written by
``run_ours.py``, ``run_nutpie.py``, ``run_numpyro.py``) and writes
``benchmarks/peers/results/peers.md``, ``peers.json`` and the figure
``docs/img/peers_ess_per_grad_total.png``.

Every row is computed by :func:`neutra_flows.compare`, the function behind
``neutra-flows bench``, on an ``InferenceData`` built from the run's draws and
cost figures: min bulk ESS over every parameter and coordinate (rank-normalised,
ArviZ), max rank-normalised R-hat, ESS per gradient in sampling, ESS per
gradient over the whole run (training + warm-up + sampling gradients), and the
truth columns (max |mean - truth| / MCSE, std / true std). ESS per second
counts every second of the run (compilation, training, warm-up, sampling), as
each runner measured it. Time to 1000 ESS: ``benchmarks/time_to_ess.py``'s
definition (``time_to_first_draw + sampling_seconds * 1000 / min ESS``, from the
runner's record) and the all-in one (``total_time * 1000 / min ESS``). The
truth: the targets' own ``ground_truth_mean`` / ``ground_truth_std`` (analytic
for the funnels and the banana, posteriordb's Stan reference for the
posteriordb models); eight schools has none, so it is judged
against ``results/eight_schools_reference.json`` (``reference_eight_schools.py``)
when present. As in ``neutra-flows bench``, the funnels' bias and std are judged
on ``x0`` (the ``x_i`` have kurtosis 3 exp(9): no 4000-draw run estimates their
std to 10 %); the all-coordinate figures are in ``peers.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

METHOD_ORDER = ("ours-fit", "ours-adapt", "ours-nuts", "nutpie-flow", "nutpie-nuts", "numpyro-neutra")
SHORT = {
    "ours-fit": "ours: fit IAF + NeuTra-HMC",
    "ours-adapt": 'ours: sample(flow="adapt")',
    "ours-nuts": "ours: NUTS baseline",
    "nutpie-flow": "nutpie: flow adaptation",
    "nutpie-nuts": "nutpie: NUTS (diag)",
    "numpyro-neutra": "NumPyro: NeuTraReparam IAF",
}
RHAT_OK = 1.01
# Correct = the bench's goals: built-ins 4 MCSE / 10 % (x0 for the funnels), the
# posteriordb suite (and eight schools against an estimated reference) 5 MCSE / 15 %.
TOLERANCE = {
    "funnel-10": (4.0, 0.10),
    "funnel-100": (4.0, 0.10),
    "banana": (4.0, 0.10),
    "eight-schools": (5.0, 0.15),
}
TOLERANCE.update({t: (5.0, 0.15) for t in common.POSTERIORDB_TARGETS})
FOCUS = {"funnel-10": {"x": [0]}, "funnel-100": {"x": [0]}}
# The docs' figure only for the committed results (not a quick run, not another seed).
FIGURE = (
    os.path.join(common.OUTPUT_DIR, "peers_ess_per_grad_total.png")
    if common.OUTPUT_DIR != common.RESULTS_DIR
    else os.path.join(common.ROOT, "docs", "img", "peers_ess_per_grad_total.png")
)


def truth_for(target_key: str):
    """``(mean_dict, std_dict, source)`` or ``(None, None, reason)``."""
    try:
        from neutra_flows.app.bench import BENCHMARKS
    except ModuleNotFoundError:  # neutra_flows before the app/ layout
        from neutra_flows.bench import BENCHMARKS

    t = BENCHMARKS[common.TARGETS[target_key]].make_target()
    if t.ground_truth_mean is not None:
        source = {"funnel-10": "analytic", "funnel-100": "analytic", "banana": "analytic"}.get(
            target_key, "posteriordb reference (Stan)"
        )
        return dict(t.ground_truth_mean), dict(t.ground_truth_std), source
    path = os.path.join(common.RESULTS_DIR, "eight_schools_reference.json")
    if target_key == "eight-schools" and os.path.exists(path):
        with open(path) as fh:
            ref = json.load(fh)
        mean = {k: np.asarray(v, np.float64) for k, v in ref["mean"].items()}
        std = {k: np.asarray(v, np.float64) for k, v in ref["std"].items()}
        return mean, std, "estimated: long non-centred nutpie run (reference_eight_schools.py)"
    return None, None, "none"


def idata_from_run(npz_path: str, record: dict):
    import arviz as az

    z = np.load(npz_path)
    post = {k[len("post__") :]: z[k] for k in z.files if k.startswith("post__")}
    stats = {k[len("stat__") :]: z[k] for k in z.files if k.startswith("stat__")}
    idata = az.from_dict(posterior=post, sample_stats=stats)
    times = record.get("times") or {}
    attrs = {
        "num_grad_evals_training": record.get("grad_evals_training") or 0,
        "num_grad_evals_warmup": record["grad_evals_warmup"],
        "num_grad_evals_sampling": record["grad_evals_sampling"],
        "num_divergences_sampling": record["divergences_sampling"],
        "sampler": SHORT.get(record["method"], record["method"]),
    }
    # compare() adds these four into total_time; a runner that cannot separate
    # warm-up from sampling (nutpie) gives them as one phase, booked as warm-up,
    # and has no sampling-only seconds (ESS per second in sampling: n/a).
    attrs["sampling_time"] = times["sampling"] if times.get("sampling") is not None else 0.0
    attrs["warmup_time"] = (times.get("warmup") or 0.0) + (times.get("warmup_and_sampling") or 0.0)
    attrs["compile_time"] = times.get("compile") or 0.0
    attrs["flow_training_time"] = times.get("training") or 0.0
    if times.get("total") is not None:
        # The runner's all-in seconds (ours: sample's total_time attr, which also counts the
        # assembly of the draws; the peers: every phase timed), which compare() then uses.
        attrs["total_time"] = times["total"]
    for group in (idata.posterior, idata.sample_stats):
        group.attrs.update(attrs)
    return idata


def focus_idata(idata, focus):
    import arviz as az
    import xarray as xr

    sub = {}
    for name, index in focus.items():
        var = idata.posterior[name]
        sub[name] = var.isel({var.dims[2]: list(index)})
    return az.InferenceData(posterior=xr.Dataset(sub))


def row_for(target_key: str, record: dict, npz_path: str, truth) -> dict:
    from neutra_flows import compare

    mean, std, source = truth
    idata = idata_from_run(npz_path, record)
    gt = (mean, std) if mean is not None else None
    table = compare({"run": idata}, ground_truth=gt)
    r = {
        k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
        for k, v in table.loc["run"].to_dict().items()
    }
    out = {
        "target": target_key,
        "method": record["method"],
        "label": record.get("label", record["method"]),
        "status": "ok",
        "num_draws": int(r["num_draws"]),
        "min_ess_bulk": r["min_ess_bulk"],
        "min_ess_tail": r["min_ess_tail"],
        "max_rhat": r["max_rhat"],
        "divergences": int(r["divergences"]),
        "divergences_warmup": record.get("divergences_warmup"),
        "grad_evals_training": int(r["grad_evals_training"]),
        "grad_evals_warmup": int(r["grad_evals_warmup"]),
        "grad_evals_sampling": int(r["grad_evals"]),
        "ess_per_grad": r["ess_per_grad"],
        "ess_per_grad_total": r["ess_per_grad_total"],
        "times": record.get("times"),
        "total_time": float(r["total_time"]),
        "cpu_seconds": record.get("cpu_seconds"),
        "ess_per_second": (r["ess_per_second"] if (record.get("times") or {}).get("sampling") else math.nan),
        "ess_per_second_total": r["ess_per_second_total"],
        # benchmarks/time_to_ess.py's time to 1000 min-bulk ESS (first kept draw + the sampling
        # phase's rate, extrapolated) from the runner's time_to_first_draw / sampling_seconds,
        # and the all-in one (total seconds x 1000 / min ESS), with compare's ESS and total.
        "time_to_first_draw": record.get("time_to_first_draw"),
        "sampling_seconds": record.get("sampling_seconds"),
        "truth_source": source,
        "settings": record.get("settings"),
        "counting": record.get("counting"),
        "notes": record.get("notes"),
        "versions": record.get("versions"),
        "load_average_at_end": (record.get("machine") or {}).get("load_average_at_end"),
        "created": record.get("created"),
    }
    out["time_to_1000_ess"], _, out["time_to_1000_ess_all_in"] = common.time_to_ess(
        out["min_ess_bulk"], out["total_time"], out["time_to_first_draw"], out["sampling_seconds"]
    )
    if gt is not None:
        out["all_coords"] = {k: r.get(k) for k in ("max_abs_error_mcse", "min_std_ratio", "max_std_ratio")}
        judged = r
        if target_key in FOCUS:
            fmean = {n: np.asarray(mean[n])[i] for n, i in FOCUS[target_key].items()}
            fstd = {n: np.asarray(std[n])[i] for n, i in FOCUS[target_key].items()}
            judged = compare({"f": focus_idata(idata, FOCUS[target_key])}, ground_truth=(fmean, fstd)).loc["f"]
        out["max_abs_error_mcse"] = float(judged["max_abs_error_mcse"])
        out["min_std_ratio"] = float(judged["min_std_ratio"])
        out["max_std_ratio"] = float(judged["max_std_ratio"])
        bias_tol, std_tol = TOLERANCE[target_key]
        reasons = []
        if not out["max_rhat"] < RHAT_OK:
            reasons.append(f"R-hat {out['max_rhat']:.3g}")
        if not out["max_abs_error_mcse"] < bias_tol:
            reasons.append(f"bias {out['max_abs_error_mcse']:.2g} MCSE")
        if not (1 - std_tol <= out["min_std_ratio"] and out["max_std_ratio"] <= 1 + std_tol):
            reasons.append(f"std {_g(out['min_std_ratio'])}-{_g(out['max_std_ratio'])}")
        out["correct"] = not reasons
        out["correct_why_not"] = ", ".join(reasons)
    else:
        out["correct"] = None
        out["correct_why_not"] = "no truth"
    return out


def previous_rows(path: str, label: str) -> dict[tuple[str, str], dict]:
    """The rows of an earlier table (its peers.json), by (target, method), marked as kept
    (with when they ran: their own record's date, else ``label``)."""
    if not os.path.exists(path):
        raise SystemExit(f"--keep-previous: no earlier table at {path}")
    with open(path) as fh:
        rows = json.load(fh)["rows"]
    out = {}
    for r in rows:
        r = {**r, "kept_from": r.get("kept_from") or r.get("created") or label}
        if r.get("status") == "ok" and "time_to_1000_ess_all_in" not in r:
            # An earlier table's row: its sampling phase where its runner timed one (ours),
            # the rest of its seconds until the first draw.
            sampling = (r.get("times") or {}).get("sampling")
            r["sampling_seconds"] = sampling
            r["time_to_first_draw"] = r["total_time"] - sampling if sampling is not None else None
            r["time_to_1000_ess"], _, r["time_to_1000_ess_all_in"] = common.time_to_ess(
                r.get("min_ess_bulk"), r.get("total_time"), r["time_to_first_draw"], sampling
            )
        out[(r["target"], r["method"])] = r
    return out


def load_rows(targets, previous: dict[tuple[str, str], dict] | None = None) -> list[dict]:
    """One row per (target, method) run under RUNS_DIR; with ``previous``, the
    earlier table's rows fill in the (target, method) pairs not run again."""
    rows = []
    previous = previous or {}
    for target_key in targets:
        folder = os.path.join(common.RUNS_DIR, target_key)
        records = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
            with open(path) as fh:
                rec = json.load(fh)
            records[rec["method"]] = (rec, path[:-5] + ".npz")
        kept = {m: r for (t, m), r in previous.items() if t == target_key and m not in records}
        if not records and not kept:
            continue
        truth = truth_for(target_key) if records else None
        methods = set(records) | set(kept)
        order = [m for m in METHOD_ORDER if m in methods] + sorted(methods - set(METHOD_ORDER))
        for method in order:
            if method in kept:
                rows.append(kept[method])
                continue
            rec, npz = records[method]
            if rec.get("status", "ok") != "ok" or not os.path.exists(npz):
                rows.append(
                    {
                        "target": target_key,
                        "method": method,
                        "label": rec.get("label", method),
                        "status": rec.get("status", "missing"),
                        "reason": rec.get("reason", "no draws"),
                    }
                )
                continue
            print(f"{target_key} / {method}", flush=True)
            rows.append(row_for(target_key, rec, npz, truth))
    # Relative to ours-fit on the same target: a ratio only if both converged.
    for row in rows:
        if row["status"] != "ok":
            continue
        ref = next(
            (
                r
                for r in rows
                if r["target"] == row["target"] and r["method"] == "ours-fit" and r["status"] == "ok"
            ),
            None,
        )
        if ref is None or ref is row:
            row["vs_ours_fit"] = None
            continue
        value = (
            row["ess_per_grad_total"] / ref["ess_per_grad_total"] if ref["ess_per_grad_total"] > 0 else math.nan
        )
        row["vs_ours_fit"] = value
        row["vs_ours_fit_is_ratio"] = bool(row["max_rhat"] < RHAT_OK and ref["max_rhat"] < RHAT_OK)
    return rows


def _g(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def _tte(r: dict) -> str:
    """Time to 1000 ESS: time_to_ess.py's (extrapolated), then the all-in one in brackets."""
    ext, all_in = r.get("time_to_1000_ess"), r.get("time_to_1000_ess_all_in")
    if all_in is None:
        return "n/a"
    return f"{_g(ext)} ({_g(all_in)})"


def _method_cell(r: dict) -> str:
    name = SHORT.get(r["method"], r["method"])
    kernel = (r.get("settings") or {}).get("kernel")
    if r["method"] == "ours-adapt" and kernel:
        name += f", {kernel}"
    return name


def markdown(rows: list[dict]) -> str:
    head = (
        "| target | method | R-hat | min ESS | div. | gradients: train / warm-up / sampling | "
        "ESS/grad sampling | ESS/grad whole run | vs ours-fit | ESS/s all-in | time to 1000 ESS, s | "
        "seconds (CPU s) | bias/MCSE | std ratio | correct |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['target']} | {SHORT.get(r['method'], r['method'])} | {r['status']}: "
                f"{r.get('reason', '')[:160].replace('|', '/')} |" + " |" * 12
            )
            continue
        conv = r["max_rhat"] < RHAT_OK
        vs = r.get("vs_ours_fit")
        if r["method"] == "ours-fit":
            vs_txt = "1"
        elif vs is None:
            vs_txt = "n/a"
        else:
            vs_txt = f"{vs:.3g}x" if r.get("vs_ours_fit_is_ratio") else f"({vs:.3g}x)†"
        grads = f"{r['grad_evals_training']:,} / {r['grad_evals_warmup']:,} / {r['grad_evals_sampling']:,}"
        std = "n/a" if "min_std_ratio" not in r else f"{_g(r['min_std_ratio'])}-{_g(r['max_std_ratio'])}"
        correct = {True: "yes", False: "no: " + r.get("correct_why_not", ""), None: "n/a (no truth)"}[
            r.get("correct")
        ]
        kept = " ‡" if r.get("kept_from") else ""
        lines.append(
            f"| {r['target']} | {_method_cell(r)}{kept} | "
            f"{r['max_rhat']:.3f}{'' if conv else ' ✗'} | "
            f"{r['min_ess_bulk']:.0f} | {r['divergences']} | {grads} | {_g(r['ess_per_grad'])} | "
            f"{_g(r['ess_per_grad_total'])} | {vs_txt} | {_g(r['ess_per_second_total'])} | "
            f"{_tte(r)} | {r['total_time']:.0f} ({_g(r.get('cpu_seconds'), 3)}) | "
            f"{_g(r.get('max_abs_error_mcse'), 2)} | "
            f"{std} | {correct} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ok = [r for r in rows if r["status"] == "ok" and r["ess_per_grad_total"] > 0]
    targets = [t for t in common.TARGETS if any(r["target"] == t for r in ok)]
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in ok)]
    colors = dict(
        zip(METHOD_ORDER, ["#1f77b4", "#6baed6", "#9ecae1", "#d62728", "#ff9896", "#2ca02c"], strict=True)
    )
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(9.0, 2.0 + 1.5 * len(targets)), 5.0))
    for j, m in enumerate(methods):
        for i, t in enumerate(targets):
            r = next((r for r in ok if r["target"] == t and r["method"] == m), None)
            if r is None:
                continue
            conv = r["max_rhat"] < RHAT_OK
            ax.bar(
                i + (j - (len(methods) - 1) / 2) * width,
                r["ess_per_grad_total"],
                width,
                color=colors[m],
                hatch=None if conv else "///",
                edgecolor="k" if not conv else colors[m],
                linewidth=0.5,
            )
    ax.set_yscale("log")
    ax.set_xticks(range(len(targets)), targets)
    ax.set_ylabel("min bulk ESS / all gradients\n(training + warm-up + sampling)")
    ax.set_title("ESS per gradient over the whole run (4 chains, one run each, same machine)", fontsize=10)
    handles = [Patch(color=colors[m], label=SHORT[m]) for m in methods]
    handles.append(
        Patch(facecolor="white", edgecolor="k", hatch="///", label=f"R-hat >= {RHAT_OK} (not converged)")
    )
    ax.legend(
        handles=handles, fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=common.TARGETS_HELP.split("; default")[0]
                        + "; default: every target with runs under PEERS_RUNS")
    parser.add_argument("--figure", default=FIGURE)
    parser.add_argument("--keep-previous", nargs="?", const="an earlier sweep", metavar="WHEN",
                        help="rows not run again are kept from the committed results/peers.json (marked ‡); "
                        "WHEN says when those ran, for rows whose record has no date")
    args = parser.parse_args()
    previous = (previous_rows(os.path.join(common.OUTPUT_DIR, "peers.json"), args.keep_previous)
                if args.keep_previous else None)
    rows = load_rows(common.parse_targets(args.targets or ["all"]), previous)
    if not rows:
        raise SystemExit(f"no runs under {common.RUNS_DIR}")
    os.makedirs(common.OUTPUT_DIR, exist_ok=True)
    md = markdown(rows)
    notes = (
        "\n\n✗ R-hat >= 1.01: not converged. † a run did not converge (R-hat >= 1.01), so this is not a "
        "ratio of ESS: the unconverged run's ESS is not a number to divide by.\n"
        "vs ours-fit: this row's ESS per gradient over the whole run / ours-fit's, same target.\n"
        "ESS/s all-in: min bulk ESS / every wall-clock second of the run (compilation, training, warm-up, "
        "sampling). CPU s: the process's CPU seconds (all threads), less sensitive to the other jobs "
        "sharing the machine.\n"
        "time to 1000 ESS: benchmarks/time_to_ess.py's definition, seconds to the first kept draw + the "
        "sampling phase's seconds x 1000 / min bulk ESS (nutpie's sampling phase measured from its "
        "progress reports: the chains' sampling seconds summed / the chains run at once); in brackets "
        "the all-in one, every second x 1000 / min bulk ESS (= 1000 / ESS/s all-in).\n"
        "bias/MCSE and std ratio: on x0 for the funnels (all coordinates in peers.json); eight schools "
        "against an estimated reference (see peers.json truth_source).\n"
    )
    if any(r.get("kept_from") for r in rows):
        dates = sorted({str(r["kept_from"]) for r in rows if r.get("kept_from")})
        notes += ("‡ not run again: kept from the earlier table (`table.py --keep-previous`; run on "
                  + ", ".join(dates) + "); its seconds came from another day's machine load.\n")
    with open(os.path.join(common.OUTPUT_DIR, "peers.md"), "w") as fh:
        fh.write(md + notes)
    with open(os.path.join(common.OUTPUT_DIR, "peers.json"), "w") as fh:
        json.dump(
            common._json_safe(
                {
                    "protocol": {
                        "num_chains": common.NUM_CHAINS,
                        "num_warmup": common.NUM_WARMUP,
                        "num_samples": common.NUM_SAMPLES,
                        "seed": common.SEED,
                    },
                    "rows": rows,
                }
            ),
            fh,
            indent=2,
        )
    figure(rows, args.figure)
    print(md + notes)
    print(f"wrote {common.OUTPUT_DIR}/peers.md, peers.json and {args.figure}")


if __name__ == "__main__":
    main()

"""The real-model suite behind ``neutra-flows suite``: NeuTra and NUTS on every model, one table.

:func:`run_suite` runs :func:`neutra_flows.app.bench.run_benchmark` with one protocol
(default settings: an IAF with its whitening stage, ``fit``'s defaults at 2000 x
256, NeuTra-HMC with ChEES against NUTS with windowed adaptation, 4 chains,
1000 + 1000) on the posteriordb models of :mod:`neutra_flows.models` and the
built-in targets, and gathers one row per model:

* ESS per gradient of both samplers in sampling, and over the whole run (flow
  training + warm-up + sampling), and ESS per second including training;
* the ratio NeuTra / NUTS, written as a lower bound (``>= 12x``) when the NUTS
  run itself did not converge (R-hat > 1.05): then NUTS's ESS is not a number to
  divide by;
* correctness against the reference: the largest |mean - truth| / MCSE, the std
  ratio range, R-hat, divergences, and each goal MET or MISSED.

It writes ``suite.md``, ``suite.json`` and ``suite_ess_per_grad.png`` into
``out``, and each model's own outputs into ``out/MODEL``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from neutra_flows.app.bench import (
    _LOWER_BOUND_RHAT,
    BENCHMARKS,
    _adaptation_outcome,
    _json_safe,
    run_benchmark,
    write_outputs,
)
from neutra_flows.models.gym import GYM_LARGE_MODELS, GYM_MODELS
from neutra_flows.models.posteriordb import POSTERIORDB_MODELS

__all__ = ["GYM_SUITE_MODELS", "SUITE_MODELS", "run_suite", "suite_table_markdown"]

#: The posteriordb models and the built-in targets with a known truth (eight
#: schools has none and is reported without correctness).
SUITE_MODELS: tuple[str, ...] = (
    *POSTERIORDB_MODELS, "banana", "funnel", "funnel-100", "ill-conditioned-gaussian", "german-credit",
    "eight-schools",
)

#: ``suite --gym``: inference_gym's models that need no download, 25 to 501 parameters
#: (``--gym-large`` adds the 2519-D stochastic volatility).
GYM_SUITE_MODELS: tuple[str, ...] = tuple(m for m in GYM_MODELS if m not in GYM_LARGE_MODELS)

# One protocol for every model: the defaults a new user gets.
_PROTOCOL = dict(flow="iaf", kernel="hmc", num_chains=4, num_warmup=1000, num_samples=1000,
                 train_steps=2000, batch_size=256)


def _fit_figures(result: Any) -> dict[str, Any]:
    """The VI fit's figures; with the flow adapted on the draws, its refits instead."""
    if result.fit is None:
        attrs = next(iter(result.idatas.values())).posterior.attrs
        return {"khat": math.nan, "whitening": attrs.get("flow_adaptation_start", "none"),
                "fit_stop": _adaptation_outcome(attrs)}
    fit = result.fit
    return {"khat": float(fit.khat), "fit_stop": fit.stop_reason,
            "whitening": fit.whitening.method if fit.whitening is not None else "none"}


def _row(name: str, result: Any, seconds: float) -> dict[str, Any]:
    table = result.table
    neutra, nuts = table.iloc[0], table.iloc[1]

    def ratio(column: str) -> float:
        return float(neutra[column] / nuts[column]) if nuts[column] > 0 else math.inf

    # Correct means right against the truth (bias, std) with converged chains;
    # divergences and speed are goals of their own.
    correctness = [met for description, met in result.goals
                   if description.startswith(("every |mean", "every std", "max R-hat"))]
    return {
        "model": name,
        "d": int(result.settings["event_size"]),
        "neutra_ess_per_grad": float(neutra["ess_per_grad"]),
        "nuts_ess_per_grad": float(nuts["ess_per_grad"]),
        "ratio": ratio("ess_per_grad"),
        "ratio_is_lower_bound": bool(nuts["max_rhat"] > _LOWER_BOUND_RHAT),
        "neutra_ess_per_grad_total": float(neutra["ess_per_grad_total"]),
        "nuts_ess_per_grad_total": float(nuts["ess_per_grad_total"]),
        "ratio_ess_per_second_total": ratio("ess_per_second_total"),
        "neutra_divergences": float(neutra["divergences"]),
        "nuts_divergences": float(nuts["divergences"]),
        "neutra_max_rhat": float(neutra["max_rhat"]),
        "nuts_max_rhat": float(nuts["max_rhat"]),
        "neutra_max_bias_mcse": float(neutra.get("max_abs_error_mcse", math.nan)),
        "nuts_max_bias_mcse": float(nuts.get("max_abs_error_mcse", math.nan)),
        "neutra_std_ratio": [float(neutra.get("min_std_ratio", math.nan)),
                             float(neutra.get("max_std_ratio", math.nan))],
        **_fit_figures(result),
        "neutra_correct": None if not correctness or any(m is None for m in correctness) else all(correctness),
        "goals": [{"goal": d, "met": m} for d, m in result.goals],
        **_time_figures(result),
        "seconds": seconds,
    }


def _time_figures(result: Any) -> dict[str, Any]:
    """Each run's all-in seconds, time to the first kept draw and seconds per phase."""
    from neutra_flows.diagnostics import phase_times

    figures: dict[str, Any] = {}
    for key, idata in zip(("neutra", "nuts"), result.idatas.values(), strict=False):
        attrs = idata.posterior.attrs
        figures[f"{key}_total_time"] = float(attrs.get("total_time", math.nan))
        figures[f"{key}_time_to_first_draw"] = float(attrs.get("time_to_first_draw", math.nan))
        figures[f"{key}_phase_times"] = phase_times(idata)
        figures[f"{key}_leapfrog_cost_ratio"] = float(attrs.get("leapfrog_cost_ratio", math.nan))
    return figures


def _num(x: Any, fmt: str = ".3g") -> str:
    """A figure for the table; "n/a" where there is none (no truth, or NaN read back from JSON)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, fmt)


def _fmt_ratio(row: dict[str, Any]) -> str:
    text = f"{_num(row['ratio'])}x"
    return (">= " + text) if row["ratio_is_lower_bound"] else text


def _fmt_correct(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "FAILED: " + row["error"]
    missed = [g["goal"] for g in row["goals"] if g["met"] is False]
    return "all met" if not missed else "MISSED: " + "; ".join(missed)


def suite_table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The suite's table as markdown (one line per model)."""
    head = ("| model | d | NeuTra ESS/grad | NUTS ESS/grad | ratio | NeuTra / NUTS ESS/grad incl. training "
            "| ESS/s incl. training, ratio | div. NeuTra / NUTS | R-hat NeuTra / NUTS | NeuTra max bias/MCSE "
            "| NeuTra std ratio | k-hat | whitening | all-in s NeuTra / NUTS | first draw s NeuTra / NUTS "
            "| leapfrog cost / bare gradient, NeuTra / NUTS | goals |")
    lines = [head, "|" + "---|" * 17]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | " + " | " * 15 + f"{_fmt_correct(r)} |")
            continue
        lo, hi = r["neutra_std_ratio"]
        lines.append(
            f"| {r['model']} | {r['d']} | {_num(r['neutra_ess_per_grad'])} | {_num(r['nuts_ess_per_grad'])} | "
            f"{_fmt_ratio(r)} | {_num(r['neutra_ess_per_grad_total'], '.2g')} / "
            f"{_num(r['nuts_ess_per_grad_total'], '.2g')} | {_num(r['ratio_ess_per_second_total'])}x | "
            f"{_num(r['neutra_divergences'], '.0f')} / {_num(r['nuts_divergences'], '.0f')} | "
            f"{_num(r['neutra_max_rhat'], '.3f')} / {_num(r['nuts_max_rhat'], '.3f')} | "
            f"{_num(r['neutra_max_bias_mcse'], '.2g')} | {_num(lo)}-{_num(hi)} | {_num(r['khat'], '.2f')} | "
            f"{r['whitening']} | "
            f"{_num(r.get('neutra_total_time'), '.1f')} / {_num(r.get('nuts_total_time'), '.1f')} | "
            f"{_num(r.get('neutra_time_to_first_draw'), '.1f')} / "
            f"{_num(r.get('nuts_time_to_first_draw'), '.1f')} | "
            f"{_num(r.get('neutra_leapfrog_cost_ratio'), '.2g')} / "
            f"{_num(r.get('nuts_leapfrog_cost_ratio'), '.2g')} | "
            f"{_fmt_correct(r)} |")
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("error")]
    if not rows:
        return
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ax.barh(y - 0.2, [r["neutra_ess_per_grad"] for r in rows], 0.4, label="NeuTra-HMC (IAF)")
    ax.barh(y + 0.2, [r["nuts_ess_per_grad"] for r in rows], 0.4, label="NUTS")
    ax.set_xscale("log")
    verdict = {True: "ok", False: "WRONG", None: "?"}
    ax.set_yticks(y, [f"{r['model']} {verdict[r['neutra_correct']]}" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("min bulk ESS per gradient, sampling phase (log scale)")
    ax.set_title("ok / WRONG: NeuTra's means and stds against the truth (? = no truth)", fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_suite(
    models: Sequence[str] | None = None,
    *,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    progress: bool = False,
    **protocol: Any,
) -> list[dict[str, Any]]:
    """Runs NeuTra and NUTS on each model (default :data:`SUITE_MODELS`); returns the rows.

    A model that fails is reported in its row (``"error"``) and the others still
    run. With ``out``, writes ``suite.md``, ``suite.json``, the figure and each
    model's own outputs (``out/MODEL``), the table after every model, so an
    interrupted run keeps what it measured. ``protocol`` overrides the suite's
    settings (``train_steps``, ``num_warmup``, ...; :func:`run_benchmark`'s names),
    for quick checks; the published table uses none.
    """
    say = log or (lambda _m: None)
    models = list(SUITE_MODELS if not models else models)
    settings = {**_PROTOCOL, **protocol}
    if protocol.get("adapt") and "flow" not in protocol:
        # Adaptation on the draws needs a fast inverse: bench's default for it (RealNVP).
        settings.pop("flow")
    unknown = [m for m in models if m not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown suite model(s) {unknown}; choose from {list(SUITE_MODELS)} "
                         f"or the gym's {list(GYM_MODELS)}")
    if out is not None:
        os.makedirs(out, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(models, 1):
        start = time.perf_counter()
        try:
            result = run_benchmark(name, seed=seed, progress=progress, log=None, **settings)
            row = _row(name, result, time.perf_counter() - start)
            if out is not None:
                write_outputs(result, os.path.join(out, name))
        except Exception as err:  # noqa: BLE001 - one model's failure must not cost the others
            row = {"model": name, "error": f"{type(err).__name__}: {err}"[:300],
                   "seconds": time.perf_counter() - start}
        rows.append(row)
        say(f"[{i}/{len(models)}] {name}: " + (
            _fmt_correct(row) if row.get("error") else
            f"NeuTra {row['neutra_ess_per_grad']:.3g} ESS/grad, NUTS {row['nuts_ess_per_grad']:.3g} "
            f"({_fmt_ratio(row)}); all-in {_num(row.get('neutra_total_time'), '.1f')} s vs "
            f"{_num(row.get('nuts_total_time'), '.1f')} s, ESS/s {_num(row['ratio_ess_per_second_total'])}x; "
            f"{_fmt_correct(row)}; {row['seconds']:.0f} s"))
        if out is not None:
            _write(rows, out, {**settings, "seed": seed})
    return rows


def _write(rows: Sequence[dict[str, Any]], out: str | os.PathLike, protocol: dict[str, Any]) -> None:
    with open(os.path.join(out, "suite.md"), "w") as fh:
        fh.write(suite_table_markdown(rows) + "\n")
    with open(os.path.join(out, "suite.json"), "w") as fh:
        json.dump(_json_safe({"protocol": protocol, "rows": list(rows)}), fh, indent=2)
    _plot(rows, os.path.join(out, "suite_ess_per_grad.png"))
    _plot_phases(rows, os.path.join(out, "suite_phase_times.png"))


def _plot_phases(rows: Sequence[dict[str, Any]], path: str) -> None:
    """A stacked bar of seconds per phase for each model's NeuTra and NUTS runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neutra_flows.plots import plot_phase_times

    runs = {f"{r['model']} {who}": r[f"{key}_phase_times"] for r in rows if not r.get("error")
            for key, who in (("neutra", "NeuTra"), ("nuts", "NUTS")) if r.get(f"{key}_phase_times")}
    if not runs:
        return
    fig = plot_phase_times(runs)
    fig.savefig(path, dpi=110)
    plt.close(fig)

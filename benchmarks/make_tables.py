"""Turns bench_out/**/results.json (written by `neutra-flows bench --out`) into Markdown tables.

    python benchmarks/make_tables.py bench_out > tables.md
    python benchmarks/make_tables.py bench_flows --per-target   # one compact table per target
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, (int,)) or (isinstance(x, float) and x.is_integer() and abs(x) >= 10):
        return f"{int(x)}"
    return f"{x:.{digits}g}"


def rows(folder: str):
    # OUT/<run>/results.json, or OUT/<target>/<flow>/results.json from one
    # `neutra-flows bench TARGET --flow A --flow B --out OUT/<target>` sweep.
    for path in sorted(glob.glob(os.path.join(folder, "**", "results.json"), recursive=True)):
        with open(path) as fh:
            yield os.path.relpath(os.path.dirname(path), folder), json.load(fh)


def table(folder: str) -> str:
    head = ("| run | flow | fit s | -ELBO (KL if normalised) | k-hat | NeuTra ESS/grad | NUTS ESS/grad | ratio "
            "| ESS/s incl. training, NeuTra / NUTS | NeuTra div. | max bias/MCSE | std ratio range "
            "| max R-hat | goals missed |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, res in rows(folder):
        table = res["table"]
        labels = list(table)
        neutra = table[labels[0]]
        base = table[labels[1]] if len(labels) > 1 else {}
        ratio = (neutra.get("ess_per_grad") or 0) / base["ess_per_grad"] if base.get("ess_per_grad") else None
        total = ((neutra.get("ess_per_second_total") or 0) / base["ess_per_second_total"]
                 if base.get("ess_per_second_total") else None)
        missed = [g["goal"] for g in res["goals"] if g["met"] is False]
        std = (f"{_fmt(neutra.get('min_std_ratio'))}-{_fmt(neutra.get('max_std_ratio'))}"
               if neutra.get("min_std_ratio") is not None else "n/a")
        lines.append(
            f"| {name} | {res['settings']['flow']} | {_fmt(res['fit']['wall_time'])} "
            f"| {_fmt(-res['fit']['elbo'] if res['fit']['elbo'] is not None else None)} "
            f"| {_fmt(res['fit']['khat'])} | {_fmt(neutra.get('ess_per_grad'))} "
            f"| {_fmt(base.get('ess_per_grad'))} | {_fmt(ratio)}x | {_fmt(total)}x "
            f"| {_fmt(neutra.get('divergences'))} | {_fmt(neutra.get('max_abs_error_mcse'))} | {std} "
            f"| {_fmt(neutra.get('max_rhat'), 4)} | {'; '.join(missed) if missed else 'none'} |"
        )
    return "\n".join(lines)


def flow_tables(folder: str) -> str:
    """One compact table per target for OUT/<target>/<flow>/ sweeps (docs/benchmarks.md, "Every flow")."""
    head = ("| flow | fit s | -ELBO | k-hat | NeuTra ESS/grad | x NUTS | x NUTS ESS/s incl. training "
            "| div. | max bias/MCSE | std ratio range | max R-hat | goals met |")
    by_target: dict[str, list[str]] = {}
    for name, res in rows(folder):
        target = name.split(os.sep)[0]
        table = res["table"]
        labels = list(table)
        neutra, base = table[labels[0]], (table[labels[1]] if len(labels) > 1 else {})
        ratio = (neutra.get("ess_per_grad") or 0) / base["ess_per_grad"] if base.get("ess_per_grad") else None
        total = ((neutra.get("ess_per_second_total") or 0) / base["ess_per_second_total"]
                 if base.get("ess_per_second_total") else None)
        std = (f"{_fmt(neutra.get('min_std_ratio'))}-{_fmt(neutra.get('max_std_ratio'))}"
               if neutra.get("min_std_ratio") is not None else "n/a")
        met = sum(g["met"] is True for g in res["goals"])
        if target not in by_target:
            nuts = (f"NUTS: {_fmt(base.get('ess_per_grad'))} ESS/grad, {_fmt(base.get('divergences'))} "
                    f"divergences, max R-hat {_fmt(base.get('max_rhat'), 4)}")
            by_target[target] = [f"**{target}** ({nuts})", "", head, "|" + "---|" * (head.count("|") - 1)]
        by_target[target].append(
            f"| {res['settings']['flow']} | {_fmt(res['fit']['wall_time'])} "
            f"| {_fmt(-res['fit']['elbo'] if res['fit']['elbo'] is not None else None)} "
            f"| {_fmt(res['fit']['khat'], 2)} | {_fmt(neutra.get('ess_per_grad'), 2)} | {_fmt(ratio, 2)} "
            f"| {_fmt(total, 2)} | {_fmt(neutra.get('divergences'))} "
            f"| {_fmt(neutra.get('max_abs_error_mcse'), 2)} "
            f"| {std} | {_fmt(neutra.get('max_rhat'), 4)} | {met} of {len(res['goals'])} |"
        )
    return "\n\n".join("\n".join(lines) for lines in by_target.values())


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--per-target"]
    folder = args[0] if args else "bench_out"
    print(flow_tables(folder) if "--per-target" in sys.argv else table(folder))

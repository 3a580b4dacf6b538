"""What every runner of the peers benchmark shares: the targets' data, the protocol, the output format.

Imported by ``run_nutpie.py`` and ``run_numpyro.py`` (the peers' venv, no
TensorFlow, no neutra_flows) and by ``run_ours.py`` / ``table.py`` (the system
Python). It therefore imports numpy only.

One run = one (target, method) pair, written as two files under
``benchmarks/peers/runs/<target>/``:

``<method>.npz``
    ``post__<name>``: the kept draws of every variable, ``[chains, draws, *shape]``,
    in the constrained space and under *our* names and shapes (``x`` for the
    funnels and the banana; ``mu``, ``tau``, ``theta`` for eight schools; for the
    posteriordb models the Stan program's names and shapes, as
    ``neutra_flows.models.posteriordb`` has them: ``beta``, ``sigma`` for the
    regressions, ``alpha``, ``beta``, ``sigma`` for arK, ...), so that every run is
    checked against the same truth; ``stat__diverging`` and ``stat__n_steps``, ``[chains, draws]``, of the
    kept draws.
``<method>.json``
    the cost and the settings: gradient evaluations in training, warm-up and
    sampling, divergences, the wall-clock seconds of every phase, the versions,
    notes, and ``status`` (``ok``, ``skipped`` or ``failed`` with a ``reason``);
    ``time_to_first_draw`` and ``sampling_seconds`` (see :func:`ess_summary`), and
    ``ess_summary``: the run's min bulk ESS, all-in ESS/s and time to 1000 ESS as
    the runner computed them (``table.py`` recomputes them with ``neutra_flows.compare``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RUNS_DIR = os.environ.get("PEERS_RUNS", os.path.join(HERE, "runs"))
RESULTS_DIR = os.path.join(HERE, "results")
POSTERIORDB_DIR = os.path.join(ROOT, "neutra_flows", "data", "posteriordb")

# -- the protocol: one for every method ------------------------------------------------

NUM_CHAINS = 4
NUM_WARMUP = 1000
NUM_SAMPLES = 1000
# PEERS_SEED=K: the same protocol with another seed (every method), for the seed spread;
# its table goes beside the runs, never over the committed results.
SEED = int(os.environ.get("PEERS_SEED", "0"))
# PEERS_QUICK=1: a smoke test of the harness (tiny runs, into PEERS_RUNS), not a benchmark.
QUICK = os.environ.get("PEERS_QUICK", "0") == "1"
if QUICK:
    NUM_WARMUP = NUM_SAMPLES = 100
# Where table.py writes peers.md / peers.json (a quick run never overwrites the real ones).
OUTPUT_DIR = (os.path.join(RUNS_DIR, "quick_results") if QUICK
              else os.path.join(RUNS_DIR, f"seed{SEED}_results") if SEED else RESULTS_DIR)

# Our short target names -> neutra_flows.app.bench.BENCHMARKS names. The order is the
# priority order of run_all.sh (cheap and central first).
TARGETS: dict[str, str] = {
    "funnel-10": "funnel",
    "banana": "banana",
    "eight-schools": "eight-schools",
    "funnel-100": "funnel-100",
    "kidiq": "kidiq-kidscore_interaction",
    "earnings": "earnings-logearn_interaction",
    # The rest of the ten posteriordb models neutra_flows ships (neutra_flows.models.posteriordb).
    "ark": "arK-arK",
    "arma11": "arma-arma11",
    "garch11": "garch-garch11",
    "gp-regr": "gp_pois_regr-gp_regr",
    "gauss-mix": "low_dim_gauss_mix-low_dim_gauss_mix",
    "mesquite": "mesquite-logmesquite_logvas",
    "nes": "nes2000-nes",
    "sblrc": "sblrc-blr",
}
# What a runner does when no target is named: the six of the committed table (results/peers.md).
DEFAULT_TARGETS: tuple[str, ...] = ("funnel-10", "banana", "eight-schools", "funnel-100", "kidiq", "earnings")
# The ten posteriordb models (in POSTERIORDB_MODELS order); ``posteriordb`` on a command line names them all.
POSTERIORDB_TARGETS: tuple[str, ...] = (
    "ark", "arma11", "earnings", "garch11", "gp-regr", "kidiq", "gauss-mix", "mesquite", "nes", "sblrc",
)
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_TARGETS,
    "posteriordb": POSTERIORDB_TARGETS,
    "all": tuple(TARGETS),
}
BANANA_CURVATURE = 0.03
EIGHT_SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def funnel_dim(target: str) -> int:
    return int(target.split("-")[1])


def read_posteriordb(target: str) -> dict[str, Any]:
    with open(os.path.join(POSTERIORDB_DIR, TARGETS[target], "data.json")) as fh:
        return json.load(fh)


REGRESSIONS = ("kidiq", "earnings", "mesquite", "nes", "sblrc")


@functools.lru_cache(maxsize=1)
def _regression_module():
    """``neutra_flows/models/_regression_data.py``, loaded by its path (once): the one definition
    of the regressions' design matrices and arK's lags, which the peers' venv (no TensorFlow,
    so no ``import neutra_flows``) can still read, as it imports nothing but NumPy."""
    import importlib.util

    path = os.path.join(ROOT, "neutra_flows", "models", "_regression_data.py")
    spec = importlib.util.spec_from_file_location("_neutra_flows_regression_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def regression_data(target: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of the suite's linear regressions (``y ~ normal(X beta, sigma)``): the design
    matrices neutra_flows.models.posteriordb builds (same columns, same order, same code)."""
    if target not in REGRESSIONS:
        raise ValueError(f"{target} is not one of the suite regressions {REGRESSIONS}")
    return _regression_module().REGRESSIONS[TARGETS[target]](read_posteriordb(target))


def ark_data() -> tuple[np.ndarray, np.ndarray]:
    """arK's ``(lags, y[K:])``: ``lags[i, j] = y[K + i - (j + 1)]``, as neutra_flows builds them (same code)."""
    return _regression_module().ark_lags(read_posteriordb("ark"))


def resolve_target(name: str) -> list[str]:
    """A short name, a posteriordb / BENCHMARKS name (``arK-arK``) or a group (``posteriordb``)."""
    if name in TARGETS:
        return [name]
    if name in TARGET_GROUPS:
        return list(TARGET_GROUPS[name])
    by_long = {v: k for k, v in TARGETS.items()}
    if name in by_long:
        return [by_long[name]]
    raise SystemExit(
        f"unknown target {name!r}; choose from {list(TARGETS)}, their BENCHMARKS names "
        f"({', '.join(TARGETS.values())}) or a group ({', '.join(TARGET_GROUPS)})"
    )


def parse_targets(argv_targets: list[str] | None) -> list[str]:
    """The targets named (see :func:`resolve_target`), in order, each once; none: DEFAULT_TARGETS."""
    if not argv_targets:
        return list(DEFAULT_TARGETS)
    out: list[str] = []
    for name in argv_targets:
        out.extend(t for t in resolve_target(name) if t not in out)
    return out


TARGETS_HELP = (
    "short names, BENCHMARKS names (arK-arK, ...) or groups: posteriordb (the ten posteriordb models), "
    f"all; default: {' '.join(DEFAULT_TARGETS)}"
)


# -- output ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": load,
    }


def package_versions(names: list[str]) -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "not installed"
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


def ess_summary(
    draws: Mapping[str, np.ndarray],
    total_seconds: float | None,
    time_to_first_draw: float | None,
    sampling_seconds: float | None,
) -> dict[str, Any]:
    """Min bulk ESS, all-in ESS/s and time to 1000 min-bulk ESS of one run.

    ``time_to_1000_ess`` is ``benchmarks/time_to_ess.py``'s definition:
    ``time_to_first_draw + sampling_seconds * 1000 / min_ess_bulk`` (the fixed cost
    until the first kept draw, then the sampling phase's own rate, extrapolated
    linearly). ``time_to_1000_ess_all_in`` is ``total_seconds * 1000 / min_ess_bulk``
    (= 1000 / all-in ESS/s), defined for every run, phases or not. The ESS is ArviZ's
    rank-normalised bulk ESS, the min over every variable and coordinate, as
    ``neutra_flows.compare`` computes it.
    """
    import arviz as az

    posterior = az.from_dict(posterior={k: np.asarray(v, np.float64) for k, v in draws.items()})
    ess = az.ess(posterior, method="bulk")
    min_ess = float(min(float(np.min(ess[k].values)) for k in ess.data_vars))
    extrapolated, per_second, all_in = time_to_ess(min_ess, total_seconds, time_to_first_draw, sampling_seconds)
    return dict(
        min_ess_bulk=min_ess,
        total_seconds=total_seconds,
        ess_per_second_total=per_second,
        time_to_1000_ess=extrapolated,
        time_to_1000_ess_all_in=all_in,
        definition=(
            "time_to_1000_ess = time_to_first_draw + sampling_seconds * 1000 / min_ess_bulk "
            "(benchmarks/time_to_ess.py); time_to_1000_ess_all_in = total_seconds * 1000 / min_ess_bulk"
        ),
    )


def time_to_ess(
    min_ess: float | None,
    total_seconds: float | None,
    time_to_first_draw: float | None,
    sampling_seconds: float | None,
) -> tuple[float | None, float | None, float | None]:
    """``(time_to_1000_ess, ess_per_second_total, time_to_1000_ess_all_in)``; None where undefined."""
    ok = min_ess is not None and math.isfinite(min_ess) and min_ess > 0
    extrapolated = (
        time_to_first_draw + sampling_seconds * 1000.0 / min_ess
        if ok and time_to_first_draw is not None and sampling_seconds is not None
        else None
    )
    per_second = min_ess / total_seconds if ok and total_seconds else None
    all_in = total_seconds * 1000.0 / min_ess if ok and total_seconds is not None else None
    return extrapolated, per_second, all_in


def run_paths(target: str, method: str) -> tuple[str, str]:
    folder = os.path.join(RUNS_DIR, target)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{method}.npz"), os.path.join(folder, f"{method}.json")


_CPU_START: list[float] = []


def begin_run() -> None:
    """Starts the CPU clock of one run (``save_run`` records the CPU seconds since)."""
    _CPU_START[:] = [time.process_time()]


def save_run(
    target: str,
    method: str,
    record: Mapping[str, Any],
    draws: Mapping[str, np.ndarray] | None = None,
    stats: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Writes one run: draws (``{name: [chains, draws, ...]}``) and stats into the .npz,
    the record into the .json."""
    npz_path, json_path = run_paths(target, method)
    if os.path.exists(npz_path):
        os.remove(npz_path)
    if draws is not None:
        arrays = {f"post__{k}": np.asarray(v, np.float64) for k, v in draws.items()}
        arrays.update({f"stat__{k}": np.asarray(v) for k, v in (stats or {}).items()})
        np.savez_compressed(npz_path, **arrays)
    payload = dict(record)
    payload.setdefault("target", target)
    payload.setdefault("method", method)
    payload.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    payload["machine"] = machine()
    if _CPU_START:
        # CPU seconds of this process (all its threads) since begin_run: on a machine
        # shared with other jobs, less noisy than wall-clock seconds.
        payload["cpu_seconds"] = time.process_time() - _CPU_START[0]
    with open(json_path, "w") as fh:
        json.dump(_json_safe(payload), fh, indent=2)
    status = payload.get("status", "ok")
    print(
        f"[{target} / {method}] {status}"
        + (f": {payload.get('reason')}" if status != "ok" else "")
        + f" -> {json_path}",
        flush=True,
    )


def guarded(target: str, method: str, base: Mapping[str, Any], fn: Callable[[], None]) -> bool:
    """Runs ``fn`` (which calls save_run itself); records a failure instead of stopping the sweep."""
    begin_run()
    try:
        fn()
        return True
    except Exception as err:  # noqa: BLE001 - one failed run must not cost the others
        record = dict(base)
        record.update(
            status="failed",
            reason=f"{type(err).__name__}: {str(err).strip()[:800]}",
            traceback=traceback.format_exc()[-4000:],
        )
        save_run(target, method, record)
        return False


class Clock:
    """``with clock("phase"):`` accumulates wall-clock seconds per phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[phase] = clock.seconds.get(phase, 0.0) + time.perf_counter() - self.t0
                return False

        return _Phase()


if __name__ == "__main__":
    # run_all.sh: `python common.py timeout TARGET METHOD SECONDS` records a run killed by its time limit.
    import sys

    # run_all.sh: `python common.py targets NAME ...` prints the short names they stand for.
    if len(sys.argv) >= 2 and sys.argv[1] == "targets":
        print(" ".join(parse_targets(sys.argv[2:])))
    elif len(sys.argv) == 5 and sys.argv[1] == "timeout":
        _, _, tgt, meth, secs = sys.argv
        save_run(
            tgt,
            meth,
            {"status": "failed", "reason": f"killed by run_all.sh's time limit after {secs} s (PEERS_TIMEOUT)"},
        )
    else:
        raise SystemExit("usage: common.py timeout TARGET METHOD SECONDS | common.py targets [NAME ...]")

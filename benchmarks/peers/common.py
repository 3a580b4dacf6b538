"""What every runner of the peers benchmark shares: the targets' data, the protocol, the output format.

Imported by ``run_nutpie.py`` and ``run_numpyro.py`` (the peers' venv, no
TensorFlow, no neutra_flows) and by ``run_ours.py`` / ``table.py`` (the system
Python). It therefore imports numpy only.

One run = one (target, method) pair, written as two files under
``benchmarks/peers/runs/<target>/``:

``<method>.npz``
    ``post__<name>``: the kept draws of every variable, ``[chains, draws, *shape]``,
    in the constrained space and under *our* names and shapes (``x`` for the
    funnels and the banana; ``mu``, ``tau``, ``theta`` for eight schools; ``beta``,
    ``sigma`` for the regressions), so that every run is checked against the same
    truth; ``stat__diverging`` and ``stat__n_steps``, ``[chains, draws]``, of the
    kept draws.
``<method>.json``
    the cost and the settings: gradient evaluations in training, warm-up and
    sampling, divergences, the wall-clock seconds of every phase, the versions,
    notes, and ``status`` (``ok``, ``skipped`` or ``failed`` with a ``reason``).
"""

from __future__ import annotations

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
}
BANANA_CURVATURE = 0.03
EIGHT_SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def funnel_dim(target: str) -> int:
    return int(target.split("-")[1])


def read_posteriordb(target: str) -> dict[str, Any]:
    with open(os.path.join(POSTERIORDB_DIR, TARGETS[target], "data.json")) as fh:
        return json.load(fh)


def regression_data(target: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of the two suite regressions, built exactly as neutra_flows.models.posteriordb does."""
    d = read_posteriordb(target)
    if target == "kidiq":
        hs, iq = np.asarray(d["mom_hs"], np.float64), np.asarray(d["mom_iq"], np.float64)
        x = np.stack([np.ones_like(hs), hs, iq, hs * iq], axis=1)
        y = np.asarray(d["kid_score"], np.float64)
    elif target == "earnings":
        height, male = np.asarray(d["height"], np.float64), np.asarray(d["male"], np.float64)
        x = np.stack([np.ones_like(height), height, male, height * male], axis=1)
        y = np.log(np.asarray(d["earn"], np.float64))
    else:
        raise ValueError(f"{target} is not one of the suite regressions")
    return x, y


def parse_targets(argv_targets: list[str] | None) -> list[str]:
    if not argv_targets:
        return list(TARGETS)
    unknown = [t for t in argv_targets if t not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    return list(argv_targets)


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

    if len(sys.argv) == 5 and sys.argv[1] == "timeout":
        _, _, tgt, meth, secs = sys.argv
        save_run(
            tgt,
            meth,
            {"status": "failed", "reason": f"killed by run_all.sh's time limit after {secs} s (PEERS_TIMEOUT)"},
        )
    else:
        raise SystemExit("usage: common.py timeout TARGET METHOD SECONDS")

"""Checks the PyMC models of ``run_nutpie.py`` against neutra_flows' targets: same log density, same space.

Runs in the peers' venv, from the repo root; it calls neutra_flows' Python
(``PYTHON``, default ``python``) for our side::

    .venv-peers/bin/python benchmarks/peers/check_models.py [TARGET ...]   # default: posteriordb

For each target it takes a few points in PyMC's unconstrained space (the
posteriordb reference mean, moved into the unconstrained space by PyMC's own
transforms, plus small random moves: ``pm.Model.initial_point`` with the
reference as ``initval``), and evaluates

* PyMC: ``model.compile_logp(jacobian=True)`` (every prior, likelihood,
  potential and log-Jacobian term), and the constrained values of the points;
* ours: ``target.unconstrain(constrained)`` (is it PyMC's unconstrained point?)
  and ``target.unnormalized_log_prob`` at PyMC's unconstrained point.

The two log densities must differ by one constant (the normalising terms that
one side drops): the spread of ``lp_pymc - lp_ours`` over the points is
printed and must be below ``1e-8 * max(1, |lp|)``; the unconstrained points must
agree to ``1e-8`` (relative). Exit status 1 if any target fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

NUM_POINTS = 6


def _reference(target: str) -> tuple[dict, dict]:
    with open(os.path.join(common.POSTERIORDB_DIR, common.TARGETS[target], "reference.json")) as fh:
        ref = json.load(fh)

    def gather(stats):
        out: dict[str, list] = {}
        for key, value in stats.items():
            name, _, index = key.partition("[")
            out.setdefault(name, []).append((int(index.rstrip("]")) if index else 0, value))
        return {k: (np.asarray([v for _, v in sorted(vals)]) if vals[0][0] else np.asarray(vals[0][1]))
                for k, vals in out.items()}

    return gather(ref["mean"]), gather(ref["std"])


def pymc_side(target: str, seed: int) -> dict:
    import run_nutpie

    model, _ = run_nutpie.build_model(target)
    mean, std = _reference(target)
    free = {rv.name: rv for rv in model.free_RVs}
    for name, rv in free.items():
        model.set_initval(rv, np.asarray(mean[name], np.float64))
    start = model.initial_point()
    rv_of = {model.rvs_to_values[rv].name: rv.name for rv in model.free_RVs}  # value var -> RV name
    rng = np.random.default_rng(seed)
    points = [start]
    for _ in range(NUM_POINTS - 1):
        point = {}
        for value_name, value in start.items():
            rv_name = rv_of[value_name]
            transformed = value_name != rv_name
            scale = 0.1 if transformed else 0.5 * np.asarray(std[rv_name])
            point[value_name] = value + scale * rng.standard_normal(np.shape(value))
        points.append(point)
    logp = model.compile_logp(jacobian=True)
    # The constrained values: PyMC's untransformed value variables, computed by its own graph.
    values = model.unobserved_value_vars
    constrained = model.compile_fn(values, inputs=model.value_vars, on_unused_input="ignore", point_fn=False)
    out = []
    for p in points:
        vals = dict(zip([v.name for v in values], constrained(**p), strict=True))
        out.append(
            dict(
                lp=float(logp(p)),
                constrained={name: np.asarray(vals[name]).tolist() for name in free},
                unconstrained={rv_of[k]: np.asarray(v).tolist() for k, v in p.items()},
            )
        )
    return {"target": target, "posteriordb": common.TARGETS[target], "points": out}


def ours_side(path: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from neutra_flows.models.posteriordb import load_posteriordb

    with open(path) as fh:
        cases = json.load(fh)
    results = []
    for case in cases:
        t = load_posteriordb(case["posteriordb"])
        pts = case["points"]
        stacked = {n: np.asarray([p["constrained"][n] for p in pts], np.float64) for n in t.names}
        z_ours = np.asarray(t.unconstrain(stacked))
        # PyMC's unconstrained point in our flat layout (the variables in t.names order, flattened).
        z_pymc = np.concatenate(
            [np.asarray([p["unconstrained"][n] for p in pts], np.float64).reshape(len(pts), -1)
             for n in t.names],
            axis=1,
        )
        lp = np.asarray(t.unnormalized_log_prob(z_pymc))
        results.append(
            dict(target=case["target"], z_ours=z_ours.tolist(), z_pymc=z_pymc.tolist(), lp=lp.tolist())
        )
    print("RESULT " + json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=common.TARGETS_HELP + " (here: posteriordb)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours:
        ours_side(args.ours)
        return
    targets = common.parse_targets(args.targets or ["posteriordb"])
    unknown = [t for t in targets if t not in common.POSTERIORDB_TARGETS]
    if unknown:
        raise SystemExit(f"only the posteriordb models are checked here: {unknown}")
    cases = [pymc_side(t, args.seed) for t in targets]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(cases, fh)
        path = fh.name
    env = dict(os.environ, PYTHONPATH=os.environ.get("NEUTRA_FLOWS_SRC", common.ROOT))
    done = subprocess.run([os.environ.get("PYTHON", "python"), __file__, "--ours", path],
                          capture_output=True, text=True, env=env, check=False)
    os.remove(path)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"our side failed:\n{done.stderr[-3000:]}")
    ok_all = True
    for case, ours in zip(cases, json.loads(line[-1][len("RESULT "):]), strict=True):
        lp_pymc = np.asarray([p["lp"] for p in case["points"]])
        lp_ours = np.asarray(ours["lp"])
        diff = lp_pymc - lp_ours
        spread = float(diff.max() - diff.min())
        scale = max(1.0, float(np.max(np.abs(lp_ours))))
        z_ours, z_pymc = np.asarray(ours["z_ours"]), np.asarray(ours["z_pymc"])
        z_err = float(np.max(np.abs(z_ours - z_pymc) / np.maximum(1.0, np.abs(z_pymc))))
        lp_ok, z_ok = spread < 1e-8 * scale, z_err < 1e-8
        ok_all &= lp_ok and z_ok
        print(f"{case['target']:10s} lp_pymc - lp_ours = {diff.mean():+.6f} (spread {spread:.2e} over "
              f"{len(diff)} points, |lp| up to {scale:.3g}): {'ok' if lp_ok else 'MISMATCH'}; "
              f"unconstrained points agree to {z_err:.1e}: {'ok' if z_ok else 'MISMATCH'}", flush=True)
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()

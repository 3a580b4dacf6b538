"""The ``neutra-flows`` command (also ``python -m neutra_flows``).

``neutra-flows bench TARGET``
    trains a flow on a built-in target, samples it with NeuTra and with the
    plain-NUTS baseline in the same run, prints the comparison and whether each
    goal was met, and with ``--out DIR`` writes ``results.json``, both runs'
    InferenceData (netCDF), the trained flow and PNG plots.
``neutra-flows sample FILE.py:FUNCTION``
    the same pipeline on a user's model: ``FUNCTION()`` returns a
    :class:`neutra_flows.Target` or a pinned TFP ``JointDistribution``.
``neutra-flows suite [--models NAME ...] [--gym [--gym-large]] --out DIR``
    NeuTra and NUTS on every real model of the suite (posteriordb and the
    built-in targets; with ``--gym``, inference_gym's models of 25-501
    parameters, ``pip install "neutra-flows[gym]"``), one table (markdown and
    JSON) and one figure, with a progress line per model
    (:mod:`neutra_flows.app.suite`).
``neutra-flows list``
    the built-in targets and flows.

Exit codes: 0 on success, 2 on bad arguments, 1 when the run fails; the reason
is printed as one line on standard error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "check_out_folder", "main", "parse_flow_options"]


def _int_at_least(minimum: int, what: str):
    """An argparse type: an int >= ``minimum``, else an error saying ``expected {what}``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def _probability(text: str) -> float:
    """An argparse type: a float strictly between 0 and 1 (an acceptance target)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value:g}")
    return value


_TARGET_ACCEPT_HELP = ("both samplers' dual-averaging target acceptance (default 0.8); raise it (e.g. 0.95, "
                       "as Stan's adapt_delta) when NeuTra reports divergences")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    from neutra_flows.flows import FLOW_NAMES

    parser.add_argument("--flow", choices=list(FLOW_NAMES), action="append", default=None,
                        help="flow family (default: the benchmark's, usually iaf); repeat it to "
                             "compare several flows against one baseline run, written to OUT/FLOW")
    parser.add_argument("--layers", type=_positive, default=None, help="flow layers (num_layers)")
    parser.add_argument("--hidden", type=_positive, default=None,
                        help="hidden units per conditioner layer (two layers of this width)")
    parser.add_argument("--flow-option", action="append", default=[], metavar="KEY=VALUE",
                        help="any make_flow option, VALUE read as JSON if it parses (e.g. "
                             "num_components=16, output_affine=false); repeatable")
    parser.add_argument("--kernel", choices=["hmc", "nuts"], default=None,
                        help="NeuTra's kernel: hmc (ChEES trajectory adaptation, default) or nuts")
    parser.add_argument("--chains", type=_positive, default=None, help="chains (default 4)")
    parser.add_argument("--warmup", type=_non_negative, default=None,
                        help="warm-up steps per chain (default 1000)")
    parser.add_argument("--samples", type=_positive, default=None,
                        help="kept draws per chain (default 1000)")
    parser.add_argument("--train-steps", type=_positive, default=None, help="VI steps")
    parser.add_argument("--batch-size", type=_positive, default=None, help="VI batch size")
    parser.add_argument("--learning-rate", type=float, default=None, help="initial Adam rate")
    parser.add_argument("--seed", type=_non_negative, default=0, help="seed (default 0)")
    parser.add_argument("--target-accept", type=_probability, default=None, metavar="P",
                        help=_TARGET_ACCEPT_HELP)
    parser.add_argument("--adapt", action="store_true",
                        help="no VI fit: sample(target, 'adapt') trains the flow (realnvp by default) on "
                        "NeuTra's own warm-up draws and gradients (Fisher divergence), keeping a refit "
                        "only when held-out draws say it is better; above 40 dimensions where no "
                        "Gaussian fits it trains an IAF with fit (2000 x 256) instead")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the plain-NUTS baseline run")
    parser.add_argument("--out", default=None,
                        help="folder for results.json, netCDF, the flow and plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or logs")


def build_parser() -> argparse.ArgumentParser:
    from neutra_flows.app.bench import BENCHMARKS

    parser = argparse.ArgumentParser(
        prog="neutra-flows",
        description="Train normalizing flows by VI and use them to precondition HMC (NeuTra).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark NeuTra against plain NUTS on a built-in target")
    bench.add_argument("target", choices=sorted(BENCHMARKS), help="built-in target")
    _add_run_options(bench)
    user = sub.add_parser("sample", help="run the pipeline on your model: FILE.py:FUNCTION")
    user.add_argument("model", help="FILE.py:FUNCTION returning a Target or a pinned JointDistribution")
    _add_run_options(user)
    suite = sub.add_parser("suite", help="NeuTra and NUTS on every real model; one table and one figure")
    suite.add_argument("--models", nargs="+", choices=sorted(BENCHMARKS), default=None, metavar="NAME",
                       help="models to run (default: every posteriordb model and the built-ins with a truth)")
    suite.add_argument("--out", required=True,
                       help="folder for suite.md, suite.json, the figure and per-model outputs")
    suite.add_argument("--seed", type=_non_negative, default=0, help="seed (default 0)")
    suite.add_argument("--quiet", action="store_true", help="no progress lines")
    suite.add_argument("--adapt", action="store_true",
                       help="NeuTra's flow is trained on the warm-up draws (as bench --adapt), not by VI")
    suite.add_argument("--target-accept", type=_probability, default=None, metavar="P",
                       help=_TARGET_ACCEPT_HELP)
    suite.add_argument("--kernel", choices=["hmc", "nuts"], default=None,
                       help="NeuTra's kernel (default hmc, as the published tables; sample's default is nuts)")
    suite.add_argument("--gym", action="store_true",
                       help="inference_gym's models of 25-501 parameters instead (pip install "
                            "'neutra-flows[gym]')")
    suite.add_argument("--gym-large", action="store_true",
                       help="with --gym: also the 2519-D stochastic volatility (slow)")
    sub.add_parser("list", help="list the built-in targets and flows")
    return parser


def load_user_model(spec: str) -> Any:
    """Imports ``FILE.py`` and calls ``FUNCTION()``, returning a :class:`Target`."""
    from neutra_flows.targets import Target

    path, sep, function = spec.rpartition(":")
    if not sep or not path or not function:
        raise ValueError(f"expected FILE.py:FUNCTION, got {spec!r}")
    if not os.path.isfile(path):
        raise ValueError(f"model file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("_neutra_user_model", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise ValueError(f"{path} has no function {function!r}")
    model = getattr(module, function)()
    if isinstance(model, Target):
        return model
    if hasattr(model, "experimental_default_event_space_bijector") and hasattr(model, "unnormalized_log_prob"):
        return Target.from_joint_distribution(model)
    if hasattr(model, "unnormalized_log_prob") and hasattr(model, "default_event_space_bijector"):
        return Target.from_inference_gym(model)
    raise ValueError(
        f"{spec} returned {type(model).__name__}; expected a neutra_flows.Target or a pinned "
        "tfp JointDistribution"
    )


def parse_flow_options(items: Sequence[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}``, VALUE read as JSON when it parses (else a string)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--flow-option expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a bare word such as lipswish
        options[key.strip()] = value
    return options


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_folder(out: str, subfolders: Sequence[str] = ()) -> None:
    """Raises ``ValueError`` naming ``out`` unless it is, or can be created as, a writable folder.

    Run before any work: a bench run takes minutes, and its figures must not be
    lost to an ``--out`` that was a file all along. ``subfolders`` (one per flow
    of a sweep) get the same check, and so does the saved flow inside each.
    """
    from neutra_flows.io import _check_target_folder

    for folder in [Path(out)] + [Path(out) / s for s in subfolders]:
        existing = _first_existing(folder.absolute())
        if existing == folder.absolute() and not existing.is_dir():
            raise ValueError(f"--out {out}: {folder} exists and is not a folder")
        if not existing.is_dir():
            raise ValueError(f"--out {out}: cannot create {folder}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out}: cannot write to {existing} (permission denied)")
        if (folder / "flow").exists():
            try:
                _check_target_folder(folder / "flow", overwrite=True)
            except ValueError as err:
                raise ValueError(f"--out {out}: the trained flow goes to {folder / 'flow'}: {err}") from None


def _run(args: argparse.Namespace, target: Any) -> int:
    from neutra_flows.app.bench import run_benchmark, write_outputs

    flow_options = parse_flow_options(args.flow_option)
    if args.layers is not None:
        flow_options["num_layers"] = args.layers
    if args.hidden is not None:
        flow_options["hidden_units"] = [args.hidden, args.hidden]
    flows = list(dict.fromkeys(args.flow)) if args.flow else [None]
    baseline_idata, failed = None, []
    for flow in flows:
        try:
            result = run_benchmark(
                target,
                flow=flow,
                flow_options=flow_options,
                kernel=args.kernel,
                num_chains=args.chains,
                num_warmup=args.warmup,
                num_samples=args.samples,
                train_steps=args.train_steps,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                seed=args.seed,
                baseline=not args.no_baseline,
                adapt=args.adapt,
                target_accept_prob=args.target_accept,
                baseline_idata=baseline_idata,
                out=None,
                progress=not args.quiet,
                log=None if args.quiet else (lambda msg: print(msg, file=sys.stderr)),
            )
        except Exception as err:
            if len(flows) == 1:
                raise
            # In a sweep one flow's failure must not cost the others' figures.
            print(f"neutra-flows: flow {flow} failed: {type(err).__name__}: {err}", file=sys.stderr)
            failed.append(flow)
            continue
        # One baseline run serves every flow: the ratios are side by side.
        if not args.no_baseline:
            baseline_idata = result.idatas[result.settings["baseline_kernel"].upper()]
        # The figures first: writing files or plots can fail, the table must not be lost.
        print(result.report(), flush=True)
        if args.out is not None:
            out = args.out if len(flows) == 1 else os.path.join(args.out, result.settings["flow"])
            write_outputs(result, out)
            print(f"wrote {len(result.files)} files to {out} (listed in its results.json)"
                  + _others_note(out, result.files), flush=True)
    if failed:
        print(f"neutra-flows: run failed for flow(s) {failed}", file=sys.stderr)
        return 1
    return 0


def _others_note(out: str, files: Sequence[str]) -> str:
    """Names the files in ``out`` that this run did not write (a user's own, other flows' folders)."""
    others = sorted(set(os.listdir(out)) - {os.path.basename(f) for f in files})
    return f"; also there, not from this run: {', '.join(others)}" if others else ""


def _out_subfolders(args: argparse.Namespace) -> list[str]:
    """The folders a run writes under ``--out``: one per flow of a sweep, one per suite model."""
    if args.command == "suite":
        return _suite_models(args)
    flows = getattr(args, "flow", None)
    return list(dict.fromkeys(flows)) if flows and len(set(flows)) > 1 else []


def _suite_models(args: argparse.Namespace) -> list[str]:
    """``--models``, else the gym's (``--gym``, ``--gym-large``), else the posteriordb suite's."""
    from neutra_flows.app.suite import GYM_SUITE_MODELS, SUITE_MODELS
    from neutra_flows.models.gym import GYM_LARGE_MODELS

    if args.models:
        return list(args.models)
    if args.gym or args.gym_large:
        return list(GYM_SUITE_MODELS) + (list(GYM_LARGE_MODELS) if args.gym_large else [])
    return list(SUITE_MODELS)


def _run_suite(args: argparse.Namespace) -> int:
    from neutra_flows.app.suite import run_suite, suite_table_markdown

    protocol = {"adapt": True} if args.adapt else {}
    if args.kernel is not None:
        protocol["kernel"] = args.kernel
    if args.target_accept is not None:
        protocol["target_accept_prob"] = args.target_accept
    rows = run_suite(_suite_models(args), out=args.out, seed=args.seed, **protocol,
                     log=None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True)))
    print(suite_table_markdown(rows), flush=True)
    print(f"wrote suite.md, suite.json and suite_ess_per_grad.png to {args.out}", flush=True)
    return 1 if any(r.get("error") for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Warnings (divergences, k-hat) are for the user: one line each, no source
    # excerpt; catch_warnings restores the hook for callers of main().
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *_a, **_k: print(
            f"neutra-flows: warning: {message}", file=sys.stderr)
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "list":
            from neutra_flows.app.bench import BENCHMARKS
            from neutra_flows.flows import FLOW_NAMES
            from neutra_flows.models.gym import GYM_MODELS

            # The built-ins and posteriordb first, then inference_gym's (the optional extra).
            for name, spec in sorted(BENCHMARKS.items(), key=lambda item: (item[0] in GYM_MODELS, item[0])):
                print(f"{name:26s} {spec.description}")
            print("flows: " + ", ".join(FLOW_NAMES))
            return 0
        if args.out is not None:
            check_out_folder(args.out, _out_subfolders(args))
        if args.command == "bench":
            return _run(args, args.target)
        if args.command == "suite":
            return _run_suite(args)
        return _run(args, load_user_model(args.model))
    except (ValueError, FileNotFoundError) as err:
        print(f"neutra-flows: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neutra-flows: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"neutra-flows: run failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

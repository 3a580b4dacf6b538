"""The neutra-flows command and the benchmark pipeline behind it."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from neutra_flows.app import cli
from neutra_flows.app.bench import BENCHMARKS, Goal

TINY = ["--train-steps", "60", "--batch-size", "64", "--chains", "2", "--warmup", "60",
        "--samples", "60", "--hidden", "8", "--layers", "2", "--quiet"]


def test_list_names_every_target_and_flow(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in BENCHMARKS:
        assert name in out
    assert "iaf" in out and "affine_tril" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "no-such-target"],
        ["bench", "banana", "--chains", "0"],
        ["bench", "banana", "--flow", "no-such-flow"],
        ["bench", "banana", "--samples", "many"],
        ["bench", "banana", "--target-accept", "1.5"],
        ["suite", "--out", "x", "--target-accept", "0"],
        [],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_model_spec_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["sample", str(tmp_path / "missing.py:model"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neutra-flows: error:") and "not found" in err and "\n" not in err
    model = tmp_path / "m.py"
    model.write_text("def model():\n    return 3\n")
    assert cli.main(["sample", f"{model}:model", "--quiet"]) == 2
    assert "expected a neutra_flows.Target" in capsys.readouterr().err
    assert cli.main(["sample", f"{model}:other", "--quiet"]) == 2
    assert "no function 'other'" in capsys.readouterr().err


def test_goal_checks():
    neutra = {"ess_per_grad": 0.3, "ess_per_second_total": 5.0, "divergences": 0,
              "max_abs_error_mcse": 2.0, "min_std_ratio": 0.95, "max_std_ratio": 1.04,
              "max_rhat": 1.002}
    base = {"ess_per_grad": 1e-4, "ess_per_second_total": 1.0}
    assert Goal("ess_per_grad", 0.2).check(neutra, base) is True
    assert Goal("ess_per_grad", 0.5).check(neutra, base) is False
    assert Goal("ratio", 1000).check(neutra, base) is True
    assert Goal("ratio", 10000).check(neutra, base) is False
    assert Goal("ratio_total_time", 1).check(neutra, base) is True
    assert Goal("divergences", 0).check({**neutra, "divergences": 3}, base) is False
    assert Goal("bias", 4).check({**neutra, "max_abs_error_mcse": 4.5}, base) is False
    assert Goal("std", 0.1).check({**neutra, "min_std_ratio": 0.85}, base) is False
    assert Goal("rhat", 1.01).check(neutra, base) is True
    # A figure that was not measured is reported as not measurable, not as met.
    assert Goal("bias", 4).check({"max_abs_error_mcse": float("nan")}, base) is None
    assert Goal("ratio", 10).check(neutra, None) is None


def test_bench_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["bench", "banana", *TINY, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "NUTS" in printed and "ess_per_grad" in printed
    assert "MET" in printed or "MISSED" in printed
    names = set(os.listdir(out))
    assert {"results.json", "flow", "draws.png", "trace.png", "ess_per_grad.png", "loss.png"} <= names
    assert sum(name.endswith(".nc") for name in names) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["num_chains"] == 2 and results["settings"]["flow"] == "iaf"
    assert set(results["table"]) == {"NeuTra-IAF-HMC", "NUTS"}
    row = results["table"]["NeuTra-IAF-HMC"]
    assert row["grad_evals"] > 0 and row["min_ess_bulk"] > 0
    assert results["versions"]["tensorflow"] and results["machine"]["cpu_count"] >= 1
    assert [g["goal"] for g in results["goals"]] == [g.describe() for g in BENCHMARKS["banana"].goals]
    # The saved flow is the trained one.
    import arviz as az

    import neutra_flows as nf

    flow = nf.load_flow(out / "flow")
    u = np.linspace(-2, 2, 10, dtype=np.float32).reshape(5, 2)
    assert not np.allclose(flow.forward(u).numpy(), u)
    idata = az.from_netcdf(out / "NUTS.nc")
    assert idata.posterior["x"].shape == (2, 60, 2)


def test_bench_sweeps_flows_against_one_baseline_run(tmp_path, capsys):
    out = tmp_path / "sweep"
    # affine_diag takes no --layers/--hidden: it fails alone, the others still run.
    code = cli.main(["bench", "banana", "--flow", "iaf", "--flow", "affine_diag", "--flow", "maf", *TINY,
                     "--flow-option", "output_affine=true", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "flow affine_diag failed" in err and "unknown option" in err
    assert sorted(os.listdir(out)) == ["iaf", "maf"]
    import arviz as az

    from neutra_flows.app.bench import run_benchmark

    runs = {flow: json.loads((out / flow / "results.json").read_text()) for flow in ("iaf", "maf")}
    assert runs["maf"]["settings"]["flow_options"]["output_affine"] is True
    # Both flows are compared with the very same NUTS run.
    assert runs["iaf"]["table"]["NUTS"] == runs["maf"]["table"]["NUTS"]
    nuts = az.from_netcdf(out / "iaf" / "NUTS.nc")
    np.testing.assert_array_equal(nuts.posterior["x"], az.from_netcdf(out / "maf" / "NUTS.nc").posterior["x"])
    # A baseline from another protocol is refused before any training.
    with pytest.raises(ValueError, match="baseline_idata was run with"):
        run_benchmark("banana", num_chains=2, num_warmup=60, num_samples=30, baseline_idata=nuts, log=None)


def test_target_accept_reaches_both_samplers_and_a_baseline_at_another_is_refused(capsys):
    from neutra_flows.app.bench import run_benchmark

    tiny = dict(train_steps=30, batch_size=32, num_chains=2, num_warmup=40, num_samples=20,
                flow_options={"hidden_units": [8, 8], "num_layers": 2}, progress=False, log=None)
    result = run_benchmark("banana", target_accept_prob=0.95, **tiny)
    assert result.settings["target_accept_prob"] == 0.95
    assert [idata.posterior.attrs["target_accept_prob"] for idata in result.idatas.values()] == [0.95, 0.95]
    # Without it the run is at sample's default, so a baseline run at 0.95 is not reused.
    nuts = result.idatas["NUTS"]
    with pytest.raises(ValueError, match=r"needs \{.*'target_accept_prob': 0\.8"):
        run_benchmark("banana", baseline_idata=nuts, **tiny)
    # A bad value fails before any training.
    with pytest.raises(ValueError, match="target_accept_prob must lie in"):
        run_benchmark("banana", target_accept_prob=1.0, **tiny)


@pytest.mark.parametrize("item", ["output_affine", "=3"])
def test_bad_flow_option_is_a_clear_error(item, capsys):
    assert cli.main(["bench", "banana", "--flow-option", item, "--quiet"]) == 2
    assert "--flow-option expects KEY=VALUE" in capsys.readouterr().err


def test_sample_command_runs_a_user_joint_distribution(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text(textwrap.dedent("""
        import tensorflow_probability as tfp
        tfd = tfp.distributions

        def model():
            jd = tfd.JointDistributionNamed(dict(
                loc=tfd.Normal(0.0, 1.0),
                scale=tfd.HalfNormal(1.0),
                y=lambda loc, scale: tfd.Sample(tfd.Normal(loc, scale), 5),
            ))
            return jd.experimental_pin(y=[0.1, -0.3, 0.5, 0.2, 0.0])
    """))
    code = cli.main(["sample", f"{model}:model", *TINY, "--no-baseline"])
    assert code == 0, capsys.readouterr().err
    assert "NeuTra" in capsys.readouterr().out


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "neutra_flows", "list"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "funnel" in proc.stdout


def test_suite_unknown_model_is_a_usage_error(capsys):
    from neutra_flows.app.cli import main

    with pytest.raises(SystemExit) as err:
        main(["suite", "--models", "no-such-model", "--out", "x"])
    assert err.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_run_suite_writes_one_table_figure_and_rows(tmp_path):
    from neutra_flows.app.suite import run_suite

    with pytest.raises(ValueError, match="unknown suite model"):
        run_suite(["nope"])
    rows = run_suite(["kidiq-kidscore_interaction"], out=tmp_path, log=None, train_steps=30, batch_size=16,
                     num_warmup=60, num_samples=40, num_chains=2)
    (row,) = rows
    assert "error" not in row, row
    for key in ("neutra_ess_per_grad", "nuts_ess_per_grad", "ratio", "neutra_ess_per_grad_total",
                "ratio_is_lower_bound", "neutra_correct", "goals"):
        assert key in row
    assert row["neutra_ess_per_grad_total"] < row["neutra_ess_per_grad"]  # training is counted
    for name in ("suite.md", "suite.json", "suite_ess_per_grad.png", "kidiq-kidscore_interaction/results.json"):
        assert (tmp_path / name).exists(), name
    assert "kidiq-kidscore_interaction" in (tmp_path / "suite.md").read_text()


def test_suite_checks_out_before_any_work(tmp_path, capsys):
    from neutra_flows.app.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert main(["suite", "--models", "kidiq-kidscore_interaction", "--out", str(blocker)]) == 2
    assert "--out" in capsys.readouterr().err
    assert blocker.read_text() == "mine"


def _quick_bench_result(labels, seed=0):
    """A BenchResult as run_benchmark returns it, without training or sampling (write_outputs' input)."""
    import arviz as az

    from neutra_flows import compare, make_flow, models
    from neutra_flows.app.bench import BenchResult

    rng = np.random.default_rng(seed)
    idatas = {label: az.from_dict(posterior={"x": rng.normal(size=(2, 30, 2))}) for label in labels}
    return BenchResult(table=compare(idatas), goals=[("a goal", None)], fit=None, idatas=idatas,
                       settings={"flow": "identity", "seed": seed}, target=models.banana(2),
                       flow=make_flow("identity", 2))


def test_a_rerun_into_the_same_out_replaces_the_previous_run_and_keeps_the_users_files(tmp_path):
    from neutra_flows.app.bench import write_outputs

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = write_outputs(_quick_bench_result(["NeuTra-IAF-HMC", "NUTS"]), out)
    assert (out / "NUTS.nc").exists() and str(out / "NUTS.nc") in first
    listed = json.loads((out / "results.json").read_text())["files"]
    assert {"results.json", "flow", "NUTS.nc", "NeuTra-IAF-HMC.nc"} <= set(listed) and "notes.txt" not in listed
    # The same folder again, without a baseline: its NUTS.nc would pass for this run's.
    second = write_outputs(_quick_bench_result(["NeuTra-IAF-HMC"], seed=1), out)
    names = set(os.listdir(out))
    assert "NUTS.nc" not in names and (out / "notes.txt").read_text() == "mine"
    assert names == set(json.loads((out / "results.json").read_text())["files"]) | {"notes.txt"}
    assert {os.path.basename(p) for p in second} == names - {"notes.txt"}
    assert json.loads((out / "results.json").read_text())["settings"]["seed"] == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary folder left


def test_an_interrupted_write_leaves_the_previous_run_untouched(tmp_path, monkeypatch):
    from neutra_flows.app import bench

    out = tmp_path / "run"
    bench.write_outputs(_quick_bench_result(["NeuTra-IAF-HMC", "NUTS"]), out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "save_flow", interrupted)  # after the plots and netCDF were written
    with pytest.raises(KeyboardInterrupt):
        bench.write_outputs(_quick_bench_result(["NeuTra-IAF-HMC"], seed=1), out)
    assert {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()} == before
    assert os.listdir(tmp_path) == ["run"]


_START_UP_NOISE = ("absl", "cudart", "cuInit", "TensorFloat-32", "ArviZ is undergoing")


def test_the_command_starts_without_tensorflow_chatter(tmp_path):
    # As the console script runs it (argv[0] is the script), with everything that used to speak first:
    # TensorFlow's libraries loading, its devices, tfp.mcmc (TF32) and arviz (daily, with a fresh cache).
    script = ("import sys; sys.argv[0] = '/usr/bin/neutra-flows'\n"
              "import neutra_flows, arviz, tensorflow as tf\n"
              "tf.config.list_physical_devices('GPU')\n"
              "from neutra_flows.app.cli import main\n"
              "sys.exit(main(['list']))\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("arK-arK") and "funnel" in proc.stdout
    assert [word for word in _START_UP_NOISE if word in proc.stderr] == [], proc.stderr


@pytest.mark.parametrize(
    "argv0, orig_argv, expected",
    [("/usr/local/bin/neutra-flows", ["python", "/usr/local/bin/neutra-flows", "list"], True),
     ("-m", ["python", "-m", "neutra_flows", "list"], True),
     ("-m", ["python", "-X", "importtime", "-m", "neutra_flows.app.cli", "list"], True),
     ("-m", ["python", "-m", "pytest", "-q"], False),
     ("-c", ["python", "-c", "import neutra_flows"], False),
     ("train.py", ["python", "train.py"], False)],
    ids=["console_script", "module", "module_cli", "pytest", "dash_c", "user_script"])
def test_only_the_command_is_quieted(argv0, orig_argv, expected, monkeypatch):
    from neutra_flows import _quiet

    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert _quiet.is_command() is expected
    if not expected:
        # A library import leaves the user's environment and warning filters as they were.
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
        filters = list(warnings.filters)
        _quiet.quiet_command_start()
        assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ and warnings.filters == filters


def test_suite_kernel_and_gym_reach_run_suite(monkeypatch, tmp_path):
    import neutra_flows.app.suite as suite_module
    from neutra_flows.app.cli import main

    seen = {}

    def fake_run_suite(models, **kwargs):
        seen.update(models=list(models), **kwargs)
        return []

    monkeypatch.setattr(suite_module, "run_suite", fake_run_suite)
    assert main(["suite", "--adapt", "--kernel", "nuts", "--gym", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert seen["kernel"] == "nuts" and seen["adapt"] is True
    assert seen["models"] == list(suite_module.GYM_SUITE_MODELS)

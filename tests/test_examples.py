"""The example scripts run end to end, use only the public API, and docs/api.md is fresh.

Also: the library imports nothing of the application (``neutra_flows.app``),
nor pandas or matplotlib, when it is imported.

Each example runs in a subprocess with ``--fast --out tmp_path`` (tiny settings,
no XLA compilation) and must exit 0, print its key lines and write its
pictures. Two of them run in the default suite; the two whose fast mode still
compiles the benchmark pipeline or a 51-D NUTS run are marked slow.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> (pictures it must write, lines it must print)
EXPECTED = {
    "flow_vi_posterior.py": (
        ["vi_loss.png", "vi_posterior.png"],
        ["PSIS k-hat", "PSIS-reweighted", "NeuTra draws", "max |mean - truth| / MCSE"],
    ),
    "density_estimation.py": (
        ["two_moons_density.png"],
        ["fit_to_data:", "held-out", "gaussian", "best flow on the test set"],
    ),
    "precondition_hmc.py": (
        [
            "german_credit_loss.png",
            "german_credit_trace_neutra.png",
            "german_credit_trace_nuts.png",
            "german_credit_draws.png",
            "german_credit_ess_per_grad.png",
        ],
        ["PSIS k-hat", "az.summary of NeuTra-IAF-HMC", "az.summary of NUTS", "ess_per_grad",
         "NeuTra / NUTS min bulk-ESS per gradient"],
    ),
    "funnel_banana.py": (
        [f"{t}_{kind}" for t in ("funnel", "banana")
         for kind in ("draws.png", "trace.png", "ess_per_grad.png", "loss.png", "pulled_back.png",
                      "table.csv")],
        ["=== funnel ===", "=== banana ===", "ess_per_grad", "NeuTra"],
    ),
}

SLOW = {"precondition_hmc.py", "funnel_banana.py"}


def _run_example(script: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--fast", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )


@pytest.mark.parametrize(
    "script",
    [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in EXPECTED],
)
def test_example_runs_and_writes_its_pictures(script, tmp_path):
    out = tmp_path / "out"
    proc = _run_example(script, out)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    pictures, lines = EXPECTED[script]
    for name in pictures:
        path = out / name
        assert path.is_file(), f"{script} did not write {name}; wrote {sorted(os.listdir(out))}"
        if name.endswith(".png"):
            assert path.stat().st_size > 1000, f"{name} is suspiciously small"
        else:
            assert len(path.read_text().splitlines()) >= 3, f"{name} has no table rows"
    for line in lines:
        assert line in proc.stdout, f"{script} did not print {line!r}:\n{proc.stdout[-3000:]}"


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


# Public modules an example may import from, besides `import neutra_flows as nf`.
_PUBLIC_MODULES = {"neutra_flows", "neutra_flows.plots", "neutra_flows.app.bench", "neutra_flows.targets"}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_uses_only_the_public_api(script):
    source = (EXAMPLES / script).read_text()
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    assert doc and "--fast" in doc and f"python examples/{script}" in doc, (
        f"{script}: the module docstring must say how to run it (with --fast)"
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("neutra_flows"):
                    assert alias.name in _PUBLIC_MODULES, f"{script} imports {alias.name}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("neutra_flows"):
            assert node.module in _PUBLIC_MODULES, f"{script} imports from {node.module}"
            module = importlib.import_module(node.module)
            for alias in node.names:
                public = set(getattr(module, "__all__", ()))
                assert alias.name in public, f"{script} imports the non-public {node.module}.{alias.name}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nf":
            assert not node.attr.startswith("_") or node.attr == "__version__", f"{script} uses nf.{node.attr}"


# -- the library below the application ----------------------------------------------------

_HEAVY = ("pandas", "matplotlib")


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Modules a file imports when it is imported: not inside functions nor under ``TYPE_CHECKING``."""
    names: list[str] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                     *(h for handler in getattr(node, "handlers", []) for h in handler.body)]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize(
    "path",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "neutra_flows").rglob("*.py")
           if "app" not in p.relative_to(ROOT / "neutra_flows").parts and p.name != "__main__.py"),
)
def test_library_module_imports_no_application_pandas_or_matplotlib(path):
    # Whatever TensorFlow happens to import, our own modules must not pull these in
    # at import time: the application composes the library, never the reverse.
    for name in _module_level_imports(ast.parse((ROOT / path).read_text())):
        assert not name.startswith("neutra_flows.app"), f"{path} imports {name}"
        assert name.split(".")[0] not in _HEAVY, f"{path} imports {name} at module level"


def test_import_neutra_flows_loads_no_application_and_adds_no_pandas_or_matplotlib():
    # TensorFlow (through Keras) may itself import pandas and matplotlib: what
    # counts is what importing neutra_flows adds on top of its dependencies.
    code = (
        "import json, sys\n"
        "import tensorflow, tensorflow_probability, tf_keras\n"
        "before = set(sys.modules)\n"
        "import neutra_flows\n"
        "print(json.dumps({'file': neutra_flows.__file__, 'added': sorted(set(sys.modules) - before)}))\n"
    )
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve() == ROOT / "neutra_flows" / "__init__.py"
    added = report["added"]
    assert "neutra_flows.flows" in added and "neutra_flows.mcmc" in added  # the library did load
    assert not [m for m in added if m.startswith("neutra_flows.app")]
    assert not [m for m in added if m.split(".")[0] in _HEAVY]


def _load_gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_up_to_date():
    gen_api = _load_gen_api()
    committed = (ROOT / "docs" / "api.md").read_text()
    assert gen_api.render() == committed, (
        "docs/api.md is stale: a public signature or docstring changed. Run `python docs/gen_api.py`."
    )


def test_docstring_to_markdown_sections_and_code():
    gen_api = _load_gen_api()
    doc = (
        "Summary with :func:`make_flow` and ``code``.\n\nArgs:\n  x: the input,\n"
        "    over two lines.\n  a, b: a pair.\n\nReturns:\n  The result.\n\n"
        "Example:\n\n>>> 1 + 1\n2\n\nA formula::\n\n    y = f(x)\n\nReferences\n----------\n* A paper."
    )
    md = gen_api.docstring_to_markdown(doc)
    assert "Summary with `make_flow` and `code`." in md
    assert "**Args:**" in md and "- `x`: the input,\n  over two lines." in md
    assert "- `a`, `b`: a pair." in md
    assert "**Returns:**" in md and "\nThe result." in md
    assert "```python\n>>> 1 + 1\n2\n```" in md
    assert "A formula:\n\n```text\ny = f(x)\n```" in md
    assert "**References**" in md and "* A paper." in md


def test_german_credit_example_model_loads_from_the_command_line():
    from neutra_flows.app import cli

    target = cli.load_user_model(f"{EXAMPLES / 'precondition_hmc.py'}:model")
    assert target.event_size == 51
    assert np.isfinite(target.unnormalized_log_prob(np.zeros([2, 51], np.float32)).numpy()).all()

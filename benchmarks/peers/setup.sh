#!/usr/bin/env bash
# Creates the peers' virtual environment (nutpie + PyMC, NumPyro + JAX) for the
# benchmark in benchmarks/peers/. It is for benchmarks only: none of these
# packages is a dependency of neutra_flows, and nothing from them is imported by it.
#
#   bash benchmarks/peers/setup.sh            # -> .venv-peers in the repo root
#   PEERS_VENV=/some/where bash benchmarks/peers/setup.sh
#   PEERS_UNPINNED=1 bash benchmarks/peers/setup.sh   # newest releases instead of the pins
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${PEERS_VENV:-$root/.venv-peers}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip wheel >/dev/null
if [ "${PEERS_UNPINNED:-0}" = "1" ]; then
  # What the issue names, plus what nutpie's flow adaptation needs (its `nnflow`
  # extra: flowjax, equinox) and the PyMC -> JAX backend (`pymc-jax` extra).
  "$venv/bin/python" -m pip install "nutpie[pymc-jax,nnflow]" pymc numpyro jax jaxlib flowjax equinox \
    arviz h5netcdf
else
  "$venv/bin/python" -m pip install -r "$here/requirements.txt"
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for p in ("nutpie", "pymc", "pytensor", "numpyro", "jax", "jaxlib", "flowjax", "equinox", "arviz", "numpy"):
    print(f"{p}=={md.version(p)}")
PY
echo "peers venv ready: $venv"

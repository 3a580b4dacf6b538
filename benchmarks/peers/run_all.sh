#!/usr/bin/env bash
# The peers benchmark in one command: neutra_flows against nutpie's flow adaptation
# and NumPyro's NeuTraReparam on the same targets, one table.
#
#   bash benchmarks/peers/run_all.sh                    # the six targets of the committed table
#   bash benchmarks/peers/run_all.sh funnel-10 banana   # some targets
#   PEERS_METHODS="ours-adapt ours-nuts nutpie-nuts" bash benchmarks/peers/run_all.sh posteriordb
#                                                       # the ten posteriordb models, three methods
#
# Creates the peers' venv first if it is missing (benchmarks/peers/setup.sh),
# then, target by target in priority order (funnel-10, banana, eight-schools,
# funnel-100, kidiq, earnings): ours (fit, adapt, NUTS), NumPyro NeuTra, nutpie
# NUTS, nutpie flow; one run per process, one after the other. Finally
# table.py writes benchmarks/peers/results/peers.{md,json} and
# docs/img/peers_ess_per_grad_total.png.
#
# Environment:
#   PYTHON            the Python with neutra_flows (default: python)
#   NEUTRA_FLOWS_SRC  where neutra_flows is imported from (default: this checkout)
#   PEERS_VENV        the peers' venv (default: .venv-peers in the repo root)
#   PEERS_TIMEOUT     seconds allowed per run (default 5400); a run killed by it is
#                     recorded as failed, and the sweep goes on
#   PEERS_SKIP_DONE=1 keep runs already recorded as ok (resume an interrupted sweep)
#   PEERS_METHODS     the methods to run (default: all six: ours-fit ours-adapt ours-nuts
#                     numpyro-neutra nutpie-nuts nutpie-flow); when set, the closing
#                     table.py keeps the committed table's rows not run again
#                     (--keep-previous, marked ‡)
#   PEERS_ADAPT_KERNEL  ours-adapt's kernel (run_ours.py --adapt-kernel; default: sample's own)
# Targets: short names (common.TARGETS), BENCHMARKS names (arK-arK, ...) or the groups
# posteriordb (the ten posteriordb models) and all.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${PEERS_VENV:-$root/.venv-peers}"
py="${PYTHON:-python}"
src="${NEUTRA_FLOWS_SRC:-$root}"
limit="${PEERS_TIMEOUT:-5400}"
runs="${PEERS_RUNS:-$here/runs}"

if [ ! -x "$venv/bin/python" ]; then
  bash "$here/setup.sh" || { echo "setup of the peers venv failed" >&2; exit 1; }
fi
# The short names the arguments stand for (common.py resolves groups and long names).
read -r -a targets <<< "$("$py" "$here/common.py" targets "$@")" || exit 1
[ "${#targets[@]}" -gt 0 ] || exit 1
methods=" ${PEERS_METHODS:-ours-fit ours-adapt ours-nuts numpyro-neutra nutpie-nuts nutpie-flow} "
wanted() { [[ "$methods" == *" $1 "* ]]; }

done_ok() {  # target method -> 0 if PEERS_SKIP_DONE=1 and the run is recorded ok
  [ "${PEERS_SKIP_DONE:-0}" = "1" ] || return 1
  local f="$runs/$1/$2.json"
  [ -f "$f" ] && grep -q '"status": "ok"' "$f"
}

run() {  # target method side command...
  local target="$1" method="$2" side="$3"; shift 3
  wanted "$method" || return 0
  if done_ok "$target" "$method"; then echo "== $target / $method: kept"; return; fi
  echo "== $target / $method ($(date +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
  if [ "$side" = ours ]; then
    PYTHONPATH="$src" timeout "$limit" "$py" "$@"
  else
    env -u PYTHONPATH timeout "$limit" "$venv/bin/python" "$@"
  fi
  local rc=$?
  if [ $rc -eq 124 ]; then
    "$py" "$here/common.py" timeout "$target" "$method" "$limit"
  elif [ $rc -ne 0 ]; then
    echo "   (exit code $rc; the runner records its own failures)" >&2
  fi
}

if [[ " ${targets[*]} " == *" eight-schools "* ]] && [ ! -f "$here/results/eight_schools_reference.json" ]; then
  echo "== eight-schools reference (long non-centred nutpie run)"
  env -u PYTHONPATH "$venv/bin/python" "$here/reference_eight_schools.py"
fi

for t in "${targets[@]}"; do
  for m in ours-fit ours-adapt ours-nuts; do
    run "$t" "$m" ours "$here/run_ours.py" "$t" --methods "$m"
  done
  run "$t" numpyro-neutra peers "$here/run_numpyro.py" "$t"
  for m in nutpie-nuts nutpie-flow; do
    run "$t" "$m" peers "$here/run_nutpie.py" "$t" --methods "$m"
  done
done

# A sweep of some methods only (PEERS_METHODS) keeps the committed table's other rows (‡)
# (not for a quick run or another seed: their tables have no committed predecessor).
table_args=()
if [ -n "${PEERS_METHODS:-}" ] && [ "${PEERS_QUICK:-0}" != 1 ] && [ "${PEERS_SEED:-0}" = 0 ]; then
  table_args=(--keep-previous)
fi
PYTHONPATH="$src" "$py" "$here/table.py" "${table_args[@]}"

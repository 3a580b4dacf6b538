#!/usr/bin/env bash
# The runs behind docs/benchmarks.md. Each writes bench_out/<target>-<flow>/results.json;
# benchmarks/make_tables.py turns them into the Markdown tables.
#   bash benchmarks/run_all.sh            # headline table (issue 5 targets)
# Every flow on funnel, banana and german-credit: benchmarks/run_flows.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
run() { # target flow [extra args...]
  local target=$1 flow=$2; shift 2
  neutra-flows bench "$target" --flow "$flow" --quiet --out "$OUT/$target-$flow" "$@" \
    | tee "$OUT/$target-$flow.txt"
}
mkdir -p "$OUT"
run funnel iaf
run banana iaf
run eight-schools iaf
run german-credit iaf
run funnel-100 iaf
run ill-conditioned-gaussian affine_tril
python benchmarks/make_tables.py "$OUT"

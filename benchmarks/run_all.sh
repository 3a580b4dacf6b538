#!/usr/bin/env bash
# The runs behind docs/benchmarks.md. Each writes bench_out/<target>-<flow>/results.json;
# benchmarks/make_tables.py turns them into the Markdown tables.
#   bash benchmarks/run_all.sh            # headline table (issue 5 targets)
#   bash benchmarks/run_all.sh flows      # every flow on funnel, banana, german-credit
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
run() { # target flow [extra args...]
  local target=$1 flow=$2; shift 2
  neutra-flows bench "$target" --flow "$flow" --quiet --out "$OUT/$target-$flow" "$@" \
    | tee "$OUT/$target-$flow.txt"
}
mkdir -p "$OUT"
if [[ "${1:-main}" == "main" ]]; then
  run funnel iaf
  run banana iaf
  run eight-schools iaf
  run german-credit iaf
  run funnel-100 iaf
  run ill-conditioned-gaussian affine_tril
else
  # A shorter protocol per flow (stated in docs/benchmarks.md): 4 chains, 500 + 500.
  for flow in iaf maf realnvp nsf nsf_ar affine_diag affine_tril naf bnaf sylvester lu_linear residual; do
    for target in funnel banana german-credit; do
      run "$target" "$flow" --warmup 500 --samples 500 || echo "FAILED $target $flow"
    done
  done
fi
python benchmarks/make_tables.py "$OUT"

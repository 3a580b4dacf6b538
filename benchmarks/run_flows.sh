#!/usr/bin/env bash
# Every flow through the same pipeline on funnel, banana and german-credit, on a
# shorter protocol than the headline table (stated in docs/benchmarks.md):
# 1000 training steps x 256 draws, 4 chains, 500 + 500. One `neutra-flows bench`
# per target, so every flow is compared with the same NUTS run.
#   bash benchmarks/run_flows.sh [OUT] [flows...]
#   TARGETS="banana funnel" bash benchmarks/run_flows.sh bench_flows   # a subset of targets
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_flows}; shift || true
FLOWS=${*:-"iaf maf realnvp nsf nsf_ar affine_diag affine_tril lu_linear sylvester bnaf residual naf"}
TARGETS=${TARGETS:-"banana funnel german-credit"}
mkdir -p "$OUT"
for target in $TARGETS; do
  args=() out="$OUT/$target" log="$OUT/$target.txt"
  for flow in $FLOWS; do args+=(--flow "$flow"); done
  # One flow writes straight into --out; keep the OUT/<target>/<flow> layout.
  if [[ ${#args[@]} -eq 2 ]]; then out="$OUT/$target/$FLOWS" log="$OUT/$target-$FLOWS.txt"; fi
  neutra-flows bench "$target" "${args[@]}" --train-steps 1000 --batch-size 256 --chains 4 \
    --warmup 500 --samples 500 --quiet --out "$out" > "$log" 2>&1 \
    || echo "FAILED (see $log) $target"
done
python benchmarks/make_tables.py "$OUT"

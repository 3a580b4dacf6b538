#!/usr/bin/env bash
# Every flow through the same pipeline, on a shorter protocol than the headline
# table (stated in docs/benchmarks.md): 1000 training steps, 4 chains, 500 + 500.
#   bash benchmarks/run_flows.sh [OUT] [flows...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_flows}; shift || true
FLOWS=${*:-"naf bnaf sylvester lu_linear residual iaf maf realnvp nsf nsf_ar affine_diag affine_tril"}
mkdir -p "$OUT"
for target in banana funnel german-credit; do
  for flow in $FLOWS; do
    neutra-flows bench "$target" --flow "$flow" --train-steps 1000 --warmup 500 --samples 500 \
      --quiet --out "$OUT/$target-$flow" > "$OUT/$target-$flow.txt" 2>&1 || echo "FAILED $target $flow"
  done
done
python benchmarks/make_tables.py "$OUT"

#!/bin/bash
# The robustness table: MNIST label shift (offline), FedAvg and FLoRAL 1 %, attacks x defenses, 1 seed (seed 0),
# reduced to 100 rounds by default (the task schedule is 1500) so the grid fits a 2-core CPU.
# Usage: bash experiments/results/robustness/run_grid.sh [OUTDIR]; then summarize.py OUTDIR.
set -u
OUT=${1:-/tmp/robust_runs}
ROUNDS=${ROUNDS:-100}  # 100 is too short for MNIST label shift (clean FedAvg 18 %); use 500+ for the table
HERE=$(dirname "$0")
mkdir -p "$OUT"
run() {  # name, extra flags...
  local name=$1; shift
  [ -f "$OUT/$name/results.json" ] && grep -q '"status": "done"' "$OUT/$name/results.json" && return
  rm -rf "$OUT/$name"
  timeout 1200 python -m fedjax_adapters.experiments.floral --task mnist_offline_label_shift \
      --methods fedavg floral_1 --rounds "$ROUNDS" --eval-every "$ROUNDS" --seeds 1 --quiet --out "$OUT/$name" "$@" \
      > "$OUT/$name.log" 2>&1
}
for agg in mean median krum:3 trimmed_mean:0.3; do
  a=${agg/:/_}
  run "none-$a" $( [ "$agg" = mean ] || echo --aggregator "$agg" )
  for attack in sign_flip:10 alie; do
    for frac in 0.1 0.3; do
      run "${attack/:/_}-$frac-$a" --attack "$attack" --attack-fraction "$frac" \
          $( [ "$agg" = mean ] || echo --aggregator "$agg" )
    done
  done
done
python "$HERE/summarize.py" "$OUT" > "$HERE/table.md"

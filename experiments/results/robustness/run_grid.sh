#!/bin/bash
# The robustness table: MNIST label shift (offline), FedAvg and FLoRAL 1 %, each attack x each defense at attacker
# fractions 0 / 10 % / 30 %, the task's full 1500 rounds. 30 clients per round; Krum and Bulyan are told the expected
# number of attackers per round (3 at 10 %, 9 at 30 %).
# Usage: bash experiments/results/robustness/run_grid.sh [OUTDIR]; then summarize.py OUTDIR > table.md.
# ROUNDS (default 1500) and SEEDS (default 1) override the schedule; DEFENSES, ATTACKS and FRACS pick a part of the
# grid; TASK (default mnist_offline_label_shift) runs another task, e.g. mnist_offline_label_shift_minority (clusters
# of 120, 90, 60 and 30 clients); a finished cell is skipped on a rerun.
set -u
OUT=${1:-/tmp/robust_runs}
ROUNDS=${ROUNDS:-1500}
SEEDS=${SEEDS:-1}
DEFENSES=${DEFENSES:-"mean median trimmed_mean:0.3 geomed:8 krum centered_clip:1.0 norm_bound:0.5"}
ATTACKS=${ATTACKS:-"sign_flip:10 gaussian:1.0 label_flip alie ipm:0.5"}
FRACS=${FRACS:-"0.1 0.3"}
TASK=${TASK:-mnist_offline_label_shift}
HERE=$(dirname "$0")
mkdir -p "$OUT"
run() {  # name, extra flags...
  local name=$1; shift
  [ -f "$OUT/$name/results.json" ] && grep -q '"status": "\(done\|failed\)"' "$OUT/$name/results.json" && return
  rm -rf "$OUT/$name"
  timeout 3600 python -m fedjax_adapters.experiments.floral --task "$TASK" \
      --methods fedavg floral_1 --rounds "$ROUNDS" --eval-every "$ROUNDS" --seeds "$SEEDS" --quiet --out "$OUT/$name" \
      "$@" > "$OUT/$name.log" 2>&1
}
defense_flags() {  # defense, attacker fraction
  case $1 in
    mean) ;;
    krum) echo --aggregator "krum:$( [ "$2" = 0.3 ] && echo 9 || echo 3 )" ;;
    *) echo --aggregator "$1" ;;
  esac
}
for def in $DEFENSES; do
  d=${def/:/_}
  run "none-0-$d" $(defense_flags "$def" 0.1)
  for attack in $ATTACKS; do
    for frac in $FRACS; do
      run "${attack/:/_}-$frac-$d" --attack "$attack" --attack-fraction "$frac" $(defense_flags "$def" "$frac")
    done
  done
done

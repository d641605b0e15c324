#!/bin/bash
# DP-FTRL (tree aggregation, cyclic participation: 10 rounds per tree) on the privacy table's setting: MNIST label
# shift (offline images, 300 clients, 30 per round) of the FLoRAL runner, 100 rounds instead of the task's 1500
# (CPU budget), one seed (seed 0), delta = 1/300, epsilon 3 (z calibrated by dp-accounting's tree event), the same
# clips as experiments/results/privacy (FedAvg 0.2, FLoRAL 2.0). For comparison at the same epsilon, DP-FedAvg with
# fixed-size random sampling (the Poisson cells are experiments/results/privacy/*-eps3.json).
set -e
cd "$(dirname "$0")/../../.."
OUT=${OUT:-/tmp/dp_ftrl_runs}
R=experiments/results/dp_ftrl
COMMON="--task mnist_offline_label_shift --rounds 100 --seeds 1 --eval-every 50 --quiet"
for pair in "fedavg 0.2" "floral_1_oracle 2.0"; do
  set -- $pair; m=$1; clip=$2
  python -m fedjax_adapters.experiments.floral $COMMON --methods $m --out $OUT/$m-tree-eps3 --json $R/$m-tree-eps3.json \
    --dp-clip $clip --dp-epsilon 3 --dp-mechanism tree --dp-sampling cyclic
  python -m fedjax_adapters.experiments.floral $COMMON --methods $m --out $OUT/$m-fixed-eps3 --json $R/$m-fixed-eps3.json \
    --dp-clip $clip --dp-epsilon 3 --dp-sampling fixed
done

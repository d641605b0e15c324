#!/bin/bash
# Privacy/utility table: MNIST label shift (offline images, 300 clients, 30 per round) of the FLoRAL runner,
# 100 rounds instead of the task's 1500 (CPU budget), one seed (seed 0; --seeds 1 is a count), Poisson sampling (rate 0.1), delta = 1/300.
# Clip per method at about the median update norm of a plain run's first 30 rounds (FedAvg ~0.14, FLoRAL ~2.4).
set -e
cd "$(dirname "$0")/../../.."
OUT=${OUT:-/tmp/privacy_runs}
R=experiments/results/privacy
COMMON="--task mnist_offline_label_shift --rounds 100 --seeds 1 --eval-every 50 --quiet"
for pair in "fedavg 0.2" "floral_1 2.0" "floral_1_oracle 2.0"; do
  set -- $pair; m=$1; clip=$2
  python -m fedjax_adapters.experiments.floral $COMMON --methods $m --out $OUT/$m-nodp --json $R/$m-nodp.json
  for eps in 1 3 8; do
    python -m fedjax_adapters.experiments.floral $COMMON --methods $m --out $OUT/$m-eps$eps --json $R/$m-eps$eps.json \
      --dp-clip $clip --dp-epsilon $eps --dp-sampling poisson
  done
done

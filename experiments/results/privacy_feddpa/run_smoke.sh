#!/bin/bash
# Plumbing only: the FedDPA smoke preset (tiny random LLaMA), FedIT and FedDPA-F, no DP and epsilon 1, 3, 8.
cd /work/wt/dpfeddpa && . /work/main/.venv/bin/activate && export PYTHONPATH=/work/wt/dpfeddpa
R=/work/wt/dpfeddpa/experiments/results/privacy_feddpa
D=/work/shared/data/feddpa/dataset1
for eps in none 1 3 8; do
  flags=""; [ $eps != none ] && flags="--dp-clip 0.5 --dp-epsilon $eps --dp-delta 1e-3"
  rm -rf /tmp/dpx/smoke_$eps
  python -m fedjax_adapters.experiments.feddpa --data $D --preset smoke --methods fedit feddpa_f --out /tmp/dpx/smoke_$eps \
     --json $R/smoke_eps_$eps.json --bootstrap-samples 200 --quiet $flags > $R/smoke_eps_$eps.log 2>&1
  cp /tmp/dpx/smoke_$eps/metrics.jsonl $R/smoke_eps_${eps}_metrics.jsonl
done

#!/bin/bash
# The mid preset (branch mid's config, SmolLM2-135M) on this branch's runner: FedIT and FedDPA-F, no DP and epsilon 8.
cd /tmp/dpx/midrun && . /work/main/.venv/bin/activate && export PYTHONPATH=/tmp/dpx/midrun
R=/work/wt/dpfeddpa/experiments/results/privacy_feddpa
D=/work/shared/data/feddpa/dataset1
for eps in 8 none; do
  flags=""; [ $eps != none ] && flags="--dp-clip 0.5 --dp-epsilon $eps --dp-delta 1e-3"
  rm -rf /tmp/dpx/mid_$eps
  python -m fedjax_adapters.experiments.feddpa --data $D --preset mid --methods fedit feddpa_f --out /tmp/dpx/mid_$eps \
     --json $R/mid_eps_$eps.json --bootstrap-samples 1000 $flags > $R/mid_eps_$eps.log 2>&1
  cp /tmp/dpx/mid_$eps/metrics.jsonl $R/mid_eps_${eps}_metrics.jsonl
done

"""Reads the run directories of run_grid.sh and prints the markdown table: test accuracy and the worst cluster's
accuracy (the mean over the clients of the cluster with the lowest mean) per method, attack and defense."""
import json
import os
import sys

import numpy as np


def final_eval(path):
  evals = {}
  with open(os.path.join(path, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'eval' in r:
        evals[r['method']] = r['eval']
  return evals


def main(out):
  rows = []
  for name in sorted(os.listdir(out)):
    path = os.path.join(out, name)
    if not os.path.isfile(os.path.join(path, 'results.json')):
      continue
    res = json.load(open(os.path.join(path, 'results.json')))
    clusters = np.asarray(res['data']['0']['clusters'])
    attack, frac, agg = name.split('-') if name.count('-') == 2 else (name.split('-')[0], '0', name.split('-')[1])
    for method, ev in final_eval(path).items():
      acc = np.asarray(ev['per_client']['accuracy'])
      cnt = np.asarray(ev['per_client']['count'])
      worst = min(np.sum(acc[clusters == c] * cnt[clusters == c]) / max(np.sum(cnt[clusters == c]), 1)
                  for c in np.unique(clusters))
      rows.append((method, attack, frac, agg, ev['test']['test_accuracy'], worst))
  print('| method | attack | attackers | defense | test accuracy | worst cluster |')
  print('|---|---|---|---|---|---|')
  for m, a, f, g, acc, worst in sorted(rows):
    print(f'| {m} | {a} | {float(f):.0%} | {g} | {100 * acc:.1f} % | {100 * worst:.1f} % |')


if __name__ == '__main__':
  main(sys.argv[1])

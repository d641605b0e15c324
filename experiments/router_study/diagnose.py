"""Seed-by-seed router diagnostics from a study JSON (the numbers quoted in README.md).

Usage::

  python -m experiments.router_study.diagnose experiments/router_study/runs/final_ls_paper.json --rounds 300 600 900 1500

Per seed and logged round: test accuracy; the argmax router's matched assignment accuracy and how many adaptors are
anyone's argmax; the loss-based assignment (argmin of each client's training loss over the adaptors alone); mean
router entropy (max ln C); the spread of the centred log-router (RMS over clients, in nats) and the share of its
variance that lies between the true clusters (1: routers differ only by cluster; 0: cluster-blind drift); the mean
gap between the best and second-best adaptor's training loss; then the final confusion (rows: true cluster).
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def cluster_share(probs: np.ndarray, num_clusters: int) -> tuple[float, float]:
  """``(between-cluster share of the variance, RMS spread)`` of the centred log-probabilities ``[K, C]``.

  Clusters are ``k mod C``, as in every FLoRAL task.
  """
  z = np.log(np.maximum(probs, 1e-4))
  z = z - z.mean(1, keepdims=True)
  dev = z - z.mean(0)
  total = float((dev ** 2).sum())
  clusters = np.arange(len(z)) % num_clusters
  between = sum(float(((z[clusters == c].mean(0) - z.mean(0)) ** 2).sum()) * int(np.sum(clusters == c))
                for c in range(num_clusters))
  return between / max(total, 1e-12), float(np.sqrt(total / len(z)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('json')
  p.add_argument('--rounds', type=int, nargs='+', default=[150, 300, 450, 600, 750, 900, 1200, 1500])
  args = p.parse_args(argv)
  with open(args.json) as f:
    doc = json.load(f)
  print(f'{doc["task"]} {doc["method"]} {doc["variant"]}')
  for run in doc['runs']:
    print(f'seed {run["seed"]}: final test {100 * run["test_accuracy"]:.1f}')
    print('  round  test  assign  used  loss-assign  entropy  spread  cluster-share  loss-gap')
    for rec in run['curve']:
      if rec['round'] not in args.rounds:
        continue
      r, lb = rec['router'], rec['loss_based']
      share, spread = cluster_share(np.array(rec['probs']), len(r['confusion']))
      print(f'  {rec["round"]:5d}  {100 * rec["test_accuracy"]:4.1f}  {100 * r["assignment_accuracy"]:6.1f}  '
            f'{r["used_adaptors"]:4d}  {100 * lb["assignment_accuracy"]:11.1f}  {r["entropy_mean"]:7.2f}  '
            f'{spread:6.2f}  {share:13.2f}  {lb["gap_mean"]:8.2f}')
    print(f'  final confusion (rows: true cluster, columns: argmax adaptor): {run["curve"][-1]["router"]["confusion"]}')


if __name__ == '__main__':
  main()

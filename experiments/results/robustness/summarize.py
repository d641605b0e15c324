"""Reads the run directories of run_grid.sh (named ATTACK-FRACTION-DEFENSE) and prints the markdown table: final test
accuracy and the worst cluster's accuracy (the example-weighted accuracy of the cluster with the lowest one, per
seed) — and, on a task with unequal clusters (mnist_offline_label_shift_minority), the smallest cluster's — mean ± std
over the seeds, per method, attack, attacker fraction and defense. A method the run's guard
stopped (every client rejected for 5 rounds) is shown as diverged with its round. With ``--matrix``: one table per
method, attacks down and defenses across (the README's form).

Usage: python summarize.py OUT [--matrix]"""
import json
import os
import sys

import numpy as np


def final_evals(path):
  """{(method, seed): eval record} for the last evaluation of each method and seed in metrics.jsonl."""
  evals = {}
  with open(os.path.join(path, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'eval' in r:
        evals[(r['method'], r.get('seed', 0))] = r['eval']
  return evals


def cluster_accuracies(ev, clusters):
  """{cluster: example-weighted test accuracy of its clients}."""
  acc = np.asarray(ev['per_client']['accuracy'])
  cnt = np.asarray(ev['per_client']['count'])
  return {c: np.sum(acc[clusters == c] * cnt[clusters == c]) / max(np.sum(cnt[clusters == c]), 1)
          for c in np.unique(clusters)}


def smallest_cluster(clusters):
  """The cluster with the fewest clients, or None when all clusters are equal."""
  sizes = np.bincount(clusters)
  return None if sizes.min() == sizes.max() else int(np.argmin(sizes))


def cell(values):
  values = 100 * np.asarray(values)
  return f'{values.mean():.1f}' + (f' ± {values.std():.1f}' if len(values) > 1 else '')


def rows_of(path, name):
  res = json.load(open(os.path.join(path, 'results.json')))
  attack, frac, defense = name.split('-')
  evals = final_evals(path)
  for method, m in res['methods'].items():
    if m.get('status') == 'failed':
      rounds = sorted({u.get('round') for u in res['units'][method].values() if u.get('status') == 'failed'})
      text = f'diverged (round {", ".join(map(str, rounds))})'
      yield method, attack, frac, defense, text, '—', '—'
      continue
    seeds = sorted(s for (meth, s) in evals if meth == method)
    if not seeds:
      continue
    acc = [evals[(method, s)]['test']['test_accuracy'] for s in seeds]
    per_cluster = [cluster_accuracies(evals[(method, s)], np.asarray(res['data'][str(s)]['clusters'])) for s in seeds]
    small = smallest_cluster(np.asarray(res['data'][str(seeds[0])]['clusters']))
    yield (method, attack, frac, defense, cell(acc), cell([min(c.values()) for c in per_cluster]),
           '—' if small is None else cell([c[small] for c in per_cluster]))


DEFENSE_ORDER = ['mean', 'median', 'trimmed_mean_0.3', 'geomed_8', 'krum', 'centered_clip_1.0', 'norm_bound_0.5']


def matrix(rows):
  """One table per method: a row per attack and attacker fraction, a column per defense, cells ``accuracy (worst
  cluster)``; a cell that was not run is empty."""
  defenses = [d for d in DEFENSE_ORDER if any(r[3] == d for r in rows)]
  defenses += sorted({r[3] for r in rows} - set(defenses))
  for method in sorted({r[0] for r in rows}):
    cells = {(r[1], r[2], r[3]): r[4] if r[5] == '—' else f'{r[4]} ({r[5]})' for r in rows if r[0] == method}
    print(f'\n{method}: test accuracy % (worst cluster %)\n')
    print('| attack | attackers | ' + ' | '.join(defenses) + ' |')
    print('|---|---|' + '---|' * len(defenses))
    for attack, frac in sorted({k[:2] for k in cells}, key=lambda k: (k[0] != 'none', k[0], k[1])):
      print(f'| {attack} | {float(frac):.0%} | ' + ' | '.join(cells.get((attack, frac, d), '')
                                                          for d in defenses) + ' |')


def main(out, as_matrix=False):
  rows = []
  for name in sorted(os.listdir(out)):
    path = os.path.join(out, name)
    if name.count('-') == 2 and os.path.isfile(os.path.join(path, 'results.json')):
      rows.extend(rows_of(path, name))
  if as_matrix:
    return matrix(rows)
  minority = any(r[6] != '—' for r in rows)
  print('| method | attack | attackers | defense | test accuracy % | worst cluster % |'
        + (' smallest cluster % |' if minority else ''))
  print('|---|---|---|---|---|---|' + ('---|' if minority else ''))
  for m, a, f, g, acc, worst, small in sorted(rows, key=lambda r: (r[0], r[3], r[1] != 'none', r[1], r[2])):
    print(f'| {m} | {a} | {float(f):.0%} | {g} | {acc} | {worst} |' + (f' {small} |' if minority else ''))


if __name__ == '__main__':
  main(sys.argv[1], '--matrix' in sys.argv[2:])

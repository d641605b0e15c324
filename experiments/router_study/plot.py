"""Plots router assignment accuracy (and test accuracy) over rounds from the study's JSON files.

Usage::

  python -m experiments.router_study.plot --out experiments/router_study/assignment_label_shift.png \
      --title "MNIST label shift, FLoRAL 1 %" \
      --run default=experiments/router_study/runs/ls_floral_1_default.json \
      --run hedge_1=experiments/router_study/runs/ls_floral_1_hedge_1.json \
      --oracle experiments/router_study/runs/ls_floral_1_oracle.json

Left: matched assignment accuracy of the argmax router (thin lines: seeds; thick: their mean). Right: test accuracy,
with the oracle router's mean as a dashed line when given.
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def curves(path: str, key) -> tuple[np.ndarray, np.ndarray]:
  """``(rounds [T], values [seeds, T])`` of ``key(record)`` over every seed of a study JSON."""
  runs = json.load(open(path))['runs']
  rounds = np.array([r['round'] for r in runs[0]['curve']])
  return rounds, np.array([[key(r) for r in run['curve']] for run in runs])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--run', action='append', required=True, help='LABEL=study.json (repeat)')
  p.add_argument('--oracle', default=None, help='study JSON of the oracle router (its final test accuracy)')
  p.add_argument('--title', default='')
  p.add_argument('--out', required=True)
  args = p.parse_args(argv)
  fig, (ax_a, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
  for i, spec in enumerate(args.run):
    label, path = spec.split('=', 1)
    color = f'C{i}'
    for ax, key in ((ax_a, lambda r: r['router']['assignment_accuracy']), (ax_t, lambda r: r['test_accuracy'])):
      rounds, vals = curves(path, key)
      for v in vals:
        ax.plot(rounds, 100 * v, color=color, lw=0.7, alpha=0.45)
      ax.plot(rounds, 100 * vals.mean(0), color=color, lw=2.2, label=f'{label} ({len(vals)} seeds)')
  if args.oracle:
    finals = [run['test_accuracy'] for run in json.load(open(args.oracle))['runs']]
    ax_t.axhline(100 * np.mean(finals), color='k', ls='--', lw=1.2, label='oracle router (final, mean)')
  ax_a.set(xlabel='round', ylabel='assignment accuracy % (best matching)', ylim=(20, 102),
           title='router argmax vs true clusters')
  ax_t.set(xlabel='round', ylabel='test accuracy %', ylim=(0, 100), title='test accuracy')
  for ax, loc in ((ax_a, 'upper left'), (ax_t, 'lower right')):
    ax.grid(alpha=0.3)
    ax.legend(loc=loc, fontsize=8)
  fig.suptitle(args.title)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()

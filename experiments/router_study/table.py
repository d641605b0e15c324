"""Markdown tables from the study's JSON files: the options' ablation (3 seeds) and the single-seed screens.

Usage::

  python -m experiments.router_study.table --runs experiments/router_study/runs

Ablation: ``final_{ls,rot}_<option>.json`` (and ``final_{ls,rot}_oracle.json``). Screens: ``screen_ls_*.json``.
Test accuracy in %, mean ± std over seeds (population std, as the runner's), then each seed; "assign" is the matched
assignment accuracy of the argmax router at the last round; "90 % at" the first logged round where it reached 90 %.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np


def load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def finals(doc: dict) -> np.ndarray:
  return 100 * np.array([r['test_accuracy'] for r in doc['runs']])


def assign_final(doc: dict) -> np.ndarray:
  return 100 * np.array([r['curve'][-1]['router']['assignment_accuracy'] for r in doc['runs']])


def reached(doc: dict, level: float = 0.9) -> str:
  """Per seed, the first logged round whose assignment accuracy is >= ``level`` ('-' if never)."""
  out = []
  for r in doc['runs']:
    hit = [c['round'] for c in r['curve'] if c['router']['assignment_accuracy'] >= level]
    out.append(str(hit[0]) if hit else '-')
  return '/'.join(out)


def cell(values: np.ndarray) -> str:
  return f'{values.mean():.1f} ± {values.std():.1f} ({" / ".join(f"{v:.1f}" for v in values)})'


def ablation(runs: str, options: list[str]) -> str:
  lines = ['| option | label shift: test % | assign % | 90 % at round | gap to oracle | rotate: test % | '
           'Δ rotate vs paper |', '|---|---|---|---|---|---|---|']
  oracle = {t: load(os.path.join(runs, f'final_{t}_oracle.json')) for t in ('ls', 'rot')}
  paper_rot = finals(load(os.path.join(runs, 'final_rot_paper.json'))).mean()
  for opt in options:
    ls_path, rot_path = (os.path.join(runs, f'final_{t}_{opt}.json') for t in ('ls', 'rot'))
    if not os.path.exists(ls_path):
      continue
    ls = load(ls_path)
    row = (f'| {opt} | {cell(finals(ls))} | {assign_final(ls).mean():.1f} | {reached(ls)} | '
           f'{finals(oracle["ls"]).mean() - finals(ls).mean():.1f} |')
    if os.path.exists(rot_path):
      rot = finals(load(rot_path))
      row += f' {cell(rot)} | {rot.mean() - paper_rot:+.1f} |'
    else:
      row += ' | |'
    lines.append(row)
  lines.append(f'| oracle router | {cell(finals(oracle["ls"]))} | 100 | 0 | 0 | {cell(finals(oracle["rot"]))} | '
               f'{finals(oracle["rot"]).mean() - paper_rot:+.1f} |')
  return '\n'.join(lines)


def screens(runs: str) -> str:
  lines = ['| screen (label shift) | what it changes | seeds | test % | assign % | 90 % at round |',
           '|---|---|---|---|---|---|']
  for path in sorted(glob.glob(os.path.join(runs, 'screen_ls_*.json'))):
    doc = load(path)
    seeds = ','.join(str(r['seed']) for r in doc['runs'])
    lines.append(f'| {doc["variant"]} | {doc["variant_settings"]["desc"]} | {seeds} | {cell(finals(doc))} | '
                 f'{assign_final(doc).mean():.1f} | {reached(doc)} |')
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--runs', default='experiments/router_study/runs')
  p.add_argument('--options', nargs='+', default=[
      'paper', 'router_lr_1', 'agg_t_0.1', 'balance_1', 'router_lr_1+agg_t_0.1', 'balance_1+agg_t_0.1',
      'balance_1+router_lr_1', 'balance_1+router_lr_1+agg_t_0.1'])
  args = p.parse_args(argv)
  print(ablation(args.runs, args.options))
  print()
  print(screens(args.runs))


if __name__ == '__main__':
  main()

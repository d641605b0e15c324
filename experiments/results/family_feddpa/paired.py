"""Paired bootstrap differences between methods of two FedDPA run directories over the same prompts.

Usage: python experiments/results/family_feddpa/paired.py BASELINE_RUN FAMILY_RUN [SEED]

Both runs must have the same settings (preset, data, seed): their per-prompt ROUGE-1 scores (``predictions/``) are
then over the same test prompts, and ``rouge.personalization_intervals`` resamples them jointly (category-stratified,
10,000 draws, the runner's bootstrap seed), so each family method is compared, paired, with FedIT and Local on P
and TTP. Prints a markdown table (ROUGE-1 x 100).
"""
import json
import os
import sys

import numpy as np

from fedjax_adapters.metrics import rouge


def load(run, seed):
  """(results.json, {method: [K, T] per-prompt scores of ``seed``})."""
  with open(os.path.join(run, 'results.json')) as f:
    results = json.load(f)
  scores = {}
  for name in sorted(os.listdir(os.path.join(run, 'predictions'))):
    with open(os.path.join(run, 'predictions', name)) as f:
      doc = json.load(f)
    if doc['seed'] == seed:
      scores[doc['method']] = np.asarray(doc['per_prompt'], np.float64)
  return results, scores


def main(base_run, family_run, seed=0):
  base, base_scores = load(base_run, seed)
  family, family_scores = load(family_run, seed)
  a, b = base['settings'], family['settings']
  differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))  # a setting added later is None in older runs
  if differ or base['test_categories'] != family['test_categories']:
    sys.exit(f'error: the runs differ in {differ or "test prompts"}; paired differences need the same settings')
  samples = base['intervals'][str(seed)]['num_samples']
  comparisons = [(m, b, block) for m in family_scores for b in ('fedit', 'local') if b in base_scores
                 for block in rouge.BLOCKS]
  out = rouge.personalization_intervals({**base_scores, **family_scores}, base['test_categories'],
                                        base['client_categories'], comparisons=comparisons, num_samples=samples,
                                        seed=base['intervals'][str(seed)]['seed'])
  print('| method − baseline | block | difference, 95 % interval |')
  print('|---|---|---|')
  for d in out['differences']:
    block = 'P' if d['block'] == 'personalization' else 'TTP'
    print(f"| {d['method']} − {d['baseline']} | {block} | {100 * d['estimate']:+.1f} "
          f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |")


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)

"""The family's MNIST label-shift table from the runner's JSONs: mean +- std (population, as the runner) over seeds, seconds, and paired t-tests
over the shared seeds (the same partition and initial key per seed) against FedAvg and the Local Adaptor.

Run: python experiments/results/family/table.py
"""
import json
import pathlib

import numpy as np
from scipy import stats

HERE = pathlib.Path(__file__).parent
LABELS = {'fedavg': 'FedAvg', 'local_adaptor': 'Local Adaptor', 'floral_1': 'FLoRAL 1 %', 'fedsa_lora': 'FedSA-LoRA',
          'ditto': 'Ditto (LoRA)', 'flora': 'FLoRA', 'hetlora': 'HetLoRA', 'fedalt': 'FedALT'}
FILES = {'baselines': 'mnist_offline_label_shift_baselines.json', 'family': 'mnist_offline_label_shift_family.json'}


def main():
  methods = {}
  for file in FILES.values():
    path = HERE / file
    if path.exists():
      methods.update(json.loads(path.read_text())['methods'])
  acc = {m: 100 * np.asarray(v['per_seed']) for m, v in methods.items() if v.get('status') == 'done'}
  clients, rounds = 30, 1500  # 10 % of 300 clients; each holds 10 images < batch 32: one step per round
  print('| method | test accuracy % (seeds 0, 1, 2) | per seed | client-steps/s | vs FedAvg (paired t, p) | '
        'vs Local Adaptor (paired t, p) |')
  print('|---|---|---|---|---|---|')
  for m in LABELS:
    if m not in acc:
      continue
    a, secs = acc[m], methods[m]['seconds']
    cells = [LABELS[m], f'{a.mean():.1f} ± {a.std():.1f}', ', '.join(f'{x:.1f}' for x in a),
             f'{len(a) * clients * rounds / secs:,.0f}']
    for ref in ('fedavg', 'local_adaptor'):
      if m == ref or ref not in acc:
        cells.append('')
        continue
      d = a - acc[ref]
      p = stats.ttest_rel(a, acc[ref]).pvalue
      cells.append(f'{d.mean():+.1f} (p = {p:.3f})')
    print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()

"""Prints the privacy/utility table (markdown) from the JSON results that run.sh writes next to this file."""
import json
import pathlib

HERE = pathlib.Path(__file__).parent
NAMES = {'fedavg': 'FedAvg', 'floral_1': 'FLoRAL 1% (learned router)', 'floral_1_oracle': 'FLoRAL 1% (oracle router)'}
COLS = ('nodp', 'eps8', 'eps3', 'eps1')


def cell(path):
  if not path.exists():
    return 'not run'
  r = json.loads(path.read_text())
  if not r['methods']:
    return r.get('status', '?')
  m = next(iter(r['methods'].values()))
  acc = m['test_accuracy']
  if acc is None:
    return r.get('status', '?')
  dp = r.get('dp')
  return f'{100 * acc:.1f}' + (f' (z={dp["noise_multiplier"]:.2f}, eps={dp["epsilon"]:.2f})' if dp else '')


print('| method | no DP | epsilon 8 | epsilon 3 | epsilon 1 |')
print('|---|---|---|---|---|')
for method, name in NAMES.items():
  print(f'| {name} | ' + ' | '.join(cell(HERE / f'{method}-{c}.json') for c in COLS) + ' |')

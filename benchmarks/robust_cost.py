"""Round cost of each robust reducer relative to the weighted mean, at 32 and 256 clients, in one run.

A FedAvg round of a small MNIST-shaped MLP (784-32-10, 25 450 params, 8 rows per client, batch 8, one local step) on
random data, vmapped over the clients; only the server's reducer changes. Each round is compiled once and warmed up,
then the reducers are timed in alternating passes (process CPU seconds and wall seconds per round; the median over
passes), so a busy shared machine affects them alike.

Run: python benchmarks/robust_cost.py --json benchmarks/results/robust_cost_cpu_2core.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time

import jax
import numpy as np
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.federated import aggregators, client_data, make_round, robust

NAMES = ['mean', 'median', 'median_sort', 'trimmed_mean', 'trimmed_mean_sort', 'geomed', 'krum', 'multikrum', 'bulyan',
         'bulyan_sort', 'centered_clip', 'norm_bound']
PARAMS = {'krum': 3, 'multikrum': 3, 'bulyan': 3}
# The same reducer with its order statistics from a sort at every M (the library compares pairwise up to
# aggregators.PAIRWISE_MAX_ROWS clients): what the pairwise path saves, side by side.
SORTED = {'median_sort': 'median', 'trimmed_mean_sort': 'trimmed_mean', 'bulyan_sort': 'bulyan'}


@contextlib.contextmanager
def order_by_sort(on: bool):
  saved = aggregators.PAIRWISE_MAX_ROWS, robust.PAIRWISE_MAX_ROWS
  if on:
    aggregators.PAIRWISE_MAX_ROWS = robust.PAIRWISE_MAX_ROWS = 0
  try:
    yield
  finally:
    aggregators.PAIRWISE_MAX_ROWS, robust.PAIRWISE_MAX_ROWS = saved


def mlp(rngs):
  return nnx.Sequential(nnx.Linear(784, 32, rngs=rngs), jax.nn.relu, nnx.Linear(32, 10, rngs=rngs))


def build(name: str, m: int):
  rng = np.random.default_rng(0)
  data = client_data(stack_clients([rng.normal(size=(8, 784)).astype(np.float32) for _ in range(m)],
                                   [rng.integers(0, 10, 8) for _ in range(m)]))
  base = SORTED.get(name, name)
  alg = algorithms.fedavg(mlp, loss='xent', lr=0.05, batch_size=8,
                          reducer=robust.reducer_from_name(base, PARAMS.get(base)))
  state = alg.init(jax.random.key(0), m)
  round_fn = make_round(alg, clients_per_round=m)
  with order_by_sort(name in SORTED):  # the path is chosen when the round is traced
    state, _ = round_fn(state, data)  # compile + warm
  jax.block_until_ready(state)
  return [round_fn, state, data]


def time_round(entry, reps: int) -> tuple[float, float]:
  round_fn, state, data = entry
  c0, w0 = time.process_time(), time.perf_counter()
  for _ in range(reps):
    state, _ = round_fn(state, data)
  jax.block_until_ready(state)
  entry[1] = state
  return (time.process_time() - c0) / reps, (time.perf_counter() - w0) / reps


def markdown(out: dict) -> str:
  """The README table: CPU-second ratio to the mean (wall ratio in brackets) per reducer and cohort size."""
  sizes = list(out['clients'])
  lines = ['| reducer | ' + ' | '.join(f'M = {m}: CPU (wall) x mean' for m in sizes) + ' |',
           '|---|' + '---|' * len(sizes)]
  for n in NAMES:
    cells = [f"{out['clients'][m][n]['cpu_ratio']:.2f} ({out['clients'][m][n]['wall_ratio']:.2f})" for m in sizes]
    lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
  base = ', '.join(f"M = {m}: {out['clients'][m]['mean']['cpu_s'] * 1e3:.1f} ms CPU" for m in sizes)
  return '\n'.join(lines) + f'\n\nThe mean round itself: {base}; load average {out["load_before"]} before, ' \
      f'{out["load_after"]} after.'


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--json', required=True)
  p.add_argument('--clients', type=int, nargs='+', default=[32, 256])
  p.add_argument('--passes', type=int, default=5)
  p.add_argument('--reps', type=int, default=3)
  args = p.parse_args()
  out = {'protocol': __doc__, 'load_before': os.getloadavg(), 'cpu': platform.processor() or platform.machine(),
         'cores': os.cpu_count(), 'jax': jax.__version__, 'clients': {}}
  for m in args.clients:
    entries = {n: build(n, m) for n in NAMES}
    cpu, wall = {n: [] for n in NAMES}, {n: [] for n in NAMES}
    for _ in range(args.passes):
      for n in NAMES:
        c, w = time_round(entries[n], args.reps)
        cpu[n].append(c); wall[n].append(w)
    med_c = {n: float(np.median(v)) for n, v in cpu.items()}
    med_w = {n: float(np.median(v)) for n, v in wall.items()}
    out['clients'][str(m)] = {n: {'cpu_s': med_c[n], 'wall_s': med_w[n], 'cpu_ratio': med_c[n] / med_c['mean'],
                                  'wall_ratio': med_w[n] / med_w['mean']} for n in NAMES}
    print(m, {n: round(r['cpu_ratio'], 2) for n, r in out['clients'][str(m)].items()}, flush=True)
  out['load_after'] = os.getloadavg()
  os.makedirs(os.path.dirname(args.json) or '.', exist_ok=True)
  with open(args.json, 'w') as f:
    json.dump(out, f, indent=1)
  print(markdown(out))


if __name__ == '__main__':
  main()

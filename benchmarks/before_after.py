"""The same FLoRAL round timed on two checkouts of this project, side by side: is a change slower?

Each measurement is a fresh process that imports ``fedjax_adapters`` and ``benchmarks`` from one checkout, builds the
MNIST MLP workload of ``benchmarks/setups.py`` (FLoRAL 1 %, C = 4), compiles the vmapped round and times
``--rounds`` rounds after a warm-up. The two checkouts alternate (A B A B ...) so that drifting machine load hits
both alike; the result is the ratio of their median round times, pair by pair, in wall time and in the process's CPU
time (which a loaded machine inflates far less than wall time).

  git worktree add /tmp/before <old commit>
  python -m benchmarks.before_after --before /tmp/before --after . --json benchmarks/results/before_after.json
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

_SNIPPET = r'''
import json, statistics, sys, time
import jax
from benchmarks import setups
from fedjax_adapters.federated import client_data, make_round
m, rounds = int(sys.argv[1]), int(sys.argv[2])
w = setups.mnist_mlp()
alg = setups.jax_algorithm(w)
data = client_data(setups.make_data(w, m))
state = alg.init(jax.random.key(0), m)
round_fn = make_round(alg, clients_per_round=m)
state, _ = round_fn(state, data)
jax.block_until_ready(state)
times, cpu = [], []
for _ in range(rounds):
  t0, c0 = time.perf_counter(), time.process_time()
  state, metrics = round_fn(state, data)
  jax.block_until_ready((state, metrics))
  times.append(time.perf_counter() - t0)
  cpu.append(time.process_time() - c0)
print(json.dumps({'median_s': statistics.median(times), 'best_s': min(times), 'cpu_median_s': statistics.median(cpu),
                  'jax': jax.__version__}))
'''


def measure(checkout: pathlib.Path, clients: int, rounds: int) -> dict:
  env = dict(os.environ, PYTHONPATH=str(checkout))
  out = subprocess.run([sys.executable, '-c', _SNIPPET, str(clients), str(rounds)], cwd=checkout, env=env,
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--before', required=True, help='checkout of the older commit')
  p.add_argument('--after', default='.', help='checkout of the newer commit (default: this one)')
  p.add_argument('--clients', type=int, default=32, help='clients per round (all vmapped)')
  p.add_argument('--rounds', type=int, default=20, help='timed rounds per measurement')
  p.add_argument('--pairs', type=int, default=3, help='alternating before/after measurements')
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  before, after = pathlib.Path(args.before).resolve(), pathlib.Path(args.after).resolve()
  pairs = []
  for i in range(args.pairs):
    b = measure(before, args.clients, args.rounds)
    a = measure(after, args.clients, args.rounds)
    pairs.append({'before': b, 'after': a, 'after_over_before': a['median_s'] / b['median_s'],
                  'cpu_after_over_before': a['cpu_median_s'] / b['cpu_median_s']})
    print(f"pair {i}: before {b['median_s'] * 1e3:.1f} ms, after {a['median_s'] * 1e3:.1f} ms per round "
          f"(after / before {pairs[-1]['after_over_before']:.3f}; CPU time {pairs[-1]['cpu_after_over_before']:.3f})",
          flush=True)
  ratio = statistics.median(p['after_over_before'] for p in pairs)
  cpu_ratio = statistics.median(p['cpu_after_over_before'] for p in pairs)
  out = {'workload': 'mnist_mlp FLoRAL 1 %, C=4, vmapped round', 'clients_per_round': args.clients,
         'rounds': args.rounds, 'before': str(before), 'after': str(after), 'pairs': pairs,
         'median_after_over_before': ratio, 'median_cpu_after_over_before': cpu_ratio}
  print(f'median after / before: wall {ratio:.3f}, CPU time {cpu_ratio:.3f} (< 1 is faster)')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
  return out


if __name__ == '__main__':
  main()

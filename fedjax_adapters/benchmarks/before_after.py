"""The same FLoRAL round of two checkouts of this project, timed side by side in one process: is a change slower?

Each measurement is a fresh process that imports ``fedjax_adapters`` and ``benchmarks`` from the old checkout, builds
the MNIST MLP workload of ``benchmarks/setups.py`` (FLoRAL 1 %, C = 4) and compiles its vmapped round, sets those
modules aside, does the same from the new checkout, and then times the two rounds alternately (old new, new old, old
new, ...) for ``--rounds`` rounds each. Alternating call by call inside one process lets neither the machine's drifting
load nor a process's luck (on a shared 2-core VM two fresh processes of the same code differ by up to 20 %) favour
one side. The result is the median over ``--processes`` processes of the ratio of median round times, in wall time
and in CPU time.

  git worktree add /tmp/before <old commit>
  python -m fedjax_adapters.benchmarks.before_after --before /tmp/before --after . --json benchmarks/results/before_after.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

_SNIPPET = r'''
import importlib, json, statistics, sys, time
import jax
TOPS = ('fedjax_adapters', 'benchmarks')
m, rounds, checkouts = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]

def ours():
  return {n: mod for n, mod in sys.modules.items() if n.split('.')[0] in TOPS}

def build(checkout):
  for name in ours():
    del sys.modules[name]
  sys.path.insert(0, checkout)
  setups = importlib.import_module('fedjax_adapters.benchmarks.setups')
  fed = importlib.import_module('fedjax_adapters.federated')
  sys.path.remove(checkout)
  w = setups.mnist_mlp()
  alg = setups.jax_algorithm(w)
  data = fed.client_data(setups.make_data(w, m))
  state = alg.init(jax.random.key(0), m)
  round_fn = fed.make_round(alg, clients_per_round=m)
  state, _ = round_fn(state, data)
  jax.block_until_ready(state)
  return {'modules': ours(), 'round': round_fn, 'state': state, 'data': data, 'wall': [], 'cpu': [],
          'package': fed.__file__}

sides = [build(c) for c in checkouts]
for i in range(rounds):
  for side in (sides if i % 2 == 0 else sides[::-1]):  # old new, new old, ...: neither always goes first
    sys.modules.update(side['modules'])  # the side's own modules, for anything imported lazily
    t0, c0 = time.perf_counter(), time.process_time()
    side['state'], metrics = side['round'](side['state'], side['data'])
    jax.block_until_ready((side['state'], metrics))
    side['wall'].append(time.perf_counter() - t0)
    side['cpu'].append(time.process_time() - c0)
print(json.dumps([{'median_s': statistics.median(s['wall']), 'best_s': min(s['wall']),
                   'cpu_median_s': statistics.median(s['cpu']), 'jax': jax.__version__, 'package': s['package']}
                  for s in sides]))
'''


def measure(before: pathlib.Path, after: pathlib.Path, clients: int, rounds: int) -> tuple[dict, dict]:
  """One process: both checkouts' rounds compiled, then timed alternately; ``(before, after)`` timings."""
  out = subprocess.run([sys.executable, '-c', _SNIPPET, str(clients), str(rounds), str(before), str(after)],
                       cwd='/', capture_output=True, text=True, check=True)
  b, a = json.loads(out.stdout.strip().splitlines()[-1])
  return b, a


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--before', required=True, help='checkout of the older commit')
  p.add_argument('--after', default='.', help='checkout of the newer commit (default: this one)')
  p.add_argument('--clients', type=int, default=32, help='clients per round (all vmapped)')
  p.add_argument('--rounds', type=int, default=40, help='timed rounds per checkout and process')
  p.add_argument('--processes', type=int, default=3, help='fresh processes, each timing both checkouts')
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  before, after = pathlib.Path(args.before).resolve(), pathlib.Path(args.after).resolve()
  runs = []
  for i in range(args.processes):
    b, a = measure(before, after, args.clients, args.rounds)
    runs.append({'before': b, 'after': a, 'after_over_before': a['median_s'] / b['median_s'],
                 'cpu_after_over_before': a['cpu_median_s'] / b['cpu_median_s']})
    print(f"process {i}: before {b['median_s'] * 1e3:.1f} ms, after {a['median_s'] * 1e3:.1f} ms per round "
          f"(after / before {runs[-1]['after_over_before']:.3f}; CPU time {runs[-1]['cpu_after_over_before']:.3f})",
          flush=True)
  ratio = statistics.median(r['after_over_before'] for r in runs)
  cpu_ratio = statistics.median(r['cpu_after_over_before'] for r in runs)
  out = {'workload': 'mnist_mlp FLoRAL 1 %, C=4, vmapped round', 'protocol': 'both checkouts in one process, '
         'rounds alternated', 'clients_per_round': args.clients, 'rounds': args.rounds, 'before': str(before),
         'after': str(after), 'processes': runs, 'median_after_over_before': ratio,
         'median_cpu_after_over_before': cpu_ratio}
  print(f'median after / before: wall {ratio:.3f}, CPU time {cpu_ratio:.3f} (< 1 is faster)')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
  return out


if __name__ == '__main__':
  main()

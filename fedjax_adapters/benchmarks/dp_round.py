"""The user-level DP round's cost beside the plain round, in one process, timed alternately.

FLoRAL(1 %) on the MNIST MLP workload of ``setups.py`` (C = 4, 200 random rows per client, batch 32); the DP round
wraps the same aggregator in ``dp_aggregator`` (clip 1, noise multiplier 1, adaptors weighted by ``C p(c|k)``),
vmapped round, ``M`` clients per round. After one compiling round each, the two rounds are timed alternately (plain
DP, DP plain, ...) for ``--rounds`` rounds each; the ratio is of the median round times.

  python -m fedjax_adapters.benchmarks.dp_round --clients 32 256 --rounds 10 --json benchmarks/results/dp_round.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax

from fedjax_adapters.benchmarks import setups
from fedjax_adapters.federated import DPConfig, client_data, dp_aggregator, make_round


def rounds_of(m: int):
  """``{'plain': (round, state), 'dp': (round, state)}`` and the data of ``m`` clients, each round compiled."""
  w = setups.mnist_mlp()
  alg = setups.jax_algorithm(w)
  dp = alg.replace(aggregator=dp_aggregator(alg.aggregator, DPConfig(clip=1.0, noise_multiplier=1.0,
                                                                     expected_clients=m), mixture_keys=('adapters',)))
  data = client_data(setups.make_data(w, m))
  sides = {}
  for name, a in (('plain', alg), ('dp', dp)):
    round_fn = make_round(a, clients_per_round=m)
    state, _ = round_fn(a.init(jax.random.key(0), m), data)
    jax.block_until_ready(state)
    sides[name] = [round_fn, state]
  return sides, data, w


def measure(m: int, rounds: int) -> dict:
  sides, data, w = rounds_of(m)
  times = {n: [] for n in sides}
  for i in range(rounds):
    for name in (('plain', 'dp') if i % 2 == 0 else ('dp', 'plain')):
      round_fn, state = sides[name]
      t0 = time.perf_counter()
      state, metrics = round_fn(state, data)
      jax.block_until_ready((state, metrics))
      times[name].append(time.perf_counter() - t0)
      sides[name][1] = state
  med = {n: statistics.median(t) for n, t in times.items()}
  return {'clients': m, 'rounds': rounds, 'plain_median_s': med['plain'], 'dp_median_s': med['dp'],
          'ratio_dp_over_plain': med['dp'] / med['plain'], 'workload': w.describe()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--clients', type=int, nargs='+', default=[32, 256])
  p.add_argument('--rounds', type=int, default=10)
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  load = os.getloadavg()
  out = {'backend': jax.default_backend(), 'devices': [str(d) for d in jax.devices()], 'cpus': os.cpu_count(),
         'loadavg_before': load, 'jax': jax.__version__, 'results': [measure(m, args.rounds) for m in args.clients]}
  out['loadavg_after'] = os.getloadavg()
  text = json.dumps(out, indent=1)
  print(text)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()

"""Compiled loop (``Round.run``) against one dispatch per round, on the same round object and state.

``python benchmarks/compiled_loop_hang/speed.py --task mnist_offline_rotate --methods fedavg floral_1 floral_10``

Both ways run ``--rounds`` rounds from the same initial state, ``--reps`` times alternately, after one untimed call
each (compilation); prints the medians, their ratio and whether the final global parameters are bit-identical.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np


def measure(method: str, task_name: str, rounds: int, reps: int) -> dict:
  """Seconds for ``rounds`` rounds of ``method`` both ways (medians of ``reps``) and whether they agree."""
  from fedjax_adapters.experiments import floral, floral_tasks
  from fedjax_adapters.federated import client_data, clients_per_round, make_round
  task = floral.TASKS[task_name]
  data = floral_tasks.load_data(task, 0)
  train = client_data(data.train)
  # As the runner does: a batch larger than a client's padded rows only adds masked rows.
  task = dataclasses.replace(task, batch_size=min(task.batch_size, jax.tree.leaves(train.x)[0].shape[1]))
  k = data.train.num_clients
  alg = floral_tasks.build_algorithm(method, task, data)
  round_fn = make_round(alg, clients_per_round=clients_per_round(k, task.fraction))
  state = alg.init(jax.random.key(0), k)

  def per_round(s):
    for _ in range(rounds):
      s, _ = round_fn(s, train)
    return s

  def compiled(s):
    return round_fn.run(s, train, rounds)[0]

  finals = {name: jax.block_until_ready(f(state)) for name, f in (('per_round', per_round), ('compiled', compiled))}
  times = {'per_round': [], 'compiled': []}
  for _ in range(reps):
    for name, f in (('per_round', per_round), ('compiled', compiled)):
      start = time.perf_counter()
      jax.block_until_ready(f(state))
      times[name].append(time.perf_counter() - start)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(finals['per_round'].global_params),
                                                  jax.tree.leaves(finals['compiled'].global_params)))
  med = {name: float(np.median(t)) for name, t in times.items()}
  return {'method': method, 'per_round_s': med['per_round'], 'compiled_s': med['compiled'],
          'speedup': med['per_round'] / med['compiled'], 'identical': same}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--task', default='mnist_offline_rotate')
  p.add_argument('--methods', nargs='+', default=['fedavg', 'floral_1', 'floral_10'])
  p.add_argument('--rounds', type=int, default=100)
  p.add_argument('--reps', type=int, default=3)
  args = p.parse_args(argv)
  if args.rounds < 1 or args.reps < 1:
    p.error('--rounds and --reps must be >= 1')
  jax.config.update('jax_cpu_enable_async_dispatch', False)  # as the experiment runner runs
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, task {args.task}, {args.rounds} rounds, '
        f'median of {args.reps}', flush=True)
  for method in args.methods:
    r = measure(method, args.task, args.rounds, args.reps)
    print(f'{method:12s} per round {r["per_round_s"]:7.2f} s   compiled loop {r["compiled_s"]:7.2f} s   '
          f'speed-up {r["speedup"]:.2f}x   identical: {r["identical"]}', flush=True)


if __name__ == '__main__':
  main()

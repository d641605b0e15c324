"""Runs FLoRAL's comparison (FedAvg, Local Adaptor, FLoRAL, Ensemble; learned and oracle routers) on one task.

Usage::

  python -m experiments.floral --task synthetic_linear --json out/synthetic_linear.json
  python -m experiments.floral --task synthetic_mlp --methods fedavg floral floral_oracle --seeds 3

Prints a table (mean +- std over seeds) and writes
``{"task": ..., "methods": {name: {metric: mean, "std": ..., "per_seed": [...]}}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from fedjax_adapters import algorithms
from fedjax_adapters.federated.round import client_data, evaluate, make_round
from fedjax_adapters.federated.sampling import clients_per_round
from experiments.configs.floral_synthetic import SYNTHETIC

TASKS = dict(SYNTHETIC)
METHODS = ('fedavg', 'local_adaptor', 'floral', 'floral_oracle', 'ensemble', 'ensemble_oracle')


def build_algorithm(method: str, cfg, data):
  """The algorithm object for ``method`` on task config ``cfg`` (``data`` gives the oracle clusters)."""
  common = dict(loss=cfg.loss, lr=cfg.lr, batch_size=cfg.batch_size, num_epochs=cfg.num_epochs,
                train_arg=cfg.train_arg)
  c = data.num_clusters
  oracle = data.clusters if method.endswith('_oracle') else None
  if method == 'fedavg':
    return algorithms.fedavg(cfg.model_fn, **common)
  if method == 'local_adaptor':
    return algorithms.local_adaptor(cfg.model_fn, rank=cfg.rank, **common)
  if method in ('floral', 'floral_oracle'):
    return algorithms.floral(cfg.model_fn, num_adaptors=c, rank=cfg.rank, router_lr=cfg.router_lr,
                             oracle_clusters=oracle, **common)
  if method in ('ensemble', 'ensemble_oracle'):
    return algorithms.ensemble(cfg.model_fn, num_members=c, router_lr=cfg.router_lr, oracle_clusters=oracle,
                               **common)
  raise ValueError(f'unknown method {method!r}; valid methods: {", ".join(METHODS)}.')


def run_method(method: str, cfg, data, *, seed: int, rounds: int) -> dict:
  """Trains ``method`` for ``rounds`` rounds and returns its population test metrics."""
  alg = build_algorithm(method, cfg, data)
  train, test = client_data(data.train), client_data(data.test)
  k = data.train.num_clients
  state = alg.init(jax.random.key(seed), k)
  round_fn = make_round(alg, clients_per_round=clients_per_round(k, cfg.fraction))
  for _ in range(rounds):
    state, _ = round_fn(state, train)
  summary = algorithms.summarize(evaluate(alg, state, test))
  if cfg.metric == 'test_mse':
    return {'test_mse': summary['loss']}
  return {'test_accuracy': summary['accuracy'], 'test_loss': summary['loss']}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--task', required=True, help=f'one of: {", ".join(TASKS)}')
  p.add_argument('--methods', nargs='+', default=list(METHODS), help=f'subset of: {", ".join(METHODS)}')
  p.add_argument('--seeds', type=int, default=1, help='number of seeds (0 .. N-1)')
  p.add_argument('--rounds', type=int, default=None, help="override the task's number of rounds")
  p.add_argument('--json', default=None, help='write results here')
  args = p.parse_args(argv)
  if args.task not in TASKS:
    p.error(f'unknown task {args.task!r}; valid tasks: {", ".join(TASKS)}')
  bad = [m for m in args.methods if m not in METHODS]
  if bad:
    p.error(f'unknown method(s) {", ".join(bad)}; valid methods: {", ".join(METHODS)}')
  cfg = TASKS[args.task]
  rounds = args.rounds if args.rounds is not None else cfg.rounds
  results = {}
  print(f'task {args.task}: {rounds} rounds, {args.seeds} seed(s), devices {jax.devices()}', flush=True)
  for method in args.methods:
    per_seed = []
    t0 = time.time()
    for seed in range(args.seeds):
      per_seed.append(run_method(method, cfg, cfg.load(seed), seed=seed, rounds=rounds)[cfg.metric])
    results[method] = {cfg.metric: float(np.mean(per_seed)), 'std': float(np.std(per_seed)),
                       'per_seed': [float(v) for v in per_seed], 'seconds': round(time.time() - t0, 1)}
    print(f'  {method:<16} {cfg.metric} {np.mean(per_seed):.4g} +- {np.std(per_seed):.2g}   '
          f'({time.time() - t0:.0f} s)', flush=True)
  out = {'task': args.task, 'rounds': rounds, 'seeds': args.seeds, 'metric': cfg.metric, 'methods': results}
  print()
  print(f'| method | {cfg.metric} (mean ± std over {args.seeds} seed(s)) |')
  print('|---|---|')
  for m, r in results.items():
    print(f'| {m} | {r[cfg.metric]:.4g} ± {r["std"]:.2g} |')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  main(sys.argv[1:])

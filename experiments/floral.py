"""Runs FLoRAL's comparison (FedAvg, Local Adaptor, Ensemble, FLoRAL 1 % / 10 %; learned and oracle routers).

Usage::

  python -m experiments.floral --task synthetic_linear --json out/synthetic_linear.json
  python -m experiments.floral --task mnist_offline_label_shift --seeds 3 --json out/mnist_offline_label_shift.json
  python -m experiments.floral --task cifar10_rotate --data-dir ~/tensorflow_datasets --seeds 4
  python -m experiments.floral --task mnist_rotate --smoke      # a few clients, 2 rounds, random images

Tasks: the synthetic ones (``experiments/configs/floral_synthetic.py``) and one per column of the paper's Table 1
(``experiments/configs/floral_vision.py``, whose docstrings give the paper's numbers). Methods, by the table's rows:
``fedavg``, ``local_adaptor``, ``ensemble``, ``ensemble_oracle``, ``floral_1``, ``floral_1_oracle``, ``floral_10``,
``floral_10_oracle`` (FLoRAL 1 % / 10 % = rank budget 0.01 / 0.1); ``floral`` and ``floral_oracle`` are aliases of
the 1 % ones (the synthetic table's names). Training switches (router lr, noise, preconditioning, server optimizer,
participation, rounds, ...) default to the task's public-code settings and can be overridden.

Prints a table (mean +- std over seeds 0..N-1, with the paper's numbers for vision tasks) and writes
``{"task": ..., "methods": {name: {metric: mean, "std": ..., "per_seed": [...]}}}`` (accuracy as a fraction in
[0, 1]; the paper's numbers, in %, under ``"paper"``), rewritten after every method.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
import optax

from experiments.configs.common import BIAS_INITS, SERVER_OPTIMIZERS, FloralTask
from experiments.configs.floral_synthetic import SYNTHETIC
from experiments.configs.floral_vision import VISION
from fedjax_adapters import algorithms
from fedjax_adapters.data.vision import DatasetNotFoundError
from fedjax_adapters.federated.round import client_data, evaluate, make_round, run_rounds
from fedjax_adapters.federated.sampling import clients_per_round
from fedjax_adapters.optim import label_tree


def _synthetic_factory(cfg):
  def factory(*, smoke: bool = False):
    return cfg.smoke() if smoke else cfg
  factory.__doc__ = sys.modules[type(cfg).__module__].__doc__
  return factory


# name -> factory(smoke=False) -> task config
TASKS = {**{name: _synthetic_factory(cfg) for name, cfg in SYNTHETIC.items()}, **VISION}
TABLE_METHODS = ('fedavg', 'local_adaptor', 'ensemble', 'ensemble_oracle', 'floral_1', 'floral_1_oracle', 'floral_10',
                 'floral_10_oracle')
ALIASES = {'floral': 'floral_1', 'floral_oracle': 'floral_1_oracle'}
METHODS = TABLE_METHODS + tuple(ALIASES)
SYNTHETIC_METHODS = ('fedavg', 'local_adaptor', 'floral', 'floral_oracle', 'ensemble', 'ensemble_oracle')
FLORAL_RANKS = {'floral_1': 0.01, 'floral_10': 0.1}
DEFAULT_SERVER_LR = {'sgd': 1.0, 'adam': 1e-3}


def server_optimizer(kind: str, lr: float, adaptor_lr: float | None = None) -> optax.GradientTransformation:
  """The server optimizer on the pseudo-gradient; ``adaptor_lr`` gives FLoRAL's ``adapters`` their own rate."""
  make = {'sgd': optax.sgd, 'adam': optax.adam}
  if kind not in make:
    raise ValueError(f'unknown server optimizer {kind!r}; choose one of {SERVER_OPTIMIZERS}.')
  if adaptor_lr is None:
    return make[kind](lr)
  return optax.multi_transform(
      {'rest': make[kind](lr), 'adapters': make[kind](adaptor_lr)},
      lambda g: {k: label_tree(v, 'adapters' if k == 'adapters' else 'rest') for k, v in g.items()})


def build_algorithm(method: str, cfg: FloralTask, data):
  """The algorithm object for ``method`` on task config ``cfg`` (``data`` gives the oracle clusters)."""
  name = ALIASES.get(method, method)
  if name not in TABLE_METHODS:
    raise ValueError(f'unknown method {method!r}; valid methods: {", ".join(METHODS)}.')
  base, oracle = (name[:-len('_oracle')], True) if name.endswith('_oracle') else (name, False)
  clusters = data.clusters if oracle else None
  c = data.num_clusters
  common = dict(loss=cfg.loss, lr=cfg.lr, batch_size=cfg.batch_size, num_epochs=cfg.num_epochs,
                train_arg=cfg.train_arg)
  router = dict(router_lr=cfg.router_lr, noise_std=cfg.noise_std, temperature=cfg.temperature,
                oracle_clusters=clusters)
  server = server_optimizer(cfg.server_optimizer, cfg.server_lr)
  if base == 'fedavg':
    return algorithms.fedavg(cfg.model_fn, server_optimizer=server, **common)
  if base == 'local_adaptor':
    return algorithms.local_adaptor(cfg.model_fn, rank=cfg.rank, precondition=cfg.precondition,
                                    bias_init=cfg.bias_init, server_optimizer=server, **common)
  if base == 'ensemble':
    return algorithms.ensemble(cfg.model_fn, num_members=c, server_optimizer=server, **router, **common)
  server = server_optimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_adaptor_lr)
  return algorithms.floral(cfg.model_fn, num_adaptors=c, rank=FLORAL_RANKS[base], precondition=cfg.precondition,
                           bias_init=cfg.bias_init, server_optimizer=server, **router, **common)


def _metrics(cfg: FloralTask, summary: dict) -> dict:
  if cfg.metric == 'test_mse':
    return {'test_mse': summary['loss']}
  return {'test_accuracy': summary['accuracy'], 'test_loss': summary['loss']}


def run_method(method: str, cfg: FloralTask, data, *, seed: int, rounds: int, eval_every: int = 0,
               log=None, cache: dict | None = None, compiled_loop: bool = False) -> dict:
  """Trains ``method`` for ``rounds`` rounds and returns its population test metrics (and a curve if asked).

  ``cache`` (a dict the caller keeps) reuses the algorithm and its compiled round across seeds whose data have the
  same clusters and batch size, so each method compiles once. ``compiled_loop`` runs the rounds between evaluations
  in one compiled loop (:func:`run_rounds`) instead of one dispatch per round.
  """
  train, test = client_data(data.train), client_data(data.test)
  # A client never has more rows than the padded maximum, so a larger batch only adds masked padding rows: capping
  # it there leaves every update unchanged and saves the work (the offline MNIST: 10 rows, batch 32).
  rows = jax.tree.leaves(train.x)[0].shape[1]
  cfg = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, rows))
  k = data.train.num_clients
  cache_key = (method, cfg.batch_size, tuple(np.asarray(data.clusters).tolist()))
  if cache is not None and cache_key in cache:
    alg, round_fn = cache[cache_key]
  else:
    alg = build_algorithm(method, cfg, data)
    # Conv models on a CPU: one client per step of the compiled round (benchmarks/README.md: all clients vmapped at
    # once ran 17 % slower than the client-by-client loop at 4-8 clients; one per step matched or beat it).
    chunk = 1 if getattr(cfg, 'model', 'mlp') != 'mlp' and jax.default_backend() == 'cpu' else None
    round_fn = make_round(alg, clients_per_round=clients_per_round(k, cfg.fraction), client_chunk=chunk)
    if cache is not None:
      cache[cache_key] = (alg, round_fn)
  state = alg.init(jax.random.key(seed), k)
  curve = []
  done = 0
  while done < rounds:
    chunk = min(eval_every or rounds, rounds - done)
    if compiled_loop:
      state, _ = run_rounds(round_fn, state, train, chunk)
    else:
      for _ in range(chunk):
        state, _ = round_fn(state, train)
    done += chunk
    if eval_every:
      m = _metrics(cfg, algorithms.summarize(evaluate(alg, state, test)))
      curve.append([done, m[cfg.metric]])
      if log:
        log(f'    {method} seed {seed} round {done}: {cfg.metric} {m[cfg.metric]:.4f}')
  out = _metrics(cfg, algorithms.summarize(evaluate(alg, state, test)))
  if eval_every:
    out['curve'] = curve
  return out


def _config_dict(cfg: FloralTask) -> dict:
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if isinstance(getattr(cfg, f.name), (int, float, str, bool, type(None)))}


def _fmt(cfg: FloralTask, value: float) -> str:
  return f'{100 * value:.1f}' if cfg.metric == 'test_accuracy' else f'{value:.4g}'


def _table(cfg: FloralTask, results: dict, seeds: int) -> str:
  paper = getattr(cfg, 'paper', None)
  unit = ' %' if cfg.metric == 'test_accuracy' else ''
  head = f'| method | {cfg.metric}{unit} (mean ± std, {seeds} seed(s)) |'
  rule = '|---|---|'
  if paper:
    head += f' paper, {cfg.column} |'
    rule += '---|'
  lines = [head, rule]
  for m, r in results.items():
    line = f'| {m} | {_fmt(cfg, r[cfg.metric])} ± {_fmt(cfg, r["std"])} |'
    if paper:
      p = paper.get(ALIASES.get(m, m))
      line += f' {p[0]:.1f} ({p[1]:.1f}) |' if p else ' |'
    lines.append(line)
  return '\n'.join(lines)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--task', required=True, help=f'one of: {", ".join(TASKS)}')
  p.add_argument('--methods', nargs='+', default=None,
                 help=f'subset of: {", ".join(METHODS)} (default: the table\'s eight rows; synthetic tasks: '
                      f'{" ".join(SYNTHETIC_METHODS)})')
  p.add_argument('--seeds', type=int, default=1, help='number of seeds (0 .. N-1); each seed repartitions the data')
  p.add_argument('--smoke', action='store_true', help='the task shrunk to a few clients, 2 rounds, random images')
  p.add_argument('--data-dir', default=None, help='tensorflow_datasets directory (array_record) for MNIST / CIFAR')
  p.add_argument('--json', default=None, help='write results here')
  p.add_argument('--eval-every', type=int, default=0, help='also evaluate every this many rounds (a curve)')
  p.add_argument('--compiled-loop', action='store_true',
                 help='run the rounds between evaluations in one compiled loop (about 2x faster for the MNIST MLP '
                      'on a CPU; on XLA:CPU with jax 0.10 the rotation tasks hung inside it, so it is opt-in)')
  g = p.add_argument_group('training switches (default: the task config, i.e. the public code\'s settings)')
  g.add_argument('--rounds', type=int, default=None, help='federated rounds')
  g.add_argument('--fraction', type=float, default=None, help='share of clients sampled per round')
  g.add_argument('--lr', type=float, default=None, help='client SGD learning rate')
  g.add_argument('--batch-size', type=int, default=None, help='local batch size')
  g.add_argument('--router-lr', type=float, default=None, help='router-logit learning rate (public code: 0.1; '
                 '0.3 in the reduced tasks)')
  g.add_argument('--router-noise', type=float, default=None, dest='noise_std',
                 help='scale of the uniform U[0, 1) noise on the router logits in training (public code: 1; 0: off)')
  g.add_argument('--temperature', type=float, default=None, help='router softmax temperature (public code: 1)')
  g.add_argument('--precondition', action=argparse.BooleanOptionalAction, default=None,
                 help='LoRA gradient preconditioning (public code: on)')
  g.add_argument('--bias-init', choices=BIAS_INITS, default=None,
                 help='bias-adaptor init (public code: uniform, i.e. nonzero)')
  g.add_argument('--server-opt', choices=SERVER_OPTIMIZERS, default=None, dest='server_optimizer',
                 help='server optimizer (public code: sgd; cifar100: adam)')
  g.add_argument('--server-lr', type=float, default=None,
                 help='server learning rate (default: the task\'s, or 1 for sgd / 1e-3 for adam when --server-opt '
                      'changes the optimizer)')
  g.add_argument('--server-adaptor-lr', type=float, default=None,
                 help='separate server rate for FLoRAL\'s adaptors (default: --server-lr; the public code in effect '
                      'uses the client lr, e.g. 0.1 on MNIST)')
  g.add_argument('--augment', action=argparse.BooleanOptionalAction, default=None,
                 help='CIFAR crop + flip augmentation (default: on for CIFAR tasks)')
  return p


_OVERRIDES = ('rounds', 'fraction', 'lr', 'batch_size', 'router_lr', 'noise_std', 'temperature', 'precondition',
              'bias_init', 'server_optimizer', 'server_lr', 'server_adaptor_lr', 'augment')


def resolve_config(args: argparse.Namespace) -> FloralTask:
  """The task config with the command line's overrides applied."""
  cfg = TASKS[args.task](smoke=args.smoke)
  overrides = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
  if ('server_optimizer' in overrides and 'server_lr' not in overrides
      and overrides['server_optimizer'] != cfg.server_optimizer):
    overrides['server_lr'] = DEFAULT_SERVER_LR[overrides['server_optimizer']]
  return dataclasses.replace(cfg, **overrides)


def main(argv=None) -> dict:
  p = _parser()
  args = p.parse_args(argv)
  # Long CPU runs wedged with every XLA worker thread idle in a futex wait, mid-execution: once after a few hundred
  # rounds dispatched one by one (asynchronously), and in the compiled loop of the rotation tasks (with and without
  # multi-threaded Eigen). Synchronous dispatch costs nothing at this scale. It only takes effect before JAX's CPU
  # backend starts, i.e. when this is the process's first JAX work.
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  if args.task not in TASKS:
    p.error(f'unknown task {args.task!r}; valid tasks: {", ".join(TASKS)}')
  methods = args.methods or list(SYNTHETIC_METHODS if args.task in SYNTHETIC else TABLE_METHODS)
  bad = [m for m in methods if m not in METHODS]
  if bad:
    p.error(f'unknown method(s) {", ".join(bad)}; valid methods: {", ".join(METHODS)}')
  if args.seeds < 1:
    p.error(f'--seeds must be >= 1; got {args.seeds}')
  try:
    cfg = resolve_config(args)
  except ValueError as e:
    p.error(str(e))
  print(f'task {args.task}: {cfg.rounds} rounds, {args.seeds} seed(s), devices {jax.devices()}', flush=True)
  print(f'  settings: {_config_dict(cfg)}', flush=True)

  datasets = {}

  def data_of(seed):
    if seed not in datasets:
      t0 = time.time()
      try:
        datasets[seed] = cfg.load(seed, data_dir=args.data_dir)
      except DatasetNotFoundError as e:
        raise DatasetNotFoundError(f'{e}\nThen rerun with `--data-dir DIR`.') from e
      print(f'  data seed {seed}: {datasets[seed].train.num_clients} clients, '
            f'{int(np.sum(datasets[seed].train.counts))} train / {int(np.sum(datasets[seed].test.counts))} test '
            f'examples ({time.time() - t0:.1f} s)', flush=True)
    return datasets[seed]

  results = {}
  out = {'task': args.task, 'rounds': cfg.rounds, 'seeds': args.seeds, 'metric': cfg.metric,
         'config': _config_dict(cfg), 'methods': results}
  if getattr(cfg, 'paper', None):
    out['paper'] = {'column': cfg.column, 'unit': 'test accuracy %, mean (std)',
                    'methods': {m: list(cfg.paper[ALIASES.get(m, m)]) for m in methods}}
  for method in methods:
    per_seed, extras, cache = [], [], {}
    t0 = time.time()
    for seed in range(args.seeds):
      r = run_method(method, cfg, data_of(seed), seed=seed, rounds=cfg.rounds, eval_every=args.eval_every,
                     log=lambda s: print(s, flush=True), cache=cache, compiled_loop=args.compiled_loop)
      per_seed.append(r[cfg.metric])
      extras.append(r)
    results[method] = {cfg.metric: float(np.mean(per_seed)), 'std': float(np.std(per_seed)),
                       'per_seed': [float(v) for v in per_seed], 'seconds': round(time.time() - t0, 1)}
    if 'test_loss' in extras[0]:
      results[method]['test_loss_per_seed'] = [float(r['test_loss']) for r in extras]
    if args.eval_every:
      results[method]['curves'] = [r['curve'] for r in extras]
    print(f'  {method:<18} {cfg.metric} {_fmt(cfg, np.mean(per_seed))} +- {_fmt(cfg, np.std(per_seed))}   '
          f'({time.time() - t0:.0f} s)', flush=True)
    if args.json:  # rewritten after every method, so a long run can be watched
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
      with open(args.json, 'w') as f:
        json.dump(out, f, indent=2)
  print()
  print(_table(cfg, results, args.seeds))
  return out


if __name__ == '__main__':
  try:
    main(sys.argv[1:])
  except DatasetNotFoundError as err:
    sys.exit(f'error: {err}')

"""The training half of ``python -m fedjax_adapters.experiments.floral``: every (method, seed) unit, run in a run directory.

``experiments/floral.py`` parses and checks the command line without importing JAX, then calls :func:`run` with
the plan. The results document keeps the keys earlier runs wrote (``task``, ``rounds``, ``metric``, ``config``,
``paper``, ``methods: {name: {<metric>, std, per_seed, test_loss_per_seed, curves, seconds}}``; accuracy as a
fraction in [0, 1]) and adds ``seeds`` as a list, each unit's ``status``, ``state`` and ``error``, the data
partition of each seed (``data``), and the run's ``status``.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from fedjax_adapters.experiments import floral_tasks
from fedjax_adapters.experiments.configs import floral as configs
from fedjax_adapters.experiments.runlib import loop, strict_json
from fedjax_adapters.experiments.runlib.environment import environment
from fedjax_adapters.experiments.runlib.progress import Progress
from fedjax_adapters.experiments.runlib.rundir import RunDir
from fedjax_adapters import algorithms
from fedjax_adapters.adapters.mixture import aggregation_probs
from fedjax_adapters.federated import chunked_clients, client_data, clients_per_round, evaluate, make_round

RUNNER = 'floral'
CONV_MODELS = ('cifar_cnn', 'vgg8')
FINISHED = ('done', 'failed')
_PLAN_KEYS = ('methods', 'seeds', 'eval_every', 'checkpoint_every', 'keep', 'max_rejected_rounds', 'compiled_loop',
              'data_dir')


def test_metrics(task: configs.FloralTask, summary: dict) -> dict[str, float]:
  """The task's headline metrics from :func:`algorithms.summarize`'s population summary."""
  if task.metric == 'test_mse':
    return {'test_mse': summary['loss']}
  return {'test_accuracy': summary['accuracy'], 'test_loss': summary['loss']}


def format_metric(task: configs.FloralTask, value: float | None) -> str:
  """Accuracy in % (one decimal), MSE with 4 significant digits; the unit of the summary table everywhere."""
  if value is None:
    return 'null'
  return f'{100 * value:.1f} %' if task.metric == 'test_accuracy' else f'{value:.4g}'


def _short(x) -> list:
  """A float array as nested lists of 6 significant digits (per-client values and router probabilities)."""
  x = np.asarray(x, np.float64)
  return np.vectorize(lambda v: float(f'{v:.6g}'), otypes=[object])(x).tolist() if x.size else x.tolist()


def evaluation(alg, state, test, task: configs.FloralTask, routed: bool) -> dict:
  """``{'test': headline metrics, 'per_client': {count, loss, accuracy}, 'router_probs': [K][C]}`` of ``state``."""
  per = {k: np.asarray(v) for k, v in jax.device_get(evaluate(alg, state, test)).items()}
  record = {'test': test_metrics(task, algorithms.summarize(per))}
  count = per['count']
  clients = {'count': count, 'loss': per['loss'] / np.maximum(count, 1)}
  if 'correct' in per:
    clients['accuracy'] = per['correct'] / np.maximum(count, 1)
  record['per_client'] = {k: _short(v) for k, v in clients.items()}
  record['per_client']['count'] = count.astype(np.int64).tolist()
  if routed:  # p(c|k) = softmax(logits / T): the router without training noise or floor, as the server weighs
    record['router_probs'] = _short(aggregation_probs(state.clients['logits'], task.temperature))
  return record


def make_unit(method: str, seed: int, task: configs.FloralTask, data, plan: dict, cache: dict) -> loop.Unit:
  """The :class:`loop.Unit` of ``method`` and ``seed`` (the compiled round is shared through ``cache``)."""
  train, test = client_data(data.train), client_data(data.test)
  # A client never has more rows than the padded maximum, so a larger batch only adds masked padding rows: capping
  # it there leaves every update unchanged and saves the work (the offline MNIST: 10 rows, batch 32).
  rows = jax.tree.leaves(train.x)[0].shape[1]
  task = dataclasses.replace(task, batch_size=min(task.batch_size, rows))
  k = data.train.num_clients
  key = (method, task.batch_size, tuple(np.asarray(data.clusters).tolist()))
  if key not in cache:
    alg = floral_tasks.build_algorithm(method, task, data)
    # Conv models on a CPU: one client per step of the compiled round (benchmarks/README.md: all clients vmapped at
    # once ran 17 % slower than the client-by-client loop at 4-8 clients; one per step matched or beat it).
    mapping = chunked_clients(1) if task.model in CONV_MODELS and jax.default_backend() == 'cpu' else None
    cache[key] = alg, make_round(alg, clients_per_round=clients_per_round(k, task.fraction), mapping=mapping)
  alg, round_fn = cache[key]
  routed = configs.METHODS[method].kind in configs.ROUTED_KINDS

  def step(state, n):
    if plan['compiled_loop']:
      state, metrics = round_fn.run(state, train, n)
    else:
      state, metrics = round_fn(state, train)
    return state, loop.round_summaries(metrics, n)

  def headline(record):
    return {} if record is None else {task.metric: format_metric(task, record['test'][task.metric])}

  return loop.Unit(method, seed, init=lambda: alg.init(jax.random.key(seed), k), step=step,
                   evaluate=lambda state: evaluation(alg, state, test, task, routed), headline=headline)


# ---------------------------------------------------------------------------------------------------------------------
# The results document
# ---------------------------------------------------------------------------------------------------------------------


def new_results(task: configs.FloralTask, plan: dict) -> dict:
  out = {'runner': RUNNER, 'task': task.name, 'rounds': task.rounds, 'seeds': plan['seeds'], 'metric': task.metric,
         'config': dataclasses.asdict(task), 'status': 'running', 'methods': {}, 'units': {}, 'data': {}}
  if task.column is not None:
    paper = configs.PAPER[task.column]
    out['paper'] = {'column': task.column, 'unit': 'test accuracy %, mean (std)',
                    'methods': {m: list(paper[configs.METHODS[m].paper_row]) for m in plan['methods']}}
  return out


def unit_record(outcome: loop.Outcome, task: configs.FloralTask, state_path: str | None) -> dict:
  record = {'status': outcome.status, 'round': outcome.round, 'seconds': round(outcome.seconds, 1)}
  if outcome.evaluation is not None and outcome.status == 'done':
    record.update(outcome.evaluation['test'])
    record['state'] = state_path
  record['curve'] = [[r, test[task.metric]] for r, test in outcome.curve]
  if outcome.error:
    record['error'] = outcome.error
  return record


def method_summary(units: dict, seeds: list[int], metric: str) -> dict:
  """``{metric: mean, std, per_seed, ...}`` over ``seeds``; mean and std are null until every seed is done."""
  recs = [units.get(str(s), {}) for s in seeds]
  done = [r.get('status') == 'done' for r in recs]
  out = {metric: None, 'std': None, 'per_seed': [r.get(metric) if d else None for r, d in zip(recs, done)],
         'seconds': round(sum(r.get('seconds', 0.0) for r in recs), 1), 'curves': [r.get('curve', []) for r in recs]}
  if metric == 'test_accuracy':
    out['test_loss_per_seed'] = [r.get('test_loss') if d else None for r, d in zip(recs, done)]
  failed = {str(s): r['error'] for s, r in zip(seeds, recs) if r.get('status') == 'failed'}
  if failed:
    out.update(status='failed', errors=failed, reason=f'seed(s) {", ".join(failed)} failed')
  elif all(done):
    values = np.asarray(out['per_seed'], np.float64)
    out.update({metric: float(values.mean()), 'std': float(values.std()), 'status': 'done'})
  else:
    out.update(status='running', reason='not every seed has finished')
  return out


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _open_run(plan: dict, argv: list[str]) -> tuple[RunDir, dict]:
  task = plan['task']
  if os.path.exists(os.path.join(plan['out'], 'config.json')) and plan.get('resuming'):
    run = RunDir.open(plan['out'])
    return run, run.read_results() or new_results(task, plan)
  config = {'runner': RUNNER, 'task': task.name, 'settings': dataclasses.asdict(task),
            'plan': {k: plan[k] for k in _PLAN_KEYS}, 'argv': argv, 'environment': environment()}
  return RunDir.create(plan['out'], config), new_results(task, plan)


def _data_record(data, seconds: float) -> dict:
  return {'clients': int(data.train.num_clients), 'clusters': np.asarray(data.clusters).tolist(),
          'train_examples': int(np.sum(data.train.counts)), 'test_examples': int(np.sum(data.test.counts)),
          'seconds': round(seconds, 1)}


def run(plan: dict, argv: list[str]) -> tuple[dict, int]:
  """Trains every unfinished (method, seed) of ``plan``; returns the results and the exit status.

  Exit status: 0 when every unit is done, 1 when one failed (the others still ran), ``128 + signal`` when a
  SIGINT / SIGTERM stopped the run (after checkpointing the unit in progress).
  """
  task, progress = plan['task'], Progress(quiet=plan['quiet'])
  run_dir, results = _open_run(plan, argv)
  schedule = loop.Schedule(task.rounds, plan['eval_every'], plan['checkpoint_every'], plan['keep'],
                           plan['max_rejected_rounds'], chunk=plan['compiled_loop'])
  progress.print(f'task {task.name}: {task.rounds} rounds, seeds {plan["seeds"]}, methods {" ".join(plan["methods"])}'
                 f'; run directory {run_dir.path}; devices {jax.devices()}')
  datasets = {}

  def save():
    run_dir.write_results(results)
    if plan['json']:
      strict_json.write(plan['json'], results)

  with loop.StopRequest() as stop:
    for method in plan['methods']:
      units, cache = results['units'].setdefault(method, {}), {}
      for seed in plan['seeds']:
        if units.get(str(seed), {}).get('status') in FINISHED:
          continue
        if seed not in datasets:
          t0 = time.perf_counter()
          datasets[seed] = floral_tasks.load_data(task, seed, data_dir=plan['data_dir'])
          results['data'][str(seed)] = _data_record(datasets[seed], time.perf_counter() - t0)
          progress.print(f'data seed {seed}: {results["data"][str(seed)]}')
        units[str(seed)] = {'status': 'running'}
        save()
        outcome = loop.train_unit(make_unit(method, seed, task, datasets[seed], plan, cache), run_dir, schedule,
                                  progress=progress, stop=stop)
        state_dir = os.path.join(run_dir.checkpoint_dir(method, seed), str(outcome.round))
        units[str(seed)] = unit_record(outcome, task, os.path.relpath(state_dir, run_dir.path))
        results['methods'][method] = method_summary(units, plan['seeds'], task.metric)
        if outcome.status == 'failed':
          progress.error(outcome.error)
        save()
        if outcome.status == 'interrupted':
          results['status'] = 'interrupted'
          save()
          progress.always(f'interrupted at {method} seed {seed} round {outcome.round}; checkpoint saved. Continue '
                          f'with: python -m fedjax_adapters.experiments.floral --resume {run_dir.path}')
          run_dir.close()
          return results, 128 + int(stop.signum)
      r = results['methods'].get(method)
      if r is not None:
        progress.print(f'{method}: {task.metric} {format_metric(task, r[task.metric])} +- '
                       f'{format_metric(task, r["std"])} ({r["seconds"]:.0f} s)')
  failed = [f'{m} seed {s}' for m, units in results['units'].items() for s, u in units.items()
            if u.get('status') == 'failed']
  status = 1 if failed else 0
  results['status'] = 'failed' if failed else 'done'
  save()
  run_dir.close()
  from fedjax_adapters.experiments import report  # pylint: disable=g-import-not-at-top
  progress.always('\n' + report.results_table([results]))
  return results, status

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

from fedjax_adapters import algorithms, experiment
from fedjax_adapters.adapters.mixture import aggregation_probs
from fedjax_adapters.experiments import floral_tasks
from fedjax_adapters.experiments.configs import floral as configs
from fedjax_adapters.experiments.runlib import dp_flags, loop, robust_flags, throughput
from fedjax_adapters.experiments.runlib.environment import environment
from fedjax_adapters.experiments.runlib.progress import Progress
from fedjax_adapters.federated import (chunked_clients, client_data, clients_per_round, dp_aggregator, evaluate,
                                       make_round)

RUNNER = 'floral'
CONV_MODELS = ('cifar_cnn', 'vgg8')
_PLAN_KEYS = ('methods', 'seeds', 'eval_every', 'checkpoint_every', 'keep', 'max_rejected_rounds', 'compiled_loop',
              'data_dir', 'dp', 'robust')


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


def evaluation(alg, state, test, task: configs.FloralTask, routed: bool) -> dict:
  """``{'test': headline metrics, 'per_client': {count, loss, accuracy}, 'router_probs': [K][C]}`` of ``state``."""
  per = {k: np.asarray(v) for k, v in jax.device_get(evaluate(alg, state, test)).items()}
  record = {'test': test_metrics(task, algorithms.summarize(per)), 'per_client': experiment.per_client_record(per)}
  if routed:  # p(c|k) = softmax(logits / T): the router without training noise or floor, as the server weighs
    record['router_probs'] = experiment.short_floats(aggregation_probs(state.clients['logits'], task.temperature))
  return record


def make_unit(method: str, seed: int, task: configs.FloralTask, data, plan: dict, cache: dict,
              schedule: loop.Schedule) -> loop.Unit:
  """The :class:`loop.Unit` of ``method`` and ``seed`` (the compiled round is shared through ``cache``)."""
  robust = plan.get('robust') or {}
  y = robust_flags.poison_labels(robust, np.asarray(data.train.y), int(np.max(data.train.y)) + 1, seed)
  train, test = client_data(data.train._replace(y=y)), client_data(data.test)
  # A client never has more rows than the padded maximum, so a larger batch only adds masked padding rows: capping
  # it there leaves every update unchanged and saves the work (the offline MNIST: 10 rows, batch 32).
  rows = jax.tree.leaves(train.x)[0].shape[1]
  task = dataclasses.replace(task, batch_size=min(task.batch_size, rows))
  k = data.train.num_clients
  key = (method, task.batch_size, tuple(np.asarray(data.clusters).tolist()), seed if robust.get('attack') else None)
  if key not in cache:
    alg = floral_tasks.build_algorithm(method, task, data, reducer=robust_flags.reducer(robust))
    # Conv models on a CPU: one client per step of the compiled round (benchmarks/README.md: all clients vmapped at
    # once ran 17 % slower than the client-by-client loop at 4-8 clients; one per step matched or beat it).
    mapping = chunked_clients(1) if task.model in CONV_MODELS and jax.default_backend() == 'cpu' else None
    alg, sampling = private(alg, method, plan.get('dp'), k, clients_per_round(k, task.fraction))
    round_fn = make_round(alg, mapping=mapping, adversary=robust_flags.adversary(robust, k, seed), **sampling)
    size = experiment.chunk_size(schedule) if plan['compiled_loop'] else None
    cache[key] = (alg, round_fn, experiment.compiled_rounds(round_fn, size))
  # The compiled round is shared between seeds; each seed's unit trains on its own clients' data.
  alg, round_fn, chunks = cache[key]
  step, any_length = experiment.round_step(round_fn, train, chunks)
  if plan.get('dp'):
    step = with_epsilon(step, plan['dp'])
  routed = configs.METHODS[method].kind in configs.ROUTED_KINDS

  def headline(record):
    return {} if record is None else {task.metric: format_metric(task, record['test'][task.metric])}

  return loop.Unit(method, seed, init=lambda: alg.init(jax.random.key(seed), k), step=step, any_length=any_length,
                   evaluate=lambda state: evaluation(alg, state, test, task, routed), headline=headline)


def client_steps_per_round(task: configs.FloralTask, data) -> float:
  """Local optimizer steps per round summed over the sampled clients (``runlib.throughput``): ``M`` times the
  clients' mean steps, at the batch size :func:`make_unit` trains with. With partial participation this is the
  expectation under uniform sampling, exact when every client takes the same number of steps (the MNIST tasks)."""
  rows = jax.tree.leaves(data.train.x)[0].shape[1]
  steps = throughput.local_steps(data.train.counts, batch_size=min(task.batch_size, rows), num_epochs=task.num_epochs)
  return clients_per_round(data.train.num_clients, task.fraction) * float(np.mean(steps))


def private(alg, method: str, dp: dict | None, k: int, m: int):
  """``alg`` with the DP aggregator of ``dp`` (unchanged when None) and ``make_round``'s sampling arguments."""
  if not dp:
    return alg, {'clients_per_round': m}
  kind = configs.METHODS[method].kind
  mixture = {'floral': ('adapters',), 'ensemble': ('members',)}.get(kind, ())
  alg = alg.replace(aggregator=dp_aggregator(alg.aggregator, dp_flags.config(dp), mixture_keys=mixture))
  return alg, dp_flags.round_sampling(dp, k, m)


def with_epsilon(step, dp: dict):
  """``step`` whose per-round summaries (metrics.jsonl) carry ``dp_epsilon`` after that round."""
  cache = {}

  def run(state, n):
    state, summaries = step(state, n)
    last = int(state.round)
    for i, summary in enumerate(summaries):
      summary['dp_epsilon'] = dp_flags.epsilon_after(dp, last - len(summaries) + 1 + i, cache)
    return state, summaries

  return run


# ---------------------------------------------------------------------------------------------------------------------
# The results document
# ---------------------------------------------------------------------------------------------------------------------


def new_results(task: configs.FloralTask, plan: dict) -> dict:
  out = {'runner': RUNNER, 'task': task.name, 'rounds': task.rounds, 'seeds': plan['seeds'], 'metric': task.metric,
         'config': dataclasses.asdict(task), 'status': 'running', 'methods': {}, 'units': {}, 'data': {}}
  if plan.get('dp'):
    out['dp'] = dp_flags.summary(plan['dp'], task.rounds)
  if task.column is not None:
    paper = configs.PAPER[task.column]
    out['paper'] = {'column': task.column, 'unit': 'test accuracy %, mean (std)',
                    'methods': {m: list(paper[configs.METHODS[m].paper_row]) for m in plan['methods']
                                if configs.METHODS[m].paper_row}}  # the LoRA family has no paper row
  return out


def unit_record(outcome: loop.Outcome, task: configs.FloralTask, state_path: str | None) -> dict:
  return experiment.unit_record(outcome, task.metric, state_path)


def method_summary(units: dict, seeds: list[int], metric: str) -> dict:
  """``{metric: mean, std, per_seed, ..., client_steps}`` over ``seeds``; mean and std are null until every seed is
  done; ``client_steps`` (summed over the seeds, as ``seconds``) once every seed recorded them."""
  out = experiment.method_summary(units, seeds, metric)
  steps = throughput.method_steps(units.get(str(s), {}) for s in seeds)
  if steps is not None:
    out['client_steps'] = steps
  return out


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def open_run(plan: dict, argv: list[str]) -> experiment.Run:
  """The run directory of ``plan``, locked: a new one, or (``--resume``) the existing one."""
  task = plan['task']
  options = dict(progress=Progress(quiet=plan['quiet']), writers=plan.get('writers', ()), json_path=plan['json'],
                 resume_hint=f'python -m fedjax_adapters.experiments.floral --resume {plan["out"]}')
  if plan.get('resuming'):
    held = experiment.Run.open(plan['out'], runner=RUNNER, **options)
    held.results = held.results or new_results(task, plan)
    return held
  config = {'runner': RUNNER, 'task': task.name, 'settings': dataclasses.asdict(task),
            'plan': {k: plan[k] for k in _PLAN_KEYS + ('writers',) if k in plan}, 'argv': argv,
            'environment': environment()}
  return experiment.Run.create(plan['out'], config, new_results(task, plan), **options)


def _data_record(data, seconds: float) -> dict:
  return {'clients': int(data.train.num_clients), 'clusters': np.asarray(data.clusters).tolist(),
          'train_examples': int(np.sum(data.train.counts)), 'test_examples': int(np.sum(data.test.counts)),
          'seconds': round(seconds, 1)}


def run(plan: dict, argv: list[str]) -> tuple[dict, int]:
  """Trains every unfinished (method, seed) of ``plan``; returns the results and the exit status.

  Exit status: 0 when every unit is done, 1 when one failed (the others still ran), ``128 + signal`` when a
  SIGINT / SIGTERM stopped the run (after checkpointing the unit in progress).
  """
  task = plan['task']
  held = open_run(plan, argv)
  results, progress = held.results, held.progress
  schedule = loop.Schedule(task.rounds, plan['eval_every'], plan['checkpoint_every'], plan['keep'],
                           plan['max_rejected_rounds'], chunk=plan['compiled_loop'])
  datasets, cache = {}, {}

  def make(method, seed):
    if seed not in datasets:
      t0 = time.perf_counter()
      datasets[seed] = floral_tasks.load_data(task, seed, data_dir=plan['data_dir'])
      results['data'][str(seed)] = _data_record(datasets[seed], time.perf_counter() - t0)
      progress.print(f'data seed {seed}: {results["data"][str(seed)]}')
    if cache and next(iter(cache))[0] != method:
      cache.clear()  # one method's compiled round at a time
    return make_unit(method, seed, task, datasets[seed], plan, cache, schedule)

  def finish(method, seed, outcome):
    units = results['units'][method]
    state_dir = os.path.join(held.dir.checkpoint_dir(method, seed), str(outcome.round))
    units[str(seed)] = unit_record(outcome, task, os.path.relpath(state_dir, held.dir.path))
    units[str(seed)]['client_steps'] = round(outcome.round * client_steps_per_round(task, datasets[seed]))
    r = results['methods'][method] = method_summary(units, plan['seeds'], task.metric)
    if seed == plan['seeds'][-1] and outcome.status != 'interrupted':
      progress.print(f'{method}: {task.metric} {format_metric(task, r[task.metric])} +- '
                     f'{format_metric(task, r["std"])} ({r["seconds"]:.0f} s)')

  with held:
    progress.print(f'task {task.name}: {task.rounds} rounds, seeds {plan["seeds"]}, methods '
                   f'{" ".join(plan["methods"])}; run directory {held.dir.path}; devices {jax.devices()}')
    status = experiment.train_all(held, [(m, s) for m in plan['methods'] for s in plan['seeds']], make, schedule,
                                  finish)
  if status == 'interrupted':
    return results, 128 + int(held.stop.signum)
  from fedjax_adapters.experiments import report  # pylint: disable=g-import-not-at-top
  progress.always('\n' + report.summary([results]))
  return results, 1 if status == 'failed' else 0

"""Run a federated experiment of your own: a run directory, checkpoints, exact resume, live progress, trackers.

::

  import fedjax_adapters as fa
  alg = fa.floral(MyModel, num_adaptors=2, loss='mse', lr=0.1, batch_size=4, rank=1, router_lr=0.1)
  result = fa.experiment.run(alg, data.train, data.test, rounds=400, out='runs/mine', eval_every=50,
                             clients_per_round=10, writers=['tensorboard'])
  result = fa.experiment.resume('runs/mine', alg, data.train, data.test)     # after a crash, kill -9 or Ctrl-C
  python -m fedjax_adapters.experiments.report runs/mine                     # table and plots

Any :class:`~fedjax_adapters.federated.Algorithm` (FedAvg of McMahan et al. 2017, FLoRAL of arXiv 2410.03497, your
own) on any ``FederatedData`` / ``ClientData``: the run gets what the paper runners have, because they are built
on the same pieces (:class:`Run`, :func:`train_all`): ``config.json`` / ``metrics.jsonl`` / ``results.json`` /
checkpoints (docs/experiments.md), strict JSON, a lock against a second writer, SIGINT / SIGTERM answered within
seconds with a checkpoint, and a resume whose results are bit for bit those of an uninterrupted run. Errors raise
exceptions (:class:`~fedjax_adapters.experiments.runlib.cli.UserError`, a ``ValueError``), never ``SystemExit``.

``resume(DIR)`` alone continues a paper runner's run (``floral`` / ``feddpa``); a run of :func:`run` needs the same
algorithm and data again (their fingerprints, stored in ``config.json``, are checked).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_adapters import federated
from fedjax_adapters.algorithms import summarize
from fedjax_adapters.federated.round import check_state_matches
from fedjax_adapters.experiments import report
from fedjax_adapters.experiments.runlib import loop, strict_json
from fedjax_adapters.experiments.runlib import writers as writers_lib
from fedjax_adapters.experiments.runlib.cli import UserError
from fedjax_adapters.experiments.runlib.environment import environment
from fedjax_adapters.experiments.runlib.progress import Progress
from fedjax_adapters.experiments.runlib.rundir import FINGERPRINT, RunDir, check_output_file, default_path, \
    fingerprint as settings_fingerprint
from fedjax_adapters.experiments.runlib.loop import Outcome, Schedule, Unit, round_summaries

__all__ = ['Result', 'Run', 'Schedule', 'Unit', 'UserError', 'resume', 'run', 'train_all']

RUNNER = 'experiment'
FINISHED = ('done', 'failed')
PLAN_KEYS = ('seeds', 'eval_every', 'checkpoint_every', 'keep', 'max_rejected_rounds', 'compiled_loop')
# Runners whose runs resume(DIR) continues by itself: runner name -> its command-line module.
RUNNER_MODULES = {'floral': 'fedjax_adapters.experiments.floral', 'feddpa': 'fedjax_adapters.experiments.feddpa'}


# ---------------------------------------------------------------------------------------------------------------------
# A run directory held by this process
# ---------------------------------------------------------------------------------------------------------------------


class Run:
  """A run directory held (locked) by this process while a ``with`` block trains in it.

  Inside the block SIGINT / SIGTERM request a stop (:class:`~fedjax_adapters.experiments.runlib.loop.StopRequest`);
  a second Ctrl-C marks ``results.json`` interrupted and exits at once. Create with :meth:`create` (a new run) or
  :meth:`open` (a resume; the stored settings' fingerprint is checked first).

  Attributes:
    dir: the :class:`~fedjax_adapters.experiments.runlib.rundir.RunDir`.
    results: the results document (``results.json``), written by :meth:`save`.
    progress: where progress goes.
    writers: metric writers besides ``metrics.jsonl``.
    json_path: a copy of ``results.json`` is also written here (checked up front).
    resume_hint: how to continue the run, printed when a signal stops it.
  """

  def __init__(self, run_dir: RunDir, results: dict[str, Any], *, progress: Progress | None = None,
               writers: Sequence[Any] = (), json_path: str | None = None, resume_hint: str | None = None):
    self.dir, self.results = run_dir, results
    self.progress = progress or Progress()
    self.json_path = json_path and check_output_file(json_path, '--json', run_dir.path)
    self.resume_hint = resume_hint or f'fedjax_adapters.experiment.resume({run_dir.path!r}, ...)'
    config = run_dir.config
    self.fingerprint = config.get(FINGERPRINT)
    name = str(config.get('task') or config.get('config') or config.get('runner'))
    self.writers = writers_lib.make(writers, run_dir.path, name, config.get('settings') or {})
    self.stop = loop.StopRequest(on_abort=self._abort)
    self._current: tuple[str, int] | None = None

  @classmethod
  def create(cls, path: str, config: dict[str, Any], results: dict[str, Any], **kwargs) -> Run:
    """A new run in ``path`` (see :meth:`RunDir.create`); ``config`` becomes ``config.json``."""
    return cls(RunDir.create(path, config), results, **kwargs)

  @classmethod
  def open(cls, path: str, *, runner: str | None = None, **kwargs) -> Run:
    """An existing run, locked, to continue. Nothing is written until training starts.

    Raises:
      UserError: no run there, another runner's run, a config.json edited since the run started (its settings no
        longer match the stored fingerprint), or another process holds the run.
    """
    run_dir = RunDir.open(path)
    check_config(run_dir, runner)
    run_dir.lock()
    try:
      results = run_dir.read_results() or {}
      return cls(run_dir, results, **kwargs)
    except BaseException:
      run_dir.close()
      raise

  def __enter__(self) -> Run:
    self.stop.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self.stop.__exit__(*exc)
    try:
      for w in self.writers:
        w.close()
    finally:
      self.dir.close()

  def save(self) -> None:
    """Writes ``results.json`` (atomically) and the ``json_path`` copy."""
    self.dir.write_results(self.results)
    if self.json_path:
      self.dir.guard(lambda: strict_json.write(self.json_path, self.results), self.json_path)

  def status(self, method: str, seed: int) -> str | None:
    return self.results.get('units', {}).get(method, {}).get(str(seed), {}).get('status')

  def train(self, unit: Unit, schedule: Schedule) -> Outcome:
    """Trains ``unit`` (resuming it from its newest intact checkpoint); marks it running in ``results.json``."""
    self.results.setdefault('units', {}).setdefault(unit.method, {})[str(unit.seed)] = {'status': 'running'}
    self.save()
    self._current = (unit.method, unit.seed)
    try:
      return loop.train_unit(unit, self.dir, schedule, progress=self.progress, stop=self.stop,
                             fingerprint=self.fingerprint, writers=self.writers)
    finally:
      self._current = None

  def _abort(self) -> None:
    """On a second Ctrl-C: ``results.json`` says interrupted (the unit resumes from its last checkpoint)."""
    self.results['status'] = 'interrupted'
    if self._current is not None:
      method, seed = self._current
      self.results['units'][method][str(seed)] = {'status': 'interrupted'}
    self.save()


def check_config(run_dir: RunDir, runner: str | None = None) -> dict[str, Any]:
  """``run_dir``'s config.json, checked: the expected ``runner`` and settings that match the stored fingerprint.

  Raises:
    UserError: another runner's run, or settings edited since the run started (nothing is written).
  """
  config = run_dir.config
  if runner is not None and config.get('runner') != runner:
    raise UserError(f'{run_dir.path} holds a {config.get("runner")!r} run, not a {runner!r} run')
  stored = config.get(FINGERPRINT)
  if stored is not None and stored != settings_fingerprint(config):
    raise UserError(f'{run_dir.file("config.json")} was edited after the run started: its settings or plan differ '
                    'from those its checkpoints were written with; restore the file, or start a new run with the '
                    'new settings (--config that file); nothing was written')
  return config


def train_all(run: Run, plan: Sequence[tuple[str, int]], make_unit: Callable[[str, int], Unit], schedule: Schedule,
              finish: Callable[[str, int, Outcome], None]) -> str:
  """Trains every ``(method, seed)`` of ``plan`` that ``run.results`` does not list as done or failed.

  Every unit that will resume from a checkpoint is checked first (an intact step written under this run's
  settings), so a run that cannot continue is refused before anything is written. ``finish(method, seed, outcome)``
  records each outcome in ``run.results`` (saved right after).

  Returns:
    ``'interrupted'`` (a signal stopped it; the unit was checkpointed), ``'failed'`` (a unit failed, the others
    ran) or ``'done'``.
  """
  pending = [(m, s) for m, s in plan if run.status(m, s) not in FINISHED]
  ready = {}
  for m, s in pending:
    if os.path.isdir(run.dir.checkpoint_dir(m, s)):
      ready[m, s] = make_unit(m, s)
      loop.check_start(ready[m, s], run.dir, run.fingerprint)
  for m, s in pending:
    unit = ready.pop((m, s), None) or make_unit(m, s)
    outcome = run.train(unit, schedule)
    if outcome.status == 'failed':
      run.progress.error(outcome.error)
    finish(m, s, outcome)
    if outcome.status == 'interrupted':
      run.results['status'] = 'interrupted'
      run.save()
      run.progress.always(f'interrupted at {m} seed {s} round {outcome.round}; checkpoint saved. Continue with: '
                          f'{run.resume_hint}')
      return 'interrupted'
    run.save()
  failed = any(u.get('status') == 'failed' for units in run.results.get('units', {}).values()
               for u in units.values())
  run.results['status'] = 'failed' if failed else 'done'
  run.save()
  return run.results['status']


# ---------------------------------------------------------------------------------------------------------------------
# Results documents (shared with the FLoRAL runner)
# ---------------------------------------------------------------------------------------------------------------------


def short_floats(x) -> list:
  """A float array as nested lists of 6 significant digits (per-client values and router probabilities)."""
  x = np.asarray(x, np.float64)
  return np.vectorize(lambda v: float(f'{v:.6g}'), otypes=[object])(x).tolist() if x.size else x.tolist()


def per_client_record(per: dict[str, np.ndarray]) -> dict[str, list]:
  """``{count, loss, accuracy}`` per client from :func:`fedjax_adapters.federated.evaluate`'s sums."""
  count = per['count']
  clients = {'loss': per['loss'] / np.maximum(count, 1)}
  if 'correct' in per:
    clients['accuracy'] = per['correct'] / np.maximum(count, 1)
  return {'count': count.astype(np.int64).tolist(), **{k: short_floats(v) for k, v in clients.items()}}


def unit_record(outcome: Outcome, metric: str | None, state_path: str | None) -> dict[str, Any]:
  """A unit's entry in ``results['units']``: status, round, seconds, final test metrics, curve, error."""
  record = {'status': outcome.status, 'round': outcome.round, 'seconds': round(outcome.seconds, 1)}
  if outcome.evaluation is not None and outcome.status == 'done':
    record.update(outcome.evaluation['test'])
    record['state'] = state_path
  record['curve'] = [[r, test.get(metric)] for r, test in outcome.curve]
  if outcome.error:
    record['error'] = outcome.error
  return record


def method_summary(units: dict, seeds: Sequence[int], metric: str) -> dict[str, Any]:
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
# run() and resume(): any algorithm on any data
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  """What :func:`run` / :func:`resume` return.

  Attributes:
    path: the run directory.
    status: ``'done'``, ``'failed'`` or ``'interrupted'``.
    results: the results document (``results.json``).
    states: ``{seed: final ServerState}`` of the seeds this call finished.
  """
  path: str
  status: str
  results: dict[str, Any]
  states: dict[int, Any]

  @property
  def metrics(self) -> dict[str, Any]:
    """``{seed: final test metrics}`` of every finished seed."""
    units = next(iter(self.results.get('units', {}).values()), {})
    return {int(s): {k: v for k, v in u.items() if k.startswith('test_')} for s, u in units.items()
            if u.get('status') == 'done'}


def _digest(tree) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    a = np.asarray(leaf)
    h.update(f'{a.dtype}{a.shape}'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def _structure(algorithm, num_clients: int) -> str:
  shapes = jax.eval_shape(lambda: algorithm.init(jax.random.key(0), num_clients))
  text = str(jax.tree.structure(shapes)) + str([(x.shape, str(x.dtype)) for x in jax.tree.leaves(shapes)])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _settings(algorithm, train, test, round_fn, rounds: int, extra: dict[str, Any]) -> dict[str, Any]:
  """What the run's results depend on, as plain values: the round's pieces and fingerprints of model and data."""
  return {'rounds': rounds, 'algorithm': algorithm.name, 'clients_per_round': round_fn.clients_per_round,
          'sampling': repr(round_fn.sampling), 'mapping': repr(round_fn.mapping), 'guard': repr(round_fn.guard),
          'state_structure': _structure(algorithm, int(train.count.shape[0])), 'train_data': _digest(train),
          'test_data': _digest(test), **extra}


def _evaluation(algorithm, test, evaluate):
  """``state -> evaluation record``: the user's ``evaluate(state) -> {name: number}``, or population loss /
  accuracy and per-client values."""
  def record(state):
    if evaluate is not None:
      return {'test': {k: float(v) for k, v in evaluate(state).items()}}
    per = {k: np.asarray(v) for k, v in jax.device_get(federated.evaluate(algorithm, state, test)).items()}
    summary = summarize(per)
    test_metrics = {'test_loss': summary['loss']}
    if 'accuracy' in summary:
      test_metrics = {'test_accuracy': summary['accuracy'], **test_metrics}
    return {'test': test_metrics, 'per_client': per_client_record(per)}
  return record


class CompiledRounds:
  """``n`` rounds of a compiled round for any ``1 <= n <= size`` in one compiled loop, compiled once.

  ``Round.run`` compiles a ``lax.scan`` per distinct ``n``; this loop takes ``n`` as a traced trip count and writes
  each round's metrics into a ``[size, ...]`` buffer, so the run loop can cut its chunks to any length (to answer a
  signal within seconds) without compiling again. The rounds are the round's own compiled body, so the results are
  bit for bit those of ``Round.run`` and of single rounds (``tests/test_experiment.py`` checks it).

  Args:
    round_fn: a :class:`~fedjax_adapters.federated.Round` with a compiled mapping (``round_fn.compiled``).
    size: the largest ``n``.
  """

  def __init__(self, round_fn, size: int):
    if round_fn.compiled is None:
      raise ValueError('CompiledRounds needs a round with a compiled mapping (not the sequential one).')
    self.round_fn, self.size = round_fn, int(size)
    self._loop = jax.jit(self._rounds)
    self._checked = None

  def _rounds(self, state, data, n):
    body_fn = self.round_fn.compiled
    shapes = jax.eval_shape(lambda s: body_fn(s, data, None, None)[1], state)
    buffer = jax.tree.map(lambda x: jnp.zeros((self.size,) + x.shape, x.dtype), shapes)

    def body(i, carry):
      s, b = carry
      s, metrics = body_fn(s, data, None, None)
      return s, jax.tree.map(lambda old, new: jax.lax.dynamic_update_index_in_dim(old, new, i, 0), b, metrics)
    return jax.lax.fori_loop(0, n, body, (state, buffer))

  def __call__(self, state, data, n: int):
    """``(state after n rounds, every round's metrics [n, ...] as numpy arrays)``."""
    if not 1 <= n <= self.size:
      raise ValueError(f'n must lie in [1, {self.size}], got {n}.')
    if self._checked is not data:  # the checks Round.run makes, once per data
      check_state_matches(state, data)
      self.round_fn.sampling.check(int(data.count.shape[0]))
      if self.round_fn.algorithm.check_data is not None:
        self.round_fn.algorithm.check_data(data)
      self._checked = data
    state, data = self.round_fn.mapping.place(state, data)
    state, metrics = self._loop(state, data, jnp.int32(n))
    return state, jax.tree.map(lambda m: np.asarray(m)[:n], jax.device_get(metrics))


def compiled_rounds(round_fn, size: int | None) -> CompiledRounds | None:
  """The compiled loop of up to ``size`` rounds of ``round_fn`` (None: no ``size``, or the mapping does not compile).
  Build it once and share it between units of different data: it compiles once for equal shapes."""
  return CompiledRounds(round_fn, size) if size and round_fn.compiled is not None else None


def round_step(round_fn, data, chunks: CompiledRounds | None):
  """``step(state, n) -> (state, [summary] * n)`` for a :class:`~fedjax_adapters.experiments.runlib.loop.Unit`
  training on ``data``: ``n`` rounds in one compiled loop when ``chunks`` (:func:`compiled_rounds`) is given (any
  ``n <= size``), else one dispatched round at a time. Returns ``(step, any_length)``."""

  def step(state, n):
    if chunks is not None:
      state, metrics = chunks(state, data, n)
      return state, round_summaries(metrics, n)
    summaries = []
    for _ in range(n):
      state, metrics = round_fn(state, data)
      summaries += round_summaries(metrics, 1)
    return state, summaries
  return step, chunks is not None


def chunk_size(schedule: Schedule) -> int:
  """The longest chunk ``schedule`` runs: the smallest gap between its stops (at least 1)."""
  return max(1, min(schedule.eval_every, schedule.checkpoint_every, schedule.rounds))


def _unit_factory(algorithm, round_fn, train, test, evaluate, schedule: Schedule, method: str):
  num_clients = int(train.count.shape[0])
  record = _evaluation(algorithm, test, evaluate)
  chunks = compiled_rounds(round_fn, chunk_size(schedule) if schedule.chunk else None)
  step, any_length = round_step(round_fn, train, chunks)

  def make(m: str, seed: int) -> Unit:
    del m  # every unit of a run of run() is the same method
    return Unit(method, seed, init=lambda: algorithm.init(jax.random.key(seed), num_clients), step=step,
                evaluate=record, any_length=any_length)
  return make


def _round(algorithm, clients_per_round, sampling, mapping, guard, train):
  if clients_per_round is None and sampling is None:
    clients_per_round = int(train.count.shape[0])
  return federated.make_round(algorithm, clients_per_round=clients_per_round, sampling=sampling, mapping=mapping,
                              guard=guard)


def _check_positive(**values) -> None:
  for name, value in values.items():
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
      raise UserError(f'{name} must be an integer >= 1, got {value!r}')


def _seeds(seeds) -> list[int]:
  seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
  if not seeds or any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0 for s in seeds) or len(
      set(seeds)) != len(seeds):
    raise UserError(f'seeds must be distinct integers >= 0, got {seeds!r}')
  return [int(s) for s in seeds]


def run(algorithm, train, test, *, rounds: int, out: str | None = None, name: str = 'experiment',
        method: str | None = None, seeds: int | Sequence[int] = 0, clients_per_round: int | None = None,
        sampling=None, mapping=None, guard=None, eval_every: int | None = None, checkpoint_every: int | None = None,
        keep_checkpoints: int = 2, max_rejected_rounds: int = 5, compiled_loop: bool = True,
        evaluate: Callable[[Any], dict[str, float]] | None = None, settings: dict[str, Any] | None = None,
        writers: Sequence[Any] = (), quiet: bool = False, json: str | None = None) -> Result:
  """Trains ``algorithm`` on ``train`` for ``rounds`` rounds per seed in a new run directory ``out``.

  Args:
    algorithm: any :class:`~fedjax_adapters.federated.Algorithm`.
    train, test: ``FederatedData`` / ``ClientData`` of the same ``K`` clients (``[K, N, ...]``).
    rounds: federated rounds per seed.
    out: the run directory (default ``runs/<name>-<time>-<random>``); it must not hold a run.
    name: the run's name (the report's column); method: its row (default: ``algorithm.name``).
    seeds: a seed or a list; each seed initializes the state (and so the sampling) anew.
    clients_per_round, sampling, mapping, guard: as for :func:`fedjax_adapters.federated.make_round` (default:
      every client every round).
    eval_every: evaluate every this many rounds (default ``rounds // 20``) and after the last.
    checkpoint_every: checkpoint every this many rounds (default ``rounds // 10``) and after the last;
      keep_checkpoints: how many are kept.
    max_rejected_rounds: a seed fails after this many consecutive rounds with every sampled client rejected.
    compiled_loop: run the rounds between stops in one compiled loop (same results, faster).
    evaluate: ``state -> {metric: number}`` (default: population ``test_loss`` / ``test_accuracy`` and per-client
      values of :func:`fedjax_adapters.federated.evaluate` on ``test``).
    settings: extra plain values that define your run (learning rate, ...): stored in config.json and part of the
      fingerprint a resume is checked against.
    writers: ``'tensorboard'``, ``'wandb'``, ``'mlflow'`` and/or objects with ``write(method, seed, round,
      record)`` and ``close()`` (see :mod:`~fedjax_adapters.experiments.runlib.writers`); ``metrics.jsonl`` is
      always written.
    quiet: no progress output. json: also write the results document to this file.

  Returns:
    a :class:`Result`. A SIGINT / SIGTERM stops at the next sub-chunk with a checkpoint (``status
    'interrupted'``); continue with :func:`resume`.

  Raises:
    UserError (a ValueError): bad arguments, an ``out`` that holds a run or is locked, a file that cannot be
      written.
  """
  train, test = federated.client_data(train), federated.client_data(test)
  _check_positive(eval_every=eval_every, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                  max_rejected_rounds=max_rejected_rounds)
  if not isinstance(rounds, (int, np.integer)) or isinstance(rounds, bool) or not 0 <= rounds < 2 ** 31:
    raise UserError(f'rounds must be an integer in [0, 2**31), got {rounds!r}')
  seeds = _seeds(seeds)
  round_fn = _round(algorithm, clients_per_round, sampling, mapping, guard, train)
  plan = {'seeds': seeds, 'eval_every': eval_every or max(1, rounds // 20),
          'checkpoint_every': checkpoint_every or max(1, rounds // 10), 'keep': keep_checkpoints,
          'max_rejected_rounds': max_rejected_rounds, 'compiled_loop': bool(compiled_loop)}
  method = method or algorithm.name
  config = {'runner': RUNNER, 'task': name, 'method': method, 'settings': strict_json.sanitize(
      _settings(algorithm, train, test, round_fn, int(rounds), dict(settings or {})))[0],
            'plan': plan, 'argv': list(sys.argv), 'environment': environment()}
  results = {'runner': RUNNER, 'task': name, 'rounds': int(rounds), 'seeds': seeds, 'metric': None,
             'config': config['settings'], 'status': 'running', 'methods': {}, 'units': {}}
  new = Run.create(out or default_path(name), config, results, progress=Progress(quiet=quiet), writers=writers,
                   json_path=json)
  return _train(new, config, round_fn, train, test, evaluate)


def resume(path: str, algorithm=None, train=None, test=None, *, sampling=None, mapping=None, guard=None,
           evaluate: Callable[[Any], dict[str, float]] | None = None, writers: Sequence[Any] = (),
           quiet: bool = False, json: str | None = None) -> Result:
  """Continues the run in ``path``: finished seeds are kept, the others continue from their newest intact
  checkpoint, with results bit for bit those of an uninterrupted run.

  A paper runner's run (``python -m fedjax_adapters.experiments.floral`` / ``feddpa``) needs only ``path``. A run of
  :func:`run` needs the same ``algorithm``, ``train`` and ``test`` (and ``sampling`` / ``mapping`` / ``guard`` /
  ``evaluate`` if given there): their fingerprints must match the ones in ``config.json``.

  Raises:
    UserError (a ValueError): not a run directory, missing or different algorithm / data, an edited config.json,
      no intact checkpoint, or another process holds the run. Nothing is written then.
  """
  config = RunDir.open(path).config
  runner = config.get('runner')
  if runner in RUNNER_MODULES:
    results, status = importlib.import_module(RUNNER_MODULES[runner]).resume(path, quiet=quiet, json=json)
    return Result(os.path.abspath(path), results.get('status', status), results, {})
  if runner != RUNNER:
    raise UserError(f'{path} holds a {runner!r} run, which resume() cannot continue')
  if algorithm is None or train is None or test is None:
    raise UserError(f'{path} was written by fedjax_adapters.experiment.run: pass the same algorithm, train and test '
                    'data to resume it')
  train, test = federated.client_data(train), federated.client_data(test)
  settings = config['settings']
  round_fn = _round(algorithm, settings['clients_per_round'] if sampling is None else None, sampling, mapping,
                    guard, train)
  extra = {k: v for k, v in settings.items() if k not in _settings_keys()}
  ours = strict_json.sanitize(_settings(algorithm, train, test, round_fn, settings['rounds'], extra))[0]
  differ = [k for k in ours if ours[k] != settings.get(k)]
  if differ:
    raise UserError(f'{path} was run with another {", ".join(differ)} than given now; pass the same algorithm, '
                    'data and round settings (nothing was written)')
  held = Run.open(path, runner=RUNNER, progress=Progress(quiet=quiet), writers=writers, json_path=json)
  return _train(held, config, round_fn, train, test, evaluate)


def _settings_keys() -> tuple[str, ...]:
  return ('rounds', 'algorithm', 'clients_per_round', 'sampling', 'mapping', 'guard', 'state_structure',
          'train_data', 'test_data')


def _train(held: Run, config: dict[str, Any], round_fn, train, test, evaluate) -> Result:
  """Trains every unfinished seed of ``held``'s run; records results as it goes."""
  plan, settings, method = config['plan'], config['settings'], config['method']
  schedule = Schedule(settings['rounds'], plan['eval_every'], plan['checkpoint_every'], plan['keep'],
                      plan['max_rejected_rounds'], chunk=plan['compiled_loop'])
  make = _unit_factory(round_fn.algorithm, round_fn, train, test, evaluate, schedule, method)
  states = {}

  def finish(m, seed, outcome):
    results = held.results
    if outcome.evaluation and results.get('metric') is None:
      keys = list(outcome.evaluation['test'])
      results['metric'] = 'test_accuracy' if 'test_accuracy' in keys else keys[0]
    state_dir = os.path.join(held.dir.checkpoint_dir(m, seed), str(outcome.round))
    units = results['units'].setdefault(m, {})
    units[str(seed)] = unit_record(outcome, results.get('metric'), os.path.relpath(state_dir, held.dir.path))
    if results.get('metric'):
      results['methods'][m] = method_summary(units, plan['seeds'], results['metric'])
    if outcome.status == 'done':
      states[seed] = outcome.state

  held.resume_hint = f'fedjax_adapters.experiment.resume({held.dir.path!r}, algorithm, train, test)'
  with held:
    held.progress.print(f'run {config["task"]}: {settings["rounds"]} rounds, seeds {plan["seeds"]}; run directory '
                        f'{held.dir.path}; devices {jax.devices()}')
    status = train_all(held, [(method, s) for s in plan['seeds']], make, schedule, finish)
  if status != 'interrupted' and held.results.get('metric'):
    held.progress.print('\n' + report.summary([held.results]))
  return Result(held.dir.path, status, held.results, states)

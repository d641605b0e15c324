"""Training one unit (a method and a seed) with checkpoints, resume, signals, divergence checks and progress.

:func:`train_unit` is the loop both runners share. The runner supplies three functions of its own:

* ``init() -> state``: the freshly initialized :class:`~fedjax_adapters.federated.round.ServerState`;
* ``step(state, n) -> (state, [summary] * n)``: ``n`` rounds and a summary dict per round (``train_loss``,
  ``clients``, ``rejected``, ...; :func:`round_summaries` builds them from a round's metrics);
* ``evaluate(state) -> dict``: a strict-JSON-able evaluation record: ``test`` (a dict of headline numbers, all of
  which must be finite), ``per_client`` metrics, ``router_probs``, ...

Resuming is exact: a round's randomness comes only from the state's key and round counter, so restoring the state
and the loop's own bookkeeping (saved as the checkpoint's metadata) continues the run bit for bit. With
``chunk=True`` (several rounds per ``step``, e.g. one compiled loop) the chunks end at the same rounds whether or
not the run was interrupted: every multiple of ``eval_every`` and ``checkpoint_every``, and the last round.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from fedjax_adapters.experiments.runlib import strict_json
from fedjax_adapters.experiments.runlib.progress import Progress
from fedjax_adapters.experiments.runlib.rundir import RunDir
from fedjax_adapters import checkpoint
from fedjax_adapters.federated import REJECT_REASONS


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When a unit evaluates, checkpoints and gives up.

  Attributes:
    rounds: rounds to train.
    eval_every: evaluate (and check the state is finite) every this many rounds, and after the last.
    checkpoint_every: save a checkpoint every this many rounds, and after the last.
    keep: checkpoints kept per unit (the newest).
    max_rejected_rounds: fail after this many consecutive rounds in which every sampled client was rejected.
    chunk: ``step`` runs all rounds up to the next evaluation / checkpoint at once (else one round per call).
  """
  rounds: int
  eval_every: int
  checkpoint_every: int
  keep: int = 2
  max_rejected_rounds: int = 5
  chunk: bool = False

  def next_stop(self, done: int) -> int:
    """The first round after ``done`` at which the loop must stop to evaluate or checkpoint."""
    stops = [self.rounds]
    for every in (self.eval_every, self.checkpoint_every):
      stops.append((done // every + 1) * every)
    return min(stops)


@dataclasses.dataclass
class Outcome:
  """How a unit ended: ``status`` ``'done'``, ``'failed'`` or ``'interrupted'``, at round ``round``."""
  status: str
  round: int
  evaluation: dict[str, Any] | None = None
  curve: list = dataclasses.field(default_factory=list)
  error: str | None = None
  seconds: float = 0.0
  state: Any = None


class StopRequest:
  """Catches SIGINT / SIGTERM while active: the loop checkpoints and returns at the next round boundary.

  A second SIGINT interrupts at once (``KeyboardInterrupt``). ``signum`` is the signal received, or None.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame  # unused
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self) -> StopRequest:
    for s in (signal.SIGINT, signal.SIGTERM):
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  @property
  def requested(self) -> bool:
    return self.signum is not None


# ---------------------------------------------------------------------------------------------------------------------
# Per-round summaries and state checks
# ---------------------------------------------------------------------------------------------------------------------


def round_summaries(metrics: dict[str, Any], rounds: int, *, loss_key: str = 'loss',
                    count_key: str = 'count') -> list[dict[str, Any]]:
  """One summary per round from a round's metrics (``[M]`` per key) or several rounds' (``[rounds, M]``).

  ``train_loss`` is the example-weighted mean over the clients that counted (real and not rejected); ``clients``
  the real sampled clients; ``rejected`` how many of them the round's update screening rejected, and
  ``reject_reasons`` why (names from :data:`fedjax_adapters.federated.REJECT_REASONS`).
  """
  host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
  if rounds == 1 and host[loss_key].ndim == 1:
    host = {k: v[None] for k, v in host.items()}
  out = []
  for r in range(rounds):
    loss, count = host[loss_key][r].astype(np.float64), host[count_key][r].astype(np.float64)
    mask = host['client_mask'][r].astype(bool)
    rejected = host['rejected'][r].astype(bool) & mask
    ok = mask & ~rejected
    total = float(count[ok].sum())
    summary = {'train_loss': float(loss[ok].sum()) / total if total > 0 else float('nan'),
               'clients': int(mask.sum()), 'rejected': int(rejected.sum())}
    if summary['rejected']:
      names, counts = np.unique([REJECT_REASONS[int(i)] for i in host['reject_reason'][r][rejected]],
                                return_counts=True)
      summary['reject_reasons'] = {str(n): int(c) for n, c in zip(names, counts)}
    out.append(summary)
  return out


@jax.jit
def _finite_parts(global_params, clients):
  def finite(tree):
    leaves = [jax.numpy.all(jax.numpy.isfinite(x)) for x in jax.tree.leaves(tree)
              if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return jax.numpy.all(jax.numpy.stack(leaves)) if leaves else jax.numpy.bool_(True)
  return finite(global_params), finite(clients)


def nonfinite_parts(state) -> list[str]:
  """The parts of a ``ServerState`` holding a NaN or infinity: a sublist of ``['global_params', 'clients']``."""
  g, c = jax.device_get(_finite_parts(state.global_params, state.clients))
  return [name for name, ok in (('global_params', g), ('clients', c)) if not ok]


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Unit:
  """One (method, seed) and the runner's functions for it (see the module docstring)."""
  method: str
  seed: int
  init: Callable[[], Any]
  step: Callable[[Any, int], tuple[Any, list[dict[str, Any]]]]
  evaluate: Callable[[Any], dict[str, Any]]
  headline: Callable[[dict[str, Any]], dict[str, str]] = lambda evaluation: {}

  @property
  def name(self) -> str:
    return f'{self.method} seed {self.seed}'


def _restore(unit: Unit, ckpts: checkpoint.Manager, run: RunDir):
  """(state, bookkeeping, rounds done) from the latest checkpoint, or a fresh start; trims metrics.jsonl to it."""
  state = unit.init()
  host = {'rejected_streak': 0, 'elapsed_s': 0.0, 'curve': []}
  done = ckpts.latest_step()
  if done is not None:
    state = ckpts.restore(done, like=state)
    host.update(ckpts.metadata(done)['host'])
  done = done or 0
  run.keep_records(lambda r: (r.get('method'), r.get('seed')) != (unit.method, unit.seed) or r['round'] <= done)
  return state, host, done


def _save(ckpts: checkpoint.Manager, done: int, state, host: dict, *, force: bool) -> None:
  if force or done % ckpts.every == 0:
    ckpts.save(done, state, metadata={'host': strict_json.sanitize(host)[0]}, force=True)


def _failure(unit: Unit, schedule: Schedule, r: int, summary: dict, host: dict) -> str | None:
  if summary['clients'] and summary['rejected'] == summary['clients']:
    host['rejected_streak'] += 1
  else:
    host['rejected_streak'] = 0
  if host['rejected_streak'] >= min(schedule.max_rejected_rounds, schedule.rounds):
    why = ', '.join(f'{k} {v}' for k, v in summary.get('reject_reasons', {}).items())
    return (f'{unit.name} round {r}: every sampled client was rejected for {host["rejected_streak"]} consecutive '
            f'rounds ({why}); the method diverged')
  return None


def _evaluate(unit: Unit, state, r: int) -> tuple[dict, str | None]:
  bad = nonfinite_parts(state)
  if bad:
    return {}, f'{unit.name} round {r}: the state is not finite ({" and ".join(bad)} hold NaN or Inf); diverged'
  evaluation = unit.evaluate(state)
  bad = {k: v for k, v in evaluation['test'].items() if not np.isfinite(v)}
  if bad:  # a finite state can still overflow its loss (a diverging model before updates turn non-finite)
    return {}, (f'{unit.name} round {r}: the test metrics are not finite '
                f'({", ".join(f"{k} {v}" for k, v in bad.items())}); diverged')
  return evaluation, None


def train_unit(unit: Unit, run: RunDir, schedule: Schedule, *, progress: Progress, stop: StopRequest) -> Outcome:
  """Trains ``unit`` to ``schedule.rounds`` (resuming from its latest checkpoint), logging every round.

  Returns an :class:`Outcome`: ``'done'`` with the final evaluation (and state); ``'failed'`` with an error naming
  the method, seed and round when the state became non-finite or every client was rejected for too long;
  ``'interrupted'`` after checkpointing when a SIGINT / SIGTERM arrived.
  """
  with checkpoint.Manager(run.checkpoint_dir(unit.method, unit.seed), keep=schedule.keep,
                          every=schedule.checkpoint_every) as ckpts:
    state, host, done = _restore(unit, ckpts, run)
    bar = progress.bar(unit.name, schedule.rounds, done)
    t_start = time.perf_counter() - host['elapsed_s']
    evaluation = None

    def outcome(status, r, error=None):
      return Outcome(status, r, evaluation, host['curve'], error, time.perf_counter() - t_start,
                     state if status == 'done' else None)

    try:
      while done < schedule.rounds and not stop.requested:
        n = schedule.next_stop(done) - done if schedule.chunk else 1
        t0 = time.perf_counter()
        state, summaries = unit.step(state, n)
        per_round = (time.perf_counter() - t0) / n
        for i, summary in enumerate(summaries):
          r = done + i + 1
          line = {'method': unit.method, 'seed': unit.seed, 'round': r, **summary, 'wall_s': per_round}
          error = _failure(unit, schedule, r, summary, host)
          if error is None and i == n - 1 and (r % schedule.eval_every == 0 or r == schedule.rounds):
            result, error = _evaluate(unit, state, r)
            if error is None:
              line['eval'] = evaluation = result
              host['curve'].append([r, result['test']])
          if error is not None:
            run.append({**line, 'error': error})
            return outcome('failed', r, error)
          run.append(line)
        done += n
        host['elapsed_s'] = time.perf_counter() - t_start
        bar.update(done, {'loss': f'{summaries[-1]["train_loss"]:.4g}', **unit.headline(evaluation)},
                   force_line='eval' in line)
        _save(ckpts, done, state, host, force=done == schedule.rounds or stop.requested)
    finally:
      bar.close()
    if done < schedule.rounds:  # stopped by a signal; the checkpoint at `done` was just saved
      return outcome('interrupted', done)
    if evaluation is None:  # 0 rounds, or resumed from the final checkpoint: evaluate the final state again
      evaluation, error = _evaluate(unit, state, done)
      if error is not None:
        return outcome('failed', done, error)
      _save(ckpts, done, state, host, force=True)
    return outcome('done', done)

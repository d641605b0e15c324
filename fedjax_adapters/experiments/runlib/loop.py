"""Training one unit (a method and a seed) with checkpoints, resume, signals, divergence checks and progress.

:func:`train_unit` is the loop every run shares (the runners' and :mod:`fedjax_adapters.experiment`'s). The caller
supplies three functions of its own:

* ``init() -> state``: the freshly initialized :class:`~fedjax_adapters.federated.round.ServerState`;
* ``step(state, n) -> (state, [summary] * n)``: ``n`` rounds and a summary dict per round (``train_loss``,
  ``clients``, ``rejected``, ...; :func:`round_summaries` builds them from a round's metrics);
* ``evaluate(state) -> dict``: a strict-JSON-able evaluation record: ``test`` (a dict of headline numbers, all of
  which must be finite), ``per_client`` metrics, ``router_probs``, ...

Resuming is exact: a round's randomness comes only from the state's key and round counter, so restoring the state
and the loop's own bookkeeping (saved as the checkpoint's metadata) continues the run bit for bit, whatever the
chunk lengths (one compiled loop of ``n`` rounds equals ``n`` single rounds, bit for bit; tests check it).

With ``chunk=True`` (several rounds per ``step``, e.g. one compiled loop) the rounds up to the next evaluation or
checkpoint run in *sub-chunks* whose lengths are powers of two, sized from the measured time per round so that one
takes about ``chunk_seconds``: a SIGINT / SIGTERM is answered within a few seconds however long the interval, and
at most one compile per power of two is paid. The loop checks for a signal between sub-chunks, checkpoints where it
stands and returns; a second SIGINT ends the process at once (:class:`StopRequest`).

A damaged newest checkpoint (cut files, a removed step) is moved aside with a warning and the unit resumes from the
newest intact one; when none is intact, :func:`check_start` (run before anything is written) refuses with one line.
Every checkpoint's metadata carries the run's settings ``fingerprint``; a checkpoint written under other settings
is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from fedjax_adapters.experiments.runlib import strict_json
from fedjax_adapters.experiments.runlib.cli import UserError
from fedjax_adapters.experiments.runlib.progress import Progress
from fedjax_adapters.experiments.runlib.rundir import CHECKPOINTS, RunDir, StorageError, storage_error
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
    chunk: ``step`` runs several rounds per call (a compiled loop), in sub-chunks (else one round per call).
    chunk_seconds: the time one sub-chunk should take (bounds how long a signal waits).
  """
  rounds: int
  eval_every: int
  checkpoint_every: int
  keep: int = 2
  max_rejected_rounds: int = 5
  chunk: bool = False
  chunk_seconds: float = 1.0

  def next_stop(self, done: int) -> int:
    """The first round after ``done`` at which the loop must stop to evaluate or checkpoint."""
    stops = [self.rounds]
    for every in (self.eval_every, self.checkpoint_every):
      stops.append((done // every + 1) * every)
    return min(stops)


class Chunker:
  """Sub-chunk lengths, capped so that one takes about ``seconds``; the cap is re-sized from every warm sub-chunk.

  With ``any_length`` (a step compiled once for every length, :class:`fedjax_adapters.experiment.CompiledRounds`)
  any length up to the cap is used and only the first call compiles; otherwise lengths are powers of two (at most
  one compile per power) and a length's first call counts as a compile.
  """

  def __init__(self, seconds: float, any_length: bool = False):
    self.seconds, self.any_length, self.cap, self.seen = seconds, any_length, 1, set()

  def length(self, remaining: int) -> int:
    """The next sub-chunk's length (at most ``remaining`` and the cap)."""
    n = min(remaining, self.cap)
    return n if self.any_length else 1 << (n.bit_length() - 1)

  def observe(self, n: int, seconds: float) -> bool:
    """Records a sub-chunk of ``n`` rounds; returns whether it ran compiled code (no compile in its time)."""
    warm = bool(self.seen) if self.any_length else n in self.seen
    self.seen.add(n)
    if warm and seconds > 0:
      fits = int(self.seconds * n / seconds)  # rounds that fit in the target time
      self.cap = max(1, min(fits, 8 * self.cap))
    return warm


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
  """Catches SIGINT / SIGTERM while active: the loop checkpoints and returns at the next sub-chunk boundary.

  A second SIGINT ends the process at once (exit status 130, no traceback), after ``on_abort()`` (which marks the
  run interrupted). Signals are read by a helper thread from Python's wakeup file descriptor, so they are seen
  even while the main thread waits inside a compiled computation; no ``KeyboardInterrupt`` is raised anywhere.
  Outside the main thread (where signal handlers cannot be installed) it never requests a stop.

  Attributes:
    signum: the first signal received, or None.
  """

  def __init__(self, on_abort: Callable[[], Any] | None = None):
    self.signum = None
    self.on_abort = on_abort
    self._previous: dict[int, Any] = {}
    self._sockets = None
    self._old_wakeup = -1
    self._interrupts = 0
    self._told = False

  def _handle(self, signum, frame):
    del frame  # the main thread's view of a signal; the helper thread counts them
    if self.signum is None:
      self.signum = signum

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      return self
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    self._old_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    self._sockets = reader, writer
    for s in (signal.SIGINT, signal.SIGTERM):
      self._previous[s] = signal.signal(s, self._handle)
    threading.Thread(target=self._watch, args=(reader,), name='StopRequest', daemon=True).start()
    return self

  def _watch(self, reader: socket.socket) -> None:
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        self.note(signum)

  def note(self, signum: int) -> None:
    """Records signal ``signum`` as the helper thread reads it; the second SIGINT aborts."""
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts >= 2:
        self.abort()
    if not self._told:  # the first stop request: say what happens now
      self._told = True
      sys.stderr.write(f'\n{signal.Signals(signum).name} received: stopping after the current chunk with a checkpoint'
                       ' (a second Ctrl-C stops at once)\n')
      sys.stderr.flush()
    if self.signum is None:
      self.signum = signum

  def abort(self) -> None:
    """Ends the process now with status 130 after ``on_abort()``."""
    try:
      if self.on_abort is not None:
        self.on_abort()
    finally:
      sys.stderr.write('\nstopped at once (a second Ctrl-C); the last checkpoint is kept\n')
      sys.stderr.flush()
      os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access  (no cleanup may wait on the computation)

  def __exit__(self, *exc) -> None:
    if self._sockets is None:
      return
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    signal.set_wakeup_fd(self._old_wakeup)
    reader, writer = self._sockets
    writer.close()
    reader.close()
    self._sockets = None

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
# Where a unit starts: its newest intact checkpoint
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Unit:
  """One (method, seed) and the caller's functions for it (see the module docstring)."""
  method: str
  seed: int
  init: Callable[[], Any]
  step: Callable[[Any, int], tuple[Any, list[dict[str, Any]]]]
  evaluate: Callable[[Any], dict[str, Any]]
  headline: Callable[[dict[str, Any]], dict[str, str]] = lambda evaluation: {}
  any_length: bool = False  # step(state, n) is compiled once for every n (else: once per n)

  @property
  def name(self) -> str:
    return f'{self.method} seed {self.seed}'


class Start(NamedTuple):
  """Where a unit resumes: ``state`` after ``done`` rounds, the loop's ``host`` bookkeeping, the ``damaged`` steps
  (``[(step, why)]``) newer than the one used."""
  state: Any
  host: dict[str, Any]
  done: int
  damaged: list[tuple[int, str]]


def _fresh_host() -> dict[str, Any]:
  return {'rejected_streak': 0, 'elapsed_s': 0.0, 'curve': []}


def _short_reason(e: Exception, directory: str) -> str:
  text = ' '.join(str(e).replace(os.path.abspath(directory) + os.sep, '').split())
  return f'{type(e).__name__}: {text[:160]}{"..." if len(text) > 160 else ""}'


@contextlib.contextmanager
def _quiet_orbax():
  """Silences orbax's log lines (absl) while damaged steps are probed: each failure is reported once, by us."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def find_start(unit: Unit, directory: str, fingerprint: str | None = None) -> Start:
  """The newest intact checkpoint step of ``unit`` in ``directory`` (read only; nothing is written).

  Raises:
    UserError: steps exist but none can be restored, or the newest intact one was written under other settings
      (its ``fingerprint`` differs).
  """
  state = unit.init()
  if not os.path.isdir(directory):
    return Start(state, _fresh_host(), 0, [])
  damaged = []
  with _quiet_orbax():
    for step in reversed(checkpoint.saved_steps(directory)):
      try:
        meta = checkpoint.step_metadata(directory, step)
        host = {**_fresh_host(), **meta['host']}
      except Exception as e:  # pylint: disable=broad-except  (a damaged step fails in many ways; each is reported)
        damaged.append((step, _short_reason(e, directory)))
        continue
      written_with = meta.get('fingerprint')
      if fingerprint is not None and written_with is not None and written_with != fingerprint:
        raise UserError(f'the checkpoint {directory}/{step} of {unit.name} was written under other settings than '
                        'this run\'s config.json (its settings fingerprint differs): config.json was edited, or the '
                        'checkpoints come from another run; nothing was changed')
      try:
        return Start(checkpoint.read_step(directory, step, state), host, step, damaged)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, _short_reason(e, directory)))
  if damaged:
    steps_text = ', '.join(f'{s} ({why})' for s, why in damaged)
    raise UserError(f'no intact checkpoint of {unit.name} in {directory}: every step is damaged: {steps_text}; the '
                    'run directory was left as it is')
  return Start(state, _fresh_host(), 0, [])


def check_start(unit: Unit, run: RunDir, fingerprint: str | None = None) -> None:
  """Raises (UserError) unless ``unit`` can start: fresh, or from an intact checkpoint written under ``fingerprint``."""
  find_start(unit, run.checkpoint_dir(unit.method, unit.seed), fingerprint)


def _set_aside(run: RunDir, unit: Unit, damaged: Sequence[tuple[int, str]], progress: Progress) -> None:
  """Moves damaged steps to ``checkpoints/<method>/seed<k>.damaged/`` (kept for inspection) and warns."""
  source = run.checkpoint_dir(unit.method, unit.seed)
  target = source + '.damaged'
  for step, why in damaged:
    os.makedirs(target, exist_ok=True)
    destination = os.path.join(target, f'{step}-{int(time.time())}')
    run.guard(lambda s=step, d=destination: os.rename(os.path.join(source, str(s)), d), CHECKPOINTS)
    progress.warning(f'checkpoint step {step} of {unit.name} is damaged ({why}); moved to {destination}')


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def _save(ckpts: checkpoint.Manager, done: int, state, host: dict, fingerprint: str | None, *, force: bool) -> None:
  if not (force or done % ckpts.every == 0):
    return
  metadata = {'host': strict_json.sanitize(host)[0]}
  if fingerprint is not None:
    metadata['fingerprint'] = fingerprint
  try:
    ckpts.save(done, state, metadata=metadata, force=True)
  except OSError as e:
    raise _checkpoint_error(ckpts, done, e) from None
  except ValueError as e:  # tensorstore reports a failed write as a ValueError carrying the OS error's text
    if not any(word in str(e) for word in ('File too large', 'No space left', 'Disk quota', 'Read-only file system',
                                           'Permission denied')):
      raise
    raise _checkpoint_error(ckpts, done, e) from None


def _checkpoint_error(ckpts: checkpoint.Manager, done: int, e: Exception) -> StorageError:
  error = e if isinstance(e, OSError) else OSError(None, ' '.join(str(e).split())[-200:])
  latest = ckpts.latest_step()
  kept = f'; the newest complete checkpoint is round {latest}' if latest is not None else ''
  return StorageError(f'{storage_error(os.path.join(ckpts.directory, str(done)), error)}{kept}')


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


class _Log:
  """Where a unit's per-round lines go: ``metrics.jsonl`` and every writer."""

  def __init__(self, run: RunDir, unit: Unit, writers: Sequence[Any]):
    self.run, self.unit, self.writers = run, unit, writers

  def __call__(self, line: dict[str, Any]) -> None:
    self.run.append(line)
    for w in self.writers:
      w.write(self.unit.method, self.unit.seed, line['round'], line)


def _resume(unit: Unit, run: RunDir, ckpts_dir: str, fingerprint: str | None, progress: Progress) -> Start:
  start = find_start(unit, ckpts_dir, fingerprint)
  if start.damaged:
    _set_aside(run, unit, start.damaged, progress)
  run.keep_records(lambda r: (r.get('method'), r.get('seed')) != (unit.method, unit.seed) or r['round'] <= start.done)
  return start


def train_unit(unit: Unit, run: RunDir, schedule: Schedule, *, progress: Progress, stop: StopRequest,
               fingerprint: str | None = None, writers: Sequence[Any] = ()) -> Outcome:
  """Trains ``unit`` to ``schedule.rounds`` (resuming from its newest intact checkpoint), logging every round.

  Returns an :class:`Outcome`: ``'done'`` with the final evaluation (and state); ``'failed'`` with an error naming
  the method, seed and round when the state became non-finite or every client was rejected for too long;
  ``'interrupted'`` after checkpointing when a SIGINT / SIGTERM arrived.

  Raises:
    UserError: no intact checkpoint, or one written under other settings (see :func:`find_start`).
    StorageError: a file of the run could not be written (the newest complete checkpoint stays).
  """
  ckpts_dir = run.checkpoint_dir(unit.method, unit.seed)
  state, host, done, _ = _resume(unit, run, ckpts_dir, fingerprint, progress)
  log = _Log(run, unit, writers)
  chunker = Chunker(schedule.chunk_seconds, unit.any_length)
  with checkpoint.Manager(ckpts_dir, keep=schedule.keep, every=schedule.checkpoint_every) as ckpts:
    bar = progress.bar(unit.name, schedule.rounds, done)
    t_start = time.perf_counter() - host['elapsed_s']
    evaluation = None

    def outcome(status, r, error=None):
      return Outcome(status, r, evaluation, host['curve'], error, time.perf_counter() - t_start,
                     state if status == 'done' else None)

    try:
      while done < schedule.rounds and not stop.requested:
        n = chunker.length(schedule.next_stop(done) - done) if schedule.chunk else 1
        t0 = time.perf_counter()
        state, summaries = unit.step(state, n)
        seconds = time.perf_counter() - t0
        warm = chunker.observe(n, seconds)
        for i, summary in enumerate(summaries):
          r = done + i + 1
          line = {'method': unit.method, 'seed': unit.seed, 'round': r, **summary, 'wall_s': seconds / n}
          error = _failure(unit, schedule, r, summary, host)
          if error is None and i == n - 1 and (r % schedule.eval_every == 0 or r == schedule.rounds):
            result, error = _evaluate(unit, state, r)
            if error is None:
              line['eval'] = evaluation = result
              host['curve'].append([r, result['test']])
          if error is not None:
            log({**line, 'error': error})
            return outcome('failed', r, error)
          log(line)
        done += n
        host['elapsed_s'] = time.perf_counter() - t_start
        bar.update(done, {'loss': f'{summaries[-1]["train_loss"]:.4g}', **unit.headline(evaluation)},
                   seconds=seconds, warm=warm, force_line='eval' in line)
        _save(ckpts, done, state, host, fingerprint, force=done == schedule.rounds or stop.requested)
    finally:
      bar.close()
    if done < schedule.rounds:  # stopped by a signal; the checkpoint at `done` was just saved
      return outcome('interrupted', done)
    if evaluation is None:  # 0 rounds, or resumed from the final checkpoint: evaluate the final state again
      evaluation, error = _evaluate(unit, state, done)
      if error is not None:
        return outcome('failed', done, error)
      _save(ckpts, done, state, host, fingerprint, force=True)
    return outcome('done', done)

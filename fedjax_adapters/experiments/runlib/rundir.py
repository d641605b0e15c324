"""A run directory: everything one invocation of a runner produces, in one place.

Layout::

  DIR/config.json      every resolved setting, the command line, package versions, devices (written at the start)
  DIR/metrics.jsonl    one strict-JSON line per round per (method, seed); evaluation rounds carry the evaluation
  DIR/results.json     the summary (the runner's ``--json`` document) plus each unit's status; rewritten atomically
  DIR/checkpoints/<method>/seed<k>/<round>/   orbax steps (the last ``keep``; the final one is the trained state)

A *unit* is one (method, seed). ``results.json`` lists every unit with ``status`` ``done``, ``failed`` or
``running``; ``--resume DIR`` skips the first two and continues the rest from their latest checkpoint.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Iterator

from fedjax_adapters.experiments.runlib import strict_json
from fedjax_adapters.experiments.runlib.cli import UserError, probe_writable_dir

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
RESULTS = 'results.json'
CHECKPOINTS = 'checkpoints'


def default_path(name: str, root: str = 'runs') -> str:
  """``runs/<name>-<YYYYmmdd-HHMMSS>`` (relative to the working directory)."""
  return os.path.join(root, f'{name}-{datetime.datetime.now().strftime("%Y%m%d-%H%M%S")}')


class RunDir:
  """The files of one run (see the module docstring). Create with :meth:`create` or :meth:`open`."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self._metrics = None

  @classmethod
  def create(cls, path: str, config: dict[str, Any]) -> RunDir:
    """A new run in ``path`` (created; it must not hold a run already): writes ``config.json``.

    Raises:
      UserError: ``path`` is not writable or already holds a run.
    """
    path = probe_writable_dir(path, '--out')
    if os.path.exists(os.path.join(path, CONFIG)):
      raise UserError(f'--out {path} already holds a run; continue it with --resume {path}, or pick another --out')
    run = cls(path)
    strict_json.write(run.file(CONFIG), config)
    open(run.file(METRICS), 'a').close()
    return run

  @classmethod
  def open(cls, path: str) -> RunDir:
    """An existing run (for ``--resume`` and reports).

    Raises:
      UserError: ``path`` holds no ``config.json`` or is not writable.
    """
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(full, CONFIG)):
      raise UserError(f'{path} is not a run directory (no {CONFIG})')
    return cls(full)

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  @property
  def config(self) -> dict[str, Any]:
    return strict_json.read(self.file(CONFIG))

  # --- metrics.jsonl ---------------------------------------------------------------------------------------------

  def append(self, record: dict[str, Any]) -> None:
    """Appends one strict-JSON line (flushed, so a killed process loses at most the line being written)."""
    if self._metrics is None:
      self._metrics = open(self.file(METRICS), 'a', buffering=1)
    self._metrics.write(strict_json.dumps(record) + '\n')

  def records(self) -> Iterator[dict[str, Any]]:
    """The lines of ``metrics.jsonl``; a last line cut short by a crash is skipped."""
    if not os.path.exists(self.file(METRICS)):
      return
    with open(self.file(METRICS)) as f:
      lines = f.read().split('\n')
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        yield strict_json.loads(line)
      except ValueError:
        if i < len(lines) - 2:  # Only the last line can be partial; anything else is damage worth reporting.
          raise ValueError(f'{self.file(METRICS)} line {i + 1} is not valid JSON') from None

  def keep_records(self, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrites ``metrics.jsonl`` (atomically) with only the lines ``keep`` accepts; drops a partial last line."""
    self.close()
    kept = [strict_json.dumps(r) for r in self.records() if keep(r)]
    tmp = self.file(METRICS + '.tmp')
    with open(tmp, 'w') as f:
      f.write(''.join(line + '\n' for line in kept))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.file(METRICS))

  def close(self) -> None:
    if self._metrics is not None:
      self._metrics.close()
      self._metrics = None

  # --- results.json and checkpoints ------------------------------------------------------------------------------

  def read_results(self) -> dict[str, Any] | None:
    return strict_json.read(self.file(RESULTS)) if os.path.exists(self.file(RESULTS)) else None

  def write_results(self, results: dict[str, Any]) -> None:
    strict_json.write(self.file(RESULTS), results)

  def checkpoint_dir(self, method: str, seed: int) -> str:
    return os.path.join(self.path, CHECKPOINTS, method, f'seed{seed}')

"""A run directory: everything one invocation of a runner produces, in one place.

Layout::

  DIR/config.json      every resolved setting, the command line, package versions, devices (written at the start),
                       and ``fingerprint``: a hash of the settings the checkpoints are written with
  DIR/metrics.jsonl    one strict-JSON line per round per (method, seed); evaluation rounds carry the evaluation
  DIR/results.json     the summary (the runner's ``--json`` document) plus each unit's status; rewritten atomically
  DIR/checkpoints/<method>/seed<k>/<round>/   orbax steps (the last ``keep``; the final one is the trained state)
  DIR/.lock            held (``flock``) by the one process writing the run; names its pid

A *unit* is one (method, seed). ``results.json`` lists every unit with ``status`` ``done``, ``failed``,
``interrupted`` or ``running``; ``--resume DIR`` skips the first two and continues the rest from their latest
checkpoint.

Only one process writes a run at a time: :meth:`RunDir.create` and :meth:`RunDir.lock` take an advisory lock on
``DIR/.lock`` and a second writer is refused with the holder's pid. A write that fails (a full disk, a file-size
limit) raises :class:`StorageError` naming the file; what was written before stays intact (``results.json`` is
replaced atomically, a cut ``metrics.jsonl`` line is dropped on resume, orbax steps appear only when complete).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
from typing import Any, Callable, Iterator

from fedjax_adapters.experiments.runlib import strict_json
from fedjax_adapters.experiments.runlib.cli import UserError, probe_writable_dir

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
RESULTS = 'results.json'
CHECKPOINTS = 'checkpoints'
LOCK = '.lock'
FINGERPRINT = 'fingerprint'
# Plan entries that may change between a run and its resume without changing what the checkpoints hold.
UNHASHED_PLAN_KEYS = ('data_dir', 'data', 'keep', 'json', 'quiet', 'out', 'writers')


class StorageError(UserError):
  """A file of the run could not be written (disk full, file-size limit, permissions); names the file."""
  exit_status = 1


class RunLocked(UserError):
  """Another process holds the run directory's lock."""


def default_path(name: str, root: str = 'runs') -> str:
  """``runs/<name>-<YYYYmmdd-HHMMSS>-<6 hex digits>``: two runs started in the same second get different names."""
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join(root, f'{name}-{stamp}-{secrets.token_hex(3)}')


def fingerprint(config: dict[str, Any]) -> str:
  """sha256 of a run's settings and plan (paths and output options left out): what its checkpoints depend on."""
  plan = {k: v for k, v in (config.get('plan') or {}).items() if k not in UNHASHED_PLAN_KEYS}
  text = json.dumps({'settings': config.get('settings'), 'plan': plan}, sort_keys=True, allow_nan=False)
  return hashlib.sha256(text.encode()).hexdigest()


def storage_error(path: str, error: OSError) -> StorageError:
  """A :class:`StorageError` for ``error`` raised while writing ``path``."""
  why = error.strerror or str(error)
  hint = ' (the disk is full or a file-size limit was reached)' if error.errno in (errno.ENOSPC, errno.EFBIG,
                                                                                   errno.EDQUOT) else ''
  return StorageError(f'cannot write {path}: {why}{hint}')


def run_files_without_config(path: str) -> list[str]:
  """What in ``path`` belongs to a run although ``path`` has no config.json (checkpoints, metrics, results)."""
  found = []
  if os.path.isdir(os.path.join(path, CHECKPOINTS)) and os.listdir(os.path.join(path, CHECKPOINTS)):
    found.append(CHECKPOINTS + '/')
  for name in (RESULTS, METRICS):
    full = os.path.join(path, name)
    if os.path.isfile(full) and os.path.getsize(full) > 0:
      found.append(name)
  return found


def enclosing_run(path: str) -> str | None:
  """The run directory that contains ``path`` (a folder above it with a run's config.json), or None."""
  folder = os.path.dirname(os.path.realpath(path))
  while True:
    config = os.path.join(folder, CONFIG)
    if os.path.isfile(config):
      try:
        with open(config) as f:
          if isinstance(json.load(f), dict) and os.path.isfile(os.path.join(folder, METRICS)):
            return folder
      except (OSError, ValueError):
        pass
    parent = os.path.dirname(folder)
    if parent == folder:
      return None
    folder = parent


def check_output_file(path: str, what: str, run_dir: str | None = None) -> str:
  """``path`` as an absolute path if a results file may be written there; else a UserError.

  Refused: a path inside ``run_dir`` or inside any other run directory (it would overwrite the run's own files),
  a symbolic link, and anything that exists but is not a regular file (a device, a FIFO, a directory).
  """
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.islink(full):
    raise UserError(f'{what} {path} is a symbolic link; writing would replace the link, not its target: give the '
                    'target path')
  if os.path.exists(full) and not stat.S_ISREG(os.stat(full).st_mode):
    raise UserError(f'{what} {path} exists and is not a regular file (a directory, device or pipe)')
  inside = [d for d in (run_dir, enclosing_run(full)) if d is not None
            and os.path.commonpath([os.path.realpath(d), os.path.realpath(os.path.dirname(full))])
            == os.path.realpath(d)]
  if inside:
    raise UserError(f'{what} {path} lies inside the run directory {inside[0]}, whose own files it could overwrite; '
                    'write it elsewhere')
  return full


class RunDir:
  """The files of one run (see the module docstring). Create with :meth:`create` or :meth:`open`."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self._metrics = None
    self._lock = None

  @classmethod
  def create(cls, path: str, config: dict[str, Any]) -> RunDir:
    """A new run in ``path`` (created; it must not hold a run already), locked: writes ``config.json`` with its
    ``fingerprint``.

    Raises:
      UserError: ``path`` is not writable, already holds a run (or a run's files without its config.json), or
        another process holds it.
    """
    path = probe_writable_dir(path, '--out')
    run = cls(path)
    held = os.path.exists(run.file(CONFIG))
    if not held:
      run.lock()
    try:
      if held or os.path.exists(run.file(CONFIG)):  # (checked again under the lock: another process was faster)
        raise UserError(f'--out {path} already holds a run; continue it with --resume {path}, or pick another --out')
      leftovers = run_files_without_config(path)
      if leftovers:
        raise UserError(f'--out {path} holds {" and ".join(leftovers)} of an earlier run but no {CONFIG}, so they '
                        'cannot be continued or trusted; pick another --out or remove them')
      config = {**config, FINGERPRINT: fingerprint(config)}
      run.write_json(CONFIG, config)
      run.guard(lambda: open(run.file(METRICS), 'a').close(), METRICS)
    except BaseException:
      run.close()
      raise
    return run

  @classmethod
  def open(cls, path: str) -> RunDir:
    """An existing run (for ``--resume`` and reports); not locked (see :meth:`lock`).

    Raises:
      UserError: ``path`` holds no ``config.json``.
    """
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(full, CONFIG)):
      raise UserError(f'{path} is not a run directory (no {CONFIG})')
    return cls(full)

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  @property
  def config(self) -> dict[str, Any]:
    """``config.json``. Raises UserError when it is not a strict-JSON object."""
    try:
      config = strict_json.read(self.file(CONFIG))
    except (OSError, ValueError) as e:
      raise UserError(f'{self.file(CONFIG)} cannot be read: {e}') from None
    if not isinstance(config, dict):
      raise UserError(f'{self.file(CONFIG)} is not a JSON object')
    return config

  # --- the lock ----------------------------------------------------------------------------------------------------

  def lock(self) -> None:
    """Takes the run's advisory lock (held until :meth:`close` or the process ends).

    Raises:
      RunLocked: another process holds it (the message names its pid).
    """
    if self._lock is not None:
      return
    fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
      os.close(fd)
      raise RunLocked(f'{self.path} is in use by process {holder} (a run or a --resume writing it); wait for it to '
                      'end, or pick another --out') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    self._lock = fd

  # --- writing, with failures named --------------------------------------------------------------------------------

  def guard(self, write: Callable[[], Any], name: str) -> Any:
    """``write()``; an OSError becomes a :class:`StorageError` naming the file ``name`` of this run."""
    try:
      return write()
    except OSError as e:
      raise storage_error(self.file(name), e) from None

  def write_json(self, name: str, doc: Any) -> None:
    self.guard(lambda: strict_json.write(self.file(name), doc), name)

  # --- metrics.jsonl ---------------------------------------------------------------------------------------------

  def append(self, record: dict[str, Any]) -> None:
    """Appends one strict-JSON line (flushed, so a killed process loses at most the line being written)."""
    def write():
      if self._metrics is None:
        self._metrics = open(self.file(METRICS), 'a', buffering=1)
      self._metrics.write(strict_json.dumps(record) + '\n')
    self.guard(write, METRICS)

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
    self.close_metrics()
    lines = list(self.records())
    kept = [strict_json.dumps(r) for r in lines if keep(r)]
    if len(kept) == len(lines) and self._ends_cleanly():
      return  # nothing to drop: leave the file as it is
    tmp = self.file(METRICS + '.tmp')

    def write():
      try:
        with open(tmp, 'w') as f:
          f.write(''.join(line + '\n' for line in kept))
          f.flush()
          os.fsync(f.fileno())
        os.replace(tmp, self.file(METRICS))
      except OSError:
        if os.path.exists(tmp):
          os.remove(tmp)
        raise
    self.guard(write, METRICS)

  def _ends_cleanly(self) -> bool:
    with open(self.file(METRICS), 'rb') as f:
      f.seek(0, os.SEEK_END)
      if f.tell() == 0:
        return True
      f.seek(-1, os.SEEK_END)
      return f.read(1) == b'\n'

  def close_metrics(self) -> None:
    if self._metrics is not None:
      try:
        self._metrics.close()
      except OSError:
        pass  # a line that could not be flushed was reported when it was written
      self._metrics = None

  def close(self) -> None:
    """Closes metrics.jsonl and releases the lock."""
    self.close_metrics()
    if self._lock is not None:
      os.close(self._lock)
      self._lock = None

  # --- results.json and checkpoints ------------------------------------------------------------------------------

  def read_results(self) -> dict[str, Any] | None:
    if not os.path.exists(self.file(RESULTS)):
      return None
    try:
      return strict_json.read(self.file(RESULTS))
    except ValueError as e:
      raise UserError(f'{self.file(RESULTS)} is not strict JSON ({e})') from None

  def write_results(self, results: dict[str, Any]) -> None:
    self.write_json(RESULTS, results)

  def checkpoint_dir(self, method: str, seed: int) -> str:
    return os.path.join(self.path, CHECKPOINTS, method, f'seed{seed}')

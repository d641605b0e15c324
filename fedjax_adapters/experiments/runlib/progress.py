"""Progress of a run: a tqdm bar per (method, seed) on a terminal, plain lines when stdout is a file or a pipe.

The bar shows the round, rounds/s, the ETA and the latest training loss / test metric. Without a terminal a line
is printed at every evaluation and about every tenth of the rounds, so a log stays short. ``quiet`` prints only
what :meth:`Progress.always` is given (errors and the final table).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
  """Where the runner reports progress.

  Args:
    quiet: print nothing but :meth:`always` messages.
    stream: where to write (default: stdout).
    tty: draw bars (default: whether ``stream`` is a terminal).
  """

  def __init__(self, *, quiet: bool = False, stream: TextIO | None = None, tty: bool | None = None):
    self.stream = stream or sys.stdout
    self.quiet = quiet
    self.tty = self.stream.isatty() if tty is None else tty
    self._bar = None

  def bar(self, desc: str, total: int, initial: int = 0) -> Bar:
    """A bar for one unit, from round ``initial`` (a resumed unit) to ``total``."""
    if self.quiet:
      return Bar(self, desc, total, initial, None)
    if self.tty:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (only drawn on a terminal)
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit='round', file=self.stream, dynamic_ncols=True,
                       leave=True)
      return Bar(self, desc, total, initial, self._bar)
    return Bar(self, desc, total, initial, None, plain=True)

  def print(self, message: str) -> None:
    """A line of progress (suppressed by ``quiet``)."""
    if not self.quiet:
      self.always(message)

  def error(self, message: str) -> None:
    """``error: <message>`` on stderr (kept clear of an open bar)."""
    if self._bar is not None:
      self._bar.clear()
    print(f'error: {message}', file=sys.stderr, flush=True)

  def always(self, message: str) -> None:
    """A line printed even when quiet (errors, the final table); kept clear of an open bar."""
    if self._bar is not None:
      self._bar.write(message, file=self.stream)
    else:
      print(message, file=self.stream, flush=True)


class Bar:
  """One unit's progress; :meth:`update` after each step, :meth:`close` at the end."""

  def __init__(self, progress: Progress, desc: str, total: int, initial: int, tqdm_bar, plain: bool = False):
    self.progress, self.desc, self.total, self.round = progress, desc, total, initial
    self._tqdm, self._plain = tqdm_bar, plain
    self._start, self._start_round = time.perf_counter(), initial
    self._every = max(1, total // 10)
    self._postfix: dict[str, str] = {}

  def update(self, round_: int, postfix: dict[str, str] | None = None, *, force_line: bool = False) -> None:
    """Moves to ``round_`` (rounds done) with the latest values; ``force_line`` prints a plain line now."""
    step, self.round = round_ - self.round, round_
    if postfix:
      self._postfix.update(postfix)
    if self._tqdm is not None:
      self._tqdm.set_postfix(self._postfix, refresh=False)
      self._tqdm.update(step)
    elif self._plain and (force_line or round_ % self._every == 0 or round_ == self.total):
      self.progress.print(self.line())

  def line(self) -> str:
    """``desc: round r/R (p %), x rounds/s, ETA t, k=v, ...``."""
    elapsed = time.perf_counter() - self._start
    rate = (self.round - self._start_round) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.round) / rate if rate > 0 else float('nan')
    pct = 100.0 * self.round / self.total if self.total else 100.0
    extra = ''.join(f', {k} {v}' for k, v in self._postfix.items())
    return (f'{self.desc}: round {self.round}/{self.total} ({pct:.0f} %), {rate:.1f} rounds/s, '
            f'ETA {_duration(eta)}{extra}')

  def close(self) -> None:
    if self._tqdm is not None:
      self._tqdm.close()
      self.progress._bar = None  # pylint: disable=protected-access  (the bar belongs to its Progress)


def _duration(seconds: float) -> str:
  if seconds != seconds:  # NaN: no rate yet
    return '?'
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'

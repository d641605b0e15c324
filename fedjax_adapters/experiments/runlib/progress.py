"""Progress of a run: a live line per (method, seed) on a terminal, plain lines when stdout is a file or a pipe.

A unit's line shows the round, the steady-state rate (rounds/s), the ETA and the latest training loss / test
metric. Compilation is kept apart: a step that runs a chunk length for the first time (it compiles) is timed as
*warm-up* and shown as ``compile x s``; rate and ETA come only from steps that ran already-compiled code, so a
first chunk's compile does not inflate the ETA. Until such a step has run the ETA is ``?``.

On a terminal the line is redrawn in place (cut to the terminal's width). A terminal that reports zero columns
(some CI consoles, ``stty cols 0``) gets the plain lines instead, as does a file or a pipe: a line at every
evaluation and about every tenth of the rounds, so a log stays short. ``quiet`` prints only what
:meth:`Progress.always` is given (errors and the final table).
"""
from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def terminal_columns(stream: TextIO) -> int | None:
  """The width of the terminal ``stream`` writes to, or None when it is not a terminal (0: a terminal without a
  width)."""
  try:
    if not stream.isatty():
      return None
    return os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, OSError, ValueError):
    return None


class Progress:
  """Where the runner reports progress.

  Args:
    quiet: print nothing but :meth:`always` messages.
    stream: where to write (default: stdout).
    columns: the terminal's width; default: asked from ``stream`` (None: not a terminal). A width of 0 (or None)
      prints plain lines.
  """

  def __init__(self, *, quiet: bool = False, stream: TextIO | None = None, columns: int | None = -1):
    self.stream = stream or sys.stdout
    self.quiet = quiet
    self.columns = terminal_columns(self.stream) if columns == -1 else columns
    self._open: Bar | None = None

  @property
  def live(self) -> bool:
    """Whether bars are redrawn in place (a terminal with a known, nonzero width)."""
    return bool(self.columns) and not self.quiet

  def bar(self, desc: str, total: int, initial: int = 0) -> Bar:
    """A bar for one unit, from round ``initial`` (a resumed unit) to ``total``."""
    bar = Bar(self, desc, total, initial)
    if self.live:
      self._open = bar
    return bar

  def print(self, message: str) -> None:
    """A line of progress (suppressed by ``quiet``)."""
    if not self.quiet:
      self.always(message)

  def error(self, message: str, prefix: str = 'error') -> None:
    """``<prefix>: <message>`` on stderr (kept clear of an open bar)."""
    self._clear()
    print(f'{prefix}: {message}', file=sys.stderr, flush=True)
    self._redraw()

  def warning(self, message: str) -> None:
    """``warning: <message>`` on stderr, even when quiet."""
    self.error(message, 'warning')

  def always(self, message: str) -> None:
    """A line printed even when quiet (errors, the final table); kept clear of an open bar."""
    self._clear()
    print(message, file=self.stream, flush=True)
    self._redraw()

  def _clear(self) -> None:
    if self._open is not None:
      self.stream.write('\r' + ' ' * (self.columns - 1) + '\r')

  def _redraw(self) -> None:
    if self._open is not None:
      self._open.draw()


class Bar:
  """One unit's progress; :meth:`update` after each step, :meth:`close` at the end."""

  def __init__(self, progress: Progress, desc: str, total: int, initial: int):
    self.progress, self.desc, self.total, self.round = progress, desc, total, initial
    self._every = max(1, total // 10)
    self._postfix: dict[str, str] = {}
    self._last = time.perf_counter()
    self.steady_rounds, self.steady_seconds, self.warmup_seconds = 0, 0.0, 0.0

  def update(self, round_: int, postfix: dict[str, str] | None = None, *, seconds: float | None = None,
             warm: bool | None = None, force_line: bool = False) -> None:
    """Moves to ``round_`` (rounds done) with the latest values.

    Args:
      round_: rounds done.
      postfix: values to show (``{'loss': '0.1', ...}``).
      seconds: how long the step took (default: the time since the last update).
      warm: whether the step ran code compiled before (default: every step but a bar's first); a cold step's
        time counts as compile / warm-up, not toward the rate.
      force_line: print a plain line now (an evaluation).
    """
    now = time.perf_counter()
    seconds = now - self._last if seconds is None else seconds
    warm = (self.steady_rounds > 0 or self.warmup_seconds > 0) if warm is None else warm
    self._last = now
    step, self.round = round_ - self.round, round_
    if warm:
      self.steady_rounds += step
      self.steady_seconds += seconds
    else:
      self.warmup_seconds += seconds
    if postfix:
      self._postfix.update(postfix)
    if self.progress.quiet:
      return
    if self.progress.live:
      self.draw()
    elif force_line or round_ // self._every > (round_ - step) // self._every or round_ == self.total:
      self.progress.print(self.line())

  def rate(self) -> float | None:
    """Steady-state rounds per second (None before a warm step)."""
    if self.steady_rounds == 0 or self.steady_seconds <= 0:
      return None
    return self.steady_rounds / self.steady_seconds

  def line(self) -> str:
    """``desc: round r/R (p %), x rounds/s, ETA t, compile c s, k v, ...``."""
    rate = self.rate()
    eta = (self.total - self.round) / rate if rate else None
    pct = 100.0 * self.round / self.total if self.total else 100.0
    extra = ''.join(f', {k} {v}' for k, v in self._postfix.items())
    rate_text = '?' if rate is None else f'{rate:.1f}'
    compile_text = f', compile {self.warmup_seconds:.1f} s' if self.warmup_seconds else ''
    return (f'{self.desc}: round {self.round}/{self.total} ({pct:.0f} %), {rate_text} rounds/s, ETA {_duration(eta)}'
            f'{compile_text}{extra}')

  def draw(self) -> None:
    """Redraws the line in place, cut to the terminal's width."""
    width = self.progress.columns - 1
    self.progress.stream.write('\r' + self.line()[:width].ljust(width))
    self.progress.stream.flush()

  def close(self) -> None:
    if self.progress._open is self:  # pylint: disable=protected-access  (the bar belongs to its Progress)
      self.progress.stream.write('\n')
      self.progress.stream.flush()
      self.progress._open = None  # pylint: disable=protected-access


def _duration(seconds: float | None) -> str:
  if seconds is None or seconds != seconds:
    return '?'
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'

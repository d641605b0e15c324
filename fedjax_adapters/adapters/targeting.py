"""Which layers get adapters: a regular expression over module paths, like PEFT's ``target_modules``."""
from __future__ import annotations

import re
from typing import Iterable, Sequence


def path_str(path: Sequence) -> str:
  """``('model', 'layers', 0, 'q_proj') -> 'model.layers.0.q_proj'``."""
  return '.'.join(str(p) for p in path)


def match_targets(pattern: str, paths: Iterable[str]) -> list[str]:
  """The paths that ``pattern`` matches in full (``re.fullmatch``).

  Raises:
    ValueError: if the pattern is not a valid regex, or it matches none of the paths (the message lists them).
  """
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f'target pattern {pattern!r} is not a valid regular expression: {e}') from None
  paths = list(paths)
  hits = [p for p in paths if rx.fullmatch(p)]
  if not hits:
    shown = ', '.join(paths[:20]) + (' ...' if len(paths) > 20 else '')
    raise ValueError(f'target pattern {pattern!r} matches no adaptable layer; adaptable layers are: {shown or "none"}')
  return hits

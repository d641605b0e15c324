"""Strict JSON: what the runners write parses with any JSON parser (no NaN, Infinity or -Infinity).

A non-finite number becomes ``null``, and the document records why: :func:`dumps` adds a top-level
``"null_reasons": {"<path>": "NaN"}`` (paths like ``methods.fedavg.per_seed[1]``). numpy scalars and arrays become
plain numbers and lists; tuples become lists.
"""
from __future__ import annotations

import json
import math
import os
import threading
from typing import Any

NULL_REASONS = 'null_reasons'


def _number(x: float, path: str, nulls: dict[str, str]):
  if math.isfinite(x):
    return x
  nulls[path] = 'NaN' if math.isnan(x) else ('Infinity' if x > 0 else '-Infinity')
  return None


def _join(path: str, key) -> str:
  return f'{path}[{key}]' if isinstance(key, int) else (f'{path}.{key}' if path else str(key))


def _clean(obj: Any, path: str, nulls: dict[str, str]) -> Any:
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, int):
    return obj
  if isinstance(obj, float):
    return _number(obj, path, nulls)
  if isinstance(obj, dict):
    return {str(k): _clean(v, _join(path, str(k)), nulls) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v, _join(path, i), nulls) for i, v in enumerate(obj)]
  tolist = _numpy_tolist(obj)
  if tolist is not None:
    return _clean(tolist(), path, nulls)
  raise TypeError(f'{type(obj).__name__} at {path or "<root>"} is not JSON-serializable.')


def _numpy_tolist(obj):
  """``obj.tolist`` for numpy / JAX arrays and scalars (checked by type, not by attribute probing)."""
  import numpy as np  # pylint: disable=g-import-not-at-top  (numpy is cheap; kept local like the rest)
  if isinstance(obj, (np.ndarray, np.generic)):
    return obj.tolist
  module = type(obj).__module__
  if module.startswith('jax') or module.startswith('jaxlib'):
    return np.asarray(obj).tolist
  return None


def sanitize(obj: Any) -> tuple[Any, dict[str, str]]:
  """``(plain JSON value, {path: reason})``: non-finite numbers replaced by None, their paths and kinds listed."""
  nulls: dict[str, str] = {}
  return _clean(obj, '', nulls), nulls


def dumps(obj: Any, **kwargs) -> str:
  """Strict JSON text of ``obj``; a dict gains ``null_reasons`` when a non-finite number was replaced."""
  clean, nulls = sanitize(obj)
  if nulls:
    if not isinstance(clean, dict):
      raise ValueError(f'non-finite numbers at {sorted(nulls)} can only be explained inside a JSON object.')
    clean = {**clean, NULL_REASONS: {**clean.get(NULL_REASONS, {}), **nulls}}
  return json.dumps(clean, allow_nan=False, **kwargs)


def _reject_constant(name: str):
  raise ValueError(f'non-standard JSON constant {name}')


def loads(text: str) -> Any:
  """Parses strict JSON; raises ValueError on NaN, Infinity or -Infinity."""
  return json.loads(text, parse_constant=_reject_constant)


def write(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
  """Writes ``obj`` as strict JSON, atomically: a reader (or a crash) sees the old file or the new one, whole."""
  path = os.fspath(path)
  text = dumps(obj, indent=indent)
  tmp = f'{path}.tmp{os.getpid()}-{threading.get_ident()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text + '\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):  # a full disk: the old file stays, without a half-written sibling
      os.remove(tmp)
    raise


def read(path: str | os.PathLike) -> Any:
  with open(path) as f:
    return loads(f.read())

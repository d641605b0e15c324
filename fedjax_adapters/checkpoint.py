"""Save and restore the whole experiment state (a pytree, e.g. ``ServerState``) with orbax."""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def save(path: str | os.PathLike, state: Any, *, overwrite: bool = False) -> str:
  """Writes ``state`` to the directory ``path`` (absolute path made from it). Refuses to overwrite unless asked.

  PRNG key arrays are stored as their raw key data and rebuilt on restore.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise ValueError(f'checkpoint directory {path} already exists; pass overwrite=True to replace it.')
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, _to_saveable(state), force=overwrite)
  ckptr.wait_until_finished()
  return path


def restore(path: str | os.PathLike, like: Any) -> Any:
  """Reads the state saved at ``path`` into the structure, shapes and dtypes of ``like``.

  Raises:
    ValueError: if the directory is missing, unreadable or does not match ``like`` (names the problem).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ValueError(f'no checkpoint at {path}.')
  target = _to_saveable(like)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    restored = ocp.StandardCheckpointer().restore(path, abstract)
  except Exception as e:  # orbax raises many types for truncated or mismatched checkpoints
    raise ValueError(f'checkpoint at {path} could not be restored into the expected state '
                     f'({type(e).__name__}: {e})') from None
  return _from_saveable(restored, like)


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else np.asarray(x) if np.isscalar(x) else x,
                      tree)


def _from_saveable(tree, like):
  return jax.tree.map(lambda x, l: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l)) if _is_key(l) else x,
                      tree, like)

"""Save and restore the whole experiment state (a pytree, e.g. ``ServerState``) with orbax.

Two entry points:

* ``save(path, state)`` / ``restore(path, like)``: one checkpoint in one directory. Overwriting is atomic: the new
  checkpoint is written beside the old one and swapped in by renames, so a process killed at any moment leaves
  the old or the new checkpoint restorable at ``path``.
* ``Manager(directory, keep=k, every=n)``: numbered steps for runners (save every n rounds and at the end, keep the
  last k, a JSON metadata dict per step), over orbax's ``CheckpointManager``. A step is visible only once fully
  written, so a step cut short by a crash is never reported by ``latest_step``.

PRNG key arrays (typed keys) are stored as their raw key data and rebuilt with the key implementation of ``like``.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

# Sibling directories used while overwriting ``path``: the incoming checkpoint, then the one it replaces.
_INCOMING = '.incoming'
_REPLACED = '.replaced'
# Orbax writes this file last, before the final rename; a directory without it was never completed.
_COMMIT_FILE = 'commit_success.txt'


def save(path: str | os.PathLike, state: Any, *, overwrite: bool = False) -> str:
  """Writes ``state`` to the directory ``path``; returns its absolute path. Refuses to overwrite unless asked.

  With ``overwrite=True`` the old checkpoint stays in place until the new one is complete: the new one is written
  to ``<path>.incoming``, then the old one is renamed to ``<path>.replaced``, the new one to ``path``, and the old
  one is deleted. ``restore`` (and the next ``save``) look at those siblings when a crash interrupted the swap.
  """
  path = os.path.abspath(os.fspath(path))
  incoming, replaced = path + _INCOMING, path + _REPLACED
  _finish_interrupted_swap(path)
  if os.path.exists(path) and not overwrite:
    raise ValueError(f'checkpoint directory {path} already exists; pass overwrite=True to replace it.')
  for stale in [incoming, replaced] + glob.glob(glob.escape(incoming) + '.orbax-checkpoint-tmp*'):
    _remove(stale)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(incoming, _to_saveable(state))
  ckptr.wait_until_finished()
  ckptr.close()
  if os.path.exists(path):
    os.rename(path, replaced)
  os.rename(incoming, path)
  _remove(replaced)
  return path


def restore(path: str | os.PathLike, like: Any) -> Any:
  """Reads the state saved at ``path`` into the structure, shapes and dtypes of ``like``.

  If a crash interrupted an overwriting ``save`` between its renames, the surviving complete checkpoint (the new
  one if it was complete, else the old one) is read; nothing on disk is changed.

  Raises:
    ValueError: if there is no checkpoint, the directory is empty or incomplete, or it does not match ``like``.
  """
  path = os.path.abspath(os.fspath(path))
  source = _surviving_checkpoint(path)
  if source is None:
    _raise_missing_or_incomplete(path)
  return _restore_dir(source, like)


def saved_steps(directory: str | os.PathLike) -> list[int]:
  """The step folders of a :class:`Manager`'s directory, oldest first, complete or not (names that are integers)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def step_metadata(directory: str | os.PathLike, step: int) -> dict:
  """The metadata dict saved with step ``step`` of a :class:`Manager`'s directory, read from its file alone.

  Raises:
    ValueError: the file is missing or not a JSON object with the metadata (the message names the step).
  """
  path = os.path.join(os.path.abspath(os.fspath(directory)), str(step), '_CHECKPOINT_METADATA')
  try:
    with open(path) as f:
      metadata = json.load(f)['custom_metadata'] or {}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'step {step} in {directory}: its metadata cannot be read ({type(e).__name__}: {e})') from None
  if not isinstance(metadata, dict):
    raise ValueError(f'step {step} in {directory}: its metadata is not a JSON object')
  return metadata


def read_step(directory: str | os.PathLike, step: int, like: Any) -> Any:
  """The state of step ``step`` of a :class:`Manager`'s directory, read from the step's own files.

  Unlike :meth:`Manager.restore`, nothing else in the directory is consulted, so one damaged step (files cut short,
  contents removed) cannot make its intact neighbours unreadable; nothing is written.

  Raises:
    ValueError: the state cannot be read into ``like`` (the message names the step's folder).
  """
  return _restore_dir(os.path.join(os.path.abspath(os.fspath(directory)), str(step), 'default'), like)


def _restore_dir(path: str, like: Any) -> Any:
  target = _to_saveable(like)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      _check_saved_arrays(ckptr.metadata(path).item_metadata.tree, abstract)
      restored = ckptr.restore(path, abstract)
  except Exception as e:  # orbax raises many types for truncated or mismatched checkpoints
    raise ValueError(f'checkpoint at {path} could not be restored into the expected state '
                     f'({type(e).__name__}: {e})') from None
  return _from_saveable(restored, like)


def _check_saved_arrays(saved: Any, abstract: Any) -> None:
  """Raises ValueError when the saved tree's paths, shapes or dtypes differ from ``abstract``'s.

  Checked from the metadata before any array is read: a restore that fails half way leaves orbax's pending reads
  to fail again after its event loop has closed ("Event loop is closed" at a later garbage collection).
  """
  def leaves(tree):  # orbax saves named tuples and lists as dicts with string keys: compare names only
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path): leaf
            for path, leaf in flat}

  saved_leaves, want_leaves = leaves(saved), leaves(abstract)
  if saved_leaves.keys() != want_leaves.keys():
    missing = sorted(want_leaves.keys() - saved_leaves.keys())
    extra = sorted(saved_leaves.keys() - want_leaves.keys())
    raise ValueError(f'the saved entries differ: missing {missing[:5]}, unexpected {extra[:5]}')
  for name, want in want_leaves.items():
    got = saved_leaves[name]
    if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
      raise ValueError(f'{name} is saved as {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}')


def _is_complete(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, _COMMIT_FILE))


def _surviving_checkpoint(path: str) -> str | None:
  """The directory ``restore`` reads: ``path`` if complete, else the newest complete sibling of a cut swap."""
  for candidate in (path, path + _INCOMING, path + _REPLACED):
    if _is_complete(candidate):
      return candidate
  return None


def _finish_interrupted_swap(path: str) -> None:
  """Puts the checkpoint ``restore`` would read back at ``path`` (only needed when a swap was cut short)."""
  source = _surviving_checkpoint(path)
  if source is not None and source != path:
    _remove(path)  # An incomplete directory at ``path`` (never written by ``save``, but possible by hand).
    os.rename(source, path)


def _raise_missing_or_incomplete(path: str):
  if not os.path.exists(path):
    raise ValueError(f'no checkpoint at {path}.')
  if not os.path.isdir(path):
    raise ValueError(f'checkpoint path {path} is a file, not a checkpoint directory.')
  if not os.listdir(path):
    raise ValueError(f'checkpoint directory {path} is empty: nothing was saved there.')
  raise ValueError(f'checkpoint directory {path} is incomplete (no {_COMMIT_FILE}): its save did not finish '
                   'or files were removed; it cannot be restored.')


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


class Manager:
  """Numbered checkpoints of a run in one directory, e.g. one per evaluated round (over orbax's CheckpointManager).

  Each step holds the state and a JSON metadata dict (round, method, seed, host RNG state, ...). Steps appear
  only when completely written, so a crash mid-save never shows a partial step. Saves are synchronous: when
  ``save`` returns the step is on disk (the state may then be donated or changed freely).

  Example::

    with checkpoint.Manager(run_dir / 'ckpt', keep=3, every=10) as ckpts:
      start = ckpts.latest_step()
      if start is not None:
        state = ckpts.restore(start, like=state)
      for r in range((start or 0) + 1, num_rounds + 1):
        state, _ = round_fn(state, data)
        ckpts.save(r, state, metadata={'round': r}, force=r == num_rounds)

  Args:
    directory: where the steps live (created if missing).
    keep: how many most recent steps to keep (>= 1); older ones are deleted after each save.
    every: ``save`` writes only steps divisible by ``every`` unless ``force=True`` (use it for the final round).
    read_only: only read: nothing is created or cleaned up in ``directory`` (``save`` raises).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, every: int = 1, read_only: bool = False):
    for name, value in (('keep', keep), ('every', every)):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}.')
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = int(every)
    # read_only: neither create the directory nor clean up its unfinished steps (orbax's own read_only option only
    # adds warnings to the same effect).
    options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=not read_only,
                                           enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, metadata: dict | None = None, *, force: bool = False) -> bool:
    """Saves ``state`` (and ``metadata``, a JSON-serializable dict) as ``step``; returns whether it was written.

    Writes when ``step`` is a multiple of ``every`` or ``force`` is set; a step already saved is not rewritten.

    Raises:
      ValueError: for a negative step, a step older than the latest saved one, or metadata that is not a dict of
        strict JSON (no NaN or infinity).
    """
    step = _check_step(step)
    meta = _check_metadata(metadata)
    latest = self.latest_step()
    if latest is not None and step < latest:  # Going back means another run's directory or a bookkeeping bug.
      raise ValueError(f'step {step} is older than the latest saved step {latest} in {self.directory}.')
    if step == latest or (not force and step % self.every):
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(_to_saveable(state)), custom_metadata=meta,
                              force=True)

  def latest_step(self) -> int | None:
    """The newest completely written step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All completely written steps, oldest first."""
    return sorted(self._manager.all_steps())

  def restore(self, step: int, like: Any) -> Any:
    """Reads ``step`` into the structure, shapes and dtypes of ``like`` (typed PRNG keys rebuilt like ``like``'s).

    Raises:
      ValueError: if ``step`` is not saved here (names the saved steps) or does not match ``like``.
    """
    self._require_step(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for truncated or mismatched checkpoints
      raise ValueError(f'step {step} in {self.directory} could not be restored into the expected state '
                       f'({type(e).__name__}: {e})') from None
    return _from_saveable(restored, like)

  def metadata(self, step: int) -> dict:
    """The metadata dict saved with ``step`` ({} when none was given)."""
    self._require_step(step)
    return dict(self._manager.metadata(step).custom_metadata or {})

  def wait(self) -> None:
    """Blocks until pending writes and deletions are done (saves are synchronous; deletions may not be)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'Manager':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _require_step(self, step: int) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise ValueError(f'no checkpoint step {step!r} in {self.directory}; saved steps: {steps}.')


def _check_step(step) -> int:
  if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
    raise ValueError(f'checkpoint step must be an integer >= 0, got {step!r}.')
  return int(step)


def _check_metadata(metadata) -> dict:
  if metadata is None:
    return {}
  if not isinstance(metadata, dict):
    raise ValueError(f'checkpoint metadata must be a dict, got {type(metadata).__name__}.')
  try:
    text = json.dumps(metadata, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f'checkpoint metadata must be strict JSON (no NaN/Infinity, plain types): {e}') from None
  return json.loads(text)


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else np.asarray(x) if np.isscalar(x) else x,
                      tree)


def _from_saveable(tree, like):
  return jax.tree.map(lambda x, l: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l)) if _is_key(l) else x,
                      tree, like)

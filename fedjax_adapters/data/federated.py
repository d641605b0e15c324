"""Federated dataset format: per-client examples padded to a common length, plus counts.

Every client's examples sit on a leading client axis ``K`` and are zero-padded to ``N = max count``; ``counts[k]``
says how many of client ``k``'s rows are real. This is the layout the compiled round consumes: gather the sampled
clients' rows with one ``take`` and mask the padding inside ``client_update``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np


class FederatedData(NamedTuple):
  """Padded per-client arrays.

  Attributes:
    x: ``[K, N, ...]`` inputs, zero-padded past ``counts[k]``.
    y: ``[K, N, ...]`` targets, zero-padded past ``counts[k]``.
    counts: ``[K]`` int32 number of real examples per client.
  """
  x: np.ndarray
  y: np.ndarray
  counts: np.ndarray

  @property
  def num_clients(self) -> int:
    return int(self.counts.shape[0])

  def client(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The real (unpadded) examples of client ``k``."""
    n = int(self.counts[k])
    return self.x[k, :n], self.y[k, :n]


class FederatedDataset(NamedTuple):
  """Train and test splits of the same clients, with the ground-truth cluster of each client.

  Attributes:
    train: per-client training data.
    test: per-client test data (same transform as the client's cluster).
    clusters: ``[K]`` int32 true cluster of each client (used by oracle routers and reports).
    num_clusters: number of distinct clusters ``C``.
  """
  train: FederatedData
  test: FederatedData
  clusters: np.ndarray
  num_clusters: int


def stack_clients(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], *, pad_to: int | None = None) -> FederatedData:
  """Stacks a list of per-client arrays into padded :class:`FederatedData`.

  Args:
    xs: ``K`` arrays ``[n_k, ...]`` with the same trailing shape.
    ys: ``K`` arrays ``[n_k, ...]`` with the same trailing shape.
    pad_to: pad every client to this many rows (default: the largest ``n_k``).

  Returns:
    ``FederatedData`` with ``x: [K, N, ...]``, ``y: [K, N, ...]``, ``counts: [K]``.

  Raises:
    ValueError: naming the client, if the lists differ in length, a client's inputs and targets differ in rows, a
      client's trailing shape differs from client 0's (numpy would broadcast a ``[n, 1]`` client into ``[n, 10]``),
      a client's dtype cannot be cast to client 0's without changing kind (e.g. float targets into int ones), or
      ``pad_to`` is smaller than the largest client.
  """
  if len(xs) != len(ys):
    raise ValueError(f'stack_clients got {len(xs)} input arrays but {len(ys)} target arrays; they must match.')
  if not xs:
    raise ValueError('stack_clients needs at least one client.')
  xs, ys = [np.asarray(x) for x in xs], [np.asarray(y) for y in ys]
  for k, (x, y) in enumerate(zip(xs, ys)):
    if x.ndim == 0 or y.ndim == 0:
      raise ValueError(f'client {k} has a scalar {"input" if x.ndim == 0 else "target"} array; each client needs '
                       f'[n_k, ...] rows.')
    if len(x) != len(y):
      raise ValueError(f'client {k} has {len(x)} inputs but {len(y)} targets.')
  _check_same_trailing_shape(xs, 'inputs')
  _check_same_trailing_shape(ys, 'targets')
  counts = np.array([len(x) for x in xs], dtype=np.int32)
  n = int(counts.max()) if pad_to is None else int(pad_to)
  if n < counts.max():
    raise ValueError(f'pad_to={pad_to} is smaller than the largest client ({int(counts.max())} examples).')
  x_out = np.zeros((len(xs), n) + xs[0].shape[1:], dtype=xs[0].dtype)
  y_out = np.zeros((len(ys), n) + ys[0].shape[1:], dtype=ys[0].dtype)
  for k, (x, y) in enumerate(zip(xs, ys)):
    x_out[k, :len(x)] = x
    y_out[k, :len(y)] = y
  return FederatedData(x_out, y_out, counts)


def _check_same_trailing_shape(arrays: Sequence[np.ndarray], what: str) -> None:
  """Every client's ``[n_k, ...]`` array must have client 0's trailing shape and a dtype of the same kind."""
  shape, dtype = arrays[0].shape[1:], arrays[0].dtype
  for k, a in enumerate(arrays):
    if a.shape[1:] != shape:
      raise ValueError(f'client {k} {what} have trailing shape {a.shape[1:]} (array {a.shape}) but client 0 has '
                       f'{shape}; every client needs the same per-example shape.')
    if not np.can_cast(a.dtype, dtype, casting='same_kind'):
      raise ValueError(f'client {k} {what} have dtype {a.dtype} but client 0 has {dtype}; stacking would change '
                       f'their values. Convert them first.')


def check_client_data(x: Any, y: Any, counts: Any, *, num_classes: int | None = None, batch_size: int | None = None,
                      min_batches: int = 1) -> None:
  """Checks padded client data once, on the host, before any training; raises a ValueError naming the client.

  Checks that every leaf of ``x`` and ``y`` is ``[K, N, ...]`` with ``K = len(counts)``; that each count lies in
  ``[0, N]`` (a larger count would read padding as data and inflate the client's aggregation weight, a negative one
  would give it a negative weight); with ``num_classes``, that the labels ``y`` on real rows are integers in
  ``[0, num_classes)`` (label -1 would silently pick the last class, a label >= num_classes gives a NaN loss); with
  ``batch_size``, that every client holds at least ``min_batches`` full batches.

  Args:
    x: a pytree of ``[K, N, ...]`` arrays (numpy or jax), e.g. ``FederatedData.x``.
    y: a pytree of ``[K, N, ...]`` arrays; with ``num_classes`` a single integer array ``[K, N]`` or ``[K, N, ...]``.
    counts: ``[K]`` integers, real rows per client.
    num_classes: check labels for a classification loss with this many classes (None: labels are not checked).
    batch_size: the configured client batch size; give it where a client smaller than ``min_batches`` batches is an
      error (None: no size check).
    min_batches: the least number of full batches each client must hold when ``batch_size`` is given.

  Raises:
    ValueError: on the first problem found, naming the client index and the offending shape or value.
  """
  counts = np.asarray(counts)
  if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
    raise ValueError(f'counts must be a 1-D integer array [K]; got {counts.dtype} {list(counts.shape)}.')
  rows = _padded_rows(x, y, counts.shape[0])
  bad = np.flatnonzero((counts < 0) | (counts > rows))
  if bad.size:
    k = int(bad[0])
    raise ValueError(f'client {k} has count {int(counts[k])}, outside [0, {rows}] (its padded rows); '
                     f'{bad.size} client(s) have such counts.')
  if num_classes is not None:
    _check_labels(y, counts, num_classes)
  if batch_size is not None:
    if batch_size < 1 or min_batches < 1:
      raise ValueError(f'batch_size and min_batches must be >= 1, got {batch_size} and {min_batches}.')
    small = np.flatnonzero(counts < batch_size * min_batches)
    if small.size:
      k = int(small[0])
      raise ValueError(f'client {k} has {int(counts[k])} examples, fewer than {min_batches} batch(es) of '
                       f'{batch_size}; {small.size} client(s) are that small. Lower the batch size or drop them.')


def _padded_rows(x: Any, y: Any, num_clients: int) -> int:
  """The common ``N`` of every ``[K, N, ...]`` leaf of ``x`` and ``y``."""
  leaves = [('x', leaf) for leaf in _leaves(x)] + [('y', leaf) for leaf in _leaves(y)]
  if not leaves:
    raise ValueError('client data has no arrays in x or y.')
  for name, leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) < 2 or shape[0] != num_clients:
      raise ValueError(f'{name} leaf of shape {shape} is not [K, N, ...] with K = {num_clients} clients (len(counts)).')
  rows = {np.shape(leaf)[1] for _, leaf in leaves}
  if len(rows) != 1:
    raise ValueError(f'x and y leaves disagree on padded rows N: {sorted(rows)}.')
  return rows.pop()


def _leaves(tree: Any) -> list:
  """Array leaves of a (nested) dict / tuple / list / NamedTuple, without importing JAX."""
  if isinstance(tree, dict):
    return [leaf for key in sorted(tree) for leaf in _leaves(tree[key])]
  if isinstance(tree, (tuple, list)):
    return [leaf for item in tree for leaf in _leaves(item)]
  return [] if tree is None else [tree]


def _check_labels(y: Any, counts: np.ndarray, num_classes: int) -> None:
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  labels = np.asarray(y) if not isinstance(y, (dict, tuple, list)) else None
  if labels is None or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels y must be one integer array [K, N, ...] for a classification loss; got '
                     f'{type(y).__name__} of dtype {getattr(labels, "dtype", None)}.')
  real = np.arange(labels.shape[1])[None, :] < counts[:, None]  # [K, N]: True on real rows
  real = real.reshape(real.shape + (1,) * (labels.ndim - 2))
  bad = real & ((labels < 0) | (labels >= num_classes))
  if bad.any():
    k, row = (int(i) for i in np.argwhere(bad)[0][:2])
    num_bad_clients = int(np.any(bad.reshape(bad.shape[0], -1), axis=1).sum())
    raise ValueError(f'client {k} row {row} has label {int(labels[bad][0])}, outside [0, {num_classes}); '
                     f'{num_bad_clients} client(s) have such labels.')

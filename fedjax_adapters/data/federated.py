"""Federated dataset format: per-client examples padded to a common length, plus counts.

Every client's examples sit on a leading client axis ``K`` and are zero-padded to ``N = max count``; ``counts[k]``
says how many of client ``k``'s rows are real. This is the layout the compiled round consumes: gather the sampled
clients' rows with one ``take`` and mask the padding inside ``client_update``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

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
  """
  if len(xs) != len(ys):
    raise ValueError(f'stack_clients got {len(xs)} input arrays but {len(ys)} target arrays; they must match.')
  if not xs:
    raise ValueError('stack_clients needs at least one client.')
  counts = np.array([len(x) for x in xs], dtype=np.int32)
  for k, (x, y) in enumerate(zip(xs, ys)):
    if len(x) != len(y):
      raise ValueError(f'client {k} has {len(x)} inputs but {len(y)} targets.')
  n = int(counts.max()) if pad_to is None else int(pad_to)
  if n < counts.max():
    raise ValueError(f'pad_to={pad_to} is smaller than the largest client ({int(counts.max())} examples).')
  x_out = np.zeros((len(xs), n) + tuple(np.shape(xs[0])[1:]), dtype=np.asarray(xs[0]).dtype)
  y_out = np.zeros((len(ys), n) + tuple(np.shape(ys[0])[1:]), dtype=np.asarray(ys[0]).dtype)
  for k, (x, y) in enumerate(zip(xs, ys)):
    x_out[k, :len(x)] = x
    y_out[k, :len(y)] = y
  return FederatedData(x_out, y_out, counts)

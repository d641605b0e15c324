"""Per-client state stacked on a leading client axis ``[K, ...]``, with gather/scatter by client ids."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def check_client_ids(client_ids, num_clients: int) -> None:
  """Raises a ValueError naming the ids outside ``[0, num_clients)`` (host-side check; concrete ids only)."""
  ids = jnp.asarray(client_ids)
  if isinstance(ids, jax.core.Tracer):
    return
  bad = [int(i) for i in ids.ravel() if not 0 <= int(i) < num_clients]
  if bad:
    raise ValueError(f'client ids {bad} are out of range for {num_clients} clients (valid: 0..{num_clients - 1}).')


def num_clients_of(store: Any) -> int:
  leaves = jax.tree.leaves(store)
  if not leaves:
    raise ValueError('the client store is empty; it needs at least one array with a leading client axis.')
  sizes = {int(x.shape[0]) for x in leaves}
  if len(sizes) != 1:
    raise ValueError(f'client store leaves disagree on the number of clients: leading sizes {sorted(sizes)}.')
  return sizes.pop()


def init_store(init_one, keys_or_ids) -> Any:
  """Builds a store by vmapping ``init_one(x) -> state`` over ``keys_or_ids`` (``[K, ...]``)."""
  return jax.vmap(init_one)(keys_or_ids)


def gather(store: Any, client_ids: Array) -> Any:
  """``store[client_ids]`` leaf by leaf: ``[K, ...] -> [M, ...]``."""
  return jax.tree.map(lambda x: jnp.take(x, client_ids, axis=0), store)


def scatter(store: Any, client_ids: Array, values: Any, mask: Array | None = None) -> Any:
  """Writes ``values[i]`` to ``store[client_ids[i]]`` where ``mask[i]``; masked-out (padding) slots write nothing.

  Padding slots may repeat a real id; they are redirected out of range and dropped, so they can never overwrite a
  real client's update.
  """
  if mask is not None:
    n = num_clients_of(store) if jax.tree.leaves(store) else 0
    client_ids = jnp.where(mask, client_ids, n)
  return jax.tree.map(lambda s, v: s.at[client_ids].set(v.astype(s.dtype), mode='drop'), store, values)

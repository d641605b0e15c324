"""The federated round: gather sampled clients -> client_update on each -> aggregate -> scatter, compiled once.

Two backends run the same ``client_update``: ``'vmap'`` (one ``jax.vmap`` over the client axis with the frozen base
and global params broadcast, ``in_axes=None``, so the base is never copied per client) and ``'sequential'`` (a
Python loop over clients, for checking). The whole experiment state is one pytree, :class:`ServerState`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_adapters.federated import client_store
from fedjax_adapters.federated.aggregators import Aggregator
from fedjax_adapters.federated.client_update import ClientData, ClientOutput
from fedjax_adapters.federated.sampling import sample_clients

Array = jax.Array


class ServerState(NamedTuple):
  """The whole experiment state (one pytree; checkpoint it with ``fedjax_adapters.checkpoint``).

  Attributes:
    frozen: parameters no one trains (FedDPA's base model); broadcast to every client.
    global_params: parameters the server aggregates (a dict of parts).
    clients: per-client state stacked on a leading axis ``[K, ...]`` (local adaptors, router logits).
    agg_state: server optimizer state.
    round: ``[]`` int32 round counter.
    key: PRNG key of the experiment; round ``t`` uses ``fold_in(key, t)``, client ``k`` ``fold_in(., k)``.
  """
  frozen: Any
  global_params: Any
  clients: Any
  agg_state: Any
  round: Array
  key: Array


class Algorithm(NamedTuple):
  """An algorithm = how to initialize, train a client, aggregate and evaluate; the round runner is shared.

  Attributes:
    init: ``(key, num_clients) -> ServerState``.
    client_update: ``(frozen, global_params, client_state, ClientData, key) -> (ClientOutput, client_state,
      metrics)``.
    aggregator: :class:`Aggregator`.
    evaluate: ``(frozen, global_params, client_state, ClientData) -> dict`` of metric sums for one client.
  """
  init: Callable[[Array, int], ServerState]
  client_update: Callable
  aggregator: Aggregator
  evaluate: Callable


def client_data(data) -> ClientData:
  """``FederatedData`` (or any ``(x, y, counts)``) as ``ClientData`` of jax arrays with a leading client axis."""
  x, y, counts = data
  return ClientData(jax.tree.map(jnp.asarray, x), jax.tree.map(jnp.asarray, y), jnp.asarray(counts, jnp.int32))


def _check(state: ServerState, data: ClientData):
  k_data = int(data.count.shape[0])
  if jax.tree.leaves(state.clients):
    k_state = client_store.num_clients_of(state.clients)
    if k_state != k_data:
      raise ValueError(f'the data holds {k_data} clients but the client store holds {k_state}; they must match.')


def _round_keys(state: ServerState):
  key_r = jax.random.fold_in(state.key, state.round)
  return key_r, jax.random.fold_in(key_r, 0x5A3)  # (client keys base, sampling key)


def make_round(algorithm: Algorithm, *, clients_per_round: int, backend: str = 'vmap', jit: bool = True):
  """Builds ``round_fn(state, data, client_ids=None, client_mask=None) -> (state, metrics)``.

  Args:
    algorithm: the algorithm.
    clients_per_round: ``M``, clients sampled each round (fixed, so the round compiles once).
    backend: ``'vmap'`` or ``'sequential'``.
    jit: compile the vmapped round (the sequential backend always jits per client).

  Returns:
    ``round_fn``. ``data`` is :class:`ClientData` for all ``K`` clients; ``client_ids: [M]`` overrides sampling
    (with ``client_mask: [M]`` marking padding slots, which train but weigh nothing and write nothing).
    ``metrics`` holds the sampled clients' metric sums ``[M]`` and their ids.
  """
  if backend not in ('vmap', 'sequential'):
    raise ValueError(f"backend must be 'vmap' or 'sequential'; got {backend!r}.")
  if clients_per_round < 1:
    raise ValueError(f'clients_per_round must be >= 1; got {clients_per_round}.')

  def select(state, data, client_ids, client_mask):
    num_clients = data.count.shape[0]
    key_r, key_s = _round_keys(state)
    if client_ids is None:
      client_ids = sample_clients(key_s, num_clients, clients_per_round)
    if client_mask is None:
      client_mask = jnp.ones(client_ids.shape, bool)
    keys = jax.vmap(lambda i: jax.random.fold_in(key_r, i))(client_ids)
    return client_ids, client_mask, keys

  def finish(state, client_ids, client_mask, outs: ClientOutput, new_local, metrics):
    weights = outs.num_examples.astype(jnp.float32) * client_mask
    g, agg = algorithm.aggregator.aggregate(state.global_params, outs, weights, state.agg_state)
    clients = client_store.scatter(state.clients, client_ids, new_local, client_mask)
    metrics = dict(metrics, client_ids=client_ids, client_mask=client_mask)
    return state._replace(global_params=g, clients=clients, agg_state=agg, round=state.round + 1), metrics

  def vmap_round(state, data, client_ids=None, client_mask=None):
    client_ids, client_mask, keys = select(state, data, client_ids, client_mask)
    local = client_store.gather(state.clients, client_ids)
    cdata = client_store.gather(data, client_ids)
    outs, new_local, metrics = jax.vmap(algorithm.client_update, in_axes=(None, None, 0, 0, 0))(
        state.frozen, state.global_params, local, cdata, keys)
    return finish(state, client_ids, client_mask, outs, new_local, metrics)

  if backend == 'vmap':
    compiled = jax.jit(vmap_round) if jit else vmap_round

    def round_fn(state, data, client_ids=None, client_mask=None):
      _check(state, data)
      if client_ids is not None:
        client_store.check_client_ids(client_ids, int(data.count.shape[0]))
        client_ids = jnp.asarray(client_ids, jnp.int32)
        if client_ids.shape != (clients_per_round,):
          raise ValueError(f'client_ids has shape {tuple(client_ids.shape)}; this round takes '
                           f'clients_per_round={clients_per_round}.')
      return compiled(state, data, client_ids, client_mask)

    round_fn.compiled = compiled
    return round_fn

  update_one = jax.jit(algorithm.client_update)
  select_j = jax.jit(select)
  finish_j = jax.jit(finish)

  def sequential_round(state, data, client_ids=None, client_mask=None):
    _check(state, data)
    if client_ids is not None:
      client_store.check_client_ids(client_ids, int(data.count.shape[0]))
      client_ids = jnp.asarray(client_ids, jnp.int32)
    client_ids, client_mask, keys = select_j(state, data, client_ids, client_mask)
    results = []
    for j in range(int(client_ids.shape[0])):
      i = client_ids[j]
      local = jax.tree.map(lambda x: x[i], state.clients)
      cdata = jax.tree.map(lambda x: x[i], data)
      results.append(update_one(state.frozen, state.global_params, local, cdata, keys[j]))
    outs, new_local, metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
    return finish_j(state, client_ids, client_mask, outs, new_local, metrics)

  return sequential_round


@functools.lru_cache(maxsize=64)
def _compiled_evaluate(evaluate_fn):
  return jax.jit(jax.vmap(evaluate_fn, in_axes=(None, None, 0, 0)))


def evaluate(algorithm: Algorithm, state: ServerState, data, *, jit: bool = True) -> dict[str, Array]:
  """Every client's metric sums on its own ``data`` (``[K]`` per metric), vmapped over clients.

  The compiled evaluation is cached per algorithm, so evaluating every few rounds does not recompile.
  """
  data = data if isinstance(data, ClientData) else client_data(data)
  _check(state, data)
  fn = _compiled_evaluate(algorithm.evaluate) if jit else jax.vmap(algorithm.evaluate, in_axes=(None, None, 0, 0))
  return fn(state.frozen, state.global_params, state.clients, data)

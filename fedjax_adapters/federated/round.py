"""The federated round: gather sampled clients -> client_update on each -> aggregate -> scatter, compiled once.

Two backends run the same ``client_update``: ``'vmap'`` (one ``jax.vmap`` over the client axis with the frozen base
and global params broadcast, ``in_axes=None``, so the base is never copied per client) and ``'sequential'`` (a
Python loop over clients, for checking). The whole experiment state is one pytree, :class:`ServerState`.

``make_round(..., mesh=mesh)`` compiles the same vmapped round with the client axis sharded over the mesh's
``'clients'`` axis (``federated/sharding.py``); :func:`make_sampled_round` is the part that only sees the sampled
clients, shared with the host-memory client store of ``federated/host_store.py``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_adapters.federated import client_store, sharding
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


def round_client_ids(key: Array, round_: Array, num_clients: int, clients_per_round: int) -> Array:
  """The ids round ``round_`` of an experiment with PRNG ``key`` samples: ``[M] int32``, sorted.

  Every round runner samples through this (the host-store round too), so they all pick the same clients.
  """
  sampling_key = jax.random.fold_in(jax.random.fold_in(key, round_), 0x5A3)
  return sample_clients(sampling_key, num_clients, clients_per_round)


def _client_keys(state: ServerState, client_ids: Array) -> Array:
  """Client ``k``'s key in round ``t``: ``fold_in(fold_in(key, t), k)``; ``[M]`` keys."""
  key_r = jax.random.fold_in(state.key, state.round)
  return jax.vmap(lambda i: jax.random.fold_in(key_r, i))(client_ids)


def _server_update(algorithm: Algorithm, state: ServerState, client_ids, client_mask, outs: ClientOutput, metrics):
  weights = outs.num_examples.astype(jnp.float32) * client_mask
  g, agg = algorithm.aggregator.aggregate(state.global_params, outs, weights, state.agg_state)
  metrics = dict(metrics, client_ids=client_ids, client_mask=client_mask)
  return state._replace(global_params=g, agg_state=agg, round=state.round + 1), metrics


def map_clients(client_update: Callable, client_chunk: int | None = None) -> Callable:
  """``client_update`` over stacked clients: ``(frozen, global, local[M], data[M], keys[M]) -> outputs[M]``.

  ``client_chunk=None`` vmaps over all ``M`` clients at once. An int ``k`` runs ``lax.map`` over chunks of ``k``
  vmapped clients, one chunk after another inside the same compiled program: the same results with ``k`` clients'
  activations in memory instead of ``M``. On a CPU, where one client's convolutions already use every core, chunks
  of 1 keep each client's working set in cache (the CIFAR CNN's unfolded conv inputs), so the compiled round is not
  slower than calling clients one by one, and still pays no per-client dispatch.
  """
  if client_chunk is None:
    return jax.vmap(client_update, in_axes=(None, None, 0, 0, 0))
  client_chunk = int(client_chunk)
  if client_chunk < 1:
    raise ValueError(f'client_chunk must be None (all clients at once) or >= 1; got {client_chunk}.')

  def mapped(frozen, global_params, local, data, keys):
    one = lambda args: client_update(frozen, global_params, *args)
    return jax.lax.map(one, (local, data, keys), batch_size=client_chunk)

  return mapped


def make_sampled_round(algorithm: Algorithm, *, constrain: Callable[[Any], Any] | None = None,
                       client_chunk: int | None = None):
  """The part of a round that sees only the sampled clients (shared by the device and host-store rounds).

  Args:
    algorithm: the algorithm.
    constrain: applied to the stacked per-client pytrees (inputs and outputs of the vmapped ``client_update``); the
      sharded round passes ``with_sharding_constraint`` to the mesh's client axis. Default: identity.
    client_chunk: see :func:`map_clients` (default: every sampled client vmapped at once).

  Returns:
    ``sampled_round(state, local, data, client_ids, client_mask) -> (state, new_local, metrics)``: ``local`` and
    ``data`` are the sampled clients' state and :class:`ClientData` ``[M, ...]``; each client gets the key
    ``fold_in(fold_in(state.key, state.round), client_id)``; the global params and server state are aggregated and
    the round counter advanced, while ``state.clients`` is left alone (the caller scatters ``new_local [M, ...]``).
  """
  constrain = constrain or (lambda t: t)

  def sampled_round(state, local, data, client_ids, client_mask):
    keys = _client_keys(state, client_ids)
    local, data, keys = constrain((local, data, keys))
    outs, new_local, metrics = constrain(map_clients(algorithm.client_update, client_chunk)(
        state.frozen, state.global_params, local, data, keys))
    state, metrics = _server_update(algorithm, state, client_ids, client_mask, outs, metrics)
    return state, new_local, metrics

  return sampled_round


def make_round(algorithm: Algorithm, *, clients_per_round: int, backend: str = 'vmap', jit: bool = True,
               mesh=None, axis_name: str = 'clients', shard_store: bool = True, client_chunk: int | None = None):
  """Builds ``round_fn(state, data, client_ids=None, client_mask=None) -> (state, metrics)``.

  Args:
    algorithm: the algorithm.
    clients_per_round: ``M``, clients sampled each round (fixed, so the round compiles once).
    backend: ``'vmap'`` or ``'sequential'``.
    jit: compile the vmapped round (the sequential backend always jits per client).
    mesh: a ``jax.sharding.Mesh`` (e.g. :func:`fedjax_adapters.federated.sharding.client_mesh`): run the same
      round with the client axis sharded over ``mesh``'s ``axis_name`` and the frozen/global params, server state
      and key replicated (``'vmap'`` backend, jitted). ``M`` must divide over the axis; pad with ``client_ids`` +
      ``client_mask``.
    axis_name: the client axis of ``mesh``.
    shard_store: with ``mesh``, also shard the client store and the data ``[K, ...]`` (``K`` must divide over the
      axis); ``False`` replicates them, so only the sampled clients ``[M, ...]`` are sharded.
    client_chunk: ``'vmap'`` backend: ``None`` vmaps all ``M`` clients at once; ``k`` vmaps ``k`` at a time in a
      compiled loop over chunks (same results, less memory; ``1`` suits conv models on a CPU; see
      :func:`map_clients`). Not with ``mesh``.

  Returns:
    ``round_fn``. ``data`` is :class:`ClientData` for all ``K`` clients; ``client_ids: [M]`` overrides sampling
    (with ``client_mask: [M]`` marking padding slots, which train but weigh nothing and write nothing).
    ``metrics`` holds the sampled clients' metric sums ``[M]`` and their ids.
  """
  if backend not in ('vmap', 'sequential'):
    raise ValueError(f"backend must be 'vmap' or 'sequential'; got {backend!r}.")
  if client_chunk is not None and (backend != 'vmap' or int(client_chunk) < 1):
    raise ValueError(f"client_chunk must be None or >= 1 with backend='vmap'; got client_chunk={client_chunk}, "
                     f"backend={backend!r}.")
  if clients_per_round < 1:
    raise ValueError(f'clients_per_round must be >= 1; got {clients_per_round}.')
  layout = None
  if mesh is not None:
    if backend != 'vmap' or not jit:
      raise ValueError(f"a mesh needs backend='vmap' and jit=True; got backend={backend!r}, jit={jit}.")
    if client_chunk is not None:
      raise ValueError(f'client_chunk={client_chunk} cannot be combined with a mesh: the mesh already splits the '
                       f'client axis over devices.')
    layout = sharding.RoundLayout(mesh, axis_name, shard_store)
    layout.check_clients_per_round(clients_per_round)

  def select(state, data, client_ids, client_mask):
    if client_ids is None:
      client_ids = round_client_ids(state.key, state.round, data.count.shape[0], clients_per_round)
    if client_mask is None:
      client_mask = jnp.ones(client_ids.shape, bool)
    return client_ids, client_mask

  def finish(state, client_ids, client_mask, outs: ClientOutput, new_local, metrics):
    state, metrics = _server_update(algorithm, state, client_ids, client_mask, outs, metrics)
    return state._replace(clients=client_store.scatter(state.clients, client_ids, new_local, client_mask)), metrics

  sampled_round = make_sampled_round(algorithm, constrain=layout.constrain if layout else None,
                                     client_chunk=client_chunk)

  def vmap_round(state, data, client_ids=None, client_mask=None):
    client_ids, client_mask = select(state, data, client_ids, client_mask)
    local = client_store.gather(state.clients, client_ids)
    cdata = client_store.gather(data, client_ids)
    state, new_local, metrics = sampled_round(state, local, cdata, client_ids, client_mask)
    return state._replace(clients=client_store.scatter(state.clients, client_ids, new_local, client_mask)), metrics

  if backend == 'vmap':
    if layout is None:
      compiled = jax.jit(vmap_round) if jit else vmap_round
    else:
      # The state leaves as it came in (store per `shard_store`, the rest replicated), so the next round moves
      # nothing; per-client metrics stay on the client axis.
      rep = layout.replicated
      state_out = ServerState(rep, rep, layout.store, rep, rep, rep)
      compiled = jax.jit(vmap_round, out_shardings=(state_out, layout.clients))

    def round_fn(state, data, client_ids=None, client_mask=None):
      _check(state, data)
      if client_ids is not None:
        client_store.check_client_ids(client_ids, int(data.count.shape[0]))
        client_ids = jnp.asarray(client_ids, jnp.int32)
        if client_ids.shape != (clients_per_round,):
          raise ValueError(f'client_ids has shape {tuple(client_ids.shape)}; this round takes '
                           f'clients_per_round={clients_per_round}.')
      if layout is not None:
        state, data = layout.place(state, data)
        client_ids, client_mask = jax.device_put((client_ids, client_mask), layout.replicated)
      return compiled(state, data, client_ids, client_mask)

    round_fn.compiled = compiled
    round_fn.layout = layout
    return round_fn

  update_one = jax.jit(algorithm.client_update)
  select_j = jax.jit(select)
  finish_j = jax.jit(finish)

  def sequential_round(state, data, client_ids=None, client_mask=None):
    _check(state, data)
    if client_ids is not None:
      client_store.check_client_ids(client_ids, int(data.count.shape[0]))
      client_ids = jnp.asarray(client_ids, jnp.int32)
    client_ids, client_mask = select_j(state, data, client_ids, client_mask)
    keys = _client_keys(state, client_ids)
    results = []
    for j in range(int(client_ids.shape[0])):
      i = client_ids[j]
      local = jax.tree.map(lambda x: x[i], state.clients)
      cdata = jax.tree.map(lambda x: x[i], data)
      results.append(update_one(state.frozen, state.global_params, local, cdata, keys[j]))
    outs, new_local, metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
    return finish_j(state, client_ids, client_mask, outs, new_local, metrics)

  return sequential_round


def run_rounds(round_fn: Callable, state: ServerState, data: ClientData, num_rounds: int
               ) -> tuple[ServerState, dict[str, Array]]:
  """Runs ``num_rounds`` rounds of a vmapped ``round_fn`` (from :func:`make_round`) inside one compiled loop.

  The same as calling ``round_fn(state, data)`` ``num_rounds`` times, without a Python dispatch per round: the
  rounds run in a ``lax.scan`` around the round ``make_round`` compiled, which pays off when rounds are small (the
  FLoRAL MNIST MLP runs about twice as fast). The loop compiles once per ``num_rounds`` and is cached on
  ``round_fn``. Returns the final state and every round's metrics, stacked on a leading ``[num_rounds]`` axis.
  The sequential backend has no compiled round; it is looped in Python.
  """
  num_rounds = int(num_rounds)
  if num_rounds < 1:
    raise ValueError(f'num_rounds must be >= 1; got {num_rounds}.')
  compiled = getattr(round_fn, 'compiled', None)
  if compiled is None:
    history = []
    for _ in range(num_rounds):
      state, metrics = round_fn(state, data)
      history.append(metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *history)
  _check(state, data)
  layout = round_fn.layout
  if layout is not None:
    state, data = layout.place(state, data)
  cache = round_fn.__dict__.setdefault('loops', {})
  if num_rounds not in cache:
    def loop(state, data):
      def body(state, _):
        return compiled(state, data, None, None)
      return jax.lax.scan(body, state, None, length=num_rounds)
    cache[num_rounds] = jax.jit(loop)
  return cache[num_rounds](state, data)


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

"""The federated round: gather sampled clients -> client_update on each -> screen -> aggregate -> scatter.

``make_round(algorithm, clients_per_round=M, mapping=...)`` builds a :class:`Round`. *How* clients are mapped is
one value, a :class:`~fedjax_adapters.federated.mapping.ClientMapping` (all at once, in chunks, one by one, sharded
over a mesh); the round itself is the same code for all of them and, for every mapping but the sequential one, one
compiled program traced once per experiment. Every client update is screened before aggregation
(:mod:`fedjax_adapters.federated.guard`): a non-finite update weighs 0 and leaves that client's state as it was.

The whole experiment state is one pytree, :class:`ServerState`; ``Round.run`` runs many rounds in one compiled
``lax.scan``.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_adapters.federated import client_store
from fedjax_adapters.federated import guard as guard_lib
from fedjax_adapters.federated import mapping as mapping_lib
from fedjax_adapters.federated.algorithm import Algorithm, ServerState
from fedjax_adapters.federated.client_update import ClientData, ClientOutput, client_data
from fedjax_adapters.federated.sampling import sample_clients

Array = jax.Array


def round_client_ids(key: Array, round_: Array, num_clients: int, clients_per_round: int) -> Array:
  """The ids round ``round_`` of an experiment with PRNG ``key`` samples: ``[M] int32``, sorted.

  Every round runner samples through this (the host-store round too), so they all pick the same clients.
  """
  sampling_key = jax.random.fold_in(jax.random.fold_in(key, round_), 0x5A3)
  return sample_clients(sampling_key, num_clients, clients_per_round)


def client_keys(state: ServerState, client_ids: Array) -> Array:
  """Client ``k``'s key in round ``t``: ``fold_in(fold_in(key, t), k)``; ``[M]`` keys."""
  key_r = jax.random.fold_in(state.key, state.round)
  return jax.vmap(lambda i: jax.random.fold_in(key_r, i))(client_ids)


def _keep_if(pred: Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def server_update(algorithm: Algorithm, guard: guard_lib.UpdateGuard, state: ServerState, client_ids: Array,
                  client_mask: Array, outs: ClientOutput, new_client_state: Any, metrics: dict
                  ) -> tuple[ServerState, Array, dict]:
  """Screens the sampled clients' outputs ``[M, ...]``, aggregates and advances the round counter.

  Returns:
    ``(state, keep, metrics)``: ``keep [M]`` marks the clients whose new state may be written back (in the mask
    and not rejected); ``metrics`` adds ``rejected``, ``reject_reason``, ``update_norm``, ``client_ids`` and
    ``client_mask`` to the clients' own metric sums. When no client carries weight (all rejected, padded or empty)
    the global params and server optimizer state stay exactly as they were.
  """
  outs, keep, info = guard_lib.screen(guard, state.global_params, outs, new_client_state, metrics, client_mask)
  weights = outs.num_examples.astype(jnp.float32) * keep
  g, agg = algorithm.aggregator.aggregate(state.global_params, outs, weights, state.agg_state)
  g, agg = _keep_if(jnp.sum(weights) > 0, (g, agg), (state.global_params, state.agg_state))
  metrics = dict(metrics, **info, client_ids=client_ids, client_mask=client_mask)
  return state._replace(global_params=g, agg_state=agg, round=state.round + 1), keep, metrics


def map_client_updates(algorithm: Algorithm, mapping: mapping_lib.ClientMapping, state: ServerState,
                       client_state: Any, data: ClientData, client_ids: Array):
  """Every sampled client's ``client_update`` (``[M, ...]`` in and out), mapped as ``mapping`` says."""
  keys = client_keys(state, client_ids)
  return mapping.map(algorithm.client_update, (state.frozen, state.global_params), (client_state, data, keys))


def make_sampled_update(algorithm: Algorithm, mapping: mapping_lib.ClientMapping, guard: guard_lib.UpdateGuard):
  """The part of a round that sees only the sampled clients (the host-store round is built on it).

  Returns ``update(state, client_state, data, client_ids, client_mask) -> (state, new_client_state, keep,
  metrics)`` over the sampled clients ``[M, ...]``: compiled once for compiled mappings (a sharded mapping keeps the
  per-client outputs on its client axis); for the sequential mapping, clients are looped and the server update is
  jitted. ``keep [M]`` says which clients' new state to write back.
  """
  def update(state, client_state, data, client_ids, client_mask):
    outs, new_cs, metrics = map_client_updates(algorithm, mapping, state, client_state, data, client_ids)
    state, keep, metrics = server_update(algorithm, guard, state, client_ids, client_mask, outs, new_cs, metrics)
    return state, new_cs, keep, metrics

  if mapping.compiled:
    return mapping.jit(update, lambda layout: (ServerState(*(layout.replicated,) * 6),) + (layout.clients,) * 3)
  finish = jax.jit(functools.partial(server_update, algorithm, guard))

  def stepwise(state, client_state, data, client_ids, client_mask):
    outs, new_cs, metrics = map_client_updates(algorithm, mapping, state, client_state, data, client_ids)
    state, keep, metrics = finish(state, client_ids, client_mask, outs, new_cs, metrics)
    return state, new_cs, keep, metrics

  return stepwise


def check_round_ids(client_ids, client_mask, num_clients: int, clients_per_round: int):
  """Host-side checks of explicit ids: in range, the round's shape, no real client twice; ``(ids, mask)``."""
  client_store.check_client_ids(client_ids, num_clients)
  ids = np.asarray(client_ids)
  if ids.shape != (clients_per_round,):
    raise ValueError(f'client_ids has shape {tuple(ids.shape)}; this round takes clients_per_round='
                     f'{clients_per_round}.')
  mask = np.ones(ids.shape, bool) if client_mask is None else np.asarray(client_mask, bool)
  if mask.shape != ids.shape:
    raise ValueError(f'client_mask has shape {tuple(mask.shape)}; client_ids has {tuple(ids.shape)}.')
  real, counts = np.unique(ids[mask], return_counts=True)
  if np.any(counts > 1):
    raise ValueError(f'client ids {real[counts > 1].tolist()} appear more than once among the real (unmasked) slots '
                     'of this round; each client may train once per round (padding slots may repeat an id).')
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


class DataCheck:
  """Runs ``algorithm.check_data`` once per data object (held, so its id cannot be reused)."""

  def __init__(self, algorithm: Algorithm):
    self._check = algorithm.check_data
    self._seen: list = []

  def __call__(self, data: ClientData) -> None:
    if self._check is None or any(d is data for d in self._seen):
      return
    self._check(data)
    self._seen = (self._seen + [data])[-4:]


def check_state_matches(state: ServerState, data: ClientData) -> None:
  k_data = int(data.count.shape[0])
  if jax.tree.leaves(state.clients):
    k_state = client_store.num_clients_of(state.clients)
    if k_state != k_data:
      raise ValueError(f'the data holds {k_data} clients but the client store holds {k_state}; they must match.')


class Round:
  """One federated round of ``algorithm``: ``round_fn(state, data, client_ids=None, client_mask=None)``.

  Build it with :func:`make_round`. Calling it returns ``(state, metrics)``: ``data`` is :class:`ClientData` for
  all ``K`` clients; ``client_ids [M]`` overrides the seeded sampling (``client_mask [M]`` marks padding slots, which
  train but weigh nothing and write nothing). ``metrics`` holds the sampled clients' metric sums ``[M]`` and the
  screening results (:mod:`fedjax_adapters.federated.guard`). :meth:`run` runs many rounds in one compiled loop.

  Attributes:
    algorithm, clients_per_round, mapping, guard: as given to :func:`make_round`.
    compiled: the jitted round ``(state, data, client_ids, client_mask) -> (state, metrics)`` (None for the
      sequential mapping); exposed for lowering, FLOP counting and compile counts.
  """

  def __init__(self, algorithm: Algorithm, clients_per_round: int, mapping: mapping_lib.ClientMapping,
               guard: guard_lib.UpdateGuard):
    self.algorithm, self.clients_per_round, self.mapping, self.guard = algorithm, clients_per_round, mapping, guard
    self._check_data = DataCheck(algorithm)
    self._loops: dict[int, Any] = {}
    if mapping.compiled:
      self.compiled = mapping.jit(self._body, lambda layout: (
          ServerState(*(layout.replicated,) * 2, layout.store, *(layout.replicated,) * 3), layout.clients))
    else:
      self.compiled = None
      self._prepare = jax.jit(self._prepare_fn)
      self._finish = jax.jit(self._finish_fn)

  def _prepare_fn(self, state, data, client_ids, client_mask):
    if client_ids is None:
      client_ids = round_client_ids(state.key, state.round, data.count.shape[0], self.clients_per_round)
    if client_mask is None:
      client_mask = jnp.ones(client_ids.shape, bool)
    cs = client_store.gather(state.clients, client_ids)
    return client_ids, client_mask, cs, client_store.gather(data, client_ids)

  def _finish_fn(self, state, client_ids, client_mask, outs, new_cs, metrics):
    state, keep, metrics = server_update(self.algorithm, self.guard, state, client_ids, client_mask, outs, new_cs,
                                         metrics)
    return state._replace(clients=client_store.scatter(state.clients, client_ids, new_cs, keep)), metrics

  def _body(self, state, data, client_ids, client_mask):
    client_ids, client_mask, cs, cdata = self._prepare_fn(state, data, client_ids, client_mask)
    outs, new_cs, metrics = map_client_updates(self.algorithm, self.mapping, state, cs, cdata, client_ids)
    return self._finish_fn(state, client_ids, client_mask, outs, new_cs, metrics)

  def _inputs(self, state, data, client_ids, client_mask):
    data = data if isinstance(data, ClientData) else client_data(data)
    check_state_matches(state, data)
    self._check_data(data)
    if client_ids is not None:
      client_ids, client_mask = self.mapping.replicate(
          check_round_ids(client_ids, client_mask, int(data.count.shape[0]), self.clients_per_round))
    elif client_mask is not None:
      raise ValueError('client_mask needs client_ids: it marks padding slots among explicitly given ids.')
    state, data = self.mapping.place(state, data)
    return state, data, client_ids, client_mask

  def __call__(self, state: ServerState, data, client_ids=None, client_mask=None) -> tuple[ServerState, dict]:
    state, data, client_ids, client_mask = self._inputs(state, data, client_ids, client_mask)
    if self.compiled is not None:
      return self.compiled(state, data, client_ids, client_mask)
    client_ids, client_mask, cs, cdata = self._prepare(state, data, client_ids, client_mask)
    outs, new_cs, metrics = map_client_updates(self.algorithm, self.mapping, state, cs, cdata, client_ids)
    return self._finish(state, client_ids, client_mask, outs, new_cs, metrics)

  def run(self, state: ServerState, data, num_rounds: int) -> tuple[ServerState, dict]:
    """``num_rounds`` rounds with seeded sampling; returns the state and every round's metrics ``[num_rounds, ...]``.

    With a compiled mapping the rounds run in one ``lax.scan`` (no Python dispatch per round; compiled once per
    ``num_rounds`` and cached); the sequential mapping loops in Python. Same result as calling the round
    ``num_rounds`` times.
    """
    num_rounds = int(num_rounds)
    if num_rounds < 1:
      raise ValueError(f'num_rounds must be >= 1; got {num_rounds}.')
    if self.compiled is None:
      history = []
      for _ in range(num_rounds):
        state, metrics = self(state, data)
        history.append(metrics)
      return state, jax.tree.map(lambda *xs: jnp.stack(xs), *history)
    state, data, _, _ = self._inputs(state, data, None, None)
    if num_rounds not in self._loops:
      def loop(state, data):
        return jax.lax.scan(lambda s, _: self.compiled(s, data, None, None), state, None, length=num_rounds)
      self._loops[num_rounds] = jax.jit(loop)
    return self._loops[num_rounds](state, data)


def make_round(algorithm: Algorithm, *, clients_per_round: int, mapping: mapping_lib.ClientMapping | None = None,
               guard: guard_lib.UpdateGuard | None = None) -> Round:
  """Builds the round of ``algorithm``.

  Args:
    algorithm: the algorithm.
    clients_per_round: ``M``, clients sampled each round (fixed, so the round compiles once).
    mapping: how clients are mapped (:func:`~fedjax_adapters.federated.mapping.vmap_clients` by default;
      ``chunked_clients(k)``, ``sequential_clients()``, ``sharded_clients(mesh)``).
    guard: how client updates are screened (default :class:`~fedjax_adapters.federated.guard.UpdateGuard`:
      non-finite updates rejected, no norm bound). ``UpdateGuard(reject_nonfinite=False)`` lets them through.

  Returns:
    A :class:`Round`: ``round_fn(state, data, client_ids=None, client_mask=None) -> (state, metrics)``.
  """
  mapping = mapping_lib.resolve(mapping)
  mapping.check_clients_per_round(int(clients_per_round))
  guard = (guard or guard_lib.UpdateGuard()).check()
  return Round(algorithm, int(clients_per_round), mapping, guard)


def run_rounds(round_fn: Round, state: ServerState, data, num_rounds: int) -> tuple[ServerState, dict]:
  """``round_fn.run(state, data, num_rounds)``: many rounds, in one compiled loop where the mapping compiles."""
  return round_fn.run(state, data, num_rounds)

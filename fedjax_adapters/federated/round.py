"""The federated round: sample -> gather -> client_update on each -> [adversary] -> screen -> aggregate -> scatter.

``make_round(algorithm, clients_per_round=M, mapping=...)`` builds a :class:`Round`. *Which* clients fill the
round's ``M`` slots is a :class:`~fedjax_adapters.federated.sampling.Sampling` (fixed-size by default, or Poisson).
Every client update receives a :class:`~fedjax_adapters.federated.client_update.ClientInfo` (its id, slot and
round), and the aggregator a :class:`~fedjax_adapters.federated.aggregators.RoundInfo` (ids, the screen's update
norms, a server key). *How* clients are mapped is
one value, a :class:`~fedjax_adapters.federated.mapping.ClientMapping` (all at once, in chunks, one by one, sharded
over a mesh); the round itself is the same code for all of them and, for every mapping but the sequential one, one
compiled program traced once per experiment. Every client update is screened before aggregation
(:mod:`fedjax_adapters.federated.guard`): a non-finite update weighs 0 and leaves that client's state as it was.

The whole experiment state is one pytree, :class:`ServerState`; ``Round.run`` runs many rounds in one compiled
``lax.scan``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_adapters.federated import client_store
from fedjax_adapters.federated import guard as guard_lib
from fedjax_adapters.federated import mapping as mapping_lib
from fedjax_adapters.federated import sampling as sampling_lib
from fedjax_adapters.federated.aggregators import RoundInfo
from fedjax_adapters.federated.algorithm import Algorithm, ServerState
from fedjax_adapters.federated.client_update import ClientData, ClientInfo, ClientOutput, client_data

Array = jax.Array

# Tags folded into fold_in(key, round) for the server's own randomness. Client k uses fold_in(., k) with k < K, so
# the top of the uint32 range cannot collide with a client.
SERVER_KEY_TAG = 0xFFFFFFFF
ADVERSARY_KEY_TAG = 0xFFFFFFFE

# adversary(global_params, outs [M, ...], client_ids [M], client_mask [M], key) -> outs: an experiment's attack on
# the stacked client outputs, applied before the update screen (fedjax_adapters.federated.attacks builds them).
Adversary = Callable[[Any, ClientOutput, Array, Array, Array], ClientOutput]


_sampling_key = sampling_lib.round_key


def round_client_ids(key: Array, round_: Array, num_clients: int, clients_per_round: int) -> Array:
  """The ids round ``round_`` of an experiment with PRNG ``key`` samples with fixed-size sampling: ``[M]``, sorted."""
  return sampling_lib.sample_clients(_sampling_key(key, round_), num_clients, clients_per_round)


def round_sample(sampling: sampling_lib.Sampling, key: Array, round_: Array, num_clients: int
                 ) -> tuple[Array, Array, Array]:
  """``(ids [M], mask [M], cohort [])`` of round ``round_``: every round runner (the host-store round too) samples
  through this, so they all pick the same clients."""
  return sampling.sample_round(key, round_, num_clients)


def server_key(state: ServerState, tag: int = SERVER_KEY_TAG) -> Array:
  """This round's key for the server's own randomness (identical on every host)."""
  return jax.random.fold_in(jax.random.fold_in(state.key, state.round), tag)


def client_keys(state: ServerState, client_ids: Array) -> Array:
  """Client ``k``'s key in round ``t``: ``fold_in(fold_in(key, t), k)``; ``[M]`` keys."""
  key_r = jax.random.fold_in(state.key, state.round)
  return jax.vmap(lambda i: jax.random.fold_in(key_r, i))(client_ids)


def _keep_if(pred: Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def server_update(algorithm: Algorithm, guard: guard_lib.UpdateGuard, state: ServerState, client_ids: Array,
                  client_mask: Array, outs: ClientOutput, new_client_state: Any, metrics: dict,
                  adversary: Adversary | None = None) -> tuple[ServerState, Array, dict]:
  """Screens the sampled clients' outputs ``[M, ...]``, aggregates and advances the round counter.

  An ``adversary`` (experiments only) rewrites the stacked outputs first, so the screen and the aggregator see what
  attackers send.

  Returns:
    ``(state, keep, metrics)``: ``keep [M]`` marks the clients whose new state may be written back (in the mask
    and not rejected); ``metrics`` adds ``rejected``, ``reject_reason``, ``update_norm``, ``client_ids`` and
    ``client_mask`` to the clients' own metric sums. When no client carries weight (all rejected, padded or empty)
    the global params and server optimizer state stay exactly as they were.
  """
  if adversary is not None:
    outs = adversary(state.global_params, outs, client_ids, client_mask, server_key(state, ADVERSARY_KEY_TAG))
  outs, keep, info = guard_lib.screen(guard, state.global_params, outs, new_client_state, metrics, client_mask)
  weights = outs.num_examples.astype(jnp.float32) * keep
  round_info = RoundInfo(client_ids, client_mask, keep, info['update_norm'], state.round, server_key(state))
  g, agg = algorithm.aggregator.aggregate(state.global_params, outs, weights, state.agg_state, round_info)
  g, agg = _keep_if(jnp.sum(weights) > 0, (g, agg), (state.global_params, state.agg_state))
  metrics = dict(metrics, **info, client_ids=client_ids, client_mask=client_mask)
  return state._replace(global_params=g, agg_state=agg, round=state.round + 1), keep, metrics


def map_client_updates(algorithm: Algorithm, mapping: mapping_lib.ClientMapping, state: ServerState,
                       client_state: Any, data: ClientData, client_ids: Array, client_mask: Array):
  """Every sampled client's ``client_update`` (``[M, ...]`` in and out), mapped as ``mapping`` says; each gets its
  key and its :class:`ClientInfo`."""
  keys = client_keys(state, client_ids)
  m = client_ids.shape[0]
  infos = ClientInfo(client_ids, jnp.arange(m, dtype=jnp.int32), jnp.broadcast_to(state.round, (m,)), client_mask)
  return mapping.map(algorithm.client_update, (state.frozen, state.global_params), (client_state, data, keys, infos))


def make_sampled_update(algorithm: Algorithm, mapping: mapping_lib.ClientMapping, guard: guard_lib.UpdateGuard,
                        adversary: Adversary | None = None):
  """The part of a round that sees only the sampled clients (the host-store round is built on it).

  Returns ``update(state, client_state, data, client_ids, client_mask) -> (state, new_client_state, keep,
  metrics)`` over the sampled clients ``[M, ...]``: compiled once for compiled mappings (a sharded mapping keeps the
  per-client outputs on its client axis); for the sequential mapping, clients are looped and the server update is
  jitted. ``keep [M]`` says which clients' new state to write back.
  """
  def update(state, client_state, data, client_ids, client_mask):
    outs, new_cs, metrics = map_client_updates(algorithm, mapping, state, client_state, data, client_ids, client_mask)
    state, keep, metrics = server_update(algorithm, guard, state, client_ids, client_mask, outs, new_cs, metrics,
                                         adversary)
    return state, new_cs, keep, metrics

  if mapping.compiled:
    return mapping.jit(update, lambda layout: (ServerState(*(layout.replicated,) * 6),) + (layout.clients,) * 3)
  finish = jax.jit(functools.partial(server_update, algorithm, guard, adversary=adversary))

  def stepwise(state, client_state, data, client_ids, client_mask):
    outs, new_cs, metrics = map_client_updates(algorithm, mapping, state, client_state, data, client_ids, client_mask)
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
  screening results (:mod:`fedjax_adapters.federated.guard`); with Poisson sampling also ``cohort`` (how many
  clients the draw selected, the same in every slot). :meth:`run` runs many rounds in one compiled loop.

  Attributes:
    algorithm, sampling, mapping, guard, adversary: as given to :func:`make_round`.
    clients_per_round: ``M``, the round's slots (``sampling.slots``).
    compiled: the jitted round ``(state, data, client_ids, client_mask) -> (state, metrics)`` (None for the
      sequential mapping); exposed for lowering, FLOP counting and compile counts.
  """

  def __init__(self, algorithm: Algorithm, sampling: sampling_lib.Sampling, mapping: mapping_lib.ClientMapping,
               guard: guard_lib.UpdateGuard, adversary: Adversary | None = None):
    self.algorithm, self.sampling, self.mapping, self.guard = algorithm, sampling, mapping, guard
    self.adversary = adversary
    self.clients_per_round = sampling.slots
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
    cohort = None
    if client_ids is None:
      client_ids, client_mask, cohort = round_sample(self.sampling, state.key, state.round, data.count.shape[0])
    if client_mask is None:
      client_mask = jnp.ones(client_ids.shape, bool)
    cs = client_store.gather(state.clients, client_ids)
    return client_ids, client_mask, cohort, cs, client_store.gather(data, client_ids)

  def _finish_fn(self, state, client_ids, client_mask, cohort, outs, new_cs, metrics):
    state, keep, metrics = server_update(self.algorithm, self.guard, state, client_ids, client_mask, outs, new_cs,
                                         metrics, self.adversary)
    if cohort is not None and isinstance(self.sampling, sampling_lib.PoissonSampling):
      metrics['cohort'] = jnp.broadcast_to(cohort, client_ids.shape)
    return state._replace(clients=client_store.scatter(state.clients, client_ids, new_cs, keep)), metrics

  def _body(self, state, data, client_ids, client_mask):
    client_ids, client_mask, cohort, cs, cdata = self._prepare_fn(state, data, client_ids, client_mask)
    outs, new_cs, metrics = map_client_updates(self.algorithm, self.mapping, state, cs, cdata, client_ids,
                                               client_mask)
    return self._finish_fn(state, client_ids, client_mask, cohort, outs, new_cs, metrics)

  def _inputs(self, state, data, client_ids, client_mask):
    data = data if isinstance(data, ClientData) else client_data(data)
    check_state_matches(state, data)
    num_clients = int(data.count.shape[0])
    self.sampling.check(num_clients)
    self._check_data(data)
    if client_ids is not None:
      client_ids, client_mask = self.mapping.replicate(
          check_round_ids(client_ids, client_mask, num_clients, self.clients_per_round))
    elif client_mask is not None:
      raise ValueError('client_mask needs client_ids: it marks padding slots among explicitly given ids.')
    state, data = self.mapping.place(state, data)
    return state, data, client_ids, client_mask

  def __call__(self, state: ServerState, data, client_ids=None, client_mask=None) -> tuple[ServerState, dict]:
    state, data, client_ids, client_mask = self._inputs(state, data, client_ids, client_mask)
    if self.compiled is not None:
      return self.compiled(state, data, client_ids, client_mask)
    client_ids, client_mask, cohort, cs, cdata = self._prepare(state, data, client_ids, client_mask)
    outs, new_cs, metrics = map_client_updates(self.algorithm, self.mapping, state, cs, cdata, client_ids,
                                               client_mask)
    return self._finish(state, client_ids, client_mask, cohort, outs, new_cs, metrics)

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


def make_round(algorithm: Algorithm, *, clients_per_round: int | None = None,
               sampling: sampling_lib.Sampling | None = None, mapping: mapping_lib.ClientMapping | None = None,
               guard: guard_lib.UpdateGuard | None = None, adversary: Adversary | None = None) -> Round:
  """Builds the round of ``algorithm``.

  Args:
    algorithm: the algorithm.
    clients_per_round: ``M``, clients sampled each round, uniformly without replacement (fixed, so the round
      compiles once). Or give ``sampling`` instead.
    sampling: how the round's slots fill: :func:`~fedjax_adapters.federated.sampling.fixed_sampling` (``M``
      clients) or :func:`~fedjax_adapters.federated.sampling.poisson_sampling` (each client with probability
      ``q``, at most ``max_clients``).
    mapping: how clients are mapped (:func:`~fedjax_adapters.federated.mapping.vmap_clients` by default;
      ``chunked_clients(k)``, ``sequential_clients()``, ``sharded_clients(mesh)``).
    guard: how client updates are screened (default :class:`~fedjax_adapters.federated.guard.UpdateGuard`:
      non-finite updates rejected, no norm bound). ``UpdateGuard(reject_nonfinite=False)`` lets them through.
    adversary: for robustness experiments, ``(global_params, outs, client_ids, client_mask, key) -> outs`` applied
      to the stacked client outputs before the screen (see ``fedjax_adapters.attacks``).

  Returns:
    A :class:`Round`: ``round_fn(state, data, client_ids=None, client_mask=None) -> (state, metrics)``.
  """
  sampling = sampling_lib.resolve(sampling, clients_per_round)
  mapping = mapping_lib.resolve(mapping)
  mapping.check_clients_per_round(sampling.slots)
  guard = (guard or guard_lib.UpdateGuard()).check()
  if adversary is not None and not callable(adversary):
    raise ValueError(f'adversary must be a callable (global_params, outs, client_ids, client_mask, key) -> outs; '
                     f'got {adversary!r}.')
  return Round(algorithm, sampling, mapping, guard, adversary)


def run_rounds(round_fn: Round, state: ServerState, data, num_rounds: int) -> tuple[ServerState, dict]:
  """``round_fn.run(state, data, num_rounds)``: many rounds, in one compiled loop where the mapping compiles."""
  return round_fn.run(state, data, num_rounds)

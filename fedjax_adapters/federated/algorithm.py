"""What an algorithm is to the shared round: :class:`Algorithm`, and the experiment state :class:`ServerState`."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_adapters.federated.aggregators import Aggregator

Array = jax.Array


class ServerState(NamedTuple):
  """The whole experiment state (one pytree; checkpoint it with ``fedjax_adapters.checkpoint``).

  Attributes:
    frozen: parameters no one trains (FedDPA's base model); broadcast to every client.
    global_params: parameters the server aggregates (a dict of parts).
    clients: every client's private state stacked on a leading axis ``[K, ...]`` (local adaptors, router logits).
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


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
  """An algorithm = how to initialize, train one client, aggregate, evaluate and predict; the round is shared.

  Functions of one client (the round maps them over clients with a :class:`ClientMapping`):

  * ``client_update(frozen, global_params, client_state, data: ClientData, key) -> (ClientOutput, client_state,
    metrics)``;
  * ``evaluate(frozen, global_params, client_state, data: ClientData) -> dict`` of metric sums;
  * ``predict(frozen, global_params, client_state, x [N, ...]) -> outputs [N, ...]`` with the client's
    personalized model.

  Attributes:
    init_params: ``(key, num_clients) -> (frozen, global_params, clients)``; :meth:`init` adds the server
      optimizer state from :attr:`aggregator`, so ``alg.replace(aggregator=...)`` re-initializes it.
    client_update, evaluate, predict: see above (``predict`` may be None).
    aggregator: :class:`Aggregator`.
    model: the adapted model's :class:`fedjax_adapters.nn.ModelDef` (None for models not built by this library).
    spec: the :class:`fedjax_adapters.nn.AdapterSpec` of its adaptors (None when it has none).
    name: a short name for logs.
    check_data: optional host-side check of a population's data (e.g. labels within the model's classes), run
      once per data object by the round and by evaluation; raises ValueError naming the client and value.
  """
  init_params: Callable[[Array, int], tuple[Any, Any, Any]]
  client_update: Callable
  aggregator: Aggregator
  evaluate: Callable
  predict: Callable | None = None
  model: Any = None
  spec: Any = None
  name: str = ''
  check_data: Callable | None = None

  def init(self, key: Array, num_clients: int) -> ServerState:
    """The initial :class:`ServerState` of ``num_clients`` clients from PRNG ``key``."""
    if int(num_clients) < 1:
      raise ValueError(f'num_clients must be >= 1; got {num_clients}.')
    frozen, global_params, clients = self.init_params(key, int(num_clients))
    return ServerState(frozen, global_params, clients, self.aggregator.init(global_params),
                       jnp.zeros((), jnp.int32), key)

  def replace(self, **changes) -> 'Algorithm':
    """A copy with some fields changed (e.g. ``aggregator=``); its compiled rounds are built afresh."""
    return dataclasses.replace(self, **changes)

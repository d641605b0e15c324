"""Per-client evaluation and prediction with each client's personalized model, mapped like the round."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from fedjax_adapters.federated import mapping as mapping_lib
from fedjax_adapters.federated.algorithm import Algorithm, ServerState
from fedjax_adapters.federated.client_update import ClientData, client_data
from fedjax_adapters.federated.round import DataCheck, check_state_matches

Array = jax.Array


@functools.lru_cache(maxsize=128)
def mapped_function(fn: Callable, mapping: mapping_lib.ClientMapping) -> Callable:
  """``fn(frozen, global_params, client_state, per_client)`` of one client over all clients (cached, compiled)."""
  def run(frozen, global_params, clients, per_client):
    return mapping.map(fn, (frozen, global_params), (clients, per_client))
  return mapping.jit(run) if mapping.compiled else run


@functools.lru_cache(maxsize=64)
def _data_check(algorithm: Algorithm) -> DataCheck:
  return DataCheck(algorithm)


def evaluate(algorithm: Algorithm, state: ServerState, data, *,
             mapping: mapping_lib.ClientMapping | None = None) -> dict[str, Array]:
  """Every client's metric sums on its own ``data`` (``[K]`` per metric), with its personalized model.

  Args:
    algorithm: the algorithm.
    state: the experiment state.
    data: :class:`ClientData` (or ``FederatedData`` / ``(x, y, counts)``) of all ``K`` clients.
    mapping: how clients are mapped (default: all at once); the compiled evaluation is cached per algorithm and
      mapping, so evaluating every few rounds does not recompile.
  """
  data = client_data(data)
  check_state_matches(state, data)
  _data_check(algorithm)(data)
  mapping = mapping_lib.resolve(mapping)
  state, data = mapping.place(state, data)
  return mapped_function(algorithm.evaluate, mapping)(state.frozen, state.global_params, state.clients, data)


def predict(algorithm: Algorithm, state: ServerState, data, *,
            mapping: mapping_lib.ClientMapping | None = None) -> Any:
  """Every client's outputs on its own inputs with its personalized model: ``[K, N, ...]``.

  The personalized model is whatever the algorithm serves that client: FLoRAL's router mixture of the shared
  adaptors, the Local Adaptor's private LoRA, FedDPA's dual adapters. Padding rows past a client's count are
  computed too (mask them with ``count``).

  Args:
    algorithm: an algorithm with a ``predict`` function.
    state: the experiment state.
    data: :class:`ClientData` / ``FederatedData`` (its ``x`` is used) or the inputs ``x`` ``[K, N, ...]``.
    mapping: how clients are mapped (default: all at once).
  """
  if algorithm.predict is None:
    raise ValueError(f'algorithm {algorithm.name or algorithm!r} has no predict function.')
  x = data.x if isinstance(data, (ClientData, tuple)) and hasattr(data, 'x') else data
  x = jax.tree.map(jax.numpy.asarray, x)
  if jax.tree.leaves(state.clients):
    k = int(jax.tree.leaves(x)[0].shape[0])
    check_state_matches(state, ClientData(x, x, jax.numpy.zeros((k,))))
  mapping = mapping_lib.resolve(mapping)
  state, x = mapping.place(state, x)
  return mapped_function(algorithm.predict, mapping)(state.frozen, state.global_params, state.clients, x)

"""Helpers shared by algorithms built on an NNX model factory."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_adapters.federated.round import ServerState
from fedjax_adapters.nn.adapt import AdapterSpec, ModelDef, adapt, split_model

ModelFn = Callable[[nnx.Rngs], nnx.Module]


def build(model_fn: ModelFn, key: jax.Array, spec: AdapterSpec | None = None) -> tuple[ModelDef, dict]:
  """Builds (and adapts) a model from ``key`` and splits it into a :class:`ModelDef` and pure-dict parts."""
  model = model_fn(nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 7)))
  if spec is not None:
    adapt(model, spec, key=jax.random.fold_in(key, 1))
  return split_model(model)


def call_kwargs(train_arg: str | None, train: bool) -> dict:
  return {train_arg: train} if train_arg else {}


def broadcast_clients(tree: Any, num_clients: int) -> Any:
  """The same per-client initial state for ``num_clients`` clients: ``[...] -> [K, ...]``."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)


def server_state(frozen, global_params, clients, aggregator, key) -> ServerState:
  return ServerState(frozen, global_params, clients, aggregator.init(global_params), jnp.zeros((), jnp.int32), key)


def stats_override(stats: dict, where: tuple[str, ...] = ('stats',)) -> dict:
  """Batch-norm statistics as a nested override of the global params (``{}`` if the model has none)."""
  if not stats:
    return {}
  out: Any = stats
  for k in reversed(where):
    out = {k: out}
  return out


def sgd_or_zero(lr: float) -> optax.GradientTransformation:
  """SGD (no momentum, as in FLoRAL's clients), or a frozen group when ``lr == 0``."""
  return optax.set_to_zero() if lr == 0 else optax.sgd(lr)


def labels_for(global_labels: dict, local_labels: Any) -> tuple:
  """Labels for ``optax.multi_transform`` over the client's ``(global_params, client_state)`` pair."""
  return (global_labels, local_labels)


def check_clusters(clusters, num_clients: int, num_adaptors: int):
  c = jnp.asarray(clusters)
  if c.shape != (num_clients,):
    raise ValueError(f'oracle clusters have shape {tuple(c.shape)} but there are {num_clients} clients.')
  if int(c.min()) < 0 or int(c.max()) >= num_adaptors:
    raise ValueError(f'oracle clusters must lie in [0, {num_adaptors}); got range [{int(c.min())}, {int(c.max())}].')
  return c

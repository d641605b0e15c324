"""Server aggregation: weighted means of the clients' global params, then an optax server optimizer.

``aggregate(global_params, client_outputs, weights, agg_state) -> (global_params, agg_state)`` where
``client_outputs`` is a :class:`ClientOutput` stacked on a leading client axis ``[M, ...]`` and ``weights: [M]``
(example counts, zero for padding clients). The server optimizer sees the pseudo-gradient ``prev - mean`` (FedOpt);
``optax.sgd(1.0)`` makes it plain FedAvg.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_adapters.federated.client_update import ClientOutput

Array = jax.Array


class Aggregator(NamedTuple):
  """``init(global_params) -> agg_state`` and ``aggregate(global_params, client_outputs, weights, agg_state)``."""
  init: Callable[[Any], Any]
  aggregate: Callable[[Any, ClientOutput, Array, Any], tuple[Any, Any]]


def weighted_mean(stacked: Any, weights: Array, fallback: Any) -> Any:
  """``sum_k w_k x_k / sum_k w_k`` over axis 0, leaf by leaf; ``fallback`` where the weights sum to 0."""
  total = jnp.sum(weights)
  p = weights / jnp.where(total > 0, total, 1.0)

  def one(x, old):
    m = jnp.tensordot(p.astype(x.dtype), x, axes=(0, 0))
    return jnp.where(total > 0, m, old).astype(old.dtype)

  return jax.tree.map(one, stacked, fallback)


def per_adaptor_weights(weights: Array, probs: Array) -> Array:
  """FLoRAL's ``p(k|c) = p(k) p(c|k) / sum_k' p(k') p(c|k')``: ``[M], [M, C] -> [M, C]`` (columns sum to 1 or 0)."""
  q = weights[:, None] * probs
  col = jnp.sum(q, axis=0, keepdims=True)
  return q / jnp.where(col > 0, col, 1.0)


def per_adaptor_mean(stacked: Any, p_kc: Array, fallback: Any) -> Any:
  """``x_c = sum_k p(k|c) x_{k,c}`` for leaves ``[M, C, ...]``; adaptor ``c`` keeps ``fallback`` if nobody used it."""
  has = jnp.sum(p_kc, axis=0) > 0  # [C]

  def one(x, old):
    m = jnp.einsum('kc,kc...->c...', p_kc.astype(x.dtype), x)
    keep = has.reshape(has.shape + (1,) * (m.ndim - 1))
    return jnp.where(keep, m, old).astype(old.dtype)

  return jax.tree.map(one, stacked, fallback)


def _server_step(opt: optax.GradientTransformation, prev: Any, target: Any, state: Any):
  pseudo_grad = jax.tree.map(lambda p, t: p - t, prev, target)
  updates, state = opt.update(pseudo_grad, state, prev)
  return optax.apply_updates(prev, updates), state


def fedavg(server_optimizer: optax.GradientTransformation | None = None) -> Aggregator:
  """Example-weighted FedAvg of every leaf, then ``server_optimizer`` (default ``optax.sgd(1.0)``)."""
  opt = server_optimizer or optax.sgd(1.0)

  def aggregate(global_params, client_outputs: ClientOutput, weights, agg_state):
    target = weighted_mean(client_outputs.params, weights, global_params)
    return _server_step(opt, global_params, target, agg_state)

  return Aggregator(opt.init, aggregate)


def router_weighted(mixture_keys: Sequence[str] = ('adapters',), *,
                    server_optimizer: optax.GradientTransformation | None = None,
                    probs_key: str = 'router_probs') -> Aggregator:
  """FLoRAL's aggregation: shared leaves by ``p(k)``, each adaptor ``c`` by ``p(k|c)``.

  Args:
    mixture_keys: top-level keys of the global params dict whose leaves carry a leading adaptor axis ``C``
      (FLoRAL: ``'adapters'``; Ensemble: ``'members'``). Factors (A, B, bias) are averaged separately, as in the
      public code.
    server_optimizer: applied to the pseudo-gradient of the whole global pytree (default ``optax.sgd(1.0)``).
    probs_key: key of ``client_outputs.aux`` holding ``p(c|k)``: ``[M, C]``.
  """
  opt = server_optimizer or optax.sgd(1.0)

  def aggregate(global_params, client_outputs: ClientOutput, weights, agg_state):
    probs = client_outputs.aux[probs_key]
    if probs.ndim != 2 or probs.shape[0] != weights.shape[0]:
      raise ValueError(f'router probabilities must be [clients, C] = [{weights.shape[0]}, C]; '
                       f'got {tuple(probs.shape)}.')
    p_kc = per_adaptor_weights(weights, probs)
    target = {}
    for k, v in global_params.items():
      if k in mixture_keys:
        target[k] = per_adaptor_mean(client_outputs.params[k], p_kc, v)
      else:
        target[k] = weighted_mean(client_outputs.params[k], weights, v)
    return _server_step(opt, global_params, target, agg_state)

  return Aggregator(opt.init, aggregate)

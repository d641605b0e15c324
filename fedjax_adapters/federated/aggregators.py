"""Server aggregation: weighted means of the clients' global params, then an optax server optimizer.

``aggregate(global_params, client_outputs, weights, agg_state, info) -> (global_params, agg_state)`` where
``client_outputs`` is a :class:`ClientOutput` stacked on a leading client axis ``[M, ...]``, ``weights: [M]``
(example counts; zero for padding and rejected clients) and ``info`` a :class:`RoundInfo` (the sampled ids, the
screen's update norms, a server PRNG key; what differential privacy and norm-aware robust aggregators need). An aggregator is built from public pieces: a
:data:`Reducer` that turns the clients' values into one (``weighted_mean``, :func:`coordinate_median`, or yours) and
:func:`server_step`, which feeds the pseudo-gradient ``prev - reduced`` to an optax server optimizer (FedOpt;
``optax.sgd(1.0)`` makes it plain FedAvg).

A robust reducer is a few lines of user code (``examples/median_aggregator.py`` writes a trimmed mean and plugs it in
with ``mean_aggregator(reducer=...)`` or ``alg.replace(aggregator=...)``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_adapters.federated.client_update import ClientOutput

Array = jax.Array


class RoundInfo(NamedTuple):
  """What the round knows about its clients when it aggregates (all traced; the round compiles once).

  Attributes:
    client_ids: ``[M]`` int32, the sampled clients' ids.
    client_mask: ``[M]`` bool, real slots (False: padding).
    keep: ``[M]`` bool, real and accepted by the update screen (the clients with weight > 0 unless they hold no
      examples).
    update_norms: ``[M]`` float32, ``||params - global_params||_2`` of each client's update as the screen measured
      it (before any norm clipping of the guard), so an aggregator that clips needs no second pass.
    round: ``[]`` int32, the round being aggregated.
    key: a PRNG key for the server's own randomness this round (e.g. DP noise): ``fold_in(fold_in(key, round),
      SERVER_KEY_TAG)`` of the experiment's key, the same on every host of a multi-process run.
  """
  client_ids: Array
  client_mask: Array
  keep: Array
  update_norms: Array
  round: Array
  key: Array


class Aggregator(NamedTuple):
  """``init(global_params) -> agg_state`` and ``aggregate(global_params, client_outputs, weights, agg_state, info)``.

  ``info`` is the round's :class:`RoundInfo`; an aggregator that does not need it accepts and ignores it (the
  built-in ones take ``info=None`` so they can also be called by hand).
  """
  init: Callable[[Any], Any]
  aggregate: Callable[[Any, ClientOutput, Array, Any, RoundInfo], tuple[Any, Any]]


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


def server_step(optimizer: optax.GradientTransformation, prev: Any, target: Any, opt_state: Any) -> tuple[Any, Any]:
  """One server optimizer step towards ``target``: the pseudo-gradient ``prev - target`` through ``optimizer``.

  ``optax.sgd(1.0)`` lands exactly on ``target`` (FedAvg); ``optax.adam(lr)`` is FedAdam (FedOpt).
  Returns ``(new_params, new_opt_state)``.
  """
  pseudo_grad = jax.tree.map(lambda p, t: p - t, prev, target)
  updates, opt_state = optimizer.update(pseudo_grad, opt_state, prev)
  return optax.apply_updates(prev, updates), opt_state


# Up to this many client rows, order statistics over the client axis come from pairwise comparisons (M^2 compares per
# coordinate) instead of a sort: XLA:CPU sorts a short axis slowly (~7x slower at 30 clients of the MNIST MLP).
PAIRWISE_MAX_ROWS = 64


def weight_before(x: Array, weights: Array) -> Array:
  """``[M, ...]``: per coordinate, the summed ``weights`` of the rows that come before each row in the stable
  ascending order of ``x`` over axis 0 (``x_j < x_i``, or ``x_j == x_i`` and ``j < i``). With unit weights it is
  each row's rank. A sort's order statistics without a sort (``M^2`` compares in a loop over rows)."""
  m = x.shape[0]
  index = jnp.arange(m).reshape((m,) + (1,) * (x.ndim - 1))
  weights = weights.astype(jnp.float32)

  def add_row(j, acc):
    xj = jax.lax.dynamic_index_in_dim(x, j, keepdims=False)
    return acc + jnp.where((xj < x) | ((xj == x) & (j < index)), weights[j], 0.0)

  return jax.lax.fori_loop(0, m, add_row, jnp.zeros(x.shape, jnp.float32))


def coordinate_median(stacked: Any, weights: Array, fallback: Any) -> Any:
  """Weighted coordinate-wise median over axis 0 (a :data:`Reducer`); clients with weight 0 are ignored.

  For every coordinate, the smallest value at which the clients' cumulative weight reaches half the total (from
  :func:`weight_before` for up to :data:`PAIRWISE_MAX_ROWS` rows, else from a sort; the same values).
  """
  total = jnp.sum(weights)

  def one(x, old):
    if x.shape[0] <= PAIRWISE_MAX_ROWS:
      w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
      reaches = (w > 0) & (weight_before(x, weights) + w >= 0.5 * total)
      med = jnp.min(jnp.where(reaches, x, jnp.inf), axis=0).astype(x.dtype)
    else:
      order = jnp.argsort(x, axis=0)
      w = jnp.take(weights, order).astype(jnp.float32)  # weights in sorted order, per coordinate
      idx = jnp.argmax(jnp.cumsum(w, axis=0) >= 0.5 * total, axis=0)
      med = jnp.take_along_axis(jnp.sort(x, axis=0), idx[None], axis=0)[0]
    return jnp.where(total > 0, med, old).astype(old.dtype)

  return jax.tree.map(one, stacked, fallback)


# reducer(stacked [M, ...] pytree, weights [M], fallback pytree) -> pytree: how client values become one value.
# Rows with weight 0 are finite but arbitrary (padding, rejected clients); a reducer must ignore them.
Reducer = Callable[[Any, Array, Any], Any]


def mean_aggregator(server_optimizer: optax.GradientTransformation | None = None, *,
                    reducer: Reducer = weighted_mean) -> Aggregator:
  """Weighted reduction of every leaf (default: the example-weighted mean, i.e. FedAvg), then ``server_optimizer``.

  Args:
    server_optimizer: on the pseudo-gradient (default ``optax.sgd(1.0)``: the server takes the reduced value).
    reducer: ``weighted_mean`` (FedAvg), :func:`coordinate_median`, or any :data:`Reducer`.
  """
  opt = server_optimizer or optax.sgd(1.0)

  def aggregate(global_params, client_outputs: ClientOutput, weights, agg_state, info: RoundInfo | None = None):
    del info  # unused
    target = reducer(client_outputs.params, weights, global_params)
    return server_step(opt, global_params, target, agg_state)

  return Aggregator(opt.init, aggregate)


def router_aggregator(mixture_keys: Sequence[str] = ('adapters',), *,
                      server_optimizer: optax.GradientTransformation | None = None, reducer: Reducer | None = None,
                      probs_key: str = 'router_probs') -> Aggregator:
  """FLoRAL's aggregation: shared leaves by ``p(k)``, each adaptor ``c`` by ``p(k|c)``.

  Args:
    mixture_keys: top-level keys of the global params dict whose leaves carry a leading adaptor axis ``C``
      (FLoRAL: ``'adapters'``; Ensemble: ``'members'``). Factors (A, B, bias) are reduced separately, as in the
      public code.
    server_optimizer: applied to the pseudo-gradient of the whole global pytree (default ``optax.sgd(1.0)``).
    reducer: None for the weighted means of the paper; any :data:`Reducer` (e.g. :func:`coordinate_median`) is
      applied to the shared leaves with weights ``p(k)`` and to each adaptor ``c`` with weights ``p(k|c)``.
    probs_key: key of ``client_outputs.aux`` holding ``p(c|k)``: ``[M, C]``.
  """
  opt = server_optimizer or optax.sgd(1.0)
  shared = reducer or weighted_mean

  def per_adaptor(x, p_kc, old):
    if reducer is None:
      return per_adaptor_mean(x, p_kc, old)
    return jax.vmap(reducer, in_axes=(1, 1, 0))(x, p_kc, old)

  def aggregate(global_params, client_outputs: ClientOutput, weights, agg_state, info: RoundInfo | None = None):
    del info  # unused
    probs = client_outputs.aux[probs_key]
    if probs.ndim != 2 or probs.shape[0] != weights.shape[0]:
      raise ValueError(f'router probabilities must be [clients, C] = [{weights.shape[0]}, C]; '
                       f'got {tuple(probs.shape)}.')
    p_kc = per_adaptor_weights(weights, probs)
    target = {k: (per_adaptor(client_outputs.params[k], p_kc, v) if k in mixture_keys
                  else shared(client_outputs.params[k], weights, v)) for k, v in global_params.items()}
    return server_step(opt, global_params, target, agg_state)

  return Aggregator(opt.init, aggregate)

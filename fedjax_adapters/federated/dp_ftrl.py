"""DP-FTRL: user-level DP without sampling, by tree aggregation (Kairouz et al. 2021, "Practical and Private (Deep)
Learning without Sampling or Shuffling"; what Gboard trains with).

:func:`dp_ftrl_aggregator` (or :func:`~fedjax_adapters.federated.privacy.dp_aggregator` with
``DPConfig(mechanism='tree', tree_steps=P)``) clips and sums the clients' updates exactly as DP-FedAvg does
(``x_t = sum_k clip(u_k)``, uniform weights, the fixed denominator ``n``), but releases the *prefix sums*
``S_s = x_1 + ... + x_s`` of the current tree through the binary-tree mechanism:

* the tree over rounds ``1..P`` has a node ``(l, j)`` for every dyadic interval ``[(j-1) 2^l + 1, j 2^l]``, levels
  ``l < L = bit_length(P) = ceil(log2(P + 1))``; each node carries an independent ``N(0, (z C)^2 I)``;
* the noisy prefix sum is ``S_s + sum_{l: bit l of s is 1} noise(l, s >> l)`` (the binary decomposition of ``[1, s]``,
  at most ``L`` nodes), so every node, and therefore every client, is in at most ``L`` released sums' noise paths and
  one client's contribution changes at most ``L`` nodes, each by at most ``C``;
* the model follows FTRL: ``theta_s = theta_0 + (S_s + noise_s) / n``. The round hands the wrapped aggregator the
  noisy *increment* ``target = global + (x_s + noise_s - noise_{s-1}) / n`` as one client of weight 1. With FedAvg's
  ``optax.sgd(1.0)`` the models are exactly ``theta_0 + noisy prefix sum / n`` (up to float32 rounding of the running
  sum); ``optax.sgd(lr)`` is FTRL with server learning rate ``lr`` (``theta_0 + lr * noisy prefix / n``);
  ``optax.sgd(lr, momentum=g)`` is DP-FTRLM (heavy-ball momentum on the noisy increments, the same iterates as the
  paper's momentum on the noisy prefix sums); anything else is post-processing of released values.

Restarts: the tree restarts every ``P = tree_steps`` rounds (round ``t`` is step ``s = t mod P + 1`` of tree
``t // P``), from the current model: the paper's restart, with which each tree is accounted for separately
(``dp_accounting.SingleEpochTreeAggregationDpEvent``). This is valid only if every client contributes to at most one
round of each tree: use :func:`~fedjax_adapters.federated.sampling.cyclic_sampling` with ``P = num_clients // M``.

Noise without state: node ``(l, j)`` of tree ``e`` is drawn from ``fold_in(fold_in(tree_key_e, l), j)``, so a round
draws its ``L`` nodes again instead of carrying them. The only state is the tree key (a PRNG key's data, taken from
the round's server key ``RoundInfo.key`` when a tree starts) and the index of its tree; the increment
``noise_s - noise_{s-1} = noise(l*, s >> l*) - sum_{l < l*} noise(l, (s-1) >> l)`` (``l*`` the lowest set bit of
``s``) takes one draw per level.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fedjax_adapters.federated.aggregators import Aggregator, RoundInfo
from fedjax_adapters.federated.client_update import ClientOutput
from fedjax_adapters.federated import privacy

Array = jax.Array
TREE_KEY_TAG = 0x7EE  # folded into the round's server key to seed a tree


def tree_depth(tree_steps: int) -> int:
  """``L = ceil(log2(P + 1))``: the levels of a tree over ``P`` steps (dp-accounting's ``max_depth``)."""
  return int(tree_steps).bit_length()


def node_noise(tree_key: Array, level: Array, index: Array, like: Any, std: Array) -> Any:
  """Node ``(level, index)``'s ``N(0, std^2)`` noise, shaped like ``like``; the same for the same key and node."""
  return privacy.gaussian_noise(jax.random.fold_in(jax.random.fold_in(tree_key, level), index), like, std)


def tree_noise(tree_key: Array, coefs: Array, indices: Array, like: Any, std: Array) -> Any:
  """``sum_l coefs[l] node_noise(l, indices[l])`` over the levels ``l < L`` (``coefs, indices: [L]``)."""
  total = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), like)
  for level in range(coefs.shape[0]):
    z = node_noise(tree_key, level, indices[level], like, std)
    total = jax.tree.map(lambda a, b, c=coefs[level]: a + c * b, total, z)
  return total


def prefix_nodes(step: Array, depth: int) -> tuple[Array, Array]:
  """``(coefs [L], indices [L])`` of the binary decomposition of ``[1, step]``: node ``(l, step >> l)`` with
  coefficient 1 where bit ``l`` of ``step`` is set, 0 elsewhere."""
  levels = jnp.arange(depth, dtype=jnp.int32)
  step = jnp.asarray(step, jnp.int32)
  return ((step >> levels) & 1).astype(jnp.float32), step >> levels


def increment_nodes(step: Array, depth: int) -> tuple[Array, Array]:
  """``(coefs [L], indices [L])`` of ``noise_step - noise_{step-1}`` (``step >= 1``): ``+1`` for the node
  ``(l*, step >> l*)`` that completes at ``step`` (``l*`` its lowest set bit), ``-1`` for the nodes
  ``(l, (step-1) >> l)``, ``l < l*``, that it replaces, 0 above."""
  levels = jnp.arange(depth, dtype=jnp.int32)
  step = jnp.asarray(step, jnp.int32)
  low = jnp.argmax((step >> levels) & 1)  # the lowest set bit l*
  coefs = jnp.where(levels == low, 1.0, jnp.where(levels < low, -1.0, 0.0))
  return coefs.astype(jnp.float32), jnp.where(levels == low, step >> levels, (step - 1) >> levels)


def prefix_noise(tree_key: Array, step: Array, like: Any, std: Array, depth: int) -> Any:
  """The noise of the released prefix sum ``S_step``: the sum of its binary decomposition's node noises."""
  return tree_noise(tree_key, *prefix_nodes(step, depth), like, std)


def noise_increment(tree_key: Array, step: Array, like: Any, std: Array, depth: int) -> Any:
  """``prefix_noise(step) - prefix_noise(step - 1)`` with one node draw per level (``step >= 1``)."""
  return tree_noise(tree_key, *increment_nodes(step, depth), like, std)


class TreeState(NamedTuple):
  """DP-FTRL's state: the wrapped aggregator's, the current tree's index ``[]`` int32 (-1 before the first) and its
  PRNG key data (``jax.random.key_data`` of the tree key, ``uint32``)."""
  inner: Any
  tree: Array
  tree_key: Array


def tree_key_for(state: TreeState, tree: Array, info: RoundInfo) -> tuple[Array, Array]:
  """``(key, key_data)`` of tree ``tree``: the stored one, or a fresh one from the round's server key when the
  tree is new (a fresh key mid-tree only happens if a run starts there: its first release then carries
  ``prefix_noise(step)`` in full)."""
  fresh = jax.random.key_data(jax.random.fold_in(info.key, TREE_KEY_TAG))
  data = jnp.where(tree == state.tree, state.tree_key, fresh)
  return jax.random.wrap_key_data(data), data


def dp_ftrl_aggregator(aggregator: Aggregator, cfg: privacy.DPConfig, *, mixture_keys: Sequence[str] = (),
                       probs_key: str = 'router_probs') -> Aggregator:
  """``aggregator`` fed DP-FTRL's noisy increments (see the module docstring).

  Args:
    aggregator: the algorithm's aggregator; it receives one client (``[1, ...]`` params, weight 1).
    cfg: a :class:`~fedjax_adapters.federated.privacy.DPConfig` with ``mechanism='tree'`` and ``tree_steps=P``
      (checked here); ``noise_multiplier`` is the per-node ``z`` (node std ``z * clip``); no adaptive clipping.
    mixture_keys, probs_key: as for :func:`~fedjax_adapters.federated.privacy.dp_aggregator`.
  """
  privacy.check_dp(cfg)
  if cfg.mechanism != 'tree':
    raise ValueError(f"dp_ftrl_aggregator needs DPConfig(mechanism='tree'); got mechanism={cfg.mechanism!r}.")
  steps, depth = int(cfg.tree_steps), tree_depth(cfg.tree_steps)
  std = cfg.noise_multiplier * cfg.clip

  def init(global_params):
    return TreeState(aggregator.init(global_params), jnp.asarray(-1, jnp.int32),
                     jax.random.key_data(jax.random.key(0)))

  def aggregate(global_params, client_outputs: ClientOutput, weights, agg_state: TreeState, info: RoundInfo):
    probs = client_outputs.aux[probs_key] if mixture_keys else None
    contrib = privacy.client_contributions(global_params, client_outputs.params, probs, mixture_keys)
    mask = weights > 0
    norms = privacy.flat_norms(contrib) if mixture_keys or info.update_norms is None else info.update_norms
    total = privacy.clipped_sum(contrib, norms, mask, jnp.float32(cfg.clip))
    tree, step = info.round // steps, info.round % steps + 1
    key, key_data = tree_key_for(agg_state, tree, info)
    if cfg.noise_multiplier > 0:
      (c_inc, i_inc), (c_new, i_new) = increment_nodes(step, depth), prefix_nodes(step, depth)
      same = tree == agg_state.tree
      noise = tree_noise(key, jnp.where(same, c_inc, c_new), jnp.where(same, i_inc, i_new), total, std)
      total = jax.tree.map(jnp.add, total, noise)
    target = jax.tree.map(lambda g, s: (g.astype(jnp.float32) + s / cfg.expected_clients).astype(g.dtype),
                          global_params, total)
    new, inner = aggregator.aggregate(global_params, *privacy.single_client(target, client_outputs, weights),
                                      agg_state.inner, info)
    return new, TreeState(inner, jnp.asarray(tree, jnp.int32), key_data)

  return Aggregator(init, aggregate)

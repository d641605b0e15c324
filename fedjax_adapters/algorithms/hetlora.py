"""HetLoRA (Cho et al., EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models").

The server holds one LoRA of the largest rank ``R``; client ``k`` trains its first ``r_k`` rank components (the
server's truncation). Aggregation zero-pads every client's factors to rank ``R`` and averages them with
sparsity weights ``p_k = ||Delta W_k||_F / sum_j ||Delta W_j||_F`` (``Delta W_k = scale A_k B_k`` over all layers),
``A = sum_k p_k pad(A_k)``, ``B = sum_k p_k pad(B_k)``; a rank component no participant holds keeps its value.

Rank self-pruning (the rule chosen here; the paper gives it in words): with ``prune_gamma`` set, the client's loss
adds ``prune_lambda * sum_layers ||A_tail B_tail||_F`` over its tail components ``floor(gamma r_k) <= j < r_k``;
if training left the tail's norm smaller than it started, the client's rank becomes ``max(1, floor(gamma r_k))``
from the next round. The ranks live in the global params (``'ranks': [K]``; the server truncates by them), each
client's state is its id.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_adapters.algorithms import lora_parts as lp
from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossFn, LossInputs, resolve_loss, supervised, task_loss
from fedjax_adapters.federated.aggregators import Aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.nn.adapt import AdapterSpec


def product_sq_norm(a: jax.Array, b: jax.Array) -> jax.Array:
  """``||a @ b||_F^2 = sum((a^T a) * (b b^T))`` for ``a: [..., d_in, r]``, ``b: [..., r, d_out]`` (r x r work)."""
  return jnp.sum(jnp.einsum('...ir,...is->...rs', a, a) * jnp.einsum('...ro,...so->...rs', b, b), axis=(-2, -1))


def masked_sq_norm(spec: AdapterSpec, adapters: dict, mask: jax.Array) -> jax.Array:
  """``sum_layers ||scale (A * mask) (B * mask)||_F^2`` of one client's LoRA (``mask: [R]``)."""
  out = 0.0
  for _, a, b in lp.factor_pairs(lp.mask_factors(adapters, mask)):
    out = out + lp.lora_scale(spec, a) ** 2 * jnp.sum(product_sq_norm(a, b))
  return out


def rank_masks(rank: jax.Array, max_rank: int, gamma: float | None) -> tuple[jax.Array, jax.Array]:
  """``(active [..., R], tail [..., R])`` float masks for ranks ``rank [...]`` (tail empty without pruning)."""
  j = jnp.arange(max_rank)
  active = j < rank[..., None]
  start = jnp.floor((gamma or 1.0) * rank)[..., None]
  return active.astype(jnp.float32), (active & (j >= start)).astype(jnp.float32)


def padded_aggregator(spec: AdapterSpec, big: int, prune_gamma: float | None) -> Aggregator:
  """HetLoRA's server: zero-padding aggregation of the clients' rank-masked factors weighted by their update
  norms (sparsity weighting), and rank self-pruning of clients whose tail norm shrank."""

  def aggregate(global_params, outs, weights, agg_state, info=None):
    ids = outs.aux['id'].astype(jnp.int32)
    rank = global_params['ranks'][ids]
    active, tail = rank_masks(rank, big, prune_gamma)
    norm = jnp.where(weights > 0, jnp.sqrt(outs.aux['norm']), 0.0)
    p = jnp.where(jnp.sum(norm) > 0, norm, (weights > 0).astype(norm.dtype))
    p = p / jnp.maximum(jnp.sum(p), 1e-30)
    covered = jnp.einsum('k,kr->r', p, active) > 0

    def pad_mean(path, x, old):
      name = str(path[-1].key)
      m = active[:, None, None, :] if name.endswith('_a') else active[:, None, :, None]
      c = covered[None, None, :] if name.endswith('_a') else covered[None, :, None]
      return jnp.where(c, jnp.einsum('k,k...->...', p, x * m), old).astype(old.dtype)

    adapters = jax.tree_util.tree_map_with_path(pad_mean, outs.params['adapters'], global_params['adapters'])
    before = jax.vmap(lambda t: masked_sq_norm(spec, global_params['adapters'], t))(tail)
    shrunk = (weights > 0) & (outs.aux['tail'] < before) & (prune_gamma is not None)
    pruned = jnp.maximum(1.0, jnp.floor((prune_gamma or 1.0) * rank))
    new_ranks = global_params['ranks'].at[ids].add(jnp.where(shrunk, pruned - rank, 0.0))
    return {'adapters': adapters, 'ranks': new_ranks}, agg_state

  return Aggregator(lambda g: (), aggregate)


def hetlora(model_fn: mb.ModelFn, *, loss: str | LossFn, batch_size: int, ranks: Sequence[int],
            lr: float | None = None, spec: AdapterSpec | None = None, prune_gamma: float | None = None,
            prune_lambda: float = 0.0, client_optimizer: optax.GradientTransformation | None = None,
            num_epochs: int = 1, shuffle: bool = False, eval_loss: str | None = None,
            train_arg: str | None = None) -> Algorithm:
  """HetLoRA on a frozen model: heterogeneous client ranks, sparsity-weighted zero-padding aggregation.

  Args:
    model_fn, loss, batch_size, num_epochs, shuffle, eval_loss, train_arg: as :func:`lora_fedavg`.
    ranks: every client's initial rank (length = number of clients); the server LoRA has rank ``max(ranks)``.
    lr: client SGD learning rate; or ``client_optimizer`` (applied to the adapters only).
    spec: one dense LoRA per layer (default :class:`AdapterSpec` with ``conv=False``); its rank is replaced.
    prune_gamma: rank self-pruning factor in (0, 1) (None: no pruning); prune_lambda: the tail penalty.
  """
  r0 = np.asarray(ranks, np.int64).reshape(-1)
  big = int(lp.rank_mask(r0).shape[1])
  if prune_gamma is not None and not 0 < prune_gamma < 1:
    raise ValueError(f'prune_gamma must lie in (0, 1); got {prune_gamma}.')
  spec = AdapterSpec(conv=False) if spec is None else spec
  spec = dataclasses.replace(spec, rank=big)
  mb.check_one_lora(spec, 'hetlora', bias=False)
  mdef, parts0 = mb.build(model_fn, jax.random.key(0), spec)
  lp.dense_factors_only(parts0['adapters'], 'hetlora')
  takes_rngs = mb.takes_call_rngs(mdef)
  optimizer = lp.adapters_only(mb.client_optimizer_or(client_optimizer, lr, lambda: optax.sgd(lr)))
  custom, kind = resolve_loss(loss, eval_loss)

  def init_params(key, num_clients):
    if r0.shape[0] != num_clients:
      raise ValueError(f'{r0.shape[0]} client ranks given for {num_clients} clients.')
    _, parts = mb.build(model_fn, key, spec)
    g = {'adapters': parts['adapters'], 'ranks': jnp.asarray(r0, jnp.float32)}
    return {'base': parts['base'], 'stats': parts['stats']}, g, {'id': jnp.arange(num_clients, dtype=jnp.float32)}

  def masks(g, c):
    return rank_masks(g['ranks'][c['id'].astype(jnp.int32)], big, prune_gamma)

  def forward(trainable, frozen, x, key, train):
    g, c = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    adapters = lp.mask_factors(g['adapters'], masks(g, c)[0])
    return mdef.apply({**frozen, 'adapters': adapters}, x, **mb.call_kwargs(train_arg, train, rngs))[0], {}

  def penalized(inputs: LossInputs):
    value = custom(inputs) if custom else task_loss(kind, inputs)
    value = value[0] if isinstance(value, tuple) else value
    if prune_gamma is None or not prune_lambda:
      return value
    g, c = inputs.params
    return value + prune_lambda * jnp.sqrt(masked_sq_norm(spec, g['adapters'], masks(g, c)[1]) + 1e-12)

  def output_aux(g, c):
    return {'id': c['id'], 'tail': masked_sq_norm(spec, g['adapters'], masks(g, c)[1]),
            'norm': masked_sq_norm(spec, g['adapters'], masks(g, c)[0])}

  return supervised(name='hetlora', init_params=init_params, forward=forward, loss=penalized, optimizer=optimizer,
                    batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=padded_aggregator(spec, big, prune_gamma), output_aux=output_aux, eval_loss=kind,
                    model=mdef, spec=spec)

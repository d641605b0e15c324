"""FLoRA (Wang et al., NeurIPS 2024, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations").

Averaging ``A`` and ``B`` separately does not average the updates: ``mean(B) mean(A) != mean(B A)``. FLoRA stacks
the clients' factors along the rank axis instead, ``A_s = [p_1 A_1 | ... | p_K A_K]`` (``d_in x sum r_k``) and
``B_s = [B_1; ...; B_K]`` (``sum r_k x d_out``), so ``A_s B_s = sum_k p_k A_k B_k`` exactly, whatever the clients'
ranks. The server merges ``scale * A_s B_s`` into the base kernels and every client starts the next round from a
freshly initialized LoRA (``B = 0``). Heterogeneous ranks are padded to the largest (``lora_parts.rank_mask``); a
client of rank ``r_k`` keeps its own scaling ``alpha / r_k``.
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
from fedjax_adapters.algorithms.common import LossFn, supervised
from fedjax_adapters.federated.aggregators import Aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.nn.adapt import AdapterSpec


def stacked_product(a: jax.Array, b: jax.Array, p: jax.Array) -> jax.Array:
  """``[p_1 a_1 | ... | p_M a_M] @ [b_1; ...; b_M] = sum_k p_k a_k b_k``: ``[M, d_in, r], [M, r, d_out], [M]``."""
  m, d_in, r = a.shape
  a_s = jnp.transpose(a * p[:, None, None].astype(a.dtype), (1, 0, 2)).reshape(d_in, m * r)
  return a_s @ b.reshape(m * r, b.shape[-1])


def client_ranks(spec: AdapterSpec, ranks: Sequence[int] | None, who: str) -> tuple[AdapterSpec, np.ndarray | None]:
  """The spec padded to ``max(ranks)`` and the ranks as an array (None: every client at ``spec.rank``)."""
  if ranks is None:
    return spec, None
  r = np.asarray(ranks, np.int64).reshape(-1)
  lp.rank_mask(r)  # checks every rank >= 1
  if not isinstance(spec.rank, int):
    raise ValueError(f'{who} with heterogeneous ranks needs an integer spec.rank; got {spec.rank!r}.')
  return dataclasses.replace(spec, rank=int(r.max())), r


def rank_state(ranks: np.ndarray | None, spec: AdapterSpec, adapters: dict, num_clients: int) -> dict:
  """Client state ``{'rank_mask': [K, R], 'b_scale': [K]}`` (``R / r_k``: the client's own ``alpha / r_k``)."""
  if ranks is None:  # every layer at its own rank from spec (R: the largest)
    big = max(a.shape[-1] for _, a, _ in lp.factor_pairs(adapters))
    return {'rank_mask': jnp.ones((num_clients, big)), 'b_scale': jnp.ones((num_clients,))}
  if ranks.shape[0] != num_clients:
    raise ValueError(f'{ranks.shape[0]} client ranks given for {num_clients} clients.')
  b_scale = ranks.max() / ranks if spec.alpha is not None else np.ones(ranks.shape)
  return {'rank_mask': jnp.asarray(lp.rank_mask(ranks)), 'b_scale': jnp.asarray(b_scale, jnp.float32)}


def flora(model_fn: mb.ModelFn, *, loss: str | LossFn, batch_size: int, lr: float | None = None,
          spec: AdapterSpec | None = None, ranks: Sequence[int] | None = None,
          client_optimizer: optax.GradientTransformation | None = None, num_epochs: int = 1, shuffle: bool = False,
          eval_loss: str | None = None, train_arg: str | None = None) -> Algorithm:
  """FLoRA: clients train a fresh LoRA on the current base; the server merges the stacked product into the base.

  Args:
    model_fn: ``rngs -> nnx.Module`` whose targeted layers are plain linear layers (kernel ``[d_in, d_out]``).
    loss, batch_size, num_epochs, shuffle, eval_loss, train_arg: as :func:`lora_fedavg`.
    lr: client SGD learning rate on the LoRA; or ``client_optimizer`` (applied to the adapters only).
    spec: one LoRA per layer, no bias adaptors (default :class:`AdapterSpec` with ``conv=False``).
    ranks: every client's rank (length = number of clients); None: all at ``spec.rank``.

  Returns:
    An :class:`Algorithm` with global params ``{'base', 'stats', 'adapters'}`` and client state
    ``{'rank_mask': [R], 'b_scale': []}``.
  """
  spec, ranks = client_ranks(spec or AdapterSpec(conv=False), ranks, 'flora')
  mb.check_one_lora(spec, 'flora', bias=False)
  mdef, parts0 = mb.build(model_fn, jax.random.key(0), spec)
  lp.dense_factors_only(parts0['adapters'], 'flora')
  paths = lp.base_kernel_paths(parts0, 'flora')
  takes_rngs = mb.takes_call_rngs(mdef)
  optimizer = lp.adapters_only(mb.client_optimizer_or(client_optimizer, lr, lambda: optax.sgd(lr)))

  def init_params(key, num_clients):
    _, parts = mb.build(model_fn, key, spec)
    g = {'base': parts['base'], 'stats': parts['stats'], 'adapters': parts['adapters']}
    return {}, g, rank_state(ranks, spec, parts['adapters'], num_clients)

  def forward(trainable, frozen, x, key, train):
    del frozen
    g, c = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    adapters = lp.mask_factors(g['adapters'], c['rank_mask'], c['b_scale'])
    out, _ = mdef.apply({**g, 'adapters': adapters}, x, **mb.call_kwargs(train_arg, train, rngs))
    return out, {}

  def aggregate(global_params, outs, weights, agg_state, info=None):
    total = jnp.sum(weights)
    p = weights / jnp.where(total > 0, total, 1.0)
    masks, b_scale = outs.aux['rank_mask'], outs.aux['b_scale']
    base = global_params['base']
    for path in paths:
      node = lp.get_path(outs.params['adapters'], path)
      r = node['global_a'].shape[-1]
      a = node['global_a'][:, 0] * masks[:, None, :r]  # [M, d_in, R]
      b = node['global_b'][:, 0] * (masks[:, :r] * b_scale[:, None])[:, :, None]  # [M, R, d_out]
      kernel = lp.get_path(base, path)['base']['kernel']
      merged = kernel + lp.lora_scale(spec, a) * stacked_product(a, b, p).astype(kernel.dtype)
      base = lp.set_path(base, path + ('base', 'kernel'), jnp.where(total > 0, merged, kernel))
    key = info.key if info is not None else jax.random.key(0)
    fresh = mb.build(model_fn, key, spec)[1]['adapters']
    return {**global_params, 'base': base, 'adapters': fresh}, agg_state

  return supervised(name='flora', init_params=init_params, forward=forward, loss=loss, optimizer=optimizer,
                    batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=Aggregator(lambda g: (), aggregate), output_aux=lambda g, c: dict(c),
                    eval_loss=eval_loss, model=mdef, spec=spec)

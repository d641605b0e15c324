"""FedALT (AAAI 2026, "FedALT: Federated Fine-Tuning through Adaptive Local Training with Rest-of-World LoRA").

Each client ``k`` trains only its own LoRA ``L_k`` and a gate, beside a frozen rest-of-world LoRA ``RoW_k`` built
from the other clients' LoRAs; no LoRA is averaged into the client's own. A layer computes

  y = W x + g(x) * L_k(x) + (1 - g(x)) * RoW_k(x),   RoW_k = (sum_j L_j - L_k) / (K - 1),

with ``L_j`` the latest LoRA client ``j`` sent (the initial LoRA until it first trains). There is no public code;
the details chosen here: ``RoW_k`` averages the factors ``A`` and ``B`` separately, uniformly over the ``K - 1``
other clients; the gate is one input-wise gate per model, ``g(x) = sigmoid(w . flatten(x) + b)`` (``w = 0``,
``b = 0`` at init: an even mix), applied to every adapted layer as per-example weights; the server keeps the
table of every client's latest LoRA (global params ``{'table': [K, ...]}``, memory ``K`` LoRAs) and replaces the
rows of the clients that trained. The gate is not a LoRA: a PEFT export covers ``L_k`` or ``RoW_k``, not the mix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_adapters.algorithms import lora_parts as lp
from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossFn, supervised
from fedjax_adapters.federated.aggregators import Aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.nn.adapt import AdapterSpec


def rest_of_world(table, client_id: jax.Array):
  """``(sum_j L_j - L_k) / (K - 1)`` leaf by leaf over a table ``[K, ...]``: the mean of every other client's."""
  def one(t):
    return (jnp.sum(t, axis=0) - t[client_id]) / (t.shape[0] - 1)
  return jax.tree.map(one, table)


def as_global(local: dict) -> dict:
  """A local LoRA's leaves (``local_a``...) renamed to the global slot's (``global_a``...)."""
  return {(k.replace('local_', 'global_', 1) if isinstance(k, str) else k): (as_global(v) if isinstance(v, dict) else v)
          for k, v in local.items()}


def gate(params: dict, x) -> jax.Array:
  """``sigmoid(flatten(x) @ w + b)``: ``[B]`` weight of the client's own LoRA per example (``x``: an array or a
  pytree of arrays ``[B, ...]``, its leaves flattened and concatenated)."""
  flat = jnp.concatenate([l.reshape(l.shape[0], -1).astype(params['w'].dtype) for l in jax.tree.leaves(x)], -1)
  return jax.nn.sigmoid(flat @ params['w'] + params['b'])


def fedalt(model_fn: mb.ModelFn, *, loss: str | LossFn, batch_size: int, input_dim: int, lr: float | None = None,
           spec: AdapterSpec | None = None, client_optimizer: optax.GradientTransformation | None = None,
           num_epochs: int = 1, shuffle: bool = False, eval_loss: str | None = None,
           train_arg: str | None = None) -> Algorithm:
  """FedALT on a frozen model: own LoRA + frozen rest-of-world LoRA, mixed by a learned input-wise gate.

  Args:
    model_fn, loss, batch_size, num_epochs, shuffle, eval_loss, train_arg: as :func:`lora_fedavg`.
    input_dim: the flattened size of one input (the gate's width), e.g. 784 for 28 x 28 images (a pytree input:
      the sum over its leaves).
    lr: client SGD learning rate; or ``client_optimizer`` (on the own LoRA and the gate).
    spec: the LoRA of every layer (default :class:`AdapterSpec`); one local slot (own) and one global (RoW).
  """
  spec = AdapterSpec(num_global=1, num_local=1) if spec is None else spec
  if spec.num_global != 1 or spec.num_local != 1 or spec.router:
    raise ValueError(f'fedalt needs one global (rest-of-world) and one local (own) LoRA per layer; got '
                     f'num_global={spec.num_global}, num_local={spec.num_local}, router={spec.router}.')
  if int(input_dim) < 1:
    raise ValueError(f'fedalt needs input_dim >= 1 (the flattened input size); got {input_dim}.')
  mdef, _ = mb.build(model_fn, jax.random.key(0), spec)
  takes_rngs = mb.takes_call_rngs(mdef)
  optimizer = lp.adapters_only(mb.client_optimizer_or(client_optimizer, lr, lambda: optax.sgd(lr)),
                               client_keys=('own', 'gate'))

  def init_params(key, num_clients):
    if num_clients < 2:
      raise ValueError(f'fedalt needs at least 2 clients (a rest of the world); got {num_clients}.')
    _, parts = mb.build(model_fn, key, spec)
    own = mb.broadcast_clients(parts['local'], num_clients)
    clients = {'own': own, 'id': jnp.arange(num_clients, dtype=jnp.float32),
               'gate': {'w': jnp.zeros((num_clients, int(input_dim))), 'b': jnp.zeros((num_clients,))}}
    return {'base': parts['base'], 'stats': parts['stats']}, {'table': own}, clients

  def forward(trainable, frozen, x, key, train):
    g, c = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    row = jax.lax.stop_gradient(rest_of_world(g['table'], c['id'].astype(jnp.int32)))
    mine = gate(c['gate'], x)
    parts = {**frozen, 'adapters': as_global(row), 'local': c['own']}
    out, _ = mdef.apply(parts, x, global_weight=1.0 - mine, local_weight=mine,
                        **mb.call_kwargs(train_arg, train, rngs))
    return out, {}

  def aggregate(global_params, outs, weights, agg_state, info=None):
    ids = outs.aux['id'].astype(jnp.int32)
    sent = (weights > 0).astype(jnp.float32)

    def replace(t, new):  # the rows of clients that trained take their new LoRA (padding slots add 0)
      s = sent.reshape((-1,) + (1,) * (new.ndim - 1)).astype(t.dtype)
      return t.at[ids].add(s * (new - t[ids]))
    return {'table': jax.tree.map(replace, global_params['table'], outs.aux['own'])}, agg_state

  return supervised(name='fedalt', init_params=init_params, forward=forward, loss=loss, optimizer=optimizer,
                    batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=Aggregator(lambda g: (), aggregate),
                    output_aux=lambda g, c: {'own': c['own'], 'id': c['id']}, eval_loss=eval_loss, model=mdef,
                    spec=spec)

"""FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in Federated Learning").

The paper observes that the LoRA ``A`` matrices learn what all clients share and the ``B`` matrices what is
client-specific, so only ``A`` is sent to the server and averaged; every client keeps its own ``B``. Here the global
params are ``{'adapters': <every layer's a (and nothing else)>}`` and each client's state is
``{'adapters': <its b (and bias adaptors, if any)>}``: ``B`` is never part of a :class:`ClientOutput`.
"""
from __future__ import annotations

import jax
import optax

from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossFn, supervised
from fedjax_adapters.algorithms.lora_parts import is_a, merge_dicts, select_leaves
from fedjax_adapters.federated.aggregators import mean_aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.nn.adapt import AdapterSpec


def fedsa_lora(model_fn: mb.ModelFn, *, loss: str | LossFn, batch_size: int, lr: float | None = None,
               spec: AdapterSpec | None = None, client_optimizer: optax.GradientTransformation | None = None,
               num_epochs: int = 1, shuffle: bool = False,
               server_optimizer: optax.GradientTransformation | None = None, eval_loss: str | None = None,
               train_arg: str | None = None) -> Algorithm:
  """LoRA on a frozen model; ``A`` federated (FedAvg), ``B`` private to each client.

  Args:
    model_fn: ``rngs -> nnx.Module``.
    loss: ``'mse'``, ``'xent'`` or a loss callable.
    batch_size, num_epochs, shuffle: local training.
    lr: client SGD learning rate; or ``client_optimizer`` over ``(global_params, client_state)``.
    spec: one global LoRA per layer (default :class:`AdapterSpec`: rank 8, alpha 16).
    server_optimizer: on the pseudo-gradient of ``A`` (default SGD lr 1 = plain averaging).
    eval_loss: the metrics reported when ``loss`` is a callable.
    train_arg: name of the model's train-mode keyword, if any.

  Returns:
    An :class:`Algorithm`; ``state.global_params['adapters']`` holds only ``a`` leaves, ``state.clients['adapters']``
    every client's ``b`` leaves ``[K, ...]``.
  """
  spec = spec or AdapterSpec()
  mb.check_one_lora(spec, 'fedsa_lora')
  mdef, _ = mb.build(model_fn, jax.random.key(0), spec)
  takes_rngs = mb.takes_call_rngs(mdef)
  optimizer = mb.client_optimizer_or(client_optimizer, lr, lambda: optax.sgd(lr))

  def init_params(key, num_clients):
    _, parts = mb.build(model_fn, key, spec)
    shared = select_leaves(parts['adapters'], is_a)
    private = select_leaves(parts['adapters'], lambda k: not is_a(k))
    frozen = {'base': parts['base'], 'stats': parts['stats']}
    return frozen, {'adapters': shared}, {'adapters': mb.broadcast_clients(private, num_clients)}

  def forward(trainable, frozen, x, key, train):
    g, c = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    dropout_key = jax.random.fold_in(key, 0xD0) if train and spec.dropout > 0 else None
    parts = {**frozen, 'adapters': merge_dicts(g['adapters'], c['adapters'])}
    out, _ = mdef.apply(parts, x, dropout_key=dropout_key, **mb.call_kwargs(train_arg, train, rngs))
    return out, {}

  return supervised(name='fedsa_lora', init_params=init_params, forward=forward, loss=loss, optimizer=optimizer,
                    batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=mean_aggregator(server_optimizer), eval_loss=eval_loss, model=mdef, spec=spec)

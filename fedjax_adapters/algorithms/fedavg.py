"""FedAvg (McMahan et al. 2017): one global model, example-weighted averaging, optax server optimizer."""
from __future__ import annotations

import jax
import optax

from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import supervised
from fedjax_adapters.federated.aggregators import fedavg as fedavg_aggregator
from fedjax_adapters.federated.round import Algorithm


def fedavg(model_fn: mb.ModelFn, *, loss: str, lr: float, batch_size: int, num_epochs: int = 1,
           shuffle: bool = False, server_optimizer: optax.GradientTransformation | None = None,
           train_arg: str | None = None) -> Algorithm:
  """FedAvg of a whole model.

  Args:
    model_fn: ``rngs -> nnx.Module``.
    loss: ``'mse'`` or ``'xent'``.
    lr: client SGD learning rate.
    batch_size, num_epochs, shuffle: local training.
    server_optimizer: on the pseudo-gradient (default SGD lr 1 = plain averaging).
    train_arg: name of the model's train-mode keyword (e.g. ``'train'``), if any.
  """
  mdef, _ = mb.build(model_fn, jax.random.key(0))
  takes_rngs = mb.takes_call_rngs(mdef)
  aggregator = fedavg_aggregator(server_optimizer)

  def init(key, num_clients):
    _, parts = mb.build(model_fn, key)
    return mb.server_state({}, {'base': parts['base'], 'stats': parts['stats']}, {}, aggregator, key)

  def forward(trainable, frozen, x, key, train):
    del frozen
    g, _ = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    out, stats = mdef.apply(g, x, **mb.call_kwargs(train_arg, train, rngs))
    return out, mb.stats_override(stats)

  return supervised(init=init, forward=forward, loss=loss, optimizer=optax.sgd(lr), batch_size=batch_size,
                    num_epochs=num_epochs, shuffle=shuffle, aggregator=aggregator)

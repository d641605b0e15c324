"""FedAvg (McMahan et al. 2017): one global model, example-weighted averaging, optax server optimizer."""
from __future__ import annotations

import jax
import optax

from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossFn, supervised
from fedjax_adapters.federated.aggregators import mean_aggregator, weighted_mean
from fedjax_adapters.federated.algorithm import Algorithm


def fedavg(model_fn: mb.ModelFn, *, loss: str | LossFn, batch_size: int, lr: float | None = None,
           client_optimizer: optax.GradientTransformation | None = None, num_epochs: int = 1, shuffle: bool = False,
           server_optimizer: optax.GradientTransformation | None = None, eval_loss: str | None = None,
           train_arg: str | None = None, reducer=None) -> Algorithm:
  """FedAvg of a whole model.

  Args:
    model_fn: ``rngs -> nnx.Module``.
    loss: ``'mse'``, ``'xent'`` or a loss callable (:class:`~fedjax_adapters.algorithms.LossInputs`).
    batch_size, num_epochs, shuffle: local training.
    lr: client SGD learning rate; or pass ``client_optimizer`` (any optax transformation of the params).
    server_optimizer: on the pseudo-gradient (default SGD lr 1 = plain averaging).
    reducer: how the clients' params become one (default the weighted mean; e.g. ``federated.robust.krum(2)``).
    eval_loss: ``'mse'`` or ``'xent'``, the metrics reported when ``loss`` is a callable.
    train_arg: name of the model's train-mode keyword (e.g. ``'train'``), if any.
  """
  mdef, _ = mb.build(model_fn, jax.random.key(0))
  takes_rngs = mb.takes_call_rngs(mdef)
  optimizer = mb.client_optimizer_or(client_optimizer, lr, lambda: optax.sgd(lr))

  def init_params(key, num_clients):
    del num_clients  # clients hold no state
    _, parts = mb.build(model_fn, key)
    return {}, {'base': parts['base'], 'stats': parts['stats']}, {}

  def forward(trainable, frozen, x, key, train):
    del frozen
    g, _ = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    out, stats = mdef.apply(g, x, **mb.call_kwargs(train_arg, train, rngs))
    return out, mb.stats_override(stats)

  return supervised(name='fedavg', init_params=init_params, forward=forward, loss=loss, optimizer=optimizer,
                    batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=mean_aggregator(server_optimizer, reducer=reducer or weighted_mean), eval_loss=eval_loss, model=mdef)

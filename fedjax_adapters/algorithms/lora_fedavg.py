"""LoRA-FedAvg (FedIT, Zhang et al. 2024 "Towards building the federated GPT"): a frozen base model, a LoRA on it
that the clients train and the server averages. For any NNX model; FedDPA's FedIT baseline is the LLM case."""
from __future__ import annotations

import jax
import optax

from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossFn, supervised
from fedjax_adapters.federated.aggregators import Aggregator, mean_aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.nn.adapt import AdapterSpec


def uniform_weights(aggregator: Aggregator) -> Aggregator:
  """``aggregator`` with every participating client weighted equally (FedIT's public code), not by example count."""
  def aggregate(global_params, client_outputs, weights, agg_state, info=None):
    return aggregator.aggregate(global_params, client_outputs, (weights > 0).astype(weights.dtype), agg_state, info)
  return Aggregator(aggregator.init, aggregate)


def lora_fedavg(model_fn: mb.ModelFn, *, loss: str | LossFn, batch_size: int, lr: float | None = None,
                spec: AdapterSpec | None = None, client_optimizer: optax.GradientTransformation | None = None,
                num_epochs: int = 1, shuffle: bool = False, uniform_aggregation: bool = False,
                server_optimizer: optax.GradientTransformation | None = None, eval_loss: str | None = None,
                train_arg: str | None = None) -> Algorithm:
  """Federated LoRA on a frozen model.

  The base model (``frozen``: its ``base`` params and batch statistics) is broadcast to every client and never
  changes; the global params are ``{'adapters': ...}``, the LoRA factors of every layer ``spec`` targets; clients
  hold no state.

  Args:
    model_fn: ``rngs -> nnx.Module`` (e.g. a pretrained model: return it, ignoring ``rngs``).
    loss: ``'mse'``, ``'xent'`` or a loss callable (:class:`~fedjax_adapters.algorithms.LossInputs`).
    batch_size, num_epochs, shuffle: local training.
    lr: client SGD learning rate; or ``client_optimizer`` (e.g. ``optax.adamw(3e-4)`` as FedIT).
    spec: which layers get a LoRA and how (default :class:`AdapterSpec`: rank 8, alpha 16 on every linear/conv);
      one global adaptor per layer, no local one.
    uniform_aggregation: weight clients equally (FedIT's public code) instead of by example count.
    server_optimizer: on the pseudo-gradient (default SGD lr 1 = plain averaging).
    eval_loss: the metrics reported when ``loss`` is a callable.
    train_arg: name of the model's train-mode keyword, if any.
  """
  spec = spec or AdapterSpec()
  mb.check_one_lora(spec, 'lora_fedavg')
  mdef, _ = mb.build(model_fn, jax.random.key(0), spec)
  takes_rngs = mb.takes_call_rngs(mdef)
  optimizer = mb.client_optimizer_or(client_optimizer, lr, lambda: optax.sgd(lr))
  aggregator = mean_aggregator(server_optimizer)

  def init_params(key, num_clients):
    del num_clients  # clients hold no state
    _, parts = mb.build(model_fn, key, spec)
    return {'base': parts['base'], 'stats': parts['stats']}, {'adapters': parts['adapters']}, {}

  def forward(trainable, frozen, x, key, train):
    g, _ = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    dropout_key = jax.random.fold_in(key, 0xD0) if train and spec.dropout > 0 else None
    out, _ = mdef.apply({**frozen, **g}, x, dropout_key=dropout_key, **mb.call_kwargs(train_arg, train, rngs))
    return out, {}  # the base, batch statistics included, stays frozen

  return supervised(name='lora_fedavg', init_params=init_params, forward=forward, loss=loss, optimizer=optimizer,
                    batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=uniform_weights(aggregator) if uniform_aggregation else aggregator,
                    eval_loss=eval_loss, model=mdef, spec=spec)

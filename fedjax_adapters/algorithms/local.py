"""Local Adaptor (FLoRAL's baseline ``floral_locallora``): a federated base plus one private LoRA per client."""
from __future__ import annotations

import jax
import optax

from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import supervised
from fedjax_adapters.federated.aggregators import fedavg as fedavg_aggregator
from fedjax_adapters.federated.round import Algorithm
from fedjax_adapters.nn.adapt import AdapterSpec
from fedjax_adapters.optim import label_tree, lora_preconditioner


def local_adaptor(model_fn: mb.ModelFn, *, loss: str, lr: float, batch_size: int, rank=0.01,
                  lora_lr: float | None = None, num_epochs: int = 1, shuffle: bool = False,
                  precondition: bool = True, target: str = '.*', conv: bool = True, bias: bool = True,
                  norm: bool = False, embed: bool = False, bias_init: str = 'uniform',
                  server_optimizer: optax.GradientTransformation | None = None,
                  train_arg: str | None = None) -> Algorithm:
  """Base federated with FedAvg; each client keeps its own LoRA (C = 1) that never leaves it."""
  spec = AdapterSpec(target=target, rank=rank, num_global=0, num_local=1, conv=conv, bias=bias, norm=norm,
                     embed=embed, bias_init=bias_init)
  mdef, _ = mb.build(model_fn, jax.random.key(0), spec)
  takes_rngs = mb.takes_call_rngs(mdef)
  aggregator = fedavg_aggregator(server_optimizer)
  lora = optax.chain(lora_preconditioner(), optax.sgd(lora_lr or lr)) if precondition else optax.sgd(lora_lr or lr)

  def init(key, num_clients):
    _, parts = mb.build(model_fn, key, spec)
    g = {'base': parts['base'], 'stats': parts['stats']}
    return mb.server_state({}, g, {'local': mb.broadcast_clients(parts['local'], num_clients)}, aggregator, key)

  def forward(trainable, frozen, x, key, train):
    del frozen
    g, l = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    out, stats = mdef.apply({**g, 'local': l['local']}, x, **mb.call_kwargs(train_arg, train, rngs))
    return out, mb.stats_override(stats)

  def labels(params):
    g, l = params
    return ({k: label_tree(v, 'base') for k, v in g.items()}, label_tree(l, 'lora'))

  optimizer = optax.multi_transform({'base': optax.sgd(lr), 'lora': lora}, labels)
  return supervised(init=init, forward=forward, loss=loss, optimizer=optimizer, batch_size=batch_size,
                    num_epochs=num_epochs, shuffle=shuffle, aggregator=aggregator)

"""Local Adaptor (FLoRAL's baseline ``floral_locallora``): a federated base plus one private LoRA per client."""
from __future__ import annotations

import jax
import optax

from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossFn, supervised
from fedjax_adapters.federated.aggregators import mean_aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.nn.adapt import AdapterSpec
from fedjax_adapters.optim import label_tree, lora_preconditioner


def local_adaptor_optimizer(lr: float, *, lora_lr: float | None = None,
                            precondition: bool = True) -> optax.GradientTransformation:
  """The Local Adaptor's clients: SGD on the base, (preconditioned) SGD on the private LoRA."""
  lora = optax.sgd(lora_lr or lr)
  if precondition:
    lora = optax.chain(lora_preconditioner(), lora)

  def labels(params):
    g, l = params
    return ({k: label_tree(v, 'base') for k, v in g.items()}, label_tree(l, 'lora'))

  return optax.multi_transform({'base': optax.sgd(lr), 'lora': lora}, labels)


def local_adaptor(model_fn: mb.ModelFn, *, loss: str | LossFn, batch_size: int, lr: float | None = None,
                  rank=0.01, lora_lr: float | None = None, client_optimizer: optax.GradientTransformation | None = None,
                  num_epochs: int = 1, shuffle: bool = False, precondition: bool = True, target: str = '.*',
                  conv: bool = True, bias: bool = True, norm: bool = False, embed: bool = False,
                  bias_init: str = 'uniform', server_optimizer: optax.GradientTransformation | None = None,
                  eval_loss: str | None = None, train_arg: str | None = None) -> Algorithm:
  """Base federated with FedAvg; each client keeps its own LoRA (C = 1) that never leaves it.

  The client state is ``{'local': <the LocalAdapter part>}``. Rates as in :func:`local_adaptor_optimizer`, or any
  ``client_optimizer`` over ``(global_params, client_state)``.
  """
  spec = AdapterSpec.floral(0, num_local=1, rank=rank, target=target, conv=conv, bias=bias, norm=norm, embed=embed,
                            bias_init=bias_init)
  mdef, _ = mb.build(model_fn, jax.random.key(0), spec)
  takes_rngs = mb.takes_call_rngs(mdef)
  optimizer = mb.client_optimizer_or(
      client_optimizer, lr, lambda: local_adaptor_optimizer(lr, lora_lr=lora_lr, precondition=precondition))

  def init_params(key, num_clients):
    _, parts = mb.build(model_fn, key, spec)
    g = {'base': parts['base'], 'stats': parts['stats']}
    return {}, g, {'local': mb.broadcast_clients(parts['local'], num_clients)}

  def forward(trainable, frozen, x, key, train):
    del frozen
    g, l = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    out, stats = mdef.apply({**g, 'local': l['local']}, x, **mb.call_kwargs(train_arg, train, rngs))
    return out, mb.stats_override(stats)

  return supervised(name='local_adaptor', init_params=init_params, forward=forward, loss=loss, optimizer=optimizer,
                    batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=mean_aggregator(server_optimizer), eval_loss=eval_loss, model=mdef, spec=spec)

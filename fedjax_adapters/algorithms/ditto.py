"""Ditto (Li et al., ICML 2021, "Ditto: Fair and Robust Federated Learning Through Personalization") with LoRA.

Every client trains two LoRAs on the same frozen base: the global LoRA ``w`` on its task loss (averaged by FedAvg,
exactly as :func:`~fedjax_adapters.algorithms.lora_fedavg`), and its personal LoRA ``v`` on

  F_k(v) + lambda / 2 * ||v - w^t||^2,

where ``w^t`` is the global LoRA the round started from (Algorithm 1 of the paper). Both take the same local steps;
the two objectives share no parameter, so one optimizer step on their sum is one step of each. Predictions and
evaluation use the personal model (base + ``v``).
"""
from __future__ import annotations

import jax
import optax

from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossFn, LossInputs, resolve_loss, sq_distance, supervised, task_loss
from fedjax_adapters.federated.aggregators import mean_aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.nn.adapt import AdapterSpec


def ditto_loss(loss: str | LossFn, lam: float, eval_loss: str | None = None) -> LossFn:
  """The joint client objective ``F_k(w) + F_k(v) + lam / 2 ||v - w^t||^2`` as a loss callable.

  ``inputs.params = ({'adapters': w}, {'adapters': v})``; ``inputs.outputs`` are the personal model's. The
  training ``loss`` metric is this sum; evaluation reports the personal model's task loss.
  """
  custom, kind = resolve_loss(loss, eval_loss)
  base = custom or (lambda inp: task_loss(kind, inp))

  def value(inp):
    out = base(inp)
    return out[0] if isinstance(out, tuple) else out

  def loss_fn(inputs: LossInputs):
    g, v = inputs.params
    as_global = (g, {'adapters': g['adapters']})  # the personal slot filled with w: the global model
    g_out = inputs.forward(as_global, inputs.batch.x)
    personal, global_ = value(inputs), value(inputs._replace(outputs=g_out, params=as_global))
    prox = 0.5 * lam * sq_distance(v['adapters'], jax.lax.stop_gradient(inputs.anchor[0]['adapters']))
    return personal + global_ + prox

  return loss_fn


def ditto(model_fn: mb.ModelFn, *, loss: str | LossFn, batch_size: int, lam: float = 1.0, lr: float | None = None,
          spec: AdapterSpec | None = None, client_optimizer: optax.GradientTransformation | None = None,
          num_epochs: int = 1, shuffle: bool = False, server_optimizer: optax.GradientTransformation | None = None,
          eval_loss: str | None = None, train_arg: str | None = None) -> Algorithm:
  """Ditto on a frozen model: a global LoRA by FedAvg and a personal LoRA per client pulled toward it.

  Args:
    model_fn: ``rngs -> nnx.Module``.
    loss: ``'mse'``, ``'xent'`` or a loss callable (applied to both the global and the personal model).
    batch_size, num_epochs, shuffle: local training (the same steps for ``w`` and ``v``).
    lam: ``lambda`` of the proximal term (0: independent local LoRAs; large: the global LoRA).
    lr: client SGD learning rate; or ``client_optimizer`` over ``({'adapters': w}, {'adapters': v})``.
    spec: one LoRA per layer (default :class:`AdapterSpec`); ``v`` has the same shape as ``w``.
    server_optimizer: on the pseudo-gradient of ``w`` (default SGD lr 1 = plain averaging).
    eval_loss: the metrics reported when ``loss`` is a callable.
    train_arg: name of the model's train-mode keyword, if any.
  """
  spec = spec or AdapterSpec()
  mb.check_one_lora(spec, 'ditto')
  if not float(lam) >= 0:
    raise ValueError(f'ditto needs lam >= 0; got {lam}.')
  mdef, _ = mb.build(model_fn, jax.random.key(0), spec)
  takes_rngs = mb.takes_call_rngs(mdef)
  optimizer = mb.client_optimizer_or(client_optimizer, lr, lambda: optax.sgd(lr))
  _, kind = resolve_loss(loss, eval_loss)

  def init_params(key, num_clients):
    _, parts = mb.build(model_fn, key, spec)
    frozen = {'base': parts['base'], 'stats': parts['stats']}
    return frozen, {'adapters': parts['adapters']}, {'adapters': mb.broadcast_clients(parts['adapters'], num_clients)}

  def forward(trainable, frozen, x, key, train):
    _, v = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    dropout_key = jax.random.fold_in(key, 0xD0) if train and spec.dropout > 0 else None
    out, _ = mdef.apply({**frozen, 'adapters': v['adapters']}, x, dropout_key=dropout_key,
                        **mb.call_kwargs(train_arg, train, rngs))
    return out, {}

  return supervised(name='ditto', init_params=init_params, forward=forward, loss=ditto_loss(loss, lam, eval_loss),
                    optimizer=optimizer, batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=mean_aggregator(server_optimizer), eval_loss=kind, model=mdef, spec=spec)

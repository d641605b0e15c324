"""FLoRAL (Almansoori, Takac, Horvath, CPAL 2025; arXiv 2410.03497): C shared adaptors mixed by local routers.

Each client holds C router logits; its model is ``base + sum_c pi_c adaptor_c`` in every adapted layer, with
``pi = max(softmax((w + noise) / T), floor)``. Base and adaptors are federated: the base by ``p(k)``, adaptor ``c``
by ``p(k|c)`` (router-weighted averaging). Defaults follow the public code (``zeligism/FLoRAL``): SGD clients, LoRA
gradient preconditioning, uniform router noise, 0.01 floor, nonzero bias-adaptor init, zero-initialized logits.
The oracle variant fixes each client's logits to its true cluster (``-100`` elsewhere) and does not train them.

Two router options go beyond the paper (both off by default; ``experiments/router_study/README.md`` measures them):
``aggregation_temperature`` sharpens the server's adaptor weights, and ``balance_rate`` has the server keep a
per-adaptor logit offset that steers the population toward using every adaptor (:func:`balanced_aggregator`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_adapters.adapters.mixture import aggregation_probs, oracle_logits, router_probs
from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossFn, supervised
from fedjax_adapters.federated.aggregators import Aggregator, router_aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.nn.adapt import AdapterSpec
from fedjax_adapters.optim import label_tree, lora_preconditioner


def floral_optimizer(lr: float, *, lora_lr: float | None = None, router_lr: float = 0.1, precondition: bool = True,
                     precondition_eps: float = 1e-5) -> optax.GradientTransformation:
  """FLoRAL's clients (public code): SGD on the base, (preconditioned) SGD on the adaptors, SGD on the router
  logits; ``router_lr=0`` freezes the router (the oracle)."""
  lora = optax.sgd(lora_lr if lora_lr is not None else lr)
  if precondition:
    lora = optax.chain(lora_preconditioner(precondition_eps), lora)

  def labels(params):
    g, l = params
    return ({k: label_tree(v, 'lora' if k == 'adapters' else 'base') for k, v in g.items()},
            label_tree(l, 'router'))

  return optax.multi_transform({'base': optax.sgd(lr), 'lora': lora, 'router': mb.sgd_or_zero(router_lr)}, labels)


# Global-params key of the server-held router offsets [C] (present only when balance_rate > 0).
ROUTER_OFFSET = 'router_offset'


def routed_logits(global_params: dict, client_state: dict) -> jax.Array:
  """The logits a client routes with: its own ``[C]`` plus the server's offsets when there are any.

  The offsets are the server's, so no client gradient reaches them (``stop_gradient``).
  """
  offset = global_params.get(ROUTER_OFFSET)
  logits = client_state['logits']
  return logits if offset is None else logits + jax.lax.stop_gradient(offset)


def balanced_aggregator(aggregator: Aggregator, num_adaptors: int, rate: float,
                        probs_key: str = 'router_probs') -> Aggregator:
  """``aggregator`` for the global params without :data:`ROUTER_OFFSET`, then a usage step on the offsets.

  After the round, ``offset_c += rate * (1 / C - u_c)`` with ``u_c = sum_k n_k p(c|k) / sum_k n_k`` over the sampled
  clients (``p(c|k)``: the aggregation probabilities in ``client_outputs.aux[probs_key]``, ``[M, C]``). An adaptor
  few clients use gains logit mass at every client until the clients it serves best take it up: the load balancing
  of mixtures of experts, run by the server on what FLoRAL's clients already send.
  """
  def inner(tree):
    return {k: v for k, v in tree.items() if k != ROUTER_OFFSET}

  def aggregate(global_params, client_outputs, weights, agg_state, info=None):
    new, agg_state = aggregator.aggregate(inner(global_params), client_outputs._replace(
        params=inner(client_outputs.params)), weights, agg_state, info)
    probs = client_outputs.aux[probs_key]
    usage = jnp.sum(weights[:, None] * probs, 0) / jnp.maximum(jnp.sum(weights), jnp.finfo(probs.dtype).tiny)
    offset = global_params[ROUTER_OFFSET] + rate * (1.0 / num_adaptors - usage)
    return dict(new, **{ROUTER_OFFSET: offset.astype(global_params[ROUTER_OFFSET].dtype)}), agg_state

  return Aggregator(lambda global_params: aggregator.init(inner(global_params)), aggregate)


def floral(model_fn: mb.ModelFn, *, num_adaptors: int, loss: str | LossFn, batch_size: int, lr: float | None = None,
           rank=0.01, lora_lr: float | None = None, router_lr: float = 0.1,
           client_optimizer: optax.GradientTransformation | None = None, num_epochs: int = 1, shuffle: bool = False,
           oracle_clusters=None, temperature: float = 1.0, noise_std: float = 1.0, floor: float | None = 0.01,
           precondition: bool = True, precondition_eps: float = 1e-5, target: str = '.*', linear: bool = True,
           conv: bool = True, bias: bool = True, norm: bool = False, embed: bool = False,
           bias_init: str = 'uniform', server_optimizer: optax.GradientTransformation | None = None,
           aggregation_temperature: float | None = None, balance_rate: float = 0.0, eval_loss: str | None = None,
           train_arg: str | None = None, reducer=None) -> Algorithm:
  """FLoRAL with a learned router, or the oracle router when ``oracle_clusters`` (``[K]``) is given.

  The client state is ``{'logits': [C]}``; the global params ``{'base', 'stats', 'adapters'}``.

  Args:
    model_fn: ``rngs -> nnx.Module``.
    num_adaptors: C.
    loss: ``'mse'``, ``'xent'`` or a loss callable (:class:`~fedjax_adapters.algorithms.LossInputs`).
    batch_size, num_epochs, shuffle: local training (the public code: one epoch, no shuffling).
    lr: client SGD learning rate of the base; ``lora_lr`` of the adaptors (default ``lr``); ``router_lr`` of the
      logits (see :func:`floral_optimizer`). Or pass ``client_optimizer`` over ``(global_params, client_state)``.
    rank: int, float budget rho (FLoRAL 1% = 0.01, 10% = 0.1) or ``'full'``.
    oracle_clusters: true cluster per client; fixes the router (``router_lr`` ignored).
    temperature, noise_std, floor: router settings (see :func:`router_probs`).
    precondition: FLoRAL's LoRA gradient preconditioning (:func:`lora_preconditioner`).
    target, linear, conv, bias, norm, embed: which adaptors go where.
    bias_init: ``'uniform'`` (public code) or ``'zeros'``.
    server_optimizer: on the pseudo-gradient (default SGD lr 1).
    aggregation_temperature: the server weighs client ``k``'s adaptor ``c`` by ``p(c|k) = softmax(w_k / T_agg)``
      (then normalized over clients into ``p(k|c)``). ``None`` (the paper) uses ``temperature``. A lower value
      sharpens the weights toward each client's top adaptor while clients still train with their soft mixture:
      each adaptor is averaged over the clients that route to it most, so adaptors specialize before the routers
      are sharp and an adaptor two clusters share is pulled apart by the clients it serves worst
      (``experiments/router_study/README.md``: 0.1 on MNIST label shift).
    balance_rate: ``> 0`` adds server-held offsets ``[C]`` to every client's logits (global params gain
      :data:`ROUTER_OFFSET`), moved after each round toward equal use of the adaptors (:func:`balanced_aggregator`):
      no adaptor dies unused while two clusters share another. It assumes the clusters are of similar size. ``0``
      (the paper): no offsets.
    eval_loss: the metrics reported when ``loss`` is a callable.
    train_arg: name of the model's train-mode keyword, if any.
    reducer: None (the paper's router-weighted means) or a robust :data:`~fedjax_adapters.federated.Reducer`
      applied to the shared leaves with ``p(k)`` and to each adaptor with ``p(k|c)`` (docs/robustness.md).
  """
  if num_adaptors < 1:
    raise ValueError(f'num_adaptors must be >= 1; got {num_adaptors}.')
  if aggregation_temperature is not None and not aggregation_temperature > 0:
    raise ValueError(f'aggregation_temperature must be > 0 (or None: the router temperature); got '
                     f'{aggregation_temperature}.')
  if not balance_rate >= 0:
    raise ValueError(f'balance_rate must be >= 0 (0: off); got {balance_rate}.')
  t_agg = temperature if aggregation_temperature is None else aggregation_temperature
  aggregator = router_aggregator(('adapters',), server_optimizer=server_optimizer, reducer=reducer)
  if balance_rate:
    aggregator = balanced_aggregator(aggregator, num_adaptors, balance_rate)
  spec = AdapterSpec.floral(num_adaptors, rank=rank, target=target, linear=linear, conv=conv, bias=bias, norm=norm,
                            embed=embed, bias_init=bias_init)
  mdef, _ = mb.build(model_fn, jax.random.key(0), spec)
  takes_rngs = mb.takes_call_rngs(mdef)
  oracle = oracle_clusters is not None
  optimizer = mb.client_optimizer_or(client_optimizer, lr, lambda: floral_optimizer(
      lr, lora_lr=lora_lr, router_lr=0.0 if oracle else router_lr, precondition=precondition,
      precondition_eps=precondition_eps))

  def init_params(key, num_clients):
    _, parts = mb.build(model_fn, key, spec)
    g = {'base': parts['base'], 'stats': parts['stats'], 'adapters': parts['adapters']}
    if oracle:
      logits = oracle_logits(mb.check_clusters(oracle_clusters, num_clients, num_adaptors), num_adaptors)
    else:
      logits = jnp.zeros((num_clients, num_adaptors))
    if balance_rate:
      g[ROUTER_OFFSET] = jnp.zeros((num_adaptors,))
    return {}, g, {'logits': logits}

  def forward(trainable, frozen, x, key, train):
    del frozen
    g, l = trainable
    rngs = mb.call_rngs(key if takes_rngs else None)
    mix = router_probs(routed_logits(g, l), key, num_adaptors=num_adaptors, train=train, temperature=temperature,
                       noise_std=noise_std, floor=floor)
    model_params = {k: v for k, v in g.items() if k != ROUTER_OFFSET}
    out, stats = mdef.apply(model_params, x, mix=mix, **mb.call_kwargs(train_arg, train, rngs))
    return out, mb.stats_override(stats)

  return supervised(name='floral_oracle' if oracle else 'floral', init_params=init_params, forward=forward,
                    loss=loss, optimizer=optimizer, batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=aggregator,
                    output_aux=lambda g, l: {'router_probs': aggregation_probs(routed_logits(g, l), t_agg)},
                    eval_loss=eval_loss, model=mdef, spec=spec)

"""FLoRAL's Ensemble baseline: C full models mixed at the output by a local router, ``sum_c pi_c f_c(x)``.

Model ``c`` is averaged with weights ``p(k|c)`` (the public code's ``ensembleavg.py``). Unlike the public code, terms
with ``pi_c < 1e-3`` are not skipped; they are multiplied by their small weight, which keeps the forward pass
vmappable over members (the difference is below the floor's 0.01 when a floor is used).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_adapters.adapters.mixture import aggregation_probs, oracle_logits, router_probs
from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossFn, supervised
from fedjax_adapters.federated.aggregators import router_aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.optim import label_tree


def ensemble_optimizer(lr: float, *, router_lr: float = 0.1) -> optax.GradientTransformation:
  """The Ensemble's clients: SGD on every member, SGD on the router logits (``router_lr=0``: frozen, the oracle)."""
  def labels(params):
    g, l = params
    return ({k: label_tree(v, 'base') for k, v in g.items()}, label_tree(l, 'router'))

  return optax.multi_transform({'base': optax.sgd(lr), 'router': mb.sgd_or_zero(router_lr)}, labels)


def ensemble(model_fn: mb.ModelFn, *, num_members: int, loss: str | LossFn, batch_size: int, lr: float | None = None,
             router_lr: float = 0.1, client_optimizer: optax.GradientTransformation | None = None,
             num_epochs: int = 1, shuffle: bool = False, oracle_clusters=None, temperature: float = 1.0,
             noise_std: float = 1.0, floor: float | None = 0.01,
             server_optimizer: optax.GradientTransformation | None = None, eval_loss: str | None = None,
             train_arg: str | None = None) -> Algorithm:
  """Ensemble of ``num_members`` independently initialized models with a learned (or oracle) router.

  The client state is ``{'logits': [C]}``; the global params ``{'members': {'base', 'stats'} stacked [C, ...]}``.
  Arguments as in :func:`~fedjax_adapters.algorithms.floral`.
  """
  if num_members < 1:
    raise ValueError(f'num_members must be >= 1; got {num_members}.')
  mdef, _ = mb.build(model_fn, jax.random.key(0))
  takes_rngs = mb.takes_call_rngs(mdef)
  oracle = oracle_clusters is not None
  optimizer = mb.client_optimizer_or(client_optimizer, lr,
                                     lambda: ensemble_optimizer(lr, router_lr=0.0 if oracle else router_lr))

  def init_params(key, num_clients):
    members = [mb.build(model_fn, jax.random.fold_in(key, c))[1] for c in range(num_members)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[{'base': p['base'], 'stats': p['stats']} for p in members])
    if oracle:
      logits = oracle_logits(mb.check_clusters(oracle_clusters, num_clients, num_members), num_members)
    else:
      logits = jnp.zeros((num_clients, num_members))
    return {}, {'members': stacked}, {'logits': logits}

  def forward(trainable, frozen, x, key, train):
    del frozen
    g, l = trainable
    pi = router_probs(l['logits'], key, num_adaptors=num_members, train=train, temperature=temperature,
                      noise_std=noise_std, floor=floor)

    def member(p, c):
      # Each member draws its own dropout masks; the augmented input (the `augment` stream) is shared.
      rngs = mb.call_rngs(jax.random.fold_in(key, c), shared_key=key) if takes_rngs else None
      return mdef.apply(p, x, **mb.call_kwargs(train_arg, train, rngs))

    outs, stats = jax.vmap(member)(g['members'], jnp.arange(num_members))
    return jnp.einsum('c,c...->...', pi, outs), mb.stats_override(stats, ('members', 'stats'))

  return supervised(name='ensemble_oracle' if oracle else 'ensemble', init_params=init_params, forward=forward,
                    loss=loss, optimizer=optimizer, batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle,
                    aggregator=router_aggregator(('members',), server_optimizer=server_optimizer),
                    output_aux=lambda g, l: {'router_probs': aggregation_probs(l['logits'], temperature)},
                    eval_loss=eval_loss, model=mdef)

"""Named router variants for the study, composed from the runner's algorithms and the library's pieces.

``default`` is the paper's method exactly as the runner (``experiments/floral.py``) builds it. Every other variant
changes one thing, said in its description. The composed ones wrap the algorithm's ``client_update``:

* ``router_pass``: before the usual local step, a router-only pass (the same loss, base and adaptors frozen) fits
  the client's logits to the current global adaptors.
* ``hedge``: before the usual local step, the logits move by ``-eta * (L_c - mean_c L_c)``, where ``L_c`` is the
  client's mean training loss with adaptor ``c`` alone (a multiplicative-weights / EM-style update: it does not
  shrink with ``pi_c`` or with a saturated softmax, as the gradient ``pi_c (g_c - g_bar)`` does).
* ``ifca_rounds``: for the first rounds, each client's logits are set to ``beta * one_hot(argmin_c L_c)`` (IFCA's
  hard, loss-based assignment) before its local step; afterwards the paper's router takes over from there.
* ``agg_temperature``: the server weighs adaptors by ``softmax(w / T_agg)`` instead of ``softmax(w / T)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_adapters.experiments import floral as runner
from fedjax_adapters import make_round

# name -> settings: 'desc', and any of 'cfg' (task-config overrides), 'router_pass' (epochs, router lr), 'hedge'
# (eta), 'ifca_rounds' (rounds, beta), 'agg_temperature'.
VARIANTS: dict[str, dict] = {
    'default': {'desc': 'the paper\'s method (public-code settings)'},
    'no_noise': {'desc': 'router noise off', 'cfg': {'noise_std': 0.0}},
    'router_lr_1': {'desc': 'router lr 1.0 instead of 0.3', 'cfg': {'router_lr': 1.0}},
    'router_lr_3': {'desc': 'router lr 3.0 instead of 0.3', 'cfg': {'router_lr': 3.0}},
    'temperature_0.5': {'desc': 'router temperature 0.5', 'cfg': {'temperature': 0.5}},
    'router_pass_5': {'desc': '5 router-only epochs (lr 0.3) before each local step', 'router_pass': (5, 0.3)},
    'hedge_1': {'desc': 'loss-based logit update, eta 1, before each local step', 'hedge': 1.0},
    'hedge_3': {'desc': 'loss-based logit update, eta 3, before each local step', 'hedge': 3.0},
    'ifca_100': {'desc': 'IFCA hard assignment (beta 3) for the first 100 rounds', 'ifca_rounds': (100, 3.0)},
    'ifca_300': {'desc': 'IFCA hard assignment (beta 3) for the first 300 rounds', 'ifca_rounds': (300, 3.0)},
    'agg_t_0.3': {'desc': 'server weighs adaptors by softmax(w / 0.3)', 'agg_temperature': 0.3},
    'agg_t_0.1': {'desc': 'server weighs adaptors by softmax(w / 0.1)', 'agg_temperature': 0.1},
    'agg_t_0.01': {'desc': 'server weighs adaptors by softmax(w / 0.01) (about the argmax)', 'agg_temperature': 0.01},
    'lr_1_agg_t_0.3': {'desc': 'router lr 1.0 and server weights softmax(w / 0.3)', 'cfg': {'router_lr': 1.0},
                       'agg_temperature': 0.3},
    'lr_1_agg_t_0.1': {'desc': 'router lr 1.0 and server weights softmax(w / 0.1)', 'cfg': {'router_lr': 1.0},
                       'agg_temperature': 0.1},
    'lr_3_agg_t_0.1': {'desc': 'router lr 3.0 and server weights softmax(w / 0.1)', 'cfg': {'router_lr': 3.0},
                       'agg_temperature': 0.1},
    'noise_2_agg_t_0.1': {'desc': 'router noise 2 U[0, 1) and server weights softmax(w / 0.1)',
                          'cfg': {'noise_std': 2.0}, 'agg_temperature': 0.1},
    'hedge_0.1_agg_t_0.1': {'desc': 'loss-based logit update (eta 0.1) and server weights softmax(w / 0.1)',
                            'hedge': 0.1, 'agg_temperature': 0.1},
    'hedge_0.3_agg_t_0.1': {'desc': 'loss-based logit update (eta 0.3) and server weights softmax(w / 0.1)',
                            'hedge': 0.3, 'agg_temperature': 0.1},
    'bias_zeros': {'desc': 'bias adaptors start at zero (the public code: U(+-1/sqrt(r)))', 'cfg': {'bias_init': 'zeros'}},
    'bias_zeros_agg_t_0.1': {'desc': 'bias adaptors start at zero and server weights softmax(w / 0.1)',
                             'cfg': {'bias_init': 'zeros'}, 'agg_temperature': 0.1},
    'balance_1_lr_1_agg_t_0.1': {'desc': 'server logit offsets toward equal adaptor use (rate 1), router lr 1, '
                                 'server weights softmax(w / 0.1)', 'balance': 1.0, 'cfg': {'router_lr': 1.0},
                                 'agg_temperature': 0.1},
    'balance_1_agg_t_0.1': {'desc': 'server logit offsets toward equal adaptor use (rate 1), server weights '
                            'softmax(w / 0.1)', 'balance': 1.0, 'agg_temperature': 0.1},
    'balance_1_lr_2_agg_t_0.1': {'desc': 'server logit offsets (rate 1), router lr 2, server weights softmax(w / 0.1)', 'balance': 1.0, 'cfg': {'router_lr': 2.0}, 'agg_temperature': 0.1},
    'balance_0.3_lr_1_agg_t_0.1': {'desc': 'server logit offsets (rate 0.3), router lr 1, server weights softmax(w / 0.1)', 'balance': 0.3, 'cfg': {'router_lr': 1.0}, 'agg_temperature': 0.1},
    'balance_3_lr_1_agg_t_0.1': {'desc': 'server logit offsets (rate 3), router lr 1, server weights softmax(w / 0.1)', 'balance': 3.0, 'cfg': {'router_lr': 1.0}, 'agg_temperature': 0.1},
    'balance_1_lr_1': {'desc': 'server logit offsets (rate 1), router lr 1 (the paper\'s server weights)', 'balance': 1.0, 'cfg': {'router_lr': 1.0}},
    'balance_1': {'desc': 'server logit offsets (rate 1) alone', 'balance': 1.0},
    't_0.5_agg_t_0.1': {'desc': 'router temperature 0.5 and server weights softmax(w / 0.1)',
                        'cfg': {'temperature': 0.5}, 'agg_temperature': 0.1},
}

# The options as the library and the runner have them (algorithms.floral / FloralTask fields): the ablation table.
OPTIONS: dict[str, dict] = {
    'paper': {},
    'router_lr_1': {'router_lr': 1.0},
    'agg_t_0.1': {'aggregation_temperature': 0.1},
    'balance_1': {'balance_rate': 1.0},
    'router_lr_1+agg_t_0.1': {'router_lr': 1.0, 'aggregation_temperature': 0.1},
    'balance_1+agg_t_0.1': {'balance_rate': 1.0, 'aggregation_temperature': 0.1},
    'balance_1+router_lr_1': {'balance_rate': 1.0, 'router_lr': 1.0},
    'balance_1+router_lr_1+agg_t_0.1': {'balance_rate': 1.0, 'router_lr': 1.0, 'aggregation_temperature': 0.1},
}
VARIANTS.update({f'option:{k}': {'desc': f'library options {v or "(none: the paper)"}', 'cfg': v}
                 for k, v in OPTIONS.items()})


@dataclasses.dataclass
class Variant:
  algorithm: Any       # init and evaluation (the paper's algorithm, with the variant's config overrides)
  temperature: float   # of the router probabilities the study reports
  step: Callable       # (state, train, round_index) -> (state, metrics)


def task_config(name: str):
  """The runner's config of task ``name`` (a config object, or a factory of one in older runners)."""
  task = runner.TASKS[name]
  return task() if callable(task) else task


def load_data(task, seed: int):
  """The runner's federated dataset of ``task`` for ``seed``."""
  return runner.load_data(task, seed) if hasattr(runner, 'load_data') else task.load(seed)


def describe(name: str) -> dict:
  return dict(VARIANTS[name])


def replace(alg, **changes):
  """``alg`` with fields changed (the algorithm is a NamedTuple or, in newer libraries, a dataclass)."""
  return alg._replace(**changes) if hasattr(alg, '_replace') else alg.replace(**changes)


def adaptor_losses(alg, frozen, global_params, client_state, data, num_adaptors: int) -> jax.Array:
  """``[C]``: one client's mean loss on ``data`` with each adaptor alone (evaluation mode, no router noise)."""
  def one(c):
    logits = jnp.where(jnp.arange(num_adaptors) == c, 0.0, -100.0)
    m = alg.evaluate(frozen, global_params, dict(client_state, logits=logits), data)
    return m['loss'] / jnp.maximum(m['count'], 1.0)
  return jnp.stack([one(c) for c in range(num_adaptors)])


def with_prestep(alg, prestep):
  """``alg`` whose clients first map their state through ``prestep(frozen, g, l, data, key) -> l``."""
  def client_update(frozen, g, l, data, key, client=None):
    return alg.client_update(frozen, g, prestep(frozen, g, l, data, jax.random.fold_in(key, 0x7A11)), data, key,
                             client)
  return replace(alg, client_update=client_update)


def with_agg_temperature(alg, t_agg: float):
  def client_update(frozen, g, l, data, key, client=None):
    out, new_l, metrics = alg.client_update(frozen, g, l, data, key, client)
    aux = dict(out.aux, router_probs=jax.nn.softmax(new_l['logits'] / t_agg))
    return out._replace(aux=aux), new_l, metrics
  return replace(alg, client_update=client_update)


def with_balance(alg, num_adaptors: int, rate: float):
  """``alg`` with a server-held logit offset ``beta [C]`` added to every client's router, driven toward equal use.

  After each round the server moves ``beta_c += rate * (1/C - u_c)``, where ``u_c`` is the sampled clients' mean
  ``p(c|k)`` (example-weighted): an adaptor nobody uses is offered to the clients that like it most, instead of
  dying (the load balancing of mixtures of experts, done by the server). Clients store their logits without it.
  """
  def split(g):
    return {k: v for k, v in g.items() if k != 'router_bias'}, g['router_bias']

  def init_params(key, num_clients):
    frozen, g, clients = alg.init_params(key, num_clients)
    return frozen, dict(g, router_bias=jnp.zeros((num_adaptors,))), clients

  def client_update(frozen, g, l, data, key, client=None):
    inner, beta = split(g)
    out, new_l, metrics = alg.client_update(frozen, inner, dict(l, logits=l['logits'] + beta), data, key, client)
    new_l = dict(new_l, logits=new_l['logits'] - beta)
    return out._replace(params=dict(out.params, router_bias=beta)), new_l, metrics

  def evaluate(frozen, g, l, data):
    inner, beta = split(g)
    return alg.evaluate(frozen, inner, dict(l, logits=l['logits'] + beta), data)

  def aggregate(g, outs, weights, agg_state, info=None):
    inner, beta = split(g)
    inner_outs = outs._replace(params=split(outs.params)[0])
    new_inner, agg_state = alg.aggregator.aggregate(inner, inner_outs, weights, agg_state, info)
    usage = jnp.sum(weights[:, None] * outs.aux['router_probs'], 0) / jnp.maximum(jnp.sum(weights), 1e-9)
    return dict(new_inner, router_bias=beta + rate * (1.0 / num_adaptors - usage)), agg_state

  aggregator = type(alg.aggregator)(lambda g: alg.aggregator.init(split(g)[0]), aggregate)
  return replace(alg, init_params=init_params, client_update=client_update, evaluate=evaluate, aggregator=aggregator)


def build(name: str, method: str, cfg, data, clients_per_round: int) -> Variant:
  """The variant's algorithm (``method`` as the runner names it) and how it runs round ``r``."""
  v = VARIANTS[name]
  cfg = dataclasses.replace(cfg, **v.get('cfg', {}))
  base = runner.build_algorithm(method, cfg, data)
  c = int(data.num_clusters)
  alg = base
  if 'router_pass' in v:
    epochs, lr = v['router_pass']
    router_only = runner.build_algorithm(method, dataclasses.replace(cfg, lr=0.0, router_lr=lr, num_epochs=epochs),
                                         data)
    alg = with_prestep(alg, lambda f, g, l, d, k: router_only.client_update(f, g, l, d, k)[1])
  if 'hedge' in v:
    eta = v['hedge']

    def hedge(f, g, l, d, k):
      losses = adaptor_losses(base, f, g, l, d, c)
      return dict(l, logits=l['logits'] - eta * (losses - jnp.mean(losses)))
    alg = with_prestep(alg, hedge)
  if 'agg_temperature' in v:
    alg = with_agg_temperature(alg, v['agg_temperature'])
  if 'balance' in v:
    alg = base = with_balance(alg, c, v['balance'])
  main_round = make_round(alg, clients_per_round=clients_per_round)
  if 'ifca_rounds' not in v:
    return Variant(base, cfg.temperature, lambda state, train, r: main_round(state, train))
  warm, beta = v['ifca_rounds']

  def hard(f, g, l, d, k):
    losses = adaptor_losses(base, f, g, l, d, c)
    return dict(l, logits=beta * jax.nn.one_hot(jnp.argmin(losses), c))
  warm_round = make_round(with_prestep(alg, hard), clients_per_round=clients_per_round)
  return Variant(base, cfg.temperature,
                 lambda state, train, r: (warm_round if r < warm else main_round)(state, train))

"""FedDPA (Yang et al., NeurIPS 2024; arXiv 2403.19211) and its baselines on a frozen causal language model.

Every adapted layer (default ``q_proj`` and ``v_proj``; r = 8, alpha = 16, dropout 0.05, as in the paper) holds a
global LoRA (aggregated) and a local LoRA (never leaves the client): ``y = W0 x + s (w_g dG(x) + w_l dL(x))``.

Variants (``variant=``), all on the same round runner:

* ``'fedit'``: FedAvg over the global LoRA (FedIT / Shepherd); the local LoRA is unused.
* ``'local'``: each client trains only its local LoRA; nothing is aggregated.
* ``'feddpa_t'``: every round, each client first trains its local LoRA mixed with the frozen global one at weight
  ``a`` (``w_l = a, w_g = 1 - a``; from the client's second participation on, as the public code starts it in round
  1), then trains the global LoRA alone; only the global LoRA is averaged.
* ``'feddpa_f'``: FedIT training; afterwards :func:`personalize_from_global` copies the final global LoRA into each
  client's local LoRA and fine-tunes it on local data.
* Centralized LoRA is ``'fedit'`` on one client holding the pooled data.

Client optimizer: AdamW (weight decay 0) with a linear decay to 0 within each phase, gradient clipping at 1.0, state
reset every phase (the public code builds a new HF Trainer per phase); loss on response tokens only; uniform FedAvg
of A and B separately (the public code's data-size weighting is commented out).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.federated import mapping as mapping_lib
from fedjax_adapters.federated.aggregators import Aggregator, mean_aggregator
from fedjax_adapters.federated.algorithm import Algorithm, ServerState
from fedjax_adapters.federated.client_update import Batch, ClientData, ClientOutput, make_client_update
from fedjax_adapters.nn.adapt import AdapterSpec, ModelDef

VARIANTS = ('fedit', 'local', 'feddpa_t', 'feddpa_f')


def token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, row_mask: jax.Array):
  """Sum and count of next-token cross-entropy on the tokens ``loss_mask`` marks (response tokens + EOS).

  ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; ``loss_mask[:, t + 1]`` says whether that target counts.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], input_ids[:, 1:])
  m = loss_mask[:, 1:].astype(jnp.float32) * row_mask[:, None].astype(jnp.float32)
  return jnp.sum(ce * m), jnp.sum(m)


def client_optimizer(lr: float, steps: int, *, weight_decay: float = 0.0, clip: float | None = 1.0,
                     schedule: str = 'linear') -> optax.GradientTransformation:
  """AdamW with linear decay to 0 over ``steps`` (HF Trainer's default), preceded by global-norm clipping."""
  if schedule == 'linear':
    lr_fn = optax.linear_schedule(lr, 0.0, max(steps, 1))
  elif schedule == 'constant':
    lr_fn = lr
  else:
    raise ValueError(f"schedule must be 'linear' or 'constant'; got {schedule!r}.")
  adamw = optax.adamw(lr_fn, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw


def lm_spec(*, target: str = r'.*\.(q_proj|v_proj)', rank: int = 8, alpha: float = 16.0,
            dropout: float = 0.05) -> AdapterSpec:
  """FedDPA's adapters: a global and a local LoRA on the target projections (PEFT init: kaiming A, zero B)."""
  return AdapterSpec(target=target, rank=rank, alpha=alpha, num_global=1, num_local=1, bias=False, conv=False,
                     init='kaiming', dropout=dropout)


def feddpa(model_fn: mb.ModelFn, *, variant: str = 'feddpa_t', spec: AdapterSpec | None = None, lr: float = 3e-4,
           batch_size: int = 8, num_epochs: int = 10, num_rows: int | None = None, mix_weight: float = 0.5,
           weight_decay: float = 0.0, clip: float | None = 1.0, schedule: str = 'linear',
           uniform_aggregation: bool = True, server_optimizer: optax.GradientTransformation | None = None,
           model_kwargs: dict | None = None) -> 'FedDPA':
  """Builds FedDPA (or a baseline) as an :class:`Algorithm`.

  Args:
    model_fn: ``rngs -> nnx.Module``, a causal LM called as ``model(input_ids, attention_mask) -> logits``.
    variant: one of ``VARIANTS``.
    spec: adapter spec (default :func:`lm_spec`).
    lr: AdamW peak learning rate (3e-4).
    batch_size: examples per optimizer step (the paper: 64; gradient accumulation is not needed here).
    num_epochs: local epochs per phase (the paper: 10).
    num_rows: padded rows per client, for the length of the learning-rate schedule (default: known at first call).
    mix_weight: FedDPA-T's ``a`` (local weight while training the local LoRA; paper 0.5, ablated 0.3/0.7).
    weight_decay, clip, schedule: optimizer switches (0, 1.0, linear as in the paper).
    uniform_aggregation: average clients uniformly (public code) instead of by example count.
    server_optimizer: on the pseudo-gradient (default SGD lr 1 = plain averaging).
    model_kwargs: extra keyword arguments of the model call.
  """
  if variant not in VARIANTS:
    raise ValueError(f'unknown FedDPA variant {variant!r}; choose one of {VARIANTS}.')
  spec = spec or lm_spec()
  mdef, _ = mb.build(model_fn, jax.random.key(0), spec)
  base_agg = mean_aggregator(server_optimizer)
  kw = dict(model_kwargs or {})

  def aggregate(global_params, outs: ClientOutput, weights, agg_state):
    if variant == 'local':  # nothing is federated: keep the global adapter bit for bit
      return global_params, agg_state
    if uniform_aggregation:
      weights = (weights > 0).astype(weights.dtype)
    return base_agg.aggregate(global_params, outs, weights, agg_state)

  def init_params(key, num_clients):
    _, parts = mb.build(model_fn, key, spec)
    clients = {'local': mb.broadcast_clients(parts['local'], num_clients),
               'seen': jnp.zeros((num_clients,), jnp.int32)}
    return {'base': parts['base']}, {'adapters': parts['adapters']}, clients

  def make_loss(gw, lw):
    def loss_fn(trainable, frozen, batch: Batch, key, anchor):
      del anchor  # no proximal term
      g, l = trainable
      x = batch.x
      logits, _ = mdef.apply({**frozen, **g, 'local': l}, x['input_ids'], x['attention_mask'], global_weight=gw,
                             local_weight=lw, dropout_key=key, **kw)
      total, count = token_loss(logits, x['input_ids'], x['loss_mask'], batch.mask)
      return total / jnp.maximum(count, 1.0), ({'loss': total, 'tokens': count}, {})
    return loss_fn

  phases = {}

  def phase(name, rows):
    if (name, rows) not in phases:
      steps = num_epochs * math.ceil(rows / batch_size)
      opt = client_optimizer(lr, steps, weight_decay=weight_decay, clip=clip, schedule=schedule)
      if name == 'local_mixed':
        loss, train = make_loss(1.0 - mix_weight, mix_weight), 'client'
      elif name == 'local_alone':
        loss, train = make_loss(0.0, 1.0), 'client'
      else:
        loss, train = make_loss(1.0, 0.0), 'global'
      phases[(name, rows)] = make_client_update(loss, opt, batch_size=batch_size, num_epochs=num_epochs,
                                                shuffle=True, train=train)
    return phases[(name, rows)]

  def client_update(frozen, global_params, client_state, data: ClientData, key):
    rows = num_rows or jax.tree.leaves(data.x)[0].shape[0]
    local, seen = client_state['local'], client_state['seen']
    metrics = {}
    if variant == 'feddpa_t':
      _, trained, m = phase('local_mixed', rows)(frozen, global_params, local, data, jax.random.fold_in(key, 1))
      local = jax.tree.map(lambda n, o: jnp.where(seen >= 1, n, o), trained, local)
      metrics.update({f'local_{k}': v for k, v in m.items()})
    if variant == 'local':
      _, local, m = phase('local_alone', rows)(frozen, global_params, local, data, jax.random.fold_in(key, 1))
      metrics.update({f'local_{k}': v for k, v in m.items()})
      out = ClientOutput(global_params, data.count, ())
    else:
      out, _, m = phase('global', rows)(frozen, global_params, local, data, jax.random.fold_in(key, 2))
      metrics.update({f'global_{k}': v for k, v in m.items()})
    return out, {'local': local, 'seen': seen + 1}, metrics

  def evaluate(frozen, global_params, client_state, data: ClientData):
    """Response-token loss of the client's model (global + local at weight 1 each; local only for 'local')."""
    gw, lw = {'fedit': (1.0, 0.0), 'local': (0.0, 1.0)}.get(variant, (0.5, 0.5))
    x = data.x
    logits, _ = mdef.apply({**frozen, **global_params, 'local': client_state['local']}, x['input_ids'],
                           x['attention_mask'], global_weight=gw, local_weight=lw, **kw)
    rows = jnp.arange(x['input_ids'].shape[0]) < data.count
    total, count = token_loss(logits, x['input_ids'], x['loss_mask'], rows)
    return {'loss': total, 'tokens': count}

  def personalize_from_global(state: ServerState, data: ClientData, *,
                              mapping: mapping_lib.ClientMapping | None = None) -> ServerState:
    """FedDPA-F: every client's local LoRA := the final global LoRA fine-tuned alone on its data.

    ``mapping`` maps the clients as in the round (default all at once; ``sequential_clients()`` bounds memory to
    one client; same result).
    """
    rows = num_rows or jax.tree.leaves(data.x)[0].shape[0]
    update = phase('global', rows)
    num_clients = int(data.count.shape[0])
    keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(state.key, 0xF), k))(jnp.arange(num_clients))
    mapping = mapping_lib.resolve(mapping)
    run = lambda frozen, g, local, d, ks: mapping.map(update, (frozen, g), (local, d, ks))[0].params['adapters']
    tuned = (jax.jit(run) if mapping.compiled else run)(state.frozen, state.global_params, state.clients['local'],
                                                         data, keys)
    # The fine-tuned copy lives in the local slot; its structure mirrors the global adapters.
    return state._replace(clients=dict(state.clients, local=_global_to_local(tuned)))

  algorithm = Algorithm(init_params, client_update, Aggregator(base_agg.init, aggregate), evaluate, model=mdef,
                        spec=spec, name=variant)
  return FedDPA(algorithm, mdef, variant, personalize_from_global)


def _global_to_local(tree):
  """Renames ``global_*`` adaptor leaves to ``local_*`` (same shapes: both groups hold one adaptor)."""
  if isinstance(tree, dict):
    return {(('local_' + k[len('global_'):]) if isinstance(k, str) and k.startswith('global_') else k):
            _global_to_local(v) for k, v in tree.items()}
  return tree


@dataclasses.dataclass(frozen=True)
class FedDPA:
  """FedDPA (or a baseline) = the round-runner :class:`Algorithm` plus what evaluation needs.

  Attributes:
    algorithm: run it with ``make_round``.
    mdef: the adapted model's :class:`ModelDef` (``mdef.bind(parts, global_weight=w[B], local_weight=...)``).
    variant: one of ``VARIANTS``.
    personalize_from_global: ``(state, data, backend='vmap') -> state`` for FedDPA-F.
  """
  algorithm: Algorithm
  mdef: ModelDef
  variant: str
  personalize_from_global: Callable[[ServerState, ClientData], ServerState]

  def client_parts(self, state: ServerState, k: int) -> dict:
    """Model parts of client ``k``: frozen base, global adapters and the client's local adapters."""
    return {**state.frozen, **state.global_params, 'local': jax.tree.map(lambda x: x[k], state.clients['local'])}


# ------------------------------------------------------------------------------------------------------------------
# Instance-wise dynamic weighting (test time)
# ------------------------------------------------------------------------------------------------------------------

ADAPTER_WEIGHTS = {'local': (0.0, 1.0), 'global': (1.0, 0.0), 'both': (1.0, 1.0)}


def prompt_embeddings(mdef: ModelDef, parts: dict, input_ids: jax.Array, attention_mask: jax.Array, *,
                      adapter: str = 'local', pooling: str = 'last', model_kwargs: dict | None = None) -> jax.Array:
  """Prompt representations ``[B, D]`` from the final (normed) hidden state.

  Args:
    mdef, parts: the adapted model and one client's parts.
    input_ids, attention_mask: LEFT-padded prompts ``[B, T]`` (so position ``T - 1`` is the last prompt token).
    adapter: which adapter produces the embeddings: ``'local'`` (public code), ``'global'`` or ``'both'``.
    pooling: ``'last'`` (public code's default) or ``'avg'`` (mean over real tokens).
  """
  if adapter not in ADAPTER_WEIGHTS:
    raise ValueError(f'adapter must be one of {sorted(ADAPTER_WEIGHTS)}; got {adapter!r}.')
  gw, lw = ADAPTER_WEIGHTS[adapter]
  model = mdef.bind(parts, global_weight=gw, local_weight=lw)
  _, hidden = model(input_ids, attention_mask, return_hidden=True, **(model_kwargs or {}))
  if pooling == 'last':
    return hidden[:, -1]
  if pooling == 'avg':
    m = attention_mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
  raise ValueError(f"pooling must be 'last' or 'avg'; got {pooling!r}.")


def instance_weights(test_emb: jax.Array, ref_emb: jax.Array, *, lam: float = 0.5,
                     clamp: tuple[float, float] | None = None) -> jax.Array:
  """FedDPA's instance-wise weight ``w = lam * mean_s cos(e(x_t), e(x_s))``.

  Args:
    test_emb: ``[T, D]`` test-prompt embeddings.
    ref_emb: ``[T, S, D]`` embeddings of each test prompt's S local reference prompts.
    lam: lambda (0.5 in the paper / ``max_weight``).
    clamp: optional ``(lo, hi)`` bounds (the public code has none, so a negative cosine gives a negative weight).

  Returns:
    ``[T]`` weights.
  """
  if ref_emb.ndim != 3 or ref_emb.shape[0] != test_emb.shape[0]:
    raise ValueError(f'reference embeddings must be [T, S, D] with T={test_emb.shape[0]}; got {ref_emb.shape}.')
  t = test_emb / jnp.maximum(jnp.linalg.norm(test_emb, axis=-1, keepdims=True), 1e-12)
  r = ref_emb / jnp.maximum(jnp.linalg.norm(ref_emb, axis=-1, keepdims=True), 1e-12)
  w = lam * jnp.mean(jnp.einsum('td,tsd->ts', t, r), axis=-1)
  return w if clamp is None else jnp.clip(w, clamp[0], clamp[1])


def mixing_weights(w: jax.Array, *, target: str = 'global') -> tuple[jax.Array, jax.Array]:
  """Per-example ``(global_weight, local_weight)`` from instance weights ``w: [B]``.

  ``target='global'`` (public code): ``y = W0 x + s (w dG + (1 - w) dL)``; ``'local'``: ``(1 - w) dG + w dL``.
  """
  if target == 'global':
    return w, 1.0 - w
  if target == 'local':
    return 1.0 - w, w
  raise ValueError(f"weight target must be 'global' or 'local'; got {target!r}.")

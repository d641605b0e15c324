"""FedDPA (Yang et al., NeurIPS 2024; arXiv 2403.19211): dual adapters with instance-wise weighting, for any NNX model.

Every adapted layer holds a global LoRA (averaged by the server) and a local LoRA (never leaves the client), mixed per
call as ``y = W0 x + s (w_g dG(x) + w_l dL(x))``; ``w_g, w_l`` may differ per example. The paper's setting is a
frozen causal LM with adapters on ``q_proj`` and ``v_proj`` (r = 8, alpha = 16, dropout 0.05); any NNX model works
with its own ``forward``, ``loss`` and ``embed`` callables.

Variants (``variant=``) differ only in their row of one weight table, :func:`variant_weights`, which says which
adapter weights every use of the model gets: the local training phase, the global training phase, FedDPA-F's
personalization, evaluation / prediction / decoding, and the embeddings behind the instance-wise weights.

* ``'fedit'``: FedAvg over the global LoRA (FedIT / Shepherd); the local LoRA is unused.
* ``'local'``: each client trains only its local LoRA; nothing is aggregated.
* ``'feddpa_t'``: each round a client first trains its local LoRA mixed with the frozen global one at weight ``a``
  (``w_l = a, w_g = 1 - a``; from its second participation on, as the public code starts it in round 1), then
  trains the global LoRA alone; only the global LoRA is averaged.
* ``'feddpa_f'``: FedIT training; then :func:`personalize` gives each client a local LoRA: the final global LoRA
  fine-tuned alone on the client's data (one extra FedIT phase, the author's recipe).
* Centralized LoRA is ``'fedit'`` on one client holding the pooled data.

At prediction time the FedDPA variants weigh each example ``x`` by its similarity to the client's own training data:
``w = lambda * mean_s cos(e(x), e(x_s))`` over S reference examples ``x_s``, with ``e`` the ``embed`` callable on
the model at the table's embedding weights (the local adapter alone, as the public code); ``w`` goes to the global
adapter and ``1 - w`` to the local one (``weight_target='global'``, the public code) or the reverse.

Client optimizer: AdamW (weight decay 0) with a linear decay to 0 within each phase, gradient clipping at 1.0, state
reset every phase (the public code builds a new HF Trainer per phase); uniform FedAvg of A and B separately.

Example::

  alg = feddpa(model_fn, variant='feddpa_t', spec=lm_spec(), lr=3e-4, batch_size=8, num_epochs=10)
  state = alg.init(jax.random.key(0), num_clients)
  round_fn = fa.make_round(alg, clients_per_round=num_clients)
  for _ in range(20):
    state, metrics = round_fn(state, train_data)
  state = personalize(alg, state, train_data)          # FedDPA-F only; the identity for the other variants
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_adapters.algorithms import model_based as mb
from fedjax_adapters.algorithms.common import LossInputs, batch_metrics, task_loss
from fedjax_adapters.algorithms.lora_fedavg import uniform_weights
from fedjax_adapters.federated import evaluation, mapping as mapping_lib
from fedjax_adapters.federated.aggregators import Aggregator, mean_aggregator, weighted_mean
from fedjax_adapters.federated.algorithm import Algorithm, ServerState
from fedjax_adapters.federated.client_update import (Batch, ClientData, ClientOutput, check_micro_batch,
                                                     make_client_update, rows_weight)
from fedjax_adapters.nn.adapt import AdapterSpec, ModelDef

VARIANTS = ('fedit', 'local', 'feddpa_t', 'feddpa_f')
LOSSES = ('token', 'xent', 'mse')
WEIGHT_TARGETS = ('global', 'local')


# ----------------------------------------------------------------------------------------------------------------------
# The weight table
# ----------------------------------------------------------------------------------------------------------------------

class Weights(NamedTuple):
  """Adapter weights of one use of the model: ``y = W0 x + s (global_weight dG(x) + local_weight dL(x))``."""
  global_weight: float
  local_weight: float


GLOBAL, LOCAL, BOTH = Weights(1.0, 0.0), Weights(0.0, 1.0), Weights(1.0, 1.0)
EMBED_ADAPTERS = {'local': LOCAL, 'global': GLOBAL, 'both': BOTH}
INSTANCE = 'instance'  # the per-example weights of FedDPA's instance-wise weighting


class VariantWeights(NamedTuple):
  """A variant's row of the weight table.

  Attributes:
    local_phase: weights while the local adapter trains in a round (None: no local phase).
    local_start: the client's participation from which the local phase runs (0: from the first).
    global_phase: weights while the global adapter trains in a round (None: no global phase).
    personalize: weights of the phase after training that turns a copy of the global adapter into the local one
      (None: no such phase).
    predict: weights of evaluation, prediction and decoding: fixed :class:`Weights` or :data:`INSTANCE`.
    embed: weights of the model that embeds examples for :data:`INSTANCE` weighting (None when unused).
  """
  local_phase: Weights | None
  local_start: int
  global_phase: Weights | None
  personalize: Weights | None
  predict: Weights | str
  embed: Weights | None


def variant_weights(variant: str, *, mix_weight: float = 0.5, embed_adapter: str = 'local') -> VariantWeights:
  """The weight table: every variant's adapter weights for each training phase, prediction and embedding.

  Args:
    variant: one of :data:`VARIANTS`.
    mix_weight: FedDPA-T's ``a``, the local adapter's weight while it trains beside the frozen global one.
    embed_adapter: which adapters embed examples for the instance-wise weights: ``'local'`` (public code),
      ``'global'`` or ``'both'``.
  """
  if variant not in VARIANTS:
    raise ValueError(f'unknown FedDPA variant {variant!r}; choose one of {VARIANTS}.')
  if embed_adapter not in EMBED_ADAPTERS:
    raise ValueError(f'embed_adapter must be one of {tuple(EMBED_ADAPTERS)}; got {embed_adapter!r}.')
  embed = EMBED_ADAPTERS[embed_adapter]
  table = {
      'fedit': VariantWeights(None, 0, GLOBAL, None, GLOBAL, None),
      'local': VariantWeights(LOCAL, 0, None, None, LOCAL, None),
      'feddpa_t': VariantWeights(Weights(1.0 - mix_weight, mix_weight), 1, GLOBAL, None, INSTANCE, embed),
      'feddpa_f': VariantWeights(None, 0, GLOBAL, GLOBAL, INSTANCE, embed),
  }
  return table[variant]


# ----------------------------------------------------------------------------------------------------------------------
# Causal-LM defaults: forward, loss, embedding
# ----------------------------------------------------------------------------------------------------------------------

def lm_forward(model, x: dict) -> jax.Array:
  """A causal LM's logits ``[B, T, V]`` on ``x = {'input_ids', 'attention_mask', ...}``."""
  return model(x['input_ids'], x['attention_mask'])


def lm_embed(model, x: dict) -> jax.Array:
  """Prompt representations ``[B, D]``: the final normed hidden state at the last position (LEFT-padded prompts)."""
  _, hidden = model(x['input_ids'], x['attention_mask'], return_hidden=True)
  return hidden[:, -1]


def token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, row_mask: jax.Array):
  """Sum and count of next-token cross-entropy on the tokens ``loss_mask`` marks (response tokens + EOS).

  ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; ``loss_mask[:, t + 1]`` says whether that target counts.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], input_ids[:, 1:])
  m = loss_mask[:, 1:].astype(jnp.float32) * row_mask[:, None].astype(jnp.float32)
  return jnp.sum(ce * m), jnp.sum(m)


def token_weight(metrics: dict, mask: jax.Array) -> jax.Array:
  """A micro-batch's weight under the ``'token'`` loss: its response tokens (the loss is a mean over them)."""
  del mask
  return metrics['tokens']


def lm_loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
  """The built-in ``'token'`` loss: mean cross-entropy over response tokens; metrics ``loss`` / ``tokens`` sums."""
  x = inputs.batch.x
  total, count = token_loss(inputs.outputs, x['input_ids'], x['loss_mask'], inputs.batch.mask)
  return total / jnp.maximum(count, 1.0), {'loss': total, 'tokens': count}


def resolve_loss(loss: str | Callable) -> Callable[[LossInputs], tuple[jax.Array, dict]]:
  """``loss(inputs: LossInputs) -> (value, metric sums)`` from a built-in name or a user callable."""
  if loss == 'token':
    return lm_loss
  if loss in ('xent', 'mse'):
    return lambda i: (task_loss(loss, i), batch_metrics(loss, i.outputs, i.batch.y, i.batch.mask))
  if isinstance(loss, str) or not callable(loss):
    raise ValueError(f'loss must be one of {LOSSES} or a callable loss(inputs: LossInputs); got {loss!r}.')

  def custom(inputs):
    value = loss(inputs)
    if isinstance(value, tuple):
      return value
    count = jnp.sum(inputs.batch.mask.astype(jnp.float32))
    return value, {'loss': value * count, 'count': count}
  return custom


def phase_optimizer(lr: float, steps: int, *, weight_decay: float = 0.0, clip: float | None = 1.0,
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


# ----------------------------------------------------------------------------------------------------------------------
# Phases: one named function each
# ----------------------------------------------------------------------------------------------------------------------

def bind(mdef: ModelDef, frozen, global_params, local, weights, dropout_key=None):
  """The live model of one client with adapter ``weights`` (a :class:`Weights` or per-example ``(gw [B], lw [B])``)."""
  gw, lw = weights
  return mdef.bind({**frozen, **global_params, 'local': local}, global_weight=gw, local_weight=lw,
                   dropout_key=dropout_key)


def phase_loss(mdef: ModelDef, forward: Callable, loss: Callable, weights: Weights):
  """The client-update loss of one phase: the model at ``weights``, dropout on, ``loss`` on its outputs."""
  def loss_fn(trainable, frozen, batch: Batch, key, anchor, client=None):
    def run(params, x, k):
      g, l = params
      return forward(bind(mdef, frozen, g, l, weights, dropout_key=k), x)

    outputs = run(trainable, batch.x, key)
    again = lambda params, x: run(params, x, jax.random.fold_in(key, 1))
    value, metrics = loss(LossInputs(outputs, batch, trainable, frozen, key, anchor, again, client))
    return value, (metrics, {})
  return loss_fn


def phase_update(loss_fn: Callable, optimizer: Callable[[int], optax.GradientTransformation], *, train: str,
                 batch_size: int, num_epochs: int, num_rows: int | None = None, micro_batch: int | None = None,
                 micro_weight: Callable = rows_weight) -> Callable:
  """One training phase of one client: ``(frozen, global_params, local, data, key, client=None) -> (ClientOutput,
  local, metrics)``, training the ``train`` half (``'global'`` or ``'client'``) with a fresh optimizer of
  ``optimizer(steps)``; ``steps`` counts this phase's batches over the client's padded rows (or ``num_rows``).
  ``micro_batch`` / ``micro_weight``: gradient accumulation (``federated.make_client_update``)."""
  def update(frozen, global_params, local, data: ClientData, key, client=None):
    rows = num_rows or jax.tree.leaves(data.x)[0].shape[0]
    opt = optimizer(num_epochs * math.ceil(rows / batch_size))
    run = make_client_update(loss_fn, opt, batch_size=batch_size, num_epochs=num_epochs, shuffle=True, train=train,
                             micro_batch=micro_batch, micro_weight=micro_weight)
    return run(frozen, global_params, local, data, key, client)
  return update


def dual_client_update(local_phase: Callable | None, global_phase: Callable | None, local_start: int) -> Callable:
  """A FedDPA round of one client: the local phase (from participation ``local_start`` on), then the global one.

  The client state is ``{'local': local adapters, 'seen': participations so far}``; without a global phase the
  client sends back the global params unchanged.
  """
  def client_update(frozen, global_params, client_state, data: ClientData, key, client=None):
    local, seen = client_state['local'], client_state['seen']
    metrics = {}
    if local_phase is not None:
      _, trained, m = local_phase(frozen, global_params, local, data, jax.random.fold_in(key, 1), client)
      local = jax.tree.map(lambda n, o: jnp.where(seen >= local_start, n, o), trained, local)
      metrics.update({f'local_{k}': v for k, v in m.items()})
    if global_phase is None:
      out = ClientOutput(global_params, data.count, ())
    else:
      out, _, m = global_phase(frozen, global_params, local, data, jax.random.fold_in(key, 2), client)
      metrics.update({f'global_{k}': v for k, v in m.items()})
    return out, {'local': local, 'seen': seen + 1}, metrics
  return client_update


def global_to_local(tree):
  """Renames ``global_*`` adaptor leaves to ``local_*`` (same shapes: both groups hold one adaptor)."""
  if isinstance(tree, dict):
    return {(('local_' + k[len('global_'):]) if isinstance(k, str) and k.startswith('global_') else k):
            global_to_local(v) for k, v in tree.items()}
  return tree


def personalize_update(phase: Callable) -> Callable:
  """FedDPA-F's last step on one client: ``(frozen, global_params, client_state, (data, key)) -> client_state`` whose
  local adapter is the global one fine-tuned by ``phase`` on the client's data."""
  def update(frozen, global_params, client_state, per_client):
    data, key = per_client
    out, _, _ = phase(frozen, global_params, client_state['local'], data, key)
    return dict(client_state, local=global_to_local(out.params['adapters']))
  return update


# ----------------------------------------------------------------------------------------------------------------------
# Instance-wise weights
# ----------------------------------------------------------------------------------------------------------------------

def instance_weights(test_emb: jax.Array, ref_emb: jax.Array, *, lam: float = 0.5,
                     clamp: tuple[float, float] | None = None) -> jax.Array:
  """FedDPA's instance-wise weight ``w = lam * mean_s cos(e(x_t), e(x_s))``.

  Args:
    test_emb: ``[T, D]`` embeddings of the examples to predict.
    ref_emb: ``[T, S, D]`` embeddings of each example's S local references.
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


class WithReferences(NamedTuple):
  """Inputs of one client's instance-weighted predictions.

  Attributes:
    inputs: ``[N, ...]`` the examples to predict (the model's input pytree).
    references: ``[R, ...]`` reference examples from the client's training data (same structure).
    ref_idx: ``[N, S]`` int, the references each example is compared with
      (``fedjax_adapters.data.feddpa.sample_references``).
  """
  inputs: Any
  references: Any
  ref_idx: jax.Array


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class FedDPA(Algorithm):
  """A FedDPA variant (or baseline) as an :class:`Algorithm`, plus what its predictions need.

  Attributes (besides :class:`Algorithm`'s):
    variant: the variant's name (one of :data:`VARIANTS`).
    weights: its row of the weight table (:func:`variant_weights`).
    forward: ``forward(model, x) -> outputs``.
    embed: ``embed(model, x) -> [B, D]``, the representations behind the instance-wise weights.
    lam: lambda of the instance-wise weights.
    weight_target: the adapter the instance-wise weight scales (``'global'``: the public code).
    personalize_phase: FedDPA-F's fine-tune of one client (see :func:`personalize`), or None.
  """
  variant: str = 'feddpa_t'
  weights: VariantWeights | None = None
  forward: Callable | None = None
  embed: Callable | None = None
  lam: float = 0.5
  weight_target: str = 'global'
  personalize_phase: Callable | None = None

  @property
  def mdef(self) -> ModelDef:
    """The adapted model's definition (the same as :attr:`model`)."""
    return self.model


def keep_global() -> Aggregator:
  """An aggregator that leaves the global params as they are (the Local baseline federates nothing)."""
  return Aggregator(lambda global_params: (), lambda global_params, outs, weights, state, info=None: (global_params,
                                                                                                      state))


def feddpa(model_fn: mb.ModelFn, *, variant: str = 'feddpa_t', spec: AdapterSpec | None = None,
           loss: str | Callable = 'token', forward: Callable = lm_forward, embed: Callable = lm_embed,
           lr: float = 3e-4, client_optimizer: optax.GradientTransformation | None = None, batch_size: int = 8,
           num_epochs: int = 10, num_rows: int | None = None, mix_weight: float = 0.5, lam: float = 0.5,
           weight_target: str = 'global', embed_adapter: str = 'local', weight_decay: float = 0.0,
           clip: float | None = 1.0, schedule: str = 'linear', uniform_aggregation: bool = True,
           server_optimizer: optax.GradientTransformation | None = None, eval_batch_size: int = 16,
           reducer=None, micro_batch: int | None = None) -> FedDPA:
  """Builds FedDPA (or a baseline) for any NNX model; the defaults are the paper's causal-LM setting.

  Args:
    model_fn: ``rngs -> nnx.Module`` (a pretrained model: return it, ignoring ``rngs``).
    variant: one of :data:`VARIANTS`.
    spec: adapter spec with one global and one local adaptor per layer (default :func:`lm_spec`).
    loss: ``'token'`` (response-token cross-entropy of a causal LM), ``'xent'``, ``'mse'``, or a callable
      ``loss(inputs: LossInputs) -> value | (value, metric sums)`` (it sees the round's anchor parameters).
    forward: ``forward(model, x) -> outputs`` (default :func:`lm_forward`).
    embed: ``embed(model, x) -> [B, D]`` for the instance-wise weights (default :func:`lm_embed`).
    lr: AdamW peak learning rate of the built-in client optimizer (linear decay to 0 within each phase).
    client_optimizer: an optax transformation instead (re-initialized every phase).
    batch_size: examples per optimizer step (the paper: 64).
    num_epochs: local epochs per phase (the paper: 10).
    num_rows: rows per client for the length of the learning-rate schedule (default: the data's padded rows).
    mix_weight: FedDPA-T's ``a`` (local weight while training the local LoRA; paper 0.5, ablated 0.3/0.7).
    lam, weight_target, embed_adapter: the instance-wise weights (module docstring).
    weight_decay, clip, schedule: switches of the built-in optimizer (0, 1.0, linear as in the paper).
    uniform_aggregation: average clients uniformly (public code) instead of by example count.
    reducer: a robust :data:`~fedjax_adapters.federated.Reducer` in place of the (weighted) mean of the global
      adapters (``federated.robust``; docs/robustness.md).
    server_optimizer: on the pseudo-gradient (default SGD lr 1 = plain averaging).
    eval_batch_size: rows per evaluation / prediction step.
    micro_batch: rows per micro-batch of a training step (gradient accumulation: activation memory scales with it,
      not with ``batch_size``; None: the whole batch at once); must divide ``batch_size``. With the ``'token'`` loss
      each micro-batch's gradient is weighted by its response tokens, so a step equals the full batch's.
  """
  check_micro_batch(micro_batch, batch_size)
  weights = variant_weights(variant, mix_weight=mix_weight, embed_adapter=embed_adapter)
  if weight_target not in WEIGHT_TARGETS:
    raise ValueError(f'weight_target must be one of {WEIGHT_TARGETS}; got {weight_target!r}.')
  spec = spec or lm_spec()
  if spec.num_global != 1 or spec.num_local != 1 or spec.router:
    raise ValueError(f'FedDPA needs one global and one local adaptor per layer and no router; got '
                     f'num_global={spec.num_global}, num_local={spec.num_local}, router={spec.router}.')
  mdef, _ = mb.build(model_fn, jax.random.key(0), spec)
  loss_fn = resolve_loss(loss)
  micro_weight = token_weight if loss == 'token' else rows_weight
  if client_optimizer is None and not (lr is not None and float(lr) > 0 and math.isfinite(lr)):
    raise ValueError(f'the client learning rate lr must be finite and > 0 (or pass client_optimizer=); got {lr}.')

  def make_opt(steps):
    if client_optimizer is not None:
      return client_optimizer
    return phase_optimizer(lr, steps, weight_decay=weight_decay, clip=clip, schedule=schedule)

  def phase(w, train):
    return None if w is None else phase_update(phase_loss(mdef, forward, loss_fn, w), make_opt, train=train,
                                               batch_size=batch_size, num_epochs=num_epochs, num_rows=num_rows,
                                               micro_batch=micro_batch, micro_weight=micro_weight)

  def init_params(key, num_clients):
    _, parts = mb.build(model_fn, key, spec)
    clients = {'local': mb.broadcast_clients(parts['local'], num_clients),
               'seen': jnp.zeros((num_clients,), jnp.int32)}
    return {'base': parts['base']}, {'adapters': parts['adapters']}, clients

  mean = mean_aggregator(server_optimizer, reducer=reducer or weighted_mean)
  aggregator = keep_global() if weights.global_phase is None else (uniform_weights(mean) if uniform_aggregation
                                                                     else mean)
  client_update = dual_client_update(phase(weights.local_phase, 'client'), phase(weights.global_phase, 'global'),
                                     weights.local_start)
  personalize_phase = None if weights.personalize is None else personalize_update(phase(weights.personalize,
                                                                                         'global'))
  alg = FedDPA(init_params, client_update, aggregator, None, model=mdef, spec=spec, name=variant, variant=variant,
               weights=weights, forward=forward, embed=embed, lam=lam, weight_target=weight_target,
               personalize_phase=personalize_phase)
  return alg.replace(evaluate=make_evaluate(alg, loss_fn, eval_batch_size), predict=make_predict(alg, eval_batch_size))


# ----------------------------------------------------------------------------------------------------------------------
# Predictions, evaluation, personalization
# ----------------------------------------------------------------------------------------------------------------------

def client_parts(state: ServerState, k: int) -> dict:
  """Model parts of client ``k``: frozen base, global adapters and the client's local adapters."""
  return {**state.frozen, **state.global_params, 'local': jax.tree.map(lambda x: x[k], state.clients['local'])}


def embed_examples(alg: FedDPA, frozen, global_params, local, x) -> jax.Array:
  """``[B, D]`` representations of ``x`` for the instance-wise weights (the model at the table's embed weights)."""
  if alg.weights.embed is None:
    raise ValueError(f'variant {alg.variant!r} uses no instance-wise weights, so it embeds nothing.')
  return alg.embed(bind(alg.model, frozen, global_params, local, alg.weights.embed), x)


def prediction_weights(alg: FedDPA, frozen, global_params, local, x, ref_emb: jax.Array | None = None):
  """Per-example adapter weights ``(gw [B], lw [B])`` of ``alg``'s predictions on ``x`` (its table row's
  ``predict`` entry); the instance-wise weights need ``ref_emb: [B, S, D]``, each example's reference embeddings."""
  b = jax.tree.leaves(x)[0].shape[0]
  p = alg.weights.predict
  if p != INSTANCE:
    return jnp.full((b,), p.global_weight, jnp.float32), jnp.full((b,), p.local_weight, jnp.float32)
  if ref_emb is None:
    raise ValueError(f'variant {alg.variant!r} weighs every example by its similarity to the client\'s references; '
                     f'pass the reference embeddings (inputs as WithReferences).')
  w = instance_weights(embed_examples(alg, frozen, global_params, local, x), ref_emb, lam=alg.lam)
  return mixing_weights(w, target=alg.weight_target)


def in_batches(fn: Callable, x: Any, batch_size: int) -> Any:
  """``fn(rows [b], x[rows])`` over the rows of ``x`` (``[N, ...]``) in one compiled loop; outputs
  ``[ceil(N / b), b, ...]`` (the last batch repeats row ``N - 1``; its ``rows`` say which are real)."""
  n = jax.tree.leaves(x)[0].shape[0]
  bs = min(batch_size, n)
  rows = jnp.arange(math.ceil(n / bs) * bs).reshape(-1, bs)
  return jax.lax.map(lambda r: fn(r, jax.tree.map(lambda a: a[jnp.minimum(r, n - 1)], x)), rows)


def reference_lookup(alg: FedDPA, frozen, global_params, local, x, batch_size: int):
  """``(inputs, rows -> [b, S, D] reference embeddings or None)`` for inputs given plain or as WithReferences."""
  if not isinstance(x, WithReferences):
    if alg.weights.predict == INSTANCE:
      raise ValueError(f'variant {alg.variant!r} predicts with instance-wise weights: pass WithReferences(inputs, '
                       f'references, ref_idx).')
    return x, None
  if alg.weights.predict != INSTANCE:
    return x.inputs, None
  emb = in_batches(lambda r, xb: embed_examples(alg, frozen, global_params, local, xb), x.references, batch_size)
  emb = emb.reshape((-1, emb.shape[-1]))
  n = x.ref_idx.shape[0]
  return x.inputs, lambda rows: emb[x.ref_idx[jnp.minimum(rows, n - 1)]]


def make_predict(alg: FedDPA, batch_size: int) -> Callable:
  """``predict(frozen, global_params, client_state, x) -> [N, ...]`` outputs with the client's weighted model."""
  def predict(frozen, global_params, client_state, x):
    local = client_state['local']
    inputs, refs = reference_lookup(alg, frozen, global_params, local, x, batch_size)

    def one(rows, xb):
      w = prediction_weights(alg, frozen, global_params, local, xb, None if refs is None else refs(rows))
      return alg.forward(bind(alg.model, frozen, global_params, local, w), xb)

    n = jax.tree.leaves(inputs)[0].shape[0]
    out = in_batches(one, inputs, batch_size)
    return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:])[:n], out)
  return predict


def make_evaluate(alg: FedDPA, loss: Callable, batch_size: int) -> Callable:
  """``evaluate(frozen, global_params, client_state, data) -> metric sums`` of ``loss`` with the client's
  weighted model (``data.x`` plain or :class:`WithReferences`; dropout off)."""
  def evaluate(frozen, global_params, client_state, data: ClientData):
    local = client_state['local']
    inputs, refs = reference_lookup(alg, frozen, global_params, local, data.x, batch_size)
    params = (global_params, local)

    def one(rows, xy):
      xb, yb = xy
      w = prediction_weights(alg, frozen, global_params, local, xb, None if refs is None else refs(rows))
      run = lambda p, xx: alg.forward(bind(alg.model, frozen, p[0], p[1], w), xx)
      key = jax.random.key(0)
      _, metrics = loss(LossInputs(run(params, xb), Batch(xb, yb, rows < data.count), params, frozen, key, params,
                                   run))
      return metrics

    return jax.tree.map(lambda m: jnp.sum(m, 0), in_batches(one, (inputs, data.y), batch_size))
  return evaluate


def personalize(alg: FedDPA, state: ServerState, data: ClientData, *,
                mapping: mapping_lib.ClientMapping | None = None) -> ServerState:
  """FedDPA-F's last step: every client's local LoRA := the final global LoRA fine-tuned alone on its ``data``.

  The identity for the other variants. ``mapping`` maps the clients as in the round (default all at once;
  ``sequential_clients()`` bounds memory to one client; same result). Client ``k`` fine-tunes with the key
  ``fold_in(fold_in(state.key, 0xF), k)``.
  """
  if not isinstance(data, ClientData):
    raise TypeError(f'personalize needs the clients\' training data as a ClientData (fa.client_data(data.train)); '
                    f'got {type(data).__name__}.')
  if alg.personalize_phase is None:
    return state
  k = int(data.count.shape[0])
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(state.key, 0xF), i))(jnp.arange(k))
  run = evaluation.mapped_function(alg.personalize_phase, mapping_lib.resolve(mapping))
  return state._replace(clients=run(state.frozen, state.global_params, state.clients, (data, keys)))


def prompt_embeddings(mdef: ModelDef, parts: dict, input_ids: jax.Array, attention_mask: jax.Array, *,
                      adapter: str = 'local', pooling: str = 'last') -> jax.Array:
  """A causal LM's prompt representations ``[B, D]`` from the final (normed) hidden state.

  Args:
    mdef, parts: the adapted model and one client's parts (:func:`client_parts`).
    input_ids, attention_mask: LEFT-padded prompts ``[B, T]`` (so position ``T - 1`` is the last prompt token).
    adapter: which adapters produce the embeddings: ``'local'`` (public code), ``'global'`` or ``'both'``.
    pooling: ``'last'`` (public code's default) or ``'avg'`` (mean over real tokens).
  """
  if adapter not in EMBED_ADAPTERS:
    raise ValueError(f'adapter must be one of {sorted(EMBED_ADAPTERS)}; got {adapter!r}.')
  gw, lw = EMBED_ADAPTERS[adapter]
  _, hidden = mdef.bind(parts, global_weight=gw, local_weight=lw)(input_ids, attention_mask, return_hidden=True)
  if pooling == 'last':
    return hidden[:, -1]
  if pooling == 'avg':
    m = attention_mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
  raise ValueError(f"pooling must be 'last' or 'avg'; got {pooling!r}.")

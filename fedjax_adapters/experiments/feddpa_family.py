"""The personalized-LoRA family (docs/family.md) in the FedDPA runner: FedSA-LoRA, Ditto, FLoRA and HetLoRA on the
LLaMA decoder, with LoRA on the config's target projections.

The family's algorithms are built for any NNX model whose call maps a batch to outputs scored by a loss callable.
The decoder is handed to them as :class:`TokenLossView`: called on a training batch (``{'input_ids',
'attention_mask', 'loss_mask'}``) it returns each row's response-token cross-entropy sum and token count
``[B, 2]``, and :func:`token_loss` turns those into FedDPA's loss (the mean over the batch's response tokens, as
``algorithms.feddpa.lm_loss``). The view's ``lm`` is the decoder itself: :func:`client_model` binds one client's
personalized parts and returns it for decoding.

Settings: the config's rank, alpha, dropout (FedSA-LoRA and Ditto; FLoRA and HetLoRA train without LoRA dropout),
target, batch size, epochs, and FedDPA's client optimizer (AdamW at the config's lr with a linear decay to 0 over
the round's local steps, clipping at 1; re-initialized every round). FLoRA and HetLoRA give client ``k`` the rank
``floral_tasks.family_ranks(rank, K)`` (the FLoRAL runner's rule; the config's rank is the largest), HetLoRA with
``prune_gamma=0.5``, ``prune_lambda=0.01``; Ditto ``lam=1``; the FLoRAL runner's choices.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.algorithms import feddpa as F
from fedjax_adapters.algorithms.hetlora import rank_masks
from fedjax_adapters.algorithms import lora_parts as lp
from fedjax_adapters.algorithms.common import LossInputs
from fedjax_adapters.nn.adapt import AdapterSpec

FAMILY = ('fedsa_lora', 'ditto', 'flora', 'hetlora')
SHARED_MODEL = ('flora',)  # after a round FLoRA's LoRA is merged into the base and restarts at B = 0: one model
DITTO_LAM = 1.0
PRUNE_GAMMA, PRUNE_LAMBDA = 0.5, 0.01


class TokenLossView(nnx.Module):
  """The decoder as the family's algorithms call it: a training batch in, ``[B, 2]`` per-row (CE sum, tokens) out.

  ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; ``loss_mask[:, t + 1]`` says whether that target counts
  (``algorithms.feddpa.token_loss`` per row).
  """

  def __init__(self, lm: nnx.Module):
    self.lm = lm

  def __call__(self, x: dict) -> jax.Array:
    logits = self.lm(x['input_ids'], x['attention_mask'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), x['input_ids'][:, 1:])
    m = x['loss_mask'][:, 1:].astype(jnp.float32)
    return jnp.stack([jnp.sum(ce * m, -1), jnp.sum(m, -1)], -1)


def token_loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
  """Mean cross-entropy over the batch's real rows' response tokens, from :class:`TokenLossView`'s ``[B, 2]``."""
  m = inputs.batch.mask.astype(jnp.float32)
  total, count = jnp.sum(inputs.outputs[:, 0] * m), jnp.sum(inputs.outputs[:, 1] * m)
  return total / jnp.maximum(count, 1.0), {'tokens': count}


def targets(train) -> object:
  """``train`` (``client_training_arrays``) with ``y`` the ``[K, N, 2]`` zeros the view's outputs are checked
  against (the metrics of a loss callable; the targets are inside ``x``)."""
  return train._replace(y=np.zeros(np.shape(train.y) + (2,), np.float32))


def view_fn(base: nnx.Module):
  """``rngs -> TokenLossView(pretrained base)`` (the adapters are initialized by adapt() from the algorithm's key)."""
  graphdef, state = nnx.split(TokenLossView(base))

  def model_fn(rngs):
    del rngs
    return nnx.merge(graphdef, state)
  return model_fn


def spec_of(cfg) -> AdapterSpec:
  """One global LoRA per target projection at the config's rank, alpha and dropout (PEFT init: kaiming A, B = 0)."""
  return AdapterSpec(target=cfg.target, rank=cfg.rank, alpha=cfg.alpha, bias=False, conv=False, init='kaiming',
                     dropout=cfg.dropout)


def client_ranks(cfg, num_clients: int) -> list[int]:
  """FLoRA's / HetLoRA's ranks: the FLoRAL runner's rule with the config's rank the largest."""
  from fedjax_adapters.experiments.floral_tasks import family_ranks  # pylint: disable=g-import-not-at-top
  return family_ranks(cfg.rank, num_clients)


def build_family(method: str, cfg, base: nnx.Module, *, num_clients: int, rows: int):
  """The algorithm of family ``method`` on the pretrained decoder ``base`` (memory levers already applied).

  Args:
    method: one of :data:`FAMILY`.
    cfg: the FedDPA config.
    base: the pretrained ``Llama``.
    num_clients: K (FLoRA's and HetLoRA's per-client ranks).
    rows: the clients' padded training rows N (the length of the learning-rate decay, as FedDPA's phases).
  """
  if method not in FAMILY:
    raise ValueError(f'unknown family method {method!r}; valid: {", ".join(FAMILY)}.')
  steps = cfg.num_epochs * math.ceil(rows / cfg.batch_size)
  common = dict(loss=token_loss, eval_loss='mse', batch_size=cfg.batch_size, num_epochs=cfg.num_epochs,
                shuffle=True, client_optimizer=F.phase_optimizer(cfg.lr, steps))
  fn, spec = view_fn(base), spec_of(cfg)
  if method == 'fedsa_lora':
    return algorithms.fedsa_lora(fn, spec=spec, **common)
  if method == 'ditto':
    return algorithms.ditto(fn, spec=spec, lam=DITTO_LAM, **common)
  ranks = client_ranks(cfg, num_clients)
  if method == 'flora':
    return algorithms.flora(fn, spec=dataclasses.replace(spec, dropout=0.0), ranks=ranks, **common)
  return algorithms.hetlora(fn, spec=dataclasses.replace(spec, dropout=0.0), ranks=ranks, prune_gamma=PRUNE_GAMMA,
                            prune_lambda=PRUNE_LAMBDA, **common)


def client_parts(method: str, alg, state, k: int) -> dict:
  """Client ``k``'s personalized model as pure parts of ``alg.model`` (the view): FedSA-LoRA ``A`` + its ``B_k``,
  Ditto its ``v_k``, FLoRA the merged base (+ its rank-masked LoRA), HetLoRA the global LoRA cut to its rank."""
  g = state.global_params
  c = jax.tree.map(lambda a: a[k], state.clients)
  if method == 'fedsa_lora':
    return {**state.frozen, 'adapters': lp.merge_dicts(g['adapters'], c['adapters'])}
  if method == 'ditto':
    return {**state.frozen, 'adapters': c['adapters']}
  if method == 'flora':
    return {**g, 'adapters': lp.mask_factors(g['adapters'], c['rank_mask'], c['b_scale'])}
  if method == 'hetlora':
    active, _ = rank_masks(g['ranks'][k], alg.spec.rank, PRUNE_GAMMA)
    return {**state.frozen, 'adapters': lp.mask_factors(g['adapters'], active)}
  raise ValueError(f'unknown family method {method!r}; valid: {", ".join(FAMILY)}.')


def client_model(method: str, alg, state, k: int) -> nnx.Module:
  """Client ``k``'s live decoder (a ``Llama`` with its LoRA), for ``llama.greedy_decode`` / ``beam_search``."""
  return alg.model.bind(client_parts(method, alg, state, k)).lm


def without_view(parts: dict) -> dict:
  """Parts of the view with its ``lm`` level removed: the decoder's own paths (``model.layers.0...``)."""
  return {k: (v['lm'] if isinstance(v, dict) and 'lm' in v else v) for k, v in parts.items()}


def export_family(folder: str, method: str, alg, state, *, alpha: float, base_model_name_or_path: str,
                  tokenizer=None) -> dict:
  """Writes a trained family member under ``folder``: a PEFT LoRA per client for FedSA-LoRA (``A`` with its
  ``B_k``), Ditto (``v_k``) and HetLoRA (the global LoRA with components past ``r_k`` zeroed: the same function at
  rank R); FLoRA's result is not a LoRA but the merged model, written as a Hugging Face folder ``merged/``.

  Returns:
    The manifest (also written to ``folder/manifest.json``).
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.interop import peft  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.models.llama_loaders import llama_from_base_parts, save_hf_checkpoint  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  manifest = {'method': method, 'lora_alpha': alpha, 'base': base_model_name_or_path, 'clients': {}}
  if method in SHARED_MODEL:
    base = without_view(state.global_params)['base']
    save_hf_checkpoint(os.path.join(folder, 'merged'), llama_from_base_parts(alg.model.merge({}).lm.config, base),
                       tokenizer=tokenizer)
    manifest['merged'] = 'merged'
  else:
    k = int(jax.tree.leaves(state.clients)[0].shape[0])
    for c in range(k):
      parts = without_view(client_parts(method, alg, state, c))
      peft.export_global_adapter(os.path.join(folder, f'client_{c}'), parts, alpha=alpha, task_type='CAUSAL_LM',
                                 base_model_name_or_path=base_model_name_or_path)
      manifest['clients'][c] = f'client_{c}'
  with open(os.path.join(folder, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=2)
  return manifest

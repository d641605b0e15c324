"""The pieces of Gemma 2 and Gemma 3 (text) that the LLaMA-family decoder in :mod:`.llama` adds for them.

Gemma's decoder is LLaMA's with these differences, all of which :class:`~fedjax_adapters.models.llama.Llama` takes
from its config (``model_type`` ``'gemma2'`` or ``'gemma3_text'``):

* RMSNorm scales by ``1 + weight`` (:class:`GemmaRMSNorm`; the stored parameter is Hugging Face's ``weight``);
* four norms per layer: ``h = x + post_attention_layernorm(attn(input_layernorm(x)))``,
  ``out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``;
* a GeGLU MLP (``gelu`` with the tanh approximation, HF's ``gelu_pytorch_tanh``);
* attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and optionally soft-capped
  (``cap * tanh(score / cap)``), final logits optionally soft-capped the same way;
* the embedding output multiplied by ``sqrt(hidden_size)`` rounded to the model's dtype (after the embedding
  module, so an embedding LoRA's delta is scaled too, as PEFT scales it on Gemma 2 and Gemma 3);
* sliding-window and global layers alternating (``layer_types``); Gemma 3 adds RMSNorm on each q / k head, and a
  rope base of its own (``rope_local_base_freq``, never scaled) on the sliding layers.

This module holds the parts that do not need the decoder: the norm, the soft cap, and the translation of the
Hugging Face config fields.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

GEMMA_MODEL_TYPES = ('gemma2', 'gemma3_text')
HF_ARCHITECTURES = {'gemma2': 'Gemma2ForCausalLM', 'gemma3_text': 'Gemma3ForCausalLM'}
# Model types Hugging Face uses for Gemma checkpoints this decoder does not read, with the reason.
REFUSED = {
    'gemma': 'Gemma 1 (model_type=gemma) is not supported; Gemma 2 (gemma2) and Gemma 3 text (gemma3_text) are.',
    'gemma3': ('Gemma 3 multimodal (model_type=gemma3, Gemma3ForConditionalGeneration) is not supported: only its '
               'text decoder, Gemma3ForCausalLM (model_type=gemma3_text), is.'),
    'gemma3n': 'Gemma 3n (model_type=gemma3n) is not supported.',
}
# Hugging Face's defaults (Gemma2Config, Gemma3TextConfig) for the keys a config.json may omit.
_PATTERN_DEFAULT = {'gemma2': 2, 'gemma3_text': 6}
_SOFTCAP_DEFAULTS = {'gemma2': (50.0, 30.0), 'gemma3_text': (None, None)}


class GemmaRMSNorm(nnx.RMSNorm):
  """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + scale)``, computed in float32 (or x's wider dtype).

  A subclass of ``nnx.RMSNorm`` (so norm adaptors find it by type and see the same statistics); ``scale`` holds
  Hugging Face's ``weight``, the offset from 1, and starts at zero.
  """

  def __init__(self, num_features: int, **kwargs):
    super().__init__(num_features, scale_init=nnx.initializers.zeros_init(), **kwargs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    del mask
    wide = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(wide)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.epsilon)
    out = normed * (1.0 + self.scale[...].astype(wide))
    return out.astype(self.dtype or x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap * tanh(x / cap)`` (identity for ``cap=None``)."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def embed_scale(x: jax.Array, hidden_size: int) -> jax.Array:
  """The embedding output times ``sqrt(hidden_size)``, the factor rounded to x's dtype first, as transformers does."""
  return x * jnp.asarray(hidden_size ** 0.5, x.dtype)


def default_layer_types(model_type: str, num_layers: int, pattern: int | None = None) -> list[str]:
  """HF's default layer types: every ``pattern``-th layer global, the others sliding (Gemma 2: 2, Gemma 3: 6)."""
  pattern = _PATTERN_DEFAULT[model_type] if pattern is None else int(pattern)
  return ['sliding_attention' if (i + 1) % pattern else 'full_attention' for i in range(num_layers)]


def config_kwargs_from_hf(d: Mapping[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
  """The Gemma-specific :class:`~fedjax_adapters.models.llama.LlamaConfig` keyword arguments of a ``config.json``.

  Raises:
    ValueError: for bidirectional attention (EmbeddingGemma) or a config without a sliding window.
  """
  if d.get('use_bidirectional_attention'):
    raise ValueError('use_bidirectional_attention=True (EmbeddingGemma) is not supported; Gemma decoders are causal.')
  window = d.get('sliding_window', 4096)
  if window is None:
    raise ValueError(f'model_type={model_type} needs a sliding_window; got sliding_window=None.')
  attn_cap, final_cap = _SOFTCAP_DEFAULTS[model_type]
  types = d.get('layer_types') or default_layer_types(model_type, num_layers, d.get('sliding_window_pattern'))
  kw = dict(attention_bias=bool(d.get('attention_bias', False)),
            hidden_act=d.get('hidden_activation') or d.get('hidden_act') or 'gelu_pytorch_tanh',
            query_pre_attn_scalar=float(d.get('query_pre_attn_scalar', 256)),
            attn_logit_softcapping=_optional_float(d.get('attn_logit_softcapping', attn_cap)),
            final_logit_softcapping=_optional_float(d.get('final_logit_softcapping', final_cap)),
            sliding_window=int(window), layer_types=tuple(types),
            tie_word_embeddings=bool(d.get('tie_word_embeddings', True)))
  if model_type == 'gemma3_text':
    kw['rope_local_base_freq'] = float(d.get('rope_local_base_freq', 10000.0))
  return kw


def _optional_float(x):
  return None if x is None else float(x)


def config_to_hf(c) -> dict[str, Any]:
  """The Gemma-specific ``config.json`` fields of a LlamaConfig ``c`` (Gemma2Config / Gemma3TextConfig names)."""
  d = {'hidden_activation': c.hidden_act, 'query_pre_attn_scalar': c.query_pre_attn_scalar,
       'attn_logit_softcapping': c.attn_logit_softcapping, 'final_logit_softcapping': c.final_logit_softcapping,
       'sliding_window': c.sliding_window, 'layer_types': list(c.layer_types), 'attention_bias': c.attention_bias}
  if c.model_type == 'gemma3_text':
    d['rope_local_base_freq'] = c.rope_local_base_freq
  return d

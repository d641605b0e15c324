"""A LLaMA-architecture decoder in Flax NNX, with a pure KV cache and decoding.

FedDPA (Yang et al., NeurIPS 2024) fine-tunes a frozen LLaMA with LoRA adapters. This module provides that base model
with module paths that read like Hugging Face's (``model.layers.0.self_attn.q_proj``), so adapter targeting written
for PEFT-style names works unchanged, and so ``llama_loaders`` can map checkpoint names one to one.

Two design points matter to the rest of the library:

* The forward pass only *calls* its projection and embedding modules (``self.q_proj(x)``, ``embed_tokens(ids)``) and
  never reads their kernels, so adapter surgery can swap an ``nnx.Linear`` for a wrapper that is called the same way.
  The one exception is the tied output head, which needs the embedding table itself (it uses ``embed.attend`` when
  the module has it).
* The KV cache is a plain pytree (:class:`KVCache`) that is passed in and returned, never NNX state, so a decode step
  is a pure function: it can be jitted, scanned, and vmapped over clients.

Example:
  >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
  ...                      num_attention_heads=4, num_key_value_heads=2)
  >>> model = Llama(config, rngs=nnx.Rngs(0))
  >>> ids = jnp.array([[0, 0, 5, 7]]); mask = jnp.array([[0, 0, 1, 1]])  # left padded
  >>> model(ids, mask).shape
  (1, 4, 32)
  >>> greedy_decode(model, ids, mask, max_new_tokens=3, eos_id=1, pad_id=0).shape
  (1, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_adapters.models import gemma
from fedjax_adapters.models import rope_scaling

# A large negative number instead of -inf for masked attention scores: a row with every key masked (a padding query)
# then gets a uniform softmax instead of NaNs, and NaNs never leak into real rows through later layers.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


MODEL_TYPES = ('llama', 'qwen2', 'qwen3', 'mistral', 'phi3') + gemma.GEMMA_MODEL_TYPES
# Model types whose attention RMS-normalizes each query and key head (``q_norm``, ``k_norm``) before the rotation.
QK_NORM_MODEL_TYPES = ('qwen3', 'gemma3_text')
# Model types with fused projections: ``qkv_proj`` (rows q, k, v) and ``gate_up_proj`` (rows gate, up).
FUSED_MODEL_TYPES = ('phi3',)
# Model types that slide their window on every layer.
ALL_SLIDING_MODEL_TYPES = ('mistral', 'phi3')
ROPE_TYPES = ('linear', 'llama3', 'yarn', 'dynamic', 'longrope')
# MLP activations by their Hugging Face name (``hidden_act`` / ``hidden_activation``): SwiGLU and GeGLU (tanh gelu).
ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True)}
LAYER_TYPES = ('full_attention', 'sliding_attention')
_LLAMA3_KEYS = ('low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
_YARN_KEYS = ('original_max_position_embeddings', 'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim',
              'attention_factor', 'truncate')
_LONGROPE_KEYS = ('original_max_position_embeddings', 'short_factor', 'long_factor', 'attention_factor')
# The optional keys each rope type reads from ``rope_scaling`` (besides ``factor``).
_ROPE_KEYS = {'linear': (), 'dynamic': (), 'llama3': _LLAMA3_KEYS, 'yarn': _YARN_KEYS, 'longrope': _LONGROPE_KEYS}
_ALL_ROPE_KEYS = tuple(dict.fromkeys(_LLAMA3_KEYS + _YARN_KEYS + _LONGROPE_KEYS))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary-frequency scaling of a long-context checkpoint (Hugging Face's ``rope_scaling``).

  Attributes:
    rope_type: ``'linear'`` divides every frequency by ``factor`` (position interpolation); ``'llama3'`` is Llama
      3.1's rule: frequencies whose wavelength exceeds ``original_max_position_embeddings / low_freq_factor`` are
      divided by ``factor``, those shorter than ``original_max_position_embeddings / high_freq_factor`` are kept,
      and the ones between are interpolated smoothly.
    factor: the scaling factor (> 0).
    low_freq_factor: llama3 only.
    high_freq_factor: llama3 only (> low_freq_factor).
    original_max_position_embeddings: llama3 and yarn, the pretraining context length (yarn: None means the
      model's ``max_position_embeddings``, as transformers reads it).
    beta_fast, beta_slow: yarn only (defaults 32 and 1): dims turning more than ``beta_fast`` times over the
      original context keep their frequency, those under ``beta_slow`` turns are divided by ``factor``, a ramp between.
    mscale, mscale_all_dim, attention_factor: yarn only: the factor on the rotary cos / sin is ``attention_factor``,
      else ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set, else
      ``0.1 ln(factor) + 1``.
    truncate: yarn only (default True): round the ramp's ends to whole dims.
    short_factor, long_factor: longrope only (required, Dh/2 numbers each): per-frequency divisors, the long ones
      used when a forward call reaches beyond ``original_max_position_embeddings`` positions (required too), the
      short ones otherwise. Its attention factor (on cos / sin) is ``attention_factor``, else
      ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`` (1 for ``factor <= 1``).

  ``'longrope'`` is Phi-3's 128k-context rule (LongRoPE). ``'yarn'`` is YaRN (Qwen2.5 / Qwen3 long context);
  ``'dynamic'`` is dynamic NTK scaling: beyond ``max_position_embeddings`` positions the rope base grows with the
  largest position of the forward call.
  """
  rope_type: str
  factor: float
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None
  beta_fast: float | None = None
  beta_slow: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool | None = None
  short_factor: tuple[float, ...] | None = None
  long_factor: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'rope_scaling type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}.')
    if not self.factor > 0:
      raise ValueError(f'rope_scaling factor must be positive, got {self.factor!r}.')
    given = [getattr(self, k) is not None for k in _LLAMA3_KEYS]
    if self.rope_type == 'llama3':
      missing = [k for k, g in zip(_LLAMA3_KEYS, given) if not g]
      if missing:
        raise ValueError(f'llama3 rope_scaling lacks {missing}.')
      if not 0 < self.low_freq_factor < self.high_freq_factor:
        raise ValueError(f'llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor, got '
                         f'{self.low_freq_factor!r} and {self.high_freq_factor!r}.')
    if self.rope_type == 'longrope':
      _check_longrope(self)
    extra = [k for k in _ALL_ROPE_KEYS if getattr(self, k) is not None and k not in _ROPE_KEYS[self.rope_type]]
    if extra:
      raise ValueError(f'{self.rope_type} rope_scaling does not take {sorted(set(extra))}, got {self}.')

  @classmethod
  def from_hf(cls, d: Mapping[str, Any] | None) -> RopeScaling | None:
    """Parses a ``config.json`` ``rope_scaling`` entry (``None`` or type ``'default'``: no scaling)."""
    if d is None:
      return None
    if not isinstance(d, Mapping):
      raise ValueError(f'rope_scaling must be a dict or null, got {d!r}.')
    kind = d.get('rope_type', d.get('type'))
    if kind in (None, 'default'):
      return None
    if kind not in ROPE_TYPES:
      raise ValueError(f'rope_scaling={dict(d)!r} is not supported (types: {ROPE_TYPES}).')
    if 'factor' not in d:
      raise ValueError(f'rope_scaling={dict(d)!r} lacks a factor.')
    extra = {k: d.get(k) for k in _ROPE_KEYS[kind]}
    return cls(kind, float(d['factor']), **extra)

  def to_hf(self) -> dict[str, Any]:
    """The ``config.json`` ``rope_scaling`` entry."""
    d = {'rope_type': self.rope_type, 'factor': self.factor}
    d.update({k: getattr(self, k) for k in _ROPE_KEYS[self.rope_type] if getattr(self, k) is not None})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _check_longrope(r: RopeScaling) -> None:
  """Checks a longrope scaling's required fields and stores its factor lists as tuples of floats."""
  missing = [k for k in ('original_max_position_embeddings', 'short_factor', 'long_factor') if getattr(r, k) is None]
  if missing:
    raise ValueError(f'longrope rope_scaling lacks {missing}.')
  for name in ('short_factor', 'long_factor'):
    values = getattr(r, name)
    if isinstance(values, (str, bytes)) or not all(isinstance(v, (int, float)) and v > 0 for v in values):
      raise ValueError(f'longrope {name} must be a list of positive numbers, got {values!r}.')
    object.__setattr__(r, name, tuple(float(v) for v in values))
  if len(r.short_factor) != len(r.long_factor):
    raise ValueError(f'longrope short_factor ({len(r.short_factor)}) and long_factor ({len(r.long_factor)}) differ '
                     'in length.')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a LLaMA-family decoder (the fields of Hugging Face's Llama / Qwen2 / Mistral configs we use).

  Attributes:
    vocab_size: V, number of token ids.
    hidden_size: D, width of the residual stream.
    intermediate_size: F, width of the SwiGLU MLP.
    num_hidden_layers: L, number of decoder layers.
    num_attention_heads: H, query heads.
    num_key_value_heads: KV, key/value heads (grouped-query attention); defaults to H. H must be a multiple of KV.
    head_dim: Dh, width of one head; defaults to D // H. Must be even (rotary embeddings rotate pairs).
    rms_norm_eps: epsilon of every RMSNorm.
    rope_theta: base of the rotary frequencies.
    tie_word_embeddings: if True, there is no ``lm_head`` and logits are ``h @ embed_tokens.embedding.T``.
    max_position_embeddings: the context length the checkpoint was trained for (informational; positions beyond it
      still compute).
    dtype: computation dtype of activations (attention softmax, rotary and RMSNorm statistics use at least float32,
      so a float64 model computes in float64 throughout).
    param_dtype: dtype of the parameters.
    model_type: the Hugging Face class the config corresponds to: ``'llama'`` (LlamaForCausalLM), ``'qwen2'``
      (Qwen2ForCausalLM: q/k/v biases), ``'qwen3'`` (Qwen3ForCausalLM: RMSNorm on each q / k head),
      ``'mistral'`` (MistralForCausalLM: optional sliding window), ``'phi3'`` (Phi3ForCausalLM: fused projections),
      ``'gemma2'`` (Gemma2ForCausalLM) or ``'gemma3_text'`` (Gemma3ForCausalLM; see :mod:`.gemma` for what Gemma
      changes: (1 + weight) RMSNorms, four norms per layer, GeGLU, soft caps, scaled embeddings).
    attention_bias: biases on q_proj, k_proj and v_proj. None: the model type's (True for qwen2, else False).
    attention_out_bias: a bias on o_proj. None: the model type's (llama: same as ``attention_bias``, else False).
    mlp_bias: biases on gate_proj, up_proj and down_proj (llama only).
    rope_scaling: a :class:`RopeScaling`, its ``config.json`` dict, or None.
    sliding_window: W; a query attends only to the W most recent slots (itself included) in the layers that
      ``layer_types`` marks ``'sliding_attention'`` (Mistral: every layer). None: full causal attention.
    layer_types: per layer ``'full_attention'`` or ``'sliding_attention'``; None means every layer slides when
      ``sliding_window`` is set.
    hidden_act: the MLP's gate activation, ``'silu'`` (SwiGLU) or ``'gelu_pytorch_tanh'`` (GeGLU); None: the model
      type's (Gemma: GeGLU, else SwiGLU).
    query_pre_attn_scalar: Gemma only: attention scores are scaled by ``query_pre_attn_scalar ** -0.5``; None (and
      every other family): ``head_dim ** -0.5``.
    attn_logit_softcapping: Gemma only: attention scores become ``cap * tanh(score / cap)`` before the mask.
    final_logit_softcapping: Gemma only: logits become ``cap * tanh(logit / cap)``.
    rope_local_base_freq: Gemma 3 only (required there): the rope base of the sliding layers, which are never
      rope-scaled; ``rope_theta`` and ``rope_scaling`` apply to the global layers.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  model_type: str = 'llama'
  attention_bias: bool | None = None
  attention_out_bias: bool | None = None
  mlp_bias: bool = False
  rope_scaling: RopeScaling | Mapping[str, Any] | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  hidden_act: str | None = None
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  rope_local_base_freq: float | None = None

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'LlamaConfig.{name} must be a positive int, got {value!r}.')
    # Frozen dataclass: defaults that depend on other fields are filled in with object.__setattr__.
    if self.num_key_value_heads is None:
      object.__setattr__(self, 'num_key_value_heads', self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f'hidden_size={self.hidden_size} is not divisible by num_attention_heads='
                         f'{self.num_attention_heads}; pass head_dim explicitly.')
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_attention_heads)
    if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f'num_attention_heads={self.num_attention_heads} must be a positive multiple of '
                       f'num_key_value_heads={self.num_key_value_heads}.')
    if self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be positive and even (rotary embeddings rotate pairs).')
    if isinstance(self.rope_scaling, Mapping) or self.rope_scaling is None:
      object.__setattr__(self, 'rope_scaling', RopeScaling.from_hf(self.rope_scaling))
    elif not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f'rope_scaling must be a RopeScaling, a dict or None, got {self.rope_scaling!r}.')
    _fill_family_defaults(self)
    _check_sliding_window(self)
    _check_gemma_fields(self)
    _check_rope_length(self)

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head (H // KV)."""
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def qk_norm(self) -> bool:
    """Whether attention applies RMSNorm over each query / key head before the rotation (Qwen3)."""
    return self.model_type in QK_NORM_MODEL_TYPES

  @property
  def fused_projections(self) -> bool:
    """Whether attention has one ``qkv_proj`` and the MLP one ``gate_up_proj`` (Phi-3) instead of separate ones."""
    return self.model_type in FUSED_MODEL_TYPES

  @property
  def is_gemma(self) -> bool:
    """Whether the decoder is Gemma's: (1 + weight) RMSNorms, four norms per layer, scaled embeddings."""
    return self.model_type in gemma.GEMMA_MODEL_TYPES

  @property
  def attention_scale(self) -> float:
    """The factor on attention scores: ``query_pre_attn_scalar ** -0.5`` (Gemma), else ``head_dim ** -0.5``."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it uses the sliding window."""
    if self.sliding_window is None:
      return (False,) * self.num_hidden_layers
    return tuple(t == 'sliding_attention' for t in self.layer_types)

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], *, dtype: Any = jnp.float32,
                   param_dtype: Any | None = None) -> LlamaConfig:
    """Builds a config from a Hugging Face ``config.json`` dict of one of :data:`MODEL_TYPES`.

    Args:
      d: the parsed ``config.json``.
      dtype: computation dtype.
      param_dtype: parameter dtype; defaults to ``dtype``.

    Returns:
      The config.

    Raises:
      ValueError: for a key that is missing, or a feature this implementation does not have (another model type,
        a rope scaling type outside :data:`ROPE_TYPES`, an activation other than SiLU (Gemma: tanh GELU),
        Gemma 1 or Gemma 3 multimodal, named in the message).
    """
    return cls(**config_kwargs_from_hf(d), dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)

  def to_hf_dict(self) -> dict[str, Any]:
    """The Hugging Face ``config.json`` fields for this config (inverse of :meth:`from_hf_dict`)."""
    return config_to_hf(self)


def _fill_family_defaults(c: LlamaConfig) -> None:
  """Fills the bias defaults of ``c.model_type`` and checks that the model type can express the config."""
  if c.model_type not in MODEL_TYPES:
    raise ValueError(f'model_type={c.model_type!r} is not supported; supported: {MODEL_TYPES}.')
  if c.attention_bias is None:
    object.__setattr__(c, 'attention_bias', c.model_type == 'qwen2')
  if c.attention_out_bias is None:
    object.__setattr__(c, 'attention_out_bias', bool(c.attention_bias) and c.model_type not in ('qwen2', 'mistral',
                                                                                                 'phi3'))
  biases = (bool(c.attention_bias), bool(c.attention_out_bias), bool(c.mlp_bias))
  allowed = {'llama': biases[0] == biases[1], 'qwen2': biases == (True, False, False),
             'qwen3': biases[0] == biases[1] and not biases[2],
             'mistral': biases == (False, False, False), 'phi3': biases == (False, False, False)}.get(
                 c.model_type, biases[0] == biases[1] and not biases[2])  # gemma: like qwen3
  if not allowed:
    raise ValueError(f'model_type={c.model_type!r} cannot have attention_bias={c.attention_bias}, '
                     f'attention_out_bias={c.attention_out_bias}, mlp_bias={c.mlp_bias} (llama: q/k/v/o biased '
                     'together, optional MLP biases; qwen2: q/k/v biases only; qwen3, gemma: q/k/v/o together; '
                     'mistral, phi3: none).')
  if c.model_type == 'llama' and c.sliding_window is not None:
    raise ValueError(f'model_type=llama has no sliding window, got sliding_window={c.sliding_window}; use '
                     "model_type='mistral' or 'qwen2'.")


def _check_gemma_fields(c: LlamaConfig) -> None:
  """Fills the activation default and checks the Gemma-only fields (soft caps, attention scalar, local rope base)."""
  if c.hidden_act is None:
    object.__setattr__(c, 'hidden_act', 'gelu_pytorch_tanh' if c.is_gemma else 'silu')
  if c.hidden_act not in ACTIVATIONS:
    raise ValueError(f'hidden_act={c.hidden_act!r} is not supported; supported: {tuple(ACTIVATIONS)}.')
  gemma_only = ('query_pre_attn_scalar', 'attn_logit_softcapping', 'final_logit_softcapping', 'rope_local_base_freq')
  for name in gemma_only:
    value = getattr(c, name)
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
      raise ValueError(f'LlamaConfig.{name} must be a positive number or None, got {value!r}.')
  if not c.is_gemma:
    given = [k for k in gemma_only if getattr(c, k) is not None] + (['hidden_act'] if c.hidden_act != 'silu' else [])
    if given:
      raise ValueError(f'model_type={c.model_type!r} does not take {given} (Gemma fields).')
    return
  if c.sliding_window is None:
    raise ValueError(f'model_type={c.model_type} needs a sliding_window (Gemma alternates sliding and global layers).')
  if (c.rope_local_base_freq is None) != (c.model_type == 'gemma2'):
    raise ValueError(f'rope_local_base_freq is required for gemma3_text and not taken by gemma2; got '
                     f'model_type={c.model_type}, rope_local_base_freq={c.rope_local_base_freq!r}.')
  if c.query_pre_attn_scalar is None:
    object.__setattr__(c, 'query_pre_attn_scalar', float(c.head_dim))


def _check_rope_length(c: LlamaConfig) -> None:
  """Checks that a longrope scaling has one short and one long factor per rotary frequency (Dh / 2)."""
  r = c.rope_scaling
  if r is not None and r.rope_type == 'longrope' and len(r.short_factor) != c.head_dim // 2:
    raise ValueError(f'longrope short_factor / long_factor need head_dim / 2 = {c.head_dim // 2} entries, got '
                     f'{len(r.short_factor)}.')


def _check_sliding_window(c: LlamaConfig) -> None:
  """Validates ``sliding_window`` and normalizes ``layer_types`` to a tuple (or None without a window)."""
  if c.sliding_window is None:
    if c.layer_types is not None and 'sliding_attention' in c.layer_types:
      raise ValueError(f'layer_types={c.layer_types!r} has sliding layers but sliding_window is None.')
    object.__setattr__(c, 'layer_types', None)
    return
  if not isinstance(c.sliding_window, int) or c.sliding_window <= 0:
    raise ValueError(f'sliding_window must be a positive int or None, got {c.sliding_window!r}.')
  types = ('sliding_attention',) * c.num_hidden_layers if c.layer_types is None else tuple(c.layer_types)
  if len(types) != c.num_hidden_layers or any(t not in LAYER_TYPES for t in types):
    raise ValueError(f'layer_types must list one of {LAYER_TYPES} per layer ({c.num_hidden_layers}), got '
                     f'{c.layer_types!r}.')
  if c.model_type in ALL_SLIDING_MODEL_TYPES and 'full_attention' in types:
    raise ValueError(f'model_type={c.model_type} applies its sliding window to every layer; got full_attention layers.')
  object.__setattr__(c, 'layer_types', types)


def config_kwargs_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
  """:class:`LlamaConfig` keyword arguments from a Hugging Face ``config.json`` dict (see ``from_hf_dict``)."""
  model_type = d.get('model_type', 'llama')
  if model_type in gemma.REFUSED:
    raise ValueError(gemma.REFUSED[model_type])
  if model_type not in MODEL_TYPES:
    raise ValueError(f'Expected a config of model_type {MODEL_TYPES}, got model_type={model_type!r}.')
  if float(d.get('partial_rotary_factor', 1.0)) != 1.0:
    raise ValueError(
        f"partial_rotary_factor={d['partial_rotary_factor']!r} is not supported (rotary on every dim only).")
  act = d.get('hidden_act', 'silu')
  if act != 'silu' and model_type not in gemma.GEMMA_MODEL_TYPES:
    raise ValueError(f"hidden_act={act!r} is not supported; LLaMA-family models use 'silu'.")
  required = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
  missing = [k for k in required if k not in d]
  if missing:
    raise ValueError(f'config.json lacks required keys {missing}.')
  kw = {k: int(d[k]) for k in required}
  kw.update(
      num_key_value_heads=None if d.get('num_key_value_heads') is None else int(d['num_key_value_heads']),
      head_dim=None if d.get('head_dim') is None else int(d['head_dim']),
      rms_norm_eps=float(d.get('rms_norm_eps', 1e-6)),
      rope_theta=float(d.get('rope_theta', 10000.0)),
      tie_word_embeddings=bool(d.get('tie_word_embeddings', False)),
      max_position_embeddings=int(d.get('max_position_embeddings', 2048)),
      model_type=model_type,
      rope_scaling=_rope_scaling_from_hf(d, model_type))
  if model_type in gemma.GEMMA_MODEL_TYPES:
    kw.update(gemma.config_kwargs_from_hf(d, model_type, kw['num_hidden_layers']))
    return kw
  if model_type == 'llama':
    kw.update(attention_bias=bool(d.get('attention_bias', False)), mlp_bias=bool(d.get('mlp_bias', False)))
  elif model_type == 'qwen3':
    kw['attention_bias'] = bool(d.get('attention_bias', False))
  if model_type in ALL_SLIDING_MODEL_TYPES:
    window = d.get('sliding_window', 4096 if model_type == 'mistral' else None)  # MistralConfig's / Phi3Config's
    kw['sliding_window'] = None if window is None else int(window)
  elif model_type != 'llama' and d.get('use_sliding_window') and d.get('sliding_window') is not None:
    # qwen2 / qwen3, as Qwen2Config and Qwen3Config read it
    window, layers = int(d['sliding_window']), kw['num_hidden_layers']
    first = int(d.get('max_window_layers', 28))
    types = d.get('layer_types') or ['sliding_attention' if i >= first else 'full_attention' for i in range(layers)]
    if 'sliding_attention' in types:
      kw.update(sliding_window=window, layer_types=tuple(types))
  return kw


def _rope_scaling_from_hf(d: Mapping[str, Any], model_type: str) -> RopeScaling | None:
  """The :class:`RopeScaling` of a ``config.json``; longrope reads the top-level context lengths as transformers does.

  For longrope, a top-level ``original_max_position_embeddings`` (Phi3Config always has one, 4096 by default) sets
  ``factor = max_position_embeddings / original``; without one the original is ``max_position_embeddings`` and
  ``rope_scaling['factor']`` is used. The attention factor is resolved here, so it survives the round trip. On
  Phi-3, types ``'su'`` and ``'yarn'`` are longrope too, as Phi3Config renames them.
  """
  rs = d.get('rope_scaling')
  kind = rs.get('rope_type', rs.get('type')) if isinstance(rs, Mapping) else None
  # Phi3Config reads the older names 'su' and 'yarn' as longrope.
  if kind != 'longrope' and not (model_type == 'phi3' and kind in ('su', 'yarn')):
    return RopeScaling.from_hf(rs)
  max_pos = int(d.get('max_position_embeddings', 2048))
  original = d.get('original_max_position_embeddings', 4096 if model_type == 'phi3' else None)
  factor = max_pos / int(original) if original else rs.get('factor')
  if factor is None:
    raise ValueError(f'longrope rope_scaling={dict(rs)!r} lacks a factor (and config.json an '
                     'original_max_position_embeddings).')
  original = int(original or max_pos)
  attention = rs.get('attention_factor')
  if attention is None:
    attention = rope_scaling.longrope_attention_factor(float(factor), original)
  return RopeScaling('longrope', float(factor), original_max_position_embeddings=original,
                     short_factor=rs.get('short_factor'), long_factor=rs.get('long_factor'),
                     attention_factor=float(attention))


def config_to_hf(c: LlamaConfig) -> dict[str, Any]:
  """The ``config.json`` dict of ``c`` for its Hugging Face class (``LlamaConfig.to_hf_dict``)."""
  d = {
      'architectures': [{'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
                         'mistral': 'MistralForCausalLM', 'phi3': 'Phi3ForCausalLM',
                         **gemma.HF_ARCHITECTURES}[c.model_type]],
      'model_type': c.model_type,
      'vocab_size': c.vocab_size,
      'hidden_size': c.hidden_size,
      'intermediate_size': c.intermediate_size,
      'num_hidden_layers': c.num_hidden_layers,
      'num_attention_heads': c.num_attention_heads,
      'num_key_value_heads': c.num_key_value_heads,
      'head_dim': c.head_dim,
      'rms_norm_eps': c.rms_norm_eps,
      'rope_theta': c.rope_theta,
      'tie_word_embeddings': c.tie_word_embeddings,
      'max_position_embeddings': c.max_position_embeddings,
      'rope_scaling': None if c.rope_scaling is None else c.rope_scaling.to_hf(),
  }
  if c.rope_scaling is not None and c.rope_scaling.rope_type == 'longrope':
    d.update(_longrope_to_hf(c))
  if c.is_gemma:
    d.update(gemma.config_to_hf(c))
    return d
  d['hidden_act'] = 'silu'
  if c.model_type == 'llama':
    d.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
  elif c.model_type in ALL_SLIDING_MODEL_TYPES:
    d['sliding_window'] = c.sliding_window
    if c.model_type == 'phi3':
      d['pad_token_id'] = None  # Phi3Config's default (32000) would index past a smaller vocabulary
  else:
    if c.model_type == 'qwen3':
      d['attention_bias'] = c.attention_bias
    types = list(c.layer_types or ('full_attention',) * c.num_hidden_layers)
    first = types.index('sliding_attention') if 'sliding_attention' in types else c.num_hidden_layers
    d.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
             max_window_layers=first, layer_types=types)
  return d


def _longrope_to_hf(c: LlamaConfig) -> dict[str, Any]:
  """``rope_scaling`` and the top-level ``original_max_position_embeddings`` of a longrope config.

  A top-level original makes transformers derive the factor from the two context lengths; it is written when the
  original differs from ``max_position_embeddings``, and always for Phi-3 (whose default would be 4096). Phi3Config
  also insists on exactly the keys type / short_factor / long_factor, so there the attention factor must be the
  one transformers derives; elsewhere it is written out.
  """
  r = c.rope_scaling
  original = r.original_max_position_embeddings
  factor = c.max_position_embeddings / original
  attention = rope_scaling.longrope_attention_factor(r.factor, original, r.attention_factor)
  rs = {'type' if c.model_type == 'phi3' else 'rope_type': 'longrope', 'short_factor': list(r.short_factor),
        'long_factor': list(r.long_factor)}
  if c.model_type != 'phi3':
    rs.update(factor=r.factor, attention_factor=attention)
    if original == c.max_position_embeddings:  # transformers' fallback; the factor is read from rope_scaling
      return {'rope_scaling': rs}
  elif abs(attention - rope_scaling.longrope_attention_factor(factor, original)) > 1e-12:
    raise ValueError(f'Phi3Config derives the longrope attention factor from max_position_embeddings / '
                     f'original_max_position_embeddings = {factor}, giving '
                     f'{rope_scaling.longrope_attention_factor(factor, original)}, not this config\'s {attention}.')
  return {'rope_scaling': rs, 'original_max_position_embeddings': original}


class KVCache(NamedTuple):
  """Keys and values of every layer for the slots decoded so far; a plain pytree.

  Slots are filled left to right, the same slot range for every row, so one scalar ``index`` serves the whole batch;
  rows that are shorter (padding) are told apart by ``mask``.

  Attributes:
    k: [L, B, S, KV, Dh] rotated keys.
    v: [L, B, S, KV, Dh] values.
    mask: [B, S] bool, True where a slot holds a real (non-padding) token.
    index: [] int32, the next slot to write.
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
  """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt plus generated).

  Args:
    config: the model config.
    batch: B.
    max_len: S, total slots; prefill and every later call each take as many slots as their input has tokens.
    dtype: dtype of keys and values; defaults to ``config.dtype``.

  Returns:
    A :class:`KVCache` with zero keys/values, an all-False mask and index 0.
  """
  if batch <= 0 or max_len <= 0:
    raise ValueError(f'init_cache needs positive batch and max_len, got batch={batch}, max_len={max_len}.')
  dtype = config.dtype if dtype is None else dtype
  shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), mask=jnp.zeros((batch, max_len), bool),
                 index=jnp.zeros((), jnp.int32))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None, *,
                  max_position_embeddings: int | None = None, seq_len: jax.Array | None = None) -> jax.Array:
  """The Dh/2 inverse rotary frequencies, after ``scaling``, computed in float32 as transformers does.

  Plain RoPE: ``theta ** (-2i / Dh)``. Linear scaling divides them by ``factor``. Llama 3 scaling divides those of
  wavelength ``2 pi / f`` above ``original / low_freq_factor`` by ``factor``, keeps those below
  ``original / high_freq_factor``, and between the two blends ``(1 - s) f / factor + s f`` with
  ``s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``. YaRN and dynamic NTK:
  see :mod:`fedjax_adapters.models.rope_scaling` (yarn falls back on ``max_position_embeddings`` for its original
  context; dynamic needs it and ``seq_len``, the number of positions the forward reaches; longrope needs ``seq_len``).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  if scaling.rope_type == 'linear':
    return inv_freq / scaling.factor
  if scaling.rope_type == 'yarn':
    original = scaling.original_max_position_embeddings or max_position_embeddings
    return rope_scaling.yarn_inv_freq(head_dim, theta, scaling.factor, original,
                                      beta_fast=scaling.beta_fast or 32.0, beta_slow=scaling.beta_slow or 1.0,
                                      truncate=True if scaling.truncate is None else scaling.truncate)
  if scaling.rope_type == 'dynamic':
    return rope_scaling.dynamic_ntk_inv_freq(head_dim, theta, scaling.factor, max_position_embeddings, seq_len)
  if scaling.rope_type == 'longrope':
    return rope_scaling.longrope_inv_freq(head_dim, theta, scaling.short_factor, scaling.long_factor,
                                          scaling.original_max_position_embeddings, seq_len)
  original, low, high = (scaling.original_max_position_embeddings, scaling.low_freq_factor,
                         scaling.high_freq_factor)
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > original / low, inv_freq / scaling.factor, inv_freq)
  smooth = (original / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = ~(wavelen < original / high) & ~(wavelen > original / low)
  return jnp.where(medium, blended, scaled)


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float, *, scaling: RopeScaling | None = None,
                   max_position_embeddings: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Cosines and sines of the rotary embedding in Hugging Face's "rotate_half" layout.

  Frequency i (of Dh/2) is ``theta ** (-2i / Dh)`` (before ``scaling``, see :func:`rope_inv_freq`); it is used by
  dims i and i + Dh/2, which rotate as a pair.

  Args:
    positions: [B, T] int positions.
    head_dim: Dh.
    theta: the rope base.
    scaling: optional rope scaling; yarn and longrope also scale the cos/sin amplitude (their attention factor).
    max_position_embeddings: the model's context length (yarn's fallback, dynamic's threshold).

  Returns:
    (cos, sin), each [B, T, Dh] float32.
  """
  per_call = scaling is not None and scaling.rope_type in ('dynamic', 'longrope')
  seq_len = jnp.max(positions) + 1 if per_call else None
  inv_freq = rope_inv_freq(head_dim, theta, scaling, max_position_embeddings=max_position_embeddings,
                           seq_len=seq_len)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  if scaling is not None and scaling.rope_type == 'yarn':
    amp = rope_scaling.yarn_attention_factor(scaling.factor, scaling.attention_factor, scaling.mscale,
                                             scaling.mscale_all_dim)
    return jnp.cos(angles) * amp, jnp.sin(angles) * amp
  if scaling is not None and scaling.rope_type == 'longrope':
    amp = rope_scaling.longrope_attention_factor(scaling.factor, scaling.original_max_position_embeddings,
                                                 scaling.attention_factor)
    return jnp.cos(angles) * amp, jnp.sin(angles) * amp
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` [B, T, heads, Dh] by position; cos/sin are [B, T, Dh]. Computed in float32 (or x's wider dtype)."""
  half = x.shape[-1] // 2
  xf = x.astype(_at_least_f32(x.dtype))
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def _at_least_f32(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None,
            cap: float | None = None) -> jax.Array:
  """Grouped-query attention.

  Args:
    q: [B, T, H, Dh] queries.
    k: [B, S, KV, Dh] keys.
    v: [B, S, KV, Dh] values.
    mask: [B, T, S] bool, True where query t may attend to key s.
    scale: the factor on the scores; None: ``Dh ** -0.5``.
    cap: optional soft cap on the scaled scores (``cap * tanh(score / cap)``, Gemma 2), applied before the mask.

  Returns:
    [B, T, H * Dh].
  """
  b, t, h, dh = q.shape
  kv = k.shape[2]
  # Query head h uses key/value head h // (H // KV), as in HF's repeat_kv: grouping the query heads as [KV, G]
  # gets that without materialising repeated keys.
  q = q.reshape(b, t, kv, h // kv, dh)
  scale = dh ** -0.5 if scale is None else scale
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=_at_least_f32(q.dtype)) * scale
  scores = gemma.softcap(scores, cap)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, h * dh)


class LlamaAttention(nnx.Module):
  """Self-attention with rotary embeddings and grouped-query heads; HF names ``q_proj``, ``k_proj``, ....

  Projections carry biases where the config says so (Qwen2: q/k/v; Llama with ``attention_bias``: q/k/v/o).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.num_heads = config.num_attention_heads
    self.num_kv_heads = config.num_key_value_heads
    self.head_dim = config.head_dim
    self.scale, self.softcap = config.attention_scale, config.attn_logit_softcapping
    linear = functools.partial(nnx.Linear, use_bias=config.attention_bias, dtype=config.dtype,
                               param_dtype=config.param_dtype, rngs=rngs)
    d, h, kv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if config.fused_projections:  # Phi-3: one projection whose output rows are q, then k, then v.
      self.qkv_proj = linear(d, (h + 2 * kv) * dh)
    else:
      self.q_proj = linear(d, h * dh)
      self.k_proj = linear(d, kv * dh)
      self.v_proj = linear(d, kv * dh)
    self.o_proj = linear(h * dh, d, use_bias=config.attention_out_bias)
    if config.qk_norm:  # Qwen3: RMSNorm over each head's Dh features of q and k, before the rotation.
      self.q_norm = _rms_norm(config, rngs, dh)
      self.k_norm = _rms_norm(config, rngs, dh)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               cache_kv: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None,
               layer: int | jax.Array = 0) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends ``x`` [B, T, D] to itself, or to the cached keys plus itself.

    Args:
      x: [B, T, D] normed hidden states.
      cos: [B, T, Dh] rotary cosines.
      sin: [B, T, Dh] rotary sines.
      mask: [B, T, S] bool attention mask (S = T without a cache, S = cache length with one).
      cache_kv: optional (k, v), each [L, B, S, KV, Dh], the whole cache; this layer's new keys go into slots
        ``cache_index .. cache_index + T - 1`` of entry ``layer``.
      cache_index: [] int32, the first slot to write.
      layer: which entry of the cache is this layer's (an int, or a traced index inside a scan over layers).

    Returns:
      ([B, T, D] output, the updated whole cache (k, v) or None).
    """
    b, t, _ = x.shape
    if hasattr(self, 'qkv_proj'):
      q, k, v = jnp.split(self.qkv_proj(x), [self.num_heads * self.head_dim,
                                             (self.num_heads + self.num_kv_heads) * self.head_dim], axis=-1)
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if hasattr(self, 'q_norm'):
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    if cache_kv is not None:
      ck, cv = cache_kv
      # Update the stacked [L, ...] arrays in place (write T slots, then read this layer's entry) rather than slice,
      # update and restack, which would copy the whole cache at every decoding step.
      start = (layer, 0, cache_index, 0, 0)
      ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], start)
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], start)
      k = jax.lax.dynamic_index_in_dim(ck, layer, axis=0, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(cv, layer, axis=0, keepdims=False)
      cache_kv = (ck, cv)
    out = _attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.scale, self.softcap)
    return self.o_proj(out), cache_kv


class LlamaMLP(nnx.Module):
  """Gated feed-forward: ``down_proj(act(gate_proj(x)) * up_proj(x))``, act silu (SwiGLU) or tanh gelu (GeGLU)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.hidden_act = config.hidden_act
    linear = functools.partial(nnx.Linear, use_bias=config.mlp_bias, dtype=config.dtype,
                               param_dtype=config.param_dtype, rngs=rngs)
    if config.fused_projections:  # Phi-3: one projection whose output rows are gate, then up.
      self.gate_up_proj = linear(config.hidden_size, 2 * config.intermediate_size)
    else:
      self.gate_proj = linear(config.hidden_size, config.intermediate_size)
      self.up_proj = linear(config.hidden_size, config.intermediate_size)
    self.down_proj = linear(config.intermediate_size, config.hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    if hasattr(self, 'gate_up_proj'):
      gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(ACTIVATIONS[self.hidden_act](gate) * up)


def _rms_norm(config: LlamaConfig, rngs: nnx.Rngs, features: int | None = None) -> nnx.RMSNorm:
  # nnx.RMSNorm computes x * rsqrt(mean(x^2) + eps) * scale with float32 statistics: LLaMA's formula. Using the
  # stock module (parameter `scale`) lets norm adaptors target it by type. Gemma's subclass scales by 1 + scale.
  norm = gemma.GemmaRMSNorm if config.is_gemma else nnx.RMSNorm
  return norm(features or config.hidden_size, epsilon=config.rms_norm_eps, dtype=config.dtype,
                     param_dtype=config.param_dtype, rngs=rngs)


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``.

  Gemma's block norms each sublayer's input and output: ``h = x + post_attention_layernorm(attn(input_layernorm(x)))``,
  ``out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`` (HF's names, so its
  ``post_attention_layernorm`` is not LLaMA's).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.self_attn = LlamaAttention(config, rngs=rngs)
    self.mlp = LlamaMLP(config, rngs=rngs)
    self.input_layernorm = _rms_norm(config, rngs)
    self.post_attention_layernorm = _rms_norm(config, rngs)
    if config.is_gemma:
      self.pre_feedforward_layernorm = _rms_norm(config, rngs)
      self.post_feedforward_layernorm = _rms_norm(config, rngs)

  def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None, layer=0):
    """Same arguments as :meth:`LlamaAttention.__call__`; returns ([B, T, D], updated cache (k, v) or None)."""
    attn, cache_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, cache_index, layer)
    if not hasattr(self, 'pre_feedforward_layernorm'):
      h = x + attn
      return h + self.mlp(self.post_attention_layernorm(h)), cache_kv
    h = x + self.post_attention_layernorm(attn)
    return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), cache_kv


class LlamaModel(nnx.Module):
  """The decoder stack (HF's ``LlamaModel``): ``embed_tokens``, ``layers``, ``norm``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                                  param_dtype=config.param_dtype, rngs=rngs)
    self.layers = nnx.List([LlamaDecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    self.norm = _rms_norm(config, rngs)


def _split_layers(layers) -> list[tuple[Any, Any]] | int:
  """Splits each layer into (graphdef, state); returns the first odd layer's index if the graphdefs differ."""
  splits = [nnx.split(layer) for layer in layers]
  for i, (graphdef, _) in enumerate(splits):
    if graphdef != splits[0][0]:
      return i
  return splits


def layers_are_uniform(model: Llama) -> bool:
  """Whether every decoder layer has the same module structure (so ``scan_layers=True`` applies)."""
  return not isinstance(_split_layers(model.model.layers), int)


class Llama(nnx.Module):
  """LLaMA causal language model (HF's ``LlamaForCausalLM``): ``model`` plus ``lm_head`` (absent when tied).

  Module paths mirror Hugging Face, e.g. ``model.layers.0.self_attn.q_proj`` and ``lm_head``.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, rngs=rngs)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=config.dtype,
                                param_dtype=config.param_dtype, rngs=rngs)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Output head: [B, T, D] normed hidden states -> [B, T, V] float32 logits (float64 for a float64 model),
    soft-capped when the config has ``final_logit_softcapping``."""
    dtype = _at_least_f32(hidden.dtype)
    cap = self.config.final_logit_softcapping
    if self.lm_head is not None:
      return gemma.softcap(self.lm_head(hidden).astype(dtype), cap)
    embed = self.model.embed_tokens
    if hasattr(embed, 'attend'):
      return gemma.softcap(embed.attend(hidden).astype(dtype), cap)
    return gemma.softcap((hidden @ embed.embedding[...].T).astype(dtype), cap)

  def _scan_layers(self, splits, x, ropes, masks, cache_kv, cache_index):
    """The layer loop as one ``lax.scan`` over the layers' stacked states; returns (x, updated cache or None)."""
    graphdef = splits[0][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in splits])

    def body(carry, layer_inputs):
      # The whole cache rides in the carry (not in xs/ys), so each step writes only its new slots in place.
      x, cache_kv = carry
      layer_state, i = layer_inputs
      layer = nnx.merge(graphdef, layer_state)
      x, cache_kv = layer(x, *_layer_rope(ropes, self.config, i), _layer_mask(masks, self.config, i), cache_kv,
                          cache_index, i)
      return (x, cache_kv), None

    (x, cache_kv), _ = jax.lax.scan(body, (x, cache_kv), (stacked, jnp.arange(len(splits))))
    return x, cache_kv

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, cache: KVCache | None = None, return_hidden: bool = False,
               scan_layers: bool = False):
    """Runs the decoder.

    Without a cache, this is a full causal forward over ``input_ids``. With a cache, the T new tokens go into slots
    ``cache.index .. cache.index + T - 1`` and attend to every earlier real slot; call it once with the (padded)
    prompt to prefill, then with one token per step.

    Args:
      input_ids: [B, T] int token ids.
      attention_mask: [B, T], 1 for real tokens and 0 for padding (left or right); defaults to all ones.
      positions: [B, T] int rotary positions. Defaults to the count of real tokens before each one
        (``cumsum(mask) - 1`` clipped at 0, plus the real tokens already in the cache), so left padding does not
        shift positions.
      cache: optional :class:`KVCache` with at least ``cache.index + T`` slots.
      return_hidden: also return the final normed hidden states.
      scan_layers: run the layers with ``lax.scan`` over their stacked states instead of a Python loop. The
        result is the same; the compiled program holds one layer instead of L, which cuts XLA compile time several
        fold (the decoding functions use it), at the cost of a stacked copy of the layer weights per call (under
        ``jit`` XLA hoists that copy out of decode loops). Needs all layers to have the same structure (adapter
        surgery that treats layers differently rules it out; a ValueError says which layer differs). Layer state
        is read-only in the scan: a change a layer makes to its own variables during the call is dropped (the
        LLaMA layers and the adapter wrappers make none).

    Returns:
      logits [B, T, V] float32; then hidden [B, T, D] if ``return_hidden``; then the updated cache if one was given.
      A single array when neither extra is asked for, else a tuple in that order.
    """
    config = self.config
    if input_ids.ndim != 2:
      raise ValueError(f'input_ids must be [B, T], got shape {input_ids.shape}.')
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    if attention_mask.shape != (b, t):
      raise ValueError(f'attention_mask shape {attention_mask.shape} does not match input_ids shape {(b, t)}.')
    mask = attention_mask.astype(bool)
    if scan_layers:
      splits = _split_layers(self.model.layers)
      if isinstance(splits, int):
        raise ValueError(f'scan_layers=True needs layers of one structure, but layer {splits} differs from layer 0.')
    key_mask, query_slots, prior_real = _cache_slots(mask, cache)
    if positions is None:
      positions = jnp.maximum(prior_real + jnp.cumsum(mask, axis=-1) - 1, 0)
    if positions.shape != (b, t):
      raise ValueError(f'positions shape {positions.shape} does not match input_ids shape {(b, t)}.')
    masks = attention_masks(config, key_mask, query_slots)
    ropes = rotary_per_layer_kind(config, positions)

    x = self.model.embed_tokens(input_ids)
    if config.is_gemma:  # after the (possibly adapted) embedding: PEFT scales an embedding LoRA's delta too
      x = gemma.embed_scale(x, config.hidden_size)
    cache_kv = None if cache is None else (cache.k, cache.v)
    cache_index = None if cache is None else cache.index
    if scan_layers:
      x, cache_kv = self._scan_layers(splits, x, ropes, masks, cache_kv, cache_index)
    else:
      policy = getattr(self, 'remat_policy', None)
      for i, layer in enumerate(self.model.layers):
        cos, sin = _layer_rope(ropes, config, i)
        if policy is not None and cache is None:
          x = _remat_layer(layer, x, cos, sin, _layer_mask(masks, config, i), i, policy)
        else:
          x, cache_kv = layer(x, cos, sin, _layer_mask(masks, config, i), cache_kv, cache_index, i)
    hidden = self.model.norm(x)
    logits = self.logits(hidden)

    outputs = (logits,)
    if return_hidden:
      outputs += (hidden,)
    if cache is not None:
      outputs += (KVCache(k=cache_kv[0], v=cache_kv[1], mask=key_mask, index=cache.index + t),)
    return outputs[0] if len(outputs) == 1 else outputs


REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole layer in the backward pass
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def set_remat(model: Llama, policy: str | None) -> Llama:
  """Turns activation rematerialization per decoder layer on (``policy`` in :data:`REMAT_POLICIES`) or off (None).

  With remat, the backward pass recomputes each layer's activations instead of keeping them;
  outputs and gradients are unchanged (``jax.checkpoint``). Applies to the Python layer loop without a KV cache (training).
  """
  if policy is not None and policy not in REMAT_POLICIES:
    raise ValueError(f'unknown remat policy {policy!r}; expected one of {sorted(REMAT_POLICIES)} or None.')
  model.remat_policy = policy
  return model


def _remat_layer(layer, x, cos, sin, mask, i, policy):
  """``layer(x, ...)[0]`` under ``jax.checkpoint`` with ``REMAT_POLICIES[policy]``.

  The layer goes in as (graphdef, state) so the checkpointed function is pure (as in ``_scan_layers``, a change a
  layer makes to its own variables is dropped; the LLaMA layers and adapter wrappers make none).
  """
  graphdef, state = nnx.split(layer)

  def run(state, x, cos, sin, mask):
    return nnx.merge(graphdef, state)(x, cos, sin, mask, None, None, i)[0]
  return jax.checkpoint(run, policy=REMAT_POLICIES[policy])(state, x, cos, sin, mask)


def _cache_slots(mask: jax.Array, cache: KVCache | None) -> tuple[jax.Array, jax.Array, Any]:
  """(key mask [B, S], query slots [T], real tokens already cached [B, 1] or 0) for new tokens with ``mask`` [B, T]."""
  b, t = mask.shape
  if cache is None:
    return mask, jnp.arange(t), 0
  if cache.mask.shape[0] != b:
    raise ValueError(f'cache batch {cache.mask.shape[0]} does not match input batch {b}.')
  s = cache.mask.shape[1]
  try:  # A concrete index lets us catch an overflow that dynamic_update_slice would silently clamp.
    index = int(cache.index)
  except TypeError:  # a tracer (jit or vmap); ConcretizationTypeError is a TypeError
    index = None
  if index is not None and index + t > s:
    raise ValueError(f'KV cache overflow: {t} new tokens at slot {index} exceed max_len={s}.')
  key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
  return key_mask, cache.index + jnp.arange(t), cache.mask.sum(-1, keepdims=True)


def attention_masks(config: LlamaConfig, key_mask: jax.Array,
                    query_slots: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """(full causal mask, sliding-window mask or None), each [B, T, S] bool.

  Causality is by slot, not by position: padding slots carry clipped positions, but real tokens of one row are in
  increasing slot order, so "key slot <= query slot" plus the key mask is exactly the causal mask. The window, as in
  transformers, is by slot too: query slot q sees key slots s with ``q - W < s <= q``.
  """
  key_slots = jnp.arange(key_mask.shape[1])
  causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
  full = causal[None] & key_mask[:, None, :]
  if config.sliding_window is None:
    return full, None
  near = key_slots[None, :] > query_slots[:, None] - config.sliding_window
  return full, full & near[None]


def _layer_mask(masks: tuple[jax.Array, jax.Array | None], config: LlamaConfig, layer: int | jax.Array) -> jax.Array:
  """The mask of decoder layer ``layer`` (an int, or a traced index inside the scan over layers)."""
  full, window = masks
  flags = config.sliding_layers
  if window is None or not any(flags):
    return full
  if all(flags):
    return window
  if isinstance(layer, int):
    return window if flags[layer] else full
  return jnp.where(jnp.asarray(flags)[layer], window, full)


def rotary_per_layer_kind(config: LlamaConfig, positions: jax.Array) -> tuple[tuple[jax.Array, jax.Array], Any]:
  """((cos, sin) of the global layers, (cos, sin) of the sliding layers or None when they share the global ones).

  Only Gemma 3 (``rope_local_base_freq``) gives its sliding layers their own base, without rope scaling.
  """
  full = rotary_cos_sin(positions, config.head_dim, config.rope_theta, scaling=config.rope_scaling,
                        max_position_embeddings=config.max_position_embeddings)
  if config.rope_local_base_freq is None or not any(config.sliding_layers):
    return full, None
  return full, rotary_cos_sin(positions, config.head_dim, config.rope_local_base_freq)


def _layer_rope(ropes, config: LlamaConfig, layer: int | jax.Array) -> tuple[jax.Array, jax.Array]:
  """The (cos, sin) of decoder layer ``layer`` (an int, or a traced index inside the scan over layers)."""
  full, local = ropes
  flags = config.sliding_layers
  if local is None:
    return full
  if isinstance(layer, int):
    return local if flags[layer] else full
  pick = jnp.asarray(flags)[layer]
  return jnp.where(pick, local[0], full[0]), jnp.where(pick, local[1], full[1])


def abstract_llama(config: LlamaConfig) -> Llama:
  """A :class:`Llama` whose parameters are ``jax.ShapeDtypeStruct`` placeholders, for loaders to fill in.

  Equivalent to ``nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))`` but much faster for deep models: that
  traces every initializer of the whole model in one program, and NNX's per-variable RNG bookkeeping makes the cost
  grow quadratically with depth (about 10 s for a 30-layer model on a small CPU). Here one layer is traced and
  cloned.
  """
  one_layer = dataclasses.replace(config, num_hidden_layers=1, layer_types=None)  # layers differ only in masks
  model = nnx.eval_shape(lambda: Llama(one_layer, rngs=nnx.Rngs(0)))
  layer = model.model.layers[0]
  model.model.layers = nnx.List([layer] + [nnx.clone(layer) for _ in range(config.num_hidden_layers - 1)])
  model.config = config
  return model


# ----------------------------------------------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------------------------------------------


def _eos_array(eos_id: int | Sequence[int]) -> jax.Array:
  # A traced argument, not a static one, so that changing the EOS id does not recompile the decoder.
  ids = jnp.atleast_1d(jnp.asarray(eos_id, jnp.int32))
  if ids.ndim != 1 or ids.shape[0] == 0:
    raise ValueError(f'eos_id must be an int or a non-empty sequence of ints, got {eos_id!r}.')
  return ids


def _check_decode_args(model, input_ids, attention_mask, max_new_tokens):
  config = getattr(model, 'config', None)
  if not isinstance(config, LlamaConfig):
    raise ValueError(f'The model must carry a LlamaConfig as `.config` (to size the KV cache), got {config!r}.')
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(f'input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be [B, T].')
  if max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be positive, got {max_new_tokens}.')
  return config


def _call_kwargs(model, scan_layers: bool | None) -> dict[str, Any]:
  """Extra keyword arguments for the model's calls: scan the layers when asked, or (None) when possible."""
  if scan_layers is None:
    scan_layers = isinstance(model, Llama) and layers_are_uniform(model)
  return {'scan_layers': True} if scan_layers else {}


def _prefill(model, input_ids, attention_mask, max_len, call_kwargs):
  """Runs the prompt through the model into a fresh cache; returns (next-token logits [B, V], cache)."""
  config = model.config
  cache = init_cache(config, input_ids.shape[0], max_len)
  logits, cache = model(input_ids, attention_mask, cache=cache, **call_kwargs)
  t = input_ids.shape[1]
  # The last real token, so right-padded prompts work too (with left padding it is simply slot T - 1).
  last = t - 1 - jnp.argmax(attention_mask.astype(bool)[:, ::-1], axis=-1)
  return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], cache


def greedy_decode(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, *, max_new_tokens: int,
                  eos_id: int | Sequence[int], pad_id: int, scan_layers: bool | None = None) -> jax.Array:
  """Greedy decoding with the KV cache: prefill the prompt, then one token per step in a ``lax.while_loop``.

  The model is any NNX module called like :class:`Llama` (adapter-wrapped layers included) with a ``LlamaConfig``
  as ``model.config``. It is split into (graphdef, state) and the loop is jitted with the graphdef static, so
  repeated calls with equal shapes compile once; the function also works inside ``jax.jit`` / ``jax.vmap``.

  Args:
    model: the decoder.
    input_ids: [B, T] int prompt ids (left padding recommended; right padding also works).
    attention_mask: [B, T], 1 for real tokens.
    max_new_tokens: N, tokens to generate.
    eos_id: end-of-sequence id, or a sequence of ids that all end a row.
    pad_id: written after a row's EOS.
    scan_layers: passed to :meth:`Llama.__call__`; None (default) scans whenever the model is a :class:`Llama`
      whose layers share one structure, which compiles several times faster for deep models.

  Returns:
    [B, N] int32 generated ids; a row's EOS is kept and followed by ``pad_id``.
  """
  _check_decode_args(model, input_ids, attention_mask, max_new_tokens)
  graphdef, state = nnx.split(model)
  return _greedy_jit(graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                     _eos_array(eos_id), jnp.asarray(pad_id, jnp.int32), max_new_tokens=int(max_new_tokens),
                     scan_layers=scan_layers)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'scan_layers'))
def _greedy_jit(graphdef, state, input_ids, attention_mask, eos, pad_id, *, max_new_tokens, scan_layers):
  model = nnx.merge(graphdef, state)
  call_kwargs = _call_kwargs(model, scan_layers)
  b, t = input_ids.shape
  logits, cache = _prefill(model, input_ids, attention_mask, t + max_new_tokens, call_kwargs)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

  def cond(carry):
    step, _, _, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, logits, cache, done, out = carry
    token = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    done = done | jnp.isin(token, eos)
    logits, cache = model(token[:, None], jnp.ones((b, 1), jnp.int32), cache=cache, **call_kwargs)
    return step + 1, logits[:, 0], cache, done, out

  carry = (jnp.zeros((), jnp.int32), logits, cache, jnp.zeros((b,), bool), out)
  return jax.lax.while_loop(cond, body, carry)[-1]


def beam_search(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, *, num_beams: int,
                max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int, length_penalty: float = 1.0,
                return_scores: bool = False, scan_layers: bool | None = None):
  """Beam search with the KV cache (prefill once, then one token per beam per step).

  A hypothesis of n generated tokens (counting its EOS) scores ``sum log p / n ** length_penalty``. Each step expands
  the K alive beams, ranks the candidates by summed log-probability, moves EOS candidates ranked within the top K to
  the row's K finished slots (best K by score kept), and keeps the best K non-EOS candidates alive. A row stops once
  it holds K finished hypotheses (HF's ``early_stopping=True``); after N steps, alive beams compete with the finished
  ones at length N. With ``num_beams=1`` this is exactly greedy decoding.

  The model is called on B * K rows, row ``b * K + k`` being beam k of prompt b, from the prefill on; per-example
  state a caller put in the model (such as per-example adapter weights) must therefore be repeated K times
  (``jnp.repeat(w, K, axis=0)``).

  Args:
    model: the decoder (see :func:`greedy_decode`).
    input_ids: [B, T] int prompt ids.
    attention_mask: [B, T], 1 for real tokens.
    num_beams: K.
    max_new_tokens: N.
    eos_id: end-of-sequence id or ids.
    pad_id: written after EOS.
    length_penalty: exponent of the length normalisation (0 = plain sum of log-probs).
    return_scores: also return the winning scores.
    scan_layers: see :func:`greedy_decode`.

  Returns:
    [B, N] int32 best hypotheses (EOS kept, then ``pad_id``); and [B] float32 scores if ``return_scores``.
  """
  _check_decode_args(model, input_ids, attention_mask, max_new_tokens)
  if num_beams <= 0:
    raise ValueError(f'num_beams must be positive, got {num_beams}.')
  eos = _eos_array(eos_id)
  if eos.shape[0] >= model.config.vocab_size:
    raise ValueError(f'eos_id {eos_id!r} covers the whole vocabulary; nothing could stay alive.')
  graphdef, state = nnx.split(model)
  tokens, scores = _beam_jit(graphdef, state, jnp.asarray(input_ids, jnp.int32),
                             jnp.asarray(attention_mask, jnp.int32), eos, jnp.asarray(pad_id, jnp.int32),
                             jnp.asarray(length_penalty, jnp.float32), num_beams=int(num_beams),
                             max_new_tokens=int(max_new_tokens), scan_layers=scan_layers)
  return (tokens, scores) if return_scores else tokens


def _take(x, idx):
  """``x [B, C, ...]`` gathered at ``idx [B, K]`` along axis 1 -> ``[B, K, ...]``."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_select(step, logits, alive_logp, alive_seq, fin_score, fin_seq, done, *, eos, length_penalty, num_cand):
  """One beam-search step's bookkeeping: expand the K alive beams by the next-token ``logits [B * K, V]``.

  Returns:
    (alive_logp, alive_seq, fin_score, fin_seq, done, parent [B, K], token [B, K]): the updated beams, and for each
    new alive beam the beam it extends and its new token.
  """
  b, k_beams = alive_logp.shape
  vocab = logits.shape[-1]
  neg_inf = jnp.float32(-jnp.inf)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k_beams, vocab)
  cand = (alive_logp[:, :, None] + logp).reshape(b, k_beams * vocab)
  cand_logp, flat = jax.lax.top_k(cand, num_cand)  # [B, C], sorted best first
  parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
  seqs = _take(alive_seq, parent)
  seqs = jax.lax.dynamic_update_slice(seqs, token[:, :, None], (0, 0, step))
  is_eos = jnp.isin(token, eos)

  # Finished: EOS candidates ranked within the top K (as HF does; it is what makes K = 1 greedy).
  length = (step + 1).astype(jnp.float32)
  rank = jnp.arange(num_cand)[None, :]
  new_fin = jnp.where(is_eos & (rank < k_beams) & (cand_logp > neg_inf), cand_logp / length ** length_penalty,
                      neg_inf)
  fin_best, fin_idx = jax.lax.top_k(jnp.concatenate([fin_score, new_fin], axis=1), k_beams)
  fin_seq_new = _take(jnp.concatenate([fin_seq, seqs], axis=1), fin_idx)

  # Alive: the best K non-EOS candidates.
  alive_best, alive_idx = jax.lax.top_k(jnp.where(is_eos, neg_inf, cand_logp), k_beams)

  # Rows that already stopped keep their hypotheses; their beams keep decoding harmlessly (static shapes).
  keep = done[:, None]
  fin_score = jnp.where(keep, fin_score, fin_best)
  fin_seq = jnp.where(keep[..., None], fin_seq, fin_seq_new)
  alive_logp = jnp.where(keep, alive_logp, alive_best)
  alive_seq = jnp.where(keep[..., None], alive_seq, _take(seqs, alive_idx))
  done = done | (jnp.sum(fin_score > neg_inf, axis=-1) >= k_beams)
  return alive_logp, alive_seq, fin_score, fin_seq, done, _take(parent, alive_idx), _take(token, alive_idx)


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_beams', 'max_new_tokens', 'scan_layers'))
def _beam_jit(graphdef, state, input_ids, attention_mask, eos, pad_id, length_penalty, *, num_beams, max_new_tokens,
              scan_layers):
  model = nnx.merge(graphdef, state)
  call_kwargs = _call_kwargs(model, scan_layers)
  k_beams, n_new = num_beams, max_new_tokens
  b, t = input_ids.shape
  vocab = model.config.vocab_size
  neg_inf = jnp.float32(-jnp.inf)

  # Every call sees B * K rows (row b * K + k is beam k of prompt b), the prefill too: prefilling B rows and copying
  # the cache would be cheaper, but per-example inputs of the model (e.g. FedDPA's per-example adapter weights,
  # which the caller repeats K times) must have one batch size throughout.
  input_ids = jnp.repeat(input_ids, k_beams, axis=0)
  attention_mask = jnp.repeat(attention_mask, k_beams, axis=0)
  logits, cache = _prefill(model, input_ids, attention_mask, t + n_new, call_kwargs)
  # Enough candidates that K non-EOS ones always survive even if every beam's best tokens are EOS ids.
  num_cand = min(k_beams * (1 + eos.shape[0]), k_beams * vocab)

  # Only beam 0 is live at first, so the K copies of the prompt do not yield K identical hypotheses.
  alive_logp = jnp.full((b, k_beams), neg_inf).at[:, 0].set(0.0)
  alive_seq = jnp.full((b, k_beams, n_new), pad_id, jnp.int32)
  fin_score = jnp.full((b, k_beams), neg_inf)
  fin_seq = jnp.full((b, k_beams, n_new), pad_id, jnp.int32)

  def cond(carry):
    step, *_, done = carry
    return (step < n_new) & ~jnp.all(done)

  def body(carry):
    step, logits, cache, *beams = carry
    *beams, parent, token = _beam_select(step, logits, *beams, eos=eos, length_penalty=length_penalty,
                                         num_cand=num_cand)
    rows = (jnp.arange(b)[:, None] * k_beams + parent).reshape(-1)
    cache = KVCache(k=cache.k[:, rows], v=cache.v[:, rows], mask=cache.mask[rows], index=cache.index)
    logits, cache = model(token.reshape(-1, 1), jnp.ones((b * k_beams, 1), jnp.int32), cache=cache, **call_kwargs)
    return (step + 1, logits[:, 0], cache, *beams)

  carry = (jnp.zeros((), jnp.int32), logits, cache, alive_logp, alive_seq, fin_score, fin_seq,
           jnp.zeros((b,), bool))
  step, _, _, alive_logp, alive_seq, fin_score, fin_seq, done = jax.lax.while_loop(cond, body, carry)

  # Rows still running after N steps: their alive beams are complete hypotheses of length N.
  alive_score = jnp.where(done[:, None], neg_inf, alive_logp / step.astype(jnp.float32) ** length_penalty)
  scores = jnp.concatenate([fin_score, alive_score], axis=1)
  seqs = jnp.concatenate([fin_seq, alive_seq], axis=1)
  best = jnp.argmax(scores, axis=1)
  return (jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0],
          jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0])

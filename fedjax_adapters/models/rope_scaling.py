"""Rotary frequencies of the context-extension rules Hugging Face calls ``yarn``, ``dynamic`` (NTK-aware) and
``longrope`` (Phi-3 128k).

Pure functions of plain numbers (the :class:`~fedjax_adapters.models.llama.RopeScaling` fields), computed in
float32 as transformers' ``modeling_rope_utils`` does, so the decoder reproduces its logits.
"""
import math

import jax
import jax.numpy as jnp


def _base_inv_freq(head_dim: int, theta: float | jax.Array) -> jax.Array:
  """Plain RoPE's Dh/2 inverse frequencies ``theta ** (-2i / Dh)`` in float32."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 for ``factor <= 1``)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, attention_factor: float | None = None, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
  """The factor YaRN multiplies the rotary cos / sin by: given, or ``mscale(factor, mscale) / mscale(factor,
  mscale_all_dim)`` when both are set (DeepSeek style), else ``mscale(factor)``."""
  if attention_factor is not None:
    return float(attention_factor)
  if mscale and mscale_all_dim:
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
  return yarn_mscale(factor)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_position_embeddings: int, *,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> jax.Array:
  """YaRN's [Dh/2] inverse frequencies: extrapolated (kept) for the dims that turn more than ``beta_fast`` times over
  the original context, interpolated (divided by ``factor``) below ``beta_slow`` turns, a linear ramp between.

  The ramp runs over dims ``[low, high]``, where dim d turns ``r`` times over the original context L when
  ``d = Dh ln(L / (2 pi r)) / (2 ln theta)``; ``truncate`` floors ``low`` and ceils ``high``.
  """
  def correction_dim(turns):
    return head_dim * math.log(original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # as transformers does, to avoid a zero-width ramp
  ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolated = _base_inv_freq(head_dim, theta)
  keep = 1 - ramp
  return extrapolated / factor * (1 - keep) + extrapolated * keep


def dynamic_ntk_inv_freq(head_dim: int, theta: float, factor: float, max_position_embeddings: int,
                         seq_len: jax.Array) -> jax.Array:
  """Dynamic NTK scaling's [Dh/2] inverse frequencies for a forward that reaches ``seq_len`` positions.

  Up to ``max_position_embeddings`` positions the frequencies are plain RoPE's; beyond, the base grows to
  ``theta * (factor * seq_len / max_pos - (factor - 1)) ** (Dh / (Dh - 2))``. transformers recomputes them from the
  largest position id of each forward call (the whole batch), which is what ``seq_len`` should be.
  """
  seq = jnp.maximum(jnp.asarray(seq_len, jnp.float32), jnp.float32(max_position_embeddings))
  base = theta * ((factor * seq / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
  return _base_inv_freq(head_dim, base)


def longrope_attention_factor(factor: float, original_max_position_embeddings: int,
                              attention_factor: float | None = None) -> float:
  """LongRoPE's factor on the rotary cos / sin: given, else ``sqrt(1 + ln(factor) / ln(original))`` (1 for
  ``factor <= 1``), as transformers' ``_compute_longrope_parameters`` defaults it."""
  if attention_factor is not None:
    return float(attention_factor)
  if factor <= 1.0:
    return 1.0
  return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))


def longrope_inv_freq(head_dim: int, theta: float, short_factor, long_factor, original_max_position_embeddings: int,
                      seq_len: jax.Array) -> jax.Array:
  """LongRoPE's [Dh/2] inverse frequencies ``theta ** (-2i / Dh) / ext_i``.

  ``ext`` is ``long_factor`` when the forward call reaches ``seq_len > original_max_position_embeddings`` positions
  (transformers uses the largest position id of the call, the whole batch's), else ``short_factor``.
  """
  long = jnp.asarray(seq_len) > original_max_position_embeddings
  ext = jnp.where(long, jnp.asarray(long_factor, jnp.float32), jnp.asarray(short_factor, jnp.float32))
  return 1.0 / (ext * theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))

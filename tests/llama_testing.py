"""Tiny LLaMA models for tests: random weights without compiling an initializer, and GGUF files written as
llama.cpp's converter writes them (test_llama, test_llama_family)."""
import re

import gguf
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_adapters.models import llama_loaders
from fedjax_adapters.models.llama import LlamaConfig, abstract_llama

HF_TO_GGUF = {'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v',
              'self_attn.o_proj': 'attn_output', 'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
              'mlp.down_proj': 'ffn_down', 'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm'}
_TOP_LEVEL = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
              'lm_head.weight': 'output.weight'}


def random_llama(config: LlamaConfig, seed: int = 0, other_scale: float = 1.0):
  """A model of ``config`` with random weights everywhere: norm scales ``1 + 0.3 N(0, 1)``, kernels
  ``N(0, 1/fan_in)``, the rest (embeddings, biases) ``other_scale * N(0, 1)``.

  The weights come from numpy into an abstract model: initialising eagerly would compile a random kernel per
  parameter shape, which on a small CPU costs more than the tests themselves.
  """
  model = abstract_llama(config)
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      shape = var.get_value().shape
      if path[-1] == 'scale':
        value = 1 + 0.3 * rng.standard_normal(shape)
      elif path[-1] == 'kernel':
        value = rng.standard_normal(shape) / np.sqrt(shape[0])
      else:
        value = other_scale * rng.standard_normal(shape)
      var.set_value(jnp.asarray(value, jnp.float32))
  return model


def llama_cpp_permute(weight, num_heads):
  """What llama.cpp's convert_hf_to_gguf.py does to q/k rows: each head's [2, Dh/2] halves become [Dh/2, 2] pairs."""
  dh = weight.shape[0] // num_heads
  return weight.reshape(num_heads, 2, dh // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_cpp_rope_freqs(config):
  """The ``rope_freqs`` tensor llama.cpp's converter writes for Llama 3 rope scaling (its own formula, float32)."""
  s = config.rope_scaling
  freqs = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float32) / config.head_dim))
  low_w = s.original_max_position_embeddings / s.low_freq_factor
  high_w = s.original_max_position_embeddings / s.high_freq_factor
  out = []
  for f in freqs:
    w = 2 * np.pi / f
    if w < high_w:
      out.append(1.0)
    elif w > low_w:
      out.append(s.factor)
    else:
      smooth = (s.original_max_position_embeddings / w - s.low_freq_factor) / (s.high_freq_factor -
                                                                               s.low_freq_factor)
      out.append(1 / ((1 - smooth) / s.factor + smooth))
  return np.array(out, np.float32)


def _header(writer, config):
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_vocab_size(config.vocab_size)
  scaling = getattr(config, 'rope_scaling', None)
  if scaling is not None and scaling.rope_type == 'linear':
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(scaling.factor)
  elif scaling is not None:
    writer.add_tensor('rope_freqs.weight', llama_cpp_rope_freqs(config))


def write_gguf(path, model, arch='llama', quant=None) -> dict:
  """Writes ``model`` as GGUF (names, ``{arch}.*`` metadata, q/k rows permuted for llama); returns what was written
  (dequantized when ``quant`` is a GGML quantization type of the 2-d tensors)."""
  config = model.config
  writer = gguf.GGUFWriter(str(path), arch)
  _header(writer, config)
  written = {}
  for name, w in llama_loaders.to_hf_state_dict(model).items():
    match = re.fullmatch(r'model\.layers\.(\d+)\.(.+)\.(weight|bias)', name)
    gname = f'blk.{match.group(1)}.{HF_TO_GGUF[match.group(2)]}.{match.group(3)}' if match else _TOP_LEVEL[name]
    if arch == 'llama' and re.search(r'q_proj\.(weight|bias)$', name):
      w = llama_cpp_permute(w, config.num_attention_heads)
    elif arch == 'llama' and re.search(r'k_proj\.(weight|bias)$', name):
      w = llama_cpp_permute(w, config.num_key_value_heads)
    if quant is not None and w.ndim == 2:
      data = gguf.quants.quantize(w, quant)
      writer.add_tensor(gname, data, raw_dtype=quant)  # The writer derives the element shape from the bytes.
      w = gguf.quants.dequantize(data, quant).reshape(w.shape)
    else:
      writer.add_tensor(gname, w)
    written[gname] = w
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return written

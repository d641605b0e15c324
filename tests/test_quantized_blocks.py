"""Block-quantized frozen bases: 4-bit QLoRA-style layers and GGUF files kept quantized (models.quantized,
llama_loaders.load_gguf(keep_quantized=True)).

References: dequantize-then-matmul for the layer; ``gguf.quants.dequantize`` (the default GGUF load) for the blocks
kept as the file stores them; the model whose kernels are the dequantized values for a quantized model.
"""
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters.models import llama_loaders, quantized
from fedjax_adapters.models.llama import LlamaConfig
from fedjax_adapters.nn import AdapterSpec, adapt, split_model
from fedjax_adapters.nn import layers as L
from llama_testing import random_llama, write_gguf

# Input widths multiples of 32 (GGUF's block): hidden 64, intermediate 96.
CONFIG = dict(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5)
IDS = jnp.array([[3, 9, 1, 17, 4, 30, 2], [7, 1, 22, 30, 11, 2, 8]], jnp.int32)


@jax.jit
def _logits(graphdef, state):
  return nnx.merge(graphdef, state)(IDS)


def _forward(model):
  return _logits(*nnx.split(model))


def test_pack_nibbles_round_trip_and_blockwise_error_bound():
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.integers(0, 16, (8, 5)), jnp.uint8)
  packed = quantized.pack_nibbles(values)
  assert packed.shape == (4, 5) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(quantized.unpack_nibbles(packed), values)
  kernel = jnp.asarray(rng.standard_normal((128, 24)), jnp.float32)
  for bits in (4, 8):
    v, scale, offset = quantized.quantize_blockwise(kernel, bits=bits, block=64)
    assert v.shape == ((64 if bits == 4 else 128), 24) and scale.shape == offset.shape == (2, 24)
    deq = quantized.dequantize_blockwise(v, scale, offset, bits=bits)
    bound = jnp.repeat(scale, 64, axis=0) / 2 + 1e-6  # round to nearest: at most half a step per element
    assert bool(jnp.all(jnp.abs(deq - kernel) <= bound)), bits
  with pytest.raises(ValueError, match='multiple of block=64'):
    quantized.quantize_blockwise(kernel[:96], block=64)


def test_block_quantized_layer_equals_dequantize_then_matmul():
  rng = np.random.default_rng(1)
  linear = nnx.Linear(64, 24, rngs=nnx.Rngs(0))
  linear.bias.set_value(jnp.asarray(rng.standard_normal(24), jnp.float32))
  layer = quantized.BlockQuantizedLinear.from_linear(linear, bits=4, block=32)
  x = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.float32)
  v, scale, offset = quantized.quantize_blockwise(linear.kernel.get_value(), bits=4, block=32)
  ref = x @ quantized.dequantize_blockwise(v, scale, offset, bits=4) + linear.bias.get_value()
  np.testing.assert_allclose(layer(x), ref, rtol=1e-5, atol=1e-5)
  assert (layer.in_features, layer.out_features) == (64, 24)


def test_4bit_base_equals_model_with_dequantized_kernels_and_trains_only_lora():
  spec = AdapterSpec(target=r'.*(q_proj|v_proj)', rank=4, num_global=1, num_local=1)
  model = quantized.quantize_linears(random_llama(LlamaConfig(**CONFIG), 0), bits=4, block=32)
  adapt(model, spec, key=jax.random.key(1))
  assert sum(isinstance(m, quantized.BlockQuantizedLinear) for _, m in nnx.iter_graph(model)) == 2 * 7
  ref = adapt(random_llama(LlamaConfig(**CONFIG), 0), spec, key=jax.random.key(1))
  for path, layer in nnx.iter_graph(ref):
    if isinstance(layer, nnx.Linear) and path[-1] != 'lm_head':
      v, scale, offset = quantized.quantize_blockwise(layer.kernel.get_value(), bits=4, block=32)
      layer.kernel.set_value(quantized.dequantize_blockwise(v, scale, offset, bits=4))
  np.testing.assert_allclose(_forward(model), _forward(ref), rtol=1e-5, atol=1e-5)
  _, parts = split_model(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(parts['adapters']))
  assert not [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and v.get_value().dtype == jnp.uint8]


@pytest.mark.parametrize('quant', ['Q8_0', 'Q4_0', 'Q4_1'])
def test_gguf_kept_quantized_equals_the_dequantized_load(tmp_path, quant):
  path = tmp_path / 'tiny.gguf'
  write_gguf(path, random_llama(LlamaConfig(**CONFIG), 0), quant=gguf.GGMLQuantizationType[quant])
  plain, _ = llama_loaders.load_gguf(path)
  kept, _ = llama_loaders.load_gguf(path, keep_quantized=True)
  layers = {'.'.join(map(str, p)): m for p, m in nnx.iter_graph(kept) if isinstance(m, quantized.BlockQuantizedLinear)}
  assert len(layers) == 2 * 7 + 1  # every projection and the (untied) head; the embedding table is dequantized
  for name, layer in layers.items():
    ref = nnx.iter_graph(plain)
    dense = dict((('.'.join(map(str, p)), m) for p, m in ref))[name]
    # The same values as gguf.quants.dequantize gives (the default load), bit for bit.
    np.testing.assert_array_equal(layer.kernel_value(), dense.kernel.get_value())
    assert layer.values.get_value().dtype == jnp.uint8
  np.testing.assert_allclose(_forward(kept), _forward(plain), rtol=1e-6, atol=1e-6)
  quant_bytes = sum(x.nbytes for _, m in layers.items() for x in jax.tree.leaves(nnx.state(m)))
  dense_bytes = sum(4 * m.in_features * m.out_features for m in layers.values())
  assert quant_bytes < dense_bytes * (0.3 if quant == 'Q8_0' else 0.2), (quant_bytes, dense_bytes)


def test_gguf_lever_keeps_the_files_blocks_and_lora_trains_on_them(tmp_path):
  """--quantize gguf: the runner's levers leave a kept-quantized base as loaded; LoRA on it equals LoRA on the
  expanded load (same values), and the LoRA factors get gradients while the blocks stay uint8."""
  from fedjax_adapters.experiments.runlib import memory  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'tiny.gguf'
  write_gguf(path, random_llama(LlamaConfig(**CONFIG), 0), quant=gguf.GGMLQuantizationType.Q4_1)
  spec = AdapterSpec(target=r'.*(q_proj|v_proj)', rank=4, num_global=1, bias=False)
  kept = adapt(llama_loaders.load_gguf(path, keep_quantized=True)[0], spec, key=jax.random.key(1))
  plain = adapt(llama_loaders.load_gguf(path)[0], spec, key=jax.random.key(1))
  blocks = [p for p, m in nnx.iter_graph(kept) if isinstance(m, quantized.BlockQuantizedLinear)]
  memory.apply_levers(kept, memory.Levers(quantize='gguf'))
  assert [p for p, m in nnx.iter_graph(kept) if isinstance(m, quantized.BlockQuantizedLinear)] == blocks
  assert len(blocks) == 2 * 7 + 1
  np.testing.assert_allclose(_forward(kept), _forward(plain), rtol=1e-6, atol=1e-6)
  mdef, parts = split_model(kept)
  grads = jax.tree.leaves(jax.grad(lambda a: jnp.sum(mdef.apply({**parts, 'adapters': a}, IDS)[0] ** 2))(
      parts['adapters']))
  assert len(grads) == 2 * 2 * 2 and all(bool(jnp.isfinite(g).all()) for g in grads)  # A and B of q, v per layer
  assert sum(float(jnp.abs(g).max()) > 0 for g in grads) >= 4  # B starts at zero, so at least every B moves
  assert {m.values.get_value().dtype for p, m in nnx.iter_graph(kept)
          if isinstance(m, quantized.BlockQuantizedLinear)} == {np.dtype('uint8')}

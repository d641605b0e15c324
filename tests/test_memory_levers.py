"""Memory levers for a frozen LLaMA base under LoRA (fedjax_adapters.models.quantized, llama.set_remat).

References: the float32 model for the bf16 base; the model without remat for gradients; dequantize-then-matmul
for the int8 base.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters.models import quantized
from fedjax_adapters.models.llama import LlamaConfig, set_remat
from fedjax_adapters.nn import AdapterSpec, adapt, split_model
from fedjax_adapters.nn import layers as L
from llama_testing import random_llama

TINY = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            rms_norm_eps=1e-5)
IDS = jnp.array([[0, 0, 5, 9, 3, 17, 4], [7, 1, 22, 30, 11, 2, 8]], jnp.int32)
MASK = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)


def _adapted(seed=0):
  """Tiny LLaMA with FedDPA's LoRA (global + local, r 4 on q/v); B factors made nonzero so the adaptors count."""
  model = random_llama(LlamaConfig(**TINY), seed)
  spec = AdapterSpec(target=r'.*(q_proj|v_proj)', rank=4, num_global=1, num_local=1)
  adapt(model, spec, key=jax.random.key(1))
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, (L.GlobalAdapter, L.LocalAdapter)) and path[-1].endswith('_b'):
      var.set_value(jnp.asarray(0.3 * rng.standard_normal(var.get_value().shape), jnp.float32))
  return model


@jax.jit
def _logits(graphdef, state):
  return nnx.merge(graphdef, state)(IDS, MASK)


def _forward(model):
  return _logits(*nnx.split(model))


def test_bf16_base_with_f32_lora_is_close_to_f32():
  ref = _forward(_adapted())
  model = quantized.cast_frozen(_adapted(), jnp.bfloat16)
  kinds = {type(v): v.get_value().dtype for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  assert kinds[nnx.Param] == jnp.bfloat16
  assert kinds[L.GlobalAdapter] == kinds[L.LocalAdapter] == jnp.float32
  out = _forward(model)
  assert out.dtype == jnp.float32
  # Stated tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-9 per weight); through two layers the logits
  # stay within 2% of the logits' scale.
  err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
  assert 0 < err < 2e-2, err


def test_remat_gives_the_same_gradients():
  def grads(policy):
    mdef, parts = split_model(set_remat(_adapted(), policy))

    @jax.jit
    def g(adapters, local):
      def loss(adapters, local):
        logits, _ = mdef.apply({**parts, 'adapters': adapters, 'local': local}, IDS, MASK)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * MASK)
      return jax.grad(loss, argnums=(0, 1))(adapters, local)
    return g(parts['adapters'], parts['local'])

  ref = grads(None)
  for policy in ('full', 'dots'):
    got = grads(policy)  # float32 reassociation only: atol 1e-6 on gradients of scale ~0.1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref)) > 0


def test_remat_rejects_unknown_policy():
  with pytest.raises(ValueError, match="'bogus'"):
    set_remat(_adapted(), 'bogus')


def test_quantized_matmul_equals_dequantize_then_matmul():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.standard_normal((32, 24)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 5, 32)), jnp.float32)
  q, scale = quantized.quantize_int8(kernel)
  assert q.dtype == jnp.int8 and scale.shape == (24,)
  deq = quantized.dequantize_int8(q, scale)
  assert bool(jnp.all(jnp.abs(deq - kernel) <= scale / 2 + 1e-6))  # round-to-nearest error bound
  np.testing.assert_allclose(quantized.quantized_matmul(x, q, scale), x @ deq, rtol=1e-5, atol=1e-5)


def test_quantized_base_equals_model_with_dequantized_kernels():
  model = quantized.quantize_linears(_adapted())
  n = sum(isinstance(m, quantized.QuantizedLinear) for _, m in nnx.iter_graph(model))
  assert n == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head kept
  assert not [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and v.get_value().dtype == jnp.int8]
  ref = _adapted()
  for path, layer in nnx.iter_graph(ref):
    if isinstance(layer, nnx.Linear) and path[-1] != 'lm_head':
      layer.kernel.set_value(quantized.dequantize_int8(*quantized.quantize_int8(layer.kernel.get_value())))
  np.testing.assert_allclose(_forward(model), _forward(ref), rtol=1e-4, atol=1e-4)
  # LoRA factors stay float32 and trainable; the int8 weights are not Params.
  mdef, parts = split_model(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(parts['adapters']))
  assert all(x.dtype != jnp.int8 for x in jax.tree.leaves(parts['base']))


def test_quantizing_before_adapt_equals_quantizing_after():
  spec = AdapterSpec(target=r'.*(q_proj|v_proj)', rank=4, num_global=1, num_local=1)
  before = quantized.quantize_linears(random_llama(LlamaConfig(**TINY), 0))
  adapt(before, spec, key=jax.random.key(1))
  after = quantized.quantize_linears(adapt(random_llama(LlamaConfig(**TINY), 0), spec, key=jax.random.key(1)))
  assert sum(isinstance(m, L.AdaptedLinear) for _, m in nnx.iter_graph(before)) == 4
  np.testing.assert_array_equal(_forward(before), _forward(after))


def test_bf16_base_computing_in_bf16_is_close_to_f32():
  ref = _forward(_adapted())
  model = quantized.cast_frozen(_adapted(), jnp.bfloat16, compute=True)
  assert all(m.dtype == jnp.bfloat16 for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear))
  out = _forward(model)
  assert out.dtype == jnp.float32  # logits are at least float32
  # Stated tolerance: bf16 activations as well as weights (8 mantissa bits each); within 3% of the logits' scale.
  err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
  assert 0 < err < 3e-2, err

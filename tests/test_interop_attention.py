"""LoRA on ``nnx.MultiHeadAttention`` (``nnx.LinearGeneral`` projections) out to PyTorch, and PEFT's saved base
embedding weights in.

References: a torch attention block written out here with ``nn.Linear`` projections of the same names
(``attn.query`` ... ``attn.out``), which PEFT adapts like a ``q_proj``. The JAX block's output (adapted, on the same
weights) must equal (<= 1e-5, float32) the torch block with the merged state dict, and the plain torch block from
``torch_state_dict`` plus the exported PEFT LoRA. A LoRA PEFT trained on a tiny LLaMA's ``embed_tokens`` and
``lm_head`` (saved with their base weights, PEFT's default) imports and reproduces PEFT's logits; docs/interop.md's
``load_weights`` loads a tied LLaMA's merged state dict (which has no ``lm_head.weight``) into transformers.
"""
import dataclasses
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, LlamaForCausalLM

from fedjax_adapters import interop
from fedjax_adapters.models import llama, llama_loaders
from fedjax_adapters.nn import AdapterSpec, adapt, split_model

HEADS, HEAD_DIM, FEATURES = 2, 3, 5


class Block(nnx.Module):
  """Self-attention (LinearGeneral q/k/v/out) and a linear head."""

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=FEATURES, qkv_features=HEADS * HEAD_DIM,
                                       out_features=FEATURES, decode=False, rngs=rngs)
    self.head = nnx.Linear(FEATURES, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.attn(x))


class TorchBlock(torch.nn.Module):
  """The same block in PyTorch: heads split with view(..., heads, head_dim), scores scaled by 1/sqrt(head_dim)."""

  def __init__(self):
    super().__init__()
    self.attn = torch.nn.Module()
    for name in ('query', 'key', 'value'):
      setattr(self.attn, name, torch.nn.Linear(FEATURES, HEADS * HEAD_DIM))
    self.attn.out = torch.nn.Linear(HEADS * HEAD_DIM, FEATURES)
    self.head = torch.nn.Linear(FEATURES, 3)

  def forward(self, x):
    b, length, _ = x.shape
    q, k, v = (getattr(self.attn, n)(x).view(b, length, HEADS, HEAD_DIM) for n in ('query', 'key', 'value'))
    weights = torch.softmax(torch.einsum('bqhd,bkhd->bhqk', q / HEAD_DIM ** 0.5, k), dim=-1)
    heads = torch.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, length, HEADS * HEAD_DIM)
    return self.head(self.attn.out(heads))


def _randomize(tree, seed, scale=0.5):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), tree)


def _torch(block, state_dict):
  block.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()})
  return block


def _run(block, x):
  with torch.no_grad():
    return block(torch.tensor(x)).numpy()


@pytest.fixture(scope='module')
def attention_block():
  spec = AdapterSpec(target=r'attn\.(query|value|out)', rank=2, alpha=4.0, num_global=2, bias=True, conv=False,
                     init='kaiming')
  mdef, parts = split_model(adapt(Block(nnx.Rngs(0)), spec, key=jax.random.key(1)))
  parts = dict(parts, base=_randomize(parts['base'], 2), adapters=_randomize(parts['adapters'], 3))
  x = np.random.default_rng(4).standard_normal((2, 4, FEATURES)).astype(np.float32)
  mix = np.array([0.3, 0.9], np.float32)
  adapted = np.asarray(jax.jit(mdef.apply)(parts, jnp.asarray(x), mix=jnp.asarray(mix))[0])
  plain = np.asarray(jax.jit(mdef.apply)(parts, jnp.asarray(x), mix=jnp.zeros(2))[0])
  assert np.abs(adapted - plain).max() > 1e-2  # the adaptors matter
  return parts, x, mix, adapted, plain


def test_torch_state_dict_of_attention_is_the_linear_form(attention_block):
  parts, x, _, _, plain = attention_block
  sd = interop.torch_state_dict(parts['base'])
  assert sd['attn.query.weight'].shape == (HEADS * HEAD_DIM, FEATURES) and sd['attn.query.bias'].shape == (6,)
  assert sd['attn.out.weight'].shape == (FEATURES, HEADS * HEAD_DIM)
  np.testing.assert_allclose(_run(_torch(TorchBlock(), sd), x), plain, atol=1e-5, rtol=0)
  no_bias = {'kernel': np.zeros((FEATURES, HEADS, HEAD_DIM))}
  with pytest.raises(ValueError, match=r"layer 'q'.*pass in_axes=\{'q'"):
    interop.torch_state_dict({'q': no_bias})
  assert interop.torch_state_dict({'q': no_bias}, in_axes={'q': 1})['q.weight'].shape == (6, FEATURES)


def test_attention_lora_as_merged_state_dict_and_as_peft(attention_block, tmp_path):
  parts, x, mix, adapted, _ = attention_block
  merged = _torch(TorchBlock(), interop.merged_state_dict(parts, alpha=4.0, mix=mix))
  np.testing.assert_allclose(_run(merged, x), adapted, atol=1e-5, rtol=0)

  interop.export_global_adapter(tmp_path / 'attn', parts, alpha=4.0, mix=mix, task_type=None)
  config, layers = interop.load_peft_adapter(tmp_path / 'attn')
  assert config['target_modules'] == ['out', 'query', 'value'] and config['lora_bias']
  assert layers['attn.query'].a.shape == (4, FEATURES) and layers['attn.out'].b.shape == (FEATURES, 4)
  base = _torch(TorchBlock(), interop.torch_state_dict(parts['base']))
  np.testing.assert_allclose(_run(PeftModel.from_pretrained(base, str(tmp_path / 'attn')), x), adapted, atol=1e-5,
                             rtol=0)


def test_a_kernel_that_is_not_input_then_output_axes_is_refused_naming_the_layer():
  with pytest.raises(ValueError, match=r"layer 'mlp'.*\[4, 5, 6\].*d_in=7"):
    interop.kernel_split((4, 5, 6), d_in=7, path='mlp')
  assert interop.kernel_split((4, 5, 6), d_in=20) == 2 and interop.kernel_split((4, 5, 6), d_out=30) == 1


# ---------------------------------------------------------------------------------------------------------------
# A LoRA on embed_tokens and lm_head, saved by PEFT with their base weights.
# ---------------------------------------------------------------------------------------------------------------

CONFIG = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
IDS = np.array([[3, 9, 1, 17, 4], [7, 2, 30, 11, 5]], np.int64)


def test_import_a_lora_on_embed_tokens_and_lm_head_saved_with_base_weights(tmp_path):
  spec = AdapterSpec(target=r'.*(q_proj|embed_tokens|lm_head)', rank=4, alpha=8.0, embed=True, bias=False,
                     conv=False)
  mdef, parts = split_model(adapt(llama.Llama(CONFIG, rngs=nnx.Rngs(0)), spec, key=jax.random.key(1)))
  parts = dict(parts, base=_randomize(parts['base'], 5, 0.3))
  base_dir = llama_loaders.save_hf_checkpoint(tmp_path / 'base', llama_loaders.llama_from_base_parts(CONFIG,
                                                                                                      parts['base']))
  torch.manual_seed(0)
  hf = LlamaForCausalLM.from_pretrained(str(base_dir), attn_implementation='eager', dtype=torch.float32)
  peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'embed_tokens', 'lm_head'],
                                             init_lora_weights=False))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # PEFT: "Setting save_embedding_layers to True"
    peft_model.save_pretrained(str(tmp_path / 'lora'))
  saved = interop.saved_base_weights(tmp_path / 'lora')
  assert sorted(saved) == ['lm_head', 'model.embed_tokens']
  with torch.no_grad():
    expected = peft_model(input_ids=torch.tensor(IDS)).logits.numpy()
    with peft_model.disable_adapter():
      assert np.abs(expected - peft_model(input_ids=torch.tensor(IDS)).logits.numpy()).max() > 1e-2

  with warnings.catch_warnings():
    warnings.simplefilter('error')  # the saved base weights equal the model's: no warning
    adapters = interop.import_lora(tmp_path / 'lora', parts['adapters'], alpha=8.0, base=parts['base'])
  logits, _ = mdef.apply(dict(parts, adapters=adapters), jnp.asarray(IDS, jnp.int32),
                         jnp.ones(IDS.shape, jnp.int32))
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)

  other = dict(parts['base'], lm_head=jax.tree.map(lambda v: v + 1.0, parts['base']['lm_head']))
  with pytest.warns(UserWarning, match=r"different base: its 'lm_head' weight differs .*max \|difference\| 1"):
    interop.import_lora(tmp_path / 'lora', parts['adapters'], alpha=8.0, base=other)


def _doc_block(marker: str) -> str:
  """The first python block after ``marker`` in docs/interop.md."""
  text = (pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'interop.md').read_text()
  return text.split(marker, 1)[1].split('```python\n', 1)[1].split('```', 1)[0]


def test_documented_load_weights_loads_a_tied_llama_merged_state_dict(tmp_path):
  config = dataclasses.replace(CONFIG, tie_word_embeddings=True)
  spec = AdapterSpec(target=r'.*\.(q_proj|v_proj)', rank=2, alpha=None, num_global=2, bias=False, conv=False)
  mdef, parts = split_model(adapt(llama.Llama(config, rngs=nnx.Rngs(0)), spec, key=jax.random.key(2)))
  parts = dict(parts, base=_randomize(parts['base'], 6, 0.3), adapters=_randomize(parts['adapters'], 7, 0.3))
  pi = np.array([0.8, 0.2], np.float32)
  expected, _ = mdef.apply(parts, jnp.asarray(IDS, jnp.int32), jnp.ones(IDS.shape, jnp.int32), mix=jnp.asarray(pi))
  folder = llama_loaders.save_hf_checkpoint(tmp_path / 'base', llama_loaders.llama_from_base_parts(config,
                                                                                                    parts['base']))
  state_dict = interop.merged_state_dict(parts, mix=pi)
  assert 'lm_head.weight' not in state_dict
  hf = LlamaForCausalLM(AutoConfig.from_pretrained(str(folder)))
  with pytest.raises(RuntimeError, match='lm_head.weight'):
    hf.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()})  # strict: the tied key is missing
  namespace = {}
  exec(_doc_block('<!-- tested: load_weights'), namespace)  # pylint: disable=exec-used
  namespace['load_weights'](hf, state_dict)
  with torch.no_grad():
    got = hf(input_ids=torch.tensor(IDS)).logits.numpy()
  np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
    namespace['load_weights'](hf, {k: v for k, v in state_dict.items() if k != 'model.norm.weight'})

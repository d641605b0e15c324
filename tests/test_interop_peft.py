"""PEFT interop against the real consumer: torch + transformers + peft load what fedjax_adapters.interop writes.

References: the JAX model's logits / predictions on the same weights (<= 1e-4, float32, CPU) for a tiny random
LLaMA (global, local, fixed-weight mixtures both as one exported LoRA and as PEFT's own weighted combination, and a
FLoRAL-style mixture of C adaptors with per-layer ranks), SmolLM2-135M from its GGUF, and a FLoRAL MLP client in a
plain torch MLP (merged state dict, and PEFT with LoRA biases); PEFT's own saved LoRA imported into our adaptors;
and, without torch, merged weights of every adaptor kind against the adapted forward.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from fedjax_adapters import interop
from fedjax_adapters.models import MLP, llama, llama_loaders
from fedjax_adapters.nn import AdapterSpec, adapt, split_model
from fedjax_adapters.nn.adapt import build_and_split

CONFIG = llama.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
IDS = np.array([[0, 0, 5, 9, 3, 17, 4], [7, 1, 22, 30, 11, 2, 8]], np.int64)
MASK = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], np.int64)
POSITIONS = np.maximum(np.cumsum(MASK, axis=-1) - 1, 0)
REAL = MASK.astype(bool)
DUAL = AdapterSpec(target=r'.*\.(q_proj|v_proj)', rank=4, alpha=16.0, num_global=1, num_local=1, bias=False,
                   conv=False, init='kaiming', dropout=0.0)


def _randomize(tree, seed, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), tree)


def adapted_llama(spec, seed=0, config=CONFIG):
  """(mdef, parts) of a random tiny LLaMA with random (nonzero) adaptors."""
  def make(key):
    return adapt(llama.Llama(config, rngs=nnx.Rngs(key)), spec, key=jax.random.fold_in(key, 1))
  mdef, parts = build_and_split(make, jax.random.key(seed))
  parts = dict(parts, adapters=_randomize(parts['adapters'], seed + 1))
  if parts['local']:
    parts['local'] = _randomize(parts['local'], seed + 2)
  return mdef, parts


@functools.partial(jax.jit, static_argnames=('mdef',))
def jax_logits(mdef, parts, ids, mask, gw, lw, mix):
  logits, _ = mdef.apply(parts, ids, mask, global_weight=gw, local_weight=lw, mix=mix, scan_layers=True)
  return logits


def ours(mdef, parts, gw, lw, mix=None, ids=IDS, mask=MASK):
  mix = jnp.ones((1,)) if mix is None else jnp.asarray(mix)
  return np.asarray(jax_logits(mdef, parts, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                               jnp.float32(gw), jnp.float32(lw), mix))


def torch_logits(model, ids=IDS, mask=MASK, positions=POSITIONS):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()


def torch_base(folder):
  return AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation='eager', dtype=torch.float32)


def test_feddpa_adapters_load_in_peft_and_reproduce_the_logits(tmp_path):
  mdef, parts = adapted_llama(DUAL)
  # The base is rebuilt from the frozen parts, as for a model that came from GGUF.
  base_dir = llama_loaders.save_hf_checkpoint(tmp_path / 'base', llama_loaders.llama_from_base_parts(CONFIG,
                                                                                                      parts['base']))
  interop.export_global_adapter(tmp_path / 'global', parts, alpha=16.0)
  interop.export_local_adapter(tmp_path / 'local', parts, alpha=16.0)
  interop.export_mixed_adapter(tmp_path / 'mixed', parts, alpha=16.0, global_weight=0.3, local_weight=0.7)
  config, layers = interop.load_peft_adapter(tmp_path / 'global')
  assert (config['r'], config['lora_alpha'], config['target_modules']) == (4, 16, ['q_proj', 'v_proj'])
  assert layers['model.layers.1.self_attn.v_proj'].a.shape == (4, 32)
  assert layers['model.layers.1.self_attn.v_proj'].b.shape == (16, 4)

  model = PeftModel.from_pretrained(torch_base(base_dir), str(tmp_path / 'global'), adapter_name='global')
  model.load_adapter(str(tmp_path / 'local'), adapter_name='local')
  model.load_adapter(str(tmp_path / 'mixed'), adapter_name='mixed')
  # PEFT's own exact combination of the two folders (rank 2r, weights folded into A) equals the exported mix.
  model.add_weighted_adapter(['global', 'local'], [0.3, 0.7], 'combined', combination_type='cat')
  with model.disable_adapter():
    plain = torch_logits(model)
  np.testing.assert_allclose(plain[REAL], ours(mdef, parts, 0.0, 0.0)[REAL], atol=1e-4, rtol=0)
  for name, (gw, lw) in {'global': (1.0, 0.0), 'local': (0.0, 1.0), 'mixed': (0.3, 0.7),
                         'combined': (0.3, 0.7)}.items():
    model.set_adapter(name)
    expected = ours(mdef, parts, gw, lw)[REAL]
    np.testing.assert_allclose(torch_logits(model)[REAL], expected, atol=1e-4, rtol=0, err_msg=name)
    assert np.abs(expected - plain[REAL]).max() > 1e-2, name  # the adapter matters


def test_floral_mixture_on_a_llama_is_one_lora_with_per_layer_ranks(tmp_path):
  # C = 3 unscaled adaptors with FLoRAL's rank budget: q_proj (32 -> 32) and v_proj (32 -> 16) get different ranks.
  spec = AdapterSpec(target=r'.*\.(q_proj|v_proj)', rank=0.3, alpha=None, num_global=3, bias=False, conv=False)
  mdef, parts = adapted_llama(spec, seed=3)
  pi = interop.floral_mixture(np.array([0.5, -1.0, 2.0]))
  interop.export_floral_client(tmp_path / 'floral', parts, mix=pi, task_type='CAUSAL_LM')
  config, layers = interop.load_peft_adapter(tmp_path / 'floral')
  # rank C * r: q_proj 3 * 4, v_proj 3 * 3 (a rank_pattern entry); unscaled, so lora_alpha = r everywhere
  assert (layers['model.layers.0.self_attn.q_proj'].rank, layers['model.layers.0.self_attn.v_proj'].rank) == (12, 9)
  assert (config['r'], config['lora_alpha'], config['lora_bias']) == (12, 12, False)
  assert config['rank_pattern'] == config['alpha_pattern'] == {r'model\.layers\.0\.self_attn\.v_proj': 9,
                                                                r'model\.layers\.1\.self_attn\.v_proj': 9}
  base_dir = llama_loaders.save_hf_checkpoint(tmp_path / 'base',
                                              llama_loaders.llama_from_base_parts(CONFIG, parts['base']))
  model = PeftModel.from_pretrained(torch_base(base_dir), str(tmp_path / 'floral'))
  np.testing.assert_allclose(torch_logits(model)[REAL], ours(mdef, parts, 1.0, 0.0, pi)[REAL], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# A FLoRAL MLP client in a plain torch MLP.
# ---------------------------------------------------------------------------------------------------------------


class TorchMLP(torch.nn.Module):
  """fedjax_adapters.models.MLP in PyTorch: the same layer names (layers.0, layers.1)."""

  def __init__(self, widths):
    super().__init__()
    self.layers = torch.nn.ModuleList([torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])

  def forward(self, x):
    x = x.flatten(1)
    for layer in self.layers[:-1]:
      x = torch.relu(layer(x))
    return self.layers[-1](x)


def floral_mlp():
  """A FLoRAL client: MLP 12-16-5 with C = 3 adaptors (budget 0.4: ranks 2 and 1), bias adaptors, a router."""
  model = MLP(12, (16,), 5, rngs=nnx.Rngs(0))
  spec = AdapterSpec(target='.*', rank=0.4, alpha=None, num_global=3, router=True, bias=True, bias_init='uniform')
  mdef, parts = split_model(adapt(model, spec, key=jax.random.key(1)))
  parts = dict(parts, adapters=_randomize(parts['adapters'], 5))
  logits = np.array([1.5, -0.5, 0.2], np.float32)
  return mdef, parts, interop.floral_mixture(logits)


def test_floral_mlp_client_as_merged_state_dict_and_as_peft_with_lora_bias(tmp_path):
  mdef, parts, pi = floral_mlp()
  x = np.random.default_rng(0).standard_normal((6, 12)).astype(np.float32)
  expected, _ = mdef.apply(parts, jnp.asarray(x), mix=jnp.asarray(pi))
  expected = np.asarray(expected)
  plain, _ = mdef.apply(parts, jnp.asarray(x), mix=jnp.zeros(3))
  assert np.abs(expected - np.asarray(plain)).max() > 1e-2  # the client's adaptors matter

  merged = TorchMLP((12, 16, 5))
  merged.load_state_dict({k: torch.tensor(v) for k, v in interop.merged_state_dict(parts, mix=pi).items()})
  with torch.no_grad():
    np.testing.assert_allclose(merged(torch.tensor(x)).numpy(), expected, atol=1e-5, rtol=0)

  interop.export_floral_client(tmp_path / 'client', parts, mix=pi)
  config, layers = interop.load_peft_adapter(tmp_path / 'client')
  assert config['lora_bias'] and config['target_modules'] == ['layers.0', 'layers.1']
  assert (layers['layers.0'].rank, layers['layers.1'].rank) == (6, 3)
  base = TorchMLP((12, 16, 5))
  base.load_state_dict({k: torch.tensor(v) for k, v in interop.torch_state_dict(parts['base']).items()})
  peft_model = PeftModel.from_pretrained(base, str(tmp_path / 'client'))
  with torch.no_grad():
    np.testing.assert_allclose(peft_model(torch.tensor(x)).numpy(), expected, atol=1e-5, rtol=0)


class Kinds(nnx.Module):
  """Every adaptor kind in one model: embedding, conv, LayerNorm, linear (with biases)."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 6, rngs=rngs)
    self.conv = nnx.Conv(6, 4, (3, 3), padding='SAME', rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, ids):  # [B, 4, 4] ints
    return self.head(self.norm(self.conv(self.embed(ids))).mean((1, 2)))


def _drop_base_level(tree):
  if not isinstance(tree, dict):
    return tree
  if set(tree) == {'base'}:
    return _drop_base_level(tree['base'])
  return {k: _drop_base_level(v) for k, v in tree.items()}


def test_merged_params_equal_the_adapted_forward_for_every_adaptor_kind():
  spec = AdapterSpec(target='.*', rank=2, alpha=4.0, num_global=2, num_local=1, embed=True, norm=True, bias=True,
                     bias_init='uniform')
  mdef, parts = split_model(adapt(Kinds(nnx.Rngs(0)), spec, key=jax.random.key(1)))
  parts = dict(parts, adapters=_randomize(parts['adapters'], 7), local=_randomize(parts['local'], 8))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 10, (5, 4, 4)))
  mix, gw, lw = jnp.array([0.3, 0.8]), 0.6, 1.3
  adapted, _ = mdef.apply(parts, ids, mix=mix, global_weight=gw, local_weight=lw)
  merged = interop.merged_params(parts, alpha=4.0, mix=np.asarray(mix), global_weight=gw, local_weight=lw)
  plain = Kinds(nnx.Rngs(0))
  state = nnx.state(plain, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, _drop_base_level(merged)))
  nnx.update(plain, state)
  np.testing.assert_allclose(np.asarray(plain(ids)), np.asarray(adapted), atol=1e-5, rtol=0)
  # PEFT has no form for conv or norm adaptors here: the PEFT export says so and points to the merged weights.
  with pytest.raises(ValueError, match="'conv' has conv adaptors.*merged_state_dict"):
    interop.lora_layers(parts, alpha=4.0, mix=np.asarray(mix))


# ---------------------------------------------------------------------------------------------------------------
# Import: a LoRA that PEFT itself trained and saved.
# ---------------------------------------------------------------------------------------------------------------


def test_import_a_peft_lora_into_the_global_adaptors(tmp_path):
  mdef, parts = adapted_llama(DUAL, seed=4)
  base_dir = llama_loaders.save_hf_checkpoint(tmp_path / 'base',
                                              llama_loaders.llama_from_base_parts(CONFIG, parts['base']))
  torch.manual_seed(0)
  # A published LoRA: alpha 6 at rank 4 (scaling 1.5, ours is 16 / 4 = 4), random B (init_lora_weights=False).
  peft_model = get_peft_model(torch_base(base_dir), LoraConfig(r=4, lora_alpha=6, target_modules=['q_proj', 'v_proj'],
                                                               init_lora_weights=False))
  peft_model.save_pretrained(str(tmp_path / 'published'))
  expected = torch_logits(peft_model)[REAL]
  adapters = interop.import_lora(tmp_path / 'published', parts['adapters'], alpha=16.0)
  np.testing.assert_allclose(ours(mdef, dict(parts, adapters=adapters), 1.0, 0.0)[REAL], expected, atol=1e-4,
                             rtol=0)
  assert jax.tree.map(jnp.shape, adapters) == jax.tree.map(jnp.shape, parts['adapters'])
  # ... into the local adaptors just as well.
  local = interop.import_lora(tmp_path / 'published', parts['local'], group='local', alpha=16.0)
  np.testing.assert_allclose(ours(mdef, dict(parts, local=local), 0.0, 1.0)[REAL], expected, atol=1e-4, rtol=0)

  _, rank2 = adapted_llama(AdapterSpec(target=r'.*\.(q_proj|v_proj)', rank=2, alpha=16.0, bias=False), seed=4)
  with pytest.raises(ValueError, match=r'has rank 4, the model\'s global adaptor rank 2.*AdapterSpec\(rank=4\)'):
    interop.import_lora(tmp_path / 'published', rank2['adapters'], alpha=16.0)
  _, only_q = adapted_llama(AdapterSpec(target=r'.*\.q_proj', rank=4, alpha=16.0, bias=False), seed=4)
  with pytest.raises(ValueError, match=r"adapts \['model\.layers\.0\.self_attn\.v_proj'"):
    interop.import_lora(tmp_path / 'published', only_q['adapters'], alpha=16.0)
  _, with_k = adapted_llama(AdapterSpec(target=r'.*\.(q_proj|k_proj|v_proj)', rank=4, alpha=16.0, bias=False), seed=4)
  with pytest.raises(ValueError, match='does not adapt .*k_proj.*strict=False'):
    interop.import_lora(tmp_path / 'published', with_k['adapters'], alpha=16.0)
  kept = interop.import_lora(tmp_path / 'published', with_k['adapters'], alpha=16.0, strict=False)
  k_path = ('model', 'layers', 0, 'self_attn', 'k_proj', 'global_b')
  np.testing.assert_array_equal(functools.reduce(lambda n, k: n[k], k_path, kept),
                                functools.reduce(lambda n, k: n[k], k_path, with_k['adapters']))


def test_peft_folder_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match='has no adapter_config.json'):
    interop.load_peft_adapter(tmp_path)
  _, parts = adapted_llama(DUAL)
  with pytest.raises(ValueError, match='exactly one of logits'):
    interop.export_floral_client(tmp_path / 'x', parts)
  with pytest.raises(ValueError, match=r'mixture weights have shape \(2,\), but the layers hold 1'):
    interop.export_global_adapter(tmp_path / 'x', parts, alpha=16.0, mix=[0.5, 0.5])


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct, loaded from its GGUF once for the module.
# ---------------------------------------------------------------------------------------------------------------


SMOL_SPEC = AdapterSpec(target=r'.*\.(q_proj|v_proj)', rank=8, alpha=16.0, num_global=1, num_local=1, bias=False,
                        conv=False, init='kaiming')
SMOL_WEIGHTS = {'global': (1.0, 0.0), 'local': (0.0, 1.0), 'mixed': (0.25, 0.75)}
FULL = np.ones_like(MASK)  # unpadded rows for SmolLM2: PyTorch's float64 eager attention gave NaNs with left padding
FULL_POS = np.cumsum(FULL, axis=-1) - 1


@pytest.fixture(scope='module')
def smollm2(tmp_path_factory):
  """SmolLM2 with random global and local LoRAs on q/v; base and both adapters written for PEFT."""
  model, config = llama_loaders.load_gguf(llama_loaders.smollm2_gguf_path())
  mdef, parts = split_model(adapt(model, SMOL_SPEC, key=jax.random.key(0)))
  parts = dict(parts, adapters=_randomize(parts['adapters'], 1, 0.05), local=_randomize(parts['local'], 2, 0.05))
  folder = tmp_path_factory.mktemp('smollm2')
  llama_loaders.save_hf_checkpoint(folder / 'base', llama_loaders.llama_from_base_parts(config, parts['base']))
  interop.export_global_adapter(folder / 'global', parts, alpha=16.0)
  interop.export_local_adapter(folder / 'local', parts, alpha=16.0)
  return mdef, parts, folder


def smol_peft(folder, dtype):
  model = PeftModel.from_pretrained(
      AutoModelForCausalLM.from_pretrained(str(folder / 'base'), attn_implementation='eager', dtype=dtype),
      str(folder / 'global'), adapter_name='global')
  model.load_adapter(str(folder / 'local'), adapter_name='local')
  model.add_weighted_adapter(['global', 'local'], [0.25, 0.75], 'mixed', combination_type='cat')
  return model.to(dtype)


def test_smollm2_adapters_in_peft_reproduce_the_jax_logits_float32(smollm2):
  # Float32 agreement is bounded by float32 itself: over 30 layers with logits up to ~31, each implementation lies
  # about 7e-5 from the float64 result, so the bound here is 1e-4 of the logits' scale (the float64 test below
  # holds the two to 1e-4 absolute).
  mdef, parts, folder = smollm2
  model = smol_peft(folder, torch.float32)
  with model.disable_adapter():
    plain = torch_logits(model, IDS, FULL, FULL_POS)
  scale = np.abs(plain).max()
  np.testing.assert_allclose(plain, ours(mdef, parts, 0.0, 0.0, mask=FULL), atol=1e-4 * scale, rtol=0)
  for name, (gw, lw) in SMOL_WEIGHTS.items():
    model.set_adapter(name)
    expected = ours(mdef, parts, gw, lw, mask=FULL)
    np.testing.assert_allclose(torch_logits(model, IDS, FULL, FULL_POS), expected, atol=1e-4 * scale, rtol=0, err_msg=name)
    assert np.abs(expected - plain).max() > 1e-2, name


def test_smollm2_adapters_in_peft_reproduce_the_jax_logits_float64(smollm2):
  mdef, parts, folder = smollm2
  model = smol_peft(folder, torch.float64)
  expected = {}
  for name in SMOL_WEIGHTS:
    model.set_adapter(name)
    expected[name] = torch_logits(model, IDS, FULL, FULL_POS)
  del model
  with jax.enable_x64(True):
    model64, _ = llama_loaders.load_gguf(llama_loaders.smollm2_gguf_path(), dtype=jnp.float64)
    mdef64, _ = split_model(adapt(model64, SMOL_SPEC, key=jax.random.key(0)))
    parts64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), parts)  # exactly the float32 weights, widened
    for name, (gw, lw) in SMOL_WEIGHTS.items():
      got = ours(mdef64, parts64, gw, lw, mask=FULL)
      assert got.dtype == np.float64
      np.testing.assert_allclose(got, expected[name], atol=1e-4, rtol=0, err_msg=name)

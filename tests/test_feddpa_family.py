"""The personalized-LoRA family in the FedDPA runner: the decoder's token loss as the family sees it, one smoke run of
fedsa_lora, ditto, flora and hetlora end to end (P / TTP, intervals, PEFT export that shows each method's
structure), and the refusals (fedalt, an unknown method) as one line, exit status 2."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from fedjax_adapters.algorithms import feddpa as F
from fedjax_adapters.algorithms.common import LossInputs
from fedjax_adapters.experiments import feddpa as exp
from fedjax_adapters.experiments import feddpa_family as family
from fedjax_adapters.experiments import report
from fedjax_adapters.experiments.floral_tasks import family_ranks
from fedjax_adapters.federated.client_update import Batch
from fedjax_adapters.models import llama
import cli_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, '..', 'shared', 'data', 'feddpa', 'dataset1')  # as tests/test_experiments_feddpa.py
FAMILY = ('fedsa_lora', 'ditto', 'flora', 'hetlora')


def test_token_loss_view_is_feddpas_token_loss():
  """The view's per-row (CE sum, tokens) through token_loss equal FedDPA's lm_loss on the same batch, padding row
  included."""
  config = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = {'input_ids': jnp.asarray(rng.integers(0, 40, (3, 7)), jnp.int32), 'attention_mask': jnp.ones((3, 7), jnp.int32),
       'loss_mask': jnp.asarray(rng.integers(0, 2, (3, 7)), jnp.int32)}
  mask = jnp.array([True, True, False])

  @nnx.jit  # one compile instead of one per eager op
  def both(model, x):
    out = family.TokenLossView(model)(x)
    mine = family.token_loss(LossInputs(out, Batch(x, None, mask), (), {}, None, (), None))
    logits = model(x['input_ids'], x['attention_mask'])
    return out, mine, F.lm_loss(LossInputs(logits, Batch(x, None, mask), (), {}, None, (), None))

  out, (value, metrics), (expected, ref) = both(model, x)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics['tokens'], ref['tokens'])
  assert out.shape == (3, 2)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp('family') / 'run'
  peft = out.parent / 'peft'
  exp.main(['--data', DATA, '--preset', 'smoke', '--methods', *FAMILY, '--num-beams', '1', '--rounds', '1', '--out', str(out),
            '--bootstrap-samples', '200', '--export-peft', str(peft), '--quiet'])
  return out, peft


def test_every_family_method_is_scored_with_p_ttp_and_intervals(run):
  out, _ = run
  doc = json.loads((out / 'results.json').read_text())
  assert doc['status'] == 'done' and list(doc['methods']) == list(FAMILY)
  categories = set(doc['client_categories'])
  for m in FAMILY:
    r = doc['methods'][m]
    assert r['status'] == 'done'
    assert set(r['personalization']) == set(r['test_time']) == categories | {'avg'}
    assert np.asarray(r['per_seed']['0']['per_prompt']).shape == (8, 8)
    assert set(doc['intervals']['0']['methods'][m]) == {'personalization', 'test_time'}
    answers = json.loads((out / 'predictions' / f'{m}-seed0.json').read_text())['answers']
    assert len(answers) == 8 and all(len(a) == 8 for a in answers)
    assert r['client_steps'] == 16  # 1 round x 8 clients x ceil(4 examples / batch 2)
  assert 'client-steps/s |' in report.results_table([doc]).splitlines()[4]
  losses = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['method'], r['round']) for r in losses] == [(m, 1) for m in FAMILY]
  assert all(np.isfinite(r['train_loss']) for r in losses)


def _lora(peft, method, client):
  return load_file(str(peft / method / f'client_{client}' / 'adapter_model.safetensors'))


def test_peft_export_shows_each_methods_structure(run):
  """FedSA-LoRA's clients share A and keep their own B; Ditto's personal LoRAs differ; HetLoRA's client of rank 2
  has zeros past rank 2; FLoRA's export is the merged model: its q/v projections moved, the rest did not."""
  _, peft = run
  a0, a1 = _lora(peft, 'fedsa_lora', 0), _lora(peft, 'fedsa_lora', 1)
  names = sorted(a0)
  assert names and all(('q_proj' in n or 'v_proj' in n) for n in names)
  for n in names:
    if 'lora_A' in n:
      np.testing.assert_array_equal(a0[n], a1[n])
  assert any(not np.array_equal(a0[n], a1[n]) for n in names if 'lora_B' in n)
  d0, d1 = _lora(peft, 'ditto', 0), _lora(peft, 'ditto', 1)
  assert all(not np.array_equal(d0[n], d1[n]) for n in d0 if 'lora_B' in n)
  assert family_ranks(8, 8)[2] == 2
  h2, h0 = _lora(peft, 'hetlora', 2), _lora(peft, 'hetlora', 0)
  for n in h2:
    part = h2[n][2:] if 'lora_A' in n else h2[n][:, 2:]  # PEFT: A [r, d_in], B [d_out, r]
    assert not part.any(), n
  assert all(h0[n][:, 0].any() if 'lora_B' in n else h0[n][0].any() for n in h0)
  assert json.loads((peft / 'hetlora' / 'manifest.json').read_text())['base'] == str((peft / 'base').resolve())
  merged = load_file(str(peft / 'flora' / 'merged' / 'model.safetensors'))
  base = load_file(str(peft / 'base' / 'model.safetensors'))
  assert merged.keys() == base.keys()
  moved = {n for n in base if not np.array_equal(merged[n], base[n])}
  assert moved and all(('q_proj' in n or 'v_proj' in n) for n in moved)


def _one_line_error(capsys, argv):
  return cli_testing.one_line_error(capsys, exp.main, argv)


@pytest.mark.parametrize('argv, words', [
    (['--methods', 'fedit', 'fedalt'], "fedalt cannot run on the LLaMA decoder: its gate"),
    (['--methods', 'ditto', 'fedsa'], 'unknown method(s) fedsa; valid methods: centralized'),
    (['--methods', 'flora', '--quantize', 'int8'], 'flora merges every round into the base kernels'),
    (['--methods', 'hetlora', '--aggregator', 'median'], 'hetlora keep their own aggregation'),
])
def test_refused_methods_stop_before_any_training(capsys, tmp_path, argv, words):
  out = tmp_path / 'run'
  err = _one_line_error(capsys, ['--data', DATA, '--preset', 'smoke', '--out', str(out)] + argv)
  assert words in err
  assert not out.exists()

"""Tests for the FedDPA data loader, prompt/tokenization helpers and the ROUGE personalization report."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fedjax_adapters.data import feddpa
from fedjax_adapters.metrics import rouge

# The authors' Dataset 1 sits beside the checkout (shared/data/feddpa/dataset1); FEDDPA_DATASET1 overrides it.
DATASET1 = os.environ.get(
    'FEDDPA_DATASET1',
    os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data', 'feddpa', 'dataset1'))

# Client id -> (Flan task, category) of Dataset 1, from reference/feddpa.md §1.
DATASET1_CLIENTS = [
    ('definite_pronoun_resolution', 'coreference'),
    ('snli', 'entailment'),
    ('cola', 'linguistic_acceptability'),
    ('glue_qqp', 'paraphrase'),
    ('trec', 'question_classification'),
    ('web_nlg_en', 'structure_to_text'),
    ('fix_punct', 'text_formatting'),
    ('wic', 'word_disambiguation'),
]

SPECIALS = ['<pad>', '<unk>', '<s>', '</s>']


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
  # LLaMA-like: BOS prepended by the post-processor, EOS not added automatically, pad id 0.
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', tok.token_to_id('<s>'))])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>', pad_token='<pad>',
                                 unk_token='<unk>')


def _word_tokenizer(texts) -> PreTrainedTokenizerFast:
  tok = Tokenizer(models.WordLevel(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
  return _wrap(tok)


@pytest.fixture(scope='module')
def data1() -> feddpa.FedDPAData:
  return feddpa.load_feddpa(DATASET1)


@pytest.fixture(scope='module')
def word_tok(data1) -> PreTrainedTokenizerFast:
  exs = [ex for client in data1.train for ex in client] + list(data1.test)
  return _word_tokenizer([feddpa.build_prompt(ex.instruction) + ex.output for ex in exs] + ['alpha beta gamma'])


# ---------------------------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------------------------


def test_load_dataset1(data1):
  assert data1.num_clients == 8
  assert [len(t) for t in data1.train] == [300] * 8
  assert len(data1.test) == 1600
  assert list(zip(data1.client_tasks, data1.client_categories)) == DATASET1_CLIENTS
  assert data1.categories == tuple(c for _, c in DATASET1_CLIENTS)
  for k, (task, cat) in enumerate(DATASET1_CLIENTS):
    assert all(ex.task == task and ex.category == cat for ex in data1.train[k])
    assert data1.clients_of(cat) == (k,)
    idx = data1.test_indices[cat]
    assert idx.shape == (200,) and np.all(np.diff(idx) > 0)
    assert data1.test_by_category[cat] == tuple(data1.test[i] for i in idx)
    assert all(ex.category == cat and ex.task == task for ex in data1.test_by_category[cat])
  # The groups partition the pool.
  assert sorted(np.concatenate(list(data1.test_indices.values())).tolist()) == list(range(1600))
  # First test line of the published file.
  assert data1.test[0].task == 'glue_qqp' and data1.test[0].output == 'no'

  small = data1.subset_test(3)
  assert len(small.test) == 24 and all(len(v) == 3 for v in small.test_indices.values())
  assert small.train is data1.train or small.train == data1.train
  with pytest.raises(ValueError, match='Unknown category'):
    data1.clients_of('summarization')


def _record(task, cat, i=0, output='yes'):
  return {'instruction': f'{task} question {i}?', 'output': output, 'task': task, 'category': cat}


def _write_folder(root, clients=(('t_a', 'cat_a'), ('t_b', 'cat_b')), test=None, test_name=feddpa.DEFAULT_TEST_FILE,
                  n_train=3):
  """Writes a small valid FedDPA folder (one task per client) and returns its path."""
  root = str(root)
  os.makedirs(os.path.join(root, str(len(clients))), exist_ok=True)
  for k, (task, cat) in enumerate(clients):
    with open(os.path.join(root, str(len(clients)), f'local_training_{k}.json'), 'w') as f:
      json.dump([_record(task, cat, i) for i in range(n_train)], f)
  if test is None:
    test = [_record(task, cat, 100 + i) for i in range(2) for task, cat in clients]
  if test_name is not None:
    with open(os.path.join(root, test_name), 'w') as f:
      f.write('\n'.join(json.dumps(r) for r in test) + '\n\n')  # A trailing blank line is allowed.
  return root


def test_load_small_folder_and_test_file_choice(tmp_path):
  folder = _write_folder(tmp_path)
  d = feddpa.load_feddpa(folder, num_clients=2)
  assert d.client_tasks == ('t_a', 't_b') and d.client_categories == ('cat_a', 'cat_b')
  assert [len(t) for t in d.train] == [3, 3] and len(d.test) == 4
  np.testing.assert_array_equal(d.test_indices['cat_a'], [0, 2])

  # Any single *.jsonl is taken when the default name is absent.
  other = _write_folder(tmp_path / 'other', test_name='my_test.jsonl')
  assert len(feddpa.load_feddpa(other, num_clients=2).test) == 4
  # Several *.jsonl: ambiguous unless test_file picks one.
  with open(os.path.join(other, 'second.jsonl'), 'w') as f:
    f.write(json.dumps(_record('t_a', 'cat_a')) + '\n' + json.dumps(_record('t_b', 'cat_b')) + '\n')
  with pytest.raises(ValueError, match=r"several \*\.jsonl files \['my_test.jsonl', 'second.jsonl'\]"):
    feddpa.load_feddpa(other, num_clients=2)
  assert len(feddpa.load_feddpa(other, num_clients=2, test_file='second.jsonl').test) == 2


def _write_json(path, obj):
  with open(path, 'w') as f:
    json.dump(obj, f)


def test_wrong_layouts_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    feddpa.load_feddpa(tmp_path / 'nope', num_clients=2)

  # Wrong client count: the K/ subfolder is missing. The message shows the expectation and what is there.
  folder = _write_folder(tmp_path / 'a')
  with pytest.raises(ValueError) as e:
    feddpa.load_feddpa(folder, num_clients=8)
  msg = str(e.value)
  assert 'missing client file' in msg and 'local_training_0.json' in msg and 'local_training_7.json' in msg
  assert 'Expected:' in msg and '<folder>/8/local_training_<k>.json' in msg
  assert 'Found:' in msg and "['2', 'flan_test_200_selected_nstrict_1.jsonl']" in msg
  assert "client folders present: ['2']; is num_clients=8 right?" in msg

  # One client file missing.
  folder = _write_folder(tmp_path / 'b')
  os.remove(os.path.join(folder, '2', 'local_training_1.json'))
  with pytest.raises(ValueError, match=r'missing client file .*local_training_1\.json'):
    feddpa.load_feddpa(folder, num_clients=2)

  # A record missing a field.
  folder = _write_folder(tmp_path / 'c')
  recs = [_record('t_a', 'cat_a', i) for i in range(3)]
  del recs[2]['category']
  _write_json(os.path.join(folder, '2', 'local_training_0.json'), recs)
  with pytest.raises(ValueError, match=r"local_training_0\.json record 2 is missing field\(s\) \['category'\]"):
    feddpa.load_feddpa(folder, num_clients=2)

  # A file whose every record is wrong is summarised, not listed in full.
  _write_json(os.path.join(folder, '2', 'local_training_1.json'), [{'instruction': 'x'}] * 50)
  with pytest.raises(ValueError) as e:
    feddpa.load_feddpa(folder, num_clients=2)
  assert str(e.value).count('is missing field(s)') == 4  # Record 2 of client 0, then 3 of client 1's 50.
  assert '... and 47 more problem(s) in the same file' in str(e.value)

  # A client whose records mix tasks.
  folder = _write_folder(tmp_path / 'd')
  _write_json(os.path.join(folder, '2', 'local_training_1.json'),
              [_record('t_b', 'cat_b'), _record('t_a', 'cat_a')])
  with pytest.raises(ValueError, match=r"client 1 .* mixes tasks: \(task, category\) pairs \[\('t_a', 'cat_a'\), "
                     r"\('t_b', 'cat_b'\)\]"):
    feddpa.load_feddpa(folder, num_clients=2)

  # A test task that no client owns.
  folder = _write_folder(tmp_path / 'e', test=[_record('t_a', 'cat_a'), _record('t_b', 'cat_b'),
                                                _record('t_c', 'cat_c')])
  with pytest.raises(ValueError, match=r"test category 'cat_c' \(task 't_c'\) has no client"):
    feddpa.load_feddpa(folder, num_clients=2)

  # A client whose task is absent from the test pool.
  folder = _write_folder(tmp_path / 'f', test=[_record('t_a', 'cat_a')])
  with pytest.raises(ValueError, match=r"client 1 category 'cat_b' has no test examples"):
    feddpa.load_feddpa(folder, num_clients=2)

  # No test file at all.
  folder = _write_folder(tmp_path / 'g', test_name=None)
  with pytest.raises(ValueError, match=r'missing test file: no flan_test_200_selected_nstrict_1\.jsonl'):
    feddpa.load_feddpa(folder, num_clients=2)

  # A test line that is not JSON, and a training file that is not a list.
  folder = _write_folder(tmp_path / 'h')
  with open(os.path.join(folder, feddpa.DEFAULT_TEST_FILE), 'a') as f:
    f.write('{not json\n')
  _write_json(os.path.join(folder, '2', 'local_training_0.json'), {'instruction': 'x'})
  with pytest.raises(ValueError) as e:
    feddpa.load_feddpa(folder, num_clients=2)
  assert 'line 6 is not valid JSON' in str(e.value)
  assert 'must hold a non-empty JSON list of records, found dict' in str(e.value)

  # One category holding two Flan tasks would make "group by category" ambiguous.
  folder = _write_folder(tmp_path / 'i', clients=(('t_a', 'cat_a'), ('t_b', 'cat_a')))
  with pytest.raises(ValueError, match=r"category 'cat_a' holds several tasks \['t_a', 't_b'\]"):
    feddpa.load_feddpa(folder, num_clients=2)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and tokenization.
# ---------------------------------------------------------------------------------------------------------------------


def test_template_text():
  assert feddpa.PROMPT_TEMPLATE == '### Instruction:\n{instruction}\n\n### Response:\n'
  assert feddpa.build_prompt('Is it?\nOPTIONS:\n- yes\n- no') == (
      '### Instruction:\nIs it?\nOPTIONS:\n- yes\n- no\n\n### Response:\n')
  assert feddpa.extract_response('<s> ### Instruction:\nq\n\n### Response:\n yes</s><unk>') == 'yes'
  assert feddpa.extract_response('his son </s>') == 'his son'
  assert feddpa.extract_response('no marker') == 'no marker'


def test_response_only_loss_mask(data1, word_tok):
  examples = [data1.train[k][0] for k in range(8)] + [feddpa.Example('Say it.', '', 't', 'c')]
  batch = feddpa.tokenize_for_training(word_tok, examples, max_length=512)
  eos, bos, pad = word_tok.eos_token_id, word_tok.bos_token_id, word_tok.pad_token_id
  n, width = batch.input_ids.shape
  assert n == len(examples) and batch.input_ids.dtype == np.int32
  assert width == int(batch.lengths.max())
  for i, ex in enumerate(examples):
    ln = int(batch.lengths[i])
    ids = batch.input_ids[i]
    assert ids[0] == bos and ids[ln - 1] == eos and np.all(ids[ln:] == pad)
    np.testing.assert_array_equal(batch.attention_mask[i], np.arange(width) < ln)
    response = word_tok(ex.output, add_special_tokens=False)['input_ids']
    # The targets are exactly the response tokens followed by EOS; everything before is the prompt.
    assert ids[batch.loss_mask[i] == 1].tolist() == response + [eos]
    prompt_ids = word_tok(feddpa.build_prompt(ex.instruction))['input_ids']
    assert ids[:len(prompt_ids)].tolist() == prompt_ids
    assert batch.loss_mask[i, :len(prompt_ids)].sum() == 0 and batch.loss_mask[i, len(prompt_ids):ln].all()

  # train_on_inputs: every real token except position 0 is a target.
  full = feddpa.tokenize_for_training(word_tok, examples, max_length=512, train_on_inputs=True)
  np.testing.assert_array_equal(full.loss_mask[:, 1:], full.attention_mask[:, 1:])
  assert full.loss_mask[:, 0].sum() == 0
  # add_eos=False drops exactly the EOS target.
  no_eos = feddpa.tokenize_for_training(word_tok, examples, max_length=512, add_eos=False)
  np.testing.assert_array_equal(no_eos.lengths, batch.lengths - 1)
  assert no_eos.loss_mask.sum() == batch.loss_mask.sum() - n
  # Mappings work as examples too.
  as_dicts = feddpa.tokenize_for_training(word_tok, [ex._asdict() for ex in examples], max_length=512)
  np.testing.assert_array_equal(as_dicts.input_ids, batch.input_ids)
  with pytest.raises(ValueError, match="example 0 has no 'output' field"):
    feddpa.tokenize_for_training(word_tok, [{'instruction': 'x'}], max_length=16)


def test_truncation_and_padding(word_tok):
  ex = feddpa.Example('alpha beta', 'gamma ' * 20, 't', 'c')
  prompt_len = len(word_tok(feddpa.build_prompt(ex.instruction))['input_ids'])
  full_len = len(word_tok(feddpa.build_prompt(ex.instruction) + ex.output)['input_ids'])
  eos = word_tok.eos_token_id

  # Truncated at the cutoff: no room for EOS, so none is added (as in the official code).
  cut = prompt_len + 5
  b = feddpa.tokenize_for_training(word_tok, [ex], max_length=cut)
  assert b.input_ids.shape == (1, cut) and eos not in b.input_ids[0]
  assert b.loss_mask[0].tolist() == [0] * prompt_len + [1] * 5
  # One token of room: EOS fits exactly.
  b = feddpa.tokenize_for_training(word_tok, [ex], max_length=full_len + 1)
  assert b.input_ids.shape == (1, full_len + 1) and b.input_ids[0, -1] == eos
  # A cutoff inside the prompt leaves no targets at all.
  b = feddpa.tokenize_for_training(word_tok, [ex], max_length=prompt_len - 2)
  assert b.input_ids.shape == (1, prompt_len - 2) and b.loss_mask.sum() == 0

  short = feddpa.Example('alpha', 'beta', 't', 'c')
  b = feddpa.tokenize_for_training(word_tok, [short, ex], max_length=512, pad_to_multiple_of=8)
  assert b.input_ids.shape[1] % 8 == 0 and b.input_ids.shape[1] >= full_len + 1
  b = feddpa.tokenize_for_training(word_tok, [short], max_length=512, length=64)
  assert b.input_ids.shape == (1, 64) and b.attention_mask[0, 63] == 0
  with pytest.raises(ValueError, match='length=3 is shorter than the longest sequence'):
    feddpa.tokenize_for_training(word_tok, [short], max_length=512, length=3)


def test_boundary_merging_tokenizer_uses_prompt_alone_length():
  # A BPE without pre-tokenization, trained where "Response:\n" is always followed by "yes", learns a merge across
  # the boundary ("ponse:\nyes"), as byte-level BPEs sometimes do.
  words = ['alpha', 'beta', 'gamma', 'delta']
  corpus = [feddpa.build_prompt(f'{a} {b} {c}') + 'yes sir' for a in words for b in words for c in words]
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.train_from_iterator(corpus, trainers.BpeTrainer(special_tokens=SPECIALS, vocab_size=60))
  tok = _wrap(tok)
  prompt = feddpa.build_prompt('alpha beta')
  prompt_ids = tok(prompt)['input_ids']
  full_ids = tok(prompt + 'yes sir')['input_ids']
  p = len(prompt_ids)
  assert full_ids[:p] != prompt_ids  # The boundary is merged.
  b = feddpa.tokenize_for_training(tok, [feddpa.Example('alpha beta', 'yes sir', 't', 'c')], max_length=64)
  # Documented behaviour, as in the official code: the mask starts at the prompt-alone token count p, wherever the
  # merged tokens fall. Here that leaves part of the response out of the loss.
  ln = int(b.lengths[0])
  assert ln == len(full_ids) + 1
  assert b.loss_mask[0, :ln].tolist() == [int(t >= p) for t in range(ln)]


def test_prompts_are_left_padded(word_tok):
  prompts = [feddpa.build_prompt('alpha'), feddpa.build_prompt('alpha beta gamma alpha beta')]
  lens = [len(word_tok(p)['input_ids']) for p in prompts]
  b = feddpa.tokenize_prompts(word_tok, prompts, max_length=64)
  width = max(lens)
  assert b.input_ids.shape == (2, width)
  for i, p in enumerate(prompts):
    ids = word_tok(p)['input_ids']
    assert b.input_ids[i, width - lens[i]:].tolist() == ids
    assert np.all(b.input_ids[i, :width - lens[i]] == word_tok.pad_token_id)
    assert b.attention_mask[i].tolist() == [0] * (width - lens[i]) + [1] * lens[i]
  assert b.attention_mask[:, -1].all()  # The last column is every row's last prompt token.

  b8 = feddpa.tokenize_prompts(word_tok, prompts, max_length=64, pad_to_multiple_of=8)
  assert b8.input_ids.shape[1] % 8 == 0
  np.testing.assert_array_equal(b8.input_ids[:, -width:], b.input_ids)
  with pytest.raises(ValueError, match=r'prompt 0 has \d+ tokens, more than max_length=5'):
    feddpa.tokenize_prompts(word_tok, prompts, max_length=5)
  left = feddpa.tokenize_prompts(word_tok, prompts, max_length=5, truncation='left')
  assert left.input_ids.shape == (2, 5) and left.input_ids[1].tolist() == word_tok(prompts[1])['input_ids'][-5:]


def test_bucket_by_length_and_select(word_tok):
  buckets = feddpa.bucket_by_length([3, 9, 17, 8, 1, 16], [16, 8, 32])
  assert list(buckets) == [8, 16, 32]
  assert {k: v.tolist() for k, v in buckets.items()} == {8: [0, 3, 4], 16: [1, 5], 32: [2]}
  assert list(feddpa.bucket_by_length([2, 3], [4, 8])) == [4]  # Empty buckets are left out.
  with pytest.raises(ValueError, match='sequence 1 has length 40, longer than the largest bucket 32'):
    feddpa.bucket_by_length([3, 40], [8, 32])
  with pytest.raises(ValueError, match='bucket_sizes must be non-empty and positive'):
    feddpa.bucket_by_length([3], [])

  exs = [feddpa.Example('alpha', 'beta', 't', 'c'), feddpa.Example('alpha beta gamma ' * 4, 'beta ' * 10, 't', 'c')]
  batch = feddpa.tokenize_for_training(word_tok, exs, max_length=128)
  groups = feddpa.bucket_by_length(batch.lengths, [16, 64])
  assert {k: v.tolist() for k, v in groups.items()} == {16: [0], 64: [1]}
  small = batch.select(groups[16], length=16)
  assert small.input_ids.shape == (1, 16)
  np.testing.assert_array_equal(small.input_ids[0], batch.input_ids[0, :16])
  with pytest.raises(ValueError, match='would cut real tokens'):
    batch.select([1], length=16)


def test_sample_references_seeded():
  a = feddpa.sample_references(0, 300, 5, 1600)
  assert a.shape == (1600, 5) and a.dtype == np.int32
  assert a.min() >= 0 and a.max() < 300
  assert all(len(set(row)) == 5 for row in a.tolist())  # Distinct within each test instance.
  assert len({tuple(r) for r in a.tolist()}) > 1500  # Re-drawn per test instance.
  np.testing.assert_array_equal(a, feddpa.sample_references(0, 300, 5, 1600))
  assert not np.array_equal(a, feddpa.sample_references(1, 300, 5, 1600))

  key = jax.random.key(7)
  k1 = feddpa.sample_references(jax.random.fold_in(key, 3), 300, 5, 20)
  np.testing.assert_array_equal(k1, feddpa.sample_references(jax.random.fold_in(key, 3), 300, 5, 20))
  assert not np.array_equal(k1, feddpa.sample_references(jax.random.fold_in(key, 4), 300, 5, 20))
  np.testing.assert_array_equal(feddpa.sample_references(jax.random.PRNGKey(7), 300, 5, 20),
                                feddpa.sample_references(jax.random.PRNGKey(7), 300, 5, 20))
  # A Generator is advanced in place, so successive calls differ.
  rng = np.random.default_rng(0)
  assert not np.array_equal(feddpa.sample_references(rng, 300, 5, 4), feddpa.sample_references(rng, 300, 5, 4))
  assert sorted(feddpa.sample_references(3, 5, 5, 1)[0].tolist()) == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match='num_refs=6 distinct references cannot be drawn from num_local=5'):
    feddpa.sample_references(0, 5, 6, 1)
  with pytest.raises(ValueError, match='rng_or_key must be'):
    feddpa.sample_references(np.float32(0.5), 5, 2, 1)


# ---------------------------------------------------------------------------------------------------------------------
# ROUGE and the personalization report.
# ---------------------------------------------------------------------------------------------------------------------


def test_rouge_hand_examples():
  same = rouge.rouge_scores(['the cat sat on the mat'], ['the cat sat on the mat'])
  assert set(same) == {'rouge1', 'rouge2', 'rougeL', 'rougeLsum'}
  assert all(v == pytest.approx(1.0) for v in same.values())
  # A one-word answer has no bigrams, so rouge2 is 0 even for an exact match (rouge_score's convention).
  label = rouge.rouge_scores(['entity'], ['entity'])
  assert label['rouge1'] == pytest.approx(1.0) and label['rouge2'] == 0.0
  disjoint = rouge.rouge_scores(['red blue'], ['green yellow'])
  assert all(v == 0.0 for v in disjoint.values())

  # Prediction "the cat sat" vs reference "the cat ran away":
  # unigrams overlap {the, cat}: P = 2/3, R = 2/4, F = 4/7; bigrams overlap {the cat}: P = 1/2, R = 1/3, F = 2/5;
  # LCS = "the cat" (2): F = 4/7.
  part = rouge.rouge_scores(['the cat sat'], ['the cat ran away'])
  assert part['rouge1'] == pytest.approx(4 / 7)
  assert part['rouge2'] == pytest.approx(2 / 5)
  assert part['rougeL'] == pytest.approx(4 / 7) and part['rougeLsum'] == pytest.approx(4 / 7)

  # The corpus score is the mean over examples.
  both = rouge.rouge_scores(['the cat sat', 'yes'], ['the cat ran away', 'yes'], rouge_types=['rouge1'])
  assert both == {'rouge1': pytest.approx((4 / 7 + 1) / 2)}
  # Lowercased, punctuation-insensitive (rouge_score's tokenizer); the trailing </s> is cut as in metric.py.
  assert rouge.rouge_scores(['Yes.</s>'], ['yes'])['rouge1'] == pytest.approx(1.0)
  # No stemming by default (the official metric); the stemmer is opt-in.
  assert rouge.rouge_scores(['cats'], ['cat'])['rouge1'] == 0.0
  assert rouge.rouge_scores(['cats'], ['cat'], use_stemmer=True)['rouge1'] == pytest.approx(1.0)

  preds, refs = ['yes', 'no', 'yes', 'the cat sat'] * 5, ['yes', 'yes', 'no', 'the cat ran away'] * 5
  boot = rouge.rouge_scores(preds, refs, rouge_types=['rouge1'], bootstrap_samples=200, seed=3)
  assert boot == rouge.rouge_scores(preds, refs, rouge_types=['rouge1'], bootstrap_samples=200, seed=3)
  assert boot['rouge1'] == pytest.approx(rouge.rouge_scores(preds, refs)['rouge1'], abs=0.05)

  with pytest.raises(ValueError, match='got 2 predictions but 1 references'):
    rouge.rouge_scores(['a', 'b'], ['a'])
  with pytest.raises(ValueError, match='rouge_types must be a non-empty subset'):
    rouge.rouge_scores(['a'], ['a'], rouge_types=['rouge3'])


def test_personalization_report_hand_example(tmp_path):
  test = [_record('t_a', 'cat_a', 0, 'yes'), _record('t_b', 'cat_b', 1, 'red car'),
          _record('t_a', 'cat_a', 2, 'no'), _record('t_b', 'cat_b', 3, 'blue sky')]
  d = feddpa.load_feddpa(_write_folder(tmp_path, test=test), num_clients=2)
  preds = [
      ['yes', 'red', 'no', 'green'],  # client 0 (cat_a): cat_a = 1, cat_b = (2/3 + 0) / 2 = 1/3
      ['no', 'red car', 'no', 'blue sky'],  # client 1 (cat_b): cat_a = (0 + 1) / 2 = 1/2, cat_b = 1
  ]
  rep = rouge.personalization_report(preds, d)
  assert rep['per_client'][0] == {'cat_a': pytest.approx(1.0), 'cat_b': pytest.approx(1 / 3)}
  assert rep['per_client'][1] == {'cat_a': pytest.approx(0.5), 'cat_b': pytest.approx(1.0)}
  assert rep['personalization'] == {'cat_a': pytest.approx(1.0), 'cat_b': pytest.approx(1.0),
                                    'avg': pytest.approx(1.0)}
  # Test-time personalization: each owner's mean over all tasks, its own included.
  assert rep['test_time'] == {'cat_a': pytest.approx(2 / 3), 'cat_b': pytest.approx(3 / 4),
                              'avg': pytest.approx((2 / 3 + 3 / 4) / 2)}
  assert rep['test_time_others'] == {'cat_a': pytest.approx(1 / 3), 'cat_b': pytest.approx(1 / 2),
                                     'avg': pytest.approx(5 / 12)}

  # A mapping may report a subset of clients.
  sub = rouge.personalization_report({1: preds[1]}, d)
  assert sub['personalization'] == {'cat_b': pytest.approx(1.0), 'avg': pytest.approx(1.0)}
  assert sub['test_time'] == {'cat_b': pytest.approx(0.75), 'avg': pytest.approx(0.75)}

  with pytest.raises(ValueError, match=r'client 0 has 3 predictions, but the test pool has 4'):
    rouge.personalization_report([preds[0][:3], preds[1]], d)
  with pytest.raises(ValueError, match='sequence of 1 clients, but the data has 2'):
    rouge.personalization_report([preds[0]], d)
  with pytest.raises(ValueError, match=r'client id 5 is not in range\(0, 2\)'):
    rouge.personalization_report({5: preds[0]}, d)

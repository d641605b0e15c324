"""Natural-partition loaders on files in the real formats, written here at test time.

* FEMNIST as ``flwrlabs/femnist`` publishes it: a parquet file with the hub's features (``image`` an Image of
  28x28 grayscale PNGs, ``writer_id`` text, ``hsf_id`` int64, ``character`` a 62-class ClassLabel);
* Shakespeare as ``flwrlabs/shakespeare`` publishes it: a csv with ``character_id``, ``x`` (80 characters), ``y``;
* TFF's HDF5 files, ``/examples/<client id>/<feature>``, with each dataset's features and dtypes (EMNIST float32
  ``pixels`` and int32 ``label``; Shakespeare byte-string ``snippets``; Stack Overflow ``tokens``; CIFAR-100 uint8
  ``image``, int64 ``label`` and ``coarse_label``);
* databricks-dolly-15k as published: a jsonl file with ``instruction``, ``context``, ``response``, ``category``.

Each loader's clients are checked against the rows written for them (every example, in order), and every kind of bad
input is one ValueError naming the column, row or client.
"""
import json
import os

import datasets
import h5py
import numpy as np
import pytest

from fedjax_adapters.data import dolly, natural, stats, text, tff_h5
from fedjax_adapters.data.vision import DatasetNotFoundError

WRITERS = {'f0003_41': 7, 'f0001_12': 3, 'f0002_07': 12}   # writer -> examples (ids deliberately unsorted)


def _rng(seed=0):
  return np.random.default_rng(seed)


def _femnist_table(seed=0):
  rng = _rng(seed)
  rows = [(w, rng.integers(0, 256, (28, 28), dtype=np.uint8), int(rng.integers(0, 62)))
          for w, n in WRITERS.items() for _ in range(n)]
  order = rng.permutation(len(rows))  # writers interleaved, as in a real shard
  return [rows[i] for i in order]


FEMNIST_FEATURES = datasets.Features({'image': datasets.Image(), 'writer_id': datasets.Value('string'),
                                      'hsf_id': datasets.Value('int64'),
                                      'character': datasets.ClassLabel(num_classes=62)})


def _write_femnist(path, rows, features=FEMNIST_FEATURES, **override):
  columns = {'image': [r[1] for r in rows], 'writer_id': [r[0] for r in rows], 'hsf_id': [0] * len(rows),
             'character': [r[2] for r in rows], **override}
  columns = {k: v for k, v in columns.items() if v is not None}   # override=None drops a column
  datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
  return path


@pytest.fixture(scope='module')
def femnist_file(tmp_path_factory):
  rows = _femnist_table()
  return _write_femnist(tmp_path_factory.mktemp('femnist') / 'femnist.parquet', rows), rows


def test_femnist_clients_are_the_writers_with_their_own_examples(femnist_file):
  path, rows = femnist_file
  ds = natural.femnist(path, test_fraction=0.25, seed=3)
  assert ds.client_ids == tuple(sorted(WRITERS)) and ds.num_classes == 62
  for k, writer in enumerate(ds.client_ids):
    mine = [r for r in rows if r[0] == writer]
    images = np.concatenate([ds.data.train.client(k)[0], ds.data.test.client(k)[0]])[..., 0]
    labels = np.concatenate([ds.data.train.client(k)[1], ds.data.test.client(k)[1]])
    assert len(labels) == WRITERS[writer] and int(ds.data.test.counts[k]) == round(0.25 * WRITERS[writer])
    # the split permutes a writer's rows: match each example back to one of its own rows
    got = sorted((im.tobytes(), int(y)) for im, y in zip(images, labels))
    assert got == sorted((r[1].tobytes(), r[2]) for r in mine)
  assert ds.data.train.x.dtype == np.uint8 and ds.data.train.x.shape[2:] == (28, 28, 1)
  again = natural.femnist(path, test_fraction=0.25, seed=3)
  np.testing.assert_array_equal(again.data.train.y, ds.data.train.y)   # seeded


def test_femnist_client_selection(femnist_file):
  path, _ = femnist_file
  assert natural.femnist(path, clients=2).client_ids == ('f0001_12', 'f0002_07')
  assert natural.femnist(path, clients=['f0003_41']).data.train.num_clients == 1
  with pytest.raises(ValueError, match=r"unknown client / partition id\(s\) \['nobody'\]; the dataset has 3 clients"):
    natural.femnist(path, clients=['f0003_41', 'nobody'])
  with pytest.raises(ValueError, match='clients=4: the dataset has 3 clients'):
    natural.femnist(path, clients=4)


def test_a_missing_copy_says_how_to_get_it(tmp_path):
  with pytest.raises(DatasetNotFoundError, match=r"no dataset at .*nothing.parquet.*load_dataset\('flwrlabs/femnist'"):
    natural.femnist(tmp_path / 'nothing.parquet')
  with pytest.raises(DatasetNotFoundError, match=r'tff-datasets-public/fed_emnist.tar.bz2'):
    tff_h5.emnist(tmp_path / 'fed_emnist_train.h5')


def test_femnist_bad_columns_are_named(tmp_path):
  rows = _femnist_table(1)
  ragged = list(rows)
  ragged[4] = (ragged[4][0], np.zeros((27, 28), np.uint8), ragged[4][2])
  features = datasets.Features({**FEMNIST_FEATURES, 'character': datasets.Value('float64')})
  cases = {
      'ragged': (_write_femnist(tmp_path / 'r.parquet', ragged), r"column 'image' row \d+ has shape \[27, 28\]"),
      'float labels': (_write_femnist(tmp_path / 'f.parquet', rows, features,
                                      character=[float(r[2]) for r in rows]), r"column 'character' holds float\d+ values; expected int"),
      'no writer': (_write_femnist(tmp_path / 'w.parquet', rows, datasets.Features(
          {k: v for k, v in FEMNIST_FEATURES.items() if k != 'writer_id'}), writer_id=None),
          r"FEMNIST: the dataset has no column\(s\) \['writer_id'\]"),
  }
  for name, (path, message) in cases.items():
    with pytest.raises(ValueError, match=message):
      natural.femnist(path)


SPEECH = 'To be, or not to be, that is the question: whether tis nobler in the mind to suffer the slings and arrows'


def _shakespeare_rows():
  rows = []
  for role, start, n in (('HAMLET_PRINCE', 0, 6), ('OPHELIA_GIRL', 3, 2)):
    for i in range(start, start + n):
      rows.append({'character_id': role, 'x': SPEECH[i:i + 80], 'y': SPEECH[i + 80]})
  return rows


def test_shakespeare_csv_examples_are_window_and_next_character(tmp_path):
  path = tmp_path / 'shakespeare.csv'
  datasets.Dataset.from_list(_shakespeare_rows()).to_csv(str(path))
  ds = natural.shakespeare(path, test_fraction=0.0)
  assert ds.client_ids == ('HAMLET_PRINCE', 'OPHELIA_GIRL') and ds.num_classes == 90
  vocab = text.shakespeare_vocabulary()
  decode = lambda ids: ''.join(vocab.tokens[i - 1] for i in ids)  # noqa: E731
  x, y = ds.data.train.client(1)
  assert [decode(row) for row in x] == [SPEECH[3:83], SPEECH[4:84]]
  assert decode(y) == SPEECH[83] + SPEECH[84]
  assert list(ds.data.train.counts) == [6, 2]

  bad = _shakespeare_rows()
  bad[2]['x'] = bad[2]['x'][:79]
  datasets.Dataset.from_list(bad).to_csv(str(tmp_path / 'bad.csv'))
  with pytest.raises(ValueError, match=r'Shakespeare row 2: x has 79 characters and y 1.*ragged column'):
    natural.shakespeare(tmp_path / 'bad.csv')


def test_char_windows_and_word_prefixes_by_hand():
  vocab = text.shakespeare_vocabulary()
  a, b = vocab.ids['a'], vocab.ids['b']
  x, y = text.char_windows('ab', vocab, window=3)
  np.testing.assert_array_equal(x, [[0, 0, vocab.bos], [0, vocab.bos, a], [vocab.bos, a, b]])
  np.testing.assert_array_equal(y, [a, b, vocab.eos])
  words = text.word_vocabulary({'the': 5, 'cat': 9, 'sat': 5, 'on': 1}, size=3)
  assert words.tokens == ['cat', 'the', 'sat'] and words.size == 7
  x, y = text.word_prefixes('the dog sat on', words, max_length=3)   # cut at 3 words; 'dog' is OOV
  np.testing.assert_array_equal(x, [[0, 0, 5], [0, 5, 2], [5, 2, 4], [2, 4, 3]])
  np.testing.assert_array_equal(y, [2, 4, 3, 6])


# ---------------------------------------------------------------------------------------------------------------
# TFF's HDF5 files
# ---------------------------------------------------------------------------------------------------------------


def _write_h5(path, clients):
  """``clients``: id -> {feature: array}, written as /examples/<id>/<feature> (TFF's layout)."""
  with h5py.File(path, 'w') as f:
    for cid, feats in clients.items():
      for name, value in feats.items():
        f.create_dataset(f'examples/{cid}/{name}', data=value)
  return path


def _emnist_clients(seed, sizes):
  rng = _rng(seed)
  return {cid: {'pixels': rng.random((n, 28, 28)).astype(np.float32),
                'label': rng.integers(0, 62, n).astype(np.int32)} for cid, n in sizes.items()}


@pytest.fixture(scope='module')
def emnist_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('emnist')
  train = _emnist_clients(0, {'f0100_22': 5, 'f0007_03': 9, 'f0042_11': 4})
  test = _emnist_clients(1, {'f0100_22': 2, 'f0007_03': 1})   # f0042_11 has no test examples
  return (_write_h5(folder / 'fed_emnist_train.h5', train), _write_h5(folder / 'fed_emnist_test.h5', test), train,
          test)


def test_tff_emnist_clients_and_their_test_sets(emnist_files):
  train_path, test_path, train, test = emnist_files
  ds = tff_h5.emnist(train_path, test_path)
  assert ds.client_ids == ('f0007_03', 'f0042_11', 'f0100_22')
  for k, cid in enumerate(ds.client_ids):
    x, y = ds.data.train.client(k)
    np.testing.assert_array_equal(x[..., 0], np.round(train[cid]['pixels'] * 255).astype(np.uint8))
    np.testing.assert_array_equal(y, train[cid]['label'])
    tx, ty = ds.data.test.client(k)
    np.testing.assert_array_equal(ty, test[cid]['label'] if cid in test else np.zeros(0))
  assert list(ds.data.test.counts) == [1, 0, 2]
  assert tff_h5.emnist(train_path, clients=['f0100_22'], test_fraction=0.4).data.test.counts.tolist() == [2]


def test_tff_layout_problems_are_named(tmp_path):
  good = _emnist_clients(2, {'a': 3, 'b': 2})
  cases = {
      'no examples group': ({'x': None}, r'has no /examples group'),
      'missing feature': ({**good, 'c': {'pixels': good['a']['pixels']}}, r"client 'c' has no feature\(s\) \['label'\]"),
      'ragged client': ({**good, 'c': {'pixels': good['a']['pixels'], 'label': np.zeros(2, np.int32)}},
                        r"client 'c' has features of different lengths \{'pixels': 3, 'label': 2\}"),
      'mis-typed': ({**good, 'c': {'pixels': np.zeros((2, 28, 28), np.int32), 'label': np.zeros(2, np.int32)}},
                    r"client 'c' feature 'pixels' has dtype int32; expected a f dtype"),
      'zero examples': ({**good, 'c': {'pixels': np.zeros((0, 28, 28), np.float32), 'label': np.zeros(0, np.int32)}},
                        r"client 'c' \(index 2\) has no training examples; 1 client\(s\) are empty.*drop_empty=True"),
  }
  for name, (clients, message) in cases.items():
    path = tmp_path / f'{name}.h5'
    if name == 'no examples group':
      with h5py.File(path, 'w') as f:
        f.create_dataset('other', data=np.zeros(2))
    else:
      _write_h5(path, clients)
    with pytest.raises(ValueError, match=message):
      tff_h5.emnist(path)
  assert tff_h5.emnist(tmp_path / 'zero examples.h5', drop_empty=True).client_ids == ('a', 'b')
  with pytest.raises(ValueError, match=r"unknown client / partition id\(s\) \['z'\]"):
    tff_h5.emnist(tmp_path / 'zero examples.h5', clients=['a', 'z'])
  (tmp_path / 'not.h5').write_text('plain text')
  with pytest.raises(ValueError, match=r"not.h5' is not a readable HDF5 file"):
    tff_h5.emnist(tmp_path / 'not.h5')


def test_tff_shakespeare_snippets_become_leaf_windows(tmp_path):
  snippets = {'THE_TEMPEST_MIRANDA': [b'O, I have suffered', b'With those that I saw suffer!'],
              'KING_LEAR_FOOL': [b'Nuncle!']}
  path = _write_h5(tmp_path / 'shakespeare_train.h5',
                   {cid: {'snippets': np.array(s, dtype=object)} for cid, s in snippets.items()})
  ds = tff_h5.shakespeare(path, test_fraction=0.0)
  vocab = text.shakespeare_vocabulary()
  for k, cid in enumerate(ds.client_ids):
    pairs = [text.char_windows(s.decode(), vocab) for s in snippets[cid]]
    x, y = ds.data.train.client(k)
    np.testing.assert_array_equal(x, np.concatenate([p[0] for p in pairs]))
    np.testing.assert_array_equal(y, np.concatenate([p[1] for p in pairs]))
  assert ds.data.train.counts.tolist() == [len('Nuncle!') + 1, sum(len(s) + 1 for s in snippets['THE_TEMPEST_MIRANDA'])]


def _stackoverflow_clients():
  return {'00000013': {'tokens': np.array([b'how do i sort a list', b'use sorted ( )'], dtype=object)},
          '00000002': {'tokens': np.array([b'what is a list'], dtype=object)}}


def test_tff_stackoverflow_next_words_in_memory_and_streamed_to_a_host_store(tmp_path):
  path = _write_h5(tmp_path / 'stackoverflow_train.h5', _stackoverflow_clients())
  (tmp_path / 'stackoverflow.word_count').write_text('a 40\nlist 30\nhow 20\nsort 10\n')
  vocab = text.word_vocabulary(text.read_word_counts(tmp_path / 'stackoverflow.word_count'), size=3)
  ds = tff_h5.stackoverflow(path, vocab, test_fraction=0.0, max_length=4)
  assert ds.client_ids == ('00000002', '00000013') and ds.num_classes == 7
  x, y = ds.data.train.client(0)   # 'what is a list' -> BOS what is a list EOS
  oov, bos, eos = vocab.oov, vocab.bos, vocab.eos
  np.testing.assert_array_equal(y, [oov, oov, 1, 2, eos])
  np.testing.assert_array_equal(x[-1], [oov, oov, 1, 2])
  assert ds.data.train.counts.tolist() == [5, 5 + 5]   # the 6-word question is cut at 4 words, + EOS

  convert = tff_h5.stackoverflow_examples(vocab, max_length=4)
  store, ids = tff_h5.stream_to_host_store(path, 'stackoverflow', ('tokens',), convert, tmp_path / 'store',
                                           max_examples=8)
  assert ids == ['00000002', '00000013'] and sorted(os.listdir(tmp_path / 'store')) == ['count.npy', 'x.npy', 'y.npy']
  assert isinstance(store.tree.x, np.memmap) and store.tree.x.shape == (2, 8, 4)
  np.testing.assert_array_equal(store.tree.count, [5, 8])
  for k in range(2):
    n = int(store.tree.count[k])
    np.testing.assert_array_equal(store.tree.x[k, :n], ds.data.train.x[k, :n])
    np.testing.assert_array_equal(store.tree.y[k, :n], ds.data.train.y[k, :n])
  assert np.asarray(store.gather(np.array([1])).x).shape == (1, 8, 4)
  (tmp_path / 'bad.word_count').write_text('a 40\nlist many\n')
  with pytest.raises(ValueError, match=r"bad.word_count line 2 is 'list many'; expected \"word count\""):
    text.read_word_counts(tmp_path / 'bad.word_count')


def test_tff_cifar100_pachinko_clients_split_their_own_images(tmp_path):
  rng = _rng(5)
  clients = {str(i): {'image': rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
                      'label': rng.integers(0, 100, (10,)).astype(np.int64),
                      'coarse_label': rng.integers(0, 20, (10,)).astype(np.int64)} for i in (0, 1, 10)}
  ds = tff_h5.cifar100(_write_h5(tmp_path / 'fed_cifar100_train.h5', clients), test_fraction=0.2)
  assert ds.client_ids == ('0', '1', '10') and ds.data.train.counts.tolist() == [8, 8, 8]
  assert ds.data.test.counts.tolist() == [2, 2, 2] and ds.data.train.x.dtype == np.uint8
  k = ds.client_ids.index('10')
  got = np.concatenate([ds.data.train.client(k)[1], ds.data.test.client(k)[1]])
  assert sorted(got.tolist()) == sorted(clients['10']['label'].tolist())


# ---------------------------------------------------------------------------------------------------------------
# Label-skew partitions from flwr-datasets
# ---------------------------------------------------------------------------------------------------------------


def test_dirichlet_label_skew_covers_every_example_once_and_skews_labels():
  labels = np.repeat(np.arange(10), 200)
  skewed = natural.label_skew_partition(labels, 20, alpha=0.1, seed=1)
  uniform = natural.label_skew_partition(labels, 20, alpha=100.0, seed=1)
  for parts in (skewed, uniform):
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
  classes = lambda parts: np.mean([len(np.unique(labels[p])) for p in parts if len(p)])  # noqa: E731
  assert classes(skewed) < 5 < classes(uniform)
  with_min = natural.label_skew_partition(labels, 20, alpha=0.5, min_size=20, seed=2)
  assert min(len(p) for p in with_min) >= 20
  for a, b in zip(skewed, natural.label_skew_partition(labels, 20, alpha=0.1, seed=1)):
    np.testing.assert_array_equal(a, b)   # seeded


def test_pathological_label_skew_gives_each_client_its_classes():
  labels = np.repeat(np.arange(10), 50)
  parts = natural.label_skew_partition(labels, 10, kind='pathological', classes_per_client=2, seed=0)
  assert all(1 <= len(np.unique(labels[p])) <= 2 for p in parts)
  assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts)   # no example twice
  with pytest.raises(ValueError, match="kind must be 'dirichlet' or 'pathological'"):
    natural.label_skew_partition(labels, 10, kind='shards')
  with pytest.raises(ValueError, match=r'labels must be a 1-D integer array, got float64\[500\]'):
    natural.label_skew_partition(labels.astype(float), 10)


# ---------------------------------------------------------------------------------------------------------------
# databricks-dolly-15k by category (FedDPA's third dataset)
# ---------------------------------------------------------------------------------------------------------------

DOLLY_CATEGORIES = ('open_qa', 'closed_qa', 'brainstorming')


def _dolly_records(per_category=6):
  return [{'instruction': f'Question {i}?', 'context': f'Passage {i}.' if i % 2 else '', 'response': f'Answer {i}.',
           'category': DOLLY_CATEGORIES[i % 3]} for i in range(3 * per_category)]


def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return path


def test_dolly_clients_are_its_categories_and_the_test_pool_is_held_out(tmp_path):
  records = _dolly_records()
  data = dolly.load_dolly(_write_jsonl(tmp_path / 'databricks-dolly-15k.jsonl', records), test_per_category=2)
  assert data.client_categories == tuple(sorted(DOLLY_CATEGORIES)) == data.client_tasks
  assert [len(t) for t in data.train] == [4, 4, 4] and len(data.test) == 6
  for k, category in enumerate(data.client_categories):
    expected = [r for r in records if r['category'] == category]
    held = data.test_by_category[category]
    assert len(held) == 2 and data.clients_of(category) == (k,)
    got = {(ex.instruction, ex.output) for ex in data.train[k] + held}
    joined = {(r['instruction'] + (f"\n\n{r['context']}" if r['context'] else ''), r['response']) for r in expected}
    assert got == joined and all(type(ex.instruction) is str for ex in data.train[k])
    assert not {ex.output for ex in data.train[k]} & {ex.output for ex in held}
  again = dolly.load_dolly(tmp_path / 'databricks-dolly-15k.jsonl', test_per_category=2)
  assert again.test == data.test   # seeded

  with pytest.raises(ValueError, match=r"category 'brainstorming' has 6 records, not more than test_per_category=6"):
    dolly.load_dolly(tmp_path / 'databricks-dolly-15k.jsonl', test_per_category=6)
  no_context = [{k: v for k, v in r.items() if k != 'context'} for r in records]
  with pytest.raises(ValueError, match=r"the Dolly records have no field\(s\) \['context'\]"):
    dolly.load_dolly(_write_jsonl(tmp_path / 'old.jsonl', no_context))
  with pytest.raises(DatasetNotFoundError, match=r"databricks/databricks-dolly-15k"):
    dolly.load_dolly(tmp_path / 'absent.jsonl')


def test_stats_command_prints_the_documented_row(emnist_files, capsys, tmp_path):
  train_path, test_path, _, _ = emnist_files
  assert stats.main(['tff_emnist', str(train_path), str(test_path)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == stats.HEADER and lines[-1] == '| tff_emnist | 3 | 4 / 5 / 9 | 0 / 1 / 2 |'
  assert stats.main(['femnist', str(tmp_path / 'absent.parquet')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: no dataset at') and err.count('\n') == 1

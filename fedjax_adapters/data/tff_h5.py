"""TensorFlow Federated's published HDF5 files, read with ``h5py``: EMNIST, Shakespeare, Stack Overflow, CIFAR-100.

TFF (``tff.simulation.datasets``) publishes its natural-partition datasets as HDF5 files with one group per client::

  /examples/<client id>/<feature>     one dataset per feature, all of a client's with the same length n_k

* ``fed_emnist_{train,test}.h5``: ``pixels [n, 28, 28]`` float32 in [0, 1] (1 = background), ``label [n]`` int32
  0..61; 3,400 writers (``fed_emnist_digitsonly``: 3,383 writers, digits only). A writer's train and test examples
  are in the two files under the same id.
* ``shakespeare_{train,test}.h5``: ``snippets [n]`` byte strings (a speaking role's lines); 715 roles.
* ``stackoverflow_{train,held_out,test}.h5``: ``tokens [n]`` space-separated sentences (plus ``title``, ``tags``,
  ``type``, ``score``, ``creation_date``); 342,477 users in train; the vocabulary comes from
  ``stackoverflow.word_count``.
* ``fed_cifar100_{train,test}.h5``: ``image [n, 32, 32, 3]`` uint8, ``label [n]`` int64 0..99, ``coarse_label``;
  500 train clients of 100 images drawn by Pachinko allocation (Reddi et al., arXiv 2003.00295), and 100 *other*
  test clients, so each train client's test set is cut from its own images.

:func:`read_clients` walks a file client by client (only one client in memory) and checks the layout: the
``examples`` group, the features each client must have, their dtypes, equal lengths. Each converter returns a
:class:`~fedjax_adapters.data.natural.NaturalDataset`; :func:`stream_to_host_store` writes any number of clients into
memory-mapped files for :class:`~fedjax_adapters.federated.host_store.HostClientStore` (Stack Overflow's 342k users
do not fit in memory padded). Nothing is downloaded: a missing file is one line saying where TFF publishes it.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np

from fedjax_adapters.data import text
from fedjax_adapters.data.natural import NaturalDataset, federated_dataset, select_clients
from fedjax_adapters.data.vision import DatasetNotFoundError

GROUP = 'examples'
TFF_BUCKET = 'https://storage.googleapis.com/tff-datasets-public/'
ARCHIVES = {'emnist': 'fed_emnist.tar.bz2', 'shakespeare': 'shakespeare.tar.bz2',
            'stackoverflow': 'stackoverflow.tar.bz2', 'cifar100': 'fed_cifar100.tar.bz2'}
# feature -> numpy dtype kind it must have ('f' float, 'i' integer, 'u' unsigned, 'S'/'O' bytes or text)
KINDS = {'pixels': 'f', 'label': 'iu', 'snippets': 'SOU', 'tokens': 'SOU', 'image': 'u'}


def _open(path, dataset: str):
  import h5py  # pylint: disable=g-import-not-at-top  (optional dependency: the [data] extra)

  path = os.fspath(path)
  if not os.path.exists(path):
    archive = ARCHIVES[dataset]
    raise DatasetNotFoundError(f'no TFF {dataset} file at {path!r}; download {TFF_BUCKET}{archive} on a machine with '
                               f'internet access, unpack it (tar xjf {archive}) and pass the .h5 file.')
  try:
    f = h5py.File(path, 'r')
  except OSError as e:
    raise ValueError(f'{path!r} is not a readable HDF5 file ({e}).') from None
  if GROUP not in f:
    f.close()
    raise ValueError(f'{path!r} has no /{GROUP} group; TFF files hold /{GROUP}/<client id>/<feature>.')
  return f


def client_ids(path, dataset: str) -> list[str]:
  """The file's client ids, sorted (as TFF lists them)."""
  with _open(path, dataset) as f:
    return sorted(f[GROUP].keys())


def _features(path, client: str, group, features: Sequence[str]) -> dict[str, np.ndarray]:
  missing = [name for name in features if name not in group]
  if missing:
    raise ValueError(f'{path}: client {client!r} has no feature(s) {missing} (it has {sorted(group.keys())}).')
  out = {name: group[name][()] for name in features}
  for name, value in out.items():
    if value.dtype.kind not in KINDS.get(name, value.dtype.kind):
      raise ValueError(f'{path}: client {client!r} feature {name!r} has dtype {value.dtype}; expected a '
                       f'{"/".join(KINDS[name])} dtype.')
  lengths = {name: len(value) for name, value in out.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f'{path}: client {client!r} has features of different lengths {lengths} (ragged client).')
  return out


def read_clients(path, dataset: str, features: Sequence[str], clients: int | Sequence[str] | None = None
                 ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
  """``(client id, {feature: [n_k, ...]})`` for the chosen clients, in id order, one client read at a time.

  Args:
    path: the ``.h5`` file.
    dataset: ``'emnist'``, ``'shakespeare'``, ``'stackoverflow'`` or ``'cifar100'`` (for the missing-file message).
    features: the features every client must have.
    clients: all (None), the first ``n`` ids, or the named ids (unknown ids raise).
  """
  with _open(path, dataset) as f:
    ids = sorted(f[GROUP].keys())
    for i in select_clients(ids, clients):
      yield ids[i], _features(path, ids[i], f[GROUP][ids[i]], features)


def _decode(values) -> list[str]:
  return [v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in values]


def _convert_file(path, dataset: str, features, convert: Callable, clients) -> tuple[list[str], list, list]:
  ids, xs, ys = [], [], []
  for cid, feats in read_clients(path, dataset, features, clients):
    x, y = convert(feats)
    ids.append(cid)
    xs.append(x)
    ys.append(y)
  return ids, xs, ys


def _load(train_path, test_path, dataset: str, features, convert, *, clients, test_fraction, seed, drop_empty,
          num_classes) -> NaturalDataset:
  """Train file (and the same clients' test file, if given) through ``convert`` into a NaturalDataset."""
  ids, xs, ys = _convert_file(train_path, dataset, features, convert, clients)
  test_xs = test_ys = None
  if test_path is not None and xs:
    present = set(client_ids(test_path, dataset))
    test_ids, txs, tys = _convert_file(test_path, dataset, features, convert, [c for c in ids if c in present])
    test = dict(zip(test_ids, zip(txs, tys)))
    empty = (xs[0][:0], ys[0][:0])  # a client without test examples: evaluated with weight 0
    test_xs, test_ys = ([test.get(cid, empty)[j] for cid in ids] for j in (0, 1))
  data, kept = federated_dataset(xs, ys, ids, test_xs=test_xs, test_ys=test_ys, test_fraction=test_fraction,
                                 seed=seed, drop_empty=drop_empty)
  return NaturalDataset(data, kept, num_classes)


# ---------------------------------------------------------------------------------------------------------------------
# The four datasets
# ---------------------------------------------------------------------------------------------------------------------


def emnist_example(feats) -> tuple[np.ndarray, np.ndarray]:
  """TFF EMNIST -> ``([n, 28, 28, 1] uint8, [n] int32)``: pixels scaled to 0..255 as stored (1.0 -> 255)."""
  pixels = np.asarray(feats['pixels'], np.float32)
  if pixels.shape[1:] != (28, 28):
    raise ValueError(f'EMNIST pixels have shape {list(pixels.shape)}; expected [n, 28, 28].')
  return np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)[..., None], feats['label'].astype(np.int32)


def emnist(train_path, test_path=None, *, clients=None, test_fraction: float = 0.1, seed: int = 0,
           drop_empty: bool = False) -> NaturalDataset:
  """TFF's federated EMNIST by writer (``fed_emnist_train.h5``; with ``test_path``, each writer's own test set)."""
  return _load(train_path, test_path, 'emnist', ('pixels', 'label'), emnist_example, clients=clients,
               test_fraction=test_fraction, seed=seed, drop_empty=drop_empty, num_classes=62)


def shakespeare(train_path, test_path=None, *, clients=None, stride: int = 1, max_examples: int | None = None,
                test_fraction: float = 0.1, seed: int = 0, drop_empty: bool = False) -> NaturalDataset:
  """TFF's Shakespeare by speaking role: every snippet cut into LEAF's (80 characters, next character) examples.

  Args:
    train_path, test_path: ``shakespeare_train.h5`` and (optionally) ``shakespeare_test.h5``.
    clients: all roles, the first ``n`` ids, or a list of ids.
    stride: predict every ``stride``-th character of a snippet (1: every one, as LEAF).
    max_examples: keep at most this many examples per role (the first ones).
    test_fraction, seed: the per-role split when there is no test file.
    drop_empty: drop roles without training examples instead of raising.
  """
  vocab = text.shakespeare_vocabulary()

  def convert(feats):
    pairs = [text.char_windows(s, vocab, stride=stride) for s in _decode(feats['snippets'])]
    x = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros((0, text.SHAKESPEARE_WINDOW), np.int32)
    y = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros((0,), np.int32)
    return x[:max_examples], y[:max_examples]

  return _load(train_path, test_path, 'shakespeare', ('snippets',), convert, clients=clients,
               test_fraction=test_fraction, seed=seed, drop_empty=drop_empty, num_classes=vocab.size)


def stackoverflow_examples(vocab: text.Vocabulary, *, max_length: int = text.STACKOVERFLOW_LENGTH,
                           max_examples: int | None = None) -> Callable:
  """The converter of Stack Overflow sentences into next-word examples (``text.word_prefixes``)."""

  def convert(feats):
    pairs = [text.word_prefixes(s, vocab, max_length=max_length) for s in _decode(feats['tokens'])]
    x = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros((0, max_length), np.int32)
    y = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros((0,), np.int32)
    return x[:max_examples], y[:max_examples]

  return convert


def stackoverflow(train_path, vocab: text.Vocabulary, test_path=None, *, clients=None,
                  max_length: int = text.STACKOVERFLOW_LENGTH, max_examples: int | None = 1024,
                  test_fraction: float = 0.1, seed: int = 0, drop_empty: bool = False) -> NaturalDataset:
  """TFF's Stack Overflow next-word prediction by user, in memory (choose ``clients``; see
  :func:`stream_to_host_store` for the whole population).

  Args:
    train_path, test_path: ``stackoverflow_train.h5`` and optionally ``stackoverflow_test.h5`` (same users, later
      posts).
    vocab: ``text.word_vocabulary(text.read_word_counts('stackoverflow.word_count'))`` (10,000 words).
    clients: the first ``n`` user ids, or a list of ids (None: all, which rarely fits in memory).
    max_length: words per sentence (TFF: 20).
    max_examples: next-word examples kept per user (the first ones).
    test_fraction, seed, drop_empty: as for the other loaders.
  """
  convert = stackoverflow_examples(vocab, max_length=max_length, max_examples=max_examples)
  return _load(train_path, test_path, 'stackoverflow', ('tokens',), convert, clients=clients,
               test_fraction=test_fraction, seed=seed, drop_empty=drop_empty, num_classes=vocab.size)


def cifar100_example(feats) -> tuple[np.ndarray, np.ndarray]:
  image = np.asarray(feats['image'])
  if image.shape[1:] != (32, 32, 3):
    raise ValueError(f'CIFAR-100 images have shape {list(image.shape)}; expected [n, 32, 32, 3].')
  return image.astype(np.uint8), feats['label'].astype(np.int32).reshape(-1)


def cifar100(train_path, *, clients=None, test_fraction: float = 0.2, seed: int = 0,
             drop_empty: bool = False) -> NaturalDataset:
  """TFF's CIFAR-100 by Pachinko allocation (``fed_cifar100_train.h5``): each client's test set is cut from its
  own 100 images (TFF's test clients are other clients)."""
  return _load(train_path, None, 'cifar100', ('image', 'label'), cifar100_example, clients=clients,
               test_fraction=test_fraction, seed=seed, drop_empty=drop_empty, num_classes=100)


# ---------------------------------------------------------------------------------------------------------------------
# Whole populations: streamed into memory-mapped host stores
# ---------------------------------------------------------------------------------------------------------------------


def stream_to_host_store(path, dataset: str, features: Sequence[str], convert: Callable, out_dir, *,
                         max_examples: int, clients=None):
  """Writes every chosen client of a TFF file, converted, into memory-mapped ``.npy`` files: ``(store, ids)``.

  One client is in memory at a time, so a population of any size (Stack Overflow: 342,477 users) is written with
  constant memory. Each client keeps at most ``max_examples`` examples, padded to that many rows.

  Args:
    path: the ``.h5`` file; ``dataset`` names it for messages.
    features: the features ``convert`` reads.
    convert: ``{feature: array} -> (x [n, ...], y [n])``, e.g. :func:`emnist_example` or
      ``stackoverflow_examples(vocab)``.
    out_dir: the folder for ``x.npy``, ``y.npy``, ``count.npy``.
    max_examples: rows per client.
    clients: which clients (as :func:`read_clients`).

  Returns:
    ``(HostClientStore of ClientData(x, y, count), client ids)``; a client with no examples raises naming it.
  """
  from fedjax_adapters.federated.client_update import ClientData  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.federated.host_store import HostClientStore  # pylint: disable=g-import-not-at-top

  with _open(path, dataset) as f:
    ids = sorted(f[GROUP].keys())
  chosen = [ids[i] for i in select_clients(ids, clients)]
  os.makedirs(out_dir, exist_ok=True)
  arrays = {}
  for k, (cid, feats) in enumerate(read_clients(path, dataset, features, chosen)):
    x, y = (np.asarray(a)[:max_examples] for a in convert(feats))
    if not len(y):
      raise ValueError(f'{path}: client {cid!r} (index {k}) has no examples.')
    if not arrays:
      arrays = {name: np.lib.format.open_memmap(os.path.join(out_dir, f'{name}.npy'), mode='w+', dtype=a.dtype,
                                                shape=(len(chosen), max_examples) + a.shape[1:])
                for name, a in (('x', x), ('y', y))}
      arrays['count'] = np.lib.format.open_memmap(os.path.join(out_dir, 'count.npy'), mode='w+', dtype=np.int32,
                                                  shape=(len(chosen),))
    arrays['x'][k, :len(x)], arrays['y'][k, :len(y)], arrays['count'][k] = x, y, len(y)
  for a in arrays.values():
    a.flush()
  return HostClientStore(ClientData(arrays['x'], arrays['y'], arrays['count'])), chosen

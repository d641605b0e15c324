"""Random data written in the published format of each natural-partition dataset (for smoke runs without the data).

:func:`write_natural` writes the files ``fedjax_adapters.experiments.configs.floral.natural_files`` looks for, with
random content of the right types and shapes, so a smoke run goes through the same loader as a real one:
``femnist.parquet`` (``flwrlabs/femnist``'s features), ``shakespeare.csv`` (``flwrlabs/shakespeare``'s columns),
``stackoverflow_train.h5`` with ``stackoverflow.word_count`` and ``fed_cifar100_train.h5`` (TFF's
``/examples/<client>/<feature>`` layout). The numbers such a run prints mean nothing.
"""
from __future__ import annotations

import os

import numpy as np

from fedjax_adapters.data import text

DATASETS = ('femnist', 'shakespeare', 'stackoverflow', 'cifar100_pachinko')
_WORDS = ('how', 'do', 'i', 'sort', 'a', 'list', 'in', 'python', 'use', 'the', 'key', 'function', 'error', 'when')


def _femnist(folder: str, rng: np.random.Generator, num_clients: int, examples: int) -> None:
  import datasets  # pylint: disable=g-import-not-at-top

  from fedjax_adapters.data.natural import quiet_progress  # pylint: disable=g-import-not-at-top
  n = num_clients * examples
  features = datasets.Features({'image': datasets.Image(), 'writer_id': datasets.Value('string'),
                                'hsf_id': datasets.Value('int64'), 'character': datasets.ClassLabel(num_classes=62)})
  table = {'image': list(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
           'writer_id': [f'f{k:04d}_00' for k in rng.permutation(np.repeat(np.arange(num_clients), examples))],
           'hsf_id': [0] * n, 'character': rng.integers(0, 62, n).tolist()}
  with quiet_progress():
    datasets.Dataset.from_dict(table, features=features).to_parquet(os.path.join(folder, 'femnist.parquet'))


def _shakespeare(folder: str, rng: np.random.Generator, num_clients: int, examples: int) -> None:
  import csv  # pylint: disable=g-import-not-at-top
  chars = np.array(list(text.SHAKESPEARE_CHARS.replace('\r', '')))
  with open(os.path.join(folder, 'shakespeare.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['character_id', 'x', 'y'])
    for k in range(num_clients):
      line = ''.join(rng.choice(chars, text.SHAKESPEARE_WINDOW + examples))
      for i in range(examples):
        writer.writerow([f'PLAY_ROLE{k}', line[i:i + text.SHAKESPEARE_WINDOW], line[i + text.SHAKESPEARE_WINDOW]])


def _h5(path: str, clients: dict) -> None:
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, 'w') as f:
    group = f.create_group('examples')
    for cid, feats in clients.items():
      for name, value in feats.items():
        group.create_dataset(f'{cid}/{name}', data=value)


def _stackoverflow(folder: str, rng: np.random.Generator, num_clients: int, examples: int) -> None:
  def sentence():
    return ' '.join(rng.choice(_WORDS, int(rng.integers(3, 12))))
  clients = {f'{k:08d}': {'tokens': np.array([sentence().encode() for _ in range(examples)], dtype=object)}
             for k in range(num_clients)}
  _h5(os.path.join(folder, 'stackoverflow_train.h5'), clients)
  with open(os.path.join(folder, 'stackoverflow.word_count'), 'w', encoding='utf-8') as f:
    f.writelines(f'{w} {len(_WORDS) - i}\n' for i, w in enumerate(_WORDS))


def _cifar100(folder: str, rng: np.random.Generator, num_clients: int, examples: int) -> None:
  clients = {str(k): {'image': rng.integers(0, 256, (examples, 32, 32, 3), dtype=np.uint8),
                      'label': rng.integers(0, 100, examples).astype(np.int64),
                      'coarse_label': rng.integers(0, 20, examples).astype(np.int64)} for k in range(num_clients)}
  _h5(os.path.join(folder, 'fed_cifar100_train.h5'), clients)


def write_natural(dataset: str, folder: str | os.PathLike, *, num_clients: int = 4, examples: int = 12,
                  seed: int = 0) -> str:
  """Writes ``num_clients`` clients of ``examples`` random examples of ``dataset`` in its format into ``folder``.

  Args:
    dataset: one of :data:`DATASETS`.
    folder: where the files go (created).
    num_clients: clients written.
    examples: examples per client (Stack Overflow: sentences, each several next-word examples).
    seed: seeds the content.

  Returns:
    ``folder``.
  """
  writers = {'femnist': _femnist, 'shakespeare': _shakespeare, 'stackoverflow': _stackoverflow,
             'cifar100_pachinko': _cifar100}
  if dataset not in writers:
    raise ValueError(f'unknown dataset {dataset!r}; generated datasets are {DATASETS}.')
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  writers[dataset](folder, np.random.default_rng(seed), num_clients, examples)
  return folder

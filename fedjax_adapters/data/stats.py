"""Client statistics of a federated dataset, as docs/data.md prints them: clients, examples per client min / median / max.

Usage (every dataset is read from a local copy; nothing is downloaded)::

  python -m fedjax_adapters.data.stats feddpa DIR                   # FedDPA folder (Dataset 1 layout)
  python -m fedjax_adapters.data.stats dolly databricks-dolly-15k.jsonl
  python -m fedjax_adapters.data.stats femnist femnist.parquet       # flwrlabs/femnist, by writer
  python -m fedjax_adapters.data.stats shakespeare shakespeare.csv   # flwrlabs/shakespeare, by role
  python -m fedjax_adapters.data.stats tff_emnist fed_emnist_train.h5 [fed_emnist_test.h5]
  python -m fedjax_adapters.data.stats tff_shakespeare shakespeare_train.h5 [shakespeare_test.h5]
  python -m fedjax_adapters.data.stats tff_stackoverflow stackoverflow_train.h5 stackoverflow.word_count --clients N
  python -m fedjax_adapters.data.stats tff_cifar100 fed_cifar100_train.h5
  python -m fedjax_adapters.data.stats floral TASK [--seed S]       # a FLoRAL runner task's partition

Each prints one markdown table row: ``| dataset | clients | train min / median / max | test min / median / max |``.
A missing file or a malformed dataset is one line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

HEADER = '| dataset | clients | train examples per client (min / median / max) | test (min / median / max) |'


def spread(counts) -> str:
  """``'min / median / max'`` of per-client counts (the median of an even number of clients is a mean of two)."""
  counts = np.asarray(counts)
  return f'{int(counts.min())} / {float(np.median(counts)):g} / {int(counts.max())}'


def row(name: str, train_counts, test_counts) -> str:
  """One table row for a dataset with the given per-client train and test counts."""
  return f'| {name} | {len(train_counts)} | {spread(train_counts)} | {spread(test_counts)} |'


def _feddpa_counts(data, name: str) -> str:
  test = [len(data.test_indices[c]) for c in data.client_categories]
  return row(name, [len(t) for t in data.train], test)


def _natural(ds, name: str) -> str:
  return row(name, ds.data.train.counts, ds.data.test.counts)


def _stackoverflow(args) -> str:
  from fedjax_adapters.data import tff_h5, text  # pylint: disable=g-import-not-at-top
  vocab = text.word_vocabulary(text.read_word_counts(args.paths[1]))
  return _natural(tff_h5.stackoverflow(args.paths[0], vocab, clients=args.clients), 'tff_stackoverflow')


def _floral(args) -> str:
  from fedjax_adapters.experiments import floral_tasks  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.experiments.configs.floral import TASKS  # pylint: disable=g-import-not-at-top
  if args.paths[0] not in TASKS:
    raise ValueError(f'unknown FLoRAL task {args.paths[0]!r}; tasks: {", ".join(TASKS)}.')
  data = floral_tasks.load_data(TASKS[args.paths[0]], args.seed, data_dir=args.data_dir)
  return row(f'{args.paths[0]} (seed {args.seed})', data.train.counts, data.test.counts)


def stats_row(args) -> str:
  """The table row of ``args.dataset`` read from ``args.paths``."""
  from fedjax_adapters.data import dolly, feddpa, natural, tff_h5  # pylint: disable=g-import-not-at-top
  p = args.paths
  second = p[1] if len(p) > 1 else None
  readers = {
      'feddpa': lambda: _feddpa_counts(feddpa.load_feddpa(p[0]), 'feddpa'),
      'dolly': lambda: _feddpa_counts(dolly.load_dolly(p[0]), 'dolly'),
      'femnist': lambda: _natural(natural.femnist(p[0], clients=args.clients), 'femnist'),
      'shakespeare': lambda: _natural(natural.shakespeare(p[0], clients=args.clients), 'shakespeare'),
      'tff_emnist': lambda: _natural(tff_h5.emnist(p[0], second, clients=args.clients), 'tff_emnist'),
      'tff_shakespeare': lambda: _natural(tff_h5.shakespeare(p[0], second, clients=args.clients),
                                          'tff_shakespeare'),
      'tff_stackoverflow': lambda: _stackoverflow(args),
      'tff_cifar100': lambda: _natural(tff_h5.cifar100(p[0], clients=args.clients), 'tff_cifar100'),
      'floral': lambda: _floral(args),
  }
  return readers[args.dataset]()


DATASETS = ('feddpa', 'dolly', 'femnist', 'shakespeare', 'tff_emnist', 'tff_shakespeare', 'tff_stackoverflow',
            'tff_cifar100', 'floral')


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m fedjax_adapters.data.stats', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('dataset', choices=DATASETS)
  p.add_argument('paths', nargs='+', help='the local files (or, for floral, the task name)')
  p.add_argument('--clients', type=int, default=None, help='only the first N clients (sorted ids)')
  p.add_argument('--seed', type=int, default=0, help='floral: the seed of the partition')
  p.add_argument('--data-dir', default=None, help='floral: the tfds folder of the vision tasks')
  p.add_argument('--no-header', action='store_true', help='print the row only')
  args = p.parse_args(argv)
  if args.dataset == 'tff_stackoverflow' and len(args.paths) != 2:
    p.error('tff_stackoverflow needs the train .h5 file and the stackoverflow.word_count file.')
  try:
    line = stats_row(args)
  except (ValueError, OSError) as e:   # DatasetNotFoundError is an OSError
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  if not args.no_header:
    print(HEADER)
    print('|---|---|---|---|')
  print(line)
  return 0


if __name__ == '__main__':
  sys.exit(main())

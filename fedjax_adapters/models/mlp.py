"""Multilayer perceptron for MNIST (FLoRAL, arXiv 2410.03497, MNIST tasks: 784-200-10 with ReLU).

Also holds the PyTorch-default initializers that the small vision models share: the FLoRAL code is PyTorch, and
matching its initial weight scale keeps learning rates from the paper (0.1 on MNIST, 0.03 on CIFAR-10) meaningful.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def torch_kernel_init() -> nnx.Initializer:
  """PyTorch's default ``nn.Linear``/``nn.Conv2d`` weight init, U(±1/sqrt(fan_in)).

  PyTorch uses kaiming_uniform(a=sqrt(5)), whose bound is sqrt(6 / ((1 + 5) * fan_in)) = 1/sqrt(fan_in); Flax's
  variance_scaling with scale 1/3 and a uniform distribution has bound sqrt(3 * (1/3) / fan_in), the same. Flax's
  fan_in for a conv kernel ``[kh, kw, in, out]`` is ``kh * kw * in``, as in PyTorch.
  """
  return nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int) -> nnx.Initializer:
  """PyTorch's default bias init, U(±1/sqrt(fan_in)) with the fan_in of the layer's kernel.

  Flax bias initializers only see the bias shape, so the kernel's fan_in is bound here.

  Args:
    fan_in: number of inputs feeding one output unit (``in_features``, or ``kh * kw * in`` for a conv).

  Returns:
    An initializer ``(key, shape, dtype) -> array``.
  """
  if fan_in <= 0:
    raise ValueError(f'torch_bias_init needs a positive fan_in, got {fan_in}.')
  bound = 1.0 / math.sqrt(fan_in)

  def init_fn(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init_fn


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
  """An ``nnx.Linear`` initialized like PyTorch's ``nn.Linear``."""
  return nnx.Linear(in_features, out_features, kernel_init=torch_kernel_init(),
                    bias_init=torch_bias_init(in_features), rngs=rngs)


class MLP(nnx.Module):
  """Fully connected ReLU network on flattened inputs.

  The default is the paper's MNIST model, 784-200-10 (159,010 parameters). Layers live in ``self.layers`` (an
  ``nnx.List`` of ``nnx.Linear``; the last one is the classifier head), so adapter targeting sees the paths
  ``layers/0``, ``layers/1``, ...

  Example:
    >>> model = MLP(rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((8, 28, 28, 1))).shape
    (8, 10)
  """

  def __init__(self, in_features: int = 784, hidden: Sequence[int] = (200,), out_features: int = 10, *,
               rngs: nnx.Rngs):
    """Builds the layers.

    Args:
      in_features: size of one flattened input (784 for 28×28×1 images).
      hidden: widths of the hidden layers, each followed by a ReLU. May be empty (a linear model).
      out_features: number of outputs (classes).
      rngs: initialization randomness (the ``params`` or ``default`` stream).
    """
    widths = (int(in_features), *(int(h) for h in hidden), int(out_features))
    if any(w <= 0 for w in widths):
      raise ValueError(f'MLP widths must be positive, got in_features={in_features}, hidden={tuple(hidden)}, '
                       f'out_features={out_features}.')
    self.in_features = widths[0]
    self.layers = nnx.List([torch_linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Applies the network.

    Args:
      x: ``[B, ...]`` float inputs; everything after the batch axis is flattened and must hold ``in_features``
        values (e.g. ``[B, 28, 28, 1]`` or ``[B, 784]``).
      train: unused (no dropout or batch norm); kept so every model has the same call signature.
      rngs: unused, as ``train``.

    Returns:
      ``[B, out_features]`` logits.
    """
    del train, rngs  # unused: this model behaves the same in training and evaluation
    x = x.reshape(x.shape[0], -1)
    if x.shape[-1] != self.in_features:
      raise ValueError(f'MLP expects {self.in_features} features per example, got input of shape {x.shape}.')
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)

"""Vision models by name, as experiment configs refer to them, and a parameter counter."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from flax import nnx

from fedjax_adapters.models.cnn import CifarCNN
from fedjax_adapters.models.mlp import MLP
from fedjax_adapters.models.resnet import ResNet
from fedjax_adapters.models.vgg import VGG8

# name -> constructor; every constructor takes keyword arguments plus a keyword-only ``rngs``.
MODELS: dict[str, Callable[..., nnx.Module]] = {
    'mlp': MLP,              # MNIST: 784-200-10
    'cifar_cnn': CifarCNN,   # CIFAR-10: conv5x5(32)-pool2-conv3x3(64)-pool3-fc64-fc10
    'vgg8': VGG8,            # CIFAR-100: convs 16,32,64,128,512 + fc512, fc512, fc100
    'resnet': ResNet,        # ResNet-8 with batch norm
}


def get_model(name: str, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
  """Builds a registered model.

  Args:
    name: one of ``MODELS`` (``'mlp'``, ``'cifar_cnn'``, ``'vgg8'``, ``'resnet'``).
    rngs: initialization randomness (and, for VGG8, the default dropout stream).
    **kwargs: constructor arguments of that model (e.g. ``num_classes=``, ``hidden=``).

  Returns:
    The model; call it as ``model(x, train=...)``.

  Example:
    >>> model = get_model('mlp', rngs=nnx.Rngs(0), hidden=(100,))
    >>> count_params(model)
    79510
  """
  try:
    ctor = MODELS[name]
  except KeyError:
    raise ValueError(f'unknown model name {name!r}; valid names are {sorted(MODELS)}.') from None
  return ctor(rngs=rngs, **kwargs)


def count_params(model: nnx.Module, variable_type: type[nnx.Variable] = nnx.Param) -> int:
  """Number of scalars in the model's variables of ``variable_type`` (trainable parameters by default).

  Batch-norm running statistics (``nnx.BatchStat``) and RNG state are not ``nnx.Param``, so they are not counted
  unless asked for. Works on abstract models too (``nnx.eval_shape(lambda: get_model(...))``), which counts a
  large model without allocating or compiling anything.
  """
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, variable_type))))

"""Small CNN for CIFAR-10 (FLoRAL, arXiv 2410.03497, CIFAR-10 tasks; `Cifar10CNN` in the FLoRAL code).

Architecture on 32×32×3 NHWC images:

  conv1 5×5, 3→32, VALID   32×32 → 28×28, ReLU, max-pool 2 (stride 2) → 14×14
  conv2 3×3, 32→64, VALID  14×14 → 12×12, ReLU, max-pool 3 (stride 3) → 4×4
  flatten 4·4·64 = 1024
  fc1 1024→64, ReLU
  fc2 64→10

87,178 parameters. Pooling has no parameters, so the adapter surgery only has to find conv1, conv2, fc1, fc2.
"""
from __future__ import annotations

import jax
from flax import nnx

from fedjax_adapters.conv import conv_fn
from fedjax_adapters.models.mlp import torch_bias_init, torch_kernel_init, torch_linear


def torch_conv(in_features: int, out_features: int, kernel_size: int, *, padding, rngs: nnx.Rngs,
               conv_impl: str = 'auto') -> nnx.Conv:
  """An ``nnx.Conv`` (stride 1) initialized like PyTorch's ``nn.Conv2d``, convolving with ``conv_fn(conv_impl)``."""
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), padding=padding,
                  conv_general_dilated=conv_fn(conv_impl),
                  kernel_init=torch_kernel_init(),
                  bias_init=torch_bias_init(kernel_size * kernel_size * in_features), rngs=rngs)


def cifar_cnn_flat_features(image_size: int = 32, channels: int = 64) -> int:
  """Size of CifarCNN's flattened feature map for square ``image_size`` inputs (1024 for 32×32).

  Each step floors, like PyTorch's VALID convolutions and max-pooling without padding.
  """
  side = image_size - 4      # conv 5×5 VALID
  side = side // 2           # max-pool 2
  side = side - 2            # conv 3×3 VALID
  side = side // 3           # max-pool 3
  if side <= 0:
    raise ValueError(f'CifarCNN needs images of at least 14×14 pixels, got image_size={image_size}.')
  return side * side * channels


class CifarCNN(nnx.Module):
  """The FLoRAL CIFAR-10 CNN: conv5×5(32)-pool2-conv3×3(64)-pool3-FC(1024→64)-FC(64→10), ReLU.

  Example:
    >>> model = CifarCNN(rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 32, 32, 3))).shape
    (4, 10)
  """

  def __init__(self, in_features: int = 3, num_classes: int = 10, *, image_size: int = 32, conv_impl: str = 'auto',
               rngs: nnx.Rngs):
    """Builds the layers.

    Args:
      in_features: input channels (3 for CIFAR).
      num_classes: outputs of the head.
      image_size: side of the square input images; fixes fc1's fan-in (1024 for 32).
      conv_impl: ``'auto'`` (slices + matmul on the CPU, XLA's conv elsewhere), ``'matmul'`` or ``'xla'``; see
        :mod:`fedjax_adapters.conv`.
      rngs: initialization randomness.
    """
    self.flat_features = cifar_cnn_flat_features(image_size, 64)
    self.conv1 = torch_conv(in_features, 32, 5, padding='VALID', rngs=rngs, conv_impl=conv_impl)
    self.conv2 = torch_conv(32, 64, 3, padding='VALID', rngs=rngs, conv_impl=conv_impl)
    self.fc1 = torch_linear(self.flat_features, 64, rngs=rngs)
    self.fc2 = torch_linear(64, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Applies the network.

    Args:
      x: ``[B, H, W, C]`` float images (NHWC).
      train: unused (no dropout or batch norm); kept so every model has the same call signature.
      rngs: unused, as ``train``.

    Returns:
      ``[B, num_classes]`` logits.
    """
    del train, rngs  # unused: this model behaves the same in training and evaluation
    x = jax.nn.relu(self.conv1(x))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = jax.nn.relu(self.conv2(x))
    x = nnx.max_pool(x, (3, 3), strides=(3, 3))
    x = x.reshape(x.shape[0], -1)
    if x.shape[-1] != self.flat_features:
      raise ValueError(f'CifarCNN was built for {self.flat_features} flattened features but got {x.shape[-1]}; '
                       f'pass image_size= matching the inputs.')
    x = jax.nn.relu(self.fc1(x))
    return self.fc2(x)

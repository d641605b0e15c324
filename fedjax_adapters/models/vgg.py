"""VGG8 for CIFAR-100 (FLoRAL, arXiv 2410.03497, CIFAR-100 task; `floral/model/vgg8.py` in the FLoRAL code).

"VGG8" counts the eight weight layers: five 3×3 convs (padding 1, ReLU, no batch norm), each followed by a 2×2
max-pool, then three fully connected layers. On 32×32×3 NHWC images:

  conv0   3→16    32×32 → pool → 16×16
  conv1  16→32    16×16 → pool →  8×8
  conv2  32→64     8×8  → pool →  4×4
  conv3  64→128    4×4  → pool →  2×2
  conv4 128→512    2×2  → pool →  1×1        flatten: 512
  dropout(0.5) → fc1 512→512, ReLU → dropout(0.5) → fc2 512→512, ReLU → fc3 512→100

1,264,388 parameters. Conv kernels start from N(0, 2 / (k·k·out_channels)) with zero biases, as in the FLoRAL code;
the linear layers keep PyTorch's default init.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from fedjax_adapters.conv import conv_fn
from fedjax_adapters.models.mlp import torch_linear

VGG8_CONV_WIDTHS = (16, 32, 64, 128, 512)


class VGG8(nnx.Module):
  """VGG8 without batch norm: five conv+pool stages, two 512-wide hidden FC layers with dropout, and a head.

  Convs live in ``self.convs`` (``nnx.List``: paths ``convs/0`` … ``convs/4``); the FC layers are ``fc1``, ``fc2``
  and the head ``fc3``.

  Example:
    >>> model = VGG8(rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32, 32, 3))).shape
    (2, 100)
  """

  def __init__(self, in_features: int = 3, num_classes: int = 100, *, conv_widths: Sequence[int] = VGG8_CONV_WIDTHS,
               hidden: int = 512, dropout_rate: float = 0.5, image_size: int = 32, conv_impl: str = 'auto',
               rngs: nnx.Rngs):
    """Builds the layers.

    Args:
      in_features: input channels.
      num_classes: outputs of the head (100 for CIFAR-100).
      conv_widths: output channels of the conv stages; each stage halves the image side.
      hidden: width of the two hidden FC layers.
      dropout_rate: drop probability before fc1 and fc2 (PyTorch ``nn.Dropout()`` default, 0.5).
      image_size: side of the square inputs; must be divisible by ``2 ** len(conv_widths)``.
      conv_impl: how convs are computed: ``'auto'`` (slices + matmul on the CPU, XLA's conv elsewhere), ``'matmul'``
        or ``'xla'``; see :mod:`fedjax_adapters.conv`.
      rngs: initialization randomness; its ``dropout`` (or ``default``) stream also drives dropout in training
        unless ``__call__`` gets its own ``rngs``.
    """
    conv_widths = tuple(int(w) for w in conv_widths)
    side = image_size // 2 ** len(conv_widths)
    if not conv_widths or side < 1 or image_size % 2 ** len(conv_widths):
      raise ValueError(f'VGG8 with {len(conv_widths)} pooling stages needs image_size divisible by '
                       f'{2 ** len(conv_widths)}, got image_size={image_size}.')
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}.')
    self.flat_features = side * side * conv_widths[-1]
    convs = []
    for c_in, c_out in zip((in_features,) + conv_widths[:-1], conv_widths):
      # He-normal on fan_out = k·k·out, zero bias: the FLoRAL VGG8 init (no batch norm, so the scale matters).
      convs.append(nnx.Conv(c_in, c_out, (3, 3), padding=1, conv_general_dilated=conv_fn(conv_impl),
                            kernel_init=nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                            bias_init=nnx.initializers.zeros_init(), rngs=rngs))
    self.convs = nnx.List(convs)
    self.dropout1 = nnx.Dropout(dropout_rate, rngs=rngs)
    self.fc1 = torch_linear(self.flat_features, hidden, rngs=rngs)
    self.dropout2 = nnx.Dropout(dropout_rate, rngs=rngs)
    self.fc2 = torch_linear(hidden, hidden, rngs=rngs)
    self.fc3 = torch_linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Applies the network.

    Args:
      x: ``[B, H, W, C]`` float images (NHWC).
      train: apply dropout.
      rngs: dropout randomness for this call: an ``nnx.Rngs`` (its ``dropout`` or ``default`` stream) or a raw
        PRNG key; default: the streams given at construction, which live in the model state and advance on every
        training call.

    Returns:
      ``[B, num_classes]`` logits.
    """
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
      # A raw key handed to both dropout layers would give them the same mask; a stream draws a fresh key per layer.
      rngs = nnx.Rngs(dropout=rngs)
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
      x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    if x.shape[-1] != self.flat_features:
      raise ValueError(f'VGG8 was built for {self.flat_features} flattened features but got {x.shape[-1]}; '
                       f'pass image_size= matching the inputs.')
    x = self.dropout1(x, deterministic=not train, rngs=rngs)
    x = jax.nn.relu(self.fc1(x))
    x = self.dropout2(x, deterministic=not train, rngs=rngs)
    x = jax.nn.relu(self.fc2(x))
    return self.fc3(x)

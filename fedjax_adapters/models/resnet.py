"""Small CIFAR-style ResNet with batch norm (He et al. 2016, §4.2 layout), for exercising norm adaptors.

The FLoRAL paper's headline models have no normalization layers; this model exists so that batch-norm adaptors
(FLoRAL's norm "LoRA", arXiv 2410.03497 §1 of the reference notes) and the handling of running statistics in
federated averaging have a real network to run on. The default is ResNet-8 on 32×32×3 NHWC images:

  stem    conv 3×3, 3→16 (no bias), BN, ReLU                      32×32
  block0  [conv 3×3 16→16, BN, ReLU, conv 3×3 16→16, BN] + x       32×32
  block1  [conv 3×3 16→32 /2, BN, ReLU, conv 3×3, BN] + proj(x)    16×16   proj = conv 1×1 /2 + BN
  block2  [conv 3×3 32→64 /2, BN, ReLU, conv 3×3, BN] + proj(x)     8×8
  global average pool → head 64→num_classes

1 + 2·3 + 1 = 8 weight layers on the main path; 78,042 parameters with 10 classes (plus 672 BN running-stat
entries, which are not parameters). ``stage_sizes=(1, 1, 1, 1), widths=(64, 128, 256, 512)`` gives ResNet-10.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_adapters.conv import conv_fn
from fedjax_adapters.models.mlp import torch_linear


def _he_conv(in_features: int, out_features: int, kernel_size: int, stride: int, *, rngs: nnx.Rngs,
             conv_impl: str = 'auto') -> nnx.Conv:
  # Bias-free: the following batch norm has its own shift. Symmetric padding (k//2) rather than 'SAME', because
  # 'SAME' pads stride-2 convs asymmetrically and would differ from the PyTorch ResNets the literature uses.
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
                  padding=kernel_size // 2, use_bias=False, conv_general_dilated=conv_fn(conv_impl),
                  kernel_init=nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal'), rngs=rngs)


class BasicBlock(nnx.Module):
  """Two 3×3 conv+BN layers with an identity or projection (1×1 conv + BN) shortcut."""

  def __init__(self, in_features: int, out_features: int, stride: int = 1, *, bn_momentum: float = 0.9,
               conv_impl: str = 'auto', rngs: nnx.Rngs):
    """Builds the block.

    Args:
      in_features: input channels.
      out_features: output channels.
      stride: stride of the first conv (and of the projection); 2 halves the image side.
      bn_momentum: running-statistics decay, Flax convention (0.9 = PyTorch's momentum 0.1).
      conv_impl: how convs are computed: ``'auto'`` (slices + matmul on the CPU, XLA's conv elsewhere), ``'matmul'``
        or ``'xla'``; see :mod:`fedjax_adapters.conv`.
      rngs: initialization randomness.
    """
    self.conv1 = _he_conv(in_features, out_features, 3, stride, rngs=rngs, conv_impl=conv_impl)
    self.bn1 = nnx.BatchNorm(out_features, momentum=bn_momentum, epsilon=1e-5, rngs=rngs)
    self.conv2 = _he_conv(out_features, out_features, 3, 1, rngs=rngs, conv_impl=conv_impl)
    self.bn2 = nnx.BatchNorm(out_features, momentum=bn_momentum, epsilon=1e-5, rngs=rngs)
    if stride != 1 or in_features != out_features:
      self.shortcut_conv = _he_conv(in_features, out_features, 1, stride, rngs=rngs, conv_impl=conv_impl)
      self.shortcut_bn = nnx.BatchNorm(out_features, momentum=bn_momentum, epsilon=1e-5, rngs=rngs)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """``[B, H, W, in] -> [B, H/stride, W/stride, out]``; ``train``: BN uses batch stats and updates running ones."""
    eval_stats = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=eval_stats))
    y = self.bn2(self.conv2(y), use_running_average=eval_stats)
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x), use_running_average=eval_stats)
    return jax.nn.relu(x + y)


class ResNet(nnx.Module):
  """CIFAR-style ResNet: 3×3 stem, stages of :class:`BasicBlock`, global average pool, linear head.

  Blocks live in ``self.blocks`` (``nnx.List``, paths ``blocks/0/conv1`` …); the stem is ``stem_conv``/``stem_bn``
  and the head ``head``.

  Example:
    >>> model = ResNet(rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32, 32, 3)), train=True).shape
    (2, 10)
  """

  def __init__(self, in_features: int = 3, num_classes: int = 10, *, stage_sizes: Sequence[int] = (1, 1, 1),
               widths: Sequence[int] = (16, 32, 64), bn_momentum: float = 0.9, conv_impl: str = 'auto',
               rngs: nnx.Rngs):
    """Builds the network.

    Args:
      in_features: input channels.
      num_classes: outputs of the head.
      stage_sizes: blocks per stage; every stage after the first starts with a stride-2 block.
      widths: channels of each stage (the stem uses ``widths[0]``).
      bn_momentum: running-statistics decay, Flax convention (0.9 = PyTorch's momentum 0.1).
      conv_impl: how convs are computed: ``'auto'`` (slices + matmul on the CPU, XLA's conv elsewhere), ``'matmul'``
        or ``'xla'``; see :mod:`fedjax_adapters.conv`.
      rngs: initialization randomness.
    """
    stage_sizes = tuple(int(s) for s in stage_sizes)
    widths = tuple(int(w) for w in widths)
    if not stage_sizes or len(stage_sizes) != len(widths) or min(stage_sizes) < 1:
      raise ValueError(f'ResNet needs one positive block count per stage width, got stage_sizes={stage_sizes} '
                       f'and widths={widths}.')
    self.stem_conv = _he_conv(in_features, widths[0], 3, 1, rngs=rngs, conv_impl=conv_impl)
    self.stem_bn = nnx.BatchNorm(widths[0], momentum=bn_momentum, epsilon=1e-5, rngs=rngs)
    blocks = []
    c_in = widths[0]
    for stage, (num_blocks, c_out) in enumerate(zip(stage_sizes, widths)):
      for b in range(num_blocks):
        stride = 2 if stage > 0 and b == 0 else 1
        blocks.append(BasicBlock(c_in, c_out, stride, bn_momentum=bn_momentum, conv_impl=conv_impl, rngs=rngs))
        c_in = c_out
    self.blocks = nnx.List(blocks)
    self.head = torch_linear(c_in, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Applies the network.

    Args:
      x: ``[B, H, W, C]`` float images (NHWC).
      train: batch norm normalizes with the batch's statistics and updates its running averages (a side effect on
        the model's ``BatchStat`` variables); otherwise it uses the running averages and changes nothing.
      rngs: unused (no dropout); kept so every model has the same call signature.

    Returns:
      ``[B, num_classes]`` logits.
    """
    del rngs  # unused: no stochastic layers
    x = jax.nn.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x)

"""The FLoRAL vision input pipeline inside the model: uint8 → float, training augmentation, rotation, normalization.

Keeping the images as ``uint8`` on the device and converting them per batch saves 4x memory (full CIFAR-10 is 150 MB
instead of 600 MB), and makes the public code's CIFAR augmentation (``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip``) a jittable per-batch step that draws its randomness from the call-time ``rngs`` the
algorithms pass in training (``fedjax_adapters.algorithms.model_based.call_rngs``).

Rotation tasks carry the cluster's quarter turns next to each image, ``x = {'image': [B, H, W, C] uint8, 'turns':
[B] int32}``, and turn the image *after* augmenting it: the public code rotates after ``ToTensor``, i.e. after the
crop and flip. The order matters: a horizontal flip of a 90°-turned image is a 270°-turned flipped image, so flipping
after the turn would blend clusters 1 and 3.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_adapters.algorithms.model_based import AUGMENT_STREAM


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """Per-example random crop of zero-padded images (torchvision ``RandomCrop(size, padding)``, fill 0).

  Args:
    key: PRNG key.
    images: ``[B, H, W, C]`` floats in [0, 1] (zero padding = black, as torchvision pads the PIL image).
    padding: pixels added on every side before cropping back to ``H x W``.

  Returns:
    ``[B, H, W, C]``: each image shifted by an offset uniform in ``[-padding, padding]^2``.
  """
  if padding <= 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Flips each image left-right with probability 1/2 (torchvision ``RandomHorizontalFlip``). ``[B, H, W, C]``."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def rotate_quarter_turns(images: jax.Array, turns: jax.Array) -> jax.Array:
  """Turns image ``i`` counter-clockwise by ``turns[i]`` x 90° (``np.rot90`` on H, W, as ``data.partition.rotate``).

  Args:
    images: ``[B, H, W, C]`` with ``H == W``.
    turns: ``[B]`` integers (taken mod 4).

  Returns:
    ``[B, H, W, C]``.
  """
  if images.shape[1] != images.shape[2]:
    raise ValueError(f'quarter turns need square images; got shape {images.shape}.')
  turns = jnp.asarray(turns) % 4
  out = images
  for k in (1, 2, 3):
    out = jnp.where((turns == k)[:, None, None, None], jnp.rot90(images, k, axes=(1, 2)), out)
  return out


class VisionInput(nnx.Module):
  """Wraps a vision model: ``uint8`` images in, the FLoRAL preprocessing applied, the model's logits out.

  The wrapped model sits in ``self.net`` (adaptor paths become ``net.…``); the wrapper holds no parameters.

  Example:
    >>> model = VisionInput(MLP(rngs=nnx.Rngs(0)))
    >>> model(jnp.zeros((2, 28, 28, 1), jnp.uint8)).shape
    (2, 10)
  """

  def __init__(self, net: nnx.Module, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               crop_padding: int = 0, flip: bool = False):
    """Builds the wrapper.

    Args:
      net: the model, called as ``net(x, train=..., rngs=...)`` on float NHWC images.
      mean: per-channel means to subtract after scaling to [0, 1] (``None``: no normalization, as MNIST).
      std: per-channel standard deviations.
      crop_padding: training random-crop padding (0: no crop).
      flip: training random horizontal flip.
    """
    if (mean is None) != (std is None):
      raise ValueError('pass both mean and std for normalization, or neither.')
    if crop_padding < 0:
      raise ValueError(f'crop_padding must be >= 0; got {crop_padding}.')
    self.net = net
    self.mean = tuple(float(m) for m in mean) if mean is not None else None
    self.std = tuple(float(s) for s in std) if std is not None else None
    self.crop_padding = int(crop_padding)
    self.flip = bool(flip)

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Preprocesses and applies the model.

    Args:
      x: ``[B, H, W, C]`` images (``uint8`` 0..255, or floats in [0, 1]), or ``{'image': ..., 'turns': [B]}`` for
        rotation tasks.
      train: augment (if configured) and run the model in training mode.
      rngs: call-time randomness; its ``augment`` stream (or ``default``) drives the augmentation, and it is passed
        on to the model (dropout). Required when training with augmentation.

    Returns:
      The model's output.
    """
    turns = None
    if isinstance(x, dict):
      images, turns = x['image'], x['turns']
    else:
      images = x
    h = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      h = h / 255.0
    if train and (self.crop_padding or self.flip):
      if rngs is None:
        raise ValueError('VisionInput augments in training and needs call-time rngs; the algorithms in '
                         'fedjax_adapters.algorithms pass them to models whose __call__ takes `rngs`.')
      key_crop, key_flip = jax.random.split(rngs[AUGMENT_STREAM]())
      h = random_crop(key_crop, h, self.crop_padding)
      if self.flip:
        h = random_flip(key_flip, h)
    if turns is not None:
      h = rotate_quarter_turns(h, turns)
    if self.mean is not None:
      h = (h - jnp.asarray(self.mean, h.dtype)) / jnp.asarray(self.std, h.dtype)
    return self.net(h, train=train, rngs=rngs)

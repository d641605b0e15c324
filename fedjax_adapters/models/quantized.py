"""Memory levers for a frozen base under trainable adaptors: a lower-precision base and an int8-quantized base.

``cast_frozen(model, jnp.bfloat16)`` stores every base parameter in bfloat16 while the adaptor factors (and so
their optimizer state) stay float32: the base's matmuls promote the bf16 kernel to the layer's computation dtype.

``quantize_linears(model)`` replaces every ``nnx.Linear`` of the base (also those inside LoRA wrappers) with a
:class:`QuantizedLinear` holding int8 weights and one float32 scale per output channel (QLoRA-style: the kernel is
dequantized per layer inside the matmul, so the full-precision kernel only exists transiently). The int8 weights
are :class:`QuantizedWeight` variables, not ``nnx.Param``, so no optimizer or gradient ever sees them.

``quantize_linears(model, bits=4)`` uses :class:`BlockQuantizedLinear` instead: 4-bit values packed two per byte,
with a scale and an offset per block of ``block`` input rows and output column (asymmetric, like llama.cpp's Q4_1;
QLoRA's NF4 code book is not used). The same class holds GGUF's Q8_0 / Q4_0 / Q4_1 tensors as the file stores them
(``load_gguf(..., keep_quantized=True)``), so a quantized GGUF file is never expanded to float32.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_adapters.nn.adapt import register_linear
from fedjax_adapters.nn import layers as L

_ADAPTOR_VARS = (L.GlobalAdapter, L.LocalAdapter, L.RouterLogits)


class QuantizedWeight(nnx.Variable):
  """Frozen quantized weights (int8 values or their float32 scales); never a trainable ``nnx.Param``."""


def quantize_int8(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-output-channel int8 quantization of a kernel.

  Args:
    kernel: [d_in, d_out] float weights.

  Returns:
    (q [d_in, d_out] int8 in [-127, 127], scale [d_out] float32) with ``kernel ~= q * scale``.
  """
  if kernel.ndim != 2:
    raise ValueError(f'quantize_int8 expects a [d_in, d_out] kernel, got shape {kernel.shape}.')
  k = kernel.astype(jnp.float32)
  amax = jnp.max(jnp.abs(k), axis=0)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(k / scale), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """``q * scale`` as ``dtype``: q [d_in, d_out] int8, scale [d_out] -> [d_in, d_out]."""
  return (q.astype(jnp.float32) * scale).astype(dtype)


def quantized_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, dtype: Any = None) -> jax.Array:
  """``x @ (q * scale)`` computed as ``(x @ q) * scale`` (the scale is per output column, so it factors out).

  Args:
    x: [..., d_in] activations.
    q: [d_in, d_out] int8 weights.
    scale: [d_out] float32 scales.
    dtype: computation dtype; defaults to x's dtype (at least float32 for the accumulation).

  Returns:
    [..., d_out] in ``dtype``.
  """
  dtype = x.dtype if dtype is None else dtype
  acc = jnp.promote_types(dtype, jnp.float32)
  y = jnp.matmul(x.astype(dtype), q.astype(dtype), preferred_element_type=acc)
  return (y * scale.astype(acc)).astype(dtype)


class QuantizedLinear(nnx.Module):
  """An ``nnx.Linear`` with int8 per-channel kernel: ``y = (x @ q) * scale + bias``.

  Keeps the attributes adaptor wrappers read (``in_features``, ``out_features``, ``use_bias``, ``param_dtype``).
  """

  def __init__(self, base: nnx.Linear):
    q, scale = quantize_int8(base.kernel.get_value())
    self.q = QuantizedWeight(q)
    self.scale = QuantizedWeight(scale)
    self.bias = base.bias
    self.in_features, self.out_features = base.in_features, base.out_features
    self.use_bias, self.dtype, self.param_dtype = base.use_bias, base.dtype, base.param_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., d_in] -> [..., d_out]."""
    dtype = self.dtype or x.dtype
    y = quantized_matmul(x, self.q.get_value(), self.scale.get_value(), dtype)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(dtype)
    return y


register_linear(QuantizedLinear, L.AdaptedLinear)  # LoRA wraps a quantized base layer as it wraps nnx.Linear


def pack_nibbles(values: jax.Array) -> jax.Array:
  """[d_in, d_out] integers in [0, 15] -> [d_in / 2, d_out] uint8: row i in the low nibble, row i + d_in/2 high."""
  half = values.shape[0] // 2
  if values.shape[0] != 2 * half:
    raise ValueError(f'4-bit packing needs an even number of input rows; got shape {values.shape}.')
  v = values.astype(jnp.uint8)
  return v[:half] | (v[half:] << 4)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """Inverse of :func:`pack_nibbles`: [d_in / 2, d_out] uint8 -> [d_in, d_out] uint8 in [0, 15]."""
  return jnp.concatenate([packed & 15, packed >> 4], axis=0)


def quantize_blockwise(kernel: jax.Array, *, bits: int = 4, block: int = 64) -> tuple[jax.Array, ...]:
  """Asymmetric block-wise quantization: per block of ``block`` input rows and per output column,
  ``kernel ~= u * scale + offset`` with integers ``u`` in ``[0, 2**bits - 1]`` (offset = the block's minimum).

  Args:
    kernel: [d_in, d_out] float weights; ``d_in`` a multiple of ``block``.
    bits: 4 (packed two per byte) or 8.
    block: input rows per block.

  Returns:
    (values [d_in / 2 or d_in, d_out] uint8, scale [d_in / block, d_out] float32, offset [d_in / block, d_out]).
  """
  if kernel.ndim != 2 or kernel.shape[0] % block or bits not in (4, 8):
    raise ValueError(f'quantize_blockwise needs a [d_in, d_out] kernel with d_in a multiple of block={block} and '
                     f'bits in (4, 8); got shape {kernel.shape}, bits={bits}.')
  k = kernel.astype(jnp.float32).reshape(kernel.shape[0] // block, block, kernel.shape[1])
  lo, hi = jnp.min(k, axis=1), jnp.max(k, axis=1)
  scale = jnp.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1.0)
  u = jnp.clip(jnp.round((k - lo[:, None]) / scale[:, None]), 0, 2 ** bits - 1).reshape(kernel.shape)
  return (pack_nibbles(u) if bits == 4 else u.astype(jnp.uint8)), scale, lo


def dequantize_blockwise(values: jax.Array, scale: jax.Array, offset: jax.Array | None, *, bits: int, zero: int = 0,
                         dtype: Any = jnp.float32) -> jax.Array:
  """``(u - zero) * scale + offset`` per block, as ``dtype`` [d_in, d_out]; ``u`` unpacked from ``values``.

  ``zero`` re-centres stored unsigned integers (GGUF's Q4_0 stores ``q + 8``, Q8_0 is kept as ``q + 128``), so a
  GGUF tensor dequantizes to exactly what ``gguf.quants.dequantize`` gives.
  """
  u = unpack_nibbles(values) if bits == 4 else values
  q = u.astype(jnp.int32) - zero
  blocks = scale.shape[0]
  w = q.astype(jnp.float32).reshape(blocks, -1, q.shape[1]) * scale.astype(jnp.float32)[:, None]
  if offset is not None:
    w = w + offset.astype(jnp.float32)[:, None]
  return w.reshape(q.shape).astype(dtype)


class BlockQuantizedLinear(nnx.Module):
  """A frozen linear layer whose kernel is stored block-quantized (:func:`dequantize_blockwise`) and dequantized per
  call inside the layer: ``y = x @ dequantize(values, scale, offset) + bias``.

  Build it from an ``nnx.Linear`` with :meth:`from_linear`, or from stored blocks (the GGUF loader).
  """

  def __init__(self, values, scale, offset, *, bits: int, zero: int = 0, bias=None, dtype=None,
               param_dtype=jnp.float32):
    self.values, self.scale = QuantizedWeight(values), QuantizedWeight(scale)
    self.offset = None if offset is None else QuantizedWeight(offset)
    self.bits, self.zero, self.bias = bits, zero, bias
    self.in_features = values.shape[0] * (2 if bits == 4 else 1)
    self.out_features = values.shape[1]
    self.use_bias, self.dtype, self.param_dtype = bias is not None, dtype, param_dtype

  @classmethod
  def from_linear(cls, base: nnx.Linear, *, bits: int = 4, block: int = 64) -> 'BlockQuantizedLinear':
    values, scale, offset = quantize_blockwise(base.kernel.get_value(), bits=bits, block=block)
    return cls(values, scale, offset, bits=bits, bias=base.bias, dtype=base.dtype, param_dtype=base.param_dtype)

  def kernel_value(self, dtype: Any = jnp.float32) -> jax.Array:
    """The dequantized [d_in, d_out] kernel."""
    offset = None if self.offset is None else self.offset.get_value()
    return dequantize_blockwise(self.values.get_value(), self.scale.get_value(), offset, bits=self.bits,
                                zero=self.zero, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., d_in] -> [..., d_out]."""
    dtype = self.dtype or x.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    y = jnp.matmul(x.astype(dtype), self.kernel_value(dtype), preferred_element_type=acc).astype(dtype)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(dtype)
    return y


register_linear(BlockQuantizedLinear, L.AdaptedLinear)


def quantize_linears(model: nnx.Module, *, skip: tuple[str, ...] = ('lm_head',), bits: int = 8,
                     block: int = 64) -> nnx.Module:
  """Replaces every ``nnx.Linear`` in ``model`` (LoRA wrappers' bases included) by a quantized layer, in place.

  Works before or after :func:`fedjax_adapters.nn.adapt` (adapt wraps a quantized layer with LoRA too).

  Args:
    model: an NNX model, adapted or not.
    skip: attribute names left in full precision (default: the output head, as QLoRA keeps it).
    bits: 8 for :class:`QuantizedLinear` (int8 per output channel), 4 for :class:`BlockQuantizedLinear`.
    block: input rows per block for 4 bits (a layer whose input width it does not divide uses the greatest common
      divisor of the two).

  Returns:
    The same model object.
  """
  targets = [(p, n) for p, n in nnx.iter_graph(model)
             if p and isinstance(n, nnx.Linear) and str(p[-1]) not in skip]
  if not targets:
    raise ValueError('quantize_linears found no nnx.Linear layer to quantize.')
  if bits not in (4, 8):
    raise ValueError(f'quantize_linears: bits must be 4 or 8; got {bits!r}.')
  def make(layer):
    if bits == 8:
      return QuantizedLinear(layer)
    return BlockQuantizedLinear.from_linear(layer, bits=4, block=math.gcd(block, layer.in_features))

  for path, layer in targets:
    parent = model
    for k in path[:-1]:
      parent = parent[k] if isinstance(k, int) else getattr(parent, k)
    if isinstance(path[-1], int):
      parent[path[-1]] = make(layer)
    else:
      setattr(parent, path[-1], make(layer))
  return model


def cast_frozen(model: nnx.Module, dtype: Any, *, compute: bool = False) -> nnx.Module:
  """Casts every base ``nnx.Param`` of ``model`` to ``dtype`` in place; adaptor variables keep their dtype.

  Args:
    model: an NNX model, before or after :func:`fedjax_adapters.nn.adapt` (adaptors added later take the base
      layers' ``param_dtype``, which stays as it was: float32).
    dtype: storage dtype of the frozen base (e.g. ``jnp.bfloat16``).
    compute: also run the base layers in ``dtype`` (their ``dtype`` attribute): no full-precision copy of the
      weights is made for the matmuls, and activations shrink too. Without it a float32 layer promotes the stored
      kernel to float32, which XLA may materialize for the whole base at once.

  Returns:
    The same model object.
  """
  if compute:
    for _, node in nnx.iter_graph(model):
      if isinstance(node, nnx.Module) and not isinstance(node, L.AdaptedLayer) and getattr(node, 'dtype', None):
        node.dtype = dtype
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and not isinstance(var, _ADAPTOR_VARS):
      value = var.get_value()
      if jnp.issubdtype(value.dtype, jnp.floating):
        var.set_value(value.astype(dtype))
  return model

"""Memory levers for a frozen base under trainable adaptors: a lower-precision base and an int8-quantized base.

``cast_frozen(model, jnp.bfloat16)`` stores every base parameter in bfloat16 while the adaptor factors (and so
their optimizer state) stay float32: the base's matmuls promote the bf16 kernel to the layer's computation dtype.

``quantize_linears(model)`` replaces every ``nnx.Linear`` of the base (also those inside LoRA wrappers) with a
:class:`QuantizedLinear` holding int8 weights and one float32 scale per output channel (QLoRA-style: the kernel is
dequantized per layer inside the matmul, so the full-precision kernel only exists transiently). The int8 weights
are :class:`QuantizedWeight` variables, not ``nnx.Param``, so no optimizer or gradient ever sees them.
"""
from __future__ import annotations

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


def quantize_linears(model: nnx.Module, *, skip: tuple[str, ...] = ('lm_head',)) -> nnx.Module:
  """Replaces every ``nnx.Linear`` in ``model`` (LoRA wrappers' bases included) by :class:`QuantizedLinear`, in place.

  Works before or after :func:`fedjax_adapters.nn.adapt` (adapt wraps a :class:`QuantizedLinear` with LoRA too).

  Args:
    model: an NNX model, adapted or not.
    skip: attribute names left in full precision (default: the output head, as QLoRA keeps it).

  Returns:
    The same model object.
  """
  targets = [(p, n) for p, n in nnx.iter_graph(model)
             if p and isinstance(n, nnx.Linear) and str(p[-1]) not in skip]
  if not targets:
    raise ValueError('quantize_linears found no nnx.Linear layer to quantize.')
  for path, layer in targets:
    parent = model
    for k in path[:-1]:
      parent = parent[k] if isinstance(k, int) else getattr(parent, k)
    if isinstance(path[-1], int):
      parent[path[-1]] = QuantizedLinear(layer)
    else:
      setattr(parent, path[-1], QuantizedLinear(layer))
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

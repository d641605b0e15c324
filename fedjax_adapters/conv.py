"""2-d convolution as shifted slices and one matmul, a drop-in for ``lax.conv_general_dilated`` in ``nnx.Conv``.

Why: XLA:CPU runs convolutions through a generic kernel that is slow for the small images of federated vision
benchmarks, and a conv vmapped over clients (every client its own kernel) becomes a grouped convolution that is
slower still: a vmapped CIFAR CNN round ran at half the speed of the client-by-client loop. Written as
``concat_{i,j}(x[i::, j::]) @ kernel.reshape(kh * kw * C_in, C_out)``, the conv is a matmul, which vmaps into a
batched matmul, and its gradients are matmuls and pads of slices. It costs ``kh * kw`` times the input's memory.

``conv_auto`` picks the matmul form on the CPU and XLA's own convolution on GPU / TPU (where cuDNN-style
kernels are faster and the unfolded input would cost memory); it is what the models of ``fedjax_adapters.models``
and the conv LoRA use. ``conv_matmul`` and ``conv_xla`` force one form.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
CONV_IMPLS = ('auto', 'matmul', 'xla')


def pair(v, default: int = 1) -> tuple[int, int]:
  """A 2-d stride / dilation / padding value as ``(h, w)``: ``None`` -> ``(default, default)``, ``n`` or ``(n,)``
  -> ``(n, n)``."""
  if v is None:
    return (default, default)
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(a) for a in v)
  if len(v) == 1:
    return (v[0], v[0])
  if len(v) != 2:
    raise ValueError(f'expected a 2-d value; got {v!r}.')
  return v  # type: ignore[return-value]


def conv_padding(padding: Any, in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int],
                 dilation: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """Explicit ``((lo_h, hi_h), (lo_w, hi_w))`` padding for a Flax-style padding spec."""
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f"2-d convs here support padding 'SAME', 'VALID' or explicit pairs; got {padding!r}.")
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
    pads = lax.padtype_to_pads(tuple(in_hw), dilated, tuple(strides), padding)
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(padding)
  if len(pads) != 2:
    raise ValueError(f'conv needs 2-d padding; got {padding!r}.')
  return tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in pads)  # type: ignore[return-value]


def _is_nhwc_hwio(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, tuple) and all(isinstance(d, str) for d in dimension_numbers):
    return tuple(dimension_numbers) == ('NHWC', 'HWIO', 'NHWC')
  dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
  return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv2d_matmul(x: Array, kernel: Array, strides: Sequence[int] = (1, 1), padding: Any = 'VALID',
                  dilation: Sequence[int] = (1, 1), precision=None, preferred_element_type=None) -> Array:
  """``lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation)`` for NHWC / HWIO, as a matmul.

  Args:
    x: ``[N, H, W, C_in]``.
    kernel: ``[k_h, k_w, C_in, C_out]``.
    strides, dilation: per spatial axis (int or pair).
    padding: ``'SAME'``, ``'VALID'`` or ``((lo_h, hi_h), (lo_w, hi_w))``.

  Returns:
    ``[N, H_out, W_out, C_out]``.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f'conv2d_matmul takes NHWC inputs and HWIO kernels; got shapes {x.shape} and {kernel.shape}.')
  kh, kw, c_in, c_out = kernel.shape
  if x.shape[-1] != c_in:
    raise ValueError(f'input has {x.shape[-1]} channels but the kernel expects {c_in}.')
  sh, sw = pair(strides)
  dh, dw = pair(dilation)
  pads = conv_padding(padding, x.shape[1:3], (kh, kw), (sh, sw), (dh, dw))
  if any(p != (0, 0) for p in pads):
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  n, h, w, _ = x.shape
  h_out = (h - (kh - 1) * dh - 1) // sh + 1
  w_out = (w - (kw - 1) * dw - 1) // sw + 1
  if h_out < 1 or w_out < 1:
    raise ValueError(f'a {kh}x{kw} kernel (dilation {(dh, dw)}) does not fit the padded {h}x{w} input.')
  cols = [lax.slice(x, (0, i * dh, j * dw, 0), (n, i * dh + (h_out - 1) * sh + 1, j * dw + (w_out - 1) * sw + 1,
                                                c_in), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)  # [N, Ho, Wo, kh*kw*C_in], (i, j, c)
  return jnp.matmul(patches, kernel.reshape(kh * kw * c_in, c_out), precision=precision,
                    preferred_element_type=preferred_element_type)


def conv_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, precision=None, preferred_element_type=None, **unused):
  """``lax.conv_general_dilated``'s signature, computed by :func:`conv2d_matmul` (2-d NHWC / HWIO only)."""
  del unused  # e.g. nnx's out_sharding=None
  if feature_group_count != 1:
    raise ValueError(f'conv_matmul does not support grouped convolutions (feature_group_count='
                     f'{feature_group_count}); use conv_xla.')
  if pair(lhs_dilation) != (1, 1):
    raise ValueError(f'conv_matmul does not support input dilation {lhs_dilation}; use conv_xla.')
  if lhs.ndim != 4 or not _is_nhwc_hwio(dimension_numbers):
    raise ValueError(f'conv_matmul supports 2-d NHWC inputs with HWIO kernels; got input shape {lhs.shape} and '
                     f'dimension_numbers={dimension_numbers}; use conv_xla.')
  return conv2d_matmul(lhs, rhs, window_strides, padding, pair(rhs_dilation), precision, preferred_element_type)


def conv_xla(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count=1, precision=None, preferred_element_type=None, **unused):
  """``lax.conv_general_dilated`` itself (``out_sharding`` and other extras dropped when ``None``)."""
  extra = {k: v for k, v in unused.items() if v is not None}
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, precision=precision,
                                  preferred_element_type=preferred_element_type, **extra)


def conv_auto(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, precision=None, preferred_element_type=None, **unused):
  """:func:`conv_matmul` on the CPU when it applies (2-d, ungrouped, NHWC / HWIO), else :func:`conv_xla`."""
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
          precision, preferred_element_type)
  if (jax.default_backend() == 'cpu' and feature_group_count == 1 and pair(lhs_dilation) == (1, 1)
      and lhs.ndim == 4 and _is_nhwc_hwio(dimension_numbers)):
    return conv_matmul(*args)
  return conv_xla(*args, **unused)


def conv_fn(impl: str):
  """The conv function for ``impl`` in :data:`CONV_IMPLS`."""
  table = {'auto': conv_auto, 'matmul': conv_matmul, 'xla': conv_xla}
  if impl not in table:
    raise ValueError(f'unknown conv implementation {impl!r}; valid: {", ".join(CONV_IMPLS)}.')
  return table[impl]

"""LoRA deltas as pure functions: dense, einsum-shaped (LinearGeneral / Einsum), conv2d, embedding, bias and norm.

Every adaptor group is stored with a leading adaptor axis ``C`` (``C = 1`` for a single LoRA), so the same code
serves a plain LoRA, FLoRAL's mixture of ``C`` adaptors and FedDPA's global/local pair. Layouts follow Flax
(``y = x @ kernel``): a dense LoRA is ``a: [C, d_in, r]``, ``b: [C, r, d_out]`` and adds
``scale * x @ a[c] @ b[c]``, i.e. the dense weight ``kernel + scale * a[c] @ b[c]``.

``weights`` (``[C]``) mixes the adaptors: ``delta = sum_c weights[c] * delta_c(x)``. FLoRAL (arXiv 2410.03497) mixes
in parameter space, ``W + sum_c pi_c B_c A_c``; for a linear layer this is the same sum of per-adaptor outputs.
"""
from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_adapters.conv import conv_auto, conv_padding

Array = jax.Array
Params = dict[str, Array]

INITS = ('uniform_in', 'kaiming', 'normal')


def resolve_rank(rank: int | float | str, d_in: int, d_out: int) -> int:
  """Turns a rank request into an integer rank for a ``d_in -> d_out`` layer.

  Args:
    rank: an integer rank; a float ``0 < rho < 1`` meaning FLoRAL's relative parameter budget
      (``r = max(1, int(rho * d_in * d_out / (d_in + d_out)))``, so ``r * (d_in + d_out) ~= rho * d_in * d_out``);
      or ``'full'`` for ``min(d_in, d_out)``.
    d_in: input dimension of the layer (conv: ``C_in * k_w``).
    d_out: output dimension of the layer (conv: ``C_out * k_h``).

  Returns:
    The integer rank.

  Raises:
    ValueError: if the rank is not positive or larger than ``min(d_in, d_out)``.
  """
  if isinstance(rank, str):
    if rank != 'full':
      raise ValueError(f"rank {rank!r} is not understood: use an int, a float budget in (0, 1), or 'full'.")
    return min(d_in, d_out)
  if isinstance(rank, float) and not float(rank).is_integer():
    if not 0.0 < rank < 1.0:
      raise ValueError(f'a float rank is a parameter budget and must lie in (0, 1); got {rank}.')
    return max(1, int(rank * d_in * d_out / (d_in + d_out)))
  r = int(rank)
  if r < 1:
    raise ValueError(f'rank must be >= 1; got {rank}.')
  if r > min(d_in, d_out):
    raise ValueError(f'rank {r} is larger than the layer allows (d_in={d_in}, d_out={d_out}, '
                     f'max rank {min(d_in, d_out)}).')
  return r


def _init_a(key: Array, shape: Sequence[int], fan_in: int, init: str, dtype) -> Array:
  if init == 'uniform_in':    # FLoRAL's default: U(+-sqrt(6 / fan_in)).
    bound = math.sqrt(6.0 / fan_in)
  elif init == 'kaiming':     # PEFT's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
  elif init == 'normal':      # embedding LoRA: N(0, 1).
    return jax.random.normal(key, shape, dtype)
  else:
    raise ValueError(f'unknown init {init!r}; choose one of {INITS}.')
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _init_bias(key: Array, shape: Sequence[int], fan_in: int, bias_init: str, dtype) -> Array:
  if bias_init == 'zeros':
    return jnp.zeros(shape, dtype)
  if bias_init == 'uniform':  # FLoRAL's public code leaves PyTorch's default bias init: U(+-1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  raise ValueError(f"unknown bias_init {bias_init!r}; choose 'zeros' or 'uniform'.")


def _mix_weights(weights: Array | None, num: int) -> Array:
  if weights is None:
    return jnp.full((num,), 1.0 / num) if num > 1 else jnp.ones((1,))
  if weights.shape != (num,):
    raise ValueError(f'mixture weights have shape {tuple(weights.shape)} but the layer holds {num} adaptors; '
                     f'expected shape ({num},).')
  return weights


# ----------------------------------------------------------------------------------------------------------------
# Dense
# ----------------------------------------------------------------------------------------------------------------

def init_dense(key: Array, d_in: int, d_out: int, rank: int | float | str, *, num_adaptors: int = 1,
               bias: bool = False, init: str = 'uniform_in', bias_init: str = 'zeros',
               dtype=jnp.float32) -> Params:
  """Initializes ``num_adaptors`` dense LoRAs (``b = 0``, so the delta starts at zero unless a bias is drawn).

  Returns:
    ``{'a': [C, d_in, r], 'b': [C, r, d_out]}`` plus ``'bias': [C, d_out]`` when ``bias``.
  """
  r = resolve_rank(rank, d_in, d_out)
  ka, kb = jax.random.split(key)
  p = {'a': _init_a(ka, (num_adaptors, d_in, r), d_in, init, dtype),
       'b': jnp.zeros((num_adaptors, r, d_out), dtype)}
  if bias:
    p['bias'] = _init_bias(kb, (num_adaptors, d_out), r, bias_init, dtype)
  return p


def dense_delta(params: Params, x: Array, weights: Array | None = None, *, scale: float = 1.0) -> Array:
  """``scale * sum_c weights[c] * (x @ a[c] @ b[c] + bias[c])``.

  Args:
    params: ``{'a': [C, d_in, r], 'b': [C, r, d_out], 'bias'?: [C, d_out]}``; ``a``/``b`` may be absent for a
      bias-only adaptor.
    x: ``[..., d_in]``.
    weights: ``[C]`` mixture weights (default: uniform).
    scale: LoRA scaling, ``alpha / r`` in PEFT, 1 in FLoRAL.

  Returns:
    ``[..., d_out]``.
  """
  num = _num_adaptors(params)
  w = _mix_weights(weights, num).astype(x.dtype)
  out = 0.0
  if 'a' in params:
    h = jnp.einsum('...i,cir->...cr', x, params['a'])
    out = jnp.einsum('...cr,c,cro->...o', h, w, params['b'])
  if 'bias' in params:
    out = out + w @ params['bias']
  return scale * out


def dense_dense_weight(params: Params, weights: Array | None = None, *, scale: float = 1.0) -> Array:
  """The dense ``[d_in, d_out]`` weight change ``scale * sum_c w_c a_c @ b_c`` (for merging and reference tests)."""
  w = _mix_weights(weights, _num_adaptors(params))
  return scale * jnp.einsum('c,cir,cro->io', w, params['a'], params['b'])


# ----------------------------------------------------------------------------------------------------------------
# Einsum-shaped layers (nnx.Einsum, nnx.LinearGeneral): a dense LoRA on the kernel seen as a [d_in, d_out] matrix
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EinsumForm:
  """How LoRA sees a layer ``y = einsum('lhs,kernel->out', x, W)``.

  Each kernel axis is either *contracted* (it appears in the input, not in the output) or *free* (in the output, not
  in the input). LoRA treats ``W`` as a ``[d_in, d_out]`` matrix: ``d_in`` flattens the contracted axes in the order
  they appear in the input, ``d_out`` the free axes in the order they appear in the output. The factors therefore
  have the dense shapes ``a: [C, d_in, r]``, ``b: [C, r, d_out]`` (and a bias adaptor ``[C, d_out]``), and the
  kernel change is ``reshape(a[c] @ b[c], in_shape + out_shape)`` with its axes moved to the kernel's order.

  Attributes:
    lhs: the equation's input term (may hold ``'...'``).
    out: the equation's output term.
    contracted: kernel letters contracted with the input, in input order.
    free: kernel letters kept in the output, in output order.
    in_shape: sizes of the ``contracted`` axes; ``d_in = prod(in_shape)``.
    out_shape: sizes of the ``free`` axes; ``d_out = prod(out_shape)``.
  """
  lhs: str
  out: str
  contracted: str
  free: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  @property
  def d_in(self) -> int:
    return math.prod(self.in_shape)

  @property
  def d_out(self) -> int:
    return math.prod(self.out_shape)


def einsum_form(equation: str, kernel_shape: Sequence[int]) -> EinsumForm:
  """Reads ``'lhs,kernel->out'`` (the equation of ``nnx.Einsum``) as an :class:`EinsumForm`.

  Raises:
    ValueError: naming the equation, if it is not ``'input,kernel->output'``, the kernel term holds ``'...'`` or a
      repeated letter or does not match ``kernel_shape``, a kernel axis is in both the input and the output (a
      batched kernel, e.g. one matrix per head: not one low-rank update), a kernel axis is in neither (summed
      away), or no kernel axis is contracted with the input.
  """
  eq = equation.replace(' ', '')
  if eq.count(',') != 1 or eq.count('->') != 1 or eq.index(',') > eq.index('->'):
    raise ValueError(f"einsum {equation!r} is not of the form 'input,kernel->output'.")
  ins, out = eq.split('->')
  lhs, rhs = ins.split(',')
  if '.' in rhs or len(set(rhs)) != len(rhs):
    raise ValueError(f"einsum {equation!r}: the kernel term {rhs!r} must name each axis once, without '...'.")
  if len(rhs) != len(kernel_shape):
    raise ValueError(f'einsum {equation!r}: the kernel term {rhs!r} has {len(rhs)} axes but the kernel has shape '
                     f'{tuple(kernel_shape)}.')
  batched = ''.join(c for c in rhs if c in lhs and c in out)
  summed = ''.join(c for c in rhs if c not in lhs and c not in out)
  if batched:
    raise ValueError(f'einsum {equation!r}: kernel axes {batched!r} appear in both the input and the output (a '
                     'batched kernel); LoRA needs each kernel axis contracted with the input or kept in the output.')
  if summed:
    raise ValueError(f'einsum {equation!r}: kernel axes {summed!r} are summed away; LoRA needs each kernel axis '
                     'contracted with the input or kept in the output.')
  contracted = ''.join(sorted((c for c in rhs if c in lhs), key=lhs.index))
  if not contracted:
    raise ValueError(f'einsum {equation!r}: no kernel axis is contracted with the input, so there is no d_in.')
  free = ''.join(sorted((c for c in rhs if c in out), key=out.index))
  size = dict(zip(rhs, (int(n) for n in kernel_shape)))
  return EinsumForm(lhs, out, contracted, free, tuple(size[c] for c in contracted), tuple(size[c] for c in free))


def linear_general_form(ndim: int, axis: Sequence[int], in_features: Sequence[int],
                        out_features: Sequence[int]) -> EinsumForm:
  """The :class:`EinsumForm` of ``nnx.LinearGeneral`` (without batch axes) on an input of rank ``ndim``.

  LinearGeneral contracts the input axes ``axis`` (taken in increasing order) with the kernel's leading
  ``in_features`` axes and appends ``out_features`` to the remaining input axes. So ``d_in = prod(in_features)``,
  ``d_out = prod(out_features)`` and the kernel change is ``reshape(a @ b, in_features + out_features)``.
  """
  if len(axis) != len(in_features) or any(not -ndim <= a < ndim for a in axis):
    raise ValueError(f'axis {tuple(axis)} does not fit in_features {tuple(in_features)} on a rank-{ndim} input.')
  axes = sorted(a % ndim for a in axis)
  letters = string.ascii_letters
  if ndim + len(out_features) > len(letters) - 2:
    raise ValueError(f'a rank-{ndim} input with {len(out_features)} output axes has too many axes for einsum.')
  x = letters[:ndim]
  o = letters[ndim:ndim + len(out_features)]
  kernel = ''.join(x[a] for a in axes) + o
  out = ''.join(x[i] for i in range(ndim) if i not in axes) + o
  return einsum_form(f'{x},{kernel}->{out}', tuple(in_features) + tuple(out_features))


def einsum_delta(params: Params, x: Array, weights: Array | None = None, *, form: EinsumForm,
                 scale: float = 1.0) -> Array:
  """``scale * sum_c weights[c] * (einsum(x, reshape(a[c] @ b[c])) + bias[c])`` for an einsum-shaped layer.

  Computed low-rank: ``x`` is contracted with ``a`` first (``[..., C, r]``), then with ``b``; the ``d_in x d_out``
  kernel change is never formed.

  Args:
    params: ``{'a': [C, d_in, r], 'b': [C, r, d_out], 'bias'?: [C, d_out]}`` with ``d_in``/``d_out`` as in
      ``form``; ``a``/``b`` may be absent for a bias-only adaptor.
    x: the layer's input, laid out as ``form.lhs``.
    weights: ``[C]`` mixture weights (default uniform).
    form: see :func:`einsum_form` / :func:`linear_general_form`.
    scale: LoRA scaling.

  Returns:
    An array of the layer's output shape (``form.out``); for a bias-only adaptor, one that broadcasts against it
    (the free axes in place, 1 elsewhere).
  """
  num = _num_adaptors(params)
  w = _mix_weights(weights, num).astype(x.dtype)
  used = set(form.lhs + form.out)
  c, r = [ch for ch in string.ascii_letters if ch not in used][:2]
  out = 0.0
  if 'a' in params:
    keep = ''.join(ch for ch in form.out if ch not in form.free)  # output axes that come from the input
    a = params['a'].reshape((num,) + form.in_shape + params['a'].shape[-1:])
    b = params['b'].reshape((num,) + params['b'].shape[1:2] + form.out_shape)
    h = jnp.einsum(f'{form.lhs},{c}{form.contracted}{r}->{keep}{c}{r}', x, a)
    out = jnp.einsum(f'{keep}{c}{r},{c},{c}{r}{form.free}->{form.out}', h, w, b)
  if 'bias' in params:
    out = out + (w @ params['bias']).reshape(_bias_shape(form, x.ndim))
  return scale * out


def _bias_shape(form: EinsumForm, x_ndim: int) -> tuple[int, ...]:
  """Shape that broadcasts a ``[d_out]`` bias against the output: free sizes in place, 1 elsewhere."""
  size = dict(zip(form.free, form.out_shape))
  num_ellipsis = x_ndim - len(form.lhs.replace('...', ''))
  shape = []
  for ch in form.out.replace('...', '.'):
    shape += [1] * num_ellipsis if ch == '.' else [size.get(ch, 1)]
  return tuple(shape)


# ----------------------------------------------------------------------------------------------------------------
# Conv2d: FLoRAL's balanced factorization, a 1 x k_w conv (C_in -> r) then a k_h x 1 conv (r -> C_out)
# ----------------------------------------------------------------------------------------------------------------

def init_conv(key: Array, in_channels: int, out_channels: int, kernel_size: Sequence[int],
              rank: int | float | str, *, num_adaptors: int = 1, bias: bool = False, init: str = 'uniform_in',
              bias_init: str = 'zeros', dtype=jnp.float32) -> Params:
  """Initializes ``num_adaptors`` factorized conv LoRAs.

  Rank rules use ``d_in = C_in * k_w`` and ``d_out = C_out * k_h`` (the two factors' fan-ins).

  Returns:
    ``{'a': [C, 1, k_w, C_in, r], 'b': [C, k_h, 1, r, C_out]}`` (Flax HWIO kernels) plus ``'bias': [C, C_out]``.
  """
  kh, kw = kernel_size
  r = resolve_rank(rank, in_channels * kw, out_channels * kh)
  ka, kb = jax.random.split(key)
  p = {'a': _init_a(ka, (num_adaptors, 1, kw, in_channels, r), in_channels * kw, init, dtype),
       'b': jnp.zeros((num_adaptors, kh, 1, r, out_channels), dtype)}
  if bias:
    p['bias'] = _init_bias(kb, (num_adaptors, out_channels), r * kh, bias_init, dtype)
  return p


def _conv(x, kernel, strides, padding, dilation, conv=None):
  return (conv or conv_auto)(x, kernel, strides, padding, rhs_dilation=dilation,
                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv_delta(params: Params, x: Array, weights: Array | None = None, *, strides: Sequence[int] = (1, 1),
               padding: Any = 'SAME', dilation: Sequence[int] = (1, 1), scale: float = 1.0,
               conv: Callable | None = None) -> Array:
  """``scale * sum_c weights[c] * (conv_{k_h x 1}(conv_{1 x k_w}(x, a[c]), b[c]) + bias[c])``.

  The 1 x k_w factor takes the width stride, padding and dilation; the k_h x 1 factor takes the height ones, so
  the composition has the geometry of the full k_h x k_w conv and equals a conv with kernel
  ``K[i, j] = a[0, j] @ b[i, 0]``.

  Args:
    params: see :func:`init_conv`.
    x: ``[N, H, W, C_in]``.
    weights: ``[C]`` mixture weights (default uniform).
    strides, padding, dilation: those of the adapted conv (Flax conventions).
    scale: LoRA scaling.
    conv: a function with ``lax.conv_general_dilated``'s signature (default :func:`fedjax_adapters.conv.conv_auto`:
      slices and a matmul on the CPU, XLA's conv elsewhere).

  Returns:
    ``[N, H_out, W_out, C_out]``.
  """
  num = _num_adaptors(params)
  w = _mix_weights(weights, num).astype(x.dtype)
  out = 0.0
  if 'a' in params:
    kh, kw = params['b'].shape[1], params['a'].shape[2]
    (ph, pw) = conv_padding(padding, x.shape[1:3], (kh, kw), strides, dilation)
    sh, sw = strides
    dh, dw = dilation

    def one(a, b):
      h = _conv(x, a, (1, sw), ((0, 0), pw), (1, dw), conv)
      return _conv(h, b, (sh, 1), (ph, (0, 0)), (dh, 1), conv)

    # Fold the mixture weight into the first factor: sum_c w_c conv(conv(x, a_c), b_c) without a [C, ...] output.
    outs = [one(params['a'][c] * w[c], params['b'][c]) for c in range(num)]
    out = sum(outs[1:], outs[0])
  if 'bias' in params:
    out = out + w @ params['bias']
  return scale * out


def conv_dense_kernel(params: Params, weights: Array | None = None, *, scale: float = 1.0) -> Array:
  """The full ``[k_h, k_w, C_in, C_out]`` kernel change ``scale * sum_c w_c a_c (x) b_c`` (reference tests)."""
  w = _mix_weights(weights, _num_adaptors(params))
  return scale * jnp.einsum('c,cjir,chro->hjio', w, params['a'][:, 0], params['b'][:, :, 0])


# ----------------------------------------------------------------------------------------------------------------
# Embedding LoRA: a [C, V, r] looked up, then b [C, r, D] (b = 0 at init)
# ----------------------------------------------------------------------------------------------------------------

def init_embed(key: Array, num_embeddings: int, features: int, rank: int | float | str, *, num_adaptors: int = 1,
               dtype=jnp.float32) -> Params:
  """Embedding LoRA (``a ~ N(0, 1)``, ``b = 0``): ``{'a': [C, V, r], 'b': [C, r, D]}``."""
  r = resolve_rank(rank, num_embeddings, features)
  return {'a': jax.random.normal(key, (num_adaptors, num_embeddings, r), dtype),
          'b': jnp.zeros((num_adaptors, r, features), dtype)}


def embed_delta(params: Params, ids: Array, weights: Array | None = None, *, scale: float = 1.0) -> Array:
  """``scale * sum_c weights[c] * a[c][ids] @ b[c]``; ``ids: [...] int`` -> ``[..., D]``."""
  w = _mix_weights(weights, _num_adaptors(params))
  h = jnp.take(params['a'], ids, axis=1)  # [C, ..., r]
  return scale * jnp.einsum('c...r,c,crd->...d', h, w.astype(params['b'].dtype), params['b'])


# ----------------------------------------------------------------------------------------------------------------
# Bias adaptor (a bias-only delta) and norm adaptor (an affine delta under the base norm's statistics)
# ----------------------------------------------------------------------------------------------------------------

def init_bias(key: Array, features: int, *, num_adaptors: int = 1, fan_in: int = 1, bias_init: str = 'zeros',
              dtype=jnp.float32) -> Params:
  """Bias adaptor: ``{'bias': [C, features]}``."""
  return {'bias': _init_bias(key, (num_adaptors, features), fan_in, bias_init, dtype)}


def bias_delta(params: Params, weights: Array | None = None) -> Array:
  """``sum_c weights[c] * bias[c]``: ``[features]``, broadcast against the layer output."""
  return _mix_weights(weights, params['bias'].shape[0]) @ params['bias']


def init_norm(features: int, *, num_adaptors: int = 1, dtype=jnp.float32) -> Params:
  """Norm adaptor ``{'scale': [C, F], 'shift': [C, F]}``, zero at init like FLoRAL's (gamma_c = beta_c = 0)."""
  return {'scale': jnp.zeros((num_adaptors, features), dtype), 'shift': jnp.zeros((num_adaptors, features), dtype)}


def norm_delta(params: Params, x_hat: Array, weights: Array | None = None) -> Array:
  """``x_hat * sum_c w_c scale_c + sum_c w_c shift_c`` on the normalized input ``x_hat: [..., F]``.

  FLoRAL's reparametrized norm adaptor acts as an affine delta under the main layer's statistics; this is that
  delta, applied to the statistics the base norm uses (batch statistics in training, running ones in eval).
  """
  w = _mix_weights(weights, params['scale'].shape[0])
  return x_hat * (w @ params['scale']) + w @ params['shift']


def _num_adaptors(params: Params) -> int:
  for k in ('a', 'bias', 'scale'):
    if k in params:
      return int(params[k].shape[0])
  raise ValueError(f'adaptor params have none of the keys a/bias/scale: {sorted(params)}')

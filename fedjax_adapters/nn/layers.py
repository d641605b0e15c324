"""Flax NNX wrappers that add adaptors to existing layers by calling the pure functions of ``adapters``.

Variable types keep the kinds of parameters apart (``docs/nn.md``):

* ``nnx.Param`` / ``nnx.BatchStat`` of the wrapped base layer: the base model;
* :class:`GlobalAdapter`: adaptors the server aggregates (FLoRAL's C shared adaptors, FedDPA's global LoRA);
* :class:`LocalAdapter`: adaptors that never leave the client (FedDPA's local LoRA, the Local Adaptor baseline);
* :class:`RouterLogits`: a client's C mixture logits (local);
* :class:`AdapterRuntime`: per-call mixing weights set by :meth:`ModelDef.apply`; never trained or stored.

Every adapted layer shares one :class:`AdapterContext`, so a single call can set the mixture weights ``[C]`` and
the per-example global/local weights ``[B]`` of all layers at once.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_adapters.adapters import lora
from fedjax_adapters.conv import conv_auto, conv_matmul, conv_xla, pair
from fedjax_adapters.adapters.dual import example_weight


class GlobalAdapter(nnx.Param):
  """Adaptor weights that the server aggregates across clients."""


class LocalAdapter(nnx.Param):
  """Adaptor weights private to one client."""


class RouterLogits(nnx.Param):
  """FLoRAL router logits ``[C]`` (private to one client)."""


class AdapterRuntime(nnx.Variable):
  """Per-call adaptor weights (mixture and per-example weights); set at apply time, never trained."""


class AdapterContext(nnx.Module):
  """State shared by every adapted layer of one model.

  Attributes:
    num_global: number of global adaptors ``C`` per adapted layer (0: none).
    num_local: number of local adaptors (0 or 1).
    logits: router logits ``[C]`` when the model has a router.
    mix: mixture weights ``[C]`` of the global adaptors for the current call.
    global_weight: scalar or ``[B]`` weight on the (mixed) global delta for the current call.
    local_weight: scalar or ``[B]`` weight on the local delta for the current call.
  """

  def __init__(self, num_global: int, num_local: int, router: bool):
    self.num_global = num_global
    self.num_local = num_local
    self.logits = RouterLogits(jnp.zeros((num_global,))) if router else None
    self.mix = AdapterRuntime(jnp.full((max(num_global, 1),), 1.0 / max(num_global, 1)))
    self.global_weight = AdapterRuntime(jnp.ones(()))
    self.local_weight = AdapterRuntime(jnp.ones(()))


def _params(layer: nnx.Module, prefix: str, names) -> dict:
  out = {}
  for n in names:
    v = getattr(layer, f'{prefix}_{n}', None)
    if v is not None:
      out[n] = v.get_value()
  return out


class AdaptedLayer(nnx.Module):
  """Base of every adapted wrapper: owns the base layer, the shared context and the global/local adaptor variables.

  ``adapt`` recognises an already adapted layer by this type.
  """
  _names: tuple[str, ...] = ()
  supports_dropout: bool = False

  def _set(self, group: str, params: dict):
    kind = GlobalAdapter if group == 'global' else LocalAdapter
    for n in self._names:
      setattr(self, f'{group}_{n}', kind(params[n]) if n in params else None)

  def _delta(self, fn, y, *args, **kwargs):
    ctx = self.ctx
    if ctx.num_global:
      d = fn(_params(self, 'global', self._names), *args, ctx.mix.get_value(), **kwargs)
      y = y + example_weight(ctx.global_weight.get_value(), y) * d
    if ctx.num_local:
      d = fn(_params(self, 'local', self._names), *args, None, **kwargs)
      y = y + example_weight(ctx.local_weight.get_value(), y) * d
    return y


class _FactoredLoRA(AdaptedLayer):
  """Dense-shaped LoRA factors ``a: [C, d_in, r]``, ``b: [C, r, d_out]`` (+ ``bias: [C, d_out]``) and LoRA dropout."""
  _names = ('a', 'b', 'bias')
  supports_dropout = True
  dropout_rate: float = 0.0

  def _init_factors(self, d_in: int, d_out: int, *, rank, bias: bool, init: str, bias_init: str, linear: bool,
                    key: jax.Array, dtype):
    for group, num, k in (('global', self.ctx.num_global, 0), ('local', self.ctx.num_local, 1)):
      p = {}
      if num:
        p = lora.init_dense(jax.random.fold_in(key, k), d_in, d_out, rank, num_adaptors=num, bias=bias, init=init,
                            bias_init=bias_init, dtype=dtype)
        if not linear:  # bias adaptor only
          p = {'bias': p['bias']} if 'bias' in p else {}
      self._set(group, p)

  def _dropout(self, x):
    key = getattr(self.ctx, 'dropout_key', None)
    if not self.dropout_rate or key is None:
      return x
    # Each layer draws its own mask: fold the layer's index (state, so scanned layers stay uniform) into the key.
    key = jax.random.fold_in(key.get_value(), self.dropout_id.get_value())
    keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout_rate), 0.0).astype(x.dtype)


class AdaptedLinear(_FactoredLoRA):
  """``y = base(x) + w_g * sum_c mix_c s B_c A_c x + w_l * s B_L A_L x`` (plus bias adaptors)."""

  def __init__(self, base: nnx.Linear, ctx: AdapterContext, *, rank, scale: float, bias: bool, init: str,
               bias_init: str, linear: bool, key: jax.Array):
    self.base, self.ctx, self.scale = base, ctx, scale
    self._init_factors(base.in_features, base.out_features, rank=rank, bias=bias and base.use_bias, init=init,
                       bias_init=bias_init, linear=linear, key=key, dtype=base.param_dtype)

  def __call__(self, x, **kwargs):
    x_lora = self._dropout(x)
    return self._delta(lambda p, x, w: lora.dense_delta(p, x, w, scale=self.scale) if p else 0.0,
                       self.base(x, **kwargs), x_lora)


class AdaptedLinearGeneral(_FactoredLoRA):
  """``nnx.LinearGeneral`` plus a LoRA on its kernel read as a ``[d_in, d_out]`` matrix.

  ``d_in = prod(in_features)`` (the contracted input axes, in increasing axis order) and
  ``d_out = prod(out_features)``; the kernel becomes ``kernel + s * reshape(A @ B, in_features + out_features)``
  and a bias adaptor ``[C, d_out]`` is added reshaped to ``out_features``. The query / key / value / out
  projections of ``nnx.MultiHeadAttention`` are layers of this kind (query: ``d_out = num_heads * head_dim``; out:
  ``d_in = num_heads * head_dim``).
  """

  def __init__(self, base: nnx.LinearGeneral, ctx: AdapterContext, *, rank, scale: float, bias: bool, init: str,
               bias_init: str, linear: bool, key: jax.Array):
    if base.batch_axis:
      raise ValueError(f'LoRA does not support LinearGeneral with batch_axis={dict(base.batch_axis)} (one kernel '
                       'per batch index).')
    self.base, self.ctx, self.scale = base, ctx, scale
    self._init_factors(math.prod(base.in_features), math.prod(base.out_features), rank=rank,
                       bias=bias and base.use_bias, init=init, bias_init=bias_init, linear=linear, key=key,
                       dtype=base.param_dtype)

  def __call__(self, x, **kwargs):
    b = self.base
    form = lora.linear_general_form(x.ndim, b.axis, b.in_features, b.out_features)
    fn = lambda p, x, w: lora.einsum_delta(p, x, w, form=form, scale=self.scale) if p else 0.0  # noqa: E731
    return self._delta(fn, b(x, **kwargs), self._dropout(x))


class AdaptedEinsum(_FactoredLoRA):
  """``nnx.Einsum`` plus a LoRA on its kernel read as a ``[d_in, d_out]`` matrix (see ``lora.EinsumForm``).

  ``d_in`` flattens the kernel axes contracted with the input (in input order), ``d_out`` the kernel axes kept in
  the output (in output order). Equations with a kernel axis in both input and output (per-head kernels) or in
  neither are refused when the layer is adapted.
  """

  def __init__(self, base: nnx.Einsum, ctx: AdapterContext, *, rank, scale: float, bias: bool, init: str,
               bias_init: str, linear: bool, key: jax.Array):
    form = lora.einsum_form(base.einsum_str, tuple(base.kernel_shape))
    self.base, self.ctx, self.scale = base, ctx, scale
    self._init_factors(form.d_in, form.d_out, rank=rank, bias=bias and base.bias is not None, init=init,
                       bias_init=bias_init, linear=linear, key=key, dtype=base.param_dtype)

  def __call__(self, x, einsum_str: str | None = None, **kwargs):
    b = self.base
    if einsum_str is not None and einsum_str.replace(' ', '') != b.einsum_str:
      raise ValueError(f'this Einsum layer was adapted for {b.einsum_str!r}; it cannot be called with '
                       f'einsum_str={einsum_str!r} (its LoRA factors have that equation\'s shapes).')
    form = lora.einsum_form(b.einsum_str, tuple(b.kernel_shape))
    fn = lambda p, x, w: lora.einsum_delta(p, x, w, form=form, scale=self.scale) if p else 0.0  # noqa: E731
    return self._delta(fn, b(x, **kwargs), self._dropout(x))


class AdaptedConv(AdaptedLayer):
  """A 2-d conv plus FLoRAL's balanced (1 x k_w then k_h x 1) conv LoRA and bias adaptors."""
  _names = ('a', 'b', 'bias')

  def __init__(self, base: nnx.Conv, ctx: AdapterContext, *, rank, scale: float, bias: bool, init: str,
               bias_init: str, linear: bool, key: jax.Array):
    ks = tuple(base.kernel_size)
    if len(ks) != 2:
      raise ValueError(f'conv LoRA supports 2-d convolutions; got kernel_size={ks}.')
    if base.feature_group_count != 1:
      raise ValueError(f'conv LoRA does not support grouped convs (feature_group_count={base.feature_group_count}).')
    if pair(base.input_dilation) != (1, 1):
      raise ValueError(f'conv LoRA does not support input_dilation={base.input_dilation}.')
    self.base, self.ctx, self.scale = base, ctx, scale
    self.strides, self.dilation = pair(base.strides), pair(base.kernel_dilation)
    self.padding = base.padding
    # The LoRA factors convolve like the base layer when it uses one of fedjax_adapters.conv's functions.
    own = base.conv_general_dilated
    self.conv = own if own in (conv_matmul, conv_xla, conv_auto) else conv_auto
    for group, num, k in (('global', ctx.num_global, 0), ('local', ctx.num_local, 1)):
      p = {}
      if num:
        p = lora.init_conv(jax.random.fold_in(key, k), base.in_features, base.out_features, ks, rank,
                           num_adaptors=num, bias=bias and base.use_bias, init=init, bias_init=bias_init,
                           dtype=base.param_dtype)
        if not linear:
          p = {'bias': p['bias']} if 'bias' in p else {}
      self._set(group, p)

  def __call__(self, x, **kwargs):
    fn = lambda p, x, w: (lora.conv_delta(p, x, w, strides=self.strides, padding=self.padding,
                                          dilation=self.dilation, scale=self.scale, conv=self.conv) if p else 0.0)
    return self._delta(fn, self.base(x, **kwargs), x)


class AdaptedEmbed(AdaptedLayer):
  """An embedding plus embedding LoRA (``a[ids] @ b``)."""
  _names = ('a', 'b')

  def __init__(self, base: nnx.Embed, ctx: AdapterContext, *, rank, scale: float, key: jax.Array, **unused):
    del unused
    self.base, self.ctx, self.scale = base, ctx, scale
    for group, num, k in (('global', ctx.num_global, 0), ('local', ctx.num_local, 1)):
      self._set(group, lora.init_embed(jax.random.fold_in(key, k), base.num_embeddings, base.features, rank,
                                       num_adaptors=num, dtype=base.param_dtype) if num else {})

  @property
  def embedding(self):
    return self.base.embedding

  def attend(self, query):
    """The base embedding's ``attend`` (tied output heads are not adapted)."""
    return self.base.attend(query)

  def __call__(self, ids):
    return self._delta(lambda p, ids, w: lora.embed_delta(p, ids, w, scale=self.scale), self.base(ids), ids)


class AdaptedNorm(AdaptedLayer):
  """LayerNorm / RMSNorm / BatchNorm plus an affine norm adaptor under the base layer's statistics."""
  _names = ('scale', 'shift')

  def __init__(self, base: nnx.Module, ctx: AdapterContext, **unused):
    del unused
    self.base, self.ctx = base, ctx
    features = base.num_features
    for group, num in (('global', ctx.num_global), ('local', ctx.num_local)):
      self._set(group, lora.init_norm(features, num_adaptors=num, dtype=base.param_dtype) if num else {})

  def _x_hat(self, x, use_running_average=None, mask=None):
    b = self.base
    eps = b.epsilon
    if isinstance(b, nnx.BatchNorm):
      ura = b.use_running_average if use_running_average is None else use_running_average
      if ura:
        mean, var = b.mean.get_value(), b.var.get_value()
      else:
        axes = tuple(i for i in range(x.ndim) if i != x.ndim - 1)
        mean = jnp.mean(x, axes, where=mask)
        var = jnp.mean(jnp.square(x - mean), axes, where=mask)
      return (x - mean) * jax.lax.rsqrt(var + eps)
    if isinstance(b, nnx.RMSNorm):
      return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps)
    mean = jnp.mean(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), -1, keepdims=True) + eps)

  def __call__(self, x, *args, **kwargs):
    y = self.base(x, *args, **kwargs)
    x_hat = self._x_hat(x, *args, **kwargs)
    return self._delta(lambda p, xh, w: lora.norm_delta(p, xh, w), y, x_hat)

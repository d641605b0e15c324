"""Model surgery and the functional bridge: ``adapt(model, spec)`` and ``split_model`` / ``ModelDef.apply``.

``adapt`` swaps every ``nnx.Linear`` / ``nnx.LinearGeneral`` (incl. the projections of ``nnx.MultiHeadAttention``) /
``nnx.Einsum`` / ``nnx.Conv`` / ``nnx.Embed`` / norm layer whose module path matches a regex for an adapted wrapper
(``fedjax_adapters.nn.layers``). ``split_model`` then cuts the model into plain nested-dict
pytrees by variable type:

* ``'base'``: ``nnx.Param`` of the original layers;
* ``'stats'``: ``nnx.BatchStat`` (running statistics);
* ``'adapters'``: :class:`GlobalAdapter` (aggregated adaptors; leading axis ``C``);
* ``'local'``: :class:`LocalAdapter` (private adaptors; leading axis 1);
* ``'router'``: :class:`RouterLogits` (``[C]``).

Algorithms decide which of these parts are frozen, aggregated or kept per client. ``ModelDef.apply(parts, x, ...)``
merges them back for one pure forward pass, so a client update is a plain function of pytrees and vmaps over
clients with the frozen parts broadcast.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_adapters.adapters.targeting import match_targets, path_str
from fedjax_adapters.nn import layers as L

PARTS = ('base', 'stats', 'adapters', 'local', 'router')
_FILTERS = (L.RouterLogits, L.LocalAdapter, L.GlobalAdapter, nnx.BatchStat, nnx.Param)
_ORDER = ('router', 'local', 'adapters', 'stats', 'base')  # first matching filter wins: adaptors before Param


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """What to adapt and how. The defaults are plain LoRA as PEFT configures it: rank 8, alpha 16 (scale alpha / r),
  A kaiming-uniform and B zero (so the adapted model starts equal to the base), no bias adaptors.
  :meth:`floral` is FLoRAL's preset.

  Attributes:
    target: regex matched in full against module paths such as ``'layers.0'`` or
      ``'model.layers.3.self_attn.q_proj'`` (PEFT's ``target_modules``). A pattern that matches no adaptable layer
      raises.
    rank: int rank, float budget ``rho`` in (0, 1) (FLoRAL) or ``'full'``; resolved per layer.
    alpha: LoRA scaling numerator: scale ``alpha / r`` as in PEFT; ``None`` for FLoRAL's unscaled adaptors.
    num_global: global adaptors per layer (FLoRAL: C; FedDPA: 1; 0: none).
    num_local: local adaptors per layer (0 or 1).
    router: give the model C router logits (FLoRAL).
    linear: LoRA on ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` (so the query/key/value/out
    projections of ``nnx.MultiHeadAttention``); conv: LoRA on ``nnx.Conv``; bias: bias adaptors where the base has
    a bias;
    embed: embedding LoRA on ``nnx.Embed``; norm: norm adaptors on LayerNorm / RMSNorm / BatchNorm.
    init: ``'kaiming'`` (PEFT) or ``'uniform_in'`` (FLoRAL) for the A factor; B always starts at zero.
    bias_init: ``'zeros'`` or ``'uniform'`` (FLoRAL public code: PyTorch's default bias init, nonzero).
    dropout: LoRA dropout on the adaptor input of linear layers (PEFT's ``lora_dropout``; FedDPA: 0.05), active
      only when :meth:`ModelDef.apply` gets a ``dropout_key``.
  """
  target: str = '.*'
  rank: int | float | str = 8
  alpha: float | None = 16.0
  num_global: int = 1
  num_local: int = 0
  router: bool = False
  linear: bool = True
  conv: bool = True
  bias: bool = False
  embed: bool = False
  norm: bool = False
  init: str = 'kaiming'
  bias_init: str = 'zeros'
  dropout: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'LoRA dropout must lie in [0, 1); got {self.dropout}.')
    if self.num_global < 0 or self.num_local not in (0, 1):
      raise ValueError(f'num_global must be >= 0 and num_local 0 or 1; got {self.num_global}, {self.num_local}.')
    if self.num_global == 0 and self.num_local == 0:
      raise ValueError('AdapterSpec with num_global=0 and num_local=0 adds no adaptor.')
    if self.router and self.num_global < 1:
      raise ValueError('a router needs num_global >= 1 adaptors to mix.')
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f'alpha must be > 0 (or None for unscaled adaptors); got {self.alpha}.')

  @classmethod
  def floral(cls, num_adaptors: int = 1, *, rank: int | float | str = 0.01, num_local: int = 0, target: str = '.*',
             linear: bool = True, conv: bool = True, bias: bool = True, norm: bool = False, embed: bool = False,
             bias_init: str = 'uniform', router: bool = False) -> 'AdapterSpec':
    """FLoRAL's adaptors as its public code builds them: ``num_adaptors`` global adaptors per layer with a rank
    budget ``rho`` (1 % by default), unscaled (``alpha=None``), A uniform in ``+-sqrt(6 / d_in)``, bias adaptors with
    PyTorch's nonzero default bias init. ``num_adaptors=0, num_local=1`` is the Local Adaptor baseline."""
    return cls(target=target, rank=rank, alpha=None, num_global=num_adaptors, num_local=num_local, router=router,
               linear=linear, conv=conv, bias=bias, embed=embed, norm=norm, init='uniform_in', bias_init=bias_init)


_NORMS = (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm)
_LINEAR = ((nnx.Linear, L.AdaptedLinear), (nnx.LinearGeneral, L.AdaptedLinearGeneral), (nnx.Einsum, L.AdaptedEinsum))


def register_linear(base_cls: type, wrapper: type) -> None:
  """Lets :func:`adapt` wrap layers of ``base_cls`` (e.g. a quantized linear with ``nnx.Linear``'s attributes)."""
  global _LINEAR
  if all(b is not base_cls for b, _ in _LINEAR):
    _LINEAR = _LINEAR + ((base_cls, wrapper),)


def _kind(node, spec: AdapterSpec):
  """The wrapper class ``spec`` would put around ``node``, or None."""
  for base_cls, wrapper in _LINEAR:
    if isinstance(node, base_cls) and (spec.linear or spec.bias):
      return wrapper
  if isinstance(node, nnx.Conv) and (spec.conv or spec.bias):
    return L.AdaptedConv
  if isinstance(node, nnx.Embed) and spec.embed:
    return L.AdaptedEmbed
  if isinstance(node, _NORMS) and spec.norm:
    return L.AdaptedNorm
  return None


def _layers(model: nnx.Module, spec: AdapterSpec) -> dict[str, tuple]:
  """``{path: (path tuple, node, adapted)}`` for every layer ``spec`` could adapt or that is already adapted.

  An adapted wrapper is listed at its own path (the path its base layer had) and its insides are skipped.
  """
  graph = [(p, n) for p, n in nnx.iter_graph(model) if p]
  adapted = [p for p, n in graph if isinstance(n, L.AdaptedLayer)]
  out = {}
  for p, n in graph:
    if any(p[:len(q)] == q and p != q for q in adapted):
      continue
    is_adapted = isinstance(n, L.AdaptedLayer)
    if _kind(n.base if is_adapted else n, spec) is not None:
      out[path_str(p)] = (p, n, is_adapted)
  return out  # in nnx.iter_graph's order: adapt() numbers layers (init keys, dropout ids) by it


def adaptable_paths(model: nnx.Module, spec: AdapterSpec | None = None) -> list[str]:
  """Module paths of the layers that ``spec`` could adapt (all supported kinds if ``spec`` is None).

  These are the paths ``AdapterSpec.target`` is matched against. On an adapted model the adapted layers are listed
  too, at the same paths as before :func:`adapt` (so a target written against the original model still reads the
  same); :func:`adapted_paths` says which ones they are.
  """
  spec = spec or AdapterSpec(embed=True, norm=True)
  return list(_layers(model, spec))


def adapted_paths(model: nnx.Module) -> list[str]:
  """Module paths of the layers :func:`adapt` has wrapped (empty for a model that was never adapted)."""
  return [path_str(p) for p, n in nnx.iter_graph(model) if p and isinstance(n, L.AdaptedLayer)]


def adapt(model: nnx.Module, spec: AdapterSpec, *, key: jax.Array) -> nnx.Module:
  """Adds adaptors to the layers of ``model`` that ``spec.target`` matches, in place, and returns the model.

  Args:
    model: any NNX model with ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.MultiHeadAttention`` / ``nnx.Einsum`` /
      ``nnx.Conv`` / ``nnx.Embed`` / norm layers, never adapted before.
    spec: what to adapt.
    key: PRNG key for the adaptor initialization (each layer folds in its index).

  Returns:
    The same model object with the matched layers wrapped.

  Raises:
    ValueError: if the model is already adapted, ``spec.target`` matches no adaptable layer, or a layer cannot take
      the adaptor (a rank that does not fit, an einsum form LoRA cannot read; the message names the layer).
  """
  done = adapted_paths(model)
  if done or isinstance(model, L.AdaptedLayer):
    raise ValueError(f'this model is already adapted (layers {", ".join(done) or "<root>"}); adapt() must be called '
                     'once, on the original model.')
  if _kind(model, spec) is not None:
    raise ValueError(f'adapt() cannot swap the root module itself ({type(model).__name__}); wrap the layer in an '
                     'nnx.Module (or nnx.Sequential) first.')
  found = {name: (p, n) for name, (p, n, _) in _layers(model, spec).items()}
  hits = match_targets(spec.target, found)
  ctx = L.AdapterContext(spec.num_global, spec.num_local, spec.router)
  swaps = []  # build every wrapper before swapping any, so a layer that fails leaves the model untouched
  for i, name in enumerate(hits):
    path, node = found[name]
    cls = _kind(node, spec)
    rank = spec.rank
    scale = 1.0
    try:
      wrapped = cls(node, ctx, rank=rank, scale=1.0, bias=spec.bias, init=spec.init, bias_init=spec.bias_init,
                    linear=(spec.conv if cls is L.AdaptedConv else spec.linear), key=jax.random.fold_in(key, i))
    except ValueError as e:
      raise ValueError(f'cannot adapt layer {name!r}: {e}') from None
    if spec.alpha is not None:
      r = _rank_of(wrapped)
      scale = spec.alpha / r if r else 1.0
    wrapped.scale = scale
    if wrapped.supports_dropout:
      wrapped.dropout_rate = spec.dropout
      wrapped.dropout_id = L.AdapterRuntime(jnp.asarray(i, jnp.uint32))
    swaps.append((path, wrapped))
  for path, wrapped in swaps:
    parent = model
    for p in path[:-1]:
      parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
      parent[path[-1]] = wrapped
    else:
      setattr(parent, path[-1], wrapped)
  return model


def _rank_of(layer) -> int:
  for group in ('global', 'local'):
    b = getattr(layer, f'{group}_b', None)
    if b is not None:
      v = b.get_value()
      return int(v.shape[-2] if v.ndim == 3 else v.shape[3])
  return 0


def find_context(model: nnx.Module) -> L.AdapterContext | None:
  for _, node in nnx.iter_graph(model):
    if isinstance(node, L.AdapterContext):
      return node
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
  """The static half of a split model: graph definition plus templates to merge pure-dict parts into.

  Instances are hashable by identity, so they can be closed over by jitted functions.
  """
  graphdef: Any
  templates: tuple  # nnx.State per entry of _ORDER, then the rest
  num_global: int
  num_local: int

  def merge(self, parts: Mapping[str, Any]) -> nnx.Module:
    """Rebuilds the NNX model from pure-dict ``parts`` (missing parts come from the templates)."""
    states = []
    for name, tmpl in zip(_ORDER, self.templates[:-1]):
      st = jax.tree.map(lambda x: x, tmpl)  # fresh copy: never write tracers into the template
      if name in parts and parts[name] is not None:
        nnx.replace_by_pure_dict(st, parts[name])
      states.append(st)
    states.append(jax.tree.map(lambda x: x, self.templates[-1]))
    return nnx.merge(self.graphdef, *states)

  def bind(self, parts: Mapping[str, Any], *, mix=None, global_weight=1.0, local_weight=1.0,
           dropout_key=None) -> nnx.Module:
    """Merges ``parts`` and sets the adaptor weights of this call; returns the live NNX model.

    Use it inside a traced function to run any function of the model (e.g. a decoding loop) with per-example
    adaptor weights. Arguments as in :meth:`apply`.
    """
    model = self.merge(parts)
    ctx = find_context(model)
    if ctx is not None:
      if mix is not None:
        mix = jnp.asarray(mix)
        if mix.shape != (max(ctx.num_global, 1),):
          raise ValueError(f'mixture weights have shape {tuple(mix.shape)} but the model holds '
                           f'{ctx.num_global} global adaptors per layer.')
        ctx.mix.set_value(mix)
      ctx.global_weight.set_value(jnp.asarray(global_weight))
      ctx.local_weight.set_value(jnp.asarray(local_weight))
      if dropout_key is not None:
        ctx.dropout_key = L.AdapterRuntime(dropout_key)
    return model

  def apply(self, parts: Mapping[str, Any], *args, mix=None, global_weight=1.0, local_weight=1.0,
            dropout_key=None, method: str = '__call__', **kwargs):
    """Pure forward pass.

    Args:
      parts: pure-dict parts (see module docstring); at least those the model needs to differ from its init.
      *args: positional arguments of the model call (e.g. ``x: [B, ...]``).
      mix: ``[C]`` mixture weights of the global adaptors (default uniform).
      global_weight: scalar or ``[B]`` weight on the global delta (default 1).
      local_weight: scalar or ``[B]`` weight on the local delta (default 1).
      dropout_key: PRNG key for LoRA dropout (``AdapterSpec.dropout``); ``None`` disables dropout (evaluation).
      method: model method to call.
      **kwargs: keyword arguments of the model call (e.g. ``train=True``).

    Returns:
      ``(output, new_stats)`` where ``new_stats`` is the pure dict of updated ``BatchStat`` (``{}`` if none).
    """
    model = self.bind(parts, mix=mix, global_weight=global_weight, local_weight=local_weight,
                      dropout_key=dropout_key)
    out = getattr(model, method)(*args, **kwargs)
    stats = nnx.state(model, nnx.BatchStat).to_pure_dict()
    return out, stats


def split_model(model: nnx.Module) -> tuple[ModelDef, dict[str, Any]]:
  """Splits an (adapted) NNX model into a :class:`ModelDef` and pure-dict parts keyed by ``PARTS``."""
  graphdef, *states = nnx.split(model, *_FILTERS, ...)
  ctx = find_context(model)
  parts = {name: st.to_pure_dict() for name, st in zip(_ORDER, states[:-1])}
  # Copy the Variables: nnx.split's states alias the live model's, so later changes to the model (an eager
  # BatchNorm update, nnx.update) would otherwise leak into the templates.
  templates = tuple(jax.tree.map(lambda x: x, st) for st in states)
  mdef = ModelDef(graphdef, templates, ctx.num_global if ctx else 0, ctx.num_local if ctx else 0)
  return mdef, parts


_BUILDERS: dict = {}


def build_and_split(make: Callable[[jax.Array], nnx.Module], key: jax.Array) -> tuple[ModelDef, dict[str, Any]]:
  """``split_model(make(key))`` with the model built inside one ``jax.jit``.

  Building an NNX model eagerly compiles one random-number kernel per parameter shape (seconds each on a CPU); one
  jitted build compiles once and is cached per ``make`` function, so every later ``init`` is fast.

  Args:
    make: ``key -> nnx.Module`` (e.g. construct and :func:`adapt`); must build the same structure for every key.
    key: PRNG key.
  """
  abstract = nnx.eval_shape(lambda: make(key))
  graphdef, *_ = nnx.split(abstract, *_FILTERS, ...)
  ctx = find_context(abstract)
  if make not in _BUILDERS:
    _BUILDERS[make] = jax.jit(lambda k: tuple(nnx.split(make(k), *_FILTERS, ...)[1:]))
  states = _BUILDERS[make](key)
  parts = {name: st.to_pure_dict() for name, st in zip(_ORDER, states[:-1])}
  mdef = ModelDef(graphdef, tuple(states), ctx.num_global if ctx else 0, ctx.num_local if ctx else 0)
  return mdef, parts

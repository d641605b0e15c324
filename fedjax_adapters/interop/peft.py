"""PEFT LoRA folders in and out of the library's adaptor pytrees, and merged PyTorch state dicts.

Everything here works on the pure-dict ``parts`` of :func:`fedjax_adapters.nn.split_model` (``'base'``,
``'adapters'`` with leaves ``global_a [C, d_in, r]``, ``global_b [C, r, d_out]``, ``global_bias [C, d_out]``,
``'local'`` with ``local_*`` leaves, ``'stats'``) plus the LoRA ``alpha`` of the :class:`~fedjax_adapters.AdapterSpec`
(``None`` for FLoRAL's unscaled adaptors). A layer's module path (``model.layers.0.self_attn.q_proj``,
``layers.1``) is its key path in the parts, which is also its name in the matching PyTorch model.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with tensors
``base_model.model.<path>.lora_A.weight [r, d_in]`` and ``...lora_B.weight [d_out, r]`` (``lora_B.bias [d_out]``
with ``lora_bias``); PEFT adds ``scaling * B A x`` (+ ``scaling * bias``) with ``scaling = lora_alpha / r``. Ours
adds ``scale * x a b`` with ``a = A^T``, ``b = B^T``, ``scale = alpha / r``. ``C`` adaptors mixed by weights
``w`` are one LoRA of rank ``C r``: ``A = [w_1 A_1; ...; w_C A_C]``, ``B = [B_1 ... B_C]`` (exact).
Embedding LoRAs map to PEFT's ``lora_embedding_A [r, V]`` / ``lora_embedding_B [D, r]``. Conv and norm adaptors
have no PEFT form here; :func:`merged_state_dict` folds every kind into the base weights instead.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_adapters.adapters.mixture import router_probs
from fedjax_adapters.interop import adapter_files

PathLike = str | os.PathLike
ADAPTER_CONFIG = adapter_files.ADAPTER_CONFIG
ADAPTER_WEIGHTS = adapter_files.ADAPTER_WEIGHTS
PEFT_PREFIX = 'base_model.model.'
GROUPS = ('global', 'local')


@dataclasses.dataclass(frozen=True)
class LoraLayer:
  """One LoRA in PEFT's orientation.

  Attributes:
    a: ``[r, d_in]`` (``lora_A.weight``; for an embedding ``lora_embedding_A [r, V]``).
    b: ``[d_out, r]`` (``lora_B.weight``; for an embedding ``lora_embedding_B [D, r]``).
    bias: ``[d_out]`` (``lora_B.bias``) or None.
    scaling: PEFT's ``lora_alpha / r``.
    kind: ``'linear'`` or ``'embed'``.
  """
  a: np.ndarray
  b: np.ndarray
  bias: np.ndarray | None
  scaling: float
  kind: str = 'linear'

  @property
  def rank(self) -> int:
    return int(self.a.shape[0])

  def delta(self) -> np.ndarray:
    """The dense weight change ``scaling * B A``, ``[d_out, d_in]`` (``[D, V]`` for an embedding)."""
    return self.scaling * self.b @ self.a


# ----------------------------------------------------------------------------------------------------------------
# Reading adaptor layers out of parts.
# ----------------------------------------------------------------------------------------------------------------


def _select_client(tree, client: int | None):
  return tree if client is None else jax.tree.map(lambda x: x[client], tree)


def adaptor_layers(tree: Mapping, group: str) -> dict[str, dict[str, np.ndarray]]:
  """``{module path: {'a': ..., 'b': ..., 'bias': ...}}`` for every layer of ``tree`` holding ``{group}_*`` leaves.

  Args:
    tree: ``parts['adapters']`` (group ``'global'``) or one client's ``parts['local']`` (group ``'local'``).
    group: ``'global'`` or ``'local'``.
  """
  if group not in GROUPS:
    raise ValueError(f'group must be one of {GROUPS}, got {group!r}.')
  out = {}

  def walk(node, path):
    leaves = {k[len(group) + 1:]: np.asarray(v, np.float32) for k, v in node.items()
              if isinstance(k, str) and k.startswith(group + '_') and not isinstance(v, Mapping)}
    if leaves:
      out['.'.join(path)] = leaves
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, path + (str(k),))

  walk(tree or {}, ())
  return out


def _base_layer(base: Mapping | None, path: str) -> Mapping | None:
  """The base parameters of the layer at ``path`` (inside the adapted wrapper's ``'base'``), or None."""
  node = base
  for part in path.split('.') if path else ():
    if not isinstance(node, Mapping):
      return None
    node = next((v for k, v in node.items() if str(k) == part), None)
  if isinstance(node, Mapping) and isinstance(node.get('base'), Mapping):
    node = node['base']
  return node if isinstance(node, Mapping) else None


def layer_kind(base: Mapping | None, path: str, leaves: Mapping[str, np.ndarray]) -> str:
  """``'linear'``, ``'conv'``, ``'embed'`` or ``'norm'``: from the base layer when given, else from the leaves.

  A kernel of three or more axes with dense-shaped factors (``a: [C, d_in, r]``) is an ``nnx.LinearGeneral`` (or
  ``nnx.Einsum``) kernel read as a ``[d_in, d_out]`` matrix: ``'linear'`` too (see :func:`kernel_split`).
  """
  node = _base_layer(base, path)
  a = leaves.get('a')
  if node is not None:
    if 'embedding' in node:
      return 'embed'
    if 'kernel' in node:
      ndim = np.ndim(node['kernel'])
      return 'conv' if ndim == 4 and (a is None or a.ndim == 5) else 'linear'
    if 'scale' in node:
      return 'norm'
  if 'scale' in leaves or 'shift' in leaves:
    return 'norm'
  return 'conv' if a is not None and a.ndim == 5 else 'linear'


def kernel_split(kernel_shape, *, d_in: int | None = None, d_out: int | None = None, path: str = '') -> int:
  """How many leading axes of a kernel are its input: the ``k`` with ``prod(shape[:k]) == d_in`` (or
  ``prod(shape[k:]) == d_out``).

  An ``nnx.LinearGeneral`` kernel is ``in_features + out_features`` (a query projection ``[F, heads, head_dim]``:
  ``k = 1``; an output projection ``[heads, head_dim, F]``: ``k = 2``); as a matrix it is
  ``reshape(kernel, (d_in, d_out))``, and PyTorch's ``nn.Linear`` holds its transpose ``[d_out, d_in]``.

  Raises:
    ValueError: naming the layer, when no split gives ``d_in`` / ``d_out`` (an ``nnx.Einsum`` whose kernel does not
      list the contracted axes first cannot be read as a matrix this way).
  """
  shape = tuple(int(n) for n in kernel_shape)
  for k in range(1, len(shape)):
    if (d_in is None or int(np.prod(shape[:k])) == d_in) and (d_out is None or int(np.prod(shape[k:])) == d_out):
      return k
  raise ValueError(f'layer {path!r}: its kernel {list(shape)} has no leading input axes of size d_in={d_in} '
                   f'(d_out={d_out}); only kernels laid out as input axes then output axes (nnx.LinearGeneral) can '
                   'be read as a [d_in, d_out] matrix.')


def _mix(mix, num: int) -> np.ndarray:
  if mix is None:
    return np.full((num,), 1.0 / num, np.float32)
  mix = np.asarray(mix, np.float32).reshape(-1)
  if mix.shape != (num,):
    raise ValueError(f'mixture weights have shape {mix.shape}, but the layers hold {num} adaptors.')
  return mix


def _scale(alpha: float | None, rank: int) -> float:
  return 1.0 if alpha is None else float(alpha) / rank


def _one_lora(leaves: Mapping[str, np.ndarray], kind: str, *, alpha, mix, weight: float,
              d_in: int | None) -> LoraLayer:
  """The C adaptors of one linear / embedding layer as a single rank ``C r`` LoRA (mixture folded into A)."""
  num = next(v.shape[0] for v in leaves.values())
  w = weight * _mix(mix, num)
  if 'a' in leaves:
    a, b = leaves['a'], leaves['b']  # [C, d_in, r], [C, r, d_out]
    rank = a.shape[-1]
    big_a = np.concatenate([w[c] * a[c].T for c in range(num)], axis=0)
    big_b = np.concatenate([b[c].T for c in range(num)], axis=1)
  else:  # a bias-only adaptor: a rank-1 LoRA whose factors are zero, carrying the bias
    if d_in is None:
      raise ValueError('a bias-only adaptor needs the base parameters (parts["base"]) to size its LoRA.')
    rank, big_a = 1, np.zeros((1, d_in), np.float32)
    big_b = np.zeros((leaves['bias'].shape[-1], 1), np.float32)
  bias = None if 'bias' not in leaves else np.einsum('c,co->o', w, leaves['bias'])
  # adapt() scales a bias-only layer by 1 (it has no rank); others by alpha / r.
  return LoraLayer(big_a, big_b, bias, _scale(alpha, rank) if 'a' in leaves else 1.0, kind)


def lora_layers(parts: Mapping, *, group: str = 'global', alpha: float | None = None, mix=None,
                weight: float = 1.0, client: int | None = None) -> dict[str, LoraLayer]:
  """Every adapted linear / embedding layer's ``group`` adaptors as one PEFT-oriented LoRA (exact).

  Args:
    parts: the model's pure-dict parts (``'adapters'`` for the global group, ``'local'`` for the local one;
      ``'base'`` to tell layer kinds apart). With ``client``, ``parts['local']`` is the stacked client state.
    group: ``'global'`` or ``'local'``.
    alpha: the spec's LoRA alpha (scale ``alpha / r``), or None for unscaled adaptors (FLoRAL).
    mix: ``[C]`` mixture weights of the global adaptors (default uniform, as the model's forward).
    weight: a further factor on the whole delta (FedDPA's global / local weight).
    client: index of one client in a stacked ``parts['local']`` ``[K, ...]``.

  Returns:
    ``{module path: LoraLayer}``.

  Raises:
    ValueError: for conv or norm adaptors, which PEFT cannot represent here (use :func:`merged_state_dict`).
  """
  part = 'adapters' if group == 'global' else 'local'
  tree = parts.get(part)
  if group == 'local':
    tree = _select_client(tree, client)
  layers = adaptor_layers(tree, group)
  if not layers:
    raise ValueError(f'the parts hold no {group} adaptors (looked in parts[{part!r}]).')
  out = {}
  for path, leaves in layers.items():
    kind = layer_kind(parts.get('base'), path, leaves)
    if kind not in ('linear', 'embed'):
      raise ValueError(f'layer {path!r} has {kind} adaptors, which have no PEFT LoRA form here; export a merged '
                       'state dict (merged_state_dict) instead.')
    base = _base_layer(parts.get('base'), path)
    d_in = None
    if base is not None and 'kernel' in base:
      shape = np.shape(base['kernel'])
      d_out = leaves['b'].shape[-1] if 'b' in leaves else leaves['bias'].shape[-1]
      d_in = int(np.prod(shape[:kernel_split(shape, d_out=d_out, path=path)]))
    out[path] = _one_lora(leaves, kind, alpha=alpha, mix=mix if group == 'global' else None, weight=weight,
                          d_in=d_in)
  return out


def concat_loras(*loras: Mapping[str, LoraLayer]) -> dict[str, LoraLayer]:
  """Sums LoRA sets layer by layer as one LoRA of the summed rank (exact; scalings folded into A when they differ).

  Every set must adapt the same layers.
  """
  paths = set(loras[0])
  if any(set(l) != paths for l in loras[1:]):
    raise ValueError(f'cannot sum LoRA sets over different layers: {[sorted(l) for l in loras]}.')
  out = {}
  for path in loras[0]:
    parts = [l[path] for l in loras]
    scaling = parts[0].scaling if all(p.scaling == parts[0].scaling for p in parts) else 1.0
    a = np.concatenate([p.a * (p.scaling / scaling) for p in parts], axis=0)
    b = np.concatenate([p.b for p in parts], axis=1)
    biases = [p.bias * (p.scaling / scaling) for p in parts if p.bias is not None]
    out[path] = LoraLayer(a, b, sum(biases) if biases else None, scaling, parts[0].kind)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading PEFT folders.
# ----------------------------------------------------------------------------------------------------------------


def _number(x: float) -> float | int:
  return int(x) if float(x).is_integer() else float(x)


def _target_modules(paths: list[str], base: Mapping | None) -> list[str]:
  """Short names (``['q_proj', 'v_proj']``) when they select exactly ``paths`` among the base's layers, else paths."""
  names = {p.rsplit('.', 1)[-1] for p in paths}
  if base is None or any(n.isdigit() for n in names):
    return sorted(paths)
  all_layers = []

  def walk(node, path):
    if isinstance(node, Mapping):
      if any(k in node for k in ('kernel', 'embedding')) or isinstance(node.get('base'), Mapping):
        all_layers.append('.'.join(path))
      for k, v in node.items():
        if isinstance(v, Mapping) and k != 'base':
          walk(v, path + (str(k),))

  walk(base, ())
  selected = {p for p in all_layers if p.rsplit('.', 1)[-1] in names}
  return sorted(names) if selected == set(paths) else sorted(paths)


def peft_config(layers: Mapping[str, LoraLayer], *, base: Mapping | None = None, task_type: str | None = None,
                base_model_name_or_path: str | None = None) -> dict[str, Any]:
  """The ``adapter_config.json`` dict for ``layers``: the commonest rank and alpha, per-layer exceptions as patterns."""
  ranks = {p: l.rank for p, l in layers.items()}
  alphas = {p: l.scaling * l.rank for p, l in layers.items()}
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha = collections.Counter(alphas[p] for p in layers if ranks[p] == r).most_common(1)[0][0]
  # PEFT matches pattern keys as regexes against the end of the module name.
  rank_pattern = {re.escape(p): ranks[p] for p in layers if ranks[p] != r}
  alpha_pattern = {re.escape(p): _number(alphas[p]) for p in layers if alphas[p] != alpha}
  return {
      'peft_type': 'LORA', 'task_type': task_type, 'base_model_name_or_path': base_model_name_or_path,
      'r': int(r), 'lora_alpha': _number(alpha), 'rank_pattern': rank_pattern, 'alpha_pattern': alpha_pattern,
      'target_modules': _target_modules(list(layers), base), 'lora_dropout': 0.0, 'bias': 'none',
      'lora_bias': any(l.bias is not None for l in layers.values()), 'fan_in_fan_out': False, 'use_rslora': False,
      'use_dora': False, 'init_lora_weights': True, 'inference_mode': True, 'modules_to_save': None,
  }


def save_peft_adapter(folder: PathLike, layers: Mapping[str, LoraLayer], *, base: Mapping | None = None,
                      task_type: str | None = None, base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes ``layers`` as a PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads.

  Args:
    folder: output folder (created).
    layers: ``{module path: LoraLayer}`` (from :func:`lora_layers` or :func:`concat_loras`).
    base: ``parts['base']``, to write ``target_modules`` as short names when they are exact.
    task_type: PEFT task type (``'CAUSAL_LM'`` for language models; None for any other torch module).
    base_model_name_or_path: recorded for ``AutoPeftModel`` loading.

  Returns:
    The folder.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  if not layers:
    raise ValueError('no LoRA layers to save.')
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  has_bias = any(l.bias is not None for l in layers.values())
  tensors = {}
  for path, layer in layers.items():
    key = PEFT_PREFIX + path
    if layer.kind == 'embed':
      tensors[f'{key}.lora_embedding_A'], tensors[f'{key}.lora_embedding_B'] = layer.a, layer.b
      continue
    tensors[f'{key}.lora_A.weight'], tensors[f'{key}.lora_B.weight'] = layer.a, layer.b
    if has_bias:  # PEFT's lora_bias is one switch for every layer: absent biases are written as zeros
      tensors[f'{key}.lora_B.bias'] = layer.bias if layer.bias is not None else np.zeros(layer.b.shape[0], np.float32)
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  config = peft_config(layers, base=base, task_type=task_type, base_model_name_or_path=base_model_name_or_path)
  (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
  save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={'format': 'pt'})
  return folder


def _pattern_value(patterns: Mapping[str, Any], path: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module path."""
  for key, value in patterns.items():
    if re.match(rf'(.*\.)?({key})$', path):
      return value
  return default


def load_peft_adapter(folder: PathLike) -> tuple[dict[str, Any], dict[str, LoraLayer]]:
  """Reads a PEFT LoRA folder (safetensors weights) into ``(config, {module path: LoraLayer})``.

  Every file is checked first (:mod:`fedjax_adapters.interop.adapter_files`). Base-layer weights that PEFT saves
  beside an embedding / output-layer LoRA are accepted and left out of the layers (:func:`saved_base_weights`
  returns them).

  Raises:
    FileNotFoundError: if the folder lacks ``adapter_config.json`` or ``adapter_model.safetensors``.
    ValueError: naming the file and the layer or tensor: a PEFT method or LoRA variant that is not a plain LoRA
      (DoRA, ``fan_in_fan_out``), a bad ``adapter_config.json``, a truncated safetensors file, tensors that are not
      LoRA factors, not floating point, not finite, of the wrong rank, or a factor without its partner.
  """
  config = adapter_files.read_adapter_config(folder)
  tensors = adapter_files.read_adapter_tensors(folder)
  if config.get('use_dora'):
    raise ValueError(f'{folder}: use_dora=True (DoRA) is not a plain LoRA and cannot be imported; its layers '
                     f'{sorted(tensors.factors)[:3]} need their magnitude vectors.')
  layers = {}
  for path, t in tensors.factors.items():
    embed = 'lora_embedding_A' in t
    a, b = (t['lora_embedding_A'], t['lora_embedding_B']) if embed else (t['lora_A.weight'], t['lora_B.weight'])
    r = a.shape[0]
    expected = _pattern_value(config.get('rank_pattern') or {}, path, config.get('r', r))
    if int(expected) != r:
      raise ValueError(f'{folder}: layer {path!r} has LoRA factors of rank {r} but adapter_config.json gives it '
                       f'r={expected}.')
    alpha = float(_pattern_value(config.get('alpha_pattern') or {}, path, config.get('lora_alpha', 8)))
    scaling = alpha / np.sqrt(r) if config.get('use_rslora') else alpha / r
    layers[path] = LoraLayer(a, b, t.get('lora_B.bias'), float(scaling), 'embed' if embed else 'linear')
  return config, layers


def saved_base_weights(folder: PathLike) -> dict[str, np.ndarray]:
  """``{module path: weight}`` of the base layers PEFT saved in the folder (``save_embedding_layers``), in PyTorch's
  orientation (an embedding ``[V, D]``, an output layer ``[V, D]``); empty for most folders."""
  return adapter_files.read_adapter_tensors(folder).base


def _set_tree_leaf(tree: dict, path: str, name: str, value: np.ndarray, index: int) -> None:
  node = tree
  for part in path.split('.') if path else ():
    node = next(v for k, v in node.items() if str(k) == part)
  old = jnp.asarray(node[name])
  node[name] = old.at[index].set(jnp.asarray(value, old.dtype))


def _check_import_shapes(folder, path: str, layer: LoraLayer, leaves: Mapping[str, np.ndarray], group: str) -> None:
  """The PEFT factors of ``path`` against the model's ``group`` adaptor there (``a: [C, d_in, r]``, ``b: [C, r,
  d_out]``); raises naming the layer."""
  if 'a' not in leaves or 'b' not in leaves:
    raise ValueError(f'{folder}: layer {path!r} holds a LoRA, but the model\'s {group} adaptor there is '
                     f'{sorted(leaves)} without factors (a bias-only adaptor).')
  (d_in, rank), d_out = leaves['a'].shape[-2:], leaves['b'].shape[-1]
  if layer.rank != rank:
    raise ValueError(f'{path}: the PEFT LoRA has rank {layer.rank}, the model\'s {group} adaptor rank {rank}; '
                     f'build the model with AdapterSpec(rank={layer.rank}).')
  if layer.a.shape[1] != d_in or layer.b.shape[0] != d_out:
    raise ValueError(f'{folder}: layer {path!r} has LoRA factors A {list(layer.a.shape)}, B {list(layer.b.shape)} '
                     f'(d_in {layer.a.shape[1]}, d_out {layer.b.shape[0]}), but the model\'s layer maps d_in={d_in} '
                     f'to d_out={d_out}.')
  if layer.bias is not None and 'bias' not in leaves:
    raise ValueError(f'{path}: the PEFT LoRA has a bias (lora_bias) but the model\'s adaptor has none.')


def _check_saved_base(folder, base: Mapping, saved: Mapping[str, np.ndarray]) -> None:
  """Warns, naming the layer, where a base weight PEFT saved in the folder differs from the model's."""
  for path, weight in saved.items():
    node = _base_layer(base, path)
    if node is None or not ('embedding' in node or 'kernel' in node):
      warnings.warn(f'{folder} holds a base weight for {path!r}, which this model\'s base has no layer for; it was '
                    'not checked.', stacklevel=3)
      continue
    ours = np.asarray(node['embedding'] if 'embedding' in node else np.asarray(node['kernel']).T, np.float32)
    if ours.shape != weight.shape:
      diff = f'shape {list(weight.shape)}, the model\'s {list(ours.shape)}'
    elif not np.array_equal(ours, weight):
      diff = f'max |difference| {float(np.abs(ours - weight).max()):.3g}'
    else:
      continue
    warnings.warn(f'{folder} was saved on a different base: its {path!r} weight differs from the model\'s '
                  f'({diff}); the LoRA is imported, but PEFT would also load that weight.', stacklevel=3)


def import_lora(folder: PathLike, tree: Mapping, *, group: str = 'global', alpha: float | None = None,
                index: int = 0, strict: bool = True, base: Mapping | None = None) -> dict:
  """Sets a model's ``group`` adaptors from a PEFT LoRA folder (e.g. start FedIT from a published LoRA).

  The adaptor at ``index`` of every layer the folder adapts gets ``a = A^T`` and ``b = B^T * s_peft / s_ours``
  (and the bias likewise), so the model's delta equals PEFT's exactly whatever the two scalings are. Every file
  is checked first (see :func:`load_peft_adapter`).

  A LoRA on ``embed_tokens`` / ``lm_head`` saved with PEFT's ``save_embedding_layers='auto'`` also holds those
  layers' base weights. They are accepted; with ``base`` they are compared with the model's and a warning names
  each layer whose weight differs.

  Args:
    folder: the PEFT folder.
    tree: ``parts['adapters']`` (group ``'global'``) or one client's ``parts['local']`` (group ``'local'``).
    group: which adaptor group to set.
    alpha: the spec's LoRA alpha (None: unscaled adaptors).
    index: which of the C adaptors of each layer to set.
    strict: raise if the model has ``group`` adaptors on a layer the folder does not adapt.
    base: ``parts['base']``, to check base weights saved in the folder against the model's.

  Returns:
    A new tree (the input is not modified).

  Raises:
    ValueError: naming the layer, if the folder adapts a layer the tree has no adaptor for, a rank or a factor's
      shape differs from the model's layer, the folder has a bias the model's adaptor lacks, or ``index`` is not
      one of the layer's adaptors; and for every bad file (see :func:`load_peft_adapter`).
  """
  _, peft_layers = load_peft_adapter(folder)
  ours = adaptor_layers(tree, group)
  missing = sorted(set(peft_layers) - set(ours))
  if missing:
    raise ValueError(f'{folder} adapts {missing[:5]}, which hold no {group} adaptor in this model (adapted layers: '
                     f'{sorted(ours)[:5]}...).')
  if strict and set(ours) - set(peft_layers):
    raise ValueError(f'{folder} does not adapt {sorted(set(ours) - set(peft_layers))[:5]}; pass strict=False to '
                     'keep those adaptors as they are.')
  if base is not None:
    _check_saved_base(folder, base, saved_base_weights(folder))
  new = jax.tree.map(lambda x: x, dict(tree))
  for path, layer in peft_layers.items():
    leaves = ours[path]
    _check_import_shapes(folder, path, layer, leaves, group)
    num = leaves['a'].shape[0]
    if not 0 <= index < num:
      raise ValueError(f'index={index} is not an adaptor of layer {path!r}, which holds {num} {group} adaptor(s).')
    factor = layer.scaling / _scale(alpha, leaves['b'].shape[-2])
    _set_tree_leaf(new, path, f'{group}_a', layer.a.T, index)
    _set_tree_leaf(new, path, f'{group}_b', layer.b.T * factor, index)
    if layer.bias is not None:
      _set_tree_leaf(new, path, f'{group}_bias', layer.bias * factor, index)
  return new


# ----------------------------------------------------------------------------------------------------------------
# What users export: FedIT / FedDPA adapters, a FLoRAL client collapsed to one LoRA.
# ----------------------------------------------------------------------------------------------------------------


def default_task_type(base: Mapping | None) -> str | None:
  """``'CAUSAL_LM'`` for a language model (its base has an embedding table), else None (any torch module): what
  ``PeftModel.from_pretrained`` can load for the model."""
  names = [str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(base or {})[0]]
  return 'CAUSAL_LM' if 'embedding' in names else None


def _task_type(task_type: str | None, parts: Mapping) -> str | None:
  return default_task_type(parts.get('base')) if task_type == 'auto' else task_type


def export_global_adapter(folder: PathLike, parts: Mapping, *, alpha: float | None, mix=None,
                          task_type: str | None = 'auto',
                          base_model_name_or_path: str | None = None) -> pathlib.Path:
  """The global adaptors (FedIT's / FedDPA's global LoRA) as a PEFT folder; ``mix`` weighs C > 1 adaptors.

  ``task_type='auto'`` (the default of every export here) is :func:`default_task_type` of ``parts['base']``.
  """
  layers = lora_layers(parts, group='global', alpha=alpha, mix=mix)
  return save_peft_adapter(folder, layers, base=parts.get('base'), task_type=_task_type(task_type, parts),
                           base_model_name_or_path=base_model_name_or_path)


def export_local_adapter(folder: PathLike, parts: Mapping, *, alpha: float | None, client: int | None = None,
                         task_type: str | None = 'auto',
                         base_model_name_or_path: str | None = None) -> pathlib.Path:
  """A client's local LoRA (FedDPA) as a PEFT folder.

  ``parts['local']`` is one client's local adaptors, or, with ``client=k``, the stacked client state ``[K, ...]``
  from which client k is taken.
  """
  layers = lora_layers(parts, group='local', alpha=alpha, client=client)
  return save_peft_adapter(folder, layers, base=parts.get('base'), task_type=_task_type(task_type, parts),
                           base_model_name_or_path=base_model_name_or_path)


def export_mixed_adapter(folder: PathLike, parts: Mapping, *, alpha: float | None, global_weight: float,
                         local_weight: float, client: int | None = None, task_type: str | None = 'auto',
                         base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Global and local LoRA at fixed weights as one LoRA of rank 2r: ``w_g dG + w_l dL`` (exact).

  FedDPA weighs the two per test example; a static file can only hold one weight. For per-prompt weights, export
  both adapters and combine them in PEFT (see docs/interop.md).
  """
  layers = concat_loras(lora_layers(parts, group='global', alpha=alpha, weight=global_weight),
                        lora_layers(parts, group='local', alpha=alpha, weight=local_weight, client=client))
  return save_peft_adapter(folder, layers, base=parts.get('base'), task_type=_task_type(task_type, parts),
                           base_model_name_or_path=base_model_name_or_path)


def floral_mixture(logits, *, temperature: float = 1.0, floor: float | None = 0.01) -> np.ndarray:
  """A FLoRAL client's evaluation-time mixture ``pi = max(softmax(logits / T), floor)`` (no noise), ``[C]``."""
  return np.asarray(router_probs(jnp.asarray(logits), train=False, temperature=temperature, floor=floor))


def export_floral_client(folder: PathLike, parts: Mapping, *, logits=None, mix=None, temperature: float = 1.0,
                         floor: float | None = 0.01, alpha: float | None = None, task_type: str | None = None,
                         base_model_name_or_path: str | None = None) -> pathlib.Path:
  """A FLoRAL client's personalized adaptors as one PEFT LoRA: ``sum_c pi_c B_c A_c`` of rank ``C r`` (exact).

  Bias adaptors become PEFT's LoRA bias (``lora_bias``; PEFT supports it on linear layers). The base of the
  folder is the federated base ``parts['base']``, which the torch model must hold (see :func:`merged_state_dict`
  with no adaptors, or load the base weights yourself). Conv and norm adaptors have no PEFT form: export
  :func:`merged_state_dict` for models that have them.

  Args:
    folder: output folder.
    parts: the global parts (``'base'`` and ``'adapters'`` with C adaptors per layer).
    logits: the client's ``[C]`` router logits (mixture as at evaluation), or
    mix: the ``[C]`` mixture weights themselves.
    temperature, floor: the router's settings (FLoRAL's defaults: 1 and 0.01).
    alpha: LoRA alpha of the adaptors (None for FLoRAL).
    task_type: PEFT task type (None: any torch module).
    base_model_name_or_path: recorded in the config.
  """
  if (logits is None) == (mix is None):
    raise ValueError('pass exactly one of logits (the client router) or mix (its mixture weights).')
  if mix is None:
    mix = floral_mixture(logits, temperature=temperature, floor=floor)
  return export_global_adapter(folder, parts, alpha=alpha, mix=mix, task_type=task_type,
                               base_model_name_or_path=base_model_name_or_path)


# ----------------------------------------------------------------------------------------------------------------
# Merged weights as a PyTorch state dict.
# ----------------------------------------------------------------------------------------------------------------

_TORCH_NAMES = {'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                'var': 'running_var'}


def _fold_layer(node: dict, kind: str, leaves: Mapping[str, np.ndarray], w: np.ndarray, alpha, path: str) -> None:
  """Adds one layer's mixed adaptor delta (weights ``w [C]``) to its base parameters ``node`` in place."""
  scale = _scale(alpha, leaves['b'].shape[-2 if leaves['b'].ndim == 3 else 3]) if 'b' in leaves else 1.0
  if kind in ('linear', 'embed') and 'a' in leaves:
    key = 'kernel' if kind == 'linear' else 'embedding'
    delta = scale * np.einsum('c,cir,cro->io', w, leaves['a'], leaves['b'])
    shape = np.shape(node[key])
    if len(shape) > 2:  # a LinearGeneral kernel: the [d_in, d_out] delta in the kernel's axes
      kernel_split(shape, d_in=delta.shape[0], d_out=delta.shape[1], path=path)
    node[key] = node[key] + delta.reshape(shape)
  elif kind == 'conv' and 'a' in leaves:
    node['kernel'] = node['kernel'] + scale * np.einsum('c,cjir,chro->hjio', w, leaves['a'][:, 0],
                                                        leaves['b'][:, :, 0])
  if 'bias' in leaves:
    node['bias'] = node['bias'] + scale * (w @ leaves['bias']).reshape(np.shape(node['bias']))
  if kind == 'norm':
    node['scale'] = node['scale'] + w @ leaves['scale']
    shift = w @ leaves['shift']
    if 'bias' in node:
      node['bias'] = node['bias'] + shift
    elif np.any(shift != 0):
      raise ValueError(f'{path}: a norm adaptor shift cannot merge into a norm without a bias (e.g. RMSNorm).')


def _adapted_layers(parts: Mapping, client: int | None):
  """``(group, path, leaves)`` of every adapted layer: the global adaptors, then the (selected) local ones."""
  for group, tree in (('global', parts.get('adapters')), ('local', _select_client(parts.get('local'), client))):
    for path, leaves in adaptor_layers(tree, group).items():
      yield group, path, leaves


def merged_params(parts: Mapping, *, alpha: float | None = None, mix=None, global_weight: float = 1.0,
                  local_weight: float = 1.0, client: int | None = None) -> dict:
  """``parts['base']`` with every adaptor folded in: the plain model that computes what the adapted one does.

  Linear (``nnx.Linear``, and ``nnx.LinearGeneral`` kernels such as ``nnx.MultiHeadAttention``'s projections, read
  as ``[d_in, d_out]`` matrices), conv (FLoRAL's balanced factorisation as its full kernel), embedding, bias and
  norm adaptors are merged as ``W + w_g sum_c mix_c s a_c b_c + w_l s a_L b_L``. Norm shifts need a base norm with
  a bias.

  Args:
    parts: pure-dict parts; ``parts['local']`` stacked ``[K, ...]`` when ``client`` is given.
    alpha: LoRA alpha (None: unscaled, FLoRAL).
    mix: ``[C]`` mixture of the global adaptors (FLoRAL: :func:`floral_mixture` of the client's logits).
    global_weight, local_weight: FedDPA's weights on the two groups.
    client: the client of a stacked ``parts['local']``.

  Returns:
    The merged ``base`` tree (numpy float32 leaves, same structure as ``parts['base']``).
  """
  base = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(parts['base']))
  weights = {'global': (global_weight, mix), 'local': (local_weight, None)}
  for group, path, leaves in _adapted_layers(parts, client):
    node = _base_layer(base, path)
    if node is None:
      raise ValueError(f'{path}: no base parameters in parts["base"] to merge the {group} adaptor into.')
    num = next(v.shape[0] for v in leaves.values())
    weight, group_mix = weights[group]
    _fold_layer(node, layer_kind(base, path, leaves), leaves, weight * _mix(group_mix, num), alpha, path)
  return base


def _torch_kernel(node: Mapping, path: str, in_axes: Mapping[str, int]) -> tuple[np.ndarray, bool]:
  """A layer's kernel in PyTorch's layout, and whether it was a LinearGeneral kernel (its bias is flattened)."""
  kernel = np.asarray(node['kernel'], np.float32)
  if kernel.ndim == 2:
    return kernel.T, False
  if kernel.ndim == 4 and path not in in_axes:
    return kernel.transpose(3, 2, 0, 1), False  # conv HWIO -> OIHW
  k = in_axes.get(path)
  if k is None:
    bias = node.get('bias')
    if bias is None or np.shape(bias) != kernel.shape[kernel.ndim - np.ndim(bias):]:
      raise ValueError(f'layer {path!r}: kernel {list(kernel.shape)} is a LinearGeneral kernel whose input axes '
                       'cannot be told from its bias; pass in_axes={' + repr(path) + ': number of input axes}.')
    k = kernel.ndim - np.ndim(bias)
  kernel_split(kernel.shape, d_in=int(np.prod(kernel.shape[:k])), path=path)
  return kernel.reshape(int(np.prod(kernel.shape[:k])), -1).T, True


def torch_state_dict(base: Mapping, stats: Mapping | None = None, *,
                     in_axes: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
  """A base tree (and BatchNorm ``stats``) under PyTorch names: ``layers.0.weight [out, in]``, ``...bias``.

  Linear kernels are transposed, conv kernels go from HWIO to OIHW, and ``scale`` / ``embedding`` become
  ``weight``; the adapted wrapper's ``base`` level is dropped. An ``nnx.LinearGeneral`` kernel (three or more
  axes, e.g. ``nnx.MultiHeadAttention``'s ``query [F, heads, head_dim]``) becomes the ``nn.Linear`` weight
  ``[heads * head_dim, F]`` and its bias ``[heads * head_dim]``: the torch module then projects with ``nn.Linear``
  layers of the same names and splits heads with ``view(..., heads, head_dim)``.

  Args:
    base: the base tree (``parts['base']`` or :func:`merged_params`' result).
    stats: BatchNorm statistics (``parts['stats']``).
    in_axes: ``{layer path: number of leading input axes}`` for LinearGeneral kernels whose bias does not tell
      (no bias), or 4-axis LinearGeneral kernels (which would otherwise read as convolutions).

  Raises:
    ValueError: naming the parameter, for a parameter PyTorch has no name for or a LinearGeneral kernel whose input
      axes are unknown.
  """
  out = {}
  in_axes = dict(in_axes or {})

  def walk(node, path):
    name = '.'.join(path)
    flat_bias = False
    if 'kernel' in node and not isinstance(node['kernel'], Mapping):
      out[f'{name}.weight' if name else 'weight'], flat_bias = _torch_kernel(node, name, in_axes)
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, path if k == 'base' else path + (str(k),))
        continue
      if k not in _TORCH_NAMES:
        raise ValueError(f'{".".join(path + (str(k),))}: no PyTorch name for parameter {k!r}.')
      if k != 'kernel':
        a = np.asarray(v, np.float32)
        out['.'.join(path + (_TORCH_NAMES[k],))] = a.reshape(-1) if (k == 'bias' and flat_bias) else a

  walk(base, ())
  walk(stats or {}, ())
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def merged_state_dict(parts: Mapping, *, alpha: float | None = None, mix=None, global_weight: float = 1.0,
                      local_weight: float = 1.0, client: int | None = None) -> dict[str, np.ndarray]:
  """:func:`merged_params` under PyTorch names (:func:`torch_state_dict`); load it with ``load_state_dict``.

  Keyword arguments are those of :func:`merged_params`. BatchNorm statistics come from ``parts['stats']``. The
  input axes of adapted LinearGeneral kernels are read off their adaptors.
  """
  merged = merged_params(parts, alpha=alpha, mix=mix, global_weight=global_weight, local_weight=local_weight,
                         client=client)
  in_axes = {}
  for _, path, leaves in _adapted_layers(parts, client):
    node = _base_layer(merged, path)
    shape = np.shape(node.get('kernel')) if node is not None else ()
    if len(shape) > 2 and 'a' in leaves and leaves['a'].ndim == 3:
      in_axes[path] = kernel_split(shape, d_in=leaves['a'].shape[-2], d_out=leaves['b'].shape[-1], path=path)
  return torch_state_dict(merged, parts.get('stats'), in_axes=in_axes)

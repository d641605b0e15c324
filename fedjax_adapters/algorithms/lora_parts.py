"""Pieces the personalized-LoRA family shares: splitting LoRA factors by name and padding heterogeneous ranks.

An adapted model's ``adapters`` part is a nested dict whose leaves are named ``global_a: [C, d_in, r]``,
``global_b: [C, r, d_out]`` (and ``global_bias``) per layer. Heterogeneous ranks are padded to the largest rank
``R`` with a per-client mask ``[R]`` (1 on the client's first ``r_k`` rank components, 0 elsewhere): the masked
columns of ``a`` and rows of ``b`` are multiplied by 0 in the forward pass, so they get no gradient, and by 0 in
aggregation, so they get no weight.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def select_leaves(tree: dict, keep: Callable[[str], bool]) -> dict:
  """The sub-dict of ``tree`` whose leaves' keys satisfy ``keep`` (e.g. ``lambda k: k.endswith('_a')``)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out[k] = select_leaves(v, keep)
    elif keep(str(k)):
      out[k] = v
  return out


def merge_dicts(a: dict, b: dict) -> dict:
  """The union of two nested dicts with disjoint leaves (inverse of two complementary :func:`select_leaves`)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def is_a(key: str) -> bool:
  """Whether a leaf key names a LoRA ``a`` factor (``global_a``, ``local_a``)."""
  return key.endswith('_a')


def rank_mask(ranks: Sequence[int], max_rank: int | None = None) -> np.ndarray:
  """``[K, R]`` float32: row ``k`` is 1 on the first ``ranks[k]`` rank components and 0 on the rest.

  Args:
    ranks: every client's true LoRA rank, each in ``[1, R]``.
    max_rank: ``R``, the padded rank (default ``max(ranks)``).
  """
  r = np.asarray(ranks, np.int64).reshape(-1)
  big = int(r.max()) if max_rank is None else int(max_rank)
  if r.size == 0 or int(r.min()) < 1 or int(r.max()) > big:
    raise ValueError(f'client ranks must lie in [1, {big}]; got {r.tolist()}.')
  return (np.arange(big)[None, :] < r[:, None]).astype(np.float32)


def mask_factors(adapters: dict, mask: jax.Array, b_scale: jax.Array | float = 1.0) -> dict:
  """Dense LoRA factors with rank components off: ``a [C, d_in, R] * mask``, ``b [C, R, d_out] * mask * b_scale``.

  ``mask: [R]`` (a layer of smaller rank ``r`` uses ``mask[:r]``); ``b_scale`` (e.g. ``R / r_k``) turns the
  layer's ``alpha / R`` scaling into the client's own ``alpha / r_k``; a bias adaptor, if any, is left as it is.
  """
  def one(path, x):
    name = str(path[-1].key)
    if name.endswith('_a'):
      return x * mask[:x.shape[-1]].astype(x.dtype)
    if name.endswith('_b'):
      return x * (mask[:x.shape[-2]] * b_scale).astype(x.dtype)[:, None]
    return x
  return jax.tree_util.tree_map_with_path(one, adapters)


def factor_pairs(adapters: dict, prefix: str = 'global') -> list[tuple[tuple, Any, Any]]:
  """``[(path, a, b)]`` of every layer's dense factors in ``adapters`` (paths of the layer dicts)."""
  out = []

  def walk(node, path):
    if f'{prefix}_a' in node and f'{prefix}_b' in node:
      out.append((path, node[f'{prefix}_a'], node[f'{prefix}_b']))
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, path + (k,))
  walk(adapters, ())
  return out


def dense_factors_only(adapters: dict, who: str):
  """Raises unless every adapted layer carries dense factors ``a: [C, d_in, r]``, ``b: [C, r, d_out]``."""
  for leaf_path, x in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    name = str(leaf_path[-1].key)
    if (name.endswith('_a') or name.endswith('_b')) and x.ndim != 3:
      raise ValueError(f'{who} needs dense LoRA factors [C, d_in, r] / [C, r, d_out]; layer '
                       f'{jax.tree_util.keystr(leaf_path)} has shape {tuple(x.shape)} (use conv=False).')


def adapters_only(optimizer: optax.GradientTransformation,
                  client_keys: Sequence[str] = ()) -> optax.GradientTransformation:
  """``optimizer`` on the global ``'adapters'`` (and the client-state keys ``client_keys``); the rest is frozen.

  For params ``(global_params, client_state)`` whose global part also carries the base that only the server
  changes (FLoRA's merge) and whose client state carries fixed rank masks.
  """
  def labels(params):
    g, c = params
    return ({k: jax.tree.map(lambda _: 'train' if k == 'adapters' else 'freeze', v) for k, v in g.items()},
            {k: jax.tree.map(lambda _: 'train' if k in client_keys else 'freeze', v) for k, v in c.items()})
  return optax.multi_transform({'train': optimizer, 'freeze': optax.set_to_zero()}, labels)


def lora_scale(spec, a: jax.Array) -> float:
  """The layer's LoRA scaling: ``alpha / r`` with ``r = a.shape[-1]`` (1 when ``spec.alpha`` is None)."""
  return 1.0 if spec.alpha is None else float(spec.alpha) / a.shape[-1]


def base_kernel_paths(parts: dict, who: str) -> list[tuple]:
  """Paths (in ``parts['adapters']``) of layers whose base kernel is ``[d_in, d_out]`` (a LoRA merges into it)."""
  paths = []
  for path, a, b in factor_pairs(parts['adapters']):
    node = parts['base']
    for k in path:
      node = node.get(k, {}) if isinstance(node, dict) else {}
    kernel = node.get('base', {}).get('kernel') if isinstance(node, dict) else None
    if kernel is None or tuple(kernel.shape) != (a.shape[-2], b.shape[-1]):
      raise ValueError(f'{who} merges LoRA into [d_in, d_out] kernels; layer {path} has kernel '
                       f'{None if kernel is None else tuple(kernel.shape)} for factors {tuple(a.shape)}, '
                       f'{tuple(b.shape)} (target plain linear layers only).')
    paths.append(path)
  return paths


def get_path(tree: dict, path: tuple) -> Any:
  """``tree[path[0]][path[1]]...``."""
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree: dict, path: tuple, value: Any) -> dict:
  """A copy of nested dict ``tree`` with ``tree[path...] = value`` (the rest shared)."""
  if not path:
    return value
  return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}

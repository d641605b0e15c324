"""Client-axis tiling: the sampled clients in cache-sized tiles inside the compiled round.

On a CPU, a vmapped round over ``M`` clients keeps every client's trained parameters, their gradients and its data
live at once, ``M`` times the working set of one client. Once that falls out of the last-level cache, every local
step streams it from memory, and the throughput per client-step drops as the cohort grows (on FLoRAL's MNIST MLP,
arXiv 2410.03497, a 2-core EPYC lost 40 % of its best throughput by 256 clients). :func:`tiled_clients` maps the
clients in tiles of ``t``: a compiled ``lax.scan`` over ``ceil(M / t)`` tiles, each tile one ``jax.vmap``. With no
``tile`` given it picks one from the client function's working set and the device: on a CPU as many clients as fit
in half of the last-level cache available to the process (read from ``/sys``); on an accelerator the whole cohort
(plain vmap).

The client function is traced once, for one client; the tiles and a partial last tile evaluate that trace, so the
round still traces ``client_update`` once. A cohort that does not divide into equal tiles is padded up to the next
multiple with copies of its last client, whose outputs are dropped (balanced tiles keep the padding under one
client per tile). Every real client's computation is the one the full vmap does: results are equal to the vmapped
round's (``tests/test_tiling.py``).

Example::

  round_fn = make_round(alg, clients_per_round=256, mapping=tiled_clients())      # tile from the cache
  round_fn = make_round(alg, clients_per_round=256, mapping=tiled_clients(16))    # or fixed
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
from typing import Any, Callable

import jax
import jax.extend.core
import jax.numpy as jnp

from fedjax_adapters.federated.mapping import ClientMapping

# Used when the OS reports no cache size (neither /sys nor sysconf): a conservative last-level cache.
DEFAULT_CACHE_BYTES = 8 * 2**20
# The share of the last-level cache a tile's working set may fill: the rest holds what every client shares (the
# frozen base, the global params read each step), the code's temporaries and other processes' lines.
CACHE_FRACTION = 0.5


def _parse_size(text: str) -> int:
  """``'32768K'``, ``'1M'``, ``'512'`` (bytes) as an int."""
  text = text.strip().upper()
  scale = {'K': 2**10, 'M': 2**20, 'G': 2**30}.get(text[-1:], 1)
  return int(text.rstrip('KMG')) * scale


def _read(path: str) -> str:
  with open(path) as f:
    return f.read().strip()


@functools.lru_cache(maxsize=4)
def cpu_cache_bytes(root: str = '/sys/devices/system/cpu') -> int:
  """Bytes of last-level cache the usable CPUs reach: each distinct instance of the highest data/unified cache
  level counted once (``/sys/devices/system/cpu/cpu*/cache``); else ``sysconf``'s L3/L2 size; else
  :data:`DEFAULT_CACHE_BYTES`.

  Args:
    root: the sysfs CPU folder (a test points it elsewhere).
  """
  try:
    cpus = sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cpus = list(range(os.cpu_count() or 1))
  found: dict[int, dict[str, int]] = {}
  for cpu in cpus:
    for index in glob.glob(os.path.join(root, f'cpu{cpu}', 'cache', 'index*')):
      try:
        if _read(os.path.join(index, 'type')) not in ('Data', 'Unified'):
          continue
        level = int(_read(os.path.join(index, 'level')))
        size = _parse_size(_read(os.path.join(index, 'size')))
        shared = _read(os.path.join(index, 'shared_cpu_list'))
      except (OSError, ValueError):
        continue
      found.setdefault(level, {})[shared] = size
  if found:
    return sum(found[max(found)].values())
  for name in ('SC_LEVEL3_CACHE_SIZE', 'SC_LEVEL2_CACHE_SIZE'):
    try:
      size = os.sysconf(name)
    except (ValueError, OSError):
      continue
    if size and size > 0:
      return int(size)
  return DEFAULT_CACHE_BYTES


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s; a PRNG key counts 8 bytes)."""
  return sum(math.prod(x.shape) * getattr(x.dtype, 'itemsize', 8) for x in jax.tree.leaves(tree))


def client_working_set(out_shape: Any, one_client_inputs: Any) -> int:
  """An estimate of the bytes one client keeps hot while it trains: its inputs (data, state, key) plus twice its
  outputs (the parameters it trains and their gradients are the size of what it returns)."""
  return tree_bytes(one_client_inputs) + 2 * tree_bytes(out_shape)


def choose_tile(num_clients: int, working_set_bytes: int, *, platform: str | None = None,
                cache_bytes: int | None = None) -> int:
  """Clients per tile: the whole cohort off a CPU; on a CPU, as many as fit in :data:`CACHE_FRACTION` of
  ``cache_bytes`` (default :func:`cpu_cache_bytes`), at least 1, at most ``num_clients``."""
  platform = platform or jax.default_backend()
  if platform != 'cpu':
    return num_clients
  budget = CACHE_FRACTION * (cache_bytes or cpu_cache_bytes())
  return max(1, min(num_clients, int(budget // max(working_set_bytes, 1))))


def balanced_tiles(num_clients: int, max_tile: int) -> tuple[int, int]:
  """``(tiles, tile)``: the fewest tiles of at most ``max_tile`` clients, their size evened out so that padding
  ``tiles * tile - num_clients`` stays under ``tiles``."""
  tiles = -(-num_clients // max_tile)
  return tiles, -(-num_clients // tiles)


def trace_one_client(fn: Callable, shared: tuple, per_client: tuple) -> tuple[Callable, Any, Any]:
  """Traces ``fn`` once for one client: ``(call, out_shape, one_client_inputs)``; ``call(*shared, *one_client)``
  evaluates that trace (vmap or scan it without tracing ``fn`` again)."""
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, weak_type=jax.typeof(x).weak_type),
                     per_client)
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*shared, *one)
  run, out_tree = jax.extend.core.jaxpr_as_fun(closed), jax.tree.structure(out_shape)

  def call(*args):
    return jax.tree.unflatten(out_tree, run(*jax.tree.leaves(args)))

  return call, out_shape, one


def map_in_tiles(call: Callable, shared: tuple, per_client: tuple, tiles: int, tile: int) -> Any:
  """``call`` over the client axis ``[M, ...]`` of ``per_client`` as a ``lax.scan`` over ``tiles`` vmapped tiles of
  ``tile`` clients (the cohort padded with copies of its last client, their outputs dropped)."""
  m = jax.tree.leaves(per_client)[0].shape[0]
  one_tile = jax.vmap(lambda *a: call(*shared, *a))
  if tiles == 1:
    return one_tile(*per_client)
  pad = tiles * tile - m

  def split(x):
    if pad:
      x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad,) + x.shape[1:])])
    return x.reshape((tiles, tile) + x.shape[1:])

  _, ys = jax.lax.scan(lambda c, a: (c, one_tile(*a)), None, jax.tree.map(split, per_client))
  return jax.tree.map(lambda y: y.reshape((tiles * tile,) + y.shape[2:])[:m], ys)


@dataclasses.dataclass(frozen=True)
class TiledClients(ClientMapping):
  """The sampled clients in tiles of ``tile`` (a ``lax.scan`` over vmapped tiles), sized for the cache when ``tile``
  is None.

  Attributes:
    tile: clients per tile; None picks one per call from the client function's working set and the device
      (:func:`choose_tile`).
    cache_bytes: the cache to size tiles for (default: what :func:`cpu_cache_bytes` reads from the OS).
    plan: what the last :meth:`map` chose (``clients``, ``tile``, ``tiles``, ``padding``, ``working_set_bytes``,
      ``cache_bytes``, ``platform``); informational.
  """
  tile: int | None = None
  cache_bytes: int | None = None
  plan: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __post_init__(self):
    for name in ('tile', 'cache_bytes'):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f'tiled_clients needs {name} >= 1 (or None); got {v!r}.')

  def map(self, fn, shared, per_client):
    call, out_shape, one = trace_one_client(fn, shared, per_client)
    m = jax.tree.leaves(per_client)[0].shape[0]
    ws = client_working_set(out_shape, one)
    platform = jax.default_backend()
    tile = min(self.tile, m) if self.tile else choose_tile(m, ws, platform=platform, cache_bytes=self.cache_bytes)
    tiles, tile = balanced_tiles(m, tile)
    self.plan.clear()
    self.plan.update(clients=m, tile=tile, tiles=tiles, padding=tiles * tile - m, working_set_bytes=ws,
                     cache_bytes=self.cache_bytes or (cpu_cache_bytes() if platform == 'cpu' else None),
                     platform=platform)
    return map_in_tiles(call, shared, per_client, tiles, tile)


def tiled_clients(tile: int | None = None, *, cache_bytes: int | None = None) -> ClientMapping:
  """Clients in tiles of ``tile`` inside the compiled round; ``None``: sized for the CPU's cache (the whole cohort
  on an accelerator)."""
  return TiledClients(tile, cache_bytes)

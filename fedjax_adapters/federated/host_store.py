"""Large populations: per-client state in host memory, only the sampled clients on the device.

The device round (``round.make_round``) keeps the whole client store ``[K, ...]`` and the population's data on the
device, which caps ``K`` at what device memory holds. Here the store lives in host memory as numpy arrays (or
``np.memmap``-ed ``.npy`` files on disk), and a round

1. samples the ids on the host CPU with the device round's seeded sampler (:func:`round.round_client_ids`), so both
   pick the same clients;
2. gathers the sampled clients' state and data ``[M, ...]`` from host memory and puts only those on the device;
3. runs the same inner round as the device round (:func:`round.make_sampled_round`, compiled once);
4. writes the new client state back to host memory (padding slots of ``client_mask`` write nothing).

Device memory is then the model plus ``M`` clients, whatever ``K`` is. The experiment state is a
:class:`ServerState` whose ``clients`` field is empty; the host store travels beside it and is updated in place.

Example::

  state, store = host_init(alg, jax.random.key(0), 100_000)
  data = HostClientStore.from_tree(client_data_numpy)          # [K, N, ...] on the host
  round_fn = make_host_round(alg, clients_per_round=64)
  for _ in range(rounds):
    state, metrics = round_fn(state, store, data)
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_adapters.federated import evaluation
from fedjax_adapters.federated import guard as guard_lib
from fedjax_adapters.federated import mapping as mapping_lib
from fedjax_adapters.federated import round as round_lib
from fedjax_adapters.federated import sampling as sampling_lib
from fedjax_adapters.federated.algorithm import Algorithm, ServerState
from fedjax_adapters.federated.client_update import ClientData

Array = jax.Array


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    raise ValueError('a host client store cannot hold typed PRNG keys; store jax.random.key_data(key) instead.')
  return np.asarray(x)


class HostClientStore:
  """Per-client arrays ``[K, ...]`` kept in host memory (numpy or ``np.memmap``), gathered to the device by ids.

  Attributes:
    tree: the pytree of host arrays (leaves ``np.ndarray`` or ``np.memmap``, all with leading size ``K``).
    num_clients: ``K``.
  """

  def __init__(self, tree: Any, *, num_clients: int | None = None):
    """Wraps host arrays without copying them.

    Args:
      tree: pytree of numpy arrays (or memmaps) with a common leading client axis ``[K, ...]``.
      num_clients: ``K``; required only when ``tree`` has no leaves (an algorithm without client state).
    """
    leaves = jax.tree.leaves(tree)
    for x in leaves:
      if not isinstance(x, np.ndarray):
        raise ValueError(f'HostClientStore holds numpy arrays; got a {type(x).__name__} leaf (use from_tree to '
                         'copy device arrays to the host).')
    sizes = sorted({int(x.shape[0]) if x.ndim else -1 for x in leaves})
    if -1 in sizes:
      raise ValueError('every leaf of a client store needs a leading client axis; got a scalar leaf.')
    if len(sizes) > 1:
      raise ValueError(f'client store leaves disagree on the number of clients: leading sizes {sizes}.')
    if sizes:
      if num_clients is not None and num_clients != sizes[0]:
        raise ValueError(f'num_clients={num_clients} but the arrays hold {sizes[0]} clients.')
      num_clients = sizes[0]
    if num_clients is None or num_clients < 1:
      raise ValueError(f'an empty client store needs num_clients >= 1; got {num_clients}.')
    self.tree = tree
    self.num_clients = int(num_clients)

  @classmethod
  def from_tree(cls, tree: Any, *, num_clients: int | None = None) -> 'HostClientStore':
    """A store holding a host copy of ``tree`` (device or numpy arrays ``[K, ...]``); ``ClientData`` works too."""
    return cls(jax.tree.map(lambda x: np.array(_host(x)), tree), num_clients=num_clients)

  @classmethod
  def create(cls, template: Any, num_clients: int, *, path: str | os.PathLike | None = None) -> 'HostClientStore':
    """``num_clients`` copies of one client's state ``template`` (leaves ``[...]``), in RAM or on disk.

    Args:
      template: one client's state (no client axis).
      num_clients: ``K``.
      path: a directory; when given, leaf ``i`` is the memory-mapped file ``path/leaf_{i}.npy`` (reopen it with
        :meth:`open`), so the population may exceed RAM.

    Returns:
      The store, every client equal to ``template``.
    """
    if num_clients < 1:
      raise ValueError(f'num_clients must be >= 1; got {num_clients}.')
    leaves, treedef = jax.tree.flatten(jax.tree.map(_host, template))
    if path is not None:
      os.makedirs(path, exist_ok=True)
    out = []
    for i, x in enumerate(leaves):
      shape = (int(num_clients),) + x.shape
      if path is None:
        arr = np.empty(shape, x.dtype)
      else:
        arr = np.lib.format.open_memmap(os.path.join(path, f'leaf_{i}.npy'), mode='w+', dtype=x.dtype, shape=shape)
      arr[...] = x  # broadcast over the client axis
      out.append(arr)
    return cls(jax.tree.unflatten(treedef, out), num_clients=num_clients)

  @classmethod
  def open(cls, path: str | os.PathLike, template: Any, *, num_clients: int | None = None) -> 'HostClientStore':
    """Reopens a store written by ``create(..., path=path)`` (read-write memmaps); ``template`` gives the tree."""
    leaves, treedef = jax.tree.flatten(template)
    out = []
    for i, x in enumerate(leaves):
      f = os.path.join(path, f'leaf_{i}.npy')
      if not os.path.exists(f):
        raise ValueError(f'no client store file {f!r}; the template has {len(leaves)} leaves.')
      arr = np.load(f, mmap_mode='r+')
      if arr.shape[1:] != np.shape(x) or arr.dtype != np.asarray(x).dtype:
        raise ValueError(f'{f!r} holds {arr.dtype}{list(arr.shape)}; the template leaf is '
                         f'{np.asarray(x).dtype}{list(np.shape(x))} per client.')
      out.append(arr)
    return cls(jax.tree.unflatten(treedef, out), num_clients=num_clients)

  def check_ids(self, client_ids) -> np.ndarray:
    ids = np.asarray(client_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'client ids must be a 1-D integer array; got {ids.dtype}{list(ids.shape)}.')
    bad = ids[(ids < 0) | (ids >= self.num_clients)]
    if bad.size:
      raise ValueError(f'client ids {bad.tolist()} are out of range for {self.num_clients} clients '
                       f'(valid: 0..{self.num_clients - 1}).')
    return ids

  def gather(self, client_ids, *, sharding: jax.sharding.Sharding | None = None) -> Any:
    """The clients ``client_ids: [M]`` as device arrays ``[M, ...]`` (only these rows are read and transferred).

    Args:
      client_ids: ``[M]`` ids (padding slots may repeat an id).
      sharding: where to put them (e.g. ``sharding.client_sharding(mesh)``); default: the default device.
    """
    ids = self.check_ids(client_ids)
    rows = jax.tree.map(lambda x: np.take(x, ids, axis=0), self.tree)
    return jax.device_put(rows, sharding) if sharding is not None else jax.device_put(rows)

  def scatter(self, client_ids, values: Any, mask=None) -> None:
    """Writes ``values[i]`` (``[M, ...]``, device or host) to client ``client_ids[i]`` where ``mask[i]``, in place.

    Masked-out (padding) slots write nothing, so they can never overwrite a real client's update.
    """
    ids = self.check_ids(client_ids)
    keep = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
    if keep.shape != ids.shape:
      raise ValueError(f'client_mask has shape {list(keep.shape)}; client_ids has {list(ids.shape)}.')
    values = jax.device_get(values)
    if jax.tree.structure(values) != jax.tree.structure(self.tree):
      raise ValueError(f'scatter values have structure {jax.tree.structure(values)}; the store has '
                       f'{jax.tree.structure(self.tree)}.')

    def write(dst, v):
      v = np.asarray(v)
      if v.shape != (ids.shape[0],) + dst.shape[1:]:
        raise ValueError(f'scatter values have shape {list(v.shape)}; expected {[ids.shape[0]] + list(dst.shape[1:])}.')
      dst[ids[keep]] = v[keep].astype(dst.dtype, copy=False)

    jax.tree.map(write, self.tree, values)

  def to_tree(self) -> Any:
    """The host arrays (not a copy)."""
    return self.tree

  @property
  def nbytes(self) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(self.tree)))

  def flush(self) -> None:
    """Flushes memory-mapped leaves to disk (a no-op for in-RAM leaves)."""
    for x in jax.tree.leaves(self.tree):
      if isinstance(x, np.memmap):
        x.flush()


def host_init(algorithm: Algorithm, key: Array, num_clients: int, *,
              path: str | os.PathLike | None = None) -> tuple[ServerState, HostClientStore]:
  """``algorithm.init`` for a population too large for the device: ``(state without clients, host store)``.

  Only two clients are ever initialized on the device; the store repeats client 0 ``num_clients`` times on the
  host. That is exact for algorithms whose clients all start alike (learned routers start at zero logits, local
  adaptors from one init): it checks that the two initialized clients agree and raises otherwise. For other
  algorithms (e.g. an oracle router), build the state with ``algorithm.init`` and use
  ``HostClientStore.from_tree(state.clients)``.

  Args:
    algorithm: the algorithm.
    key: the experiment key (the same key gives the same global params as ``algorithm.init(key, K)``).
    num_clients: ``K``.
    path: store the population as memory-mapped ``.npy`` files in this directory.

  Returns:
    ``(state, store)``: ``state.clients`` is ``()``.
  """
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1; got {num_clients}.')
  try:
    small = algorithm.init(key, 2)
  except ValueError as e:
    raise ValueError(f'host_init builds the population from algorithm.init(key, 2), which failed ({e}). '
                     'Initialize with algorithm.init and HostClientStore.from_tree(state.clients) instead.') from e
  two = jax.tree.map(_host, small.clients)
  for path_, x in jax.tree_util.tree_leaves_with_path(two):
    if not np.array_equal(x[0], x[1]):
      raise ValueError(f'clients start from different states (leaf {jax.tree_util.keystr(path_)}); host_init only '
                       'repeats one client. Use HostClientStore.from_tree(algorithm.init(key, K).clients).')
  template = jax.tree.map(lambda x: x[0], two)
  if jax.tree.leaves(template):
    store = HostClientStore.create(template, num_clients, path=path)
  else:
    store = HostClientStore(template, num_clients=num_clients)
  return small._replace(clients=()), store


def host_data(data) -> HostClientStore:
  """Population data (``FederatedData``, ``(x, y, counts)`` or ``ClientData`` of numpy arrays) as a host store."""
  if isinstance(data, HostClientStore):
    return data
  x, y, counts = data
  return HostClientStore(ClientData(jax.tree.map(_host, x), jax.tree.map(_host, y),
                                    np.asarray(counts, np.int32)))


def make_host_round(algorithm: Algorithm, *, clients_per_round: int | None = None, sampling=None,
                    mapping: mapping_lib.ClientMapping | None = None, guard: guard_lib.UpdateGuard | None = None,
                    adversary=None):
  """Builds ``round_fn(state, store, data, client_ids=None, client_mask=None) -> (state, metrics)``.

  Args:
    algorithm: the algorithm.
    clients_per_round, sampling: ``M`` with fixed-size sampling, or a ``Sampling`` value, as in ``make_round``.
    mapping: how the sampled clients are mapped, as in ``make_round`` (``sharded_clients(mesh)`` shards the
      ``[M, ...]`` sampled clients over the mesh; the host store itself stays on this host, so ``shard_store`` is
      ignored).
    guard: how client updates are screened, as in ``make_round``.
    adversary: an experiment's attack on the stacked client outputs, as in ``make_round``.

  Returns:
    ``round_fn``: ``state`` is a :class:`ServerState` with ``clients=()``; ``store`` the
    :class:`HostClientStore` of client state (updated in place; rejected clients keep their state); ``data`` the
    population's data (a host store of :class:`ClientData`, or anything :func:`host_data` takes).
    ``client_ids``/``client_mask`` as in ``make_round``. Same ``state.key`` and round => same sampled clients and
    the same result as the device round.
  """
  sampling = sampling_lib.resolve(sampling, clients_per_round)
  mapping = mapping_lib.resolve(mapping)
  if isinstance(mapping, mapping_lib.ShardedClients):
    mapping = mapping_lib.ShardedClients(mapping.mesh, mapping.axis_name, shard_store=False)
  mapping.check_clients_per_round(sampling.slots)
  guard = (guard or guard_lib.UpdateGuard()).check()

  compiled = round_lib.make_sampled_update(algorithm, mapping, guard, adversary)
  # Sampling runs on the host CPU (threefry bits are the same on every backend), so a permutation of K ids never
  # touches accelerator memory.
  sample = jax.jit(functools.partial(round_lib.round_sample, sampling), static_argnums=(2,))
  sharded = isinstance(mapping, mapping_lib.ShardedClients)

  def round_fn(state, store: HostClientStore, data, client_ids=None, client_mask=None):
    data = _check_host_inputs(state, store, data)
    sampling.check(data.num_clients)
    ids, mask = _host_ids(state, data.num_clients, sampling.slots, sample, client_ids, client_mask)
    where = mapping.layout.clients if sharded else None
    client_state, cdata = store.gather(ids, sharding=where), data.gather(ids, sharding=where)
    if sharded:
      state = jax.device_put(state, mapping.layout.replicated)
    ids_d, mask_d = mapping.replicate((jnp.asarray(ids), jnp.asarray(mask)))
    state, new_cs, keep, metrics = compiled(state, client_state, cdata, ids_d, mask_d)
    store.scatter(ids, new_cs, np.asarray(keep))
    return state, metrics

  return round_fn


def _check_host_inputs(state, store, data) -> HostClientStore:
  if not isinstance(store, HostClientStore):
    raise ValueError(f'store must be a HostClientStore; got {type(store).__name__}.')
  if jax.tree.leaves(state.clients):
    raise ValueError('a host round keeps client state in the HostClientStore; pass state with clients=() '
                     '(host_init returns one).')
  data = host_data(data)
  if store.num_clients != data.num_clients:
    raise ValueError(f'the data holds {data.num_clients} clients but the client store holds {store.num_clients}; '
                     'they must match.')
  return data


def _host_ids(state, num_clients: int, clients_per_round: int, sample, client_ids, client_mask):
  """The round's ids and mask on the host: sampled on the host CPU as the device round samples, or checked."""
  if client_ids is None:
    if client_mask is not None:
      raise ValueError('client_mask needs client_ids: it marks padding slots among explicitly given ids.')
    key, rnd = jax.device_put((state.key, state.round), jax.devices('cpu')[0])
    ids, mask, _ = sample(key, rnd, num_clients)
    return np.asarray(ids), np.asarray(mask)
  ids, mask = round_lib.check_round_ids(client_ids, client_mask, num_clients, clients_per_round)
  return np.asarray(ids), np.asarray(mask)


def evaluate_host(algorithm: Algorithm, state: ServerState, store: HostClientStore, data, *,
                  chunk_size: int = 1024) -> dict[str, np.ndarray]:
  """Every client's metric sums (``[K]`` numpy per metric), ``chunk_size`` clients on the device at a time.

  The last chunk is padded with client 0 (results dropped), so the evaluation compiles once.
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1; got {chunk_size}.')
  data = host_data(data)
  k = data.num_clients
  if store.num_clients != k:
    raise ValueError(f'the data holds {k} clients but the client store holds {store.num_clients}; they must match.')
  fn = evaluation.mapped_function(algorithm.evaluate, mapping_lib.vmap_clients())
  size = min(chunk_size, k)
  parts = []
  for start in range(0, k, size):
    ids = np.arange(start, start + size)
    real = ids < k
    ids = np.where(real, ids, 0)
    m = fn(state.frozen, state.global_params, store.gather(ids), data.gather(ids))
    parts.append(jax.tree.map(lambda v: np.asarray(v)[real], m))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

"""The client axis as a mesh axis (design.md, principle 4).

A federated round stacks everything per client on a leading axis: the client store ``[K, ...]``, the sampled
clients' state and data ``[M, ...]`` and their outputs ``[M, ...]``. Here that axis is sharded over the ``'clients'``
axis of a :class:`jax.sharding.Mesh`, while the frozen base, the global params, the server optimizer state and the
PRNG key are replicated. The round code itself does not change: ``make_round(..., mesh=mesh)`` compiles the same
function with these shardings, and the weighted mean over the client axis becomes an all-reduce in XLA.

The same mesh spans every process of a multi-host run after :func:`initialize_distributed`; arrays are then built
from each process's own shards (``jax.make_array_from_process_local_data``) and nothing else changes.

Example::

  mesh = client_mesh()                                  # all devices, axis 'clients'
  round_fn = make_round(alg, clients_per_round=8, mesh=mesh)
  state, metrics = round_fn(state, data)                # state.clients and data sharded over 'clients'
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CLIENTS = 'clients'


def client_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = CLIENTS) -> Mesh:
  """A one-axis mesh over ``devices`` (default: every device of every process, ``jax.devices()``).

  Args:
    devices: the devices, in mesh order.
    axis_name: name of the client axis.

  Returns:
    ``Mesh`` of shape ``{axis_name: len(devices)}``.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError('client_mesh needs at least one device; got an empty list.')
  if not isinstance(axis_name, str) or not axis_name:
    raise ValueError(f'axis_name must be a non-empty string; got {axis_name!r}.')
  return Mesh(np.array(devices, dtype=object), (axis_name,))


def axis_size(mesh: Mesh, axis_name: str = CLIENTS) -> int:
  """Number of devices along ``axis_name`` of ``mesh`` (a ValueError naming the mesh's axes if it has none)."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f'expected a jax.sharding.Mesh; got {type(mesh).__name__}.')
  if axis_name not in mesh.axis_names:
    raise ValueError(f'mesh has no axis {axis_name!r}; its axes are {tuple(mesh.axis_names)}. Build it with '
                     f'client_mesh(axis_name={axis_name!r}) or pass axis_name=<one of its axes>.')
  return int(mesh.shape[axis_name])


def client_sharding(mesh: Mesh, axis_name: str = CLIENTS) -> NamedSharding:
  """Leading (client) axis split over ``axis_name``; trailing axes and other mesh axes replicated."""
  axis_size(mesh, axis_name)
  return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """The whole array on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def check_divisible(tree: Any, mesh: Mesh, axis_name: str = CLIENTS, *, what: str = 'client axis',
                    hint: str = '') -> None:
  """Raises a ValueError naming the first leaf whose leading size does not split over ``axis_name``."""
  n = axis_size(mesh, axis_name)
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    shape = np.shape(x)
    if not shape:
      raise ValueError(f'{what}: leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs a leading client '
                       f'axis to be sharded over {axis_name!r}.')
    if shape[0] % n:
      raise ValueError(f'{what}: leaf {jax.tree_util.keystr(path)} has {shape[0]} clients on its leading axis, '
                       f'which does not divide over the {n} devices of mesh axis {axis_name!r} '
                       f'(pad to {-(-shape[0] // n) * n}){hint}.')


def shard_clients(tree: Any, mesh: Mesh, axis_name: str = CLIENTS) -> Any:
  """``jax.device_put`` of every leaf with its leading axis sharded over ``axis_name``.

  Args:
    tree: pytree of arrays ``[K, ...]`` (numpy or jax); ``K`` must be a multiple of the axis size.
    mesh: the mesh.
    axis_name: the client axis of ``mesh``.

  Returns:
    The same pytree of ``jax.Array``s with sharding ``P(axis_name)`` (a no-op for leaves already placed so).
  """
  check_divisible(tree, mesh, axis_name, what='shard_clients')
  return jax.device_put(tree, client_sharding(mesh, axis_name))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``jax.device_put`` of every leaf onto every device of ``mesh`` (a no-op for leaves already placed so)."""
  return jax.device_put(tree, replicated_sharding(mesh))


def constrain_clients(tree: Any, mesh: Mesh, axis_name: str = CLIENTS) -> Any:
  """Inside ``jit``: ``with_sharding_constraint`` of every leaf's leading axis to ``axis_name``."""
  return jax.lax.with_sharding_constraint(tree, client_sharding(mesh, axis_name))


class RoundLayout(NamedTuple):
  """Where a sharded round keeps each part of the experiment (built by ``make_round(..., mesh=...)``).

  Attributes:
    mesh: the mesh.
    axis_name: its client axis.
    shard_store: shard the client store ``[K, ...]`` and the population's data ``[K, ...]`` over the client axis
      (``K`` must divide); ``False`` replicates them and shards only the sampled clients ``[M, ...]``.
  """
  mesh: Mesh
  axis_name: str = CLIENTS
  shard_store: bool = True

  @property
  def clients(self) -> NamedSharding:
    return client_sharding(self.mesh, self.axis_name)

  @property
  def replicated(self) -> NamedSharding:
    return replicated_sharding(self.mesh)

  @property
  def store(self) -> NamedSharding:
    return self.clients if self.shard_store else self.replicated

  def check_clients_per_round(self, clients_per_round: int) -> None:
    n = axis_size(self.mesh, self.axis_name)
    if clients_per_round % n:
      pad = -(-clients_per_round // n) * n
      raise ValueError(
          f'clients_per_round={clients_per_round} does not divide over the {n} devices of mesh axis '
          f'{self.axis_name!r}. Use clients_per_round={pad} and pass client_ids with {pad - clients_per_round} '
          f'padding slots marked False in client_mask (padding clients train but weigh nothing and write nothing).')

  def state_shardings(self, state):
    """A :class:`ServerState` of shardings (a pytree prefix of ``state``): store as :attr:`store`, rest replicated."""
    rep = self.replicated
    return state._replace(frozen=rep, global_params=rep, clients=self.store, agg_state=rep, round=rep, key=rep)

  def place(self, state, data):
    """``(state, data)`` moved to their shardings (no copy where they already are there)."""
    if self.shard_store:
      hint = '; or pass shard_store=False to replicate it and shard only the sampled clients'
      if jax.tree.leaves(state.clients):
        check_divisible(state.clients, self.mesh, self.axis_name, what='the client store (state.clients)', hint=hint)
      check_divisible(data, self.mesh, self.axis_name, what='the client data', hint=hint)
    return jax.device_put(state, self.state_shardings(state)), jax.device_put(data, self.store)

  def constrain(self, tree):
    return constrain_clients(tree, self.mesh, self.axis_name)


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, *,
                           local_device_ids: Sequence[int] | None = None, num_cpu_devices: int | None = None,
                           cpu_collectives: str | None = 'gloo', initialization_timeout: int = 60) -> None:
  """``jax.distributed.initialize`` for a multi-process run; call it first, before any other JAX work.

  After it, ``jax.devices()`` lists every process's devices, so :func:`client_mesh` spans all hosts and the same
  compiled round runs everywhere (each process feeds its own shards). On CPU, cross-process collectives use
  ``jax_cpu_collectives_implementation`` (``'gloo'``, the default in jax 0.10; ``'mpi'`` needs an MPI build).

  Args:
    coordinator_address: ``'host:port'`` of process 0's coordinator service.
    num_processes: number of processes.
    process_id: this process, ``0 <= process_id < num_processes``.
    local_device_ids: restrict this process to these local devices (GPU/TPU).
    num_cpu_devices: CPU devices of this process (sets ``jax_num_cpu_devices``; ``None`` keeps the default).
    cpu_collectives: ``'gloo'``, ``'mpi'`` or ``None`` (leave the setting alone).
    initialization_timeout: seconds to wait for all processes to connect.
  """
  if not isinstance(coordinator_address, str) or ':' not in coordinator_address:
    raise ValueError(f"coordinator_address must be 'host:port'; got {coordinator_address!r}.")
  if num_processes < 1:
    raise ValueError(f'num_processes must be >= 1; got {num_processes}.')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'process_id must lie in [0, {num_processes}); got {process_id}.')
  if num_cpu_devices is not None:
    if num_cpu_devices < 1:
      raise ValueError(f'num_cpu_devices must be >= 1; got {num_cpu_devices}.')
    jax.config.update('jax_num_cpu_devices', int(num_cpu_devices))
  if cpu_collectives is not None:
    if cpu_collectives not in ('gloo', 'mpi'):
      raise ValueError(f"cpu_collectives must be 'gloo', 'mpi' or None; got {cpu_collectives!r}.")
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)


def process_local_clients(full_or_local: Any, mesh: Mesh, axis_name: str = CLIENTS, *,
                          global_clients: int | None = None) -> Any:
  """Global arrays sharded over the client axis, built from each process's own rows.

  Args:
    full_or_local: pytree of numpy arrays; either this process's contiguous rows of the client axis (pass
      ``global_clients``) or all ``K`` rows (each process then keeps only its own).
    mesh: a mesh spanning all processes.
    axis_name: its client axis.
    global_clients: ``K``, when ``full_or_local`` holds only this process's rows.

  Returns:
    Pytree of ``jax.Array`` ``[K, ...]`` with sharding ``P(axis_name)``.
  """
  sharding = client_sharding(mesh, axis_name)

  def one(x):
    x = np.asarray(x)
    if global_clients is None:
      check_divisible(x, mesh, axis_name, what='process_local_clients')
      return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    shape = (int(global_clients),) + x.shape[1:]
    check_divisible(np.empty((shape[0], 0)), mesh, axis_name, what='process_local_clients')
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(one, full_or_local)


def process_local_rows(num_clients: int, mesh: Mesh, axis_name: str = CLIENTS) -> slice:
  """The contiguous rows ``[start, stop)`` of a ``[num_clients, ...]`` array that this process's devices hold."""
  sharding = client_sharding(mesh, axis_name)
  check_divisible(np.empty((num_clients, 0)), mesh, axis_name, what='process_local_rows')
  idx = sharding.addressable_devices_indices_map((num_clients,))
  starts = sorted({s[0].start or 0 for s in idx.values()})
  stops = sorted({num_clients if s[0].stop is None else s[0].stop for s in idx.values()})
  start, stop = starts[0], stops[-1]
  if stop - start != sum(b - a for a, b in zip(starts, stops)):
    raise ValueError(f'the devices of process {jax.process_index()} hold non-contiguous client rows {starts}..{stops}; '
                     'order the mesh devices by process (client_mesh() does).')
  return slice(start, stop)


def fetch(tree: Any) -> Any:
  """Every leaf as a full numpy array on this process (gathers other processes' shards when needed)."""
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)

"""How per-client work is mapped over the sampled clients: one object, used by every place that maps clients.

A :class:`ClientMapping` says *how* a function of one client runs over a stacked client axis ``[M, ...]``; the
round (:func:`fedjax_adapters.federated.make_round`), evaluation, prediction and FedDPA's personalization all take
one, so none of them grows its own flags. The four mappings compute the same thing (tests check it leaf by leaf):

* :func:`vmap_clients` — one ``jax.vmap`` over all clients (the default; the frozen base is broadcast, never copied);
* :func:`chunked_clients` — ``k`` clients vmapped at a time in a compiled ``lax.map`` (less memory; ``k = 1`` keeps
  a conv model's working set in a CPU's cache);
* :func:`sequential_clients` — a Python loop calling the jitted one-client function (for checking and debugging);
* :func:`sharded_clients` — the vmap with the client axis sharded over a device mesh (``federated/sharding.py``).

This plays the role of fedjax's ``for_each_client`` backends and DrJAX's ``map_fn``: a mapping is a value, so a
round built with it needs no flags read back later. Where the *client state* lives (device or host memory) is a
separate choice (``federated/host_store.py``) that works with any mapping.

Example::

  round_fn = make_round(alg, clients_per_round=32, mapping=chunked_clients(4))
  per_client = evaluate(alg, state, test, mapping=sequential_clients())
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_adapters.federated import sharding


def _stack(results: list) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *results)


@functools.lru_cache(maxsize=256)
def _jitted(fn: Callable) -> Callable:
  return jax.jit(fn)


class ClientMapping(abc.ABC):
  """Base class: ``map(fn, shared, per_client)`` runs ``fn(*shared, *client_args)`` for every client.

  Attributes:
    compiled: whether the mapped function can sit inside one ``jax.jit`` (all but the sequential mapping).
  """
  compiled: bool = True

  @abc.abstractmethod
  def map(self, fn: Callable, shared: tuple, per_client: tuple) -> Any:
    """Outputs of ``fn(*shared, *[a[i] for a in per_client])`` stacked on a leading client axis.

    Args:
      fn: a function of one client.
      shared: arguments every client sees (broadcast, e.g. the frozen base and global params).
      per_client: pytrees with a leading client axis ``[M, ...]``.
    """

  def jit(self, fn: Callable, out_shardings_of: Callable[[Any], Any] | None = None) -> Callable:
    """Compiles a whole round (or evaluation) built on this mapping."""
    del out_shardings_of  # only the sharded mapping places outputs
    return jax.jit(fn)

  def place(self, state: Any, data: Any) -> tuple[Any, Any]:
    """Moves ``(state, data)`` to where this mapping computes (a no-op but for the sharded mapping)."""
    return state, data

  def replicate(self, tree: Any) -> Any:
    """Moves small round inputs (explicit client ids and mask) to where this mapping computes."""
    return tree

  def check_clients_per_round(self, clients_per_round: int) -> None:
    if clients_per_round < 1:
      raise ValueError(f'clients_per_round must be >= 1; got {clients_per_round}.')


@dataclasses.dataclass(frozen=True)
class VmapClients(ClientMapping):
  """Every client at once: ``jax.vmap`` over the client axis, shared arguments broadcast (``in_axes=None``)."""

  def map(self, fn, shared, per_client):
    in_axes = (None,) * len(shared) + (0,) * len(per_client)
    return jax.vmap(fn, in_axes=in_axes)(*shared, *per_client)


@dataclasses.dataclass(frozen=True)
class ChunkedClients(ClientMapping):
  """``chunk`` clients vmapped at a time, the chunks in a compiled ``lax.map`` (same results, ``chunk`` clients'
  activations in memory instead of ``M``)."""
  chunk: int = 1

  def __post_init__(self):
    if not isinstance(self.chunk, int) or self.chunk < 1:
      raise ValueError(f'chunked_clients needs a chunk size >= 1; got {self.chunk!r}.')

  def map(self, fn, shared, per_client):
    return jax.lax.map(lambda args: fn(*shared, *args), per_client, batch_size=self.chunk)


@dataclasses.dataclass(frozen=True)
class SequentialClients(ClientMapping):
  """One client after another in a Python loop over the jitted one-client function (for checking, debugging and
  bounding memory to one client); the round around it is not one compiled program."""
  compiled = False

  def map(self, fn, shared, per_client):
    one = _jitted(fn)
    m = int(jax.tree.leaves(per_client)[0].shape[0])
    return _stack([one(*shared, *jax.tree.map(lambda x: x[i], per_client)) for i in range(m)])


@dataclasses.dataclass(frozen=True)
class ShardedClients(ClientMapping):
  """The vmap with the client axis sharded over ``mesh``'s ``axis_name`` (aggregation becomes an all-reduce).

  Attributes:
    mesh: a ``jax.sharding.Mesh`` (e.g. :func:`fedjax_adapters.federated.sharding.client_mesh`).
    axis_name: its client axis.
    shard_store: also shard the client store and the population's data ``[K, ...]`` (``K`` must divide over the
      axis); ``False`` replicates them and shards only the sampled clients ``[M, ...]``.
  """
  mesh: Any = None
  axis_name: str = sharding.CLIENTS
  shard_store: bool = True

  def __post_init__(self):
    if self.mesh is None:
      raise ValueError('sharded_clients needs a mesh (e.g. fedjax_adapters.federated.sharding.client_mesh()).')
    sharding.axis_size(self.mesh, self.axis_name)  # raises, naming the mesh's axes, if there is no such axis

  @property
  def layout(self) -> sharding.RoundLayout:
    return sharding.RoundLayout(self.mesh, self.axis_name, self.shard_store)

  def map(self, fn, shared, per_client):
    constrain = self.layout.constrain
    out = jax.vmap(fn, in_axes=(None,) * len(shared) + (0,) * len(per_client))(*shared, *constrain(per_client))
    return constrain(out)

  def jit(self, fn, out_shardings_of=None):
    if out_shardings_of is None:
      return jax.jit(fn)
    return jax.jit(fn, out_shardings=out_shardings_of(self.layout))

  def place(self, state, data):
    return self.layout.place(state, data)

  def replicate(self, tree):
    return jax.device_put(tree, self.layout.replicated)

  def check_clients_per_round(self, clients_per_round: int) -> None:
    super().check_clients_per_round(clients_per_round)
    self.layout.check_clients_per_round(clients_per_round)


def vmap_clients() -> ClientMapping:
  """All sampled clients in one ``jax.vmap`` (the default)."""
  return VmapClients()


def chunked_clients(chunk: int) -> ClientMapping:
  """``chunk`` clients vmapped at a time inside the compiled program (``lax.map`` over chunks)."""
  return ChunkedClients(chunk)


def sequential_clients() -> ClientMapping:
  """One client at a time in a Python loop over the jitted client function."""
  return SequentialClients()


def sharded_clients(mesh, axis_name: str = sharding.CLIENTS, *, shard_store: bool = True) -> ClientMapping:
  """The client axis sharded over ``mesh`` (one or many processes)."""
  return ShardedClients(mesh, axis_name, shard_store)


def resolve(mapping: ClientMapping | None) -> ClientMapping:
  """``mapping``, or the default :func:`vmap_clients`; raises on anything that is not a mapping."""
  if mapping is None:
    return VmapClients()
  if not isinstance(mapping, ClientMapping):
    raise ValueError(f'mapping must be a ClientMapping (vmap_clients(), chunked_clients(k), sequential_clients() or '
                     f'sharded_clients(mesh)); got {mapping!r}.')
  return mapping

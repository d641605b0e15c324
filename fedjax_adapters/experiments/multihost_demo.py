"""FLoRAL on ``synthetic_linear`` across processes: one mesh over every process's devices, the same compiled round.

Each process runs this script with its own ``--process-id``; after ``initialize_distributed`` the ``'clients'`` mesh
axis spans all processes' devices. Every process builds only its own shards of the client store and the data
(``jax.make_array_from_process_local_data``); the frozen/global params are replicated; the round is
``make_round(..., mapping=sharded_clients(mesh))``, whose weighted mean over clients becomes a cross-process
all-reduce (gloo on CPU).

Two processes with two CPU devices each on one machine (the coordinator must be reachable by all processes)::

  python -m fedjax_adapters.experiments.multihost_demo --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 \\
      --cpu-devices 2 --out out/multihost.npz &
  python -m fedjax_adapters.experiments.multihost_demo --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1 \\
      --cpu-devices 2

The single-process reference (one device, no mesh) of the same experiment::

  python -m fedjax_adapters.experiments.multihost_demo --single --out out/single.npz

``--out`` (written by process 0) holds the final global params and every client's router logits, flattened to
``{path: array}``; the two files agree to float tolerance.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# No JAX work may happen before jax.distributed.initialize, so everything that touches devices is imported lazily.


def build(seed: int = 0):
  """The experiment: ``(algorithm, FederatedDataset)`` of FLoRAL (learned router) on synthetic_linear."""
  from fedjax_adapters.experiments import floral_tasks
  from fedjax_adapters.experiments.configs.floral import TASKS
  from fedjax_adapters import algorithms
  cfg = TASKS['synthetic_linear']
  ds = floral_tasks.load_data(cfg, seed)
  alg = algorithms.floral(floral_tasks.model_fn(cfg), num_adaptors=ds.num_clusters, loss=cfg.loss, lr=cfg.lr,
                          batch_size=cfg.batch_size, rank=cfg.rank, router_lr=cfg.router_lr)
  return alg, ds


def result_arrays(state) -> dict[str, np.ndarray]:
  """``{'global/<path>': ..., 'clients/<path>': ...}`` as full numpy arrays (a collective in multi-process runs)."""
  import jax
  from fedjax_adapters.federated.sharding import fetch
  out = {}
  for name, tree in (('global', state.global_params), ('clients', state.clients)):
    for path, x in jax.tree_util.tree_leaves_with_path(fetch(tree)):
      out[name + jax.tree_util.keystr(path)] = x
  return out


def run_single(*, rounds: int, clients_per_round: int, seed: int = 0):
  """One process, one device, no mesh: the reference."""
  import jax
  from fedjax_adapters.federated import client_data, make_round
  alg, ds = build(seed)
  data = client_data(ds.train)
  state = alg.init(jax.random.key(seed), ds.train.num_clients)
  round_fn = make_round(alg, clients_per_round=clients_per_round)
  for _ in range(rounds):
    state, _ = round_fn(state, data)
  return state


def _replicated_global(tree, mesh):
  """Process-local copies of a replicated pytree -> global arrays replicated over ``mesh`` (typed keys included)."""
  import jax
  from fedjax_adapters.federated.sharding import replicated_sharding
  rep = replicated_sharding(mesh)

  def one(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.make_array_from_process_local_data(rep, np.asarray(jax.random.key_data(x)))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(rep, np.asarray(x))

  return jax.tree.map(one, tree)


def run_distributed(*, rounds: int, clients_per_round: int, seed: int = 0):
  """The same experiment on a mesh over all processes' devices (call after ``initialize_distributed``)."""
  import jax
  from fedjax_adapters.federated.client_update import ClientData
  from fedjax_adapters.federated import make_round, sharded_clients
  from fedjax_adapters.federated.sharding import client_mesh, process_local_clients, process_local_rows
  alg, ds = build(seed)
  mesh = client_mesh()
  k = ds.train.num_clients
  n = mesh.shape['clients']
  # Shard the store when K divides over the devices; otherwise replicate it (only the sampled clients are split).
  shard_store = k % n == 0
  state = alg.init(jax.random.key(seed), k)  # process-local, identical on every process
  host = ClientData(ds.train.x, ds.train.y, ds.train.counts)
  clients = jax.tree.map(np.asarray, state.clients)
  if shard_store:
    rows = process_local_rows(k, mesh)
    print(f'process {jax.process_index()}: devices {jax.local_devices()} hold clients {rows.start}..{rows.stop - 1}',
          flush=True)
    clients = process_local_clients(jax.tree.map(lambda x: x[rows], clients), mesh, global_clients=k)
    data = process_local_clients(jax.tree.map(lambda x: x[rows], host), mesh, global_clients=k)
  else:
    clients, data = _replicated_global(clients, mesh), _replicated_global(host, mesh)
  state = _replicated_global(state._replace(clients=()), mesh)._replace(clients=clients)
  round_fn = make_round(alg, clients_per_round=clients_per_round,
                        mapping=sharded_clients(mesh, shard_store=shard_store))
  for t in range(rounds):
    state, metrics = round_fn(state, data)
    if jax.process_index() == 0:
      print(f'round {t}: {n} devices over {jax.process_count()} processes, clients sharded '
            f'{metrics["loss"].sharding.spec}', flush=True)
  return state


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--coordinator', default=None, help="'host:port' of process 0 (multi-process runs)")
  p.add_argument('--num-processes', type=int, default=1)
  p.add_argument('--process-id', type=int, default=0)
  p.add_argument('--cpu-devices', type=int, default=None, help='CPU devices per process')
  p.add_argument('--single', action='store_true', help='run the one-process, no-mesh reference instead')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--clients-per-round', type=int, default=8)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None, help='.npz of final global params and client logits (process 0 writes)')
  args = p.parse_args(argv)
  t0 = time.time()
  if args.single:
    state = run_single(rounds=args.rounds, clients_per_round=args.clients_per_round, seed=args.seed)
    process = 0
  else:
    if args.coordinator is None:
      p.error('--coordinator is required unless --single')
    from fedjax_adapters.federated.sharding import initialize_distributed
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, num_cpu_devices=args.cpu_devices)
    state = run_distributed(rounds=args.rounds, clients_per_round=args.clients_per_round, seed=args.seed)
    process = args.process_id
  arrays = result_arrays(state)  # every process takes part in the gather
  if args.out and process == 0:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, **arrays)
  print(f'process {process}: done in {time.time() - t0:.1f} s', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])

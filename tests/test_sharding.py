"""The client axis as a mesh axis: 8 CPU devices and 2 processes (run in subprocesses) against the 1-device round.

The multi-device checks live in ``tests/sharding_worker.py``: ``--xla_force_host_platform_device_count=8`` only
takes effect before JAX initializes, so they run in a fresh interpreter. The two-process run is
``experiments/multihost_demo.py`` on 127.0.0.1 with gloo CPU collectives. Both start together (module fixture) and
are killed if they outlive their timeout.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedjax_adapters.federated import sharding
from fedjax_adapters.federated import sharded_clients
from fedjax_adapters.federated.sharding import client_mesh, initialize_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''), **extra)
  return env


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Starts the 8-device worker and the two demo processes at once; waits (bounded); always reaps them."""
  d = tmp_path_factory.mktemp('sharding')
  port = _free_port()
  demo = [sys.executable, '-m', 'fedjax_adapters.experiments.multihost_demo', '--coordinator', f'127.0.0.1:{port}',
          '--num-processes', '2', '--cpu-devices', '1', '--rounds', '3', '--clients-per-round', '8']
  procs = {
      'worker': subprocess.Popen(
          [sys.executable, os.path.join(ROOT, 'tests', 'sharding_worker.py'), str(d / 'worker.json'),
           '--reference', str(d / 'reference.npz')],
          cwd=ROOT, env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'), stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True),
      'process0': subprocess.Popen(demo + ['--process-id', '0', '--out', str(d / 'multihost.npz')], cwd=ROOT,
                                   env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
      'process1': subprocess.Popen(demo + ['--process-id', '1'], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True),
  }
  logs, codes = {}, {}
  deadline = time.monotonic() + TIMEOUT_S  # one bound for all three
  try:
    for name, p in procs.items():
      try:
        logs[name], _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        p.kill()
        logs[name] = p.communicate()[0] + f'\n[killed: still running {TIMEOUT_S} s after the start]'
      codes[name] = p.returncode
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  worker = {}
  if (d / 'worker.json').exists():
    worker = json.loads((d / 'worker.json').read_text())
  return {'dir': d, 'logs': logs, 'codes': codes, 'worker': worker}


def _case(runs, name):
  w = runs['worker']
  assert name in w, f"worker exited {runs['codes']['worker']} without reporting {name!r}:\n{runs['logs']['worker']}"
  assert w[name]['ok'], w[name]['error']


def test_eight_devices_replicated_store_equals_one_device(runs):
  """synthetic_linear (10 clients), 8 per round: the sampled clients split 1 per device; same result as 1 device."""
  _case(runs, 'replicated_store')


def test_eight_devices_sharded_store_equals_one_device(runs):
  """16 clients, store and data split 2 per device, global params replicated; same result as 1 device."""
  _case(runs, 'sharded_store')


def test_eight_devices_host_store_round(runs):
  _case(runs, 'host_round_on_mesh')


def test_eight_devices_aggregation_is_an_all_reduce(runs):
  _case(runs, 'aggregation_is_an_all_reduce')


def test_eight_devices_nonfinite_client_is_rejected(runs):
  _case(runs, 'guard')


def test_eight_devices_dp_round_adds_the_same_noise_as_one_device(runs):
  _case(runs, 'dp')


def test_eight_devices_errors_say_how_to_fix(runs):
  _case(runs, 'errors')


def test_two_processes_equal_single_process(runs):
  """FLoRAL on synthetic_linear over 2 processes x 1 CPU device (store split 5 + 5) equals 1 process, 1 device."""
  for name in ('process0', 'process1'):
    assert runs['codes'][name] == 0, f'{name} exited {runs["codes"][name]}:\n{runs["logs"][name]}'
  assert 'hold clients 0..4' in runs['logs']['process0'], runs['logs']['process0']
  assert 'hold clients 5..9' in runs['logs']['process1'], runs['logs']['process1']
  assert "2 devices over 2 processes, clients sharded P('clients',)" in runs['logs']['process0']
  ref_path = runs['dir'] / 'reference.npz'
  assert ref_path.exists(), runs['logs']['worker']
  got, ref = np.load(runs['dir'] / 'multihost.npz'), np.load(ref_path)
  assert sorted(got.files) == sorted(ref.files)
  assert any(k.startswith('clients') for k in got.files) and any(k.startswith('global') for k in got.files)
  for k in ref.files:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)


# In-process checks (one device).

def test_client_mesh_spans_all_devices():
  mesh = client_mesh()
  assert mesh.axis_names == ('clients',)
  assert mesh.shape['clients'] == jax.device_count()
  assert client_mesh(axis_name='k').axis_names == ('k',)
  with pytest.raises(ValueError, match='at least one device'):
    client_mesh([])


def test_unknown_axis_is_a_clear_error():
  mesh = client_mesh()
  with pytest.raises(ValueError, match=r"mesh has no axis 'batch'; its axes are \('clients',\)"):
    sharding.client_sharding(mesh, 'batch')
  with pytest.raises(ValueError, match="mesh has no axis 'batch'"):
    sharded_clients(mesh, axis_name='batch')


def test_shard_and_replicate_place_arrays():
  mesh = client_mesh()
  tree = {'a': np.arange(6.).reshape(2, 3), 'b': np.zeros((2,), np.int32)}
  sharded = sharding.shard_clients(tree, mesh)
  assert all(x.sharding == sharding.client_sharding(mesh) for x in jax.tree.leaves(sharded))
  rep = sharding.replicate(tree, mesh)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(rep))
  np.testing.assert_array_equal(sharding.fetch(sharded)['a'], tree['a'])
  assert sharding.process_local_rows(4, mesh) == slice(0, 4)
  with pytest.raises(ValueError, match=r"leaf \['s'\] is a scalar"):
    sharding.shard_clients({'s': np.float32(1)}, mesh)


def test_initialize_distributed_validates_arguments():
  with pytest.raises(ValueError, match="'host:port'"):
    initialize_distributed('localhost', 2, 0)
  with pytest.raises(ValueError, match=r'process_id must lie in \[0, 2\); got 2'):
    initialize_distributed('127.0.0.1:1234', 2, 2)
  with pytest.raises(ValueError, match='num_processes must be >= 1; got 0'):
    initialize_distributed('127.0.0.1:1234', 0, 0)
  with pytest.raises(ValueError, match="cpu_collectives must be 'gloo', 'mpi' or None; got 'nccl'"):
    initialize_distributed('127.0.0.1:1234', 2, 0, cpu_collectives='nccl')

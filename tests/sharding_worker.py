"""Checks of the sharded round that need several devices; run by tests/test_sharding.py in a subprocess.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX initializes, which a pytest process
that already imported JAX cannot do, hence the subprocess. Usage::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT.json [CASE ...]

Writes ``{case: {"ok": bool, "error": traceback or "", "seconds": float}}``; every case runs even if one fails.
With ``--reference PATH`` it also saves the 1-device result on synthetic_linear (10 clients, 8 per round, 3 rounds)
as ``multihost_demo.result_arrays`` does, for the multi-process test to compare with.
"""
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from fedjax_adapters.experiments import multihost_demo  # noqa: E402
from fedjax_adapters.data.federated import FederatedData  # noqa: E402
from fedjax_adapters.data.synthetic import synthetic_task  # noqa: E402
from fedjax_adapters.federated import host_store, sharding  # noqa: E402
from fedjax_adapters.federated.client_update import ClientOutput  # noqa: E402
from fedjax_adapters.federated import client_data, evaluate, make_round, sharded_clients  # noqa: E402
from run_helpers import count_traces  # noqa: E402  (this file's directory is on sys.path when run as a script)

TOL = dict(rtol=1e-5, atol=1e-5)
NUM_DEVICES = 8
M = 8  # clients per round
ROUNDS = 3


def floral():
  """FLoRAL as the multi-host demo builds it, so the 1-device reference here is also the demo's."""
  return multihost_demo.build(seed=0)[0]


def tiled(fd: FederatedData, k: int) -> FederatedData:
  """``k`` clients, client ``i`` a copy of client ``i mod K`` (so ``k`` can be a multiple of the device count)."""
  idx = np.arange(k) % fd.num_clients
  return FederatedData(fd.x[idx], fd.y[idx], fd.counts[idx])


def _np(x):
  if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(_np(x), _np(y), **TOL), a, b)


def assert_sharded(x, mesh, per_device_rows):
  """``x`` is split over all devices of ``mesh`` along its leading axis, ``per_device_rows`` rows each."""
  assert x.sharding.spec == P('clients'), x.sharding
  assert x.sharding.mesh.devices.size == NUM_DEVICES
  shards = x.addressable_shards
  assert len({s.device for s in shards}) == NUM_DEVICES, shards
  assert all(s.data.shape[0] == per_device_rows for s in shards), [s.data.shape for s in shards]


def assert_replicated(x):
  assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == NUM_DEVICES, x.sharding


_CACHE = {}


def reference(k):
  """The 1-device round (no mesh) on ``k`` clients: ``(alg, data, states per round, metrics per round)``."""
  if k not in _CACHE:
    alg = floral()
    data = client_data(tiled(synthetic_task('synthetic_linear', seed=0).train, k))
    round_fn = make_round(alg, clients_per_round=M)
    state = alg.init(jax.random.key(0), k)
    states, metrics = [], []
    for _ in range(ROUNDS):
      state, m = round_fn(state, data)
      states.append(state)
      metrics.append(m)
    _CACHE[k] = alg, data, states, metrics
  return _CACHE[k]


def run_like_reference(round_fn, state, data, ref_states, ref_metrics):
  """``ROUNDS`` rounds of ``round_fn``, each round's metrics and the final state equal to the 1-device reference."""
  for t in range(ROUNDS):
    state, metrics = round_fn(state, data)
    np.testing.assert_array_equal(metrics['client_ids'], ref_metrics[t]['client_ids'])
    assert_close(metrics, ref_metrics[t])
  assert_close(state, ref_states[-1])
  return state, metrics


def case_replicated_store():
  """synthetic_linear as is (K = 10 clients, which do not split over 8): store replicated, the 8 sampled sharded."""
  alg, data, ref_states, ref_metrics = reference(10)
  mesh = sharding.client_mesh()
  alg, traces = count_traces(alg)
  round_fn = make_round(alg, clients_per_round=M, mapping=sharded_clients(mesh, shard_store=False))
  state = alg.init(jax.random.key(0), 10)
  state, metrics = run_like_reference(round_fn, state, data, ref_states, ref_metrics)
  assert len(traces) == 1, traces
  assert_sharded(metrics['loss'], mesh, 1)
  for x in jax.tree.leaves((state.global_params, state.clients, state.agg_state)):
    assert_replicated(x)


def case_sharded_store():
  """K = 16 clients (synthetic_linear tiled): the store and data sharded, 2 clients per device."""
  alg, data, ref_states, ref_metrics = reference(16)
  mesh = sharding.client_mesh()
  round_fn = make_round(alg, clients_per_round=M, mapping=sharded_clients(mesh))
  state = alg.init(jax.random.key(0), 16)
  state, metrics = run_like_reference(round_fn, state, data, ref_states, ref_metrics)
  assert_sharded(state.clients['logits'], mesh, 2)
  assert_sharded(metrics['loss'], mesh, 1)
  for x in jax.tree.leaves(state.global_params):
    assert_replicated(x)
  # Evaluation runs on the sharded state as it is.
  test = client_data(tiled(synthetic_task('synthetic_linear', seed=0).test, 16))
  assert_close(evaluate(alg, state, test), evaluate(alg, ref_states[-1], test))


def case_host_round_on_mesh():
  """Host-memory store, the sampled clients sharded over the mesh: equals the 1-device device-store round."""
  alg, data, ref_states, ref_metrics = reference(10)
  mesh = sharding.client_mesh()
  state, store = host_store.host_init(alg, jax.random.key(0), 10)
  round_fn = host_store.make_host_round(alg, clients_per_round=M, mapping=sharded_clients(mesh))
  hdata = host_store.host_data(data)
  for t in range(ROUNDS):
    state, metrics = round_fn(state, store, hdata)
    assert_close(metrics, ref_metrics[t])
  assert_sharded(metrics['loss'], mesh, 1)
  assert_close(state.global_params, ref_states[-1].global_params)
  assert_close(store.tree, ref_states[-1].clients)


def case_aggregation_is_an_all_reduce():
  """FLoRAL's router-weighted mean over client-sharded outputs compiles to an all-reduce over the 8 devices."""
  alg, _, ref_states, _ = reference(10)
  mesh = sharding.client_mesh()
  g = ref_states[0].global_params
  stacked = jax.tree.map(lambda x: np.stack([np.asarray(x) * (1 + i) for i in range(M)]), g)
  probs = np.full((M, 2), 0.5, np.float32)
  outs = sharding.shard_clients(ClientOutput(stacked, np.ones(M, np.int32), {'router_probs': probs}), mesh)
  weights = sharding.shard_clients(np.arange(1, M + 1, dtype=np.float32), mesh)
  g, agg_state = sharding.replicate((g, ref_states[0].agg_state), mesh)
  agg = jax.jit(alg.aggregator.aggregate)
  hlo = agg.lower(g, outs, weights, agg_state).compile().as_text()
  assert 'all-reduce' in hlo, hlo
  new, _ = agg(g, outs, weights, agg_state)
  one, _ = jax.jit(alg.aggregator.aggregate)(*jax.device_get((g, outs, weights, agg_state)))
  assert_close(new, one)


def case_guard():
  """A NaN client on the mesh is rejected exactly as if masked out (the screen runs inside the sharded round)."""
  alg, data, _, _ = reference(16)
  bad = 5
  x = np.array(data.x)
  x[bad, 0] = np.nan
  data = data._replace(x=jax.numpy.asarray(x))
  mesh = sharding.client_mesh()
  round_fn = make_round(alg, clients_per_round=M, mapping=sharded_clients(mesh))
  state = alg.init(jax.random.key(0), 16)
  ids = np.arange(0, 16, 2)
  ids[2] = bad
  mask = ids != bad
  got, metrics = round_fn(state, data, client_ids=ids, client_mask=np.ones(M, bool))
  want, _ = round_fn(state, data, client_ids=ids, client_mask=mask)
  np.testing.assert_array_equal(metrics['rejected'], ~mask)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(got.global_params))
  assert_close(got, want)


def case_dp():
  """With user-level DP on, the sharded round adds the same noise (the server key) and equals the 1-device round."""
  from fedjax_adapters.federated import DPConfig, dp_aggregator  # pylint: disable=g-import-not-at-top
  alg, data, _, _ = reference(16)
  dp = alg.replace(aggregator=dp_aggregator(alg.aggregator, DPConfig(clip=0.1, noise_multiplier=1.0,
                                                                     expected_clients=M), mixture_keys=('adapters',)))
  state = dp.init(jax.random.key(0), 16)
  want, _ = make_round(dp, clients_per_round=M)(state, data)
  got, _ = make_round(dp, clients_per_round=M, mapping=sharded_clients(sharding.client_mesh()))(state, data)
  assert_close(got, want)
  plain, _ = make_round(alg, clients_per_round=M)(alg.init(jax.random.key(0), 16), data)
  assert not all(np.allclose(_np(a), _np(b)) for a, b in zip(jax.tree.leaves(plain.global_params),
                                                              jax.tree.leaves(got.global_params)))  # DP acted


def expect_error(fn, *needles):
  try:
    fn()
  except ValueError as e:
    for n in needles:
      assert n in str(e), f'{n!r} not in {str(e)!r}'
    return
  raise AssertionError(f'no ValueError (expected one mentioning {needles})')


def case_errors():
  alg = floral()
  mesh = sharding.client_mesh()
  assert jax.device_count() == NUM_DEVICES
  expect_error(lambda: make_round(alg, clients_per_round=6, mapping=sharded_clients(mesh)),
               'clients_per_round=6', '8 devices', "'clients'", 'clients_per_round=8', '2 padding slots',
               'client_mask')
  expect_error(lambda: sharded_clients(mesh, axis_name='batch'),
               "no axis 'batch'", "('clients',)")
  expect_error(lambda: host_store.make_host_round(alg, clients_per_round=12, mapping=sharded_clients(mesh)), 'clients_per_round=16')
  data = client_data(synthetic_task('synthetic_linear', seed=0).train)
  round_fn = make_round(alg, clients_per_round=8, mapping=sharded_clients(mesh))
  expect_error(lambda: round_fn(alg.init(jax.random.key(0), 10), data),
               'client store', '10 clients', '8 devices', 'pad to 16')
  expect_error(lambda: sharding.shard_clients({'w': np.zeros((12, 3))}, mesh), "['w']", '12 clients', 'pad to 16')
  expect_error(lambda: make_round(alg, clients_per_round=8, mapping='sharded'), 'mapping must be a ClientMapping')


CASES = {name[len('case_'):]: fn for name, fn in globals().items() if name.startswith('case_')}


def main(out, names, reference_path=None):
  results = {}
  if reference_path:
    np.savez(reference_path, **multihost_demo.result_arrays(reference(10)[2][-1]))
  for name in names or CASES:
    t0 = time.time()
    try:
      CASES[name]()
      results[name] = {'ok': True, 'error': ''}
    except Exception:  # reported to the test, which fails with the traceback
      results[name] = {'ok': False, 'error': traceback.format_exc()}
    results[name]['seconds'] = round(time.time() - t0, 2)
  with open(out, 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  args = sys.argv[1:]
  ref = None
  if '--reference' in args:
    i = args.index('--reference')
    ref = args[i + 1]
    del args[i:i + 2]
  main(args[0], args[1:], ref)

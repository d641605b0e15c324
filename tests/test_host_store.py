"""Host-memory client store: same result as the device store, a 100,000-client population, memmaps, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.data.synthetic import synthetic_task
from fedjax_adapters.federated.host_store import HostClientStore, evaluate_host, host_data, host_init, make_host_round
from fedjax_adapters.federated import client_data, evaluate, make_round

TOL = dict(rtol=1e-5, atol=1e-6)


def linear(rngs):
  return nnx.Sequential(nnx.Linear(10, 3, rngs=rngs))


def uneven_linear_task():
  """synthetic_linear with clients of 1..6 training rows (uneven, padded to 6)."""
  ds = synthetic_task('synthetic_linear', seed=3)
  xs, ys = [], []
  for k in range(ds.train.num_clients):
    x, y = ds.train.client(k)
    xs.append(x[:1 + k % 6]); ys.append(y[:1 + k % 6])
  return ds._replace(train=stack_clients(xs, ys))


ALGS = {
    'floral': lambda: algorithms.floral(linear, num_adaptors=2, loss='mse', lr=0.1, batch_size=2, rank=1),
    'local_adaptor': lambda: algorithms.local_adaptor(linear, loss='mse', lr=0.1, batch_size=2, rank=1),
}


@functools.lru_cache(maxsize=None)
def alg_and_rounds(name, m=4):
  """One algorithm object and its compiled rounds per (name, M), shared by the tests (compile once)."""
  alg = ALGS[name]()
  return alg, make_round(alg, clients_per_round=m), make_host_round(alg, clients_per_round=m)


def _np(x):
  if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def assert_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(_np(x), _np(y), **(tol or TOL)), a, b)


@pytest.mark.parametrize('name', sorted(ALGS))
def test_host_round_equals_device_round(name):
  """Same key => same sampled clients, same global params and the same per-client state, round after round."""
  ds = uneven_linear_task()
  alg, device_round, host_round = alg_and_rounds(name)
  k = ds.train.num_clients
  dev = alg.init(jax.random.key(0), k)
  host_state, store = host_init(alg, jax.random.key(0), k)
  assert_close(host_state._replace(clients=dev.clients), dev, rtol=0, atol=0)
  assert_close(store.tree, dev.clients, rtol=0, atol=0)
  data = host_data(ds.train)
  for _ in range(3):
    dev, m_d = device_round(dev, client_data(ds.train))
    host_state, m_h = host_round(host_state, store, data)
    np.testing.assert_array_equal(m_d['client_ids'], m_h['client_ids'])
    assert_close(m_d, m_h)
  assert_close(host_state.global_params, dev.global_params)
  assert_close(store.tree, dev.clients)
  assert int(host_state.round) == 3
  if name == 'floral':  # chunked evaluation (last chunk padded) equals the device evaluation
    assert_close(evaluate_host(alg, host_state, store, ds.test, chunk_size=4), evaluate(alg, dev, ds.test))


def test_host_round_padding_slots_write_nothing():
  ds = uneven_linear_task()
  alg, _, round_fn = alg_and_rounds('floral')
  state, store = host_init(alg, jax.random.key(1), ds.train.num_clients)
  before = np.array(store.tree['logits'])
  state, _ = round_fn(state, store, ds.train, client_ids=np.array([2, 5, 2, 5]),
                      client_mask=np.array([True, True, False, False]))
  changed = np.flatnonzero(np.any(store.tree['logits'] != before, axis=1))
  np.testing.assert_array_equal(changed, [2, 5])


def population(num_clients, rows=6, seed=0):
  """Clustered linear regression for a large population: ``[K, rows, 10] -> [K, rows, 3]``, 1..rows real rows."""
  rng = np.random.default_rng(seed)
  w = rng.normal(0, 0.3, (2, 10, 3)).astype(np.float32)
  x = rng.standard_normal((num_clients, rows, 10), dtype=np.float32)
  y = np.einsum('knd,kdo->kno', x, w[np.arange(num_clients) % 2])
  counts = rng.integers(1, rows + 1, num_clients).astype(np.int32)
  x *= (np.arange(rows) < counts[:, None])[..., None]
  y *= (np.arange(rows) < counts[:, None])[..., None]
  return host_data((x, y, counts))


@pytest.mark.parametrize('name', sorted(ALGS))
def test_hundred_thousand_clients_keep_only_the_sampled_ones_on_device(name, monkeypatch):
  # FLoRAL: C router logits per client; Local Adaptor: a rank-1 LoRA (+ bias adaptor) per client. Rows and M match
  # the small tests, so the compiled inner round is shared: it does not depend on K.
  k, m = 100_000, 4
  alg, _, round_fn = alg_and_rounds(name, m)
  data = population(k)
  state, store = host_init(alg, jax.random.key(0), k)
  assert store.num_clients == k
  before = jax.tree.map(np.array, store.tree)
  shapes = []
  gather = HostClientStore.gather

  def spy(self, ids, **kw):
    out = gather(self, ids, **kw)
    shapes.extend(x.shape for x in jax.tree.leaves(out))
    return out

  monkeypatch.setattr(HostClientStore, 'gather', spy)
  sampled = []
  for _ in range(2):
    state, metrics = round_fn(state, store, data)
    sampled.append(np.asarray(metrics['client_ids']))
    assert metrics['loss'].shape == (m,)
  # Only M clients ever went to the device, and nothing of population size lives there.
  assert shapes and all(s[0] == m for s in shapes)
  # (Checked by the client axis, not by size: other test files in the same worker may keep large model arrays alive.)
  assert not any(x.shape[:1] == (k,) for x in jax.live_arrays()), [x.shape for x in jax.live_arrays()
                                                                    if x.shape[:1] == (k,)]
  # Exactly the sampled clients changed on the host.
  ids = np.union1d(*sampled)
  changed = np.zeros(k, bool)
  for new, old in zip(jax.tree.leaves(store.tree), jax.tree.leaves(before)):
    changed |= np.any((new != old).reshape(k, -1), axis=1)
  assert set(np.flatnonzero(changed)) <= set(ids.tolist())
  assert changed.sum() >= m  # every sampled client trained
  assert int(state.round) == 2


def test_memmap_store_persists(tmp_path):
  ds = uneven_linear_task()
  alg, device_round, host_round = alg_and_rounds('local_adaptor')
  k = ds.train.num_clients
  state, store = host_init(alg, jax.random.key(0), k, path=tmp_path / 'pop')
  assert all(isinstance(x, np.memmap) for x in jax.tree.leaves(store.tree))
  state, metrics = host_round(state, store, ds.train)
  store.flush()
  template = jax.tree.map(lambda x: x[0], store.tree)
  reopened = HostClientStore.open(tmp_path / 'pop', template)
  assert_close(reopened.tree, store.tree, rtol=0, atol=0)
  # What was written to disk equals the same round on an in-RAM store.
  ram_state, ram = host_init(alg, jax.random.key(0), k)
  host_round(ram_state, ram, ds.train)
  assert_close(reopened.tree, ram.tree, rtol=0, atol=0)
  fresh = host_init(alg, jax.random.key(0), k)[1].tree
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(reopened.tree), jax.tree.leaves(fresh)))


def test_host_store_errors():
  store = HostClientStore({'a': np.zeros((5, 2), np.float32)})
  with pytest.raises(ValueError, match=r'client ids \[5, -1\] are out of range for 5 clients'):
    store.gather(np.array([5, -1, 0]))
  with pytest.raises(ValueError, match='disagree on the number of clients'):
    HostClientStore({'a': np.zeros((5, 2)), 'b': np.zeros((4,))})
  with pytest.raises(ValueError, match='numpy arrays'):
    HostClientStore({'a': jnp.zeros((5, 2))})
  with pytest.raises(ValueError, match='expected \\[2, 2\\]'):
    store.scatter(np.array([0, 1]), {'a': np.zeros((2, 3))})
  with pytest.raises(ValueError, match='no client store file'):
    HostClientStore.open('/nonexistent-dir', {'a': np.zeros(2)})
  ds = uneven_linear_task()
  oracle = algorithms.floral(linear, num_adaptors=2, loss='mse', lr=0.1, batch_size=2,
                             oracle_clusters=ds.clusters)
  with pytest.raises(ValueError, match='host_init builds the population'):
    host_init(oracle, jax.random.key(0), ds.train.num_clients)
  alg, _, round_fn = alg_and_rounds('floral')
  state, store = host_init(alg, jax.random.key(0), 10)
  with pytest.raises(ValueError, match='data holds 7 clients but the client store holds 10'):
    round_fn(state, store, jax.tree.map(lambda a: a[:7], ds.train))
  with pytest.raises(ValueError, match='clients=\\(\\)'):
    round_fn(state._replace(clients=store.tree), store, ds.train)
  with pytest.raises(ValueError, match='clients_per_round=4'):
    round_fn(state, store, ds.train, client_ids=np.array([0, 1]))

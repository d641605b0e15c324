"""The federated engine: vmapped round vs sequential loop, aggregation by hand, compile count, seeds, checkpoints."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_adapters import algorithms, checkpoint
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.data.synthetic import synthetic_task
from fedjax_adapters.federated import aggregators, client_store
from fedjax_adapters.federated.client_update import ClientData, ClientOutput, make_client_update
from fedjax_adapters.federated import (chunked_clients, client_data, evaluate, make_round, run_rounds,
                                      sequential_clients, vmap_clients)
from fedjax_adapters.federated.sampling import clients_per_round, sample_clients
from run_helpers import count_traces

TOL = dict(rtol=1e-5, atol=1e-6)


def mlp(rngs):
  return nnx.Sequential(nnx.Linear(10, 6, rngs=rngs), jax.nn.relu, nnx.Linear(6, 3, rngs=rngs))


def uneven_linear_task():
  """synthetic_linear with clients of 1..6 training rows (uneven, padded to 6)."""
  ds = synthetic_task('synthetic_linear', seed=3)
  xs, ys = [], []
  for k in range(ds.train.num_clients):
    x, y = ds.train.client(k)
    n = 1 + k % 6
    xs.append(x[:n]); ys.append(y[:n])
  return ds._replace(train=stack_clients(xs, ys))


def _np(x):
  if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def assert_trees_close(a, b, **tol):
  tol = tol or TOL
  jax.tree.map(lambda x, y: np.testing.assert_allclose(_np(x), _np(y), **tol), a, b)


ALGS = {
    'fedavg': lambda ds: algorithms.fedavg(mlp, loss='mse', lr=0.05, batch_size=2),
    'local_adaptor': lambda ds: algorithms.local_adaptor(mlp, loss='mse', lr=0.05, batch_size=2, rank=2),
    'floral': lambda ds: algorithms.floral(mlp, num_adaptors=2, loss='mse', lr=0.05, batch_size=2, rank=2),
    'ensemble': lambda ds: algorithms.ensemble(mlp, num_members=2, loss='mse', lr=0.05, batch_size=2),
}


@pytest.mark.parametrize('name', sorted(ALGS))
def test_vmap_round_equals_sequential_loop(name):
  ds = uneven_linear_task()
  alg = ALGS[name](ds)
  data = client_data(ds.train)
  k = ds.train.num_clients
  s_v = s_s = alg.init(jax.random.key(0), k)
  vmap_round = make_round(alg, clients_per_round=6, mapping=vmap_clients())
  seq_round = make_round(alg, clients_per_round=6, mapping=sequential_clients())
  for _ in range(3):
    s_v, m_v = vmap_round(s_v, data)
    s_s, m_s = seq_round(s_s, data)
    np.testing.assert_array_equal(m_v['client_ids'], m_s['client_ids'])
  assert_trees_close(s_v, s_s)
  assert int(s_v.round) == 3


def floral_setup(seed):
  """FLoRAL on the uneven linear task: ``(dataset, algorithm, training ClientData, initial state from seed)``."""
  ds = uneven_linear_task()
  alg = ALGS['floral'](ds)
  return ds, alg, client_data(ds.train), alg.init(jax.random.key(seed), ds.train.num_clients)


def test_chunked_client_map_equals_full_vmap():
  ds, alg, data, state = floral_setup(0)
  full = make_round(alg, clients_per_round=6)
  want, m_want = full(state, data)
  for chunk in (1, 4):  # 4 does not divide 6: lax.map runs the remainder as its own chunk
    got, m_got = make_round(alg, clients_per_round=6, mapping=chunked_clients(chunk))(state, data)
    assert_trees_close(got, want)
    np.testing.assert_array_equal(m_got['client_ids'], m_want['client_ids'])
  with pytest.raises(ValueError, match='chunk size >= 1; got 0'):
    chunked_clients(0)
  with pytest.raises(ValueError, match='mapping must be a ClientMapping'):
    make_round(alg, clients_per_round=6, mapping='sequential')


def test_padded_clients_change_nothing():
  """Padding slots (mask False) repeat a real id, train, but neither weigh in nor write back."""
  ds, alg, data, state = floral_setup(1)
  plain = make_round(alg, clients_per_round=3)
  padded = make_round(alg, clients_per_round=5)
  ids = jnp.array([1, 4, 7])
  s1, _ = plain(state, data, client_ids=ids)
  s2, _ = padded(state, data, client_ids=jnp.array([1, 4, 7, 1, 4]),
                 client_mask=jnp.array([True, True, True, False, False]))
  assert_trees_close(s1, s2)
  # Clients that were not sampled keep their state exactly.
  untouched = np.setdiff1d(np.arange(ds.train.num_clients), ids)
  np.testing.assert_array_equal(s1.clients['logits'][untouched], state.clients['logits'][untouched])


def test_padded_steps_change_nothing():
  """A client with zero rows returns its inputs unchanged (no optimizer step on padding)."""
  ds = uneven_linear_task()
  alg = ALGS['floral'](ds)
  state = alg.init(jax.random.key(2), ds.train.num_clients)
  x, y = ds.train.x[0], ds.train.y[0]
  out, new_local, metrics = jax.jit(alg.client_update)(
      state.frozen, state.global_params, jax.tree.map(lambda a: a[0], state.clients),
      ClientData(jnp.asarray(x), jnp.asarray(y), jnp.array(0)), jax.random.key(0))
  assert_trees_close(out.params, state.global_params, rtol=0, atol=0)
  assert_trees_close(new_local, jax.tree.map(lambda a: a[0], state.clients), rtol=0, atol=0)
  assert float(metrics['count']) == 0


def test_client_update_equals_hand_sgd_loop():
  """Masked batches over uneven rows equal plain SGD on the real rows, batch by batch."""
  w0 = {'w': jnp.array([[0.5], [-1.0]]), 'b': jnp.array([0.1])}
  x = jnp.array([[1., 2.], [0., 1.], [3., -1.], [2., 2.], [0., 0.]])
  y = jnp.array([[1.], [0.], [2.], [1.], [0.]])
  count = 3  # rows 3, 4 are padding

  def predict(p, xb):
    return xb @ p['w'] + p['b']

  def loss_fn(trainable, frozen, batch, key, anchor, client):
    g, _ = trainable
    err = jnp.sum(jnp.square(predict(g, batch.x) - batch.y), -1)
    m = batch.mask.astype(jnp.float32)
    return jnp.sum(err * m) / jnp.maximum(m.sum(), 1), ({'count': m.sum()}, {})

  cu = make_client_update(loss_fn, optax.sgd(0.1), batch_size=2, num_epochs=2, train='global')
  out, _, metrics = jax.jit(cu)({}, w0, {}, ClientData(x, y, jnp.array(count)), jax.random.key(0))
  p = w0
  for _ in range(2):
    for rows in ([0, 1], [2]):
      g = jax.grad(lambda q: jnp.mean(jnp.sum(jnp.square(predict(q, x[jnp.array(rows)]) - y[jnp.array(rows)]), -1)))(p)
      p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
  assert_trees_close(out.params, p)
  assert float(metrics['count']) == 2 * count
  assert int(out.num_examples) == count


def test_fedavg_aggregator_equals_hand_weighted_mean():
  rng = np.random.default_rng(0)
  stacked = {'w': rng.normal(size=(4, 3, 2)).astype(np.float32), 'b': rng.normal(size=(4, 2)).astype(np.float32)}
  prev = {'w': np.zeros((3, 2), np.float32), 'b': np.zeros((2,), np.float32)}
  weights = np.array([3., 1., 0., 6.], np.float32)
  agg = aggregators.mean_aggregator()
  new, _ = agg.aggregate(prev, ClientOutput(stacked, weights), jnp.asarray(weights), agg.init(prev))
  for k in stacked:
    hand = sum(weights[i] * stacked[k][i] for i in range(4)) / weights.sum()
    np.testing.assert_allclose(new[k], hand, **TOL)


def test_router_weighted_aggregator_equals_hand_computation():
  rng = np.random.default_rng(1)
  m, c = 5, 3
  stacked = {'base': {'w': rng.normal(size=(m, 4)).astype(np.float32)},
             'adapters': {'a': rng.normal(size=(m, c, 4, 2)).astype(np.float32)}}
  prev = jax.tree.map(lambda x: np.zeros(x.shape[1:], np.float32), stacked)
  n = np.array([10., 20., 5., 0., 15.], np.float32)
  logits = rng.normal(size=(m, c)).astype(np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  agg = aggregators.router_aggregator(('adapters',))
  new, _ = agg.aggregate(prev, ClientOutput(stacked, n, {'router_probs': jnp.asarray(probs)}), jnp.asarray(n),
                         agg.init(prev))
  p_k = n / n.sum()
  np.testing.assert_allclose(new['base']['w'], np.einsum('k,kd->d', p_k, stacked['base']['w']), **TOL)
  for ci in range(c):
    q = p_k * probs[:, ci]
    p_kc = q / q.sum()
    hand = np.einsum('k,kij->ij', p_kc, stacked['adapters']['a'][:, ci])
    np.testing.assert_allclose(new['adapters']['a'][ci], hand, **TOL)


def test_router_weighted_rejects_wrong_probs_shape():
  agg = aggregators.router_aggregator(('adapters',))
  prev = {'adapters': {'a': np.zeros((2, 3), np.float32)}}
  stacked = {'adapters': {'a': np.zeros((4, 2, 3), np.float32)}}
  with pytest.raises(ValueError, match='router probabilities'):
    agg.aggregate(prev, ClientOutput(stacked, jnp.ones(4), {'router_probs': jnp.ones((3, 2))}), jnp.ones(4), ())


def test_server_optimizer_matches_hand_applied_optax():
  """FedOpt: the server optimizer steps on the pseudo-gradient prev - mean, round after round."""
  opt = optax.adam(0.1)
  agg = aggregators.mean_aggregator(opt)
  rng = np.random.default_rng(2)
  params = {'w': jnp.ones((3,))}
  state = agg.init(params)
  hand_p, hand_s = params, opt.init(params)
  for _ in range(4):
    stacked = {'w': jnp.asarray(rng.normal(size=(2, 3)).astype(np.float32))}
    weights = jnp.array([1., 3.])
    params, state = agg.aggregate(params, ClientOutput(stacked, weights), weights, state)
    mean = (stacked['w'][0] * 1 + stacked['w'][1] * 3) / 4
    upd, hand_s = opt.update({'w': hand_p['w'] - mean}, hand_s, hand_p)
    hand_p = optax.apply_updates(hand_p, upd)
  assert_trees_close(params, hand_p)


def test_three_rounds_compile_once():
  ds = uneven_linear_task()
  alg, traces = count_traces(ALGS['floral'](ds))
  round_fn = make_round(alg, clients_per_round=4)
  state = alg.init(jax.random.key(0), ds.train.num_clients)
  data = client_data(ds.train)
  for _ in range(3):
    state, _ = round_fn(state, data)
  assert len(traces) == 1
  assert round_fn.compiled._cache_size() == 1


def test_run_rounds_equals_round_by_round_and_compiles_once():
  ds = uneven_linear_task()
  alg, traces = count_traces(ALGS['floral'](ds))
  data = client_data(ds.train)
  round_fn = make_round(alg, clients_per_round=4)
  state = alg.init(jax.random.key(0), ds.train.num_clients)
  s_loop = state
  history = []
  for _ in range(3):
    s_loop, m = round_fn(s_loop, data)
    history.append(m)
  s_scan, m_scan = run_rounds(round_fn, state, data, 3)
  s_scan, m_more = run_rounds(round_fn, s_scan, data, 3)  # the cached loop: no new trace
  for _ in range(3):
    s_loop, _ = round_fn(s_loop, data)
  assert_trees_close(s_scan, s_loop)
  assert int(s_scan.round) == 6
  np.testing.assert_array_equal(m_scan['client_ids'], np.stack([h['client_ids'] for h in history]))
  assert len(traces) == 1  # the loop reuses the round's trace
  assert round_fn._loops[3]._cache_size() == 1
  with pytest.raises(ValueError, match='num_rounds must be >= 1; got 0'):
    run_rounds(round_fn, state, data, 0)
  seq = make_round(alg, clients_per_round=4, mapping=sequential_clients())
  s_seq, m_seq = run_rounds(seq, state, data, 3)
  assert_trees_close(s_seq, run_rounds(round_fn, state, data, 3)[0])
  assert m_seq['client_ids'].shape == (3, 4)


def test_same_seed_same_result_and_different_seed_differs():
  ds = uneven_linear_task()
  alg = ALGS['floral'](ds)
  data = client_data(ds.train)
  round_fn = make_round(alg, clients_per_round=4)

  def run(seed):
    s = alg.init(jax.random.key(seed), ds.train.num_clients)
    for _ in range(3):
      s, m = round_fn(s, data)
    return s

  a, b, c = run(0), run(0), run(1)
  assert_trees_close(a, b, rtol=0, atol=0)
  assert not np.allclose(a.clients['logits'], c.clients['logits'])


def test_checkpoint_restore_continues_identically(tmp_path):
  ds = uneven_linear_task()
  alg = ALGS['floral'](ds)
  data = client_data(ds.train)
  round_fn = make_round(alg, clients_per_round=4)
  s = alg.init(jax.random.key(0), ds.train.num_clients)
  for _ in range(2):
    s, _ = round_fn(s, data)
  checkpoint.save(tmp_path / 'ckpt', s)
  restored = checkpoint.restore(tmp_path / 'ckpt', like=s)
  a, b = s, restored
  for _ in range(2):
    a, _ = round_fn(a, data)
    b, _ = round_fn(b, data)
  assert_trees_close(a, b, rtol=0, atol=0)
  with pytest.raises(ValueError, match='already exists'):
    checkpoint.save(tmp_path / 'ckpt', s)


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
  state = {'w': jnp.ones((3,)), 'n': jnp.zeros((), jnp.int32)}
  checkpoint.save(tmp_path / 'c', state)
  with pytest.raises(ValueError, match='could not be restored'):
    checkpoint.restore(tmp_path / 'c', like={'w': jnp.ones((4,)), 'n': jnp.zeros((), jnp.int32)})
  with pytest.raises(ValueError, match='no checkpoint'):
    checkpoint.restore(tmp_path / 'missing', like=state)
  for f in (tmp_path / 'c').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  with pytest.raises(ValueError, match='could not be restored'):
    checkpoint.restore(tmp_path / 'c', like=state)


def test_evaluate_is_per_client_sums():
  ds = uneven_linear_task()
  alg = ALGS['fedavg'](ds)
  state = alg.init(jax.random.key(0), ds.train.num_clients)
  m = evaluate(alg, state, ds.test)
  np.testing.assert_array_equal(m['count'], ds.test.counts)
  assert m['loss'].shape == (ds.test.num_clients,)


def test_sampling_is_seeded_distinct_and_sized():
  assert clients_per_round(300, 0.1) == 30
  assert clients_per_round(10, 1.0) == 10
  ids = sample_clients(jax.random.key(0), 300, 30)
  assert len(set(np.asarray(ids).tolist())) == 30
  np.testing.assert_array_equal(ids, sample_clients(jax.random.key(0), 300, 30))
  assert not np.array_equal(ids, sample_clients(jax.random.key(1), 300, 30))
  for bad in (0.0, -0.5, 1.5):
    with pytest.raises(ValueError, match=str(bad)):
      clients_per_round(10, bad)


def test_bad_client_ids_and_mismatched_counts_are_clear_errors():
  ds = uneven_linear_task()
  alg = ALGS['floral'](ds)
  state = alg.init(jax.random.key(0), ds.train.num_clients)
  round_fn = make_round(alg, clients_per_round=2)
  data = client_data(ds.train)
  with pytest.raises(ValueError, match=r'client ids \[10, -1\] are out of range for 10 clients'):
    round_fn(state, data, client_ids=jnp.array([10, -1]))
  short = jax.tree.map(lambda a: a[:7], data)
  with pytest.raises(ValueError, match='data holds 7 clients but the client store holds 10'):
    round_fn(state, short)
  with pytest.raises(ValueError, match='out of range'):
    client_store.check_client_ids([0, 12], 10)


def test_oracle_clusters_validated():
  with pytest.raises(ValueError, match='oracle clusters must lie in'):
    alg = algorithms.floral(mlp, num_adaptors=2, loss='mse', lr=0.1, batch_size=2,
                            oracle_clusters=np.array([0, 1, 2, 0]))
    alg.init(jax.random.key(0), 4)


def test_scatter_drops_masked_duplicates():
  store = {'v': jnp.zeros((4,))}
  out = client_store.scatter(store, jnp.array([1, 1]), {'v': jnp.array([5., 9.])}, jnp.array([True, False]))
  np.testing.assert_array_equal(out['v'], [0, 5, 0, 0])

"""Non-finite client updates never reach the server state: every algorithm, every client mapping, the host store."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.nn import AdapterSpec
from fedjax_adapters.federated.guard import update_norms
from fedjax_adapters.federated import (REJECT_REASONS, UpdateGuard, chunked_clients, client_data, host_store,
                                       make_round, sequential_clients, vmap_clients)

K, M = 6, 3
IDS = np.array([1, 2, 4])   # the round's clients; client 2 is the bad one
BAD = 2


def mlp(rngs):
  return nnx.Sequential(nnx.Linear(4, 5, rngs=rngs), jax.nn.relu, nnx.Linear(5, 2, rngs=rngs))


ALGS = {
    'fedavg': lambda: algorithms.fedavg(mlp, loss='mse', lr=0.05, batch_size=2),
    'local_adaptor': lambda: algorithms.local_adaptor(mlp, loss='mse', lr=0.05, batch_size=2, rank=1),
    'floral': lambda: algorithms.floral(mlp, num_adaptors=2, loss='mse', lr=0.05, batch_size=2, rank=1),
    'ensemble': lambda: algorithms.ensemble(mlp, num_members=2, loss='mse', lr=0.05, batch_size=2),
    'lora_fedavg': lambda: algorithms.lora_fedavg(mlp, loss='mse', lr=0.05, batch_size=2, spec=AdapterSpec(rank=1)),
}
_ALG_CACHE = {}
_ROUNDS = {}


def alg_of(name):
  if name not in _ALG_CACHE:
    _ALG_CACHE[name] = ALGS[name]()
  return _ALG_CACHE[name]


def round_of(name, mapping_name):
  key = (name, mapping_name)
  if key not in _ROUNDS:
    mapping = {'vmap': vmap_clients(), 'chunked': chunked_clients(1), 'sequential': sequential_clients()}[mapping_name]
    _ROUNDS[key] = make_round(alg_of(name), clients_per_round=M, mapping=mapping)
  return _ROUNDS[key]


def population(fault: str | None):
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(4, 4)).astype(np.float32) for _ in range(K)]
  ys = [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(K)]
  if fault == 'nan':
    xs[BAD][1, 2] = np.nan
  elif fault == 'inf':
    ys[BAD][0, 0] = np.inf
  elif fault == 'diverge':
    xs[BAD] *= 1e6  # SGD at lr 0.05 on inputs this large overflows float32 within the client's two steps
  return client_data(stack_clients(xs, ys))


def finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


def _np(x):
  return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(_np(x), _np(y)), a, b)


# Every algorithm on the default mapping; the other mappings on the two aggregators (FedAvg's mean, FLoRAL's
# router-weighted per-adaptor mean). The mesh mapping is checked in tests/sharding_worker.py (case 'guard').
CASES = [(name, 'vmap') for name in sorted(ALGS)] + [(name, m) for name in ('fedavg', 'floral')
                                                     for m in ('chunked', 'sequential')]


@pytest.mark.parametrize('name,mapping_name', CASES)
def test_a_faulty_client_is_rejected_exactly_as_if_masked_out(name, mapping_name):
  alg, round_fn = alg_of(name), round_of(name, mapping_name)
  state = alg.init(jax.random.key(0), K)
  masked = np.array([True, False, True])
  for fault in ('nan', 'inf', 'diverge'):
    data = population(fault)
    got, metrics = round_fn(state, data, client_ids=IDS, client_mask=np.ones(M, bool))
    want, _ = round_fn(state, data, client_ids=IDS, client_mask=masked)
    assert finite(got.global_params) and finite(got.clients), (name, fault)
    np.testing.assert_array_equal(metrics['rejected'], [False, True, False])
    reason = REJECT_REASONS[int(metrics['reject_reason'][1])]
    assert reason in ('nonfinite_update', 'nonfinite_loss', 'nonfinite_client_state'), reason
    assert_same(got, want)
    # The rejected client's own state is what it was before the round.
    assert_same(jax.tree.map(lambda x: x[BAD], got.clients), jax.tree.map(lambda x: x[BAD], state.clients))


@pytest.mark.parametrize('name', ['floral', 'local_adaptor'])
def test_host_store_round_rejects_like_the_device_round(name):
  alg = alg_of(name)
  data = population('nan')
  device_state = alg.init(jax.random.key(0), K)
  want, m_want = round_of(name, 'vmap')(device_state, data, client_ids=IDS, client_mask=np.ones(M, bool))
  state, store = host_store.host_init(alg, jax.random.key(0), K)
  got, m_got = host_store.make_host_round(alg, clients_per_round=M)(state, store, host_store.host_data(data),
                                                                    client_ids=IDS)
  np.testing.assert_array_equal(m_got['rejected'], m_want['rejected'])
  assert_same(got.global_params, want.global_params)
  assert_same(store.tree, want.clients)


def test_all_clients_rejected_leaves_the_global_state_unchanged():
  alg = alg_of('floral')
  rng = np.random.default_rng(1)
  xs = [np.full((4, 4), np.nan, np.float32) for _ in range(K)]
  data = client_data(stack_clients(xs, [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(K)]))
  state = alg.init(jax.random.key(0), K)
  new, metrics = round_of('floral', 'vmap')(state, data)
  assert bool(jnp.all(metrics['rejected']))
  assert_same(new.global_params, state.global_params)
  assert_same(new.agg_state, state.agg_state)
  assert_same(new.clients, state.clients)
  assert int(new.round) == 1


def test_server_adam_state_is_untouched_when_everyone_is_rejected():
  base = algorithms.fedavg(mlp, loss='mse', lr=0.05, batch_size=2, server_optimizer=optax.adam(0.1))
  round_fn = make_round(base, clients_per_round=M)
  good, bad = population(None), jax.tree.map(lambda x: x, population(None))
  bad = bad._replace(x=jnp.full_like(bad.x, jnp.nan))
  s, _ = round_fn(base.init(jax.random.key(0), K), good)  # the Adam moments are now nonzero
  s2, m = round_fn(s, bad)
  assert bool(jnp.all(m['rejected']))
  assert_same((s2.global_params, s2.agg_state), (s.global_params, s.agg_state))


def test_opting_out_lets_the_nan_through():
  alg = alg_of('fedavg')
  round_fn = make_round(alg, clients_per_round=M, guard=UpdateGuard(reject_nonfinite=False))
  new, metrics = round_fn(alg.init(jax.random.key(0), K), population('nan'), client_ids=IDS)
  assert not bool(jnp.any(metrics['rejected']))
  assert not finite(new.global_params)


def test_update_norms_equal_the_dense_formula_leaf_shapes_and_dtypes_mixed():
  rng = np.random.default_rng(1)
  g = {'w': rng.normal(size=(3, 2, 4)), 'b': rng.normal(size=()), 'h': rng.normal(size=(5,)), 'step': np.int32(3)}
  stacked = {'w': g['w'] + rng.normal(size=(4, 3, 2, 4)), 'b': g['b'] + rng.normal(size=(4,)),
             'h': g['h'] + rng.normal(size=(4, 5)), 'step': np.full((4,), 7, np.int32)}
  as32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if x.dtype == np.float64 else jnp.asarray(x), t)
  got = np.asarray(jax.jit(update_norms)(as32(stacked), as32(g)))
  want = np.sqrt(sum(((stacked[k] - g[k]) ** 2).reshape(4, -1).sum(1) for k in ('w', 'b', 'h')))  # ints skipped
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_norm_bound_clips_or_rejects_long_updates():
  alg = alg_of('fedavg')
  state = alg.init(jax.random.key(0), K)
  data = population(None)
  free, m_free = make_round(alg, clients_per_round=M)(state, data, client_ids=IDS)
  norms = np.asarray(m_free['update_norm'])
  dense = [np.sqrt(sum(np.sum((np.asarray(p, np.float64) - np.asarray(g, np.float64)) ** 2) for p, g in
                       zip(jax.tree.leaves(client_params(alg, state, data, i)), jax.tree.leaves(state.global_params))))
           for i in IDS]
  np.testing.assert_allclose(norms, dense, rtol=1e-5)  # ||params_i - global_params||_2 over every leaf
  bound = float(np.median(norms))  # one client above, one at, one below
  clip, m_clip = make_round(alg, clients_per_round=M, guard=UpdateGuard(max_update_norm=bound))(
      state, data, client_ids=IDS)
  np.testing.assert_allclose(m_clip['update_norm'], norms, rtol=1e-6)  # the norms reported are before clipping
  # By hand: each update scaled to min(1, bound / norm), then the example-weighted mean (equal counts here).
  scale = np.minimum(1.0, bound / norms)
  stacked = [jax.tree.map(lambda g, p: g + s * (p - g), state.global_params, client_params(alg, state, data, i))
             for i, s in zip(IDS, scale)]
  hand = jax.tree.map(lambda *xs: sum(xs) / len(xs), *stacked)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), clip.global_params, hand)
  rej, m_rej = make_round(alg, clients_per_round=M, guard=UpdateGuard(max_update_norm=bound, norm_action='reject'))(
      state, data, client_ids=IDS)
  np.testing.assert_array_equal(m_rej['rejected'], norms > bound)
  assert {REJECT_REASONS[int(r)] for r, x in zip(m_rej['reject_reason'], norms > bound) if x} == {'update_norm'}
  with pytest.raises(ValueError, match='norm_action'):
    make_round(alg, clients_per_round=M, guard=UpdateGuard(max_update_norm=1.0, norm_action='drop'))
  with pytest.raises(ValueError, match='max_update_norm must be > 0'):
    make_round(alg, clients_per_round=M, guard=UpdateGuard(max_update_norm=0.0))


def client_params(alg, state, data, i):
  """Client ``i``'s locally trained global params in this round (its round key, as the round derives it)."""
  key = jax.random.fold_in(jax.random.fold_in(state.key, state.round), int(i))
  out, _, _ = jax.jit(alg.client_update)(state.frozen, state.global_params, jax.tree.map(lambda x: x[i], state.clients),
                                         jax.tree.map(lambda x: x[i], data), key)
  return out.params

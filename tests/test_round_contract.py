"""The round's contract with its pieces: every client update learns who it is for (ClientInfo), the aggregator
what the round knows (RoundInfo), the slots fill by a Sampling value (fixed or Poisson), an adversary rewrites the
stacked outputs before the screen, and a round over more clients than the data holds is refused up front."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedjax_adapters as fa
from fedjax_adapters.data.synthetic import synthetic_task
from fedjax_adapters.federated import (Aggregator, RoundInfo, client_data, host_data, host_init, make_host_round,
                                      make_round, mean_aggregator, poisson_sampling, sequential_clients)
from fedjax_adapters.federated.sampling import poisson_slots
from run_helpers import count_traces


def linear(rngs):
  return nnx.Linear(10, 3, rngs=rngs)


@pytest.fixture(scope='module')
def task():
  ds = synthetic_task('synthetic_linear', seed=0)  # 10 clients
  return ds, client_data(ds.train)


def recording(alg):
  """``alg`` whose clients report the ClientInfo they were given, and whose aggregator keeps the RoundInfo."""
  def client_update(frozen, g, cs, data, key, client):
    out, cs, metrics = alg.client_update(frozen, g, cs, data, key, client)
    return out, cs, dict(metrics, seen_id=client.id, seen_slot=client.slot, seen_round=client.round,
                         seen_real=client.real)

  inner = alg.aggregator

  def aggregate(g, outs, weights, agg_state, info):
    new, _ = inner.aggregate(g, outs, weights, agg_state[0], info)
    return new, (agg_state[0], info)

  def init(g):
    m = 4
    zeros = jnp.zeros((m,))
    return inner.init(g), RoundInfo(zeros.astype(jnp.int32), zeros > 0, zeros > 0, zeros, jnp.zeros((), jnp.int32),
                                    jax.random.key(0))

  return alg.replace(client_update=client_update, aggregator=Aggregator(init, aggregate))


def test_client_info_and_round_info_reach_the_pieces_and_the_round_compiles_once(task):
  ds, data = task
  alg, traces = count_traces(recording(fa.fedavg(linear, loss='mse', lr=0.05, batch_size=2)))
  state = alg.init(jax.random.key(0), 10)
  round_fn = make_round(alg, clients_per_round=4)
  keys = []
  for r in range(3):
    state, m = round_fn(state, data)
    np.testing.assert_array_equal(m['seen_id'], m['client_ids'])
    np.testing.assert_array_equal(m['seen_slot'], np.arange(4))
    np.testing.assert_array_equal(m['seen_round'], np.full(4, r))
    assert np.all(m['seen_real'])
    info = state.agg_state[1]
    np.testing.assert_array_equal(info.client_ids, m['client_ids'])
    np.testing.assert_array_equal(info.keep, ~m['rejected'] & m['client_mask'])
    np.testing.assert_allclose(info.update_norms, m['update_norm'])
    assert int(info.round) == r
    expected_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), r), 0xFFFFFFFF)
    np.testing.assert_array_equal(jax.random.key_data(info.key), jax.random.key_data(expected_key))
    keys.append(np.asarray(jax.random.key_data(info.key)))
  assert len(traces) == 1
  assert not np.array_equal(keys[0], keys[1])

  # Explicit ids with a padding slot: the padding slot is told it is not real.
  state, m = round_fn(state, data, client_ids=np.array([1, 3, 5, 5]), client_mask=np.array([True, True, True, False]))
  np.testing.assert_array_equal(m['seen_real'], [True, True, True, False])
  np.testing.assert_array_equal(m['seen_id'], [1, 3, 5, 5])


def test_a_loss_callable_sees_the_client_id(task):
  """A per-client loss weight picked by id: client k's loss is scaled by (1 + k), so its reported loss sum is
  (1 + k) times the plain loss's (same parameters: one step of SGD with lr 0 changes nothing)."""
  ds, data = task

  def scaled(inputs):
    return fa.algorithms.task_loss('mse', inputs) * (1.0 + inputs.client.id)

  frozen_sgd = optax.sgd(0.0)
  plain = fa.fedavg(linear, loss='mse', client_optimizer=frozen_sgd, batch_size=2)
  by_id = fa.fedavg(linear, loss=scaled, eval_loss='mse', client_optimizer=frozen_sgd, batch_size=2)
  ids = np.array([0, 2, 7])
  _, m_plain = make_round(plain, clients_per_round=3)(plain.init(jax.random.key(1), 10), data, client_ids=ids)
  _, m_id = make_round(by_id, clients_per_round=3)(by_id.init(jax.random.key(1), 10), data, client_ids=ids)
  np.testing.assert_allclose(m_id['loss'], m_plain['loss'] * (1.0 + ids), rtol=1e-6)


def test_poisson_sampling_fills_slots_with_the_joined_clients():
  sampling = poisson_sampling(0.3, 6)
  sizes = []
  for t in range(400):
    ids, mask, cohort = sampling.sample(jax.random.key(t), 20)
    ids, mask, cohort = np.asarray(ids), np.asarray(mask), int(cohort)
    real = ids[mask]
    assert mask.sum() == min(cohort, 6)
    assert list(real) == sorted(set(real.tolist()))  # distinct, sorted
    assert not mask[mask.sum():].any()  # real slots first
    assert len(set(ids.tolist())) == 6  # padding slots are other clients
    sizes.append(cohort)
  # Binomial(20, 0.3): mean 6, std 2.05; the mean of 400 draws lies within 6 +- 0.4 with probability > 0.999.
  assert abs(np.mean(sizes) - 6.0) < 0.4, np.mean(sizes)
  assert max(sizes) > 6  # overflowing cohorts happen at this size and are cut to the slots
  with pytest.raises(ValueError, match='rate'):
    poisson_sampling(0.0, 4)
  with pytest.raises(ValueError, match='max_clients'):
    poisson_sampling(0.5, 0)


def test_poisson_slots_is_the_binomial_tail():
  from math import comb
  k, q = 30, 0.2
  m = poisson_slots(q, k, 1e-6)
  tail = lambda m: sum(comb(k, i) * q ** i * (1 - q) ** (k - i) for i in range(m + 1, k + 1))
  assert tail(m) <= 1e-6 < tail(m - 1)


def test_poisson_round_weighs_only_the_joined_clients_and_host_round_agrees(task):
  ds, data = task
  alg = fa.fedavg(linear, loss='mse', lr=0.05, batch_size=2)
  sampling = poisson_sampling(0.4, 6)
  round_fn = make_round(alg, sampling=sampling)
  state = alg.init(jax.random.key(3), 10)
  s_dev, m_dev = round_fn.run(state, data, 4)
  for r in range(4):
    ids, mask, cohort = fa.federated.round_sample(sampling, jax.random.key(3), jnp.asarray(r), 10)
    np.testing.assert_array_equal(m_dev['client_ids'][r], ids)
    np.testing.assert_array_equal(m_dev['client_mask'][r], mask)
    np.testing.assert_array_equal(m_dev['cohort'][r], np.full(6, cohort))
  # The same rounds with explicit ids and masks give the same state: padding slots weigh nothing.
  s_ref = state
  for r in range(4):
    s_ref, _ = round_fn(s_ref, data, client_ids=m_dev['client_ids'][r], client_mask=m_dev['client_mask'][r])
  jax.tree.map(np.testing.assert_array_equal, s_dev.global_params, s_ref.global_params)
  # The host-store round samples the same clients.
  h_state, store = host_init(alg, jax.random.key(3), 10)
  host_round = make_host_round(alg, sampling=sampling)
  for r in range(4):
    h_state, m = host_round(h_state, store, host_data(ds.train))
    np.testing.assert_array_equal(m['client_ids'], m_dev['client_ids'][r])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), h_state.global_params,
               s_dev.global_params)


def test_adversary_rewrites_outputs_before_the_screen(task):
  """Client slot 0 sends g - 10 (p - g): the screen measures the attacked norm and FedAvg averages the attack."""
  ds, data = task
  alg = fa.fedavg(linear, loss='mse', lr=0.05, batch_size=2)

  def flip_slot0(g, outs, ids, mask, key):
    del ids, mask, key  # unused
    scale = jnp.where(jnp.arange(outs.num_examples.shape[0]) == 0, -10.0, 1.0)
    params = jax.tree.map(lambda p, g0: g0 + (p - g0) * scale.reshape((-1,) + (1,) * g0.ndim), outs.params, g)
    return outs._replace(params=params)

  state = alg.init(jax.random.key(0), 10)
  ids = np.array([0, 4, 8])
  honest, m_h = make_round(alg, clients_per_round=3)(state, data, client_ids=ids)
  attacked, m_a = make_round(alg, clients_per_round=3, adversary=flip_slot0)(state, data, client_ids=ids)
  np.testing.assert_allclose(m_a['update_norm'][0], 10 * m_h['update_norm'][0], rtol=1e-5)
  np.testing.assert_allclose(m_a['update_norm'][1:], m_h['update_norm'][1:], rtol=1e-6)
  n = np.asarray(m_h['count'], np.float64)
  g0 = state.global_params
  # weighted mean of the client params, slot 0's delta multiplied by -10
  delta_h = jax.tree.map(lambda new, old: (np.asarray(new) - np.asarray(old)), honest.global_params, g0)
  delta_a = jax.tree.map(lambda new, old: (np.asarray(new) - np.asarray(old)), attacked.global_params, g0)
  seq = make_round(alg, clients_per_round=1, mapping=sequential_clients())
  d0 = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old),
                    seq(state, data, client_ids=ids[:1])[0].global_params, g0)
  expected = jax.tree.map(lambda dh, c0: dh - 11 * n[0] / n.sum() * c0, delta_h, d0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), delta_a, expected)
  with pytest.raises(ValueError, match='adversary'):
    make_round(alg, clients_per_round=3, adversary='sign_flip')


def test_more_clients_per_round_than_the_data_holds_is_refused(task):
  ds, data = task
  alg = fa.fedavg(linear, loss='mse', lr=0.05, batch_size=2)
  round_fn = make_round(alg, clients_per_round=12)
  with pytest.raises(ValueError, match='12 clients per round but the data holds only 10'):
    round_fn(alg.init(jax.random.key(0), 10), data)
  with pytest.raises(ValueError, match='clients_per_round'):
    make_round(alg, clients_per_round=2.5)
  with pytest.raises(ValueError, match='clients_per_round=3 disagrees'):
    make_round(alg, clients_per_round=3, sampling=fa.fixed_sampling(4))

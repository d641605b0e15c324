"""DP-FTRL: the tree's prefix-sum noise, the FTRL iterates, cyclic sampling, accounting, and the runner's flags."""
import json

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters import algorithms, privacy_accounting as pa
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.experiments.runlib import dp_flags
from fedjax_adapters.federated import (ClientOutput, RoundInfo, client_data, cyclic_sampling, dp_aggregator,
                                       make_round, mean_aggregator)
from fedjax_adapters.federated import dp_ftrl
from fedjax_adapters.federated.privacy import DPConfig
from run_helpers import count_traces
import cli_testing

# The binary decomposition of [1, t] by hand: (level, index) of the dyadic intervals [(j-1) 2^l + 1, j 2^l].
DECOMPOSITION = {1: [(0, 1)], 2: [(1, 1)], 3: [(0, 3), (1, 1)], 4: [(2, 1)], 5: [(0, 5), (2, 1)],
                 6: [(1, 3), (2, 1)], 7: [(0, 7), (1, 3), (2, 1)], 8: [(3, 1)]}
LIKE = {'a': jnp.zeros((3, 2)), 'b': jnp.zeros((5,))}


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize('t', range(1, 9))
def test_prefix_noise_is_the_sum_of_the_node_noises_of_the_binary_decomposition(t):
  key = jax.random.key(7)
  got = dp_ftrl.prefix_noise(key, t, LIKE, 0.5, depth=4)
  want = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), LIKE)
  for level, index in DECOMPOSITION[t]:  # ascending levels, the summation order of the implementation
    want = jax.tree.map(jnp.add, want, dp_ftrl.node_noise(key, level, index, LIKE, 0.5))
  np.testing.assert_array_equal(flat(got), flat(want))
  # The round's increments (one draw per level) telescope to the same prefix noise, up to float32 rounding.
  steps = sum(flat(dp_ftrl.noise_increment(key, s, LIKE, 0.5, depth=4)) for s in range(1, t + 1))
  np.testing.assert_allclose(steps, flat(want), rtol=0, atol=1e-5)


def test_node_noise_std_is_z_clip_and_nodes_are_independent():
  like = {'w': jnp.zeros((1000,))}
  key = jax.random.key(3)
  nodes = [(level, index) for level in range(4) for index in range(1, 51)]  # 200 nodes x 1000 = 2e5 samples
  x = np.stack([flat(dp_ftrl.node_noise(key, level, index, like, 1.3 * 2.0)) for level, index in nodes])
  # The std estimate of 2e5 normal samples has relative standard error 1/sqrt(4e5) = 0.16%; 1% is > 6 of them.
  np.testing.assert_allclose(x.std(), 2.6, rtol=0.01)
  assert abs(x.mean()) < 4 * 2.6 / np.sqrt(x.size)
  corr = np.corrcoef(x)[np.triu_indices(len(nodes), 1)]
  assert np.abs(corr).max() < 5 / np.sqrt(1000)  # 19900 pairs of 1000 samples: |r| > 5 sigma has p ~ 1e-2 in all
  np.testing.assert_array_equal(flat(dp_ftrl.node_noise(key, 2, 7, like, 1.0)),
                                flat(dp_ftrl.node_noise(key, 2, 7, like, 1.0)))  # redrawn, not stored


def synthetic_rounds(rounds, m=3, dim=4, seed=0):
  """Per round: client updates ``u [M, dim]`` (norms 0.5 .. 4) and the server key of the round."""
  rng = np.random.default_rng(seed)
  us = [rng.normal(size=(m, dim)) * np.array([[0.25], [1.0], [2.0]]) for _ in range(rounds)]
  return [jnp.asarray(u, jnp.float32) for u in us], [jax.random.key(100 + t) for t in range(rounds)]


def run_aggregator(cfg, us, keys):
  """Calls DP-FTRL's aggregator with FedAvg's server step round after round; returns the models and states."""
  agg = dp_aggregator(mean_aggregator(), cfg)
  g = {'w': jnp.zeros((us[0].shape[1],), jnp.float32)}
  state, models, states = agg.init(g), [g], []
  w = jnp.ones((us[0].shape[0],))
  step = jax.jit(agg.aggregate)
  for t, (u, key) in enumerate(zip(us, keys)):
    mask = jnp.ones(w.shape, bool)
    info = RoundInfo(jnp.arange(w.shape[0]), mask, mask, None, jnp.int32(t), key)
    g, state = step(g, ClientOutput({'w': g['w'][None] + u}, w), w, state, info)
    models.append(g)
    states.append(state)
  return models, states


def clipped_sums(us, clip):
  u = [np.asarray(x, np.float64) for x in us]
  return [(x * np.minimum(1, clip / np.linalg.norm(x, axis=1))[:, None]).sum(0) for x in u]


def test_zero_noise_releases_exactly_the_nonprivate_prefix_sums():
  us, keys = synthetic_rounds(7)
  cfg = DPConfig(clip=1.0, noise_multiplier=0.0, expected_clients=3.0, mechanism='tree', tree_steps=4)
  models, _ = run_aggregator(cfg, us, keys)
  sums = np.cumsum(clipped_sums(us, 1.0), axis=0)
  for t in range(1, 8):  # theta_t = theta_0 + (x_1 + ... + x_t) / n, across the restart after round 4
    np.testing.assert_allclose(flat(models[t]), sums[t - 1] / 3.0, rtol=1e-6, atol=1e-6)


def test_models_are_the_start_plus_the_noisy_prefix_sums_with_a_restart_per_tree():
  us, keys = synthetic_rounds(7)
  cfg = DPConfig(clip=1.0, noise_multiplier=0.8, expected_clients=3.0, mechanism='tree', tree_steps=4)
  models, states = run_aggregator(cfg, us, keys)
  sums = np.cumsum(clipped_sums(us, 1.0), axis=0)
  like = {'w': jnp.zeros((4,))}
  tree_keys = [jax.random.fold_in(keys[0], dp_ftrl.TREE_KEY_TAG), jax.random.fold_in(keys[4], dp_ftrl.TREE_KEY_TAG)]
  for t in range(1, 8):
    tree, step = (t - 1) // 4, (t - 1) % 4 + 1
    noise = flat(dp_ftrl.prefix_noise(tree_keys[tree], step, like, 0.8, 3))  # depth of a 4-step tree: 3
    if tree == 1:  # the first tree's last release stays in the start point of the second
      noise = noise + flat(dp_ftrl.prefix_noise(tree_keys[0], 4, like, 0.8, 3))
    np.testing.assert_allclose(flat(models[t]), (sums[t - 1] + noise) / 3.0, rtol=0, atol=2e-6)
    assert int(states[t - 1].tree) == tree
  np.testing.assert_array_equal(np.asarray(states[3].tree_key), np.asarray(jax.random.key_data(tree_keys[0])))


def test_bad_tree_config_raises_naming_the_value():
  with pytest.raises(ValueError, match="mechanism='tree' needs tree_steps, an int >= 1; got None"):
    dp_aggregator(mean_aggregator(), DPConfig(1.0, 1.0, 3.0, mechanism='tree'))
  with pytest.raises(ValueError, match="mechanism must be one of .* got 'matrix'"):
    dp_aggregator(mean_aggregator(), DPConfig(1.0, 1.0, 3.0, mechanism='matrix'))
  with pytest.raises(ValueError, match='adaptive_quantile=0.5 is not supported'):
    dp_aggregator(mean_aggregator(), DPConfig(1.0, 1.0, 3.0, adaptive_quantile=0.5, mechanism='tree', tree_steps=2))


def test_cyclic_sampling_takes_every_client_at_most_once_per_epoch():
  sampling = cyclic_sampling(3)
  key = jax.random.key(0)
  draw = jax.jit(sampling.sample_round, static_argnums=2)
  epochs = [[np.asarray(draw(key, jnp.int32(e * 3 + i), 11)[0]) for i in range(3)] for e in range(2)]  # P = 11 // 3
  for blocks in epochs:
    ids = np.concatenate(blocks)
    assert len(set(ids.tolist())) == 9 and ids.min() >= 0 and ids.max() < 11
  assert not all(np.array_equal(a, b) for a, b in zip(*epochs))  # a fresh permutation per epoch


def test_epsilon_equals_dp_accounting_called_directly():
  kw = dict(delta=1e-3, sampling='cyclic', mechanism='tree', num_clients=100, clients_per_round=10)  # P = 10
  acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
  acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(1.1, 10), 2)
  acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(1.1, 3))
  assert pa.epsilon(1.1, 23, **kw) == acc.get_epsilon(1e-3)
  acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
  acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(1.1, 7))
  assert pa.epsilon(1.1, 7, **kw) == acc.get_epsilon(1e-3)
  z = pa.calibrate_noise(3.0, rounds=23, **kw)
  assert abs(pa.epsilon(z, 23, **kw) - 3.0) < 1e-3 and pa.epsilon(z * 1.05, 23, **kw) < 3.0
  plan = dict(noise_multiplier=1.1, delta=1e-3, sampling='cyclic', mechanism='tree', num_clients=100,
              clients_per_round=10)
  assert dp_flags.epsilon_after(plan, 23, {}) == pa.epsilon(1.1, 23, **kw) == dp_flags.summary(plan, 23)['epsilon']
  with pytest.raises(ValueError, match="mechanism 'tree' needs sampling 'cyclic'.* got sampling 'poisson'"):
    pa.epsilon(1.0, 3, delta=0.1, sampling='poisson', mechanism='tree', num_clients=10, clients_per_round=2)
  with pytest.raises(ValueError, match="sampling 'cyclic' needs mechanism 'tree'"):
    pa.epsilon(1.0, 3, delta=0.1, sampling='cyclic', num_clients=10, clients_per_round=2)


K, M = 6, 2  # cyclic: P = 3 rounds per tree


def mlp(rngs):
  return nnx.Sequential(nnx.Linear(4, 5, rngs=rngs), jax.nn.relu, nnx.Linear(5, 2, rngs=rngs))


def test_floral_local_state_is_bit_identical_with_the_tree_on_and_off_and_the_round_compiles_once():
  rng = np.random.default_rng(0)
  data = client_data(stack_clients([rng.normal(size=(4, 4)).astype(np.float32) for _ in range(K)],
                                   [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(K)]))
  alg = algorithms.floral(mlp, num_adaptors=2, loss='mse', lr=0.05, batch_size=2, rank=1)
  cfg = DPConfig(clip=0.05, noise_multiplier=1.0, expected_clients=M, mechanism='tree', tree_steps=K // M)
  dp, traces = count_traces(alg.replace(aggregator=dp_aggregator(alg.aggregator, cfg, mixture_keys=('adapters',))))
  plain, private = make_round(alg, sampling=cyclic_sampling(M)), make_round(dp, sampling=cyclic_sampling(M))
  plain_agg, b = alg.init(jax.random.key(0), K).agg_state, dp.init(jax.random.key(0), K)
  for _ in range(4):  # across the restart after round 3
    a, _ = plain(b._replace(agg_state=plain_agg), data)  # the same global model, clients and round in, DP off
    b, _ = private(b, data)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.clients, b.clients)
  assert len(traces) == 1 and int(b.agg_state.tree) == 1
  assert not np.array_equal(flat(a.global_params), flat(b.global_params))


# ----------------------------------------------------------------------------------------------------------------------
# The FLoRAL runner's --dp-mechanism flag
# ----------------------------------------------------------------------------------------------------------------------


_run = cli_testing.run_floral
SMOKE = cli_testing.FLORAL_SMOKE


def test_runner_trains_with_the_tree_and_reports_epsilon_as_dp_accounting_computes_it(tmp_path):
  out = tmp_path / 'run'
  code, res = _run(SMOKE + ['--methods', 'fedavg', '--out', str(out), '--dp-clip', '0.5', '--dp-noise-multiplier',
                            '2.0', '--dp-mechanism', 'tree', '--dp-sampling', 'cyclic'])
  assert code == 0 and res['status'] == 'done'
  dp = res['dp']
  k, m = dp['num_clients'], dp['clients_per_round']
  assert dp['mechanism'] == 'tree' and dp['sampling'] == 'cyclic'
  lines = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  for line in lines:
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    full, rest = divmod(line['round'], k // m)
    if full:
      acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(2.0, k // m), full)
    if rest:
      acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(2.0, rest))
    assert line['dp_epsilon'] == acc.get_epsilon(1.0 / k)
  assert dp['epsilon'] == lines[-1]['dp_epsilon']


@pytest.mark.parametrize('flags,words', [
    (['--dp-mechanism', 'tree'], "mechanism 'tree' needs sampling 'cyclic'"),
    (['--dp-mechanism', 'tree', '--dp-sampling', 'poisson'], "got sampling 'poisson'"),
    (['--dp-sampling', 'cyclic'], "sampling 'cyclic' needs mechanism 'tree'"),
])
def test_bad_tree_flags_are_one_line_errors_before_training(capsys, tmp_path, flags, words):
  code, _ = _run(SMOKE + ['--methods', 'fedavg', '--out', str(tmp_path / 'run'), '--dp-clip', '1',
                          '--dp-noise-multiplier', '1'] + flags)
  err = capsys.readouterr().err
  assert code == 2 and err.startswith('error: ') and err.count('\n') == 1 and words in err, err
  assert not (tmp_path / 'run').exists()

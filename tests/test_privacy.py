"""User-level DP: clipping, noise, fixed denominator, adaptive clip, accounting, and what DP leaves alone."""
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters import algorithms, privacy_accounting as pa
from fedjax_adapters.algorithms.lora_fedavg import uniform_weights
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.federated import (ClientOutput, RoundInfo, chunked_clients, client_data, make_round,
                                       mean_aggregator)
from fedjax_adapters.federated.privacy import DPConfig, dp_aggregator, update_noise_multiplier
import cli_testing

K, M = 6, 3
IDS = np.array([0, 2, 5])


def mlp(rngs):
  return nnx.Sequential(nnx.Linear(4, 5, rngs=rngs), jax.nn.relu, nnx.Linear(5, 2, rngs=rngs))


def population():
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(4, 4)).astype(np.float32) for _ in range(K)]
  ys = [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(K)]
  return client_data(stack_clients(xs, ys))


def info(key, norms=None, m=M):
  mask = jnp.ones((m,), bool)
  return RoundInfo(jnp.arange(m), mask, mask, norms, jnp.int32(0), key)


def np_tree(t):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]


def test_clipping_equals_the_dense_formula_per_client_and_ignores_dropped_rows():
  rng = np.random.default_rng(1)
  g = {'a': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), 'b': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  p = jax.tree.map(lambda x: x[None] + jnp.asarray(rng.normal(size=(5,) + x.shape) * [[.1], [1], [3], [7], [1]]
                                                   if x.ndim == 1 else rng.normal(size=(5,) + x.shape), jnp.float32), g)
  p = jax.tree.map(lambda x: x.at[4].set(jnp.nan), p)  # a rejected client's row: weight 0, NaN inside
  w = jnp.array([3., 1., 2., 5., 0.])
  cfg = DPConfig(clip=1.5, noise_multiplier=0.0, expected_clients=4.0)
  agg = dp_aggregator(mean_aggregator(), cfg)
  new, _ = agg.aggregate(g, ClientOutput(p, w), w, agg.init(g), info(jax.random.key(0), m=5))
  d = [np.asarray(x, np.float64).reshape(5, -1) - np.asarray(y, np.float64).reshape(1, -1)
       for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(g))]
  delta = np.concatenate(d, axis=1)[:4]
  norms = np.linalg.norm(delta, axis=1)
  want = (delta * np.minimum(1, 1.5 / norms)[:, None]).sum(0) / 4.0  # uniform weights, fixed denominator
  got = np.concatenate([x.reshape(-1) - y.reshape(-1) for x, y in zip(np_tree(new), np_tree(g))])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert (norms > 1.5).any() and (norms < 1.5).any()


def test_floral_adaptors_enter_weighted_by_c_times_p_then_clipped_jointly():
  rng = np.random.default_rng(2)
  C = 2
  g = {'base': jnp.asarray(rng.normal(size=(3,)), jnp.float32), 'adapters': jnp.asarray(rng.normal(size=(C, 2)),
                                                                                        jnp.float32)}
  p = jax.tree.map(lambda x: x[None] + jnp.asarray(rng.normal(size=(M,) + x.shape), jnp.float32), g)
  probs = jnp.asarray([[.9, .1], [.5, .5], [0., 1.]], jnp.float32)
  cfg = DPConfig(clip=1.0, noise_multiplier=0.0, expected_clients=3.0)
  agg = dp_aggregator(mean_aggregator(), cfg, mixture_keys=('adapters',))
  w = jnp.ones((M,))
  new, _ = agg.aggregate(g, ClientOutput(p, w, {'router_probs': probs}), w, agg.init(g), info(jax.random.key(0)))
  db = np.asarray(p['base'] - g['base'][None], np.float64)
  da = np.asarray(p['adapters'] - g['adapters'][None], np.float64) * C * np.asarray(probs, np.float64)[:, :, None]
  u = np.concatenate([db, da.reshape(M, -1)], axis=1)
  s = (u * np.minimum(1, 1.0 / np.linalg.norm(u, axis=1))[:, None]).sum(0) / 3.0
  np.testing.assert_allclose(np.asarray(new['base'] - g['base']), s[:3], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new['adapters'] - g['adapters']).reshape(-1), s[3:], rtol=1e-5, atol=1e-6)


def test_noise_std_matches_z_clip_over_n_over_many_draws():
  g = {'w': jnp.zeros((500,), jnp.float32)}
  p = {'w': jnp.zeros((M, 500), jnp.float32)}
  cfg = DPConfig(clip=2.0, noise_multiplier=1.3, expected_clients=8.0)
  agg = dp_aggregator(mean_aggregator(), cfg)
  w = jnp.ones((M,))

  def draw(key):
    return agg.aggregate(g, ClientOutput(p, w), w, agg.init(g), info(key, jnp.zeros((M,))))[0]['w']

  x = np.asarray(jax.vmap(draw)(jax.random.split(jax.random.key(0), 400)), np.float64)  # 200k samples
  # The std estimate of 2e5 normal samples has relative standard error 1/sqrt(2 * 2e5) = 0.16%; 1% is > 6 of them.
  np.testing.assert_allclose(x.std(), 1.3 * 2.0 / 8.0, rtol=0.01)
  assert abs(x.mean()) < 4 * 1.3 * 2.0 / 8.0 / np.sqrt(x.size)
  assert not np.allclose(x[0], x[1])  # a fresh draw per key


def test_epsilon_equals_dp_accounting_called_directly():
  got = pa.epsilon(1.1, 30, delta=1e-3, sampling='poisson', num_clients=100, clients_per_round=10)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 30)
  assert got == acc.get_epsilon(1e-3)
  got = pa.epsilon(1.1, 30, delta=1e-3, sampling='fixed', num_clients=100, clients_per_round=10)
  acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.55)), 30)
  assert got == acc.get_epsilon(1e-3)
  z = pa.calibrate_noise(3.0, delta=1e-3, rounds=30, sampling='poisson', num_clients=100, clients_per_round=10)
  assert abs(pa.epsilon(z, 30, delta=1e-3, sampling='poisson', num_clients=100, clients_per_round=10) - 3.0) < 1e-3
  assert pa.epsilon(z * 1.05, 30, delta=1e-3, sampling='poisson', num_clients=100, clients_per_round=10) < 3.0
  assert pa.epsilon(0.0, 30, delta=1e-3, sampling='poisson', num_clients=100, clients_per_round=10) == np.inf


@pytest.fixture(scope='module')
def floral_rounds():
  alg = algorithms.floral(mlp, num_adaptors=2, loss='mse', lr=0.05, batch_size=2, rank=1)
  cfg = DPConfig(clip=0.05, noise_multiplier=1.0, expected_clients=M)
  dp = alg.replace(aggregator=dp_aggregator(alg.aggregator, cfg, mixture_keys=('adapters',)))
  return alg, dp, make_round(alg, clients_per_round=M), make_round(dp, clients_per_round=M)


def test_local_adaptors_and_router_logits_are_bit_identical_with_dp_on_and_off(floral_rounds):
  alg, dp, plain, private = floral_rounds
  data = population()
  s0, sd = alg.init(jax.random.key(0), K), dp.init(jax.random.key(0), K)
  (a, _), (b, _) = plain(s0, data, client_ids=IDS), private(sd, data, client_ids=IDS)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.clients, b.clients)
  assert not all(np.array_equal(x, y) for x, y in zip(np_tree(a.global_params), np_tree(b.global_params)))


def test_chunked_round_equals_vmap_with_dp_on(floral_rounds):
  _, dp, _, private = floral_rounds
  data = population()
  s = dp.init(jax.random.key(3), K)
  want, _ = private(s, data, client_ids=IDS)
  got, _ = make_round(dp, clients_per_round=M, mapping=chunked_clients(2))(s, data, client_ids=IDS)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), np_tree(got.global_params),
               np_tree(want.global_params))


def test_host_store_round_adds_the_same_noise_as_the_device_round(floral_rounds):
  from fedjax_adapters.federated.host_store import host_data, host_init, make_host_round  # pylint: disable=g-import-not-at-top
  _, dp, _, private = floral_rounds
  rng = np.random.default_rng(0)
  fd = stack_clients([rng.normal(size=(4, 4)).astype(np.float32) for _ in range(K)],
                     [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(K)])
  dev, _ = private(dp.init(jax.random.key(4), K), client_data(fd))
  host_state, store = host_init(dp, jax.random.key(4), K)
  host_state, _ = make_host_round(dp, clients_per_round=M)(host_state, store, host_data(fd))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), np_tree(host_state.global_params),
               np_tree(dev.global_params))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), np_tree(store.tree),
               np_tree(dev.clients))


def test_no_noise_and_a_huge_clip_equal_the_plain_round_with_uniform_weights():
  alg = algorithms.fedavg(mlp, loss='mse', lr=0.05, batch_size=2)
  plain = alg.replace(aggregator=uniform_weights(alg.aggregator))
  dp = alg.replace(aggregator=dp_aggregator(alg.aggregator, DPConfig(clip=1e9, noise_multiplier=0.0,
                                                                     expected_clients=M)))
  data = population()
  s = alg.init(jax.random.key(1), K)
  a, _ = make_round(plain, clients_per_round=M)(s, data, client_ids=IDS)
  b, _ = make_round(dp, clients_per_round=M)(dp.init(jax.random.key(1), K), data, client_ids=IDS)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), np_tree(a.global_params),
               np_tree(b.global_params))


def test_adaptive_clip_moves_toward_the_target_quantile_and_costs_no_extra_accounting():
  norms = jnp.asarray([1., 2., 3., 4.])
  g = {'w': jnp.zeros((4,), jnp.float32)}
  p = {'w': jnp.diag(norms)}  # client k's update has norm k + 1
  w = jnp.ones((4,))
  cfg = DPConfig(clip=10.0, noise_multiplier=0.0, expected_clients=4.0, adaptive_quantile=0.5, clip_lr=0.2)
  agg = dp_aggregator(mean_aggregator(), cfg)
  state = agg.init(g)
  _, state = agg.aggregate(g, ClientOutput(p, w), w, state, info(jax.random.key(0), norms, m=4))
  np.testing.assert_allclose(state.clip, 10.0 * np.exp(-0.2 * (1.0 - 0.5)), rtol=1e-6)  # all 4 below: b = 1
  for _ in range(60):
    _, state = agg.aggregate(g, ClientOutput(p, w), w, state, info(jax.random.key(0), norms, m=4))
  assert 2.0 <= float(state.clip) <= 3.0  # the median of the norms
  noisy = cfg._replace(noise_multiplier=0.1)  # sigma_b = 4 / 20 = 0.2
  np.testing.assert_allclose(update_noise_multiplier(noisy), (0.1 ** -2 - 0.4 ** -2) ** -0.5)


@pytest.mark.parametrize('field,value,match', [('clip', 0.0, 'clip must be a finite number > 0; got 0.0'),
                                               ('clip', -1.0, 'got -1.0'),
                                               ('noise_multiplier', -0.5, 'noise_multiplier .* got -0.5'),
                                               ('adaptive_quantile', 1.0, 'adaptive_quantile .* got 1.0')])
def test_bad_dp_config_raises_naming_the_value(field, value, match):
  cfg = DPConfig(clip=1.0, noise_multiplier=1.0, expected_clients=4.0)._replace(**{field: value})
  with pytest.raises(ValueError, match=match):
    dp_aggregator(mean_aggregator(), cfg)


@pytest.mark.parametrize('delta', [0.0, 1.0, -0.1])
def test_bad_delta_raises_naming_the_value(delta):
  with pytest.raises(ValueError, match=f'delta must lie in \\(0, 1\\); got {delta}'):
    pa.epsilon(1.0, 3, delta=delta, sampling='poisson', num_clients=10, clients_per_round=2)
  with pytest.raises(ValueError, match='sampling must be one of'):
    pa.epsilon(1.0, 3, delta=0.1, sampling='uniform', num_clients=10, clients_per_round=2)


class TwoLayer(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def test_feddpa_global_lora_is_privatized_and_its_local_lora_untouched():
  from fedjax_adapters.algorithms.feddpa import feddpa, lm_spec  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.federated import ClientData  # pylint: disable=g-import-not-at-top
  alg = feddpa(TwoLayer, variant='feddpa_t', spec=lm_spec(target=r'(hidden|out)', rank=2, alpha=4.0, dropout=0.0),
               loss='xent', forward=lambda m, x: m(x), embed=lambda m, x: x, lr=3e-2, batch_size=4, num_epochs=1)
  rng = np.random.default_rng(0)
  data = ClientData(jnp.asarray(rng.normal(size=(K, 8, 6)), jnp.float32),
                    jnp.asarray(rng.integers(0, 3, size=(K, 8)), jnp.int32), jnp.full((K,), 8, jnp.int32))
  dp = alg.replace(aggregator=dp_aggregator(alg.aggregator, DPConfig(clip=0.01, noise_multiplier=2.0,
                                                                     expected_clients=M)))
  s = alg.init(jax.random.key(0), K)
  a, b = s, dp.init(jax.random.key(0), K)
  plain, private = make_round(alg, clients_per_round=M), make_round(dp, clients_per_round=M)
  for _ in range(2):  # FedDPA-T trains the local LoRA from a client's second participation
    (a, _), (b, _) = plain(a, data, client_ids=IDS[:M] % K), private(b, data, client_ids=IDS[:M] % K)
  b_local = jax.tree.map(np.asarray, b.clients)
  # The local adapters follow the (different) global adapters, so compare one round from the same state instead.
  a1, _ = plain(b._replace(agg_state=a.agg_state), data, client_ids=IDS[:M] % K)
  b1, _ = private(b, data, client_ids=IDS[:M] % K)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a1.clients, b1.clients)
  assert not all(np.array_equal(x, y) for x, y in zip(np_tree(a1.global_params), np_tree(b1.global_params)))
  assert not all(np.array_equal(x, y) for x, y in zip(np_tree(b_local), np_tree(b1.clients)))


# ----------------------------------------------------------------------------------------------------------------------
# The FLoRAL runner's --dp-* flags
# ----------------------------------------------------------------------------------------------------------------------


_run = cli_testing.run_floral
SMOKE = cli_testing.FLORAL_SMOKE


def test_runner_reports_epsilon_per_round_as_dp_accounting_computes_it(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'run'
  code, res = _run(SMOKE + ['--methods', 'floral_oracle', '--out', str(out), '--dp-clip', '0.5',
                            '--dp-noise-multiplier', '1.2', '--dp-sampling', 'poisson'])
  assert code == 0 and res['status'] == 'done'
  dp = res['dp']
  k, m = dp['num_clients'], dp['clients_per_round']
  assert dp['delta'] == 1.0 / k and dp['noise_multiplier'] == 1.2 and dp['rounds'] == res['rounds']
  lines = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  for line in lines:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(m / k, dp_accounting.GaussianDpEvent(1.2)), line['round'])
    assert line['dp_epsilon'] == acc.get_epsilon(1.0 / k)
  assert dp['epsilon'] == lines[-1]['dp_epsilon'] and lines[0]['dp_epsilon'] < lines[-1]['dp_epsilon']


@pytest.mark.parametrize('flags,words', [
    (['--dp-clip', '0'], '--dp-clip'),
    (['--dp-clip', '1', '--dp-noise-multiplier', '-1'], '--dp-noise-multiplier'),
    (['--dp-clip', '1', '--dp-noise-multiplier', '1', '--dp-delta', '1.5'], '--dp-delta'),
    (['--dp-clip', '1'], 'needs --dp-noise-multiplier or --dp-epsilon'),
    (['--dp-noise-multiplier', '1'], '--dp-noise-multiplier needs --dp-clip'),
    (['--dp-clip', '1', '--dp-epsilon', '1e9'], 'dp epsilon 1000000000.0 is reached with less noise'),
])
def test_bad_dp_flags_are_one_line_errors_before_training(capsys, tmp_path, flags, words):
  code, _ = _run(SMOKE + ['--methods', 'fedavg', '--out', str(tmp_path / 'run')] + flags)
  err = capsys.readouterr().err
  assert code == 2 and err.startswith('error: ') and err.count('\n') == 1 and words in err, err
  assert not (tmp_path / 'run').exists()

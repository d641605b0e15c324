"""The open middle: loss callables, client optimizers, reducers, replace(aggregator=), predict, LoRA-FedAvg, checks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.algorithms import LossInputs, sq_distance, task_loss
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.federated import (ClientOutput, coordinate_median, client_data, evaluate, make_round,
                                       mean_aggregator, predict, router_aggregator)
from fedjax_adapters.nn import AdapterSpec

K, M = 4, 4


def linear(rngs):
  return nnx.Sequential(nnx.Linear(3, 2, rngs=rngs))


def mlp(rngs):
  return nnx.Sequential(nnx.Linear(3, 6, rngs=rngs), jax.nn.relu, nnx.Linear(6, 2, rngs=rngs))


def regression_data(seed=0, rows=(4, 3, 4, 2)):
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in rows]
  ys = [rng.normal(size=(n, 2)).astype(np.float32) for n in rows]
  return client_data(stack_clients(xs, ys))


def classification_data(labels):
  rng = np.random.default_rng(1)
  xs = [rng.normal(size=(len(l), 3)).astype(np.float32) for l in labels]
  return client_data(stack_clients(xs, [np.asarray(l, np.int32) for l in labels]))


def _np(x):
  return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(_np(x), _np(y)), a, b)


def one_round(alg, data, seed=0):
  state = alg.init(jax.random.key(seed), K)
  return state, make_round(alg, clients_per_round=M)(state, data)[0]


def test_loss_callable_with_the_builtin_loss_equals_the_string_shortcut():
  data = regression_data()
  _, a = one_round(algorithms.fedavg(mlp, loss='mse', lr=0.1, batch_size=2), data)
  _, b = one_round(algorithms.fedavg(mlp, loss=lambda inp: task_loss('mse', inp), eval_loss='mse', lr=0.1,
                                     batch_size=2), data)
  assert_same(a, b)


def test_fedprox_loss_callable_equals_hand_proximal_sgd():
  """FedProx in user code: task loss + mu/2 ||w - w_round_start||^2, checked against SGD written out by hand."""
  mu, lr = 0.5, 0.1

  def fedprox(inp: LossInputs):
    return task_loss('mse', inp) + 0.5 * mu * sq_distance(inp.params[0], inp.anchor[0])

  alg = algorithms.fedavg(linear, loss=fedprox, eval_loss='mse', lr=lr, batch_size=2)
  data = regression_data(rows=(4, 4, 4, 4))
  state = alg.init(jax.random.key(0), K)
  w0 = state.global_params['base']['layers'][0]
  out, _, metrics = jax.jit(alg.client_update)(state.frozen, state.global_params, {},
                                               jax.tree.map(lambda x: x[0], data), jax.random.key(3))
  x, y = np.asarray(data.x[0], np.float64), np.asarray(data.y[0], np.float64)
  w = {k: np.asarray(v, np.float64) for k, v in w0.items()}
  anchor = dict(w)
  for rows in (slice(0, 2), slice(2, 4)):  # no shuffling: batches in order
    err = x[rows] @ w['kernel'] + w['bias'] - y[rows]
    g_k = 2 * x[rows].T @ err / err.size + mu * (w['kernel'] - anchor['kernel'])
    g_b = 2 * err.sum(0) / err.size + mu * (w['bias'] - anchor['bias'])
    w = {'kernel': w['kernel'] - lr * g_k, 'bias': w['bias'] - lr * g_b}
  got = out.params['base']['layers'][0]
  np.testing.assert_allclose(got['kernel'], w['kernel'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['bias'], w['bias'], rtol=1e-5, atol=1e-6)
  assert float(metrics['count']) == 4


def test_loss_callable_needs_eval_loss_and_strings_are_checked():
  with pytest.raises(ValueError, match="eval_loss='mse' or 'xent'"):
    algorithms.fedavg(mlp, loss=lambda inp: 0.0, lr=0.1, batch_size=2)
  with pytest.raises(ValueError, match="unknown loss 'hinge'"):
    algorithms.floral(mlp, num_adaptors=2, loss='hinge', lr=0.1, batch_size=2)


def test_client_optimizer_replaces_the_builtin_one():
  data = regression_data()
  _, a = one_round(algorithms.fedavg(mlp, loss='mse', lr=0.1, batch_size=2), data)
  _, b = one_round(algorithms.fedavg(mlp, loss='mse', client_optimizer=optax.sgd(0.1), batch_size=2), data)
  assert_same(a, b)
  _, c = one_round(algorithms.floral(mlp, num_adaptors=2, loss='mse', batch_size=2, rank=1,
                                     client_optimizer=algorithms.floral_optimizer(0.1, router_lr=0.1)), data)
  _, d = one_round(algorithms.floral(mlp, num_adaptors=2, loss='mse', lr=0.1, batch_size=2, rank=1), data)
  assert_same(c, d)
  with pytest.raises(ValueError, match='not both'):
    algorithms.fedavg(mlp, loss='mse', lr=0.1, client_optimizer=optax.sgd(0.1), batch_size=2)
  with pytest.raises(ValueError, match='lr must be > 0'):
    algorithms.fedavg(mlp, loss='mse', batch_size=2)


def hand_weighted_median(values, weights):
  """The smallest value whose cumulative weight (in sorted order) reaches half the total, coordinate by coordinate."""
  out = np.empty(values.shape[1:])
  for idx in np.ndindex(*values.shape[1:]):
    col = values[(slice(None),) + idx]
    order = np.argsort(col, kind='stable')
    cum = np.cumsum(weights[order])
    out[idx] = col[order][np.searchsorted(cum, 0.5 * weights.sum())]
  return out


def test_coordinate_median_reducer_equals_the_hand_weighted_median():
  rng = np.random.default_rng(0)
  stacked = {'w': rng.normal(size=(5, 3, 2)).astype(np.float32), 'b': rng.normal(size=(5, 2)).astype(np.float32)}
  stacked['w'][3] = 1e9  # an outlier with weight 0 (a rejected client) is ignored
  weights = np.array([1., 3., 1., 0., 2.], np.float32)
  prev = jax.tree.map(lambda x: np.zeros(x.shape[1:], np.float32), stacked)
  agg = mean_aggregator(reducer=coordinate_median)
  new, _ = agg.aggregate(prev, ClientOutput(stacked, weights), jnp.asarray(weights), agg.init(prev))
  for k in stacked:
    np.testing.assert_allclose(new[k], hand_weighted_median(stacked[k], weights), rtol=0, atol=0)
  # Router-weighted: adaptor c reduced with weights p(k|c); shared leaves with p(k).
  probs = rng.dirichlet(np.ones(2), size=5).astype(np.float32)
  g = {'base': stacked['b'], 'adapters': rng.normal(size=(5, 2, 3)).astype(np.float32)}
  prev = {'base': np.zeros(2, np.float32), 'adapters': np.zeros((2, 3), np.float32)}
  agg = router_aggregator(('adapters',), reducer=coordinate_median)
  new, _ = agg.aggregate(prev, ClientOutput(g, weights, {'router_probs': probs}), jnp.asarray(weights),
                         agg.init(prev))
  np.testing.assert_allclose(new['base'], hand_weighted_median(g['base'], weights), rtol=0, atol=0)
  q = weights[:, None] * probs
  for c in range(2):
    np.testing.assert_allclose(new['adapters'][c], hand_weighted_median(g['adapters'][:, c], q[:, c] / q[:, c].sum()),
                               rtol=0, atol=0)


def test_replace_aggregator_reinitializes_the_server_state():
  alg = algorithms.fedavg(mlp, loss='mse', lr=0.1, batch_size=2)
  adam = alg.replace(aggregator=mean_aggregator(optax.adam(0.01)))
  state = adam.init(jax.random.key(0), K)
  assert isinstance(state.agg_state[0], optax.ScaleByAdamState)
  assert alg.init(jax.random.key(0), K).agg_state != state.agg_state
  new, _ = make_round(adam, clients_per_round=M)(state, regression_data())
  assert int(new.agg_state[0].count) == 1


def test_predict_is_each_clients_personalized_model_and_matches_evaluate():
  clusters = np.array([0, 1, 0, 1])
  alg = algorithms.floral(mlp, num_adaptors=2, loss='mse', lr=0.1, batch_size=2, rank=1, oracle_clusters=clusters)
  data = regression_data()
  state = alg.init(jax.random.key(0), K)
  state, _ = make_round(alg, clients_per_round=M)(state, data)
  out = predict(alg, state, data)
  assert out.shape == (K, data.x.shape[1], 2)
  # Metrics recomputed from the predictions equal evaluate's.
  real = np.arange(data.x.shape[1])[None, :] < np.asarray(data.count)[:, None]
  sq = np.mean(np.square(np.asarray(out) - np.asarray(data.y)), -1) * real
  np.testing.assert_allclose(sq.sum(1), evaluate(alg, state, data)['loss'], rtol=1e-5)
  # Same cluster -> same model -> same outputs on the same inputs; other cluster -> different.
  same = predict(alg, state, jnp.broadcast_to(data.x[0], data.x.shape))
  np.testing.assert_allclose(same[0], same[2], rtol=1e-6)
  assert not np.allclose(same[0], same[1])
  with pytest.raises(ValueError, match='holds 3 clients but the client store holds 4'):
    predict(alg, state, data.x[:3])


def test_algorithms_expose_model_and_spec():
  floral = algorithms.floral(mlp, num_adaptors=3, loss='mse', lr=0.1, batch_size=2)
  assert floral.spec == AdapterSpec.floral(3, rank=0.01)
  assert floral.model is not None and floral.name == 'floral'
  y, _ = floral.model.apply(floral.init(jax.random.key(0), 1).global_params, jnp.ones((2, 3)), mix=jnp.ones(3) / 3)
  assert y.shape == (2, 2)
  wide = lambda rngs: nnx.Sequential(nnx.Linear(16, 16, rngs=rngs))
  lora = algorithms.lora_fedavg(wide, loss='mse', lr=0.1, batch_size=2)
  assert lora.spec == AdapterSpec() and lora.spec.rank == 8 and lora.spec.alpha == 16.0 and not lora.spec.bias
  parts = lora.init(jax.random.key(0), 1).global_params['adapters']['layers'][0]
  assert parts['global_a'].shape == (1, 16, 8) and set(parts) == {'global_a', 'global_b'}
  with pytest.raises(ValueError, match='one global LoRA per layer'):
    algorithms.lora_fedavg(mlp, loss='mse', lr=0.1, batch_size=2, spec=AdapterSpec(num_local=1))


def test_lora_fedavg_trains_only_the_adapters_starting_from_the_base_model():
  spec = AdapterSpec(rank=2)
  alg = algorithms.lora_fedavg(mlp, loss='mse', lr=0.1, batch_size=2, spec=spec, uniform_aggregation=True)
  base = algorithms.fedavg(mlp, loss='mse', lr=0.1, batch_size=2)
  data = regression_data()
  state = alg.init(jax.random.key(0), K)
  # Zero-initialized B: the adapted model starts as the base model (same weights from the same key).
  np.testing.assert_allclose(predict(alg, state, data), predict(base, base.init(jax.random.key(0), K), data),
                             rtol=1e-6, atol=1e-7)
  new, _ = make_round(alg, clients_per_round=M)(state, data)
  assert_same(new.frozen, state.frozen)  # the base never changes
  assert not np.allclose(new.global_params['adapters']['layers'][0]['global_b'], 0)
  # Uniform aggregation: the plain mean of the clients' adapters.
  outs = []
  for i in range(K):
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.round), i)
    outs.append(jax.jit(alg.client_update)(state.frozen, state.global_params, {},
                                           jax.tree.map(lambda x: x[i], data), key)[0].params)
  hand = jax.tree.map(lambda *xs: sum(xs) / K, *outs)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.global_params, hand)


@pytest.mark.parametrize('name', ['fedavg', 'floral', 'floral_oracle'])
def test_bad_labels_are_refused_with_the_client_named(name):
  alg = {'fedavg': lambda: algorithms.fedavg(mlp, loss='xent', lr=0.1, batch_size=2),  # 2 classes
         'floral': lambda: algorithms.floral(mlp, num_adaptors=2, loss='xent', lr=0.1, batch_size=2, rank=1),
         'floral_oracle': lambda: algorithms.floral(mlp, num_adaptors=2, loss='xent', lr=0.1, batch_size=2, rank=1,
                                                    oracle_clusters=np.array([0, 1, 0]))}[name]()
  round_fn = make_round(alg, clients_per_round=2)
  state = alg.init(jax.random.key(0), 3)
  for bad, value, row in (([0, 1, -1], -1, 2), ([0, 2, 1], 2, 1)):
    data = classification_data([[0, 1], [1, 0, 1], bad])
    with pytest.raises(ValueError, match=rf'client 2 row {row} has label {value}, outside \[0, 2\)'):
      round_fn(state, data)
    with pytest.raises(ValueError, match=f'client 2 row {row} has label'):
      evaluate(alg, state, data)
  good = classification_data([[0, 1], [1, 0, 1], [1, 1]])
  round_fn(state, good)  # padding rows (label 0) are never checked as data: fine


def test_bad_counts_and_duplicate_ids_are_refused_with_the_client_named():
  alg = algorithms.fedavg(mlp, loss='mse', lr=0.1, batch_size=2)
  round_fn = make_round(alg, clients_per_round=2)
  state = alg.init(jax.random.key(0), 3)
  good = regression_data(rows=(2, 3, 2))
  with pytest.raises(ValueError, match=r'client ids \[1\] appear more than once'):
    round_fn(state, good, client_ids=[1, 1])
  round_fn(state, good, client_ids=[1, 1], client_mask=[True, False])  # a padding slot may repeat an id
  x, y = np.zeros((3, 2, 3), np.float32), np.zeros((3, 2), np.int32)
  with pytest.raises(ValueError, match=r'client 1 has count 3, outside \[0, 2\]'):
    client_data((x, y, np.array([2, 3, 1])))
  with pytest.raises(ValueError, match=r'client 2 has count -1'):
    client_data((x, y, np.array([2, 2, -1])))

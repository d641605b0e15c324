"""Robust reducers: each equals a NumPy formula (ties, even counts, padding, rejected rows), Krum finds the planted
honest update, the geometric median converges, FLoRAL's per-adaptor reduction, and vmapped == sequential rounds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.data.synthetic import synthetic_task
from fedjax_adapters.federated import (Aggregator, client_data, make_round, mean_aggregator, router_aggregator,
                                       sequential_clients, vmap_clients)
from fedjax_adapters.federated import aggregators, robust

TOL = dict(rtol=1e-5, atol=1e-5)


def inputs(seed=0, m=8, dead=(2, 6), ties=True):
  """A pytree of ``m`` clients (leaves [m, 3] and [m, 2, 2]); rows in ``dead`` are padding / rejected (weight 0,
  huge finite values); integer-valued honest rows so coordinates tie."""
  rng = np.random.default_rng(seed)
  a = rng.integers(-3, 4, size=(m, 3)).astype(np.float32) if ties else rng.normal(size=(m, 3)).astype(np.float32)
  b = rng.normal(size=(m, 2, 2)).astype(np.float32)
  w = rng.integers(1, 5, size=m).astype(np.float32)
  for k in dead:
    a[k], b[k], w[k] = 1e6, -1e6, 0.0
  fallback = {'a': np.full(3, 0.5, np.float32), 'b': np.ones((2, 2), np.float32)}
  return {'a': a, 'b': b}, w, fallback


def rows(stacked, fallback):
  return np.concatenate([(stacked[k] - fallback[k][None]).reshape(len(stacked[k]), -1) for k in sorted(stacked)], 1)


def unrows(vec, fallback):
  out, i = {}, 0
  for k in sorted(fallback):
    out[k] = fallback[k] + vec[i:i + fallback[k].size].reshape(fallback[k].shape)
    i += fallback[k].size
  return out


def check(reducer, expected, stacked, w, fallback):
  got = jax.jit(reducer)(stacked, jnp.asarray(w), fallback)
  for k in expected:
    np.testing.assert_allclose(np.asarray(got[k]), expected[k], **TOL)


def np_trimmed(stacked, w, fallback, fraction):
  live = w > 0
  t = int(np.floor(fraction * live.sum()))
  out = {}
  for k, x in stacked.items():
    flat, res = x[live].reshape(live.sum(), -1), []
    for j in range(flat.shape[1]):
      order = np.argsort(flat[:, j], kind='stable')[t:live.sum() - t]
      res.append(np.average(flat[order, j], weights=w[live][order]))
    out[k] = np.array(res).reshape(fallback[k].shape)
  return out


@pytest.fixture(params=['pairwise', 'sort'])
def order_path(request, monkeypatch):
  """Runs a test with order statistics from pairwise comparisons (few clients) and from a sort (many clients)."""
  if request.param == 'sort':
    monkeypatch.setattr(aggregators, 'PAIRWISE_MAX_ROWS', 0)
    monkeypatch.setattr(robust, 'PAIRWISE_MAX_ROWS', 0)
  return request.param


@pytest.mark.parametrize('dead', [(), (2, 6), (2,)])  # even and odd live counts, with and without padding
@pytest.mark.parametrize('fraction', [0.0, 0.2, 0.34])
def test_trimmed_mean_equals_numpy(dead, fraction, order_path):
  stacked, w, fb = inputs(dead=dead)
  check(robust.trimmed_mean(fraction), np_trimmed(stacked, w, fb, fraction), stacked, w, fb)


def np_weighted_median(x, w):
  """Per coordinate: the first value, in stable ascending order, at which the cumulative weight reaches half."""
  flat, out = x.reshape(len(x), -1), []
  for col in flat.T:
    order = np.argsort(col, kind='stable')
    out.append(col[order][np.searchsorted(np.cumsum(w[order]), 0.5 * w.sum())])
  return np.array(out).reshape(x.shape[1:])


@pytest.mark.parametrize('dead', [(), (2, 6), (2,)])
@pytest.mark.parametrize('float_weights', [False, True])  # counts, and router-probability-like weights
def test_coordinate_median_equals_numpy_on_both_paths(dead, float_weights, order_path):
  stacked, w, fb = inputs(dead=dead)
  if float_weights:
    w = np.where(w > 0, np.random.default_rng(1).dirichlet(np.ones(len(w))), 0.0).astype(np.float32)
  got = jax.jit(aggregators.coordinate_median)(stacked, jnp.asarray(w), fb)
  for k in stacked:
    np.testing.assert_array_equal(np.asarray(got[k]), np_weighted_median(stacked[k], w))


def test_weight_before_is_the_stable_sorts_cumulative_weight():
  x = np.array([[2., 1.], [1., 1.], [2., 0.], [0., 1.]], np.float32)
  w = np.array([1., 2., 4., 8.], np.float32)
  # Column 0 sorts as rows 3, 1, 0, 2 (0 before 2: tie, lower index first); column 1 as 2, 0, 1, 3.
  np.testing.assert_array_equal(aggregators.weight_before(jnp.asarray(x), jnp.asarray(w)),
                                [[10., 4.], [8., 5.], [11., 0.], [0., 7.]])


def np_geomed(stacked, w, fallback, iters, eps):
  d, live = rows(stacked, fallback), w > 0
  d, ww = d[live], w[live]
  z = ww @ d / ww.sum()
  for _ in range(iters):
    b = ww / np.maximum(np.linalg.norm(d - z, axis=1), eps)
    z = b @ d / b.sum()
  return unrows(z, fallback)


def test_geometric_median_equals_numpy_weiszfeld():
  stacked, w, fb = inputs(ties=False)
  check(robust.geometric_median(5, 1e-6), np_geomed(stacked, w, fb, 5, 1e-6), stacked, w, fb)


def test_geometric_median_converges():
  # collinear 0, 1, 100 (equal weights): the median is the middle point; plus padding that must not matter
  x = np.array([[0., 0.], [1., 0.], [100., 0.], [1e6, 1e6]], np.float32)
  w = jnp.array([1., 1., 1., 0.])
  got = robust.geometric_median(200, 1e-8)({'x': x}, w, {'x': np.zeros(2, np.float32)})['x']
  np.testing.assert_allclose(np.asarray(got), [1.0, 0.0], atol=1e-3)
  # a scattered cloud with an outlier: the first-order condition sum_k w_k (z - x_k) / ||z - x_k|| = 0 holds
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.normal(size=(9, 3)), [[50., 50., 50.]]]).astype(np.float32)
  w = rng.uniform(0.5, 2.0, size=10).astype(np.float32)
  z = np.asarray(robust.geometric_median(100, 1e-8)({'x': x}, jnp.asarray(w), {'x': np.zeros(3, np.float32)})['x'])
  u = (z - x) / np.linalg.norm(z - x, axis=1, keepdims=True)
  assert np.linalg.norm(w @ u) < 1e-3 * w.sum()
  assert np.linalg.norm(z - w @ x / w.sum()) > 1.0  # it is not the mean


def np_krum_scores(d, cand, f):
  n, idx = cand.sum(), np.flatnonzero(cand)
  k = max(n - f - 2, 1)
  scores = np.full(len(d), np.inf)
  for i in idx:
    dist = sorted(np.sum((d[i] - d[j]) ** 2) for j in idx if j != i)
    scores[i] = np.sum(dist[:k])
  return scores


@pytest.mark.parametrize('selected', [1, 3, None])
def test_krum_equals_numpy_and_picks_planted_honest(selected):
  honest = np.ones((6, 5), np.float32)
  honest[[0, 1, 2, 4, 5]] += 0.1 * np.eye(5, dtype=np.float32)  # five honest clients around the planted centre
  attack = np.full((2, 5), -20.0, np.float32)
  x = np.concatenate([honest[:2], attack[:1], honest[2:], attack[1:], [np.full(5, 3e4, np.float32)]])
  w = np.array([1, 2, 1, 1, 3, 1, 2, 1, 0], np.float32)
  fb = {'x': np.zeros(5, np.float32)}
  scores = np_krum_scores(x, w > 0, 2)
  m = (w > 0).sum() - 2 if selected is None else selected
  chosen = np.argsort(scores, kind='stable')[:m]
  expected = w[chosen] @ x[chosen] / w[chosen].sum()
  check(robust.krum(2, selected, chunk=4), {'x': expected}, {'x': x}, w, fb)
  assert not {2, 7, 8} & set(chosen.tolist())
  if selected == 1:
    assert chosen[0] == 4  # honest[3] sits at slot 4


def np_bulyan(stacked, w, fallback, f):
  d, live = rows(stacked, fallback), w > 0
  theta, cand, chosen = live.sum() - 2 * f, live.copy(), []
  for _ in range(max(theta, 0)):
    i = int(np.argmin(np_krum_scores(d, cand, f)))
    chosen.append(i); cand[i] = False
  chosen = np.array(sorted(chosen))
  beta = max(len(chosen) - 2 * f, 1)
  out = {}
  for k, x in stacked.items():
    flat = x[chosen].reshape(len(chosen), -1)
    med = np.median(flat, axis=0)
    order = np.argsort(np.abs(flat - med), axis=0, kind='stable')[:beta]
    out[k] = np.take_along_axis(flat, order, 0).mean(0).reshape(fallback[k].shape)
  return out


@pytest.mark.parametrize('dead,f', [((2, 6), 1), ((), 1), ((), 2)])
def test_bulyan_equals_numpy(dead, f, order_path):
  stacked, w, fb = inputs(seed=3, dead=dead, ties=False)
  check(robust.bulyan(f, chunk=3), np_bulyan(stacked, w, fb, f), stacked, w, fb)


def test_centered_clipping_equals_numpy():
  stacked, w, fb = inputs(seed=4, ties=False)
  d, live = rows(stacked, fb), w > 0
  v = np.zeros(d.shape[1])
  for _ in range(3):
    z = d[live] - v
    n = np.linalg.norm(z, axis=1, keepdims=True)
    v = v + w[live] @ (z * np.minimum(1, 0.8 / n)) / w[live].sum()
  check(robust.centered_clipping(0.8, 3), unrows(v, fb), stacked, w, fb)


@pytest.mark.parametrize('q', [0.5, 0.75, 1.0])
def test_norm_bounded_mean_equals_numpy(q):
  stacked, w, fb = inputs(seed=5, ties=False)
  d, live = rows(stacked, fb), w > 0
  norms = np.linalg.norm(d[live], axis=1)
  bound = np.quantile(norms, q)
  clipped = d[live] * np.minimum(1, bound / norms)[:, None]
  check(robust.norm_bounded_mean(q), unrows(w[live] @ clipped / w[live].sum(), fb), stacked, w, fb)


@pytest.mark.parametrize('name', sorted(robust.REDUCERS))
def test_all_dead_returns_fallback(name):
  stacked, w, fb = inputs(dead=range(8))
  check(robust.reducer_from_name(name), fb, stacked, w, fb)


def test_bad_parameters_named():
  with pytest.raises(ValueError, match='0.6'):
    robust.trimmed_mean(0.6)
  with pytest.raises(ValueError, match='-1'):
    robust.krum(-1)
  with pytest.raises(ValueError, match="'krumm'"):
    robust.reducer_from_name('krumm')
  with pytest.raises(ValueError, match='integer; got 1.5'):
    robust.reducer_from_name('krum', 1.5)


def test_floral_router_weights_per_adaptor():
  """A malicious client putting all its router mass on adaptor 0 with a huge update drags the router-weighted mean
  of that adaptor; the per-adaptor Krum (router weights as weights) ignores it and equals Krum on that adaptor."""
  rng = np.random.default_rng(6)
  m, c = 7, 2
  adapters = rng.normal(scale=0.1, size=(m, c, 4)).astype(np.float32)
  adapters[0, 0] = 100.0
  probs = np.full((m, c), 0.5, np.float32)
  probs[0] = [1.0, 0.0]
  shared = rng.normal(size=(m, 3)).astype(np.float32)
  w = np.ones(m, np.float32)
  gp = {'adapters': np.zeros((c, 4), np.float32), 'shared': np.zeros(3, np.float32)}
  out = lambda p: type('O', (), {'params': p, 'aux': {'router_probs': jnp.asarray(probs)}})()
  outs = out({'adapters': adapters, 'shared': shared})
  mean_agg = router_aggregator()
  krum_agg = router_aggregator(reducer=robust.krum(1))
  plain, _ = mean_agg.aggregate(gp, outs, jnp.asarray(w), mean_agg.init(gp))
  robust_p, _ = krum_agg.aggregate(gp, outs, jnp.asarray(w), krum_agg.init(gp))
  assert np.abs(np.asarray(plain['adapters'][0])).max() > 10  # p(0|c=0) = 1/4: the attacker holds a quarter
  p_kc = w[:, None] * probs / (w[:, None] * probs).sum(0)
  for col in range(c):
    alone = robust.krum(1)({'x': adapters[:, col]}, jnp.asarray(p_kc[:, col]), {'x': gp['adapters'][col]})['x']
    np.testing.assert_allclose(np.asarray(robust_p['adapters'][col]), np.asarray(alone), **TOL)
  assert np.abs(np.asarray(robust_p['adapters'][0])).max() < 1.0
  # adaptor 1 never sees the attacker (weight 0 there): its rows are treated as padding
  assert 0 not in np.flatnonzero(p_kc[:, 1])


def mlp(rngs):
  return nnx.Sequential(nnx.Linear(10, 4, rngs=rngs), jax.nn.relu, nnx.Linear(4, 3, rngs=rngs))


@pytest.fixture(scope='module')
def linear_task():
  ds = synthetic_task('synthetic_linear', seed=3)
  xs, ys = zip(*[ds.train.client(k) for k in range(ds.train.num_clients)])
  xs = [x[:1 + k % 4] for k, x in enumerate(xs)]
  ys = [y[:1 + k % 4] for k, y in enumerate(ys)]
  return client_data(stack_clients(xs, ys)), ds.train.num_clients


ROUND_REDUCERS = ['trimmed_mean', 'geomed', 'krum', 'multikrum', 'bulyan', 'centered_clip', 'norm_bound']


def all_reducers_aggregator():
  """FedAvg's step, and every robust reducer's result on the same stacked outputs kept in ``agg_state`` (so one
  compiled round per mapping checks them all)."""
  reducers = {n: robust.reducer_from_name(n) for n in ROUND_REDUCERS}
  mean = mean_aggregator()

  def aggregate(global_params, outs, weights, agg_state, info=None):
    new, _ = mean.aggregate(global_params, outs, weights, agg_state['mean'], info)
    reduced = {n: r(outs.params, weights, global_params) for n, r in reducers.items()}
    return new, {'mean': agg_state['mean'], 'prev': global_params, **reduced}

  return Aggregator(lambda gp: {'mean': mean.init(gp), 'prev': gp, **{n: gp for n in reducers}}, aggregate)


def test_vmapped_round_equals_sequential_for_each_reducer(linear_task):
  data, k = linear_task
  alg = algorithms.fedavg(mlp, loss='mse', lr=0.05, batch_size=2).replace(aggregator=all_reducers_aggregator())
  s_v = s_s = alg.init(jax.random.key(0), k)
  vmap_round = make_round(alg, clients_per_round=7, mapping=vmap_clients())
  seq_round = make_round(alg, clients_per_round=7, mapping=sequential_clients())
  for _ in range(2):
    s_v, _ = vmap_round(s_v, data)
    s_s, _ = seq_round(s_s, data)
  for name in ROUND_REDUCERS:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=name, **TOL),
                 s_v.agg_state[name], s_s.agg_state[name])
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), s_v.agg_state[name],
                         s_v.agg_state['prev'])
    assert max(jax.tree.leaves(moved)) > 1e-4, name  # each reducer moved off the round's start (no fallback)


@pytest.mark.parametrize('name', sorted(robust.REDUCERS))
def test_empty_group_passes_through(name):
  # a params group without leaves (e.g. FLoRAL's shared part of a fully adapted model) comes back as it is
  got = robust.reducer_from_name(name)({'a': {}}, jnp.ones(3), {'a': {}})
  assert got == {'a': {}}

"""FLoRAL's router options (experiments/router_study): each changes only what it claims; defaults are the paper's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.federated import client_data, make_round
from fedjax_adapters.federated.round import client_keys

K = 4


def mlp(rngs):
  return nnx.Sequential(nnx.Linear(3, 6, rngs=rngs), jax.nn.relu, nnx.Linear(6, 2, rngs=rngs))


def data():
  rng = np.random.default_rng(0)
  rows = (4, 3, 4, 2)
  return client_data(stack_clients([rng.normal(size=(n, 3)).astype(np.float32) for n in rows],
                                   [rng.normal(size=(n, 2)).astype(np.float32) for n in rows]))


def floral(**options):
  return algorithms.floral(mlp, num_adaptors=3, loss='mse', lr=0.1, router_lr=0.3, batch_size=2, rank=1, **options)


def start(alg):
  """A state whose routers already differ (at zero logits every temperature gives the same uniform weights)."""
  state = alg.init(jax.random.key(0), K)
  logits = jax.random.normal(jax.random.key(1), (K, 3))
  return state._replace(clients=dict(state.clients, logits=logits))


def run(alg, state):
  return make_round(alg, clients_per_round=K)(state, data())


def _np(x):
  return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(_np(x), _np(y)), a, b)


def test_aggregation_temperature_none_is_the_router_temperature():
  t = 0.5
  default, _ = run(floral(temperature=t), start(floral(temperature=t)))
  explicit, _ = run(floral(temperature=t, aggregation_temperature=t), start(floral(temperature=t)))
  assert_same(default, explicit)


def test_aggregation_temperature_reweighs_only_the_adaptors_by_hand_p_k_given_c():
  t_agg = 0.2
  alg, default = floral(aggregation_temperature=t_agg), floral()
  state = start(alg)
  new, metrics = run(alg, state)
  ref, _ = run(default, state)
  # Clients train exactly as before; the base (weighed by p(k)) and the routers are untouched by the option.
  for part in ('base', 'stats'):
    assert_same(new.global_params[part], ref.global_params[part])
  assert_same(new.clients, ref.clients)
  assert not np.allclose(new.global_params['adapters']['layers'][0]['global_a'],
                         ref.global_params['adapters']['layers'][0]['global_a'])
  # By hand: p(k|c) from softmax(w_k / T_agg) of the clients' new logits, times n_k, normalized over clients.
  ids = metrics['client_ids']
  cdata = jax.tree.map(lambda x: x[ids], data())
  local = jax.tree.map(lambda x: x[ids], state.clients)
  outs, new_local, _ = jax.vmap(alg.client_update, in_axes=(None, None, 0, 0, 0))(
      state.frozen, state.global_params, local, cdata, client_keys(state, ids))
  w = np.asarray(new_local['logits'], np.float64) / t_agg
  q = np.asarray(cdata.count, np.float64)[:, None] * np.exp(w - w.max(1, keepdims=True))
  q /= np.exp(w - w.max(1, keepdims=True)).sum(1, keepdims=True)
  p_kc = q / q.sum(0, keepdims=True)
  want = jax.tree.map(lambda x: np.einsum('kc,kc...->c...', p_kc, np.asarray(x, np.float64)),
                      outs.params['adapters'])
  jax.tree.map(lambda got, exp: np.testing.assert_allclose(np.asarray(got), exp, rtol=2e-5, atol=1e-6),
               new.global_params['adapters'], want)


@pytest.mark.parametrize('bad', [0.0, -1.0])
def test_aggregation_temperature_must_be_positive(bad):
  with pytest.raises(ValueError, match=f'aggregation_temperature must be > 0.*got {bad}'):
    floral(aggregation_temperature=bad)


def test_balance_rate_zero_adds_no_offsets_and_changes_nothing():
  alg = floral(balance_rate=0.0)
  assert 'router_offset' not in alg.init(jax.random.key(0), K).global_params
  a, _ = run(alg, start(alg))
  b, _ = run(floral(), start(floral()))
  assert_same(a, b)


def test_balance_offsets_route_like_shifted_logits_and_move_toward_equal_use_by_hand():
  rate = 0.5
  alg = floral(balance_rate=rate, aggregation_temperature=0.3)
  state = start(alg)
  offset = jnp.array([0.4, -0.2, 0.1])
  state = state._replace(global_params=dict(state.global_params, router_offset=offset))
  new, metrics = run(alg, state)
  # The same round without offsets, from logits already shifted by them: same model, same aggregation.
  plain = floral(aggregation_temperature=0.3)
  shifted = state._replace(global_params={k: v for k, v in state.global_params.items() if k != 'router_offset'},
                           clients=dict(state.clients, logits=state.clients['logits'] + offset))
  ref, _ = run(plain, shifted)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  jax.tree.map(close, {k: v for k, v in new.global_params.items() if k != 'router_offset'}, ref.global_params)
  close(new.clients['logits'] + offset, ref.clients['logits'])
  # offset_c += rate * (1/C - u_c), u_c: the example-weighted mean of softmax((w_k + offset) / T_agg).
  ids = np.asarray(metrics['client_ids'])
  w = (np.asarray(ref.clients['logits'], np.float64)[ids]) / 0.3
  p = np.exp(w - w.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  n = np.asarray(data().count, np.float64)[ids]
  usage = (n[:, None] * p).sum(0) / n.sum()
  close(new.global_params['router_offset'], np.asarray(offset) + rate * (1 / 3 - usage))


def test_balance_offsets_get_no_client_gradient():
  alg = floral(balance_rate=1.0)
  state = start(alg)
  state = state._replace(global_params=dict(state.global_params, router_offset=jnp.array([0.4, -0.2, 0.1])))
  out, _, _ = jax.jit(alg.client_update)(state.frozen, state.global_params, jax.tree.map(lambda x: x[0], state.clients),
                                         jax.tree.map(lambda x: x[0], data()), jax.random.key(3))
  np.testing.assert_array_equal(out.params['router_offset'], state.global_params['router_offset'])


def test_balance_rate_must_not_be_negative():
  with pytest.raises(ValueError, match='balance_rate must be >= 0.*got -0.5'):
    floral(balance_rate=-0.5)

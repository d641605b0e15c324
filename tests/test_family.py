"""The personalized-LoRA family (FedSA-LoRA, Ditto, FLoRA, HetLoRA, FedALT): each against its paper's equations."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.algorithms import lora_parts
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.federated import client_data, make_round
from fedjax_adapters.nn import AdapterSpec

K = 4
SPEC = AdapterSpec(rank=2, alpha=2.0)  # scale alpha / r = 1


def mlp(rngs):
  return nnx.Sequential(nnx.Linear(3, 5, rngs=rngs), jax.nn.relu, nnx.Linear(5, 2, rngs=rngs))


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  rows = (4, 3, 4, 2)
  xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in rows]
  ys = [rng.normal(size=(n, 2)).astype(np.float32) for n in rows]
  return client_data(stack_clients(xs, ys))


def client(data, i):
  return jax.tree.map(lambda x: x[i], data)


def client_key(state, i):
  return jax.random.fold_in(jax.random.fold_in(state.key, state.round), i)


def hand_updates(alg, state, data):
  """Every client's (ClientOutput, new client state) from the algorithm's own client_update, one by one."""
  update = jax.jit(alg.client_update)
  out = []
  for i in range(K):
    c = jax.tree.map(lambda x: x[i], state.clients)
    o, new_c, _ = update(state.frozen, state.global_params, c, client(data, i), client_key(state, i))
    out.append((o, new_c))
  return out


def leaf_names(tree):
  return {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


# --- FedSA-LoRA -------------------------------------------------------------------------------------------------

def test_fedsa_lora_b_never_reaches_the_server(data):
  alg = algorithms.fedsa_lora(mlp, loss='mse', lr=0.1, batch_size=2, num_epochs=2, spec=SPEC)
  state = alg.init(jax.random.key(0), K)
  assert leaf_names(state.global_params) == {'global_a'} and leaf_names(state.clients) == {'global_b'}
  new, _ = make_round(alg, clients_per_round=K)(state, data)
  assert leaf_names(new.global_params) == {'global_a'}  # the server state holds no B
  hand = hand_updates(alg, state, data)
  assert all(leaf_names(o.params) == {'global_a'} for o, _ in hand)  # nor does any client's upload
  counts = np.asarray(data.count, np.float32)
  mean_a = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(counts, xs)) / counts.sum(), *[o.params for o, _ in hand])
  close(new.global_params, mean_a)
  for i, (_, c) in enumerate(hand):  # each client keeps its own B
    close(jax.tree.map(lambda x: x[i], new.clients), c)
  b = new.clients['adapters']['layers'][2]['global_b']
  assert not np.allclose(b[0], b[1]) and not np.allclose(b, 0)


# --- Ditto ------------------------------------------------------------------------------------------------------

def test_ditto_step_is_the_hand_computed_proximal_gradient_step(data):
  lr, lam = 0.1, 0.7
  alg = algorithms.ditto(mlp, loss='mse', lam=lam, lr=lr, batch_size=4, spec=SPEC)  # client 0: 4 rows, one step
  state = alg.init(jax.random.key(0), K)
  noise = lambda t, s: jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(s), x.shape), t)
  w0 = noise(state.global_params, 1)  # nonzero B, so every factor gets a gradient
  v0 = noise(jax.tree.map(lambda x: x[0], state.clients), 2)  # v != w: the proximal term acts
  (out, v1, _) = jax.jit(alg.client_update)(state.frozen, w0, v0, client(data, 0), client_key(state, 0))
  x, y = data.x[0], data.y[0]

  def task(adapters):
    pred, _ = alg.model.apply({**state.frozen, 'adapters': adapters}, x)
    return jnp.mean(jnp.mean(jnp.square(pred - y), -1))

  step = lambda p, g: jax.tree.map(lambda a, b: a - lr * b, p, g)
  grad_v = jax.grad(task)(v0['adapters'])
  prox = jax.tree.map(lambda v, w: lam * (v - w), v0['adapters'], w0['adapters'])
  close(v1['adapters'], step(v0['adapters'], jax.tree.map(jnp.add, grad_v, prox)))
  close(out.params['adapters'], step(w0['adapters'], jax.grad(task)(w0['adapters'])))
  # Predictions are the personal model's.
  np.testing.assert_allclose(alg.predict(state.frozen, w0, v1, x),
                             alg.model.apply({**state.frozen, 'adapters': v1['adapters']}, x)[0], rtol=1e-6)

"""The personalized-LoRA family (FedSA-LoRA, Ditto, FLoRA, HetLoRA, FedALT): each against its paper's equations."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.algorithms.fedalt import as_global
from fedjax_adapters.data.federated import stack_clients
from fedjax_adapters.federated import ClientOutput, client_data, make_round
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


# --- FLoRA ------------------------------------------------------------------------------------------------------

RANKS = (1, 2, 2, 1)


@pytest.fixture(scope='module')
def flora_round(data):
  alg = algorithms.flora(mlp, loss='mse', lr=0.1, batch_size=2, num_epochs=2, spec=AdapterSpec(rank=2, alpha=2.0),
                         ranks=RANKS)
  state = alg.init(jax.random.key(0), K)
  return alg, state, make_round(alg, clients_per_round=K)(state, data)[0]


def test_stacked_product_is_the_weighted_mean_of_client_products():
  rng = np.random.default_rng(3)
  a, b, p = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 2, 5)), rng.dirichlet(np.ones(3))
  np.testing.assert_allclose(algorithms.stacked_product(jnp.asarray(a), jnp.asarray(b), jnp.asarray(p)),
                             sum(p[k] * a[k] @ b[k] for k in range(3)), rtol=1e-5, atol=1e-6)


def test_flora_padded_round_equals_a_per_client_loop_at_true_ranks(data, flora_round):
  alg, state, new = flora_round
  init = state.global_params['adapters']
  counts = np.asarray(data.count, np.float64)
  expected = jax.tree.map(np.asarray, state.global_params['base'])
  hand = hand_updates(alg, state, data)
  for k, r in enumerate(RANKS):
    # The client's true-rank LoRA (alpha / r_k), started from the first r_k components of the padded init.
    true = algorithms.lora_fedavg(mlp, loss='mse', lr=0.1, batch_size=2, num_epochs=2,
                                  spec=AdapterSpec(rank=r, alpha=2.0, conv=False))
    start = {'adapters': jax.tree_util.tree_map_with_path(
        lambda p, x: x[..., :r] if str(p[-1].key) == 'global_a' else x[:, :r], init)}
    frozen = {'base': state.global_params['base'], 'stats': state.global_params['stats']}
    out, _, _ = jax.jit(true.client_update)(frozen, start, {}, client(data, k), client_key(state, k))
    padded = hand[k][0].params['adapters']['layers']
    for layer, node in out.params['adapters']['layers'].items():
      close(padded[layer]['global_a'][..., :r], node['global_a'])
      close(padded[layer]['global_b'][:, :r], node['global_b'])
      # masked components get no gradient: they stay at their init
      np.testing.assert_array_equal(padded[layer]['global_a'][..., r:], init['layers'][layer]['global_a'][..., r:])
      np.testing.assert_array_equal(padded[layer]['global_b'][:, r:], 0)
    for layer, node in out.params['adapters']['layers'].items():
      delta = (2.0 / r) * np.asarray(node['global_a'][0], np.float64) @ np.asarray(node['global_b'][0], np.float64)
      expected['layers'][layer]['base']['kernel'] = expected['layers'][layer]['base']['kernel'] + (
          counts[k] / counts.sum()) * delta
  close(new.global_params['base'], expected, rtol=1e-5, atol=1e-6)
  assert all(np.all(x == 0) for p, x in jax.tree_util.tree_flatten_with_path(new.global_params['adapters'])[0]
             if str(p[-1].key) == 'global_b')  # LoRA re-initialized: B = 0


def test_flora_merge_uses_the_layers_own_scaling(flora_round):
  alg, state, _ = flora_round
  adapters = jax.tree.map(lambda x: x + 0.5, state.global_params['adapters'])
  base = state.global_params['base']
  merged = jax.tree.map(lambda x: x, base)
  for layer, node in adapters['layers'].items():
    merged['layers'][layer]['base']['kernel'] = base['layers'][layer]['base']['kernel'] + (2.0 / 2) * (
        node['global_a'][0] @ node['global_b'][0])
  x = jnp.ones((2, 3))
  zero = jax.tree.map(jnp.zeros_like, adapters)
  close(alg.model.apply({**state.global_params, 'adapters': adapters}, x)[0],
        alg.model.apply({**state.global_params, 'base': merged, 'adapters': zero}, x)[0])


# --- HetLoRA ----------------------------------------------------------------------------------------------------

def test_product_sq_norm_is_the_frobenius_norm_of_the_product():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 5))
  np.testing.assert_allclose(algorithms.product_sq_norm(jnp.asarray(a), jnp.asarray(b)),
                             np.linalg.norm(a @ b) ** 2, rtol=1e-5)


def wide(rngs):
  return nnx.Sequential(nnx.Linear(3, 6, rngs=rngs), jax.nn.relu, nnx.Linear(6, 4, rngs=rngs))


def test_hetlora_padded_aggregation_equals_the_formula():
  ranks, gamma = (1, 2, 2, 3), 0.5
  alg = algorithms.hetlora(wide, loss='mse', lr=0.1, batch_size=2, ranks=ranks, prune_gamma=gamma,
                           spec=AdapterSpec(alpha=3.0))  # R = 3: scale 1
  state = alg.init(jax.random.key(0), K)
  rng = np.random.default_rng(5)
  ids = np.array([3, 1, 0])  # client 2 not sampled; slot order differs from ids
  w = np.array([2.0, 1.0, 3.0])
  params = jax.tree.map(lambda x: rng.normal(size=(3,) + x.shape).astype(np.float32), state.global_params['adapters'])
  r = np.array([ranks[i] for i in ids])
  act = (np.arange(3)[None] < r[:, None]).astype(np.float64)
  norm = np.zeros(3)
  for node in params['layers'].values():
    for k in range(3):
      norm[k] += np.linalg.norm((node['global_a'][k, 0] * act[k]) @ (node['global_b'][k, 0] * act[k][:, None])) ** 2
  p = np.sqrt(norm) / np.sqrt(norm).sum()
  # Pretend clients 3 and 0 shrank their tails (the start's tails are > 0) and client 1 did not.
  tails = np.array([0.0, 1e9, 0.0], np.float32)
  outs = ClientOutput(
      {'adapters': params, 'ranks': state.global_params['ranks']}, jnp.asarray(w),
      {'id': jnp.asarray(ids, jnp.float32), 'tail': jnp.asarray(tails), 'norm': jnp.asarray(norm, jnp.float32)})
  start = dict(state.global_params, adapters=jax.tree.map(lambda x: x + 0.5, state.global_params['adapters']))
  new, _ = alg.aggregator.aggregate(start, outs, jnp.asarray(w), ())
  for layer, node in params['layers'].items():
    a = sum(p[k] * node['global_a'][k] * act[k] for k in range(3))
    b = sum(p[k] * node['global_b'][k] * act[k][:, None] for k in range(3))
    close(new['adapters']['layers'][layer]['global_a'], a)
    close(new['adapters']['layers'][layer]['global_b'], b)
  # Self-pruning: floor(0.5 * 3) = 1 for client 3, max(1, floor(0.5 * 1)) = 1 for client 0; 1 and 2 keep theirs.
  np.testing.assert_array_equal(new['ranks'], [1, 2, 2, 1])


def test_hetlora_round_trains_only_each_clients_ranks(data):
  ranks = (1, 2, 3, 2)
  alg = algorithms.hetlora(mlp, loss='mse', lr=0.1, batch_size=2, ranks=ranks, prune_gamma=0.5, prune_lambda=0.1,
                           spec=AdapterSpec(alpha=3.0, target=r'layers\.0'))  # 3 -> 5: ranks up to 3
  state = alg.init(jax.random.key(0), K)
  state = state._replace(global_params=dict(state.global_params, adapters=jax.tree.map(
      lambda x: x + 0.1, state.global_params['adapters'])))
  for k, (out, _) in enumerate(hand_updates(alg, state, data)):
    for layer, node in out.params['adapters']['layers'].items():
      start = state.global_params['adapters']['layers'][layer]
      np.testing.assert_array_equal(node['global_a'][..., ranks[k]:], start['global_a'][..., ranks[k]:])
      np.testing.assert_array_equal(node['global_b'][:, ranks[k]:], start['global_b'][:, ranks[k]:])
      assert not np.allclose(node['global_b'][:, :ranks[k]], start['global_b'][:, :ranks[k]])
  new, _ = make_round(alg, clients_per_round=K)(state, data)
  assert np.all(np.asarray(new.global_params['ranks']) <= np.asarray(ranks))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new.global_params))


# --- FedALT -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def fedalt_alg():
  return algorithms.fedalt(mlp, loss='mse', lr=0.1, batch_size=2, input_dim=3,
                           spec=AdapterSpec(rank=2, alpha=2.0, num_local=1))


def test_fedalt_rest_of_world_excludes_the_clients_own(data, fedalt_alg):
  alg = fedalt_alg
  state = alg.init(jax.random.key(0), K)
  table = jax.tree.map(lambda t: t + jax.random.normal(jax.random.key(7), t.shape), state.global_params['table'])
  for k in range(K):
    others = jax.tree.map(lambda t: np.mean(np.delete(np.asarray(t), k, axis=0), axis=0), table)
    close(algorithms.rest_of_world(table, jnp.int32(k)), others)
    # With the gate shut (g(x) ~ 0) the client's model is the base plus the rest-of-world LoRA only.
    c = jax.tree.map(lambda x: x[k], state.clients)
    c = dict(c, gate={'w': c['gate']['w'], 'b': jnp.float32(-60.0)})
    want = alg.model.apply({**state.frozen, 'adapters': as_global(others),
                            'local': jax.tree.map(jnp.zeros_like, c['own'])}, data.x[k])[0]
    close(alg.predict(state.frozen, {'table': table}, c, data.x[k]), want)


def test_fedalt_round_replaces_the_table_rows_of_clients_that_trained(data, fedalt_alg):
  alg = fedalt_alg
  state = alg.init(jax.random.key(0), K)
  table = jax.tree.map(lambda t: t + 0.3 * jax.random.normal(jax.random.key(8), t.shape), state.global_params['table'])
  state = state._replace(global_params={'table': table}, clients=dict(state.clients, own=table))  # own = last sent
  new, _ = make_round(alg, clients_per_round=K)(state, data)
  for k, (_, c) in enumerate(hand_updates(alg, state, data)):
    close(jax.tree.map(lambda t: t[k], new.global_params['table']), c['own'])
    close(jax.tree.map(lambda t: t[k], new.clients), c)
    assert not np.allclose(c['gate']['w'], 0)  # the gate trains


# --- API fixes from trying it as a new user ---------------------------------------------------------------------

def test_feddpa_personalize_names_the_type_it_wants():
  from fedjax_adapters.algorithms import feddpa
  from fedjax_adapters.data.federated import FederatedData
  fed = FederatedData(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.int32), np.array([3, 2], np.int32))
  with pytest.raises(TypeError, match='ClientData.*got FederatedData'):
    feddpa.personalize(None, None, fed)


def test_peft_export_of_a_non_language_model_loads_in_peft_as_a_plain_torch_module(tmp_path):
  import torch
  from peft import PeftModel
  from fedjax_adapters import interop
  alg = algorithms.lora_fedavg(mlp, loss='mse', lr=0.1, batch_size=2, spec=SPEC)
  state = alg.init(jax.random.key(0), 1)
  adapters = jax.tree.map(lambda x: x + 0.2, state.global_params['adapters'])
  parts = {**state.frozen, 'adapters': adapters}
  interop.export_global_adapter(tmp_path / 'lora', parts, alpha=2.0)
  import json
  assert json.loads((tmp_path / 'lora' / 'adapter_config.json').read_text())['task_type'] is None

  class Torch(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.layers = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))

    def forward(self, x):
      return self.layers(x)

  def peft_outputs(folder, x):
    net = Torch()
    with torch.no_grad():
      for i in (0, 2):
        net.layers[i].weight.copy_(torch.tensor(np.asarray(parts['base']['layers'][i]['base']['kernel']).T))
        net.layers[i].bias.copy_(torch.tensor(np.asarray(parts['base']['layers'][i]['base']['bias'])))
    with torch.no_grad():
      return PeftModel.from_pretrained(net, str(folder))(torch.tensor(x)).numpy()

  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  np.testing.assert_allclose(peft_outputs(tmp_path / 'lora', x), alg.model.apply(parts, x)[0], rtol=1e-5, atol=1e-5)
  assert interop.default_task_type({'embed': {'embedding': np.zeros((3, 2))}}) == 'CAUSAL_LM'
  # A FedSA-LoRA client's LoRA (shared A, its own B) and a Ditto client's personal LoRA export the same way.
  for name in ('fedsa_lora', 'ditto'):
    member = FAMILY[name]()
    state = member.init(jax.random.key(0), 2)
    state = state._replace(clients=jax.tree.map(lambda c: c + 0.3, state.clients))
    client = jax.tree.map(lambda c: c[1], state.clients)
    personal = (algorithms.merge_dicts(state.global_params['adapters'], client['adapters']) if name == 'fedsa_lora'
                else client['adapters'])
    interop.export_global_adapter(tmp_path / name, {**state.frozen, 'adapters': personal}, alpha=2.0)
    ours = member.predict(state.frozen, state.global_params, client, jnp.asarray(x))
    np.testing.assert_allclose(peft_outputs(tmp_path / name, x), ours, rtol=1e-5, atol=1e-5)


# --- Every member: predictions equal evaluation after a round -----------------------------------------------------

FAMILY = {
    'fedsa_lora': lambda: algorithms.fedsa_lora(mlp, loss='mse', lr=0.1, batch_size=2, spec=SPEC),
    'ditto': lambda: algorithms.ditto(mlp, loss='mse', lr=0.1, batch_size=2, lam=0.5, spec=SPEC),
    'flora': lambda: algorithms.flora(mlp, loss='mse', lr=0.1, batch_size=2, spec=AdapterSpec(rank=2, alpha=2.0),
                                      ranks=RANKS),
    'hetlora': lambda: algorithms.hetlora(mlp, loss='mse', lr=0.1, batch_size=2, ranks=RANKS, prune_gamma=0.5,
                                          spec=AdapterSpec(alpha=2.0)),
}


@pytest.mark.parametrize('name', sorted(FAMILY) + ['fedalt'])
def test_predictions_equal_evaluation(name, data, request):
  from fedjax_adapters.federated import evaluate, predict
  alg = request.getfixturevalue('fedalt_alg') if name == 'fedalt' else FAMILY[name]()
  state = alg.init(jax.random.key(0), K)
  state, _ = make_round(alg, clients_per_round=K)(state, data)
  out = np.asarray(predict(alg, state, data))
  mask = np.arange(out.shape[1])[None] < np.asarray(data.count)[:, None]
  per_row = np.mean(np.square(out - np.asarray(data.y)), -1)
  np.testing.assert_allclose(np.asarray(evaluate(alg, state, data)['loss']), np.sum(per_row * mask, 1), rtol=1e-5)


# --- The FLoRAL runner ------------------------------------------------------------------------------------------

def test_the_floral_runner_builds_every_family_member_and_rejects_flora_on_a_language_model():
  from fedjax_adapters.experiments import floral_tasks
  from fedjax_adapters.experiments.configs import floral as configs
  task = configs.TASKS['synthetic_mlp']
  fed = floral_tasks.load_data(task, 0)
  for name in configs.FAMILY_KINDS:
    assert floral_tasks.build_algorithm(name, task, fed).name == name
  assert floral_tasks.family_ranks(8, 4) == [8, 4, 2, 8]
  lm = configs.TASKS['shakespeare']
  with pytest.raises(ValueError, match="flora, hetlora: .*'next_token_lm'"):
    configs.check_methods(lm, ['fedavg', 'flora', 'hetlora'])

"""FedDPA on a tiny random LLaMA and on a small NNX MLP: the weight table, phases, aggregation, the shared base,
personalization through the client mapping, instance weights, predictions, batched weighted decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters.algorithms import feddpa as F
from fedjax_adapters.algorithms.feddpa import (client_parts, feddpa, instance_weights, lm_spec, mixing_weights,
                                               personalize, prompt_embeddings, token_loss)
from fedjax_adapters.federated.client_update import Batch, ClientData
from fedjax_adapters.nn import AdapterSpec
from fedjax_adapters.data.feddpa import sample_references
from fedjax_adapters.federated import evaluate, make_round, predict, sequential_clients
from fedjax_adapters.models import llama

CONFIG = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
K, N, L = 3, 4, 10


def tiny_llama(rngs):
  return llama.Llama(CONFIG, rngs=rngs)


def lm_data(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, CONFIG.vocab_size, (K, N, L)).astype(np.int32)
  attn = np.ones((K, N, L), np.int32)
  attn[:, :, -2:] = 0  # right padding
  loss = np.zeros((K, N, L), np.int32)
  loss[:, :, 5:8] = 1  # "response" tokens
  counts = np.array([4, 3, 2], np.int32)  # uneven clients
  x = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(attn), 'loss_mask': jnp.asarray(loss)}
  return ClientData(x, jnp.zeros((K, N), jnp.int32), jnp.asarray(counts))


_ALGS, _ROUNDS = {}, {}


def make(variant):
  """One algorithm and one compiled round per variant for the whole module (compiles dominate test time)."""
  if variant not in _ALGS:
    spec = lm_spec(rank=2, alpha=4.0, dropout=0.05)
    _ALGS[variant] = feddpa(tiny_llama, variant=variant, spec=spec, lr=1e-2, batch_size=2, num_epochs=1)
  return _ALGS[variant]


def round_of(variant):
  if variant not in _ROUNDS:
    _ROUNDS[variant] = make_round(make(variant), clients_per_round=K)
  return _ROUNDS[variant]


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_vmapped_round_equals_sequential_and_base_is_stored_once():
  variant = 'feddpa_t'
  fd = make(variant)
  data = lm_data()
  state = fd.init(jax.random.key(0), K)
  # The base sits once in `frozen` (no client axis); the client store holds only local adapters and counters.
  base_shapes = jax.tree.map(jnp.shape, state.frozen['base'])
  assert base_shapes['model']['embed_tokens']['embedding'] == (CONFIG.vocab_size, CONFIG.hidden_size)
  store_leaves = jax.tree.leaves(state.clients)
  assert all(x.shape[0] == K for x in store_leaves)
  adapter_size = sum(x.size for x in jax.tree.leaves(state.global_params))
  assert sum(x.size for x in store_leaves) == K * (adapter_size + 1)  # local LoRA (same shapes) + counter
  v, s = state, state
  rv = round_of(variant)
  rs = make_round(fd, clients_per_round=K, mapping=sequential_clients())
  for _ in range(2):
    v, _ = rv(v, data)
    s, _ = rs(s, data)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6),
               (v.global_params, v.clients), (s.global_params, s.clients))
  assert leaves_equal(v.frozen, state.frozen)  # the base never changes


def test_feddpa_t_trains_local_from_the_second_participation_and_only_averages_global():
  fd = make('feddpa_t')
  data = lm_data()
  s0 = fd.init(jax.random.key(0), K)
  rf = round_of('feddpa_t')
  s1, _ = rf(s0, data)
  assert leaves_equal(s1.clients['local'], s0.clients['local'])  # round 0: global phase only
  assert not leaves_equal(s1.global_params, s0.global_params)
  s2, _ = rf(s1, data)
  for k in range(K):  # round 1: every client's local adapter moved, each differently
    assert not leaves_equal(jax.tree.map(lambda x: x[k], s2.clients['local']),
                            jax.tree.map(lambda x: x[k], s1.clients['local']))
  np.testing.assert_array_equal(s2.clients['seen'], [2, 2, 2])


def test_uniform_aggregation_is_the_plain_mean_of_client_globals():
  fd = make('fedit')
  data = lm_data()
  state = fd.init(jax.random.key(1), K)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(state.key, 0), i))(jnp.arange(K))
  update = jax.jit(fd.client_update)
  outs = [update(state.frozen, state.global_params, jax.tree.map(lambda x: x[k], state.clients),
                 jax.tree.map(lambda x: x[k], data), keys[k])[0] for k in range(K)]
  hand = jax.tree.map(lambda *xs: sum(xs) / K, *[o.params for o in outs])
  new, _ = round_of('fedit')(state, data)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new.global_params, hand)


def test_local_variant_never_changes_global_and_fedit_never_changes_local():
  data = lm_data()
  for variant, fixed in (('local', 'global'), ('fedit', 'local')):
    fd = make(variant)
    s0 = fd.init(jax.random.key(0), K)
    s1, _ = round_of(variant)(s0, data)
    if fixed == 'global':
      assert leaves_equal(s1.global_params, s0.global_params)
    else:
      assert leaves_equal(s1.clients['local'], s0.clients['local'])


def test_feddpa_f_local_is_the_global_fine_tuned_per_client():
  fd = make('feddpa_f')
  data = lm_data()
  s = fd.init(jax.random.key(0), K)
  s, _ = round_of('feddpa_f')(s, data)
  p = personalize(fd, s, data)
  p_seq = personalize(fd, s, data, mapping=sequential_clients())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), p.clients, p_seq.clients)
  assert leaves_equal(p.global_params, s.global_params)
  g = jax.tree.leaves(s.global_params['adapters'])
  for k in range(K):
    local_k = jax.tree.leaves(jax.tree.map(lambda x: x[k], p.clients['local']))
    assert [x.shape for x in local_k] == [x.shape for x in g]
    # Close to the global copy it started from, but fine-tuned.
    assert not all(np.array_equal(a, b) for a, b in zip(local_k, g))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(local_k, g)) < 0.5


def test_instance_weights_equal_the_formula_and_mixing_directions():
  rng = np.random.default_rng(0)
  t, r = rng.normal(size=(3, 5)), rng.normal(size=(3, 4, 5))
  w = instance_weights(jnp.asarray(t), jnp.asarray(r), lam=0.5)
  cos = np.einsum('td,tsd->ts', t / np.linalg.norm(t, axis=-1, keepdims=True),
                  r / np.linalg.norm(r, axis=-1, keepdims=True))
  np.testing.assert_allclose(w, 0.5 * cos.mean(-1), rtol=1e-5)
  wc = instance_weights(jnp.asarray(t), jnp.asarray(r), lam=0.5, clamp=(0.0, 1.0))
  assert float(wc.min()) >= 0.0
  gw, lw = mixing_weights(w, target='global')
  np.testing.assert_allclose(gw, w); np.testing.assert_allclose(lw, 1 - w)
  gw, lw = mixing_weights(w, target='local')
  np.testing.assert_allclose(lw, w); np.testing.assert_allclose(gw, 1 - w)
  with pytest.raises(ValueError, match='T, S, D'):
    instance_weights(jnp.asarray(t), jnp.asarray(r[:2]))
  with pytest.raises(ValueError, match="'global' or 'local'"):
    mixing_weights(w, target='both')


def trained_state():
  fd = make('feddpa_t')
  s = fd.init(jax.random.key(0), K)
  rf = round_of('feddpa_t')
  data = lm_data()
  for _ in range(2):
    s, _ = rf(s, data)
  return fd, s


def test_batched_weighted_decoding_equals_one_prompt_at_a_time():
  fd, s = trained_state()
  parts = client_parts(s, 1)
  rng = np.random.default_rng(3)
  ids = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (3, 6)).astype(np.int32))
  mask = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 1, 1, 1, 1, 1]], np.int32))
  e = prompt_embeddings(fd.model, parts, ids, mask, adapter='local')
  assert e.shape == (3, CONFIG.hidden_size)
  w = jnp.array([0.9, -0.2, 0.4])
  gw, lw = mixing_weights(w)
  batched = llama.greedy_decode(fd.model.bind(parts, global_weight=gw, local_weight=lw), ids, mask,
                                max_new_tokens=4, eos_id=0, pad_id=0)
  beams = llama.beam_search(fd.model.bind(parts, global_weight=jnp.repeat(gw, 2), local_weight=jnp.repeat(lw, 2)),
                            ids, mask, num_beams=2, max_new_tokens=3, eos_id=0, pad_id=0)
  for i in range(3):
    one = fd.model.bind(parts, global_weight=gw[i:i + 1], local_weight=lw[i:i + 1])
    alone = llama.greedy_decode(one, ids[i:i + 1], mask[i:i + 1], max_new_tokens=4, eos_id=0, pad_id=0)
    np.testing.assert_array_equal(batched[i], alone[0])
    one_b = fd.model.bind(parts, global_weight=jnp.repeat(gw[i:i + 1], 2), local_weight=jnp.repeat(lw[i:i + 1], 2))
    alone_b = llama.beam_search(one_b, ids[i:i + 1], mask[i:i + 1], num_beams=2, max_new_tokens=3, eos_id=0,
                                pad_id=0)
    np.testing.assert_array_equal(beams[i], alone_b[0])
  # The weights matter: all-global and all-local logits differ after training.
  lg = fd.model.apply(parts, ids, mask, global_weight=1.0, local_weight=0.0)[0]
  ll = fd.model.apply(parts, ids, mask, global_weight=0.0, local_weight=1.0)[0]
  assert float(jnp.max(jnp.abs(lg - ll))) > 1e-4


def test_token_loss_counts_only_response_tokens_of_real_rows():
  logits = jnp.zeros((2, 4, 5))
  ids = jnp.array([[1, 2, 3, 4], [1, 2, 3, 4]])
  lm = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]])
  total, count = token_loss(logits, ids, lm, jnp.array([True, False]))
  assert float(count) == 2
  np.testing.assert_allclose(total, 2 * np.log(5), rtol=1e-6)


def test_bad_input_errors():
  with pytest.raises(ValueError, match='matches no adaptable layer'):
    feddpa(tiny_llama, spec=lm_spec(target=r'.*\.c_attn'))
  with pytest.raises(ValueError, match='unknown FedDPA variant'):
    feddpa(tiny_llama, variant='feddpa_x')
  with pytest.raises(ValueError, match='rank 64 is larger'):
    feddpa(tiny_llama, spec=lm_spec(rank=64))


def test_weight_table_rows_and_phase_loss_uses_them():
  assert F.variant_weights('fedit') == F.VariantWeights(None, 0, F.GLOBAL, None, F.GLOBAL, None)
  assert F.variant_weights('local') == F.VariantWeights(F.LOCAL, 0, None, None, F.LOCAL, None)
  t = F.variant_weights('feddpa_t', mix_weight=0.3, embed_adapter='global')
  assert t == F.VariantWeights(F.Weights(0.7, 0.3), 1, F.GLOBAL, None, F.INSTANCE, F.GLOBAL)
  assert F.variant_weights('feddpa_f') == F.VariantWeights(None, 0, F.GLOBAL, F.GLOBAL, F.INSTANCE, F.LOCAL)
  with pytest.raises(ValueError, match='embed_adapter must be one of'):
    F.variant_weights('feddpa_t', embed_adapter='mixed')
  # A phase trains the model at its row's weights: the loss equals the hand-built forward at (0.7, 0.3).
  fd, s = trained_state()
  data = lm_data()
  x = jax.tree.map(lambda a: a[0, :2], data.x)
  batch = Batch(x, jnp.zeros(2), jnp.array([True, True]))
  local = jax.tree.map(lambda a: a[0], s.clients['local'])
  key = jax.random.key(5)
  value, (metrics, _) = F.phase_loss(fd.model, F.lm_forward, F.lm_loss, t.local_phase)(
      (s.global_params, local), s.frozen, batch, key, (s.global_params, local))
  logits, _ = fd.model.apply(client_parts(s, 0), x['input_ids'], x['attention_mask'], global_weight=0.7,
                             local_weight=0.3, dropout_key=key)
  total, count = token_loss(logits, x['input_ids'], x['loss_mask'], batch.mask)
  np.testing.assert_allclose(value, total / count, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], total, rtol=1e-6)
  # Predictions and embeddings read the same table: Local predicts with (0, 1); FedDPA embeds with its embed row.
  loc = make('local')
  gw, lw = F.prediction_weights(loc, s.frozen, s.global_params, local, x)
  np.testing.assert_array_equal(gw, [0.0, 0.0]); np.testing.assert_array_equal(lw, [1.0, 1.0])
  np.testing.assert_allclose(F.embed_examples(fd, s.frozen, s.global_params, local, x),
                             prompt_embeddings(fd.model, client_parts(s, 0), x['input_ids'], x['attention_mask']),
                             rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Any NNX model: a small MLP classifier with its own forward, loss and embedding
# ----------------------------------------------------------------------------------------------------------------------

class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def features(self, x):
    return nnx.relu(self.hidden(x))

  def __call__(self, x):
    return self.out(self.features(x))


def mlp_data(n=24, seed=0):
  """Three clients, each labelling the same kind of inputs with its own linear rule (a personal task each)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(K, n, 6)).astype(np.float32)
  rules = rng.normal(size=(K, 6, 3))
  y = np.argmax(np.einsum('knd,kdc->knc', x, rules), -1).astype(np.int32)
  return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.full((K,), n, jnp.int32))


def mlp_alg(variant):
  return feddpa(MLP, variant=variant, spec=lm_spec(target=r'(hidden|out)', rank=2, alpha=4.0, dropout=0.0),
                loss='xent', forward=lambda m, x: m(x), embed=lambda m, x: m.features(x), lr=3e-2, batch_size=8,
                num_epochs=2)


def test_generic_model_trains_and_predicts_with_instance_weights():
  alg, data = mlp_alg('feddpa_t'), mlp_data()
  state = alg.init(jax.random.key(0), K)
  round_fn = make_round(alg, clients_per_round=K)
  losses = []
  for _ in range(6):
    state, m = round_fn(state, data)
    losses.append([float(jnp.sum(m[f'{p}_loss']) / jnp.sum(m[f'{p}_count'])) for p in ('global', 'local')])
  # The shared global adapter cannot fit three different rules; each client's local adapter (trained from round 1)
  # learns its own, so the local phase's loss falls well below the global phase's.
  assert losses[-1][1] < 0.5 * losses[1][1] and losses[-1][1] < 0.6 * losses[-1][0]
  ref_idx = jnp.asarray(np.stack([sample_references(k, 24, 4, 24) for k in range(K)]))
  inputs = F.WithReferences(data.x, data.x, ref_idx)
  out = predict(alg, state, inputs)
  assert out.shape == (K, 24, 3)
  for k in range(K):  # by hand: embed with the local adapter alone, weigh, forward at the per-example weights
    parts = client_parts(state, k)
    feats = lambda x: alg.model.bind(parts, global_weight=0.0, local_weight=1.0).features(x)
    w = instance_weights(feats(data.x[k]), feats(data.x[k])[ref_idx[k]], lam=0.5)
    hand, _ = alg.model.apply(parts, data.x[k], global_weight=w, local_weight=1.0 - w)
    np.testing.assert_allclose(out[k], hand, rtol=2e-5, atol=1e-6)
  ev = evaluate(alg, state, ClientData(inputs, data.y, data.count))
  hand_correct = jnp.sum(jnp.argmax(out, -1) == data.y, axis=1)
  np.testing.assert_array_equal(ev['correct'], hand_correct)
  np.testing.assert_allclose(ev['count'], [24.0] * K)
  with pytest.raises(ValueError, match='pass WithReferences'):
    predict(alg, state, data.x)
  fedit = mlp_alg('fedit')
  s = fedit.init(jax.random.key(0), K)
  np.testing.assert_allclose(predict(fedit, s, data.x), predict(fedit, s, inputs), rtol=1e-6)


def test_feddpa_builder_errors():
  with pytest.raises(ValueError, match='weight_target must be one of'):
    feddpa(tiny_llama, weight_target='both')
  with pytest.raises(ValueError, match='one global and one local adaptor'):
    feddpa(tiny_llama, spec=AdapterSpec(target=r'.*\.q_proj', num_global=1, num_local=0))
  with pytest.raises(ValueError, match='loss must be one of'):
    feddpa(tiny_llama, loss='hinge')
  with pytest.raises(ValueError, match='lr must be finite and > 0'):
    feddpa(tiny_llama, lr=-1.0)

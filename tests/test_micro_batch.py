"""Micro-batching (gradient accumulation) in the client step: a step over micro-batches equals the full-batch step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_adapters.algorithms.feddpa import feddpa, lm_spec
from fedjax_adapters.federated import check_micro_batch, make_client_update, make_round
from fedjax_adapters.federated.client_update import ClientData
from fedjax_adapters.models import llama

CONFIG = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
K, N, L, B = 2, 4, 10, 4
# Response tokens per row differ (1, 4, 2, 6): however the step's shuffle pairs the rows, two micro-batches of 2 rows
# hold different token counts, so an unweighted mean of their mean losses is not the full batch's mean.
RESPONSE = ((5, 6), (3, 7), (5, 7), (1, 7))


def tiny_llama(rngs):
  return llama.Llama(CONFIG, rngs=rngs)


def lm_data():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, CONFIG.vocab_size, (K, N, L)).astype(np.int32)
  loss = np.zeros((K, N, L), np.int32)
  for r, (a, b) in enumerate(RESPONSE):
    loss[:, r, a:b] = 1
  x = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.ones((K, N, L), jnp.int32), 'loss_mask': jnp.asarray(loss)}
  return ClientData(x, jnp.zeros((K, N), jnp.int32), jnp.asarray([4, 3], jnp.int32))  # client 1 has a padding row


def one_round(micro_batch):
  """Two rounds of FedIT (one SGD step of batch 4 per client per round; dropout off): (initial state, final state,
  last metrics, the round)."""
  alg = feddpa(tiny_llama, variant='fedit', spec=lm_spec(rank=2, alpha=4.0, dropout=0.0),
               client_optimizer=optax.sgd(0.5), batch_size=B, num_epochs=1, micro_batch=micro_batch)
  round_fn = make_round(alg, clients_per_round=K)
  state = start = alg.init(jax.random.key(0), K)
  for _ in range(2):
    state, metrics = round_fn(state, lm_data())
  return start, state, metrics, round_fn


@pytest.fixture(scope='module')
def full():
  return one_round(None)


def test_micro_batched_step_equals_the_full_batch_step_and_compiles_once(full):
  start, ref, ref_metrics, _ = full
  _, state, metrics, round_fn = one_round(2)
  # SGD (not Adam, whose first step is lr * sign(g)) so the parameters show the gradient's scale; float32 sums taken
  # in another order: rtol 1e-5, atol 1e-7.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
               state.global_params, ref.global_params)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ref.global_params, start.global_params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the steps did move the adapters
  np.testing.assert_array_equal(np.asarray(metrics['global_tokens']), np.asarray(ref_metrics['global_tokens']))
  np.testing.assert_allclose(np.asarray(metrics['global_loss']), np.asarray(ref_metrics['global_loss']), rtol=1e-5)
  assert round_fn.compiled._cache_size() == 1  # pylint: disable=protected-access


def token_mean_loss(trainable, frozen, batch, key, anchor, client):
  """A linear model's squared error averaged over marked tokens: x [B, T, D] @ w [D] against t [B, T]."""
  del frozen, key, anchor, client
  w, _ = trainable
  m = batch.x['mask'] * batch.mask[:, None]
  total = jnp.sum(m * (batch.x['x'] @ w - batch.y) ** 2)
  return total / jnp.maximum(jnp.sum(m), 1.0), ({'loss': total, 'tokens': jnp.sum(m)}, {})


def test_accumulation_weights_micro_batches_by_what_the_loss_averages_over():
  """Weighted by tokens the accumulated step equals the full batch's; weighted by rows (the default, right for a
  row-mean loss) it does not, on rows with 1..4 marked tokens: the weighting is what makes the two equal."""
  rng = np.random.default_rng(1)
  mask = np.zeros((6, 5), np.float32)
  for r, n in enumerate((1, 4, 2, 3, 5, 1)):
    mask[r, :n] = 1
  data = ClientData({'x': jnp.asarray(rng.normal(size=(6, 5, 3)), jnp.float32), 'mask': jnp.asarray(mask)},
                    jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), jnp.asarray(5, jnp.int32))  # row 5 is padding
  w0 = jnp.asarray([0.3, -0.2, 0.1])

  def step(**kw):
    run = make_client_update(token_mean_loss, optax.sgd(0.1), batch_size=6, train='global', **kw)
    return np.asarray(run((), w0, (), data, jax.random.key(0))[0].params)

  ref = step()
  tokens = lambda metrics, mask: metrics['tokens']
  for m in (3, 2, 1):
    np.testing.assert_allclose(step(micro_batch=m, micro_weight=tokens), ref, rtol=1e-6, atol=1e-7)
  assert np.max(np.abs(step(micro_batch=2) - ref)) > 1e-3


@pytest.mark.parametrize('micro_batch, batch_size, match', [(3, 4, 'micro_batch=3 does not divide batch_size=4'),
                                                            (0, 4, 'got 0'), (-2, 4, 'got -2'), (2.0, 4, 'got 2.0')])
def test_bad_micro_batch_raises_naming_the_value(micro_batch, batch_size, match):
  with pytest.raises(ValueError, match=match):
    check_micro_batch(micro_batch, batch_size)
  with pytest.raises(ValueError, match=match):
    feddpa(tiny_llama, batch_size=batch_size, micro_batch=micro_batch)
  with pytest.raises(ValueError, match=match):
    make_client_update(lambda *a: None, optax.sgd(1.0), batch_size=batch_size, micro_batch=micro_batch)

"""Attacks (experiments only): attacker identities from a seed, each update attack equals its formula on hand-made
outputs (padding and honest clients untouched), label flipping, and an attack inside the compiled round."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from fedjax_adapters.federated import attacks
from fedjax_adapters.federated.client_update import ClientOutput


def test_attacker_mask_from_seed_and_fraction():
  a = attacks.attacker_mask(20, 0.3, seed=1)
  assert a.sum() == 6 and a.dtype == bool
  np.testing.assert_array_equal(a, attacks.attacker_mask(20, 0.3, seed=1))
  assert not np.array_equal(a, attacks.attacker_mask(20, 0.3, seed=2))
  assert attacks.attacker_mask(20, 0.0, seed=1).sum() == 0
  with pytest.raises(ValueError, match='1.5'):
    attacks.attacker_mask(20, 1.5, seed=1)


def setup():
  rng = np.random.default_rng(0)
  gp = {'w': np.full((2, 3), 0.5, np.float32), 'b': np.zeros(3, np.float32)}
  params = {k: (v[None] + rng.normal(size=(6,) + v.shape)).astype(np.float32) for k, v in gp.items()}
  outs = ClientOutput(params, jnp.ones(6))
  ids = jnp.array([4, 0, 7, 2, 9, 1])          # population of 10; slot 5 is padding
  mask = jnp.array([True, True, True, True, True, False])
  attackers = np.zeros(10, bool)
  attackers[[4, 7, 1]] = True                  # id 1 sits in the padding slot: not an attacker this round
  return gp, params, outs, ids, mask, attackers


BAD, HONEST = np.array([0, 2]), np.array([1, 3, 4])


@pytest.mark.parametrize('name,param', [('sign_flip', None), ('sign_flip', 10.0), ('scaling', 3.0), ('alie', None),
                                        ('alie', 1.5), ('ipm', 0.5), ('gaussian', 2.0)])
def test_update_attack_formula(name, param):
  gp, params, outs, ids, mask, attackers = setup()
  got = jax.jit(attacks.make_adversary(name, attackers, param))(gp, outs, ids, mask, jax.random.key(3)).params
  for k in gp:
    u = params[k] - gp[k][None]
    sent = np.asarray(got[k]) - gp[k][None]
    np.testing.assert_array_equal(np.asarray(got[k])[[1, 3, 4, 5]], params[k][[1, 3, 4, 5]])
    mean, std = u[HONEST].mean(0), u[HONEST].std(0)
    expected = {'sign_flip': -(param or 1.0) * u[BAD], 'scaling': (param or 0) * u[BAD],
                'alie': np.broadcast_to(mean - (param or norm.ppf((5 - (3 - 2)) / 5)) * std, sent[BAD].shape),
                'ipm': np.broadcast_to(-0.5 * mean, sent[BAD].shape)}.get(name)
    if name == 'gaussian':
      assert np.abs(sent[BAD]).max() < 20 and 1.0 < sent[BAD].std() < 4.0  # N(0, 2^2) draws, not the update
      assert not np.allclose(sent[0], sent[2])
    else:
      np.testing.assert_allclose(sent[BAD], expected, rtol=1e-5, atol=1e-6)


def test_alie_z_paper_rule():
  # n = 50, f = 12 (Baruch et al.'s example scale): s = 26 - 12 = 14, z = Phi^-1(36 / 50)
  np.testing.assert_allclose(float(attacks.alie_z(jnp.array(50), jnp.array(12))), norm.ppf(36 / 50), rtol=1e-5)


def test_flip_labels_only_attackers():
  y = np.arange(12).reshape(3, 4) % 10
  got = attacks.flip_labels(y, np.array([False, True, False]), 10)
  np.testing.assert_array_equal(got[[0, 2]], y[[0, 2]])
  np.testing.assert_array_equal(got[1], 9 - y[1])
  with pytest.raises(ValueError, match='float32'):
    attacks.flip_labels(y.astype(np.float32), np.array([False, True, False]), 10)


def test_unknown_attack_named():
  with pytest.raises(ValueError, match="'flip'"):
    attacks.make_adversary('flip', np.zeros(3, bool))


def test_attack_in_compiled_round_and_krum_resists():
  from flax import nnx
  from fedjax_adapters import algorithms
  from fedjax_adapters.data.synthetic import synthetic_task
  from fedjax_adapters.federated import client_data, make_round, mean_aggregator, robust
  ds = synthetic_task('synthetic_linear', seed=1)
  data, k = client_data(ds.train), ds.train.num_clients
  alg = algorithms.fedavg(lambda rngs: nnx.Sequential(nnx.Linear(10, 3, rngs=rngs)), loss='mse', lr=0.05,
                          batch_size=2)
  evil = attacks.make_adversary('sign_flip', attacks.attacker_mask(k, 0.2, seed=0), 10.0)

  def run(aggregator=None, adversary=None):
    a = alg if aggregator is None else alg.replace(aggregator=aggregator)
    state, _ = make_round(a, clients_per_round=k, adversary=adversary).run(a.init(jax.random.key(0), k), data, 3)
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.global_params)])

  clean = run()
  off_mean = np.linalg.norm(run(adversary=evil) - clean)
  off_krum = np.linalg.norm(run(mean_aggregator(reducer=robust.krum(2, None)), evil) - clean)
  assert off_mean > 10 * off_krum, (off_mean, off_krum)

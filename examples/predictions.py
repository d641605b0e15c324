"""Per-client predictions with each client's personalized model (here: FLoRAL's router mixture), checked against
the library's per-client evaluation.

Run: python examples/predictions.py
"""
import jax
import numpy as np
from flax import nnx

import fedjax_adapters as fa
from fedjax_adapters.data.synthetic import synthetic_task


def model(rngs):
  return nnx.Sequential(nnx.Linear(10, 8, rngs=rngs), jax.nn.relu, nnx.Linear(8, 1, rngs=rngs))


def main(rounds=50):
  data = synthetic_task('synthetic_mlp', seed=0)    # 20 clients, 4 clusters
  alg = fa.floral(model, num_adaptors=4, loss='mse', lr=0.03, batch_size=8, rank=1)
  state = alg.init(jax.random.key(0), data.train.num_clients)
  state, _ = fa.make_round(alg, clients_per_round=20).run(state, fa.client_data(data.train), rounds)

  test = fa.client_data(data.test)
  out = np.asarray(fa.predict(alg, state, test))                  # [K, N, 1]: client k's model on its inputs
  real = np.arange(out.shape[1])[None, :] < np.asarray(test.count)[:, None]
  mse_per_client = (np.square(out - np.asarray(test.y)).mean(-1) * real).sum(1) / np.asarray(test.count)
  evaluated = fa.evaluate(alg, state, test)                       # per-client sums
  from_evaluate = np.asarray(evaluated['loss']) / np.asarray(evaluated['count'])
  print('per-client test MSE:', np.round(mse_per_client, 4))
  np.testing.assert_allclose(mse_per_client, from_evaluate, rtol=1e-5)
  # The same inputs through two clients' models differ: predictions are personalized.
  shared = fa.predict(alg, state, np.broadcast_to(np.asarray(test.x[:1]), test.x.shape))
  assert not np.allclose(shared[0], shared[1])
  return mse_per_client


if __name__ == '__main__':
  main()

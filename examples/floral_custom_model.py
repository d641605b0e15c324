"""FLoRAL on your own NNX model: two shared LoRA adaptors, each client's router learns which one fits it.

Run: python examples/floral_custom_model.py
"""
import jax
import numpy as np
from flax import nnx

import fedjax_adapters as fa
from fedjax_adapters.data.synthetic import synthetic_task


class Regressor(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.proj = nnx.Linear(10, 3, rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def main(rounds=400):
  data = synthetic_task('synthetic_linear', seed=0)  # 10 clients; client k in cluster k % 2
  alg = fa.floral(Regressor, num_adaptors=2, loss='mse', lr=0.1, batch_size=4, rank=1, router_lr=0.1)
  print('adapter spec:', alg.spec)
  state = alg.init(jax.random.key(0), data.train.num_clients)
  state, _ = fa.make_round(alg, clients_per_round=10).run(state, fa.client_data(data.train), rounds)
  probs = np.asarray(jax.nn.softmax(state.clients['logits'], axis=-1))
  for k, (p, c) in enumerate(zip(probs, data.clusters)):
    print(f'client {k} (true cluster {c}): router probabilities {np.round(p, 3)}')
  choice = probs.argmax(-1)
  # The router separates the clusters: one adaptor per cluster (which one is which is arbitrary).
  assert len(set(choice[data.clusters == 0])) == 1 and len(set(choice[data.clusters == 1])) == 1, choice
  assert choice[data.clusters == 0][0] != choice[data.clusters == 1][0], choice
  print('test MSE', fa.summarize(fa.evaluate(alg, state, data.test))['loss'])
  return probs


if __name__ == '__main__':
  main()

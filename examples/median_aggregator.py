"""A robust aggregator in user code: a weighted trimmed-mean reducer plugged into FedAvg with
alg.replace(aggregator=...), against two clients that send poisoned updates.

Run: python examples/median_aggregator.py
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fedjax_adapters as fa
from fedjax_adapters.data.synthetic import synthetic_task


def trimmed_mean(stacked, weights, fallback, trim=2):
  """Per coordinate: drop the `trim` largest and smallest values of the clients with weight > 0, average the rest."""
  def one(x, old):
    flat = x.reshape(x.shape[0], -1)
    live = (weights > 0)[:, None]
    lo = jnp.sort(jnp.where(live, flat, jnp.inf), axis=0)     # dead clients sort to the end
    keep = (jnp.arange(x.shape[0])[:, None] >= trim) & (jnp.arange(x.shape[0])[:, None] < jnp.sum(live) - trim)
    mean = jnp.sum(jnp.where(keep, lo, 0), 0) / jnp.maximum(jnp.sum(keep, 0), 1)
    return jnp.where(jnp.sum(live) > 2 * trim, mean.reshape(old.shape), old).astype(old.dtype)
  return jax.tree.map(one, stacked, fallback)


def model(rngs):
  return nnx.Sequential(nnx.Linear(10, 3, rngs=rngs))


def run(aggregator=None, rounds=30):
  data = synthetic_task('synthetic_linear', seed=1)
  y = np.array(data.train.y)
  y[:2] *= -50.0  # clients 0 and 1 are poisoned: their labels are flipped and scaled
  train = fa.client_data(data.train._replace(y=y))
  alg = fa.fedavg(model, loss='mse', lr=0.05, batch_size=2)
  if aggregator is not None:
    alg = alg.replace(aggregator=aggregator)
  state = alg.init(jax.random.key(0), data.train.num_clients)
  state, _ = fa.make_round(alg, clients_per_round=10).run(state, train, rounds)
  return fa.summarize(fa.evaluate(alg, state, data.test))['loss']


def main():
  mean = run()
  trimmed = run(fa.federated.mean_aggregator(reducer=trimmed_mean))
  median = run(fa.federated.mean_aggregator(reducer=fa.federated.coordinate_median))
  print(f'test MSE with 2 poisoned clients of 10: mean {mean:.2f}, trimmed mean {trimmed:.2f}, median {median:.2f}')
  assert trimmed < 0.1 * mean and median < 0.1 * mean, (mean, trimmed, median)
  return mean, trimmed, median


if __name__ == '__main__':
  main()

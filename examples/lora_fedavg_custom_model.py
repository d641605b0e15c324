"""LoRA-FedAvg (FedIT) on your own NNX model: freeze a "pretrained" classifier, federate a rank-4 LoRA on it.

Run: python examples/lora_fedavg_custom_model.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fedjax_adapters as fa


class Classifier(nnx.Module):
  """Any NNX model built from nnx.Linear / nnx.Conv / ... layers can be adapted."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(16, 32, rngs=rngs)
    self.head = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.gelu(self.hidden(x)))


def make_clients(num_clients=8, rows=40, seed=0):
  """Four Gaussian classes in 16-d; every client sees all classes (a shared task the frozen model does not know)."""
  means = np.random.default_rng(123).normal(0, 1.5, (4, 16))  # the task: the same four classes everywhere
  rng = np.random.default_rng(seed)
  xs, ys = [], []
  for _ in range(num_clients):
    y = rng.integers(0, 4, rows)
    xs.append((means[y] + rng.normal(0, 1, (rows, 16))).astype(np.float32))
    ys.append(y.astype(np.int32))
  return fa.client_data(fa.stack_clients(xs, ys))


def main():
  train, test = make_clients(seed=0), make_clients(seed=1)
  spec = fa.AdapterSpec(target=r'hidden|head', rank=4, alpha=8)  # plain LoRA on both layers
  alg = fa.lora_fedavg(Classifier, spec=spec, loss='xent', batch_size=8, client_optimizer=optax.adam(1e-2))
  state = alg.init(jax.random.key(0), num_clients=8)
  round_fn = fa.make_round(alg, clients_per_round=4)
  before = fa.summarize(fa.evaluate(alg, state, test))
  state, history = round_fn.run(state, train, 30)  # 30 rounds in one compiled loop
  after = fa.summarize(fa.evaluate(alg, state, test))
  train_loss = history['loss'].sum(1) / history['count'].sum(1)  # [rounds]: the sampled clients' mean loss
  print(f"test accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}; "
        f"training loss {float(train_loss[0]):.3g} (round 1) -> {float(train_loss[-1]):.3g} (round 30)")
  frozen0 = alg.init(jax.random.key(0), 8).frozen
  assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen0)))
  assert after['loss'] < 0.5 * before['loss'] and after['accuracy'] > before['accuracy'] + 0.2, (before, after)
  return before, after


if __name__ == '__main__':
  main()

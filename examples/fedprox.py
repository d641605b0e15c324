"""FedProx (Li et al. 2020) as a loss callable: the task loss plus mu/2 ||w - w_round_start||^2. No library code
is copied: the loss sees the round's starting parameters as `inputs.anchor`.

Run: python examples/fedprox.py
"""
import jax
import numpy as np
from flax import nnx

import fedjax_adapters as fa
from fedjax_adapters.data.synthetic import synthetic_task
from fedjax_adapters.algorithms import LossInputs, sq_distance, task_loss


def model(rngs):
  return nnx.Sequential(nnx.Linear(10, 16, rngs=rngs), jax.nn.relu, nnx.Linear(16, 3, rngs=rngs))


def fedprox_loss(mu):
  def loss(inputs: LossInputs):
    global_params, _ = inputs.params          # (global params, client state) being trained
    anchor, _ = inputs.anchor                 # the same at the start of the round
    return task_loss('mse', inputs) + 0.5 * mu * sq_distance(global_params, anchor)
  return loss


def run(mu, rounds=40):
  data = synthetic_task('synthetic_linear', seed=0)  # 10 clients in 2 clusters: drift
  alg = fa.fedavg(model, loss=fedprox_loss(mu), eval_loss='mse', lr=0.05, batch_size=2, num_epochs=5)
  state = alg.init(jax.random.key(0), data.train.num_clients)
  round_fn = fa.make_round(alg, clients_per_round=5)
  state, history = round_fn.run(state, fa.client_data(data.train), rounds)
  test_mse = fa.summarize(fa.evaluate(alg, state, data.test))['loss']
  drift = float(np.mean(history['update_norm'][-10:]))  # how far clients move from the global model
  return test_mse, drift


def main():
  (mse0, drift0), (mse1, drift1) = run(0.0), run(5.0)
  print(f'FedAvg  (mu=0): test MSE {mse0:.3f}, client update norm {drift0:.3f}')
  print(f'FedProx (mu=5): test MSE {mse1:.3f}, client update norm {drift1:.3f}')
  assert drift1 < 0.75 * drift0, (drift0, drift1)  # the proximal term holds clients closer to the global model
  assert np.isfinite(mse1) and mse1 < 3 * mse0, (mse0, mse1)
  return (mse0, drift0), (mse1, drift1)


if __name__ == '__main__':
  main()

"""FLoRAL's synthetic tasks (arXiv 2410.03497; public code ``conf/task/synthetic_{linear,mlp}.yaml``).

The paper reports these as test-MSE curves, not in its main table; the public notebooks print no numbers for them
(reference/floral.md §3: "Synthetic-task MSE numbers were not retrieved"). What is reproduced is the qualitative
claim: FLoRAL's learned router reaches (near-)oracle MSE, far below FedAvg.

Command: ``python -m experiments.floral --task synthetic_linear --json out/synthetic_linear.json``.
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from experiments.configs.common import FloralTask
from fedjax_adapters.data.synthetic import synthetic_task


def linear_model(rngs: nnx.Rngs) -> nnx.Module:
  """``Linear(10, 3)`` (wrapped so that adapt() can swap the layer)."""
  return nnx.Sequential(nnx.Linear(10, 3, rngs=rngs))


def mlp_model(rngs: nnx.Rngs) -> nnx.Module:
  """``10 -> 20 -> ReLU -> 1``."""
  return nnx.Sequential(nnx.Linear(10, 20, rngs=rngs), jax.nn.relu, nnx.Linear(20, 1, rngs=rngs))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig(FloralTask):
  """A synthetic task: its model factory plus the shared training settings."""
  model_fn: object

  def load(self, seed: int, *, data_dir=None):
    del data_dir  # unused: the data is generated
    return synthetic_task(self.name, seed=seed)

  def smoke(self) -> TaskConfig:
    """The same task for 2 rounds (tests)."""
    return dataclasses.replace(self, rounds=2)


SYNTHETIC = {
    # conf/task/synthetic_linear.yaml: 10 clients / 2 clusters, Linear(10,3), 2000 rounds, batch 4, lr 0.1.
    'synthetic_linear': TaskConfig(name='synthetic_linear', model_fn=linear_model, loss='mse', metric='test_mse',
                                   rounds=2000, batch_size=4, lr=0.1, router_lr=0.1),
    # conf/task/synthetic_mlp.yaml: 20 clients / 4 clusters, 10-20-1 MLP, 2000 rounds, batch 8, lr 0.03.
    'synthetic_mlp': TaskConfig(name='synthetic_mlp', model_fn=mlp_model, loss='mse', metric='test_mse',
                                rounds=2000, batch_size=8, lr=0.03, router_lr=0.1),
}

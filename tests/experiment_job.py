"""A run of the experiment API on a model of one's own, importable by tests and runnable as a process:
``python tests/experiment_job.py OUT ROUNDS`` (the kill -9 / signal tests start it, then resume in-process)."""
import os
import sys

from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fedjax_adapters as fa  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedjax_adapters.data.synthetic import synthetic_task  # pylint: disable=g-import-not-at-top,wrong-import-position


class TwoLayer(nnx.Module):
  """A model the library does not know: 10 -> 16 -> ReLU -> 3."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(10, 16, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def job():
  """``(algorithm, train, test)``: FLoRAL's two LoRA adaptors on :class:`TwoLayer`, the synthetic linear task."""
  data = synthetic_task('synthetic_linear', seed=0)
  alg = fa.floral(TwoLayer, num_adaptors=2, loss='mse', lr=0.1, batch_size=4, rank=1, router_lr=0.1)
  return alg, data.train, data.test


OPTIONS = dict(name='two_layer', seeds=[0, 1], clients_per_round=5, eval_every=50, checkpoint_every=20,
               keep_checkpoints=3, settings={'lr': 0.1}, quiet=True)


if __name__ == '__main__':
  out, rounds = sys.argv[1], int(sys.argv[2])
  compiled = len(sys.argv) < 4 or sys.argv[3] != 'dispatch'
  alg, train, test = job()
  result = fa.experiment.run(alg, train, test, rounds=rounds, out=out, compiled_loop=compiled, **OPTIONS)
  print(result.status, flush=True)

"""Your own model in a run directory: checkpoints, exact resume, progress, a report, through the run API.

Run: python examples/experiment_custom_model.py [OUT_DIR]
(A second call with the same OUT_DIR continues the run instead: fa.experiment.resume.)
"""
import os
import sys
import tempfile

from flax import nnx

import fedjax_adapters as fa
from fedjax_adapters.data.synthetic import synthetic_task
from fedjax_adapters.experiments import report


class Regressor(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(10, 16, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def main(out=None, rounds=60):
  out = out or os.path.join(tempfile.mkdtemp(), 'mine')
  data = synthetic_task('synthetic_linear', seed=0)  # 10 clients in 2 clusters
  alg = fa.floral(Regressor, num_adaptors=2, loss='mse', lr=0.1, batch_size=4, rank=1, router_lr=0.1)
  if os.path.exists(os.path.join(out, 'config.json')):  # an earlier call was stopped: continue it
    result = fa.experiment.resume(out, alg, data.train, data.test)
  else:
    result = fa.experiment.run(alg, data.train, data.test, rounds=rounds, out=out, name='my_task',
                               eval_every=20, checkpoint_every=20, seeds=[0, 1], settings={'lr': 0.1})
  print(result.status, result.metrics)
  assert result.status == 'done' and sorted(result.metrics) == [0, 1], result
  curve = result.results['units']['floral'][str(0)]['curve']
  assert [r for r, _ in curve] == [20, 40, 60] and curve[-1][1] < curve[0][1], curve  # test loss falls
  made = report.main([result.path, '--no-plots'])  # the run directory is a report input like any runner's
  assert '| floral |' in made['table'], made['table']
  return result


if __name__ == '__main__':
  main(*sys.argv[1:2])

"""The FLoRAL runner's natural-partition tasks (femnist, shakespeare, stackoverflow_nwp, cifar100_pachinko).

No copy of these datasets is on the development machine: their smoke runs read files of random content written in
each dataset's published format (``fedjax_adapters.data.generated``) through the same loaders as the real files.
Checked here: every task's smoke data (clients, shapes, label range, C, no true clusters), one task end to end, and
the command-line refusals (missing files, oracle routers) as one line before any training.
"""
import json
import os

import numpy as np
import pytest

from fedjax_adapters.experiments import floral, floral_tasks
from fedjax_adapters.experiments.configs import floral as configs
import cli_testing

SHAPES = {'femnist': ((28, 28, 1), np.uint8, 62), 'shakespeare': ((80,), np.int32, 90),
          'stackoverflow_nwp': ((20,), np.int32, 10_004), 'cifar100_pachinko': ((32, 32, 3), np.uint8, 100)}


@pytest.mark.parametrize('name', sorted(SHAPES))
def test_every_natural_smoke_task_loads_its_format_through_the_real_loader(name):
  task = configs.smoke(configs.TASKS[name])
  assert task.dataset in configs.NATURAL_DATASETS and task.shift is None
  data = floral_tasks.load_data(task, 0)
  shape, dtype, classes = SHAPES[name]
  assert data.train.num_clients == task.num_clients == 4 and data.num_clusters == task.num_clusters == 2
  np.testing.assert_array_equal(data.clusters, 0)   # no true clusters
  assert data.train.x.shape[2:] == shape and data.train.x.dtype == dtype
  assert int(data.train.counts.min()) > 0 and int(data.test.counts.min()) > 0
  assert int(data.train.y.max()) < classes
  if task.model == 'next_token_lm':
    assert floral_tasks.vocabulary_size(task) == classes


def test_the_natural_tasks_follow_the_public_code():
  for name in ('femnist', 'shakespeare', 'stackoverflow_nwp'):
    t = configs.TASKS[name]
    assert (t.num_clusters, t.lr, t.router_lr) == (10, 0.1, 0.1)
  assert [configs.TASKS[n].rounds for n in ('femnist', 'shakespeare', 'stackoverflow_nwp')] == [300, 1500, 300]
  assert [configs.TASKS[n].batch_size for n in ('femnist', 'shakespeare', 'stackoverflow_nwp')] == [32, 32, 64]
  assert configs.default_methods(configs.TASKS['femnist']) == (
      'fedavg', 'local_adaptor', 'ensemble', 'floral_1', 'floral_10')


def test_femnist_smoke_run_end_to_end(tmp_path):
  out = tmp_path / 'run'
  result = floral.main(['--task', 'femnist', '--smoke', '--methods', 'floral_1', '--out', str(out), '--quiet'])
  assert result['status'] == 'done' and result['task'] == 'femnist' and 'paper' not in result
  unit = result['units']['floral_1']['0']
  assert unit['status'] == 'done' and 0.0 <= unit['test_accuracy'] <= 1.0
  lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in lines] == [1, 2]
  assert np.asarray(lines[-1]['eval']['router_probs']).shape == (4, 2)


def _one_line_error(capsys, argv):
  return cli_testing.one_line_error(capsys, floral.main, argv)


def test_missing_files_and_oracle_routers_stop_before_any_training(capsys, tmp_path):
  out = tmp_path / 'run'
  err = _one_line_error(capsys, ['--task', 'femnist', '--data-dir', str(tmp_path), '--out', str(out)])
  assert f'the femnist data is not in --data-dir {tmp_path}: put there femnist.parquet' in err
  assert 'fed_emnist_train.h5 + fed_emnist_test.h5' in err and 'fed_emnist.tar.bz2' in err
  err = _one_line_error(capsys, ['--task', 'stackoverflow_nwp', '--out', str(out)])
  assert 'stackoverflow_train.h5 + stackoverflow.word_count' in err and '(no --data-dir given)' in err
  err = _one_line_error(capsys, ['--task', 'shakespeare', '--smoke', '--methods', 'fedavg', 'floral_1_oracle',
                                 '--out', str(out)])
  assert 'floral_1_oracle: an oracle router needs true clusters, and the shakespeare clients have none' in err
  assert not os.path.exists(out)

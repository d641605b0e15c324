"""The FLoRAL experiment runner and its configs: smoke runs, argument checks, divergence, configs, input pipeline."""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters.experiments import floral, floral_tasks
from fedjax_adapters.experiments.configs import floral as configs
from fedjax_adapters.experiments.runlib import cli
from fedjax_adapters.experiments.vision_input import VisionInput, random_crop, random_flip, rotate_quarter_turns
from fedjax_adapters import algorithms
from fedjax_adapters.data import partition, vision
from fedjax_adapters.federated import client_data
from fedjax_adapters.models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strict(text):
  def refuse(name):
    raise ValueError(f'non-standard constant {name}')
  return json.loads(text, parse_constant=refuse)


def _run(argv):
  """``floral.main(argv)`` as the command line runs it: (exit status, results)."""
  try:
    return 0, floral.main(argv)
  except SystemExit as e:
    return e.code, None


# ----------------------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------------------


def test_a_seed_trains_on_its_own_data_when_it_shares_a_compiled_round(tmp_path):
  """Seeds share the compiled round; seed 1's result must not depend on which seed compiled it (a cached step that
  kept the first seed's training data once made seed 1 of a two-seed run train on seed 0's partition)."""
  argv = ['--task', 'synthetic_linear', '--smoke', '--methods', 'fedavg', '--quiet']
  both = floral.main(argv + ['--seeds', '2', '--out', str(tmp_path / 'both')])
  alone = floral.main(argv + ['--seeds', '1:2', '--out', str(tmp_path / 'alone')])
  assert both['units']['fedavg']['1']['test_mse'] == alone['units']['fedavg']['1']['test_mse']


def test_smoke_run_writes_a_run_directory_and_the_json(tmp_path):
  # Every branch of build_algorithm (FedAvg, Local Adaptor, Ensemble, FLoRAL), an oracle router and an alias.
  methods = ['fedavg', 'local_adaptor', 'ensemble_oracle', 'floral_oracle']
  path, out = tmp_path / 'json' / 'smoke.json', tmp_path / 'run'
  result = floral.main(['--task', 'mnist_offline_label_shift', '--smoke', '--seeds', '2', '--json', str(path),
                        '--methods', *methods, '--out', str(out), '--quiet'])
  saved = _strict(path.read_text())
  assert saved == _strict((out / 'results.json').read_text()) == json.loads(json.dumps(result))
  assert saved['task'] == 'mnist_offline_label_shift' and saved['rounds'] == 2 and saved['seeds'] == [0, 1]
  assert saved['status'] == 'done' and list(saved['methods']) == methods
  for m in methods:
    r = saved['methods'][m]
    assert len(r['per_seed']) == 2 and all(0.0 <= a <= 1.0 for a in r['per_seed'])
    assert r['test_accuracy'] == pytest.approx(np.mean(r['per_seed']))
    assert r['std'] == pytest.approx(np.std(r['per_seed']))
    for seed in ('0', '1'):
      unit = saved['units'][m][seed]
      assert unit['status'] == 'done' and unit['test_accuracy'] in r['per_seed']
      assert os.path.isdir(out / unit['state'])  # the final state, as the last checkpoint
  # The paper's numbers of the column sit beside ours; the alias maps to FLoRAL(1%) with the oracle router.
  assert saved['paper']['column'] == 'MNIST-LS 5%'
  assert saved['paper']['methods']['floral_oracle'] == [87.6, 0.5]
  assert saved['paper']['methods']['fedavg'] == [23.2, 0.9]
  config = _strict((out / 'config.json').read_text())
  assert config['settings']['name'] == 'mnist_offline_label_shift' and config['settings']['smoke'] is True
  assert config['plan']['methods'] == methods and config['environment']['packages']['jax'] == jax.__version__
  lines = [_strict(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  assert sorted((r['method'], r['seed'], r['round']) for r in lines) == sorted(
      (m, s, r) for m in methods for s in (0, 1) for r in (1, 2))
  routed = [r for r in lines if r['method'] in ('ensemble_oracle', 'floral_oracle')]
  assert all(np.asarray(r['eval']['router_probs']).shape == (8, 4) for r in routed)


def test_cifar_smoke_model_augments_in_training_only():
  task = configs.smoke(configs.TASKS['cifar10_rotate'])
  data = floral_tasks.load_data(task, 0)
  x = jax.tree.map(lambda a: jnp.asarray(a[0, :4]), data.train.x)
  model = floral_tasks.model_fn(task)(nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnums=2)
  def forward(state, key, train):
    return nnx.merge(graphdef, state)(x, train=train, rngs=nnx.Rngs(key))

  train_a, train_b = forward(state, jax.random.key(1), True), forward(state, jax.random.key(2), True)
  eval_a, eval_b = forward(state, jax.random.key(1), False), forward(state, jax.random.key(2), False)
  assert train_a.shape == (4, 10)
  np.testing.assert_array_equal(eval_a, eval_b)  # no augmentation at evaluation
  assert not np.allclose(train_a, train_b)        # a fresh crop / flip per call in training


def _resolve(*argv):
  return floral.resolve_config(floral.build_parser().parse_args(list(argv)))


def test_switches_override_the_task_config():
  cfg = _resolve('--task', 'mnist_rotate', '--router-lr', '0.5', '--router-noise', '0', '--no-precondition',
                 '--fraction', '0.2', '--rounds', '7', '--server-adaptor-lr', '0.1', '--bias-init', 'zeros',
                 '--floor', 'none', '--rank', '8', '--shuffle')
  assert (cfg.router_lr, cfg.noise_std, cfg.precondition, cfg.fraction, cfg.rounds) == (0.5, 0.0, False, 0.2, 7)
  assert (cfg.server_adaptor_lr, cfg.bias_init, cfg.server_optimizer, cfg.server_lr) == (0.1, 'zeros', 'sgd', 1.0)
  assert (cfg.floor, cfg.rank, cfg.shuffle) == (None, 8, True) and isinstance(cfg.rank, int)
  default = _resolve('--task', 'cifar100')
  assert (default.server_optimizer, default.server_lr, default.lr, default.fraction) == ('adam', 1e-3, 1e-3, 0.5)
  assert default.augment and not _resolve('--task', 'cifar100', '--no-augment').augment
  # Switching the optimizer without a rate takes that optimizer's usual rate (Adam 1e-3, SGD 1).
  adam = _resolve('--task', 'mnist_rotate', '--server-opt', 'adam')
  assert (adam.server_optimizer, adam.server_lr) == ('adam', 1e-3)


def test_router_option_switches_reach_floral():
  cfg = _resolve('--task', 'synthetic_linear', '--aggregation-temperature', '0.1', '--balance-rate', '1')
  assert (cfg.aggregation_temperature, cfg.balance_rate) == (0.1, 1.0)
  default = _resolve('--task', 'synthetic_linear')
  assert (default.aggregation_temperature, default.balance_rate) == (None, 0.0)
  data = floral_tasks.load_data(cfg, 0)
  balanced = floral_tasks.build_algorithm('floral', cfg, data).init(jax.random.key(0), data.train.num_clients)
  assert balanced.global_params['router_offset'].shape == (data.num_clusters,)
  paper = floral_tasks.build_algorithm('floral', default, data).init(jax.random.key(0), data.train.num_clients)
  assert 'router_offset' not in paper.global_params
  for bad in (['--aggregation-temperature', '0'], ['--balance-rate', '-1']):
    with pytest.raises(SystemExit):
      floral.build_parser().parse_args(['--task', 'synthetic_linear'] + bad)


def test_config_file_then_set_then_flags(tmp_path):
  path = tmp_path / 'settings.json'
  path.write_text(json.dumps({'lr': 0.5, 'router_lr': 0.2, 'rounds': 9, 'floor': None}))
  cfg = _resolve('--task', 'synthetic_mlp', '--config', str(path), '--set', 'router_lr=0.3', 'rounds=11',
                 'precondition=false', '--rounds', '13')
  assert (cfg.lr, cfg.router_lr, cfg.rounds, cfg.floor, cfg.precondition) == (0.5, 0.3, 13, None, False)
  # A run's config.json works as a config file: its settings are taken over.
  (tmp_path / 'config.json').write_text(json.dumps({'runner': 'floral', 'settings': {'lr': 0.25}}))
  assert _resolve('--task', 'synthetic_mlp', '--config', str(tmp_path / 'config.json')).lr == 0.25


def test_print_config_shows_the_resolved_settings_without_training(capsys, tmp_path):
  code, _ = _run(['--task', 'synthetic_linear', '--set', 'lr=0.05', '--print-config', '--out', str(tmp_path / 'r')])
  assert code == 0
  shown = _strict(capsys.readouterr().out)
  assert shown['lr'] == 0.05 and shown['rounds'] == 2000 and shown['name'] == 'synthetic_linear'
  assert not (tmp_path / 'r').exists()


def test_print_config_into_a_closed_pipe_ends_quietly():
  """``--print-config | head -1``: the reader is gone before the JSON is written; no traceback, status 0."""
  proc = subprocess.Popen([sys.executable, '-m', 'fedjax_adapters.experiments.floral', '--task', 'synthetic_linear', '--print-config'],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
  proc.stdout.close()  # no reader left: the runner's write fails with EPIPE
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=120) == 0 and 'Error' not in err and 'Traceback' not in err, err


def test_server_adaptor_lr_steps_only_the_adaptors_at_their_own_rate():
  params = {'base': jnp.ones(3), 'adapters': jnp.ones(2)}
  grad = {'base': jnp.full(3, 2.0), 'adapters': jnp.full(2, 2.0)}
  opt = floral_tasks.server_optimizer('sgd', 1.0, adaptor_lr=0.1)
  updates, _ = opt.update(grad, opt.init(params), params)
  np.testing.assert_allclose(updates['base'], -2.0)
  np.testing.assert_allclose(updates['adapters'], -0.2)


def _one_line_error(capsys, argv) -> str:
  code, _ = _run(argv)
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
  return err


def test_unknown_task_and_method_list_the_valid_ones(capsys):
  err = _one_line_error(capsys, ['--task', 'mnist_rot'])
  assert "unknown task 'mnist_rot'" in err
  for name in ('mnist_rotate', 'cifar10_label_shift_reduced', 'cifar100', 'mnist_offline_rotate', 'synthetic_mlp'):
    assert name in err
  err = _one_line_error(capsys, ['--task', 'mnist_rotate', '--smoke', '--methods', 'fedavg', 'floral_5'])
  assert 'unknown method(s) floral_5' in err and all(name in err for name in configs.METHODS)
  with pytest.raises(ValueError, match='valid methods: fedavg, local_adaptor, ensemble'):
    floral_tasks.build_algorithm('fedprox', configs.smoke(configs.TASKS['mnist_rotate']), None)


@pytest.mark.parametrize('argv, words', [
    (['--eval-every', '0'], '--eval-every: must be >= 1'),
    (['--eval-every', '-1'], '--eval-every: must be >= 1'),
    (['--rounds', '-1'], '--rounds: must be >= 0'),
    (['--seeds', '-1'], 'seeds must be >= 0'),
    (['--seeds', '0', '0'], 'a seed twice'),
    (['--lr', 'inf'], '--lr: must be finite and > 0'),
    (['--lr', '0'], '--lr: must be finite and > 0'),
    (['--fraction', '1.5'], '--fraction: must lie in (0, 1]'),
    (['--set', 'lr=abc'], "lr='abc': expected a number"),
    (['--set', 'bogus=1'], 'unknown setting(s) bogus'),
    (['--set', 'temperature=-1'], 'temperature must be finite and > 0'),
    (['--data-dir', '/nonexistent/dir'], '--data-dir /nonexistent/dir: no such directory'),
    (['--config', '/nonexistent.json'], '--config /nonexistent.json'),
    # Plausibility: the right type, but values that cannot work (they used to fail mid-run, or run forever).
    (['--rank', '100000'], "rank 100000 is larger than model 'linear' allows: its smallest adapted layer takes at "
                           'most rank 3'),
    (['--rank', '1.5'], 'rank must be an integer rank (>= 1) or a float budget in (0, 1); got 1.5'),
    (['--rounds', '3000000000'], 'rounds must be <= 2147483647 (the round counter is an int32)'),
    (['--rounds', '1e12'], "--rounds: expected an integer, got '1e12'"),
    (['--num-epochs', '100000000'], 'num_epochs must be <= 1000'),
    (['--floor', '5'], 'floor must be <= 1/C = 0.5 (C = 2 router probabilities sum to 1); got 5.0'),
    (['--writer', 'comet'], "--writer: invalid choice: 'comet'"),
])
def test_bad_arguments_stop_before_any_training(capsys, tmp_path, argv, words):
  out = tmp_path / 'run'
  err = _one_line_error(capsys, ['--task', 'synthetic_linear', '--out', str(out)] + argv)
  assert words in err
  assert not out.exists()


def test_unwritable_output_paths_stop_before_any_training(capsys, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  err = _one_line_error(capsys, ['--task', 'synthetic_linear', '--out', str(blocker / 'run')])
  assert '--out' in err and 'not writable' in err
  err = _one_line_error(capsys, ['--task', 'synthetic_linear', '--out', str(tmp_path / 'run'),
                                 '--json', str(blocker / 'x.json')])
  assert '--json' in err and str(blocker / 'x.json') in err
  err = _one_line_error(capsys, ['--resume', str(tmp_path)])
  assert 'not a run directory' in err
  err = _one_line_error(capsys, ['--resume', str(tmp_path), '--rounds', '3'])
  assert '--resume continues a run with its own settings; drop --rounds' in err


@pytest.mark.parametrize('data_dir', [True, False])
def test_missing_tfds_dataset_says_how_to_prepare_it(capsys, tmp_path, monkeypatch, data_dir):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))  # without --data-dir tfds looks here: an empty directory
  argv = ['--task', 'cifar10_rotate', '--methods', 'fedavg', '--out', str(tmp_path / 'run')]
  err = _one_line_error(capsys, argv + (['--data-dir', str(tmp_path)] if data_dir else []))
  assert 'tfds build cifar10 --file_format=array_record' in err
  assert str(tmp_path) in err and '--data-dir DIR' in err


def test_a_diverging_method_fails_loudly_and_the_json_stays_strict(capsys, tmp_path):
  path = tmp_path / 'r.json'
  code, _ = _run(['--task', 'synthetic_linear', '--methods', 'fedavg', 'floral_oracle', '--rounds', '5', '--lr',
                  '1e6', '--out', str(tmp_path / 'run'), '--json', str(path), '--quiet'])
  err = capsys.readouterr().err
  assert code == 1
  doc = _strict(path.read_text())  # no bare NaN anywhere
  for method in ('fedavg', 'floral_oracle'):
    unit = doc['units'][method]['0']
    assert unit['status'] == 'failed' and unit['error'].startswith(f'{method} seed 0 round ')
    assert doc['methods'][method]['status'] == 'failed' and doc['methods'][method]['test_mse'] is None
    assert f'error: {unit["error"]}' in err
  assert doc['status'] == 'failed'
  lines = [_strict(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r for r in lines if 'error' in r][0]['error'] == doc['units']['fedavg']['0']['error']


def test_the_rank_limits_are_those_of_the_built_models():
  """configs.MAX_RANK is what each model's smallest adapted layer takes: the Local Adaptor builds at that rank and
  refuses one more."""
  for name in ('synthetic_linear', 'synthetic_mlp', 'mnist_offline_rotate', 'cifar10_rotate', 'cifar100', 'femnist',
               'shakespeare', 'stackoverflow_nwp'):
    task = configs.smoke(configs.TASKS[name])
    data = floral_tasks.load_data(task, 0)
    limit = configs.max_rank(task)
    alg = floral_tasks.build_algorithm('local_adaptor', dataclasses.replace(task, rank=limit), data)
    jax.eval_shape(lambda a=alg: a.init(jax.random.key(0), data.train.num_clients))
    with pytest.raises(ValueError, match=f'rank {limit + 1} is larger than the layer allows'):
      alg = floral_tasks.build_algorithm('local_adaptor', dataclasses.replace(task, rank=limit + 1), data)
      jax.eval_shape(lambda a=alg: a.init(jax.random.key(0), data.train.num_clients))


def test_help_imports_no_jax():
  code = ('import sys; from fedjax_adapters.experiments import floral; floral.build_parser().format_help(); '
          'heavy = [m for m in ("jax", "transformers", "nltk", "tensorflow_datasets") if m in sys.modules]; '
          'assert not heavy, heavy')
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


def test_there_is_a_task_for_every_table_column_and_both_offline_tasks():
  columns = {t.column for t in configs.TASKS.values() if t.column}
  assert columns == set(configs.COLUMNS)
  assert {'mnist_offline_rotate', 'mnist_offline_label_shift', 'synthetic_linear', 'synthetic_mlp'} <= set(
      configs.TASKS)
  for name, task in configs.TASKS.items():
    configs.validate(task)
    if task.dataset in configs.TFDS_DATASETS:
      assert name.endswith('_reduced') == (task.reduce == 0.05)
  # Every method's paper row exists in every column (the LoRA family's methods are not in FLoRAL's table).
  for method in configs.METHODS.values():
    assert method.paper_row is not None or method.kind in configs.FAMILY_KINDS
    assert method.paper_row is None or all(method.paper_row in configs.PAPER[c] for c in configs.COLUMNS)


def test_paper_table_spot_checks():
  assert configs.PAPER['MNIST-LS 5%']['floral_10'] == (70.8, 7.1)
  assert configs.PAPER['C100']['ensemble_oracle'] == (92.8, 0.3)
  assert configs.PAPER['C10-Rot']['local_adaptor'] == (66.3, 0.5)


def test_task_settings_follow_the_public_code():
  m, c10, c100 = configs.TASKS['mnist_rotate'], configs.TASKS['cifar10_label_shift_reduced'], configs.TASKS['cifar100']
  assert (m.num_clients, m.num_clusters, m.rounds, m.fraction, m.batch_size, m.lr, m.router_lr) == (
      300, 4, 500, 0.1, 32, 0.1, 0.1)
  assert (c10.num_clients, c10.rounds, c10.fraction, c10.batch_size, c10.lr, c10.router_lr, c10.reduce) == (
      20, 1500, 1.0, 64, 0.03, 0.3, 0.05)
  assert (c100.num_clients, c100.num_clusters, c100.model, c100.server_optimizer, c100.server_lr) == (
      100, 10, 'vgg8', 'adam', 1e-3)
  off = configs.TASKS['mnist_offline_label_shift']
  assert (off.dataset, off.rounds, off.router_lr, off.test_fraction) == ('mnist_offline', 1500, 0.3, 0.4)
  lin = configs.TASKS['synthetic_linear']
  assert (lin.rounds, lin.batch_size, lin.lr, lin.router_lr, lin.floor, lin.noise_std) == (2000, 4, 0.1, 0.1, 0.01, 1.0)


def test_config_validation_names_the_setting():
  task = configs.TASKS['mnist_rotate']
  for field, value, words in [('fraction', 0.0, 'fraction must lie in (0, 1]'), ('lr', float('nan'), 'lr must be'),
                              ('bias_init', 'ones', 'bias_init must be one of'), ('num_clusters', 3, 'quarter turns'),
                              ('shift', 'blur', 'shift must be one of')]:
    with pytest.raises(ValueError, match=words.replace('(', r'\(').replace(')', r'\)')):
      configs.validate(dataclasses.replace(task, **{field: value}))


@pytest.mark.parametrize('name', sorted(n for n, t in configs.TASKS.items()
                                         if t.dataset not in ('synthetic',) + configs.NATURAL_DATASETS))
def test_every_smoke_task_loads_shifted_random_data(name):
  task = configs.smoke(configs.TASKS[name])
  data = floral_tasks.load_data(task, 0)
  k = task.num_clients
  assert data.train.num_clients == k and data.num_clusters == task.num_clusters
  sizes = task.cluster_sizes
  expected = np.repeat(np.arange(task.num_clusters), sizes) if sizes else np.arange(k) % task.num_clusters
  np.testing.assert_array_equal(data.clusters, expected)
  x = data.train.x['image'] if task.shift == 'rotate' else data.train.x
  image_shape = vision.DATASETS[floral_tasks.image_dataset(task)].image_shape
  assert x.dtype == np.uint8 and x.shape[0] == k and x.shape[2:] == image_shape
  if task.shift == 'rotate':
    np.testing.assert_array_equal(data.train.x['turns'][:, 0], data.clusters)  # C = 4: one quarter turn per cluster
  assert task.rounds == 2 and int(data.test.counts.min()) > 0


def test_minority_cluster_task_sets_sizes_from_the_command_line_and_refuses_bad_ones(capsys, tmp_path):
  task = configs.TASKS['mnist_offline_label_shift_minority']
  data = floral_tasks.load_data(task, 0)
  np.testing.assert_array_equal(np.bincount(data.clusters), [120, 90, 60, 30])
  assert np.bincount(configs.smoke(task).cluster_sizes).tolist() == [0, 1, 2, 1]  # smoke sizes (3, 2, 2, 1)
  # Same images per client as the equal-cluster task; the label shift follows the cluster: client 1 is in cluster 0
  # here and in cluster 1 there, client 299 in cluster 3 in both.
  plain = floral_tasks.load_data(dataclasses.replace(task, cluster_sizes=None), 0)
  np.testing.assert_array_equal(data.train.x, plain.train.x)
  n = int(data.train.counts[1])
  np.testing.assert_array_equal(data.train.y[1, :n], (plain.train.y[1, :n] - 1) % 10)
  np.testing.assert_array_equal(data.train.y[299], plain.train.y[299])
  assert cli.apply_overrides(task, ['cluster_sizes=100, 100,70,30']).cluster_sizes == (100, 100, 70, 30)
  assert cli.apply_overrides(task, {'cluster_sizes': [150, 50, 50, 50]}).cluster_sizes == (150, 50, 50, 50)
  for value, words in [('100,100,100', 'cluster_sizes [100, 100, 100] must be num_clusters=4 positive counts'),
                       ('100,100,100,1', 'summing to num_clients=300'), ('1,2,x,4', "cluster_sizes='x'")]:
    err = _one_line_error(capsys, ['--task', 'mnist_offline_label_shift', '--set', f'cluster_sizes={value}',
                                   '--out', str(tmp_path / 'run')])
    assert words in err, err
  assert not (tmp_path / 'run').exists()
  # A run written before the setting existed (its config.json lacks it) still resumes, with equal clusters.
  settings = dataclasses.asdict(configs.TASKS['mnist_offline_label_shift'])
  del settings['cluster_sizes']
  assert floral.settings_from_config({'settings': settings}, 'config.json').cluster_sizes is None


def test_offline_task_gives_every_client_ten_training_images():
  data = floral_tasks.load_data(configs.TASKS['mnist_offline_label_shift'], 0)
  assert data.train.num_clients == 300
  np.testing.assert_array_equal(data.train.counts, 10)
  assert int(data.test.counts.sum()) == 2000


# ----------------------------------------------------------------------------------------------------------------------
# Input pipeline and call-time randomness
# ----------------------------------------------------------------------------------------------------------------------


def test_quarter_turns_match_the_partitioners_rotation():
  images = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
  turned = rotate_quarter_turns(jnp.asarray(images), jnp.arange(4))
  for k in range(4):
    np.testing.assert_array_equal(np.asarray(turned[k]), partition.rotate(images[k:k + 1], 90 * k)[0])


def test_crop_shifts_with_zero_fill_and_flip_mirrors():
  images = jnp.arange(2 * 5 * 5, dtype=jnp.float32).reshape(2, 5, 5, 1) + 1.0
  cropped = random_crop(jax.random.key(0), images, 2)
  for b in range(2):
    real = np.asarray(cropped[b])[np.asarray(cropped[b]) > 0]
    assert set(real.tolist()) <= set(np.asarray(images[b]).ravel().tolist())  # only shifted pixels and zeros
  flipped = random_flip(jax.random.key(1), images)
  for b in range(2):
    assert (np.array_equal(flipped[b], images[b]) or np.array_equal(flipped[b], images[b, :, ::-1]))


class _Identity(nnx.Module):

  def __call__(self, x, *, train=False, rngs=None):
    del train, rngs  # unused
    return x


def test_augmentation_happens_before_the_clusters_rotation():
  """A flip is horizontal in the original frame: on a 90°-turned image it is a vertical flip (public code order)."""
  model = VisionInput(_Identity(), flip=True)
  image = jnp.arange(16, dtype=jnp.uint8).reshape(1, 4, 4, 1)
  x = {'image': jnp.repeat(image, 64, 0), 'turns': jnp.ones((64,), jnp.int32)}
  out = np.asarray(model(x, train=True, rngs=nnx.Rngs(0))) * 255.0
  turned = np.rot90(np.asarray(image[0], np.float32), 1, axes=(0, 1))
  turned_flipped = np.rot90(np.asarray(image[0, :, ::-1], np.float32), 1, axes=(0, 1))
  kinds = {0 if np.allclose(o, turned) else 1 if np.allclose(o, turned_flipped) else 2 for o in out}
  assert kinds == {0, 1}
  np.testing.assert_allclose(turned_flipped, turned[::-1])  # i.e. a vertical flip of the turned image


def test_input_scales_uint8_and_needs_rngs_only_to_augment():
  net = MLP(rngs=nnx.Rngs(0))
  x = jnp.full((2, 28, 28, 1), 255, jnp.uint8)
  np.testing.assert_allclose(VisionInput(net)(x), net(jnp.ones((2, 28, 28, 1))), rtol=1e-6)
  with pytest.raises(ValueError, match='call-time rngs'):
    VisionInput(net, flip=True)(x, train=True)


class _DropNet(nnx.Module):

  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 3, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x, *, train=False, rngs=None):
    return self.dense(self.dropout(x, deterministic=not train, rngs=rngs))


@pytest.mark.parametrize('name', ['fedavg', 'floral', 'ensemble'])
def test_dropout_masks_are_drawn_per_step_from_the_client_key(name):
  """Regression: without call-time rngs a split NNX model (VGG8) replayed one dropout mask at every step."""
  common = dict(loss='xent', lr=0.5, batch_size=2, train_arg='train')
  # No router noise, so the dropout masks are the only randomness a client update has.
  alg = {'fedavg': lambda: algorithms.fedavg(_DropNet, **common),
         'floral': lambda: algorithms.floral(_DropNet, num_adaptors=2, rank=1, noise_std=0.0, **common),
         'ensemble': lambda: algorithms.ensemble(_DropNet, num_members=2, noise_std=0.0, **common)}[name]()
  state = alg.init(jax.random.key(0), 1)
  rng = np.random.default_rng(0)
  data = client_data((rng.normal(size=(1, 6, 4)).astype(np.float32), rng.integers(0, 3, (1, 6)), np.array([6])))
  one = jax.tree.map(lambda a: a[0], data)
  local = jax.tree.map(lambda a: a[0], state.clients)
  update = jax.jit(alg.client_update)

  def params(key):
    out, _, _ = update(state.frozen, state.global_params, local, one, key)
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(out.params)])

  a, b, a2 = params(jax.random.key(1)), params(jax.random.key(2)), params(jax.random.key(1))
  np.testing.assert_array_equal(a, a2)
  assert not np.allclose(a, b)

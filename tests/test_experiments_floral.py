"""The FLoRAL experiment runner and its vision configs: smoke runs, error messages, docstrings, input pipeline."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import floral
from experiments.configs import floral_vision as fv
from experiments.configs.vision_input import VisionInput, random_crop, random_flip, rotate_quarter_turns
from fedjax_adapters import algorithms
from fedjax_adapters.data import partition, vision
from fedjax_adapters.federated.round import client_data
from fedjax_adapters.models import MLP


def _flat(text):
  return ' '.join(text.split())


# ----------------------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------------------


def test_smoke_run_writes_json_with_every_requested_method(tmp_path):
  # Every branch of build_algorithm (FedAvg, Local Adaptor, Ensemble, FLoRAL), an oracle router and an alias.
  methods = ['fedavg', 'local_adaptor', 'ensemble_oracle', 'floral_oracle']
  path = tmp_path / 'out' / 'smoke.json'
  out = floral.main(['--task', 'mnist_offline_label_shift', '--smoke', '--seeds', '2', '--json', str(path),
                     '--methods', *methods])
  saved = json.loads(path.read_text())
  assert saved == json.loads(json.dumps(out))
  assert saved['task'] == 'mnist_offline_label_shift' and saved['rounds'] == 2 and saved['seeds'] == 2
  assert list(saved['methods']) == methods
  for m in methods:
    r = saved['methods'][m]
    assert len(r['per_seed']) == 2 and all(0.0 <= a <= 1.0 for a in r['per_seed'])
    assert r['test_accuracy'] == pytest.approx(np.mean(r['per_seed']))
    assert r['std'] == pytest.approx(np.std(r['per_seed']))
  # The paper's numbers of the column sit beside ours; the alias maps to FLoRAL(1%) with the oracle router.
  assert saved['paper']['column'] == 'MNIST-LS 5%'
  assert saved['paper']['methods']['floral_oracle'] == [87.6, 0.5]
  assert saved['paper']['methods']['fedavg'] == [23.2, 0.9]


def test_cifar_smoke_model_augments_in_training_only():
  task = fv.cifar10_rotate(smoke=True)
  data = task.load(0)
  x = jax.tree.map(lambda a: jnp.asarray(a[0, :4]), data.train.x)
  model = task.model_fn(nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnums=2)
  def forward(state, key, train):
    return nnx.merge(graphdef, state)(x, train=train, rngs=nnx.Rngs(key))

  train_a, train_b = forward(state, jax.random.key(1), True), forward(state, jax.random.key(2), True)
  eval_a, eval_b = forward(state, jax.random.key(1), False), forward(state, jax.random.key(2), False)
  assert train_a.shape == (4, 10)
  np.testing.assert_array_equal(eval_a, eval_b)  # no augmentation at evaluation
  assert not np.allclose(train_a, train_b)        # a fresh crop / flip per call in training


def test_switches_override_the_task_config():
  args = floral._parser().parse_args(['--task', 'mnist_rotate', '--router-lr', '0.5', '--router-noise', '0',
                                      '--no-precondition', '--fraction', '0.2', '--rounds', '7',
                                      '--server-adaptor-lr', '0.1', '--bias-init', 'zeros'])
  cfg = floral.resolve_config(args)
  assert (cfg.router_lr, cfg.noise_std, cfg.precondition, cfg.fraction, cfg.rounds) == (0.5, 0.0, False, 0.2, 7)
  assert (cfg.server_adaptor_lr, cfg.bias_init, cfg.server_optimizer, cfg.server_lr) == (0.1, 'zeros', 'sgd', 1.0)
  default = floral.resolve_config(floral._parser().parse_args(['--task', 'cifar100']))
  assert (default.server_optimizer, default.server_lr, default.lr, default.fraction) == ('adam', 1e-3, 1e-3, 0.5)
  assert default.augment and not floral.resolve_config(floral._parser().parse_args(['--task', 'cifar100',
                                                                                    '--no-augment'])).augment
  # Switching the optimizer without a rate takes that optimizer's usual rate (Adam 1e-3, SGD 1).
  adam = floral.resolve_config(floral._parser().parse_args(['--task', 'mnist_rotate', '--server-opt', 'adam']))
  assert (adam.server_optimizer, adam.server_lr) == ('adam', 1e-3)
  with pytest.raises(SystemExit):
    floral.main(['--task', 'mnist_rotate', '--fraction', '1.5'])


def test_server_adaptor_lr_steps_only_the_adaptors_at_their_own_rate():
  params = {'base': jnp.ones(3), 'adapters': jnp.ones(2)}
  grad = {'base': jnp.full(3, 2.0), 'adapters': jnp.full(2, 2.0)}
  opt = floral.server_optimizer('sgd', 1.0, adaptor_lr=0.1)
  updates, _ = opt.update(grad, opt.init(params), params)
  np.testing.assert_allclose(updates['base'], -2.0)
  np.testing.assert_allclose(updates['adapters'], -0.2)


def test_unknown_task_lists_valid_tasks(capsys):
  with pytest.raises(SystemExit):
    floral.main(['--task', 'mnist_rot'])
  err = capsys.readouterr().err
  assert "unknown task 'mnist_rot'" in err
  for name in ('mnist_rotate', 'cifar10_label_shift_reduced', 'cifar100', 'mnist_offline_rotate', 'synthetic_mlp'):
    assert name in err


def test_unknown_method_lists_valid_methods(capsys):
  with pytest.raises(SystemExit):
    floral.main(['--task', 'mnist_rotate', '--smoke', '--methods', 'fedavg', 'floral_5'])
  err = capsys.readouterr().err
  assert 'unknown method(s) floral_5' in err
  for name in floral.METHODS:
    assert name in err
  with pytest.raises(ValueError, match='valid methods: fedavg, local_adaptor, ensemble'):
    floral.build_algorithm('fedprox', fv.mnist_rotate(smoke=True), None)


def test_missing_tfds_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(vision.DatasetNotFoundError) as err:
    floral.main(['--task', 'cifar10_rotate', '--data-dir', str(tmp_path), '--methods', 'fedavg'])
  message = str(err.value)
  assert 'tfds build cifar10 --file_format=array_record' in message
  assert str(tmp_path) in message and '--data-dir DIR' in message


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


def test_there_is_a_config_for_every_table_column_and_both_offline_tasks():
  columns = {fv.VISION[name]().column for name in fv.VISION}
  assert columns == set(fv.COLUMNS)
  assert {'mnist_offline_rotate', 'mnist_offline_label_shift'} <= set(fv.VISION)
  for name in fv.VISION:
    if not name.startswith('mnist_offline'):
      assert name.endswith('_reduced') == (fv.VISION[name]().reduce == 0.05)


@pytest.mark.parametrize('name', sorted(fv.VISION))
def test_config_docstring_names_its_column_and_the_papers_numbers(name):
  factory = fv.VISION[name]
  task = factory()
  doc = _flat(factory.__doc__)
  assert f'column "{task.column}"' in doc
  for method, (mean, std) in task.paper.items():
    assert f'{mean:.1f} ({std:.1f})' in doc, (name, method)
  assert f'--task {name}' in doc


def test_paper_table_spot_checks():
  assert fv.PAPER['MNIST-LS 5%']['floral_10'] == (70.8, 7.1)
  assert fv.PAPER['C100']['ensemble_oracle'] == (92.8, 0.3)
  assert fv.PAPER['C10-Rot']['local_adaptor'] == (66.3, 0.5)


def test_task_settings_follow_the_public_code():
  m, c10, c100 = fv.mnist_rotate(), fv.cifar10_label_shift_reduced(), fv.cifar100()
  assert (m.num_clients, m.num_clusters, m.rounds, m.fraction, m.batch_size, m.lr, m.router_lr) == (
      300, 4, 500, 0.1, 32, 0.1, 0.1)
  assert (c10.num_clients, c10.rounds, c10.fraction, c10.batch_size, c10.lr, c10.router_lr, c10.reduce) == (
      20, 1500, 1.0, 64, 0.03, 0.3, 0.05)
  assert (c100.num_clients, c100.num_clusters, c100.model, c100.server_optimizer, c100.server_lr) == (
      100, 10, 'vgg8', 'adam', 1e-3)
  off = fv.mnist_offline_label_shift()
  assert (off.dataset, off.rounds, off.router_lr, off.test_fraction) == ('mnist_offline', 1500, 0.3, 0.4)


@pytest.mark.parametrize('name', sorted(fv.VISION))
def test_every_smoke_task_loads_shifted_random_data(name):
  task = fv.VISION[name](smoke=True)
  data = task.load(0)
  k = task.num_clients
  assert data.train.num_clients == k and data.num_clusters == task.num_clusters
  np.testing.assert_array_equal(data.clusters, np.arange(k) % task.num_clusters)
  x = data.train.x['image'] if task.shift == 'rotate' else data.train.x
  assert x.dtype == np.uint8 and x.shape[0] == k and x.shape[2:] == vision.DATASETS[task.image_dataset].image_shape
  if task.shift == 'rotate':
    np.testing.assert_array_equal(data.train.x['turns'][:, 0], data.clusters)  # C = 4: one quarter turn per cluster
  assert task.rounds == 2 and int(data.test.counts.min()) > 0


def test_offline_task_gives_every_client_ten_training_images():
  data = fv.mnist_offline_label_shift().load(0)
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

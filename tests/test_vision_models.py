"""Tests for the FLoRAL vision models (MLP, CifarCNN, VGG8, ResNet) and the model registry.

Full-size architectures are checked abstractly (``nnx.eval_shape``: exact parameter shapes, counts and output
shapes, nothing compiled); numerics run on narrow instances of the same classes. On a 2-core CPU the cost of these
tests is XLA compilation (eager initialization compiles one random kernel per parameter shape), not arithmetic.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters.models.cnn import CifarCNN, cifar_cnn_flat_features
from fedjax_adapters.models.mlp import MLP
from fedjax_adapters.models.registry import MODELS, count_params, get_model
from fedjax_adapters.models.resnet import ResNet
from fedjax_adapters.models.vgg import VGG8


def _linear(i, o, bias=True):
  return i * o + (o if bias else 0)


def _conv(k, i, o, bias=True):
  return k * k * i * o + (o if bias else 0)


def _bn(c):
  return 2 * c  # scale and bias


# Parameter counts written out layer by layer (weights + biases), as in the architecture docstrings.
MLP_PARAMS = _linear(784, 200) + _linear(200, 10)                                       # 159,010
CNN_PARAMS = _conv(5, 3, 32) + _conv(3, 32, 64) + _linear(1024, 64) + _linear(64, 10)   # 87,178
VGG8_PARAMS = (_conv(3, 3, 16) + _conv(3, 16, 32) + _conv(3, 32, 64) + _conv(3, 64, 128) + _conv(3, 128, 512)
               + _linear(512, 512) + _linear(512, 512) + _linear(512, 100))             # 1,264,388
RESNET8_PARAMS = (_conv(3, 3, 16, False) + _bn(16)                                      # stem
                  + 2 * (_conv(3, 16, 16, False) + _bn(16))                             # block 0
                  + _conv(3, 16, 32, False) + _conv(3, 32, 32, False) + 2 * _bn(32)     # block 1
                  + _conv(1, 16, 32, False) + _bn(32)                                   #   projection
                  + _conv(3, 32, 64, False) + _conv(3, 64, 64, False) + 2 * _bn(64)     # block 2
                  + _conv(1, 32, 64, False) + _bn(64)                                   #   projection
                  + _linear(64, 10))                                                    # 78,042

CASES = [
    ('mlp', (3, 28, 28, 1), 10, MLP_PARAMS),
    ('cifar_cnn', (3, 32, 32, 3), 10, CNN_PARAMS),
    ('vgg8', (3, 32, 32, 3), 100, VGG8_PARAMS),
    ('resnet', (3, 32, 32, 3), 10, RESNET8_PARAMS),
]


def _abstract(name, **kwargs):
  return nnx.eval_shape(lambda: get_model(name, rngs=nnx.Rngs(0), **kwargs))


def _param_shapes(model):
  return {'/'.join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_hand_counts_match_docstrings():
  assert (MLP_PARAMS, CNN_PARAMS, VGG8_PARAMS, RESNET8_PARAMS) == (159_010, 87_178, 1_264_388, 78_042)


@pytest.mark.parametrize('name,shape,num_out,num_params', CASES)
def test_full_size_output_shape_and_param_count(name, shape, num_out, num_params):
  model = _abstract(name)
  assert count_params(model) == num_params
  for train in (False, True):
    y = nnx.eval_shape(lambda m, x: m(x, train=train, rngs=nnx.Rngs(dropout=0)), model,
                       jax.ShapeDtypeStruct(shape, jnp.float32))
    assert y.shape == (shape[0], num_out)
    assert y.dtype == jnp.float32


def test_mlp_layers():
  assert _param_shapes(_abstract('mlp')) == {
      'layers/0/kernel': (784, 200), 'layers/0/bias': (200,), 'layers/1/kernel': (200, 10), 'layers/1/bias': (10,)}


def test_cifar_cnn_layers_and_flatten_is_1024():
  assert cifar_cnn_flat_features(32) == 1024  # 32 -5x5-> 28 -pool2-> 14 -3x3-> 12 -pool3-> 4; 4*4*64
  model = _abstract('cifar_cnn')
  assert isinstance(model, CifarCNN) and model.flat_features == 1024
  assert _param_shapes(model) == {
      'conv1/kernel': (5, 5, 3, 32), 'conv1/bias': (32,), 'conv2/kernel': (3, 3, 32, 64), 'conv2/bias': (64,),
      'fc1/kernel': (1024, 64), 'fc1/bias': (64,), 'fc2/kernel': (64, 10), 'fc2/bias': (10,)}
  assert cifar_cnn_flat_features(14, 64) == 64  # 14 -> 10 -> 5 -> 3 -> 1
  with pytest.raises(ValueError, match='image_size=13'):
    cifar_cnn_flat_features(13)


def test_vgg8_layers():
  model = _abstract('vgg8')
  assert isinstance(model, VGG8) and model.flat_features == 512
  shapes = _param_shapes(model)
  widths = [3, 16, 32, 64, 128, 512]
  for i in range(5):
    assert shapes[f'convs/{i}/kernel'] == (3, 3, widths[i], widths[i + 1])
    assert shapes[f'convs/{i}/bias'] == (widths[i + 1],)
  assert [shapes[f'fc{i}/kernel'] for i in (1, 2, 3)] == [(512, 512), (512, 512), (512, 100)]
  assert len(shapes) == 16  # 8 weight layers with biases, nothing else (no batch norm)
  assert not jax.tree.leaves(nnx.state(model, nnx.BatchStat))


def test_resnet8_layers():
  model = _abstract('resnet')
  shapes = _param_shapes(model)
  assert shapes['stem_conv/kernel'] == (3, 3, 3, 16)
  assert shapes['blocks/1/shortcut_conv/kernel'] == (1, 1, 16, 32)
  assert 'blocks/0/shortcut_conv/kernel' not in shapes  # identity shortcut in the first block
  assert shapes['head/kernel'] == (64, 10)
  assert not any(k.endswith('conv/bias') or k.endswith('conv1/bias') for k in shapes)  # bias-free convs before BN
  assert count_params(model, nnx.BatchStat) == 2 * (16 + 2 * 16 + 3 * 32 + 3 * 64)  # mean and var per channel


# Small real instances. Eager initialization compiles one random kernel per distinct parameter shape and eager
# forwards compile one kernel per op, so the instances reuse shapes, the forwards run under one jit each, and
# initialization uses 'rbg' keys, whose kernels compile about 3x faster than threefry's on CPU (the models do not
# depend on the PRNG implementation).


def _build(ctor, **kwargs):
  with jax.default_prng_impl('rbg'):
    return ctor(rngs=nnx.Rngs(0), **kwargs)


@pytest.fixture(scope='module')
def small_vgg8():
  # 4 channels everywhere, two 8x8 -> 2x2 stages: flat 16 = hidden 16, so conv kernels share one shape and fc1/fc2
  # another.
  return _build(VGG8, in_features=4, num_classes=5, conv_widths=(4, 4), hidden=16, image_size=8)


@pytest.fixture(scope='module')
def small_resnet():
  # One identity block and one projection block (stride 2), all 4 channels wide.
  return _build(ResNet, in_features=4, stage_sizes=(1, 1), widths=(4, 4))


@nnx.jit(static_argnames='train')
def _forward(model, x, train=False, rngs=None):
  return model(x, train=train, rngs=rngs)


def test_mlp_runs_and_matches_dense_formula():
  model = _build(MLP, in_features=12, hidden=(5,), out_features=3)
  x = np.asarray(jax.random.uniform(jax.random.key(2), (4, 3, 4, 1)))
  l0, l1 = model.layers
  h = np.maximum(x.reshape(4, -1) @ np.asarray(l0.kernel[...]) + np.asarray(l0.bias[...]), 0.0)
  expected = h @ np.asarray(l1.kernel[...]) + np.asarray(l1.bias[...])
  np.testing.assert_allclose(np.asarray(_forward(model, x)), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(_forward(model, x, train=True)), np.asarray(_forward(model, x)))
  with pytest.raises(ValueError, match='expects 12 features'):
    model(jnp.ones((4, 11)))


def test_torch_style_init_bounds():
  # PyTorch default: weights and biases in U(±1/sqrt(fan_in)), biases not zero.
  layer = _build(MLP, in_features=64, hidden=(), out_features=64).layers[0]
  bound = 1.0 / np.sqrt(64)
  for v in (np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])):
    assert np.abs(v).max() <= bound
    assert np.abs(v).max() > 0.8 * bound


def test_cifar_cnn_runs():
  model = _build(CifarCNN, in_features=1, num_classes=4, image_size=14)
  y = _forward(model, jax.random.normal(jax.random.key(1), (2, 14, 14, 1)))
  assert y.shape == (2, 4) and bool(jnp.all(jnp.isfinite(y)))


def test_vgg8_dropout_train_vs_eval(small_vgg8):
  model = small_vgg8
  for conv in model.convs:  # FLoRAL init: zero conv biases
    assert not np.any(np.asarray(conv.bias[...]))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
  y_eval = np.asarray(_forward(model, x))
  np.testing.assert_array_equal(y_eval, np.asarray(_forward(model, x)))  # eval is deterministic
  y_a = np.asarray(_forward(model, x, train=True, rngs=nnx.Rngs(dropout=jax.random.key(5))))
  y_b = np.asarray(_forward(model, x, train=True, rngs=jax.random.key(5)))
  y_c = np.asarray(_forward(model, x, train=True, rngs=nnx.Rngs(dropout=jax.random.key(6))))
  np.testing.assert_array_equal(y_a, y_b)  # a raw key means a dropout stream seeded with it
  assert not np.allclose(y_a, y_c)
  assert not np.allclose(y_a, y_eval)
  # Without call-time rngs, the construction-time stream advances, so two training calls differ.
  assert not np.allclose(np.asarray(_forward(model, x, train=True)), np.asarray(_forward(model, x, train=True)))


def test_resnet_batch_norm_train_vs_eval(small_resnet):
  model = nnx.clone(small_resnet)  # the module fixture stays untouched for the split/merge test
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (8, 8, 8, 4))
  stats0 = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  y_eval = _forward(model, x, train=False)
  stats1 = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, stats0, stats1)  # eval leaves running stats alone
  y_train = _forward(model, x, train=True)
  stats2 = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), stats1, stats2)
  assert all(jax.tree.leaves(changed))  # every BN's mean and var moved
  assert not np.allclose(np.asarray(y_eval), np.asarray(y_train))
  # Stem BN running mean after one step: 0.9 * 0 + 0.1 * batch mean of the stem conv output (PyTorch momentum 0.1).
  h = jax.lax.conv_general_dilated(x, model.stem_conv.kernel[...], (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(np.asarray(model.stem_bn.mean[...]), 0.1 * np.asarray(h.mean(axis=(0, 1, 2))),
                             rtol=1e-4, atol=1e-5)
  assert count_params(model, nnx.BatchStat) == 2 * (4 + 2 * 4 + 3 * 4)


@pytest.mark.parametrize('name', ['vgg8', 'resnet'])
def test_models_work_through_split_merge_and_jit(request, name):
  # The federated code runs models functionally: split once, merge inside a jitted pure function. VGG8 (dropout
  # keys) and ResNet (batch statistics) are the two with non-parameter state.
  model = request.getfixturevalue(f'small_{name}')
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def apply_fn(params, rest, x, key):
    m = nnx.merge(graphdef, params, rest)
    y = m(x, train=True, rngs=nnx.Rngs(dropout=key))
    return y, nnx.state(m, nnx.BatchStat)

  y, stats = apply_fn(params, rest, jnp.ones((2, 8, 8, 4)), jax.random.key(0))
  assert y.shape[0] == 2 and bool(jnp.all(jnp.isfinite(y)))
  if name == 'resnet':  # the updated running statistics come back out of the pure function
    assert not np.allclose(np.asarray(stats['stem_bn']['mean'][...]), np.asarray(rest['stem_bn']['mean'][...]))


def test_registry_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as err:
    get_model('vgg16', rngs=nnx.Rngs(0))
  for name in ('mlp', 'cifar_cnn', 'vgg8', 'resnet'):
    assert name in str(err.value)
  assert "'vgg16'" in str(err.value)
  assert set(MODELS) == {'mlp', 'cifar_cnn', 'vgg8', 'resnet'}


def test_registry_passes_kwargs():
  model = _abstract('mlp', in_features=12, hidden=(), out_features=7)
  assert isinstance(model, MLP) and count_params(model) == _linear(12, 7)
  model = _abstract('resnet', in_features=1, num_classes=62, stage_sizes=(1, 1, 1, 1), widths=(64, 128, 256, 512))
  assert isinstance(model, ResNet) and _param_shapes(model)['head/kernel'] == (512, 62)  # ResNet-10


def test_constructor_errors_name_the_value():
  with pytest.raises(ValueError, match='image_size=20'):
    VGG8(image_size=20, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'stage_sizes=\(1, 1\)'):
    ResNet(stage_sizes=(1, 1), widths=(16, 32, 64), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'hidden=\(0,\)'):
    MLP(hidden=(0,), rngs=nnx.Rngs(0))

"""Reference tests for the NNX integration (``adapt``, ``split_model``, ``ModelDef``) and ``lora_preconditioner``.

Each adapted layer is checked against a hand formula on the values that ``split_model`` exposes: dense
``x @ (W + s A B) + b``, conv against a plain ``nnx.Conv`` with the merged kernel, embedding ``E[ids] + A[ids] @ B``,
norms against the affine delta on a numpy-normalized input. The preconditioner is checked against
``g_a (b b^T + eps I)^-1`` / ``(a^T a + eps I)^-1 g_b`` (dense) and the Gram-norm scaling (conv).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_adapters import optim
from fedjax_adapters.adapters import mixture
from fedjax_adapters.nn import (PARTS, AdaptedConv, AdaptedEmbed, AdaptedLinear, AdaptedNorm, AdapterRuntime,
                                AdapterSpec, GlobalAdapter, LocalAdapter, RouterLogits, adapt, adaptable_paths,
                                split_model)

TOL = dict(rtol=1e-5, atol=1e-5)
ZEROS = nnx.initializers.zeros_init()


def _key(seed):
  # adapt() takes any typed key. 'rbg' keys compile in a fraction of a second per new shape on CPU, where the
  # default partitionable threefry takes seconds; the values are overwritten by _fill in most tests anyway.
  return jax.random.key(seed, impl='rbg')


# Base layers start at zero (no random-init compiles) and get their values from _fill through split_model's parts.
def _linear(d_in, d_out, use_bias=True):
  return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=ZEROS, rngs=nnx.Rngs(0))


def _conv(c_in, c_out, kernel_size, **kw):
  return nnx.Conv(c_in, c_out, kernel_size, kernel_init=ZEROS, rngs=nnx.Rngs(0), **kw)


def _fill(tree, seed, scale=0.5):
  """Replaces every leaf by N(0, scale^2) values (float32) drawn with numpy."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) * scale, v.dtype), tree)


def _np(tree):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


class One(nnx.Module):
  """Holds one layer (adapt() cannot swap the root), passing keyword arguments through."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x, **kwargs):
    return self.layer(x, **kwargs)


def _x(seed, shape):
  return np.random.default_rng(seed).normal(size=shape)


# ------------------------------------------------------------------------------------------------------------------
# Dense LoRA through adapt + ModelDef.apply
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('alpha', [None, 8.0])
def test_adapted_linear_matches_dense_formula(alpha):
  model = adapt(One(_linear(6, 5)), AdapterSpec(rank=2, alpha=alpha, bias=False), key=_key(0))
  assert isinstance(model.layer, AdaptedLinear)
  s = 1.0 if alpha is None else alpha / 2  # PEFT alpha / r; FLoRAL leaves the adaptor unscaled
  assert model.layer.scale == s
  mdef, parts = split_model(model)
  parts = dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2))
  assert set(parts['adapters']['layer']) == {'global_a', 'global_b'}
  base, ada = _np(parts['base']['layer']['base']), _np(parts['adapters']['layer'])
  w, b0, a, b = base['kernel'], base['bias'], ada['global_a'][0], ada['global_b'][0]
  x = _x(3, (4, 6))
  y, stats = mdef.apply(parts, jnp.asarray(x, jnp.float32))
  assert stats == {}
  np.testing.assert_allclose(y, x @ (w + s * a @ b) + b0, **TOL)
  np.testing.assert_allclose(y, x @ w + b0 + s * (x @ a) @ b, **TOL)


def test_zero_init_b_leaves_base_output_unchanged():
  model = One(_linear(6, 5))
  model.layer.kernel.set_value(jnp.asarray(_x(1, (6, 5)), jnp.float32))
  model.layer.bias.set_value(jnp.asarray(_x(2, (5,)), jnp.float32))
  x = jnp.asarray(_x(3, (4, 6)), jnp.float32)
  y0 = model(x)
  adapt(model, AdapterSpec(rank=2, num_global=3, num_local=1, bias=True, bias_init='zeros'), key=_key(0))
  layer = model.layer
  assert np.abs(np.asarray(layer.global_a.get_value())).min() > 0  # A is random; B and the bias adaptors are 0
  for name in ('global_b', 'global_bias', 'local_b', 'local_bias'):
    np.testing.assert_array_equal(getattr(layer, name).get_value(), 0.0)
  np.testing.assert_array_equal(model(x), y0)
  mdef, parts = split_model(model)
  np.testing.assert_array_equal(mdef.apply(parts, x, mix=jnp.array([0.2, 0.3, 0.5]))[0], y0)


def test_rank_too_large_names_the_layer_and_leaves_the_model_untouched():
  model = nnx.Sequential(_linear(6, 6), jax.nn.relu, _linear(6, 3))
  with pytest.raises(ValueError, match=r"cannot adapt layer 'layers\.2': rank 4 .*d_in=6, d_out=3"):
    adapt(model, AdapterSpec(rank=4), key=_key(0))
  # Nothing was swapped: the model can still be adapted with a rank that fits.
  assert not any(isinstance(n, (AdaptedLinear, AdaptedConv)) for _, n in nnx.iter_graph(model))
  adapt(model, AdapterSpec(rank=3), key=_key(0))
  assert isinstance(model.layers[0], AdaptedLinear) and isinstance(model.layers[2], AdaptedLinear)


@pytest.mark.parametrize('rho,ranks', [(0.01, (1, 1)), (0.1, (15, 1))])
def test_floral_budget_ranks_on_the_mnist_mlp(rho, ranks):
  def build():
    mlp = nnx.Sequential(nnx.Linear(784, 200, rngs=nnx.Rngs(0)), jax.nn.relu, nnx.Linear(200, 10, rngs=nnx.Rngs(0)))
    return adapt(mlp, AdapterSpec.floral(4, rank=rho, router=True), key=_key(0))

  abstract = nnx.eval_shape(build)  # shapes only: no 784 x 200 initialization
  assert abstract.layers[0].global_a.shape == (4, 784, ranks[0])
  assert abstract.layers[0].global_b.shape == (4, ranks[0], 200)
  assert abstract.layers[2].global_a.shape == (4, 200, ranks[1])
  assert abstract.layers[2].global_bias.shape == (4, 10)


def test_conv_rank_rule_through_adapt():
  def build(rank):
    return adapt(One(nnx.Conv(4, 6, (3, 5), rngs=nnx.Rngs(0))), AdapterSpec(rank=rank), key=_key(0))

  abstract = nnx.eval_shape(lambda: build('full'))  # d_in = C_in * k_w = 20, d_out = C_out * k_h = 18
  assert abstract.layer.global_a.shape == (1, 1, 5, 4, 18) and abstract.layer.global_b.shape == (1, 3, 1, 18, 6)
  with pytest.raises(ValueError, match=r"cannot adapt layer 'layer': rank 19 .*d_in=20, d_out=18"):
    nnx.eval_shape(lambda: build(19))


# ------------------------------------------------------------------------------------------------------------------
# Conv LoRA through adapt: against a plain nnx.Conv with the merged kernel
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((1, 0), (2, 1)), 1])
def test_adapted_conv_matches_merged_conv(padding):
  geometry = dict(strides=(2, 1), padding=padding, kernel_dilation=(1, 2))
  model = adapt(One(_conv(3, 4, (3, 2), **geometry)), AdapterSpec(rank=2, alpha=3.0, bias=True), key=_key(0))
  assert isinstance(model.layer, AdaptedConv) and model.layer.scale == 1.5
  mdef, parts = split_model(model)
  parts = dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2))
  base, ada = parts['base']['layer']['base'], parts['adapters']['layer']
  a, b = np.asarray(ada['global_a'][0], np.float64), np.asarray(ada['global_b'][0], np.float64)
  k = np.zeros((3, 2, 3, 4))  # K[i, j] = a[0, j] @ b[i, 0]
  for i in range(3):
    for j in range(2):
      k[i, j] = a[0, j] @ b[i, 0]
  ref = _conv(3, 4, (3, 2), **geometry)
  ref.kernel.set_value(jnp.asarray(np.asarray(base['kernel'], np.float64) + 1.5 * k, jnp.float32))
  ref.bias.set_value(base['bias'] + 1.5 * ada['global_bias'][0])
  x = jnp.asarray(_x(3, (2, 7, 6, 3)), jnp.float32)
  y, _ = jax.jit(mdef.apply)(parts, x)  # eager conv applies run in the dual tests
  np.testing.assert_allclose(y, ref(x), **TOL)


def test_unsupported_convs_raise_naming_the_layer():
  with pytest.raises(ValueError, match=r"'layer'.*grouped"):
    adapt(One(_conv(4, 4, (3, 3), feature_group_count=2)), AdapterSpec(rank=1), key=_key(0))
  with pytest.raises(ValueError, match=r"'layer'.*2-d"):
    adapt(One(_conv(4, 4, (3,))), AdapterSpec(rank=1), key=_key(0))


# ------------------------------------------------------------------------------------------------------------------
# Mixtures (FLoRAL)
# ------------------------------------------------------------------------------------------------------------------

def _mixture_model():
  model = adapt(One(_linear(6, 5)), AdapterSpec(rank=2, alpha=None, num_global=3, router=True, bias=True), key=_key(0))
  mdef, parts = split_model(model)
  return mdef, dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2))


def test_mixture_one_hot_is_the_chosen_adaptor_and_uniform_is_the_mean():
  mdef, parts = _mixture_model()
  base, ada = _np(parts['base']['layer']['base']), _np(parts['adapters']['layer'])
  x = _x(3, (4, 6))
  singles = [x @ base['kernel'] + base['bias'] + x @ ada['global_a'][c] @ ada['global_b'][c] + ada['global_bias'][c]
             for c in range(3)]
  xj = jnp.asarray(x, jnp.float32)
  for c in range(3):
    np.testing.assert_allclose(mdef.apply(parts, xj, mix=jax.nn.one_hot(c, 3))[0], singles[c], **TOL)
  mean = sum(singles) / 3
  np.testing.assert_allclose(mdef.apply(parts, xj, mix=jnp.full((3,), 1 / 3))[0], mean, **TOL)
  np.testing.assert_allclose(mdef.apply(parts, xj)[0], mean, **TOL)  # default mix: uniform
  # The router's zero logits give the uniform mixture too (1/3 is above the floor).
  np.testing.assert_array_equal(parts['router']['layer']['ctx']['logits'], np.zeros(3))
  pi = mixture.router_probs(parts['router']['layer']['ctx']['logits'], num_adaptors=3)
  np.testing.assert_allclose(mdef.apply(parts, xj, mix=pi)[0], mean, **TOL)
  w = np.array([0.6, 0.1, 0.3])
  np.testing.assert_allclose(mdef.apply(parts, xj, mix=jnp.asarray(w, jnp.float32))[0],
                             x @ base['kernel'] + base['bias'] + sum(w[c] * (singles[c] - x @ base['kernel']
                                                                            - base['bias']) for c in range(3)),
                             **TOL)


@pytest.mark.parametrize('bad', [(2,), (4,), (1, 3), ()])
def test_apply_rejects_mix_of_the_wrong_shape(bad):
  mdef, parts = _mixture_model()
  with pytest.raises(ValueError, match=r'mixture weights have shape .* 3 global adaptors'):
    mdef.apply(parts, jnp.ones((2, 6)), mix=jnp.ones(bad))


def test_jit_apply_matches_eager_traces_once_and_leaves_templates_alone():
  mdef, parts = _mixture_model()
  x = jnp.asarray(_x(3, (4, 6)), jnp.float32)
  traces = 0

  def fwd(parts, x, mix):
    nonlocal traces
    traces += 1
    return mdef.apply(parts, x, mix=mix)[0]

  jitted = jax.jit(fwd)
  for c in range(3):
    np.testing.assert_allclose(jitted(parts, x, jax.nn.one_hot(c, 3)),
                               mdef.apply(parts, x, mix=jax.nn.one_hot(c, 3))[0], **TOL)
  assert traces == 1
  # No tracer or one-hot mix leaked into the templates: the default call is still the uniform mean.
  mean = sum(mdef.apply(parts, x, mix=jax.nn.one_hot(c, 3))[0] for c in range(3)) / 3
  np.testing.assert_allclose(mdef.apply(parts, x)[0], mean, **TOL)
  # Gradients flow to every adaptor through the jitted apply (B was filled, so A gets a gradient too).
  grads = jax.grad(lambda ada: jnp.sum(jitted(dict(parts, adapters=ada), x, jnp.array([0.2, 0.3, 0.5])) ** 2))(
      parts['adapters'])
  for g in jax.tree.leaves(grads):
    assert np.abs(np.asarray(g)).reshape(3, -1).max(axis=1).min() > 0


# ------------------------------------------------------------------------------------------------------------------
# Embedding, bias and norm adaptors
# ------------------------------------------------------------------------------------------------------------------

def test_adapted_embed_matches_lookup_formula():
  emb = nnx.Embed(10, 4, embedding_init=ZEROS, rngs=nnx.Rngs(0))
  model = adapt(One(emb), AdapterSpec(rank=2, alpha=None, embed=True), key=_key(0))
  assert isinstance(model.layer, AdaptedEmbed)
  mdef, parts = split_model(model)
  np.testing.assert_array_equal(parts['adapters']['layer']['global_b'], 0.0)
  parts = dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2))
  e = np.asarray(parts['base']['layer']['base']['embedding'], np.float64)
  a, b = (np.asarray(parts['adapters']['layer'][k][0], np.float64) for k in ('global_a', 'global_b'))
  ids = np.array([[0, 9, 3], [3, 3, 7]])
  y, _ = mdef.apply(parts, jnp.asarray(ids))
  np.testing.assert_allclose(y, e[ids] + a[ids] @ b, **TOL)
  merged = mdef.merge(parts)
  np.testing.assert_allclose(merged.layer.embedding.get_value(), e, **TOL)  # attend / tied heads see the base table
  np.testing.assert_allclose(merged.layer.attend(jnp.ones((1, 4))), np.ones((1, 4)) @ e.T, **TOL)


def test_bias_adaptor_without_linear_lora():
  model = adapt(One(_linear(6, 5)), AdapterSpec.floral(2, linear=False, bias_init='uniform'),
                key=_key(0))
  mdef, parts = split_model(model)
  assert set(parts['adapters']['layer']) == {'global_bias'}
  bias = np.asarray(parts['adapters']['layer']['global_bias'], np.float64)
  assert bias.shape == (2, 5) and np.abs(bias).min() > 0  # FLoRAL's quirk: nonzero at init
  parts = dict(parts, base=_fill(parts['base'], 1))
  base = _np(parts['base']['layer']['base'])
  x = _x(3, (4, 6))
  y, _ = mdef.apply(parts, jnp.asarray(x, jnp.float32), mix=jnp.array([0.25, 0.75]))
  np.testing.assert_allclose(y, x @ base['kernel'] + base['bias'] + 0.25 * bias[0] + 0.75 * bias[1], **TOL)
  # No bias adaptor where the base layer has no bias.
  model = adapt(One(_linear(6, 5, use_bias=False)), AdapterSpec(rank=2, bias=True), key=_key(0))
  assert set(split_model(model)[1]['adapters']['layer']) == {'global_a', 'global_b'}


NORMS = {
    'layernorm': (lambda: nnx.LayerNorm(5, rngs=nnx.Rngs(0)), {}),
    'rmsnorm': (lambda: nnx.RMSNorm(5, rngs=nnx.Rngs(0)), {}),
    'batchnorm_train': (lambda: nnx.BatchNorm(5, rngs=nnx.Rngs(0)), {'use_running_average': False}),
    'batchnorm_eval': (lambda: nnx.BatchNorm(5, rngs=nnx.Rngs(0)), {'use_running_average': True}),
}


@pytest.mark.parametrize('name', list(NORMS))
def test_norm_adaptor_is_the_affine_delta_on_the_normalized_input(name):
  make, kwargs = NORMS[name]
  model = adapt(One(make()), AdapterSpec(norm=True, num_global=2, num_local=1), key=_key(0))
  assert isinstance(model.layer, AdaptedNorm)
  mdef, parts = split_model(model)
  for part in ('adapters', 'local'):
    for v in jax.tree.leaves(parts[part]):
      np.testing.assert_array_equal(v, 0.0)  # zero at init: gamma_c = beta_c = 0
  parts = dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2),
               local=_fill(parts['local'], 3))
  rng = np.random.default_rng(4)
  if parts['stats']:
    parts['stats'] = {'layer': {'base': {'mean': jnp.asarray(rng.normal(size=5), jnp.float32),
                                         'var': jnp.asarray(rng.uniform(0.5, 2.0, size=5), jnp.float32)}}}
  x = rng.normal(size=(4, 3, 5)) * 2 + 1
  base, ada, loc = _np(parts['base']['layer']['base']), _np(parts['adapters']['layer']), _np(parts['local']['layer'])
  if name.startswith('batchnorm'):
    stats = _np(parts['stats']['layer']['base'])
    if kwargs['use_running_average']:
      mean, var = stats['mean'], stats['var']
    else:
      mean, var = x.mean((0, 1)), x.var((0, 1))
    x_hat = (x - mean) / np.sqrt(var + 1e-5)
  elif name == 'rmsnorm':
    x_hat = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6)
  else:
    x_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  y_base = x_hat * base['scale'] + base.get('bias', 0.0)
  w = np.array([0.3, 0.7])
  expected = (y_base + x_hat * (w @ ada['global_scale']) + w @ ada['global_shift']
              + x_hat * loc['local_scale'][0] + loc['local_shift'][0])
  y, new_stats = mdef.apply(parts, jnp.asarray(x, jnp.float32), mix=jnp.asarray(w, jnp.float32), **kwargs)
  np.testing.assert_allclose(y, expected, **TOL)
  if name == 'batchnorm_train':  # running statistics move toward the batch ones (momentum 0.99)
    np.testing.assert_allclose(new_stats['layer']['base']['mean'], 0.99 * stats['mean'] + 0.01 * mean, **TOL)
    np.testing.assert_allclose(new_stats['layer']['base']['var'], 0.99 * stats['var'] + 0.01 * var, **TOL)
  elif name == 'batchnorm_eval':
    np.testing.assert_allclose(new_stats['layer']['base']['mean'], stats['mean'], **TOL)


# ------------------------------------------------------------------------------------------------------------------
# Dual adapter (FedDPA): global + local with per-example weights
# ------------------------------------------------------------------------------------------------------------------

class DualNet(nnx.Module):
  """conv -> spatial mean -> dense, so the per-example weights broadcast against [B, H, W, C] and [B, D]."""

  def __init__(self):
    self.conv = _conv(3, 4, (3, 2))
    self.head = _linear(4, 3)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.conv(x)).mean((1, 2)))


def _dual_parts(num_local):
  model = adapt(DualNet(), AdapterSpec(rank=2, num_global=1, num_local=num_local, bias=True), key=_key(0))
  mdef, parts = split_model(model)
  return mdef, dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2))


def test_dual_with_zero_local_equals_plain_lora():
  mdef_plain, parts_plain = _dual_parts(num_local=0)
  mdef, parts = _dual_parts(num_local=1)
  assert parts['local'] and not parts_plain['local']
  x = jnp.asarray(_x(3, (5, 6, 4, 3)), jnp.float32)
  y_plain, _ = mdef_plain.apply(parts_plain, x)
  # At init the local adaptor is zero (b = 0, bias 0).
  np.testing.assert_allclose(mdef.apply(parts, x)[0], y_plain, **TOL)
  # A nonzero local adaptor with weight 0 (scalar or per example) changes nothing either.
  parts = dict(parts, local=_fill(parts['local'], 4))
  assert not np.allclose(mdef.apply(parts, x)[0], y_plain, atol=1e-3)
  np.testing.assert_allclose(mdef.apply(parts, x, local_weight=0.0)[0], y_plain, **TOL)
  np.testing.assert_allclose(mdef.apply(parts, x, local_weight=jnp.zeros(5))[0], y_plain, **TOL)


def test_dual_per_example_weights_equal_each_example_alone():
  mdef, parts = _dual_parts(num_local=1)
  parts = dict(parts, local=_fill(parts['local'], 4))
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(5, 6, 4, 3)), jnp.float32)
  wg, wl = rng.uniform(size=5).astype(np.float32), rng.uniform(size=5).astype(np.float32)
  y, _ = mdef.apply(parts, x, global_weight=jnp.asarray(wg), local_weight=jnp.asarray(wl))
  for i in range(5):
    alone, _ = mdef.apply(parts, x[i:i + 1], global_weight=float(wg[i]), local_weight=float(wl[i]))
    np.testing.assert_allclose(y[i:i + 1], alone, **TOL)
  with pytest.raises(ValueError, match='per-example weights'):
    mdef.apply(parts, x, global_weight=jnp.ones(4))


def test_dual_per_example_weights_on_a_dense_layer_match_the_formula():
  model = adapt(One(_linear(6, 5)), AdapterSpec(rank=2, alpha=None, num_global=1, num_local=1, bias=False), key=_key(0))
  mdef, parts = split_model(model)
  parts = dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2),
               local=_fill(parts['local'], 3))
  base, g, l = _np(parts['base']['layer']['base']), _np(parts['adapters']['layer']), _np(parts['local']['layer'])
  x = _x(4, (4, 6))
  wg, wl = np.array([1.0, 0.0, 0.5, 0.2]), np.array([0.0, 1.0, 0.5, 0.9])
  expected = (x @ base['kernel'] + base['bias'] + wg[:, None] * (x @ g['global_a'][0] @ g['global_b'][0])
              + wl[:, None] * (x @ l['local_a'][0] @ l['local_b'][0]))
  y, _ = mdef.apply(parts, jnp.asarray(x, jnp.float32), global_weight=jnp.asarray(wg, jnp.float32),
                    local_weight=jnp.asarray(wl, jnp.float32))
  np.testing.assert_allclose(y, expected, **TOL)


# ------------------------------------------------------------------------------------------------------------------
# Surgery errors
# ------------------------------------------------------------------------------------------------------------------

def test_target_matching_no_layer_lists_the_layers():
  model = nnx.Sequential(_linear(6, 6), jax.nn.relu, _linear(6, 3))
  assert adaptable_paths(model) == ['layers.0', 'layers.2']
  with pytest.raises(ValueError, match=r"'head' matches no adaptable layer.*layers\.0, layers\.2"):
    adapt(model, AdapterSpec(target='head', rank=1), key=_key(0))
  adapt(model, AdapterSpec(target=r'layers\.2', rank=1), key=_key(0))
  assert isinstance(model.layers[0], nnx.Linear) and isinstance(model.layers[2], AdaptedLinear)


def test_adapting_the_root_or_twice_raises():
  with pytest.raises(ValueError, match='root module'):
    adapt(_linear(6, 3), AdapterSpec(rank=1), key=_key(0))
  model = adapt(One(_linear(6, 3)), AdapterSpec(rank=1), key=_key(0))
  with pytest.raises(ValueError, match='already adapted'):
    adapt(model, AdapterSpec(rank=1), key=_key(1))


def test_adapter_spec_checks():
  for kw in (dict(num_global=0, num_local=0), dict(num_local=2), dict(num_global=-1),
             dict(num_global=0, router=True)):
    with pytest.raises(ValueError):
      AdapterSpec(**kw)


# ------------------------------------------------------------------------------------------------------------------
# split_model / merge
# ------------------------------------------------------------------------------------------------------------------

class Net(nnx.Module):

  def __init__(self):
    self.embed = nnx.Embed(7, 6, embedding_init=ZEROS, rngs=nnx.Rngs(0))
    self.dense = _linear(6, 5)
    self.norm = nnx.BatchNorm(5, rngs=nnx.Rngs(0))
    self.head = _linear(5, 3)

  def __call__(self, ids, train=False):
    h = self.embed(ids).mean(1)
    return self.head(jax.nn.relu(self.norm(self.dense(h), use_running_average=not train)))


PART_TYPES = {'base': nnx.Param, 'stats': nnx.BatchStat, 'adapters': GlobalAdapter, 'local': LocalAdapter,
              'router': RouterLogits}


def _adapted_net():
  spec = AdapterSpec(rank=2, num_global=2, num_local=1, router=True, embed=True, norm=True, bias=True)
  return adapt(Net(), spec, key=_key(0))


def test_split_model_puts_each_variable_type_in_its_part():
  model = _adapted_net()
  variables = {p: v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
  mdef, parts = split_model(model)
  assert set(parts) == set(PARTS)
  seen = set()
  for part, cls in PART_TYPES.items():
    leaves = jax.tree_util.tree_leaves_with_path(parts[part])
    assert leaves, part
    for kp, value in leaves:
      path = tuple(k.key for k in kp)
      assert type(variables[path]) is cls, (part, path, type(variables[path]))
      np.testing.assert_array_equal(value, variables[path].get_value())
      seen.add(path)
  # Everything else is per-call runtime state (mixture and per-example weights), never a trained part.
  assert {type(variables[p]) for p in set(variables) - seen} == {AdapterRuntime}
  assert set(parts['adapters']) == set(parts['local']) == {'embed', 'dense', 'norm', 'head'}
  assert set(parts['adapters']['dense']) == {'global_a', 'global_b', 'global_bias'}
  assert parts['adapters']['dense']['global_a'].shape == (2, 6, 2)
  assert parts['local']['dense']['local_a'].shape == (1, 6, 2)
  assert set(parts['adapters']['norm']) == {'global_scale', 'global_shift'}
  assert set(parts['stats']['norm']['base']) == {'mean', 'var'}
  assert jax.tree.leaves(parts['router'])[0].shape == (2,)
  assert set(parts['base']['dense']['base']) == {'kernel', 'bias'}


def test_merge_of_split_round_trips():
  model = _adapted_net()
  mdef, parts = split_model(model)
  filled = {name: _fill(part, i) for i, (name, part) in enumerate(parts.items())}
  filled['stats'] = jax.tree.map(jnp.abs, filled['stats'])  # a valid running variance
  merged = mdef.merge(filled)
  _, again = split_model(merged)
  jax.tree.map(np.testing.assert_array_equal, again, filled)
  ids = jnp.array([[1, 2, 6], [0, 0, 5], [3, 4, 4]])
  # The merged model, apply on the same parts, and the original model given the same values all agree exactly.
  nnx.update(model, nnx.state(merged))
  for train in (False, True):
    y_apply, _ = mdef.apply(filled, ids, train=train)
    np.testing.assert_array_equal(mdef.merge(filled)(ids, train=train), y_apply)
    np.testing.assert_array_equal(model(ids, train=train), y_apply)
  # Missing parts come from the templates: the values at split time, even though the model was updated since.
  _, fresh = split_model(mdef.merge({}))
  jax.tree.map(np.testing.assert_array_equal, fresh, parts)


def test_apply_returns_updated_batch_stats_without_touching_the_templates():
  model = _adapted_net()
  mdef, parts = split_model(model)
  ids = jnp.array([[1, 2, 6], [0, 0, 5], [3, 4, 4]])
  _, stats_eval = mdef.apply(parts, ids, train=False)
  jax.tree.map(np.testing.assert_array_equal, stats_eval, parts['stats'])
  parts = dict(parts, base=_fill(parts['base'], 1))
  _, stats_train = mdef.apply(parts, ids, train=True)
  assert not np.allclose(stats_train['norm']['base']['mean'], parts['stats']['norm']['base']['mean'])
  _, fresh = split_model(mdef.merge({}))
  jax.tree.map(np.testing.assert_array_equal, fresh['stats'], parts['stats'])


# ------------------------------------------------------------------------------------------------------------------
# LoRA preconditioner
# ------------------------------------------------------------------------------------------------------------------

def _np_dense_precond(ga, gb, a, b, eps):
  r = a.shape[-1]
  out_a = np.stack([ga[c] @ np.linalg.inv(b[c] @ b[c].T + eps * np.eye(r)) for c in range(a.shape[0])])
  out_b = np.stack([np.linalg.inv(a[c].T @ a[c] + eps * np.eye(r)) @ gb[c] for c in range(a.shape[0])])
  return out_a, out_b


def _np_conv_precond(ga, gb, a, b, eps):
  out_a, out_b = np.empty_like(ga), np.empty_like(gb)
  for c in range(a.shape[0]):
    bm = b[c].reshape(-1, b.shape[-2], b.shape[-1]).transpose(1, 0, 2).reshape(b.shape[-2], -1)  # [r, k_h*C_out]
    am = a[c].reshape(-1, a.shape[-1])                                                            # [k_w*C_in, r]
    out_a[c] = ga[c] / (np.linalg.norm(bm @ bm.T) + eps)  # Frobenius norm of the other factor's Gram matrix
    out_b[c] = gb[c] / (np.linalg.norm(am.T @ am) + eps)
  return out_a, out_b


def _precond_tree(rng):
  shapes = {'dense': {'global_a': (2, 8, 3), 'global_b': (2, 3, 7), 'global_bias': (2, 7)},
            'conv': {'global_a': (2, 1, 3, 4, 2), 'global_b': (2, 3, 1, 2, 5), 'global_bias': (2, 5)},
            'embed': {'local_a': (1, 9, 2), 'local_b': (1, 2, 4)},
            'norm': {'global_scale': (2, 5), 'global_shift': (2, 5)}}
  return jax.tree.map(lambda s: rng.normal(size=s), shapes, is_leaf=lambda s: isinstance(s, tuple))


# eps is traced, so both parametrizations share one compile.
_precondition = jax.jit(lambda g, p, eps: optim.lora_preconditioner(eps).update(g, optax.EmptyState(), p)[0])


@pytest.mark.parametrize('eps', [1e-5, 0.3])
def test_preconditioner_matches_hand_formulas(eps):
  rng = np.random.default_rng(0)
  params, grads = _precond_tree(rng), _precond_tree(rng)
  tx = optim.lora_preconditioner(eps)
  f32 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)  # noqa: E731
  state = tx.init(f32(params))
  assert state == optax.EmptyState()
  out = _precondition(f32(grads), f32(params), jnp.float32(eps))
  for layer, ka, kb, ref in (('dense', 'global_a', 'global_b', _np_dense_precond),
                             ('conv', 'global_a', 'global_b', _np_conv_precond),
                             ('embed', 'local_a', 'local_b', _np_dense_precond)):
    p, g = params[layer], grads[layer]
    exp_a, exp_b = ref(g[ka], g[kb], p[ka], p[kb], eps)
    np.testing.assert_allclose(out[layer][ka], exp_a, rtol=1e-5, atol=1e-5 * np.abs(exp_a).max())
    np.testing.assert_allclose(out[layer][kb], exp_b, rtol=1e-5, atol=1e-5 * np.abs(exp_b).max())
  # Biases and norm adaptors pass through unchanged.
  for layer, key in (('dense', 'global_bias'), ('conv', 'global_bias'), ('norm', 'global_scale'),
                     ('norm', 'global_shift')):
    np.testing.assert_array_equal(out[layer][key], np.float32(grads[layer][key]))
  with pytest.raises(ValueError, match='needs params'):
    tx.update(f32(grads), state)


def test_preconditioner_per_adaptor_not_pooled():
  # Adaptor 1's factors are 10x adaptor 0's: each is preconditioned by its own Gram matrix.
  rng = np.random.default_rng(1)
  a0, b0 = rng.normal(size=(1, 6, 2)), rng.normal(size=(1, 2, 5))
  p = {'global_a': np.concatenate([a0, 10 * a0]), 'global_b': np.concatenate([b0, 10 * b0])}
  g = {'global_a': np.concatenate([a0, a0]), 'global_b': np.concatenate([b0, b0])}
  out = _precondition(jax.tree.map(jnp.float32, g), jax.tree.map(jnp.float32, p), jnp.float32(1e-5))
  np.testing.assert_allclose(out['global_a'][1], out['global_a'][0] / 100, rtol=1e-4)
  np.testing.assert_allclose(out['global_b'][1], out['global_b'][0] / 100, rtol=1e-4)


def test_preconditioner_under_multi_transform_with_split_model_parts():
  spec = AdapterSpec(rank=2, num_global=2, num_local=1, router=True, bias=True)
  model = adapt(DualNet(), spec, key=_key(0))
  _, parts = split_model(model)
  # The trainable parts as an algorithm holds them: a tuple of nested dicts (adapters, local, router).
  params = (_fill(parts['adapters'], 2), _fill(parts['local'], 3), parts['router'])
  grads = _fill(params, 4)
  # Global factors preconditioned; global biases (masked out of that group, in the same dicts) plain SGD; the local
  # adaptor and the router in groups of their own.
  labels = (jax.tree_util.tree_map_with_path(
      lambda kp, _: 'global' if kp[-1].key.endswith(('_a', '_b')) else 'bias', params[0]),
            optim.label_tree(params[1], 'local'), optim.label_tree(params[2], 'router'))
  eps = 1e-2
  tx = optax.multi_transform({'global': optax.chain(optim.lora_preconditioner(eps), optax.sgd(0.1)),
                              'bias': optax.sgd(0.1), 'local': optim.lora_preconditioner(eps),
                              'router': optax.sgd(0.5)}, labels)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  (up_ada, up_loc, up_router), (g_ada, g_loc, g_router) = updates, _np(grads)
  p_ada, p_loc = _np(params[0]), _np(params[1])
  for layer, ref in (('head', _np_dense_precond), ('conv', _np_conv_precond)):
    exp_a, exp_b = ref(g_ada[layer]['global_a'], g_ada[layer]['global_b'], p_ada[layer]['global_a'],
                       p_ada[layer]['global_b'], eps)
    np.testing.assert_allclose(up_ada[layer]['global_a'], -0.1 * exp_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(up_ada[layer]['global_b'], -0.1 * exp_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(up_ada[layer]['global_bias'], -0.1 * g_ada[layer]['global_bias'], rtol=1e-6)
    exp_a, exp_b = ref(g_loc[layer]['local_a'], g_loc[layer]['local_b'], p_loc[layer]['local_a'],
                       p_loc[layer]['local_b'], eps)
    np.testing.assert_allclose(up_loc[layer]['local_a'], exp_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(up_loc[layer]['local_b'], exp_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(up_loc[layer]['local_bias'], np.float32(g_loc[layer]['local_bias']))
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.5 * g, rtol=1e-6), up_router, g_router)


def test_preconditioner_has_no_lapack_call():
  # jax 0.10.2's batched LAPACK calls can deadlock XLA:CPU's thread pool (docs/compiled_loop.md).
  rng = np.random.default_rng(2)
  p = {'global_a': rng.normal(size=(4, 20, 15)), 'global_b': rng.normal(size=(4, 15, 40))}
  g = {k: rng.normal(size=v.shape) for k, v in p.items()}
  f32 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)  # noqa: E731
  hlo = _precondition.lower(f32(g), f32(p), jnp.float32(0.3)).compile().as_text()
  assert 'custom_call_target="lapack' not in hlo
  out = _precondition(f32(g), f32(p), jnp.float32(0.3))
  exp_a, exp_b = _np_dense_precond(g['global_a'], g['global_b'], p['global_a'], p['global_b'], 0.3)
  np.testing.assert_allclose(out['global_a'], exp_a, rtol=1e-5, atol=1e-5 * np.abs(exp_a).max())
  np.testing.assert_allclose(out['global_b'], exp_b, rtol=1e-5, atol=1e-5 * np.abs(exp_b).max())

"""Reference tests for LoRA on ``nnx.LinearGeneral``, ``nnx.MultiHeadAttention`` and ``nnx.Einsum``.

Each adapted layer is checked against its dense formula written out here in numpy float64: LinearGeneral as
``tensordot(x, kernel + s * reshape(A @ B, in_features + out_features))``, Einsum against a plain ``nnx.Einsum``
whose kernel is ``W + s * transpose(reshape(A @ B, ...))`` with the transpose written out per equation, and
MultiHeadAttention with LoRA on q/v against a plain one whose q/v kernels are replaced by ``W + s * A B``.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters.nn import (AdaptedEinsum, AdaptedLayer, AdaptedLinearGeneral, AdapterSpec, GlobalAdapter,
                                LocalAdapter, adapt, adaptable_paths, adapted_paths, split_model)

TOL = dict(rtol=1e-5, atol=1e-5)
ZEROS = nnx.initializers.zeros_init()
QV = r'.*attention\.(query|value)'


def _key(seed):
  return jax.random.key(seed, impl='rbg')  # compiles far faster than threefry on a CPU; values are filled anyway


def _spec(**kw):
  """Every AdapterSpec field these tests rely on, spelled out (they must not depend on the class defaults)."""
  fields = dict(target='.*', rank=2, alpha=None, num_global=1, num_local=0, router=False, linear=True, conv=True,
                bias=False, embed=False, norm=False, init='kaiming', bias_init='zeros', dropout=0.0)
  return AdapterSpec(**{**fields, **kw})


def _fill(tree, seed, scale=0.5):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) * scale, v.dtype), tree)


def _np(tree):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def _x(seed, shape):
  return np.random.default_rng(seed).normal(size=shape)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


class One(nnx.Module):
  """Holds one layer (adapt() cannot swap the root)."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x, **kwargs):
    return self.layer(x, **kwargs)


class Block(nnx.Module):
  """A pre-norm-free transformer block: self-attention (LinearGeneral projections) and an Einsum / LinearGeneral MLP."""

  def __init__(self):
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8, out_features=6, decode=False,
                                            kernel_init=ZEROS, rngs=nnx.Rngs(0))
    self.mlp_in = nnx.Einsum('btd,df->btf', (6, 10), (10,), kernel_init=ZEROS, rngs=nnx.Rngs(0))
    self.mlp_out = nnx.LinearGeneral(10, 6, kernel_init=ZEROS, rngs=nnx.Rngs(0))

  def __call__(self, x, **kwargs):
    h = x + self.attention(x, **kwargs)
    return h + self.mlp_out(jax.nn.relu(self.mlp_in(h)))


def _randomize_base(model, seed):
  """Gives every nnx.Param of a (not yet adapted) model N(0, 0.25) values, so base outputs are nontrivial."""
  rng = np.random.default_rng(seed)
  for _, v in nnx.iter_graph(model):
    if type(v) is nnx.Param:
      v.set_value(jnp.asarray(rng.normal(size=v.shape) * 0.5, v.dtype))
  return model


def _filled_block(spec, seed=0):
  mdef, parts = split_model(adapt(Block(), spec, key=_key(seed)))
  return mdef, dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2),
                    local=_fill(parts['local'], 3))


# ------------------------------------------------------------------------------------------------------------------
# LinearGeneral
# ------------------------------------------------------------------------------------------------------------------

LAYOUTS = {  # in_features, out_features, axis, input shape
    'q_proj': (6, (2, 3), -1, (4, 5, 6)),                      # [B, L, F] -> [B, L, H, D]
    'out_proj': ((2, 3), 5, (-2, -1), (4, 5, 2, 3)),           # two contracted axes -> [B, L, F]
    'around_a_kept_axis': ((3, 2), (2, 2), (-1, 1), (4, 3, 5, 2)),  # axes given unsorted, axis 2 kept in between
}


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_linear_general_matches_dense_formula(layout):
  in_f, out_f, axis, x_shape = LAYOUTS[layout]
  in_f, out_f = np.atleast_1d(in_f).tolist(), np.atleast_1d(out_f).tolist()
  base = nnx.LinearGeneral(in_f, out_f, axis=axis, kernel_init=ZEROS, rngs=nnx.Rngs(0))
  spec = _spec(rank=2, alpha=3.0, num_global=2, num_local=1, bias=True)
  model = adapt(One(base), spec, key=_key(0))
  assert isinstance(model.layer, AdaptedLinearGeneral) and model.layer.scale == 1.5
  mdef, parts = split_model(model)
  d_in, d_out = int(np.prod(in_f)), int(np.prod(out_f))
  assert {k: v.shape for k, v in parts['adapters']['layer'].items()} == {
      'global_a': (2, d_in, 2), 'global_b': (2, 2, d_out), 'global_bias': (2, d_out)}
  parts = dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2),
               local=_fill(parts['local'], 3))
  w, b0 = (_np(parts['base']['layer']['base'])[k] for k in ('kernel', 'bias'))
  g, l = _np(parts['adapters']['layer']), _np(parts['local']['layer'])
  x = _x(4, x_shape)
  contracted = sorted(a % len(x_shape) for a in np.atleast_1d(axis))

  def lg(kernel, bias):  # LinearGeneral written out: contract the sorted axes with the kernel's leading in-axes
    return np.tensordot(x, kernel, axes=(contracted, list(range(len(in_f))))) + bias.reshape(out_f)

  def lora(a, b, bias):
    return lg(1.5 * (a @ b).reshape(in_f + out_f), 1.5 * bias)

  mix, wg, wl = np.array([0.3, 0.7]), np.array([1.0, 0.5, 0.0, 0.2]), np.array([0.0, 1.0, 0.5, 0.9])
  per_example = lambda v: v.reshape((-1,) + (1,) * (len(x_shape) - len(in_f) + len(out_f) - 1))  # noqa: E731
  expected = (lg(w, b0)
              + per_example(wg) * sum(mix[c] * lora(g['global_a'][c], g['global_b'][c], g['global_bias'][c])
                                      for c in range(2))
              + per_example(wl) * lora(l['local_a'][0], l['local_b'][0], l['local_bias'][0]))
  y, _ = jax.jit(mdef.apply)(parts, _f32(x), mix=_f32(mix), global_weight=_f32(wg), local_weight=_f32(wl))
  np.testing.assert_allclose(y, expected, **TOL)


def test_linear_general_bias_adaptor_without_lora():
  model = adapt(One(nnx.LinearGeneral(6, (2, 3), kernel_init=ZEROS, rngs=nnx.Rngs(0))),
                _spec(linear=False, bias=True, bias_init='uniform', num_global=2), key=_key(0))
  mdef, parts = split_model(model)
  bias = np.asarray(parts['adapters']['layer']['global_bias'], np.float64)
  assert list(parts['adapters']['layer']) == ['global_bias'] and bias.shape == (2, 6) and np.abs(bias).min() > 0
  parts = dict(parts, base=_fill(parts['base'], 1))
  w, b0 = (_np(parts['base']['layer']['base'])[k] for k in ('kernel', 'bias'))
  x = _x(3, (4, 6))
  y, _ = jax.jit(mdef.apply)(parts, _f32(x), mix=jnp.array([0.25, 0.75]))
  np.testing.assert_allclose(y, np.tensordot(x, w, 1) + b0 + (0.25 * bias[0] + 0.75 * bias[1]).reshape(2, 3), **TOL)


def test_linear_general_rank_rules_use_the_flattened_sizes():
  def build(**kw):
    layer = nnx.LinearGeneral(12, (4, 4), rngs=nnx.Rngs(0))
    return nnx.eval_shape(lambda: adapt(One(layer), _spec(**kw), key=_key(0)))

  # FLoRAL's budget on d_in = 12, d_out = 16: int(0.5 * 12 * 16 / 28) = 3.
  m = build(rank=0.5, num_global=4, bias=True)
  assert (m.layer.global_a.shape, m.layer.global_b.shape, m.layer.global_bias.shape) == ((4, 12, 3), (4, 3, 16),
                                                                                          (4, 16))
  assert build(rank='full').layer.global_a.shape == (1, 12, 12)
  assert build(rank=3, alpha=6.0).layer.scale == 2.0
  with pytest.raises(ValueError, match=r"cannot adapt layer 'layer': rank 13 .*d_in=12, d_out=16"):
    build(rank=13)


def test_linear_general_with_batch_axes_is_refused():
  model = One(nnx.LinearGeneral(3, 4, batch_axis={0: 2}, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"cannot adapt layer 'layer': LoRA does not support LinearGeneral with "
                                       r"batch_axis=\{0: 2\}"):
    adapt(model, _spec(), key=_key(0))
  assert not adapted_paths(model)


# ------------------------------------------------------------------------------------------------------------------
# MultiHeadAttention: LoRA on q/v by a regex target
# ------------------------------------------------------------------------------------------------------------------

def test_attention_lora_on_query_value_equals_attention_with_merged_kernels():
  model = adapt(Block(), _spec(target=QV, rank=2, alpha=4.0, bias=True), key=_key(0))
  assert adapted_paths(model) == ['attention.query', 'attention.value']
  assert type(model.attention.key) is nnx.LinearGeneral and type(model.attention.out) is nnx.LinearGeneral
  assert isinstance(model.mlp_in, nnx.Einsum) and isinstance(model.mlp_out, nnx.LinearGeneral)
  mdef, parts = split_model(model)
  parts = dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2))
  assert parts['adapters']['attention']['query']['global_a'].shape == (1, 6, 2)   # d_out = heads * head_dim = 8
  assert parts['adapters']['attention']['query']['global_b'].shape == (1, 2, 8)

  ref = Block()  # the same block with q/v kernels W + s A B (s = alpha / r = 2) and biases b + s * bias adaptor
  base, ada = _np(parts['base']), _np(parts['adapters'])
  merged = {'mlp_in': base['mlp_in'], 'mlp_out': base['mlp_out'], 'attention': {}}
  for proj, p in base['attention'].items():
    if proj in ('query', 'value'):
      a, p = ada['attention'][proj], p['base']
      p = {'kernel': p['kernel'] + 2.0 * (a['global_a'][0] @ a['global_b'][0]).reshape(p['kernel'].shape),
           'bias': p['bias'] + 2.0 * a['global_bias'][0].reshape(p['bias'].shape)}
    merged['attention'][proj] = p
  state = nnx.state(ref, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(_f32, merged))
  nnx.update(ref, state)
  x = _f32(_x(4, (3, 5, 6)))
  y, _ = jax.jit(mdef.apply)(parts, x)
  np.testing.assert_allclose(y, ref(x), **TOL)
  assert not np.allclose(y, mdef.apply(dict(parts, adapters=jax.tree.map(jnp.zeros_like, parts['adapters'])), x)[0],
                         atol=1e-3)  # the q/v adaptors do change the output


def test_attention_decoding_with_adapted_query_value_matches_the_causal_pass():
  mdef, parts = _filled_block(_spec(target=QV, rank=2, alpha=4.0, num_local=1, bias=True))
  x = _f32(_x(4, (2, 4, 6)))
  full, _ = jax.jit(mdef.apply)(parts, x, mask=nnx.make_causal_mask(x[..., 0]), global_weight=jnp.array([1.0, 0.5]))
  model = mdef.bind(parts, global_weight=jnp.array([1.0, 0.5]))
  model.attention.init_cache(x.shape)
  step = nnx.jit(lambda m, x_t: m(x_t, decode=True))  # one compile; the cache is updated in the model
  steps = [step(model, x[:, t:t + 1]) for t in range(x.shape[1])]
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)


# ------------------------------------------------------------------------------------------------------------------
# Einsum
# ------------------------------------------------------------------------------------------------------------------

# equation, kernel shape, bias shape (the free axes in output order), input shape, and by hand: the permutation taking
# reshape(A @ B, contracted sizes in input order + free sizes in output order) to the kernel's axis order, and the
# shape that broadcasts the bias against the output.
EINSUMS = {
    'dense': ('bti,io->bto', (6, 5), (5,), (3, 4, 6), (0, 1), (5,)),
    'transposed_kernel': ('bti,oi->bot', (5, 6), (5,), (3, 4, 6), (1, 0), (5, 1)),
    'heads_out_of_kernel_order': ('nta,hab->ntbh', (2, 6, 3), (3, 2), (3, 4, 6), (2, 0, 1), (3, 2)),  # [a,b,h]->[h,a,b]
    'two_contracted_out_of_order': ('bah,hao->bo', (2, 3, 4), (4,), (5, 3, 2), (1, 0, 2), (4,)),     # [a,h,o]->[h,a,o]
    'ellipsis': ('...nh,nhd->...d', (2, 3, 5), (5,), (3, 4, 2, 3), (0, 1, 2), (5,)),
}


@pytest.mark.parametrize('name', list(EINSUMS))
def test_einsum_matches_dense_formula_and_einsum_with_merged_kernel(name):
  eq, kernel_shape, bias_shape, x_shape, perm, bias_bcast = EINSUMS[name]
  make = lambda: nnx.Einsum(eq, kernel_shape, bias_shape, kernel_init=ZEROS, rngs=nnx.Rngs(0))  # noqa: E731
  model = adapt(One(make()), _spec(rank=2, alpha=3.0, num_global=2, bias=True), key=_key(0))
  assert isinstance(model.layer, AdaptedEinsum)
  mdef, parts = split_model(model)
  parts = dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2))
  base, g = _np(parts['base']['layer']['base']), _np(parts['adapters']['layer'])
  d_out = int(np.prod(bias_shape))
  assert g['global_a'].shape == (2, int(np.prod(kernel_shape)) // d_out, 2) and g['global_b'].shape == (2, 2, d_out)
  ab_shape = [kernel_shape[perm.index(i)] for i in range(len(perm))]  # the kernel's sizes in reshape(A @ B) order
  mix = np.array([0.25, 0.75])
  kernel = base['kernel'] + sum(
      mix[c] * 1.5 * np.transpose((g['global_a'][c] @ g['global_b'][c]).reshape(ab_shape), perm) for c in range(2))
  bias = base['bias'] + 1.5 * (mix @ g['global_bias']).reshape(bias_shape)
  x = _x(4, x_shape)
  y, _ = jax.jit(mdef.apply)(parts, _f32(x), mix=_f32(mix))
  np.testing.assert_allclose(y, np.einsum(eq, x, kernel) + bias.reshape(bias_bcast), **TOL)
  ref = make()  # a plain nnx.Einsum holding the merged kernel and bias
  ref.kernel.set_value(_f32(kernel))
  ref.bias.set_value(_f32(bias))
  np.testing.assert_allclose(y, ref(_f32(x)), **TOL)


@pytest.mark.parametrize('eq,kernel_shape,why', [
    ('bhd,hde->bhe', (2, 3, 4), r"kernel axes 'h' appear in both the input and the output"),
    ('ab,bcz->ac', (4, 3, 2), r"kernel axes 'z' are summed away"),
    ('ab,c->abc', (3,), 'no kernel axis is contracted with the input'),
    ('ab,bb->a', (4, 4), 'must name each axis once'),
    ('...a,...ab->...b', (4, 3), 'must name each axis once'),
])
def test_einsum_forms_lora_cannot_read_are_refused_naming_layer_and_equation(eq, kernel_shape, why):
  model = One(nnx.Einsum(eq, kernel_shape, kernel_init=ZEROS, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=rf"cannot adapt layer 'layer': einsum '{re.escape(eq)}': .*{why}"):
    adapt(model, _spec(rank=1), key=_key(0))
  assert not adapted_paths(model)


def test_adapted_einsum_refuses_another_equation_at_call_time():
  model = adapt(One(nnx.Einsum('bi,io->bo', (3, 4), rngs=nnx.Rngs(0))), _spec(rank=1), key=_key(0))
  with pytest.raises(ValueError, match=r"adapted for 'bi,io->bo'; it cannot be called with einsum_str='bi,oi->bo'"):
    model(jnp.ones((2, 3)), einsum_str='bi,oi->bo')


# ------------------------------------------------------------------------------------------------------------------
# All three kinds in one block: zero init, mixtures, gradients, vmap over clients, dropout
# ------------------------------------------------------------------------------------------------------------------

ALL = ['attention.key', 'attention.out', 'attention.query', 'attention.value', 'mlp_in', 'mlp_out']


def test_zero_init_b_leaves_the_block_unchanged():
  model = _randomize_base(Block(), 0)
  x = _f32(_x(4, (2, 5, 6)))
  call = nnx.jit(lambda m, x: m(x))
  y0 = call(model, x)
  adapt(model, _spec(rank=2, alpha=4.0, num_global=3, num_local=1, bias=True, bias_init='zeros'), key=_key(0))
  assert sorted(adapted_paths(model)) == ALL
  for _, layer in nnx.iter_graph(model):
    if isinstance(layer, AdaptedLayer):
      assert np.abs(np.asarray(layer.global_a.get_value())).min() > 0  # kaiming A; B and bias adaptors are zero
      for name in ('global_b', 'global_bias', 'local_b', 'local_bias'):
        np.testing.assert_array_equal(getattr(layer, name).get_value(), 0.0)
  np.testing.assert_array_equal(call(model, x), y0)
  mdef, parts = split_model(model)
  np.testing.assert_array_equal(jax.jit(mdef.apply)(parts, x, mix=jnp.array([0.2, 0.3, 0.5]))[0], y0)


def test_one_hot_mix_equals_the_chosen_adaptor_alone():
  mdef, parts = _filled_block(_spec(rank=2, alpha=4.0, num_global=3, bias=True))
  mdef1, parts1 = split_model(adapt(Block(), _spec(rank=2, alpha=4.0, num_global=1, bias=True), key=_key(0)))
  x = _f32(_x(4, (2, 5, 6)))
  apply3, apply1 = jax.jit(mdef.apply), jax.jit(mdef1.apply)
  for c in range(3):
    alone = dict(parts1, base=parts['base'], adapters=jax.tree.map(lambda v: v[c:c + 1], parts['adapters']))
    np.testing.assert_allclose(apply3(parts, x, mix=jax.nn.one_hot(c, 3))[0], apply1(alone, x)[0], **TOL)


def test_gradients_reach_only_adaptor_leaves_when_split_by_variable_type():
  model = adapt(Block(), _spec(rank=2, num_global=2, num_local=1, bias=True), key=_key(0))
  mdef, parts = split_model(model)
  # The adaptors are dense-shaped on the flattened sizes: what lora_preconditioner and PEFT export expect.
  shapes = {name: {k: v.shape for k, v in layer.items()} for name, layer in parts['adapters']['attention'].items()}
  assert shapes['query'] == {'global_a': (2, 6, 2), 'global_b': (2, 2, 8), 'global_bias': (2, 8)}
  assert shapes['out'] == {'global_a': (2, 8, 2), 'global_b': (2, 2, 6), 'global_bias': (2, 6)}
  assert parts['local']['mlp_in']['local_a'].shape == (1, 6, 2)
  assert not any('global_' in str(kp) or 'local_' in str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(
      parts['base']))
  nnx.update(model, nnx.state(mdef.merge(dict(parts, base=_fill(parts['base'], 1),
                                              adapters=_fill(parts['adapters'], 2), local=_fill(parts['local'], 3)))))
  x = _f32(_x(4, (2, 5, 6)))
  grad_fn = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, (GlobalAdapter, LocalAdapter)))
  grads = nnx.jit(grad_fn)(model)
  leaves = dict(jax.tree_util.tree_leaves_with_path(grads.to_pure_dict()))
  expected = {kp for kp, _ in jax.tree_util.tree_leaves_with_path(
      {'adapters': parts['adapters'], 'local': parts['local']})}
  assert len(leaves) == len(expected) == 6 * 6
  for kp, g in leaves.items():
    assert kp[-1].key.startswith(('global_', 'local_')), kp
    assert np.abs(np.asarray(g)).reshape(g.shape[0], -1).max(axis=1).min() > 0, kp  # every adaptor gets a gradient


def test_vmap_over_clients_with_the_base_broadcast_equals_each_client_alone():
  mdef, parts = _filled_block(_spec(rank=2, alpha=4.0, num_global=2, num_local=1, bias=True))
  k = 3
  adapters = jax.tree.map(lambda *v: jnp.stack(v), *[_fill(parts['adapters'], 10 + i) for i in range(k)])
  local = jax.tree.map(lambda *v: jnp.stack(v), *[_fill(parts['local'], 20 + i) for i in range(k)])
  x = _f32(_x(4, (k, 2, 5, 6)))
  mix = jax.nn.softmax(_f32(_x(5, (k, 2))))
  wg = _f32(np.random.default_rng(6).uniform(size=(k, 2)))

  def client(ada, loc, x, mix, wg):
    return mdef.apply(dict(parts, adapters=ada, local=loc), x, mix=mix, global_weight=wg)[0]

  ys = jax.jit(jax.vmap(client))(adapters, local, x, mix, wg)
  one = jax.jit(client)
  for i in range(k):
    alone = one(jax.tree.map(lambda v: v[i], adapters), jax.tree.map(lambda v: v[i], local), x[i], mix[i], wg[i])
    np.testing.assert_allclose(ys[i], alone, **TOL)


def test_lora_dropout_on_linear_general_and_einsum_masks_each_layer_input():
  model = nnx.Sequential(nnx.LinearGeneral(6, (2, 4), kernel_init=ZEROS, rngs=nnx.Rngs(0)),
                         nnx.Einsum('bhd,hdo->bo', (2, 4, 3), (3,), kernel_init=ZEROS, rngs=nnx.Rngs(0)))
  adapt(model, _spec(rank=2, alpha=4.0, dropout=0.25), key=_key(0))
  mdef, parts = split_model(model)
  parts = dict(parts, base=_fill(parts['base'], 1), adapters=_fill(parts['adapters'], 2))
  (l0, l1), (a0, a1) = (_np(parts['base']['layers'][i]['base']) for i in (0, 1)), (
      _np(parts['adapters']['layers'][i]) for i in (0, 1))
  x, key = _x(4, (5, 6)), jax.random.key(7)
  # adapt() numbers the layers 0, 1; each draws keep ~ Bernoulli(0.75) from fold_in(key, its number).
  keep = [np.asarray(jax.random.bernoulli(jax.random.fold_in(key, i), 0.75, s)) for i, s in ((0, (5, 6)),
                                                                                             (1, (5, 2, 4)))]
  s = 2.0
  h = (np.tensordot(x, l0['kernel'], 1) + l0['bias']
       + s * np.tensordot(x * keep[0] / 0.75, (a0['global_a'][0] @ a0['global_b'][0]).reshape(6, 2, 4), 1))
  y = (np.einsum('bhd,hdo->bo', h, l1['kernel']) + l1['bias']
       + s * np.einsum('bhd,hdo->bo', h * keep[1] / 0.75, (a1['global_a'][0] @ a1['global_b'][0]).reshape(2, 4, 3)))
  out, _ = jax.jit(mdef.apply)(parts, _f32(x), dropout_key=key)
  np.testing.assert_allclose(out, y, **TOL)


# ------------------------------------------------------------------------------------------------------------------
# Inspection of an adapted model
# ------------------------------------------------------------------------------------------------------------------

def test_adaptable_paths_answers_on_an_adapted_model_and_adapt_still_refuses_twice():
  model = Block()
  before = adaptable_paths(model)
  assert sorted(before) == ALL and adapted_paths(model) == []
  adapt(model, _spec(target=QV), key=_key(0))
  assert adaptable_paths(model) == before  # the same paths: a target written for the original still reads the same
  assert adapted_paths(model) == ['attention.query', 'attention.value']
  assert adaptable_paths(model, _spec(linear=False, bias=False, embed=True)) == []
  with pytest.raises(ValueError, match=r'already adapted \(layers attention\.query, attention\.value\)'):
    adapt(model, _spec(target='mlp_in'), key=_key(1))

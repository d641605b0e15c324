"""Reference tests for the pure adaptor functions (``fedjax_adapters.adapters``).

Every delta is checked against a formula written out here with numpy in float64 (dense ``x @ (W + s A B)``, conv by
unfolding the input into patches, embedding ``A[ids] @ B``, the norm's affine delta), the FLoRAL rank rule against
hand-computed ranks, and the router against ``softmax((w + xi) / T)`` with the floor left unnormalized.
"""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_adapters.adapters import dual, lora, mixture, targeting

TOL = dict(rtol=1e-5, atol=1e-5)


def _key(seed):
  # The functions under test take any typed key. 'rbg' keys compile in a fraction of a second per new shape on CPU,
  # where the default partitionable threefry takes seconds; one test below also runs the default key.
  return jax.random.key(seed, impl='rbg')


def _rng(seed=0):
  return np.random.default_rng(seed)


def _f32(x):
  return jnp.asarray(np.asarray(x, np.float32))


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------------------------
# Rank rules
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('rank,d_in,d_out,expected', [
    (0.01, 784, 200, 1),      # 0.01 * 784 * 200 / 984 = 1.59
    (0.1, 784, 200, 15),      # 15.93: FLoRAL(10%) MNIST first layer
    (0.1, 200, 10, 1),        # 0.95 -> max(1, 0) = 1: FLoRAL(10%) MNIST head
    (0.01, 200, 10, 1),
    (0.5, 64, 64, 16),
    (3, 784, 200, 3),
    (2.0, 5, 7, 2),           # an integral float is an integer rank, not a budget
    (10, 10, 12, 10),         # exactly min(d_in, d_out) is allowed
    ('full', 12, 7, 7),
    ('full', 3, 9, 3),
])
def test_resolve_rank(rank, d_in, d_out, expected):
  assert lora.resolve_rank(rank, d_in, d_out) == expected


def test_budget_rank_matches_the_parameter_budget():
  # r * (d_in + d_out) <= rho * d_in * d_out < (r + 1) * (d_in + d_out) whenever the budget allows r >= 1.
  for rho, d_in, d_out in [(0.01, 784, 200), (0.1, 784, 200), (0.05, 512, 512), (0.1, 1024, 64)]:
    r = lora.resolve_rank(rho, d_in, d_out)
    assert r * (d_in + d_out) <= rho * d_in * d_out < (r + 1) * (d_in + d_out)


def test_rank_larger_than_the_layer_raises_with_its_dimensions():
  with pytest.raises(ValueError, match=r'rank 11 .*d_in=20, d_out=10.*max rank 10'):
    lora.resolve_rank(11, 20, 10)
  with pytest.raises(ValueError, match=r'rank 11 .*d_in=10, d_out=20'):
    lora.init_dense(_key(0), 10, 20, 11)


@pytest.mark.parametrize('rank', [0, -2, 1.5, -0.5, 'sqrt', 'lots'])
def test_bad_rank_raises(rank):
  with pytest.raises(ValueError):
    lora.resolve_rank(rank, 16, 16)


def test_conv_rank_uses_cin_kw_and_cout_kh():
  # Kernel (k_h, k_w) = (3, 5), C_in = 4, C_out = 6: d_in = C_in * k_w = 20, d_out = C_out * k_h = 18.
  # (The swapped rule, C_in * k_h = 12 and C_out * k_w = 30, would give 'full' -> 12.)
  key = _key(0)
  p = lora.init_conv(key, 4, 6, (3, 5), 'full', num_adaptors=2, bias=True, bias_init='uniform')
  assert p['a'].shape == (2, 1, 5, 4, 18) and p['b'].shape == (2, 3, 1, 18, 6) and p['bias'].shape == (2, 6)
  np.testing.assert_array_equal(p['b'], 0.0)
  a = np.asarray(p['a'])
  assert np.abs(a).max() <= math.sqrt(6.0 / 20) and np.abs(a).max() > 0.9 * math.sqrt(6.0 / 20)  # fan_in C_in*k_w
  bias = np.asarray(p['bias'])
  assert np.abs(bias).max() <= 1.0 / math.sqrt(18 * 3) and np.abs(bias).min() > 0.0  # fan_in r * k_h
  p = jax.eval_shape(lambda: lora.init_conv(key, 4, 6, (3, 5), 0.5))
  assert p['a'].shape[-1] == int(0.5 * 20 * 18 / 38) == 4
  with pytest.raises(ValueError, match=r'rank 19 .*d_in=20, d_out=18'):
    lora.init_conv(key, 4, 6, (3, 5), 19)


# ------------------------------------------------------------------------------------------------------------------
# Initialization
# ------------------------------------------------------------------------------------------------------------------

def test_init_dense_shapes_and_bounds():
  key = _key(1)
  p = lora.init_dense(key, 50, 30, 4, num_adaptors=3, bias=True, bias_init='uniform')
  assert p['a'].shape == (3, 50, 4) and p['b'].shape == (3, 4, 30) and p['bias'].shape == (3, 30)
  np.testing.assert_array_equal(p['b'], 0.0)
  a = np.asarray(p['a'])
  bound = math.sqrt(6.0 / 50)  # FLoRAL uniform_in: U(+-sqrt(6 / fan_in)), fan_in = d_in
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
  bias = np.asarray(p['bias'])
  assert np.abs(bias).max() <= 1.0 / math.sqrt(4) and np.abs(bias).min() > 0.0  # PyTorch default: U(+-1/sqrt(r))
  a_k = np.asarray(lora.init_dense(key, 50, 30, 4, init='kaiming')['a'])
  assert np.abs(a_k).max() <= 1.0 / math.sqrt(50) and np.abs(a_k).max() > 0.9 / math.sqrt(50)
  p0 = lora.init_dense(key, 50, 30, 4, num_adaptors=3, bias=True)
  np.testing.assert_array_equal(p0['bias'], 0.0)
  assert 'bias' not in lora.init_dense(key, 50, 30, 4, num_adaptors=3)
  assert 'bias' not in lora.init_dense(key, 50, 30, 4, num_adaptors=3)
  with pytest.raises(ValueError, match='unknown init'):
    jax.eval_shape(lambda: lora.init_dense(key, 5, 5, 1, init='xavier'))
  with pytest.raises(ValueError, match='bias_init'):
    jax.eval_shape(lambda: lora.init_dense(key, 5, 5, 1, bias=True, bias_init='ones'))


def test_zero_init_b_leaves_the_base_output_unchanged():
  rng = _rng(2)
  x = _f32(rng.normal(size=(5, 50)))
  w = _f32(rng.normal(size=(50, 30)))
  p = lora.init_dense(_key(3), 50, 30, 4, num_adaptors=3, bias=True, bias_init='zeros')
  base = x @ w
  np.testing.assert_array_equal(base + lora.dense_delta(p, x, scale=5.0), base)
  # The default (threefry) key, once, on a small layer (its compile time grows with the factor's shape).
  p = lora.init_dense(jax.random.key(3), 4, 3, 2, bias=True)
  assert np.abs(np.asarray(p['a'])).min() > 0
  np.testing.assert_array_equal(lora.dense_delta(p, x[:, :4]), 0.0)
  pc = lora.init_conv(_key(3), 4, 6, (3, 5), 'full', num_adaptors=2, bias=True)
  np.testing.assert_array_equal(lora.conv_delta(pc, _f32(rng.normal(size=(2, 6, 7, 4)))), 0.0)
  pe = lora.init_embed(_key(3), 11, 6, 2)
  assert pe['a'].shape == (1, 11, 2) and pe['b'].shape == (1, 2, 6)
  np.testing.assert_array_equal(lora.embed_delta(pe, jnp.array([[1, 2], [10, 0]])), 0.0)
  pn = lora.init_norm(6, num_adaptors=3)
  np.testing.assert_array_equal(lora.norm_delta(pn, _f32(rng.normal(size=(4, 6)))), 0.0)


# ------------------------------------------------------------------------------------------------------------------
# Dense LoRA
# ------------------------------------------------------------------------------------------------------------------

def _dense_params(rng, c, d_in, r, d_out, bias=False):
  p = {'a': rng.normal(size=(c, d_in, r)) * 0.5, 'b': rng.normal(size=(c, r, d_out)) * 0.5}
  if bias:
    p['bias'] = rng.normal(size=(c, d_out))
  return p


@pytest.mark.parametrize('alpha,rank', [(None, 4), (16.0, 4), (8.0, 2)])
def test_dense_lora_matches_merged_weight_and_two_paths(alpha, rank):
  rng = _rng(4)
  d_in, d_out = 10, 6
  x = rng.normal(size=(3, 2, d_in))  # extra batch axes
  w = rng.normal(size=(d_in, d_out))
  p = _dense_params(rng, 1, d_in, rank, d_out)
  s = 1.0 if alpha is None else alpha / rank  # PEFT scaling alpha / r; FLoRAL: unscaled
  a, b = p['a'][0], p['b'][0]
  merged = x @ (w + s * a @ b)
  two_paths = x @ w + s * (x @ a) @ b
  np.testing.assert_allclose(merged, two_paths, rtol=1e-10)
  pj = {k: _f32(v) for k, v in p.items()}
  y = _f32(x) @ _f32(w) + lora.dense_delta(pj, _f32(x), scale=s)
  np.testing.assert_allclose(y, merged, **TOL)
  np.testing.assert_allclose(lora.dense_dense_weight(pj, scale=s), s * a @ b, **TOL)
  y_merged = _f32(x) @ (_f32(w) + lora.dense_dense_weight(pj, scale=s))
  np.testing.assert_allclose(y_merged, merged, **TOL)


def test_dense_bias_adaptor_and_bias_only_params():
  rng = _rng(5)
  x = rng.normal(size=(4, 8))
  p = _dense_params(rng, 3, 8, 2, 5, bias=True)
  wts = np.array([0.2, 0.5, 0.3])
  expected = sum(wts[c] * (x @ p['a'][c] @ p['b'][c] + p['bias'][c]) for c in range(3)) * 0.5
  pj = {k: _f32(v) for k, v in p.items()}
  np.testing.assert_allclose(lora.dense_delta(pj, _f32(x), _f32(wts), scale=0.5), expected, **TOL)
  only_bias = lora.dense_delta({'bias': pj['bias']}, _f32(x), _f32(wts))
  np.testing.assert_allclose(only_bias, wts @ p['bias'], **TOL)


def test_dense_mixture_one_hot_and_uniform():
  rng = _rng(6)
  xn = rng.normal(size=(4, 9))
  pn = _dense_params(rng, 4, 9, 3, 5, bias=True)
  x, p = _f32(xn), {k: _f32(v) for k, v in pn.items()}
  singles = [xn @ pn['a'][c] @ pn['b'][c] + pn['bias'][c] for c in range(4)]
  for c in range(4):
    np.testing.assert_allclose(lora.dense_delta(p, x, jax.nn.one_hot(c, 4)), singles[c], **TOL)
    np.testing.assert_allclose(lora.dense_dense_weight(p, jax.nn.one_hot(c, 4)), pn['a'][c] @ pn['b'][c], **TOL)
  mean = sum(singles) / 4
  np.testing.assert_allclose(lora.dense_delta(p, x, jnp.full((4,), 0.25)), mean, **TOL)
  np.testing.assert_allclose(lora.dense_delta(p, x), mean, **TOL)  # default weights: uniform
  np.testing.assert_allclose(lora.dense_dense_weight(p), sum(pn['a'][c] @ pn['b'][c] for c in range(4)) / 4, **TOL)


@pytest.mark.parametrize('bad', [(3,), (5,), (1, 4), ()])
def test_mixture_weights_of_the_wrong_length_raise(bad):
  rng = _rng(7)
  p = {k: _f32(v) for k, v in _dense_params(rng, 4, 6, 2, 3).items()}
  x = _f32(rng.normal(size=(2, 6)))
  with pytest.raises(ValueError, match=r'holds 4 adaptors'):
    lora.dense_delta(p, x, jnp.ones(bad))
  with pytest.raises(ValueError, match=r'holds 4 adaptors'):
    lora.dense_dense_weight(p, jnp.ones(bad))


# ------------------------------------------------------------------------------------------------------------------
# Einsum-shaped LoRA (nnx.Einsum / nnx.LinearGeneral)
# ------------------------------------------------------------------------------------------------------------------

def test_einsum_form_reads_contracted_axes_in_input_order_and_free_axes_in_output_order():
  form = lora.einsum_form('b ah,hoa->bo', (2, 4, 3))  # spaces are ignored, as nnx.Einsum ignores them
  assert (form.lhs, form.out, form.contracted, form.free) == ('bah', 'bo', 'ah', 'o')
  assert (form.in_shape, form.out_shape, form.d_in, form.d_out) == ((3, 2), (4,), 6, 4)
  # nnx.LinearGeneral(in_features=(3, 2), out_features=(2, 2), axis=(-1, 1)) on a rank-4 input: axes 1 and 3.
  form = lora.linear_general_form(4, (-1, 1), (3, 2), (2, 2))
  assert (form.lhs, form.out, form.contracted, form.free) == ('abcd', 'acef', 'bd', 'ef')
  assert (form.d_in, form.d_out) == (6, 4)


@pytest.mark.parametrize('eq', ['ab->b', 'ab,bc', 'ab,bc,cd->ad', 'ab->b,c'])
def test_einsum_form_rejects_equations_that_are_not_input_kernel_output(eq):
  with pytest.raises(ValueError, match=rf"einsum '{re.escape(eq)}' is not of the form 'input,kernel->output'"):
    lora.einsum_form(eq, (2, 2))


def test_einsum_form_rejects_a_kernel_term_that_does_not_match_the_kernel():
  with pytest.raises(ValueError, match=r"kernel term 'io' has 2 axes but the kernel has shape \(2, 3, 4\)"):
    lora.einsum_form('bi,io->bo', (2, 3, 4))
  with pytest.raises(ValueError, match=r'axis \(2,\) does not fit'):
    lora.linear_general_form(2, (2,), (3,), (4,))


def test_einsum_delta_on_a_dense_equation_equals_dense_delta():
  rng = _rng(8)
  pj = {k: _f32(v) for k, v in _dense_params(rng, 3, 6, 2, 5, bias=True).items()}
  x, wts = _f32(rng.normal(size=(4, 7, 6))), _f32([0.2, 0.5, 0.3])
  form = lora.einsum_form('bti,io->bto', (6, 5))
  np.testing.assert_allclose(lora.einsum_delta(pj, x, wts, form=form, scale=0.5),
                             lora.dense_delta(pj, x, wts, scale=0.5), **TOL)


def test_einsum_bias_only_adaptor_broadcasts_along_the_free_axes():
  rng = _rng(9)
  bias, wts = rng.normal(size=(2, 5)), np.array([0.4, 0.6])
  form = lora.einsum_form('...nh,nhd->...d', (2, 3, 5))  # output [..., d]
  y = lora.einsum_delta({'bias': _f32(bias)}, _f32(np.ones((3, 4, 2, 3))), _f32(wts), form=form, scale=2.0)
  assert y.shape == (1, 1, 5)  # broadcasts against the output, like dense_delta's bias-only [d_out]
  np.testing.assert_allclose(y[0, 0], 2.0 * wts @ bias, **TOL)
  form = lora.einsum_form('bti,oi->bot', (5, 6))       # the free axis sits in the middle of the output [b, o, t]
  y = lora.einsum_delta({'bias': _f32(bias)}, _f32(np.ones((3, 4, 6))), _f32(wts), form=form)
  assert y.shape == (1, 5, 1)
  np.testing.assert_allclose(y[0, :, 0], wts @ bias, **TOL)


# ------------------------------------------------------------------------------------------------------------------
# Conv LoRA: against the dense formula on unfolded patches (im2col), written out with numpy
# ------------------------------------------------------------------------------------------------------------------

def _np_pads(padding, in_hw, kernel_hw, strides, dilation):
  if padding == 'VALID':
    return ((0, 0), (0, 0))
  if padding == 'SAME':  # TF/XLA rule: out = ceil(in / s), the extra pixel goes on the high side
    pads = []
    for n, k, s, d in zip(in_hw, kernel_hw, strides, dilation):
      out = -(-n // s)
      total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
      pads.append((total // 2, total - total // 2))
    return tuple(pads)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  return tuple(tuple(p) for p in padding)


def _np_conv_im2col(x, kernel, strides, pads, dilation):
  """x: [N, H, W, C_in], kernel: [k_h, k_w, C_in, C_out] -> patches [N, H_o, W_o, k_h*k_w*C_in] @ kernel.reshape."""
  n, _, _, c_in = x.shape
  kh, kw, _, c_out = kernel.shape
  (sh, sw), (dh, dw) = strides, dilation
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - ((kh - 1) * dh + 1)) // sh + 1
  wo = (xp.shape[2] - ((kw - 1) * dw + 1)) // sw + 1
  patches = np.zeros((n, ho, wo, kh, kw, c_in))
  for i in range(kh):
    for j in range(kw):
      patches[:, :, :, i, j, :] = xp[:, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw]
  return patches.reshape(n, ho, wo, kh * kw * c_in) @ kernel.reshape(kh * kw * c_in, c_out)


def _np_conv_kernel(a, b):
  """The full kernel of the 1 x k_w (a: [1, k_w, C_in, r]) then k_h x 1 (b: [k_h, 1, r, C_out]) factorization."""
  kh, kw = b.shape[0], a.shape[1]
  k = np.zeros((kh, kw, a.shape[2], b.shape[3]))
  for i in range(kh):
    for j in range(kw):
      k[i, j] = a[0, j] @ b[i, 0]
  return k


CONV_CASES = [
    # (in_hw, kernel_hw, strides, padding, dilation)
    ((7, 7), (3, 3), (1, 1), 'SAME', (1, 1)),
    ((8, 7), (3, 2), (2, 1), 'SAME', (1, 1)),            # even kernel + stride: asymmetric SAME padding
    ((9, 10), (5, 3), (2, 2), 'SAME', (2, 2)),
    ((7, 8), (2, 3), (1, 2), 'VALID', (2, 1)),
    ((9, 8), (3, 2), (2, 3), ((1, 0), (2, 1)), (1, 2)),   # explicit asymmetric padding
    ((6, 9), (1, 4), (1, 1), ((0, 2), (3, 0)), (1, 1)),
    ((7, 7), (3, 3), (3, 3), 'SAME', (1, 1)),
    ((6, 6), (3, 3), (1, 1), 1, (1, 1)),                 # int padding
]


@pytest.mark.parametrize('in_hw,kernel_hw,strides,padding,dilation', CONV_CASES)
def test_conv_lora_matches_unfolded_dense_formula(in_hw, kernel_hw, strides, padding, dilation):
  rng = _rng(8)
  c_in, c_out, r, num = 3, 4, 2, 2
  kh, kw = kernel_hw
  x = rng.normal(size=(2,) + in_hw + (c_in,))
  p = {'a': rng.normal(size=(num, 1, kw, c_in, r)) * 0.5, 'b': rng.normal(size=(num, kh, 1, r, c_out)) * 0.5,
       'bias': rng.normal(size=(num, c_out))}
  wts = np.array([0.7, 0.2])
  scale = 1.5
  pads = _np_pads(padding, in_hw, kernel_hw, strides, dilation)
  kernels = [_np_conv_kernel(p['a'][c], p['b'][c]) for c in range(num)]
  expected = scale * sum(wts[c] * (_np_conv_im2col(x, kernels[c], strides, pads, dilation) + p['bias'][c])
                         for c in range(num))
  pj = {k: _f32(v) for k, v in p.items()}
  # Jitted: one compile per geometry costs less than the eager ops (the eager path runs in the mixture test below).
  delta = jax.jit(functools.partial(lora.conv_delta, strides=strides, padding=padding, dilation=dilation,
                                    scale=scale))
  got = delta(pj, _f32(x), _f32(wts))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, **TOL)
  # conv_padding resolves the spec to the same explicit pads.
  assert lora.conv_padding(padding, in_hw, kernel_hw, strides, dilation) == pads
  # The factorized conv equals one lax conv with the full kernel sum_c w_c a_c (x) b_c.
  dense_kernel = lora.conv_dense_kernel(pj, _f32(wts), scale=scale)
  np.testing.assert_allclose(dense_kernel, scale * sum(wts[c] * kernels[c] for c in range(num)), **TOL)
  lax_pad = padding if isinstance(padding, str) else list(pads)
  full = jax.jit(functools.partial(lax.conv_general_dilated, window_strides=strides, padding=lax_pad,
                                   rhs_dilation=dilation, dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(
                                       _f32(x), dense_kernel)
  np.testing.assert_allclose(got, full + scale * (_f32(wts) @ pj['bias']), **TOL)


def test_conv_mixture_one_hot_and_uniform():
  rng = _rng(9)
  p = {'a': _f32(rng.normal(size=(3, 1, 3, 2, 2))), 'b': _f32(rng.normal(size=(3, 3, 1, 2, 5)))}
  x = _f32(rng.normal(size=(2, 6, 6, 2)))
  singles = [lora.conv_delta({k: v[c:c + 1] for k, v in p.items()}, x, padding='VALID') for c in range(3)]
  for c in range(3):
    np.testing.assert_allclose(lora.conv_delta(p, x, jax.nn.one_hot(c, 3), padding='VALID'), singles[c], **TOL)
  np.testing.assert_allclose(lora.conv_delta(p, x, padding='VALID'), sum(singles) / 3, **TOL)
  with pytest.raises(ValueError, match='holds 3 adaptors'):
    lora.conv_delta(p, x, jnp.ones((2,)))


def test_conv_padding_rejects_unsupported_specs():
  with pytest.raises(ValueError, match='CIRCULAR'):
    lora.conv_padding('CIRCULAR', (5, 5), (3, 3), (1, 1), (1, 1))
  with pytest.raises(ValueError, match='2-d padding'):
    lora.conv_padding(((1, 1), (1, 1), (1, 1)), (5, 5), (3, 3), (1, 1), (1, 1))
  assert lora.conv_padding((1, (2, 0)), (5, 5), (3, 3), (1, 1), (1, 1)) == ((1, 1), (2, 0))


# ------------------------------------------------------------------------------------------------------------------
# Embedding, bias and norm adaptors
# ------------------------------------------------------------------------------------------------------------------

def test_embedding_lora_matches_lookup_formula():
  rng = _rng(10)
  vocab, dim, r = 13, 6, 3
  emb = rng.normal(size=(vocab, dim))
  a = rng.normal(size=(2, vocab, r))
  b = rng.normal(size=(2, r, dim))
  ids = np.array([[0, 5, 12], [7, 7, 3]])
  wts = np.array([0.25, 0.75])
  p = {'a': _f32(a), 'b': _f32(b)}
  expected_single = emb[ids] + a[1][ids] @ b[1]
  got_single = _f32(emb)[ids] + lora.embed_delta({'a': p['a'][1:], 'b': p['b'][1:]}, jnp.asarray(ids))
  np.testing.assert_allclose(got_single, expected_single, **TOL)
  expected = 0.5 * sum(wts[c] * a[c][ids] @ b[c] for c in range(2))
  np.testing.assert_allclose(lora.embed_delta(p, jnp.asarray(ids), _f32(wts), scale=0.5), expected, **TOL)
  np.testing.assert_allclose(lora.embed_delta(p, jnp.asarray(ids), jax.nn.one_hot(0, 2)), a[0][ids] @ b[0], **TOL)


def test_bias_adaptor():
  rng = _rng(11)
  bias = rng.normal(size=(3, 7))
  wts = np.array([0.1, 0.6, 0.3])
  p = {'bias': _f32(bias)}
  np.testing.assert_allclose(lora.bias_delta(p, _f32(wts)), wts @ bias, **TOL)
  np.testing.assert_allclose(lora.bias_delta(p), bias.mean(0), **TOL)
  np.testing.assert_array_equal(lora.init_bias(_key(0), 7, num_adaptors=3)['bias'], np.zeros((3, 7)))
  u = np.asarray(lora.init_bias(_key(0), 30, num_adaptors=3, fan_in=16, bias_init='uniform')['bias'])
  assert u.shape == (3, 30) and np.abs(u).max() <= 0.25 and np.abs(u).max() > 0.2
  with pytest.raises(ValueError, match='holds 3 adaptors'):
    lora.bias_delta(p, jnp.ones((2,)))


def test_norm_adaptor_is_an_affine_delta_on_the_normalized_input():
  rng = _rng(12)
  x_hat = rng.normal(size=(4, 3, 5))
  scale, shift = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
  wts = np.array([0.4, 0.6])
  p = {'scale': _f32(scale), 'shift': _f32(shift)}
  np.testing.assert_allclose(lora.norm_delta(p, _f32(x_hat), _f32(wts)), x_hat * (wts @ scale) + wts @ shift, **TOL)
  np.testing.assert_allclose(lora.norm_delta(p, _f32(x_hat), jax.nn.one_hot(1, 2)), x_hat * scale[1] + shift[1],
                             **TOL)


def test_params_without_adaptor_keys_raise():
  with pytest.raises(ValueError, match='none of the keys'):
    lora.dense_delta({'c': jnp.ones((1, 2))}, jnp.ones((1, 2)))


# ------------------------------------------------------------------------------------------------------------------
# Router (FLoRAL)
# ------------------------------------------------------------------------------------------------------------------

def test_router_probs_softmax_with_temperature_and_floor():
  logits = np.array([0.5, -1.0, 2.0, 0.0])
  for t in (1.0, 0.5, 3.0):
    np.testing.assert_allclose(mixture.router_probs(_f32(logits), temperature=t, floor=None),
                               _np_softmax(logits / t), **TOL)
  # The floor lifts small weights to 0.01 without renormalizing: the big weight is untouched and the sum exceeds 1.
  logits = np.array([10.0, 0.0, 0.0, -10.0])
  sm = _np_softmax(logits)
  pi = np.asarray(mixture.router_probs(_f32(logits)))
  np.testing.assert_allclose(pi, np.maximum(sm, 0.01), **TOL)
  np.testing.assert_allclose(pi[0], sm[0], **TOL)
  assert pi.min() == pytest.approx(0.01) and pi.sum() > 1.0 + 0.02
  np.testing.assert_allclose(mixture.router_probs(_f32(logits), floor=0.2), np.maximum(sm, 0.2), **TOL)
  # Zero logits: the uniform mixture.
  np.testing.assert_allclose(mixture.router_probs(jnp.zeros(5)), np.full(5, 0.2), **TOL)


def test_router_noise_is_uniform_in_zero_noise_std_and_needs_a_key():
  # pi = softmax((w + xi) / T) with floor off, so T * log(pi) - w = xi - const: recover the noise from many adaptors.
  # Its spread stays below noise_std and fills it (xi ~ noise_std * U[0, 1)), with the mean halfway. Noise added
  # after the temperature (w / T + xi) would show a spread of T * noise_std instead.
  c, t, noise_std = 4096, 2.0, 0.7
  logits = _rng(13).normal(size=c)
  pi = mixture.router_probs(_f32(logits), _key(7), train=True, noise_std=noise_std, temperature=t, floor=None)
  xi = t * np.log(np.asarray(pi, np.float64)) - logits
  xi -= xi.min()
  assert 0.99 * noise_std < xi.max() < noise_std * (1 + 1e-4)
  assert abs(xi.mean() - noise_std / 2) < 0.02
  np.testing.assert_allclose(np.sum(pi), 1.0, rtol=1e-5)
  # Different keys, different noise; evaluation ignores the key and adds no noise.
  other = mixture.router_probs(_f32(logits), _key(8), train=True, noise_std=noise_std, temperature=t, floor=None)
  assert not np.allclose(pi, other)
  eval_pi = mixture.router_probs(_f32(logits), _key(7), train=False, temperature=t, floor=None)
  np.testing.assert_allclose(eval_pi, _np_softmax(logits / t), **TOL)
  with pytest.raises(ValueError, match='needs a PRNG key'):
    mixture.router_probs(_f32(logits), None, train=True)
  # No noise, no key needed.
  np.testing.assert_allclose(mixture.router_probs(_f32(logits), train=True, noise_std=0.0),
                             mixture.router_probs(_f32(logits)), **TOL)


def test_router_probs_checks():
  with pytest.raises(ValueError, match='router has 3 logits but the model holds 4 adaptors'):
    mixture.router_probs(jnp.zeros(3), num_adaptors=4)
  assert mixture.router_probs(jnp.zeros(4), num_adaptors=4).shape == (4,)
  with pytest.raises(ValueError, match='vector'):
    mixture.router_probs(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match='temperature'):
    mixture.router_probs(jnp.zeros(3), temperature=0.0)


def test_aggregation_probs_and_oracle_logits():
  logits = _rng(14).normal(size=(5, 3)) * 4
  np.testing.assert_allclose(mixture.aggregation_probs(_f32(logits)), _np_softmax(logits), **TOL)
  np.testing.assert_allclose(mixture.aggregation_probs(_f32(logits), 2.0), _np_softmax(logits / 2.0), **TOL)
  oracle = np.asarray(mixture.oracle_logits(jnp.array([0, 2, 1, 2]), 3))
  np.testing.assert_array_equal(oracle, [[0, -100, -100], [-100, -100, 0], [-100, 0, -100], [-100, -100, 0]])
  # Through the router (floored) the oracle is the one-hot mixture with the other adaptors at the floor.
  np.testing.assert_allclose(mixture.router_probs(jnp.asarray(oracle[1])), [0.01, 0.01, 1.0], **TOL)
  np.testing.assert_array_equal(mixture.oracle_logits(jnp.array([1]), 2, off_value=-5.0), [[-5.0, 0.0]])


# ------------------------------------------------------------------------------------------------------------------
# Dual adapter (FedDPA)
# ------------------------------------------------------------------------------------------------------------------

def test_dual_delta_with_zero_local_is_the_global_delta():
  rng = _rng(15)
  gd = _f32(rng.normal(size=(4, 3, 5)))
  np.testing.assert_array_equal(dual.dual_delta(gd, jnp.zeros_like(gd), 1.0, 1.0), gd)
  np.testing.assert_allclose(dual.dual_delta(gd, jnp.zeros_like(gd), 0.3, jnp.arange(4.0)), 0.3 * gd, **TOL)


def test_dual_delta_per_example_weights_equal_each_example_alone():
  rng = _rng(16)
  gd, ld = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
  wg, wl = rng.uniform(size=4), rng.uniform(size=4)
  got = dual.dual_delta(_f32(gd), _f32(ld), _f32(wg), _f32(wl))
  np.testing.assert_allclose(got, wg[:, None, None] * gd + wl[:, None, None] * ld, **TOL)
  for i in range(4):
    alone = dual.dual_delta(_f32(gd[i:i + 1]), _f32(ld[i:i + 1]), float(wg[i]), float(wl[i]))
    np.testing.assert_allclose(got[i:i + 1], alone, **TOL)


def test_example_weight_shapes():
  like = jnp.ones((3, 2, 4))
  assert dual.example_weight(0.5, like).shape == ()
  assert dual.example_weight(jnp.ones(3), like).shape == (3, 1, 1)
  with pytest.raises(ValueError, match=r'shape \(2,\).*3 examples'):
    dual.example_weight(jnp.ones(2), like)
  with pytest.raises(ValueError, match='per-example weights'):
    dual.example_weight(jnp.ones((3, 1)), like)


def test_dual_delta_stop_gradient():
  rng = _rng(17)
  gd, ld = _f32(rng.normal(size=(2, 3))), _f32(rng.normal(size=(2, 3)))
  wg, wl = jnp.array([0.2, 0.9]), jnp.array([0.5, 0.4])
  f = lambda g, l, **kw: jnp.sum(dual.dual_delta(g, l, wg, wl, **kw))  # noqa: E731
  g_g, g_l = jax.grad(f, argnums=(0, 1))(gd, ld)
  np.testing.assert_allclose(g_g, np.broadcast_to(np.asarray(wg)[:, None], (2, 3)), **TOL)
  np.testing.assert_allclose(g_l, np.broadcast_to(np.asarray(wl)[:, None], (2, 3)), **TOL)
  g_g, g_l = jax.grad(lambda g, l: f(g, l, stop_global=True), argnums=(0, 1))(gd, ld)
  np.testing.assert_array_equal(g_g, 0.0)
  np.testing.assert_allclose(g_l, np.broadcast_to(np.asarray(wl)[:, None], (2, 3)), **TOL)
  g_g, g_l = jax.grad(lambda g, l: f(g, l, stop_local=True), argnums=(0, 1))(gd, ld)
  np.testing.assert_array_equal(g_l, 0.0)
  np.testing.assert_allclose(g_g, np.broadcast_to(np.asarray(wg)[:, None], (2, 3)), **TOL)


# ------------------------------------------------------------------------------------------------------------------
# Targeting
# ------------------------------------------------------------------------------------------------------------------

def test_path_str_and_match_targets():
  assert targeting.path_str(('model', 'layers', 0, 'q_proj')) == 'model.layers.0.q_proj'
  paths = ['layers.0.q_proj', 'layers.0.k_proj', 'layers.1.q_proj', 'head', 'layers.10.q_proj']
  assert targeting.match_targets(r'.*q_proj', paths) == ['layers.0.q_proj', 'layers.1.q_proj', 'layers.10.q_proj']
  assert targeting.match_targets(r'layers\.1\..*', paths) == ['layers.1.q_proj']  # full match, not a prefix
  assert targeting.match_targets('head', paths) == ['head']
  assert targeting.match_targets('.*', paths) == paths
  with pytest.raises(ValueError, match=r"matches no adaptable layer.*layers\.0\.q_proj.*head"):
    targeting.match_targets('hea', paths)  # fullmatch: a prefix is not enough
  with pytest.raises(ValueError, match='not a valid regular expression'):
    targeting.match_targets('layers.(', paths)
  with pytest.raises(ValueError, match='none'):
    targeting.match_targets('.*', [])

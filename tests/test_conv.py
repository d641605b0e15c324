"""The slices-and-matmul convolution equals XLA's, values and gradients, and the models can use either."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from fedjax_adapters.conv import conv2d_matmul, conv_auto, conv_fn, conv_matmul, conv_xla
from fedjax_adapters.models import VGG8, CifarCNN, ResNet

TOL = dict(rtol=1e-5, atol=1e-5)


def _lax(x, k, strides, padding, dilation):
  return lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')


@pytest.mark.parametrize('kernel,strides,padding,dilation', [
    ((5, 5), (1, 1), 'VALID', (1, 1)),
    ((3, 3), (2, 2), 'SAME', (1, 1)),
    ((3, 2), (2, 1), ((1, 2), (0, 1)), (2, 1)),
    ((1, 4), (1, 3), ((0, 0), (2, 1)), (1, 2)),
])
def test_matmul_conv_equals_xla_conv_and_its_gradients(kernel, strides, padding, dilation):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 11, 10, 3))
  k = jax.random.normal(kk, kernel + (3, 4))

  @jax.jit
  def both(x, k):  # one compile per case (op-by-op dispatch would compile every slice)
    want = _lax(x, k, strides, padding, dilation)
    got = conv2d_matmul(x, k, strides, padding, dilation, precision='highest')
    g = jax.random.normal(kg, want.shape)
    loss = lambda f: lambda x, k: jnp.sum(f(x, k) * g)
    grads_want = jax.grad(loss(lambda x, k: _lax(x, k, strides, padding, dilation)), (0, 1))(x, k)
    grads_got = jax.grad(loss(lambda x, k: conv2d_matmul(x, k, strides, padding, dilation, precision='highest')),
                         (0, 1))(x, k)
    return (got, *grads_got), (want, *grads_want)

  got, want = both(x, k)
  assert got[0].shape == want[0].shape
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, **TOL)


def test_vmapped_over_per_client_kernels_equals_each_client_alone():
  kx, kk = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (3, 2, 8, 8, 2))
  k = jax.random.normal(kk, (3, 3, 3, 2, 5))
  got = jax.jit(jax.vmap(lambda x, k: conv2d_matmul(x, k, (1, 1), 'SAME', precision='highest')))(x, k)
  for c in range(3):
    np.testing.assert_allclose(got[c], _lax(x[c], k[c], (1, 1), 'SAME', (1, 1)), **TOL)


def test_nnx_conv_with_each_implementation_agrees():
  x = jax.random.normal(jax.random.key(2), (2, 9, 9, 3))

  @jax.jit
  def outs(x):
    return {impl: nnx.Conv(3, 6, (3, 3), strides=2, padding=1, conv_general_dilated=conv_fn(impl),
                           precision='highest', rngs=nnx.Rngs(0))(x) for impl in ('auto', 'matmul', 'xla')}

  outs = outs(x)
  np.testing.assert_allclose(outs['matmul'], outs['xla'], **TOL)
  np.testing.assert_allclose(outs['auto'], outs['xla'], **TOL)


def test_auto_uses_the_matmul_form_on_cpu_only_where_it_applies():
  x, k = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))
  dn = ('NHWC', 'HWIO', 'NHWC')
  jaxpr = str(jax.make_jaxpr(lambda x, k: conv_auto(x, k, (1, 1), 'SAME', dimension_numbers=dn))(x, k))
  assert ('conv_general_dilated' in jaxpr) == (jax.default_backend() != 'cpu')
  grouped = str(jax.make_jaxpr(lambda x, k: conv_auto(x, k[:, :, :1], (1, 1), 'SAME', dimension_numbers=dn,
                                                      feature_group_count=2))(x, k))
  assert 'conv_general_dilated' in grouped  # grouped convs always go to XLA


def _conv_fns(make):
  model = nnx.eval_shape(make)  # abstract: nothing is initialized or compiled
  return {m.conv_general_dilated for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)}


def test_models_convolve_with_the_chosen_implementation():
  # Their outputs are checked against PyTorch in test_vision_models, through the default conv_auto.
  assert _conv_fns(lambda: CifarCNN(rngs=nnx.Rngs(0))) == {conv_auto}
  assert _conv_fns(lambda: CifarCNN(conv_impl='xla', rngs=nnx.Rngs(0))) == {conv_xla}
  assert _conv_fns(lambda: VGG8(conv_impl='matmul', rngs=nnx.Rngs(0))) == {conv_matmul}
  assert _conv_fns(lambda: ResNet(conv_impl='xla', rngs=nnx.Rngs(0))) == {conv_xla}
  assert _conv_fns(lambda: ResNet(rngs=nnx.Rngs(0))) == {conv_auto}


def test_bad_input_is_a_clear_error():
  x, k = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
  dn = ('NHWC', 'HWIO', 'NHWC')
  with pytest.raises(ValueError, match="unknown conv implementation 'cudnn'; valid: auto, matmul, xla"):
    conv_fn('cudnn')
  with pytest.raises(ValueError, match='feature_group_count=2'):
    conv_matmul(x, k[:, :, :1], (1, 1), 'SAME', dimension_numbers=dn, feature_group_count=2)
  with pytest.raises(ValueError, match='input dilation'):
    conv_matmul(x, k, (1, 1), 'SAME', lhs_dilation=(2, 2), dimension_numbers=dn)
  with pytest.raises(ValueError, match='NCHW'):
    conv_matmul(x, k, (1, 1), 'SAME', dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
  with pytest.raises(ValueError, match='input has 2 channels but the kernel expects 4'):
    conv2d_matmul(x, jnp.ones((3, 3, 4, 2)))
  with pytest.raises(ValueError, match='does not fit'):
    conv2d_matmul(x, jnp.ones((7, 7, 2, 2)))
  np.testing.assert_allclose(conv_xla(x, k, (1, 1), 'SAME', dimension_numbers=dn, out_sharding=None),
                             _lax(x, k, (1, 1), 'SAME', (1, 1)), **TOL)

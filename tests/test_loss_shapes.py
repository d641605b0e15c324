"""Issue 20 item 6: targets whose shape does not fit the loss are refused with both shapes named, not failed deep in
JAX (xent) or silently broadcast (mse); too many clients per round is refused where the round meets the data."""
import jax
import numpy as np
import pytest
from flax import nnx

import fedjax_adapters as fa
from fedjax_adapters.algorithms import per_example_loss
from fedjax_adapters.data.federated import stack_clients


def model(rngs):
  return nnx.Sequential(nnx.Linear(4, 3, rngs=rngs))


def one_round(loss, ys, clients_per_round=3):
  data = stack_clients([np.ones((6, 4), np.float32)] * 6, ys)
  alg = fa.fedavg(model, loss=loss, lr=0.1, batch_size=2)
  state = alg.init(jax.random.key(0), 6)
  return fa.make_round(alg, clients_per_round=clients_per_round).run(state, fa.client_data(data), 1)


def test_xent_labels_with_trailing_axis_named():
  with pytest.raises(ValueError, match=r"'xent' needs integer labels of shape \(2,\) for outputs \(2, 3\).*\(2, 1\)"):
    one_round('xent', [np.zeros((6, 1), np.int32)] * 6)


def test_mse_targets_not_broadcast():
  with pytest.raises(ValueError, match=r"'mse' needs targets of the model outputs' shape \(2, 3\); got .*\(2, 1\)"):
    one_round('mse', [np.zeros((6, 1), np.float32)] * 6)


def test_fitting_shapes_still_compute_the_formula():
  out = np.array([[1., 2., 3.], [0., 0., 0.]], np.float32)
  np.testing.assert_allclose(per_example_loss('mse', out, np.zeros_like(out)), [14 / 3, 0.0], rtol=1e-6)
  lab = np.array([2, 0])
  ref = -np.log(np.exp(out)[np.arange(2), lab] / np.exp(out).sum(1))
  np.testing.assert_allclose(per_example_loss('xent', out, lab), ref, rtol=1e-6)


def test_more_clients_per_round_than_clients_named():
  with pytest.raises(ValueError, match='10 clients per round but the data holds only 6'):
    one_round('xent', [np.zeros(6, np.int32)] * 6, clients_per_round=10)

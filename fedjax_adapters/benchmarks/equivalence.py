"""Does the PyTorch loop compute what the JAX round computes? (So that timing one against the other is fair.)

From the same initial weights and with router noise off (the only random part), one client's local epoch is run by
the library's ``client_update`` and by the PyTorch loop, and a two-client round by the library's sequential backend
and by the PyTorch round. The practitioner's plain loop (no preconditioner) is checked against the library's FLoRAL
with the preconditioner off. The JSON records the largest relative differences of the losses and of every parameter;
``tests/test_benchmarks.py`` asserts them small.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from fedjax_adapters.benchmarks import setups
from fedjax_adapters.federated.client_update import ClientData
from fedjax_adapters.federated import client_data, make_round, sequential_clients


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _param_diff(torch_sd, expected) -> tuple[float, str]:
  worst, name = 0.0, ''
  for k, v in expected.items():
    d = float(np.max(np.abs(torch_sd[k].cpu().numpy() - v.numpy())) / max(float(np.max(np.abs(v.numpy()))), 1e-6))
    if d >= worst:
      worst, name = d, k
  return worst, name


def one_client(workload: setups.Workload, device: str = 'cpu', alg=None, plain: bool = False) -> dict[str, Any]:
  """One client's epoch in JAX and in the PyTorch loop; ``plain``: the practitioner's loop against the library's
  FLoRAL without the preconditioner (``floral(precondition=False)``), the same computation less that step."""
  from fedjax_adapters.benchmarks import torch_floral
  alg = alg or setups.jax_algorithm(workload, precondition=not plain)
  fed = setups.make_data(workload, 2)
  state = alg.init(jax.random.key(0), 2)
  data = client_data(fed)
  one = ClientData(data.x[0], data.y[0], data.count[0])
  local = jax.tree.map(lambda a: a[0], state.clients)
  out, new_local, metrics = jax.jit(alg.client_update)(state.frozen, state.global_params, local, one,
                                                       jax.random.key(1))
  jax_eval = float(alg.evaluate(state.frozen, out.params, new_local, one)['loss'])
  loop = setups.torch_round(workload, fed, state.global_params, device=device, plain=plain)
  init = {k: v.cpu() for k, v in loop.global_sd.items()}
  sd, router, train_loss, _ = loop.client_update(0)
  torch_eval = loop.evaluate(0, sd, router)
  expected = torch_floral.global_state_from_jax(loop.model, jax.device_get(out.params))
  worst, name = _param_diff(sd, expected)
  moved = max(float((init[k] - expected[k]).abs().max()) for k in expected)
  res = {'workload': workload.describe(),
         'jax_train_loss_sum': float(metrics['loss']), 'torch_train_loss_sum': train_loss,
         'train_loss_rel_diff': _rel(train_loss, float(metrics['loss'])),
         'jax_loss_after_epoch': jax_eval, 'torch_loss_after_epoch': torch_eval,
         'loss_after_epoch_rel_diff': _rel(torch_eval, jax_eval),
         'params_max_rel_diff': worst, 'params_worst_leaf': name,
         'router_rel_diff': _rel(router.cpu().numpy(), np.asarray(new_local['logits'])),
         'params_max_abs_change_in_epoch': moved,
         'same_keys': sorted(expected) == sorted(sd)}
  return res


def two_client_round(workload: setups.Workload, device: str = 'cpu', alg=None) -> dict[str, Any]:
  """A round of clients 0 and 2 of 3: aggregation included (base by p(k), adaptors by p(k|c)).

  Pass the ``alg`` of :func:`one_client` to reuse its compiled ``client_update`` (same function, same shapes).
  """
  from fedjax_adapters.benchmarks import torch_floral
  alg = alg or setups.jax_algorithm(workload)
  fed = setups.make_data(workload, 3)
  state = alg.init(jax.random.key(0), 3)
  loop = setups.torch_round(workload, fed, state.global_params, device=device)
  ids = [0, 2]
  loop.run_round(ids)
  state, _ = make_round(alg, clients_per_round=2, mapping=sequential_clients())(state, client_data(fed),
                                                                         client_ids=np.array(ids))
  expected = torch_floral.global_state_from_jax(loop.model, jax.device_get(state.global_params))
  worst, name = _param_diff(loop.global_sd, expected)
  return {'workload': workload.describe(), 'clients': ids, 'global_params_max_rel_diff': worst,
          'global_params_worst_leaf': name,
          'routers_rel_diff': _rel(loop.routers[ids].cpu().numpy(), np.asarray(state.clients['logits'])[ids])}


def run(device: str = 'cpu', plain: bool = True) -> dict[str, Any]:
  """Every case; ``plain`` adds the practitioner's loop against ``floral(precondition=False)`` on the MNIST MLP."""
  # FLoRAL(10%) on the MLP so the first layer's adaptors have rank 15 (15x15 preconditioner solves).
  mlp = setups.mnist_mlp(examples=70, batch_size=32).replace(noise_std=0.0, rank=0.1)
  # The CIFAR CNN (conv LoRA, NHWC vs NCHW, flatten order) on 16x16 images, C = 2.
  cnn = setups.cifar_cnn(examples=20, batch_size=8).replace(noise_std=0.0, input_shape=(16, 16, 3), num_adaptors=2)
  alg = setups.jax_algorithm(mlp)
  out = {'device': device, 'mlp_one_client': one_client(mlp, device, alg),
         'mlp_round': two_client_round(mlp, device, alg), 'cnn_one_client': one_client(cnn, device)}
  if plain:
    out['mlp_one_client_plain'] = one_client(setups.mnist_mlp(examples=70).replace(noise_std=0.0), device, plain=True)
  return out

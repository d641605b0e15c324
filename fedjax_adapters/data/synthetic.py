"""FLoRAL's synthetic clustered regression tasks (``dataset/synthetic_datasets/synthetic.py`` of the public code).

d = 10; a shared ``W ~ N(0, 1/d)`` (d x d) plus a rank-1 cluster shift ``2 u_c v_c`` (``u_c ~ N(0, 1/d)``,
``v_c ~ N(0, 1)``), ``b ~ N(0, 1/d)``, ``x ~ N(0, I)``; client k belongs to cluster ``k mod C``.

* ``synthetic_linear``: ``y = (x W_k + b)[:, :3]``; 10 clients, 2 clusters, 8 examples per client.
* ``synthetic_mlp``: ``y = ReLU(x W_k + b) W_out`` with ``W_out ~ N(0, 1/d)`` (d x 1); 20 clients, 4 clusters,
  120 examples per client.

Examples per client are ``round(ratio * #params of the task's model)`` (ratio 0.25 for Linear(10, 3), 0.5 for the
10-20-1 MLP); 80 % train, 20 % test. Task parameters use ``seed + 27`` and data ``seed + 11``, as in the public code.
"""
from __future__ import annotations

import numpy as np

from fedjax_adapters.data.federated import FederatedDataset, stack_clients

TASKS = {
    # name: (num_clients, num_clusters, examples per client, output dims, nonlinear)
    'synthetic_linear': (10, 2, 8, 3, False),
    'synthetic_mlp': (20, 4, 120, 1, True),
}


def synthetic_task(name: str, *, seed: int = 0, dim: int = 10, test_fraction: float = 0.2) -> FederatedDataset:
  """Generates one of FLoRAL's synthetic tasks.

  Args:
    name: ``'synthetic_linear'`` or ``'synthetic_mlp'``.
    seed: base seed.
    dim: input dimension d.
    test_fraction: share of each client's examples held out for its test split.

  Returns:
    ``FederatedDataset`` with float32 ``x: [K, n, d]`` and ``y: [K, n, out]``.
  """
  if name not in TASKS:
    raise ValueError(f'unknown synthetic task {name!r}; choose one of {sorted(TASKS)}.')
  num_clients, num_clusters, n, out_dim, nonlinear = TASKS[name]
  pr = np.random.default_rng(seed + 27)
  w = pr.normal(0, np.sqrt(1 / dim), (dim, dim))
  u = pr.normal(0, np.sqrt(1 / dim), (num_clusters, dim, 1))
  v = pr.normal(0, 1.0, (num_clusters, 1, dim))  # rank r = 1: N(0, 1/r)
  b = pr.normal(0, np.sqrt(1 / dim), (dim,))
  w_out = pr.normal(0, np.sqrt(1 / dim), (dim, 1))
  dr = np.random.default_rng(seed + 11)
  n_test = int(round(test_fraction * n))
  clusters = np.arange(num_clients) % num_clusters
  xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
  for k in range(num_clients):
    c = clusters[k]
    w_k = w + 2.0 * u[c] @ v[c]
    x = dr.normal(0, 1, (n, dim))
    h = x @ w_k + b
    y = np.maximum(h, 0) @ w_out if nonlinear else h[:, :out_dim]
    x, y = x.astype(np.float32), y.astype(np.float32)
    xs_tr.append(x[:n - n_test]); ys_tr.append(y[:n - n_test])
    xs_te.append(x[n - n_test:]); ys_te.append(y[n - n_test:])
  return FederatedDataset(stack_clients(xs_tr, ys_tr), stack_clients(xs_te, ys_te), clusters.astype(np.int32),
                          num_clusters)

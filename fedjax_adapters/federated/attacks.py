"""Attacks for robustness experiments (not for training): adversaries for ``make_round(adversary=...)``.

An adversary rewrites the stacked client outputs inside the compiled round, after the clients trained and before
the update screen and the aggregator, so a defense sees exactly what attackers send. Which clients attack is fixed
for the whole run by :func:`attacker_mask` (a seed and a fraction of the population); a sampled attacker rewrites its
update ``u_k = params_k - global_params`` leaf by leaf:

* ``sign_flip`` (``-scale * u_k``), ``scaling`` (``scale * u_k``), ``gaussian`` (``u_k ~ N(0, sigma^2)``);
* ``alie``, "A Little Is Enough" (Baruch et al. 2019): every attacker sends ``mean - z * std`` of this round's honest
  updates per coordinate, ``z`` from the paper's rule ``Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f``;
* ``ipm``, inner-product manipulation (Xie et al. 2020): every attacker sends ``-epsilon * mean`` of the honest
  updates.

Label flipping is a data-side attack: :func:`flip_labels` rewrites the attackers' training labels before the run.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_adapters.federated.client_update import ClientOutput

Array = jax.Array


def attacker_mask(num_clients: int, fraction: float, seed: int) -> np.ndarray:
  """``[K]`` bool: ``round(fraction * K)`` attackers drawn without replacement by ``seed`` (the same every round)."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'attack fraction must be in [0, 1]; got {fraction}.')
  mask = np.zeros(num_clients, bool)
  mask[np.random.default_rng(seed).permutation(num_clients)[:int(round(fraction * num_clients))]] = True
  return mask


def flip_labels(y: np.ndarray, attackers: np.ndarray, num_classes: int) -> np.ndarray:
  """Label flipping: client ``k``'s integer labels ``y[k]`` become ``num_classes - 1 - y`` where ``attackers[k]``.

  Args:
    y: ``[K, N, ...]`` integer labels (a ``FederatedData.y``).
    attackers: ``[K]`` bool, e.g. from :func:`attacker_mask`.
    num_classes: the number of classes.
  """
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'flip_labels needs integer labels; got dtype {y.dtype}.')
  if attackers.shape != y.shape[:1]:
    raise ValueError(f'attackers has shape {attackers.shape}; the labels hold {y.shape[0]} clients.')
  sel = attackers.reshape((-1,) + (1,) * (y.ndim - 1))
  return np.where(sel, num_classes - 1 - y, y).astype(y.dtype)


def _honest_stats(u: Array, honest: Array) -> tuple[Array, Array]:
  """Per-coordinate mean and (population) std of ``u: [M, ...]`` over the rows where ``honest``."""
  # Contractions over the client axis: XLA:CPU runs them ~25x faster than a masked sum over axis 0 of [M, ...].
  w = honest.astype(u.dtype) / jnp.maximum(jnp.sum(honest), 1).astype(u.dtype)
  mean = jnp.tensordot(w, u, axes=1)
  var = jnp.tensordot(w, jnp.square(u - mean[None]), axes=1)
  return mean, jnp.sqrt(var)


def alie_z(n: Array, f: Array) -> Array:
  """Baruch et al.'s ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n / 2 + 1) - f`` (n clients, f attackers)."""
  n = jnp.maximum(n, 1).astype(jnp.float32)
  s = jnp.floor(n / 2 + 1) - f
  return jax.scipy.special.ndtri(jnp.clip((n - s) / n, 1e-6, 1 - 1e-6))


def _rewrite(name: str, param: float | None, u: Array, bad: Array, honest: Array, key: Array) -> Array:
  """The update an attacker sends, for one leaf ``u: [M, ...]`` of the stacked updates."""
  if name == 'sign_flip':
    return -(1.0 if param is None else param) * u
  if name == 'scaling':
    return (10.0 if param is None else param) * u
  if name == 'gaussian':
    return (1.0 if param is None else param) * jax.random.normal(key, u.shape, u.dtype)
  mean, std = _honest_stats(u, honest)
  if name == 'alie':
    z = alie_z(jnp.sum(honest | bad), jnp.sum(bad)) if param is None else param
    return jnp.broadcast_to(mean - z * std, u.shape)
  if name == 'ipm':
    return jnp.broadcast_to(-(0.5 if param is None else param) * mean, u.shape)
  raise ValueError(f'unknown attack {name!r}; choose one of {", ".join(ATTACKS)}.')


ATTACKS = {'sign_flip': 'scale', 'scaling': 'scale', 'gaussian': 'sigma', 'alie': 'z', 'ipm': 'epsilon',
           'label_flip': None}


def make_adversary(name: str, attackers: np.ndarray, param: float | None = None) -> Callable[..., ClientOutput]:
  """An ``adversary(global_params, outs, client_ids, client_mask, key) -> outs`` for :func:`make_round`.

  Args:
    name: a key of :data:`ATTACKS` other than ``'label_flip'`` (that one is :func:`flip_labels`, on the data).
    attackers: ``[K]`` bool over the population (:func:`attacker_mask`).
    param: the attack's one parameter (``ATTACKS[name]``; None: sign flip 1, scaling 10, sigma 1, ALIE's z from
      the round's counts, IPM epsilon 0.5).
  """
  if name not in ATTACKS or name == 'label_flip':
    raise ValueError(f'unknown update attack {name!r}; choose one of '
                     f'{", ".join(a for a in ATTACKS if a != "label_flip")} (label_flip acts on the data).')
  table = jnp.asarray(np.asarray(attackers, bool))

  def adversary(global_params, outs: ClientOutput, client_ids, client_mask, key):
    bad = table[client_ids] & client_mask
    honest = client_mask & ~bad
    leaves, treedef = jax.tree.flatten(outs.params)
    olds = jax.tree.leaves(global_params)
    keys = jax.random.split(key, len(leaves))
    new = []
    for x, old, k in zip(leaves, olds, keys):
      u = x - old[None].astype(x.dtype)
      sent = _rewrite(name, param, u, bad, honest, k)
      sel = bad.reshape((-1,) + (1,) * (x.ndim - 1))
      new.append(jnp.where(sel, old[None].astype(x.dtype) + sent, x))
    return outs._replace(params=jax.tree.unflatten(treedef, new))

  return adversary

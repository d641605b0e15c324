"""Screening client updates before they reach the server: non-finite updates are rejected, norms bounded.

One client with a NaN in its data, or one that diverges, would otherwise make the weighted mean non-finite and
poison the global model for every later round. Inside the compiled round (no host sync), :func:`screen` marks each
sampled client as accepted or rejected, with a reason:

* ``'nonfinite_update'``: a leaf of the client's updated global params is NaN or infinite;
* ``'nonfinite_loss'``: a floating metric the client reports (its training loss sums) is NaN or infinite;
* ``'nonfinite_client_state'``: its new private state (local adaptors, router logits) is NaN or infinite;
* ``'update_norm'``: ``||params - global_params||_2`` exceeds ``max_update_norm`` with ``norm_action='reject'``.

A rejected client weighs 0 in the aggregation and keeps its previous client state, exactly as if it had been masked
out with ``client_mask``; the round's metrics name it (``rejected``, ``reject_reason`` as an index into
:data:`REJECT_REASONS`, ``update_norm``). With ``norm_action='clip'`` an accepted update longer than the bound is
scaled back to it (norm clipping as in robust and differentially private FL systems).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_adapters.federated.client_update import ClientOutput

Array = jax.Array

REJECT_REASONS = ('accepted', 'nonfinite_update', 'nonfinite_loss', 'nonfinite_client_state', 'update_norm')
NORM_ACTIONS = ('clip', 'reject')


class UpdateGuard(NamedTuple):
  """What the round checks on every client update.

  Attributes:
    reject_nonfinite: reject clients whose update, loss or client state is not finite (default). ``False`` lets
      them through (for debugging a divergence; the global state then becomes non-finite).
    max_update_norm: a bound on the L2 norm of each client's update ``params - global_params`` (None: no bound).
    norm_action: ``'clip'`` (scale longer updates back to the bound) or ``'reject'`` (weight 0).
  """
  reject_nonfinite: bool = True
  max_update_norm: float | None = None
  norm_action: str = 'clip'

  def check(self) -> 'UpdateGuard':
    if self.norm_action not in NORM_ACTIONS:
      raise ValueError(f'norm_action must be one of {NORM_ACTIONS}; got {self.norm_action!r}.')
    if self.max_update_norm is not None and not float(self.max_update_norm) > 0:
      raise ValueError(f'max_update_norm must be > 0 (or None); got {self.max_update_norm}.')
    return self


def _floating(tree) -> list[Array]:
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]


def all_finite(tree: Any) -> Array:
  """``[M]`` bool: whether every floating leaf of the stacked tree ``[M, ...]`` is finite, client by client."""
  leaves = _floating(tree)
  if not leaves:
    return jnp.ones((), bool)
  per = [jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1) for x in leaves]
  return jnp.all(jnp.stack(per), axis=0)


def update_norms(params: Any, global_params: Any) -> Array:
  """``[M]`` L2 norm of each client's ``params - global_params`` over every floating leaf (non-finite if it is)."""
  # Flat [M, n] - [1, n]: XLA's CPU backend fuses this broadcast into the reduction; ``p - g`` with ``g`` of the
  # leaf's own shape made it write the broadcast out in full, a pass costing ~8 % of a small model's round.
  sq = [jnp.sum(jnp.square((p.reshape(p.shape[0], -1) - g.reshape(1, -1)).astype(jnp.float32)), axis=1)
        for p, g in zip(_floating(params), _floating(global_params))]
  if not sq:
    return jnp.zeros(())
  return jnp.sqrt(sum(sq))


def _finite_and_norms(params: Any, global_params: Any) -> tuple[Array, Array]:
  """``([M] bool, [M])``: whether each client's params are all finite (as :func:`all_finite`), and its update norm.

  A finite norm means finite params, so only in a round where some norm is not finite (a NaN or infinity, or a huge
  but finite update whose square overflows float32) is :func:`all_finite` run to tell the two apart.
  """
  norms = update_norms(params, global_params)
  finite = jax.lax.cond(jnp.all(jnp.isfinite(norms)), lambda: jnp.isfinite(norms),
                        lambda: jnp.broadcast_to(all_finite(params), norms.shape))
  return finite, norms


def screen(guard: UpdateGuard, global_params: Any, outs: ClientOutput, client_state: Any, metrics: dict,
           client_mask: Array) -> tuple[ClientOutput, Array, dict]:
  """Screens the stacked client outputs ``[M, ...]`` of one round.

  One pass over the stacked params finds every client's update norm and whether its params are all finite.

  Returns:
    ``(outs, keep, info)``: ``keep [M]`` = ``client_mask`` and not rejected; ``outs`` with the params of every
    client outside ``keep`` whose update is not finite replaced by ``global_params`` (so ``0 * NaN`` never reaches
    a weighted sum; done only in rounds that have one, since finite values with weight 0 add exactly nothing), the
    aux of every client outside ``keep`` zeroed, and norm-clipped updates where asked; ``info`` the per-client
    metrics ``rejected``, ``reject_reason``, ``update_norm``.
  """
  m = client_mask.shape[0]
  finite_update, norms = _finite_and_norms(outs.params, global_params)
  finite_update, norms = jnp.broadcast_to(finite_update, (m,)), jnp.broadcast_to(norms, (m,))
  checks = []
  if guard.reject_nonfinite:
    checks = [(finite_update, 1), (all_finite(metrics), 2), (all_finite(client_state), 3)]
  if guard.max_update_norm is not None and guard.norm_action == 'reject':
    checks.append((norms <= guard.max_update_norm, 4))
  reason = jnp.zeros((m,), jnp.int32)
  for ok, code in reversed(checks):  # the first failing check names the reason
    reason = jnp.where(jnp.broadcast_to(ok, (m,)), reason, code)
  rejected = client_mask & (reason > 0)
  keep = client_mask & ~rejected
  params = outs.params
  if guard.max_update_norm is not None and guard.norm_action == 'clip':
    params = _clip(params, global_params, norms, guard.max_update_norm)
  dirty = ~keep & ~finite_update
  params = jax.lax.cond(jnp.any(dirty), lambda p: _replace_rows(dirty, p, global_params), lambda p: p, params)
  aux = jax.tree.map(lambda a: jnp.where(_rows(keep, a), a, jnp.zeros_like(a)), outs.aux)
  info = {'rejected': rejected, 'reject_reason': jnp.where(rejected, reason, 0),
          'update_norm': norms.astype(jnp.float32)}
  return outs._replace(params=params, aux=aux), keep, info


def _clip(params, global_params, norms, bound):
  # Only updates over the bound change: g + (p - g) is not always p in floating point.
  over = norms > bound
  factor = bound / jnp.maximum(norms, 1e-30)
  return jax.tree.map(lambda p, g: jnp.where(_rows(over, p), (g + (p - g) * _rows(factor, p)).astype(p.dtype), p),
                      params, global_params)


def _replace_rows(rows: Array, stacked: Any, value: Any) -> Any:
  return jax.tree.map(lambda p, g: jnp.where(_rows(rows, p), g, p), stacked, value)


def _rows(flag: Array, x: Array) -> Array:
  return flag.reshape(flag.shape + (1,) * (x.ndim - 1))

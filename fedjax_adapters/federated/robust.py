"""Byzantine-robust reducers: drop-in :data:`~fedjax_adapters.federated.aggregators.Reducer` s for the compiled round.

Every function here returns a ``reducer(stacked [M, ...] pytree, weights [M], fallback pytree) -> pytree`` with the
contract of ``weighted_mean`` and ``coordinate_median``: it runs inside the jit-compiled round over the client axis,
rows with weight 0 (padding slots, clients the update screen rejected) are ignored whatever they hold, and
``fallback`` (the round's global params) is returned when no row is live. Plug one in with
``mean_aggregator(reducer=...)`` (FedAvg / FedOpt) or ``router_aggregator(reducer=...)`` (FLoRAL: the reducer is
applied to each adaptor with the router weights ``p(k|c)``, see docs/robustness.md).

Whole-update methods (geometric median, Krum, multi-Krum, Bulyan's selection, centered clipping, norm bounding)
flatten every leaf of a client into one float32 row ``[M, D]`` of its update ``x_k - fallback`` and work on
distances between those rows; coordinate-wise methods (trimmed mean, Bulyan's second stage) work leaf by leaf.
``n`` below is the number of live rows (traced: it changes with the round's rejections, the round compiles once) and
``f`` the number of Byzantine clients a method is told to tolerate.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_adapters.federated.aggregators import PAIRWISE_MAX_ROWS, Reducer, weight_before

Array = jax.Array


def _update_rows(stacked: Any, fallback: Any) -> Array:
  """``[M, D]`` float32: each client's whole update ``x_k - fallback``, leaves flattened and concatenated."""
  rows = [(x.astype(jnp.float32) - old.astype(jnp.float32)[None]).reshape(x.shape[0], -1)
          for x, old in zip(jax.tree.leaves(stacked), jax.tree.leaves(fallback))]
  return jnp.concatenate(rows, axis=1)


def _apply_update(vec: Array, fallback: Any) -> Any:
  """``fallback + vec`` with ``vec: [D]`` cut back into ``fallback``'s leaves (and dtypes)."""
  leaves, treedef = jax.tree.flatten(fallback)
  out, start = [], 0
  for old in leaves:
    out.append((old.astype(jnp.float32) + vec[start:start + old.size].reshape(old.shape)).astype(old.dtype))
    start += old.size
  return jax.tree.unflatten(treedef, out)


def _finish(vec: Array, any_live: Array, fallback: Any) -> Any:
  return _apply_update(jnp.where(any_live, vec, 0.0), fallback)


def _skip_empty(reducer: Reducer) -> Reducer:
  """A reducer that returns an empty pytree (a params group without leaves) as it is."""
  def wrapped(stacked, weights, fallback):
    return fallback if not jax.tree.leaves(stacked) else reducer(stacked, weights, fallback)
  return wrapped


def _mean_rows(d: Array, w: Array) -> Array:
  total = jnp.sum(w)
  return jnp.tensordot(w / jnp.where(total > 0, total, 1.0), d, axes=(0, 0))


def trimmed_mean(fraction: float = 0.1) -> Reducer:
  """Coordinate-wise trimmed mean: per coordinate drop the ``floor(fraction * n)`` smallest and largest live values.

  The rest is averaged with the clients' weights. Breakdown point ``fraction`` (below 1/2); with ``fraction = 0`` it
  is the weighted mean. Memory: ``O(M * leaf size)``; no ``[M, M]``. Ranks come from pairwise comparisons up to
  ``PAIRWISE_MAX_ROWS`` clients (``O(M^2)`` compares, faster than a sort there on XLA:CPU), else from a sort.

  Args:
    fraction: share of the live clients trimmed at each end, in ``[0, 0.5)``.
  """
  if not 0.0 <= fraction < 0.5:
    raise ValueError(f'trimmed_mean fraction must be in [0, 0.5); got {fraction}.')

  def reducer(stacked, weights, fallback):
    live = weights > 0
    n = jnp.sum(live)
    t = jnp.floor(fraction * n).astype(jnp.int32)

    def one(x, old):
      flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
      if x.shape[0] <= PAIRWISE_MAX_ROWS:  # each live row's rank among the live rows, without a sort
        vals, rank = flat, weight_before(flat, live)
        w = jnp.where(live[:, None] & (rank >= t) & (rank < n - t), weights[:, None].astype(jnp.float32), 0.0)
      else:
        order = jnp.argsort(jnp.where(live[:, None], flat, jnp.inf), axis=0, stable=True)  # dead rows sort last
        vals = jnp.take_along_axis(flat, order, axis=0)
        rank = jnp.arange(x.shape[0])[:, None]
        w = jnp.where((rank >= t) & (rank < n - t), jnp.take(weights, order).astype(jnp.float32), 0.0)
      total = jnp.sum(w, axis=0)
      mean = jnp.sum(w * vals, axis=0) / jnp.where(total > 0, total, 1.0)
      return jnp.where(total > 0, mean, old.reshape(-1)).reshape(old.shape).astype(old.dtype)

    return jax.tree.map(one, stacked, fallback)

  return _skip_empty(reducer)


def geometric_median(iterations: int = 8, smoothing: float = 1e-6) -> Reducer:
  """Weighted geometric median of the whole updates by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022).

  ``z <- sum_k b_k u_k / sum_k b_k`` with ``b_k = w_k / max(||u_k - z||, smoothing)``, started at the weighted mean,
  for a fixed number of iterations (so it compiles to a fixed loop). Breakdown point 1/2 (of the weight). Memory:
  ``O(M * D)`` for the flattened updates, no ``[M, M]``.

  Args:
    iterations: Weiszfeld steps (>= 1).
    smoothing: floor on a distance, so a client sitting on the estimate does not divide by zero.
  """
  if iterations < 1 or smoothing <= 0:
    raise ValueError(f'geometric_median needs iterations >= 1 and smoothing > 0; got {iterations}, {smoothing}.')

  def reducer(stacked, weights, fallback):
    d = _update_rows(stacked, fallback)
    w = jnp.where(weights > 0, weights, 0).astype(jnp.float32)

    def step(_, z):
      b = w / jnp.maximum(jnp.linalg.norm(d - z[None], axis=1), smoothing)
      return _mean_rows(d, b)

    z = jax.lax.fori_loop(0, iterations, step, _mean_rows(d, w))
    return _finish(z, jnp.sum(w) > 0, fallback)

  return _skip_empty(reducer)


def _distance_block(block: Array, d: Array, sq: Array) -> Array:
  """Squared distances ``[c, M]`` from the rows of ``block: [c, D]`` to every row of ``d: [M, D]``."""
  return jnp.maximum(jnp.sum(block * block, axis=1)[:, None] + sq[None] - 2.0 * block @ d.T, 0.0)


def _row_blocks(fn, m: int, chunk: int) -> Array:
  """``fn(rows [c]) -> [c, ...]`` over ``0..m-1`` in blocks of ``chunk`` rows (lax.map), stacked to ``[m, ...]``."""
  c = min(chunk, m)
  nblocks = -(-m // c)
  idx = jnp.minimum(jnp.arange(nblocks * c).reshape(nblocks, c), m - 1)
  out = jax.lax.map(fn, idx)
  return out.reshape((nblocks * c,) + out.shape[2:])[:m]


def _krum_scores(dist_rows: Array, rows: Array, candidates: Array, num_byzantine: int) -> Array:
  """Krum scores ``[c]``: sum of the ``max(n - f - 2, 1)`` smallest squared distances to other candidates."""
  n = jnp.sum(candidates)
  k = jnp.maximum(n - num_byzantine - 2, 1)
  other = candidates[None, :] & (jnp.arange(candidates.shape[0])[None, :] != rows[:, None])
  srt = jnp.sort(jnp.where(other, dist_rows, jnp.inf), axis=1)
  near = jnp.arange(candidates.shape[0])[None, :] < k
  score = jnp.sum(jnp.where(near & jnp.isfinite(srt), srt, 0.0), axis=1)
  return jnp.where(candidates[rows], score, jnp.inf)


def krum(num_byzantine: int, num_selected: int | None = 1, chunk: int = 256) -> Reducer:
  """Krum (``num_selected = 1``) and multi-Krum (Blanchard et al. 2017) on the whole updates.

  Each live client is scored by the sum of squared distances to its ``n - f - 2`` nearest live neighbours; the
  ``num_selected`` lowest scores (ties: lower slot first) are averaged with their weights. Tolerates ``f`` Byzantine
  clients when ``n >= 2f + 3``; with fewer live clients the neighbour count is clamped to 1 (still a selection, no
  longer a guarantee). Memory: the ``[M, M]`` distance matrix is never held: scores are computed ``chunk`` rows at a
  time (``[chunk, M]`` floats plus the ``[M, D]`` updates), so M is bounded by the stacked updates themselves, not
  by ``M^2`` (M = 16 384 with chunk 256 holds 16 MiB of distances); the cost is ``O(M^2 D)`` flops.

  Args:
    num_byzantine: ``f``, the number of attackers tolerated (>= 0).
    num_selected: ``m``, how many lowest-score updates are averaged (1 = Krum; None = ``n - f``, multi-Krum).
    chunk: rows of the distance matrix computed at once.
  """
  if num_byzantine < 0 or (num_selected is not None and num_selected < 1) or chunk < 1:
    raise ValueError(f'krum needs num_byzantine >= 0, num_selected >= 1, chunk >= 1; got {num_byzantine}, '
                     f'{num_selected}, {chunk}.')

  def reducer(stacked, weights, fallback):
    d = _update_rows(stacked, fallback)
    live = weights > 0
    sq = jnp.sum(d * d, axis=1)
    m = d.shape[0]
    scores = _row_blocks(lambda rows: _krum_scores(_distance_block(d[rows], d, sq), rows, live, num_byzantine),
                         m, chunk)
    rank = jnp.zeros(m, jnp.int32).at[jnp.argsort(scores, stable=True)].set(jnp.arange(m, dtype=jnp.int32))
    m_sel = jnp.maximum(jnp.sum(live) - num_byzantine, 1) if num_selected is None else num_selected
    chosen = live & (rank < m_sel)
    return _finish(_mean_rows(d, jnp.where(chosen, weights, 0).astype(jnp.float32)), jnp.any(live), fallback)

  return _skip_empty(reducer)


def _bulyan_select(dist: Array, live: Array, num_byzantine: int) -> Array:
  """Bulyan's first stage: ``theta = n - 2f`` rounds of Krum, each removing its pick from the candidates."""
  m = live.shape[0]
  theta = jnp.sum(live) - 2 * num_byzantine
  rows = jnp.arange(m)

  def body(i, carry):
    chosen, remaining = carry
    pick = jnp.argmin(_krum_scores(dist, rows, remaining, num_byzantine))
    take = (i < theta) & jnp.any(remaining)
    hit = take & (rows == pick)
    return chosen | hit, remaining & ~hit

  chosen, _ = jax.lax.fori_loop(0, m, body, (jnp.zeros(m, bool), live))
  return chosen


def bulyan(num_byzantine: int, chunk: int = 256) -> Reducer:
  """Bulyan (El Mhamdi et al. 2018): Krum selects ``theta = n - 2f`` updates, then per coordinate the
  ``beta = theta - 2f`` selected values closest to their median are averaged (unweighted).

  Tolerates ``f`` Byzantine clients when ``n >= 4f + 3``; with fewer live clients ``theta`` and ``beta`` are clamped
  to at least 1. Memory: the ``[M, M]`` squared-distance matrix is held (built ``chunk`` rows at a time) because each
  of the ``theta`` Krum rounds rescores the remaining set: 64 MiB at M = 4096; the selection costs
  ``O(M^2 D + M^3 log M)``, so Bulyan suits cohorts up to about a thousand clients. The second stage's order
  statistics come from pairwise comparisons up to ``PAIRWISE_MAX_ROWS`` clients, else from sorts.

  Args:
    num_byzantine: ``f`` (>= 0).
    chunk: rows of the distance matrix computed at once.
  """
  if num_byzantine < 0 or chunk < 1:
    raise ValueError(f'bulyan needs num_byzantine >= 0 and chunk >= 1; got {num_byzantine}, {chunk}.')

  def reducer(stacked, weights, fallback):
    d = _update_rows(stacked, fallback)
    live = weights > 0
    sq = jnp.sum(d * d, axis=1)
    dist = _row_blocks(lambda rows: _distance_block(d[rows], d, sq), d.shape[0], chunk)
    chosen = _bulyan_select(dist, live, num_byzantine)
    s = jnp.sum(chosen)
    beta = jnp.maximum(s - 2 * num_byzantine, 1)

    def one(x, old):
      flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
      if x.shape[0] <= PAIRWISE_MAX_ROWS:  # ranks among the chosen rows from pairwise comparisons, no sort
        rank = weight_before(flat, chosen)
        at = lambda k: jnp.sum(jnp.where(chosen[:, None] & (rank == k), flat, 0.0), axis=0)
        lo, hi = at(jnp.maximum((s - 1) // 2, 0)), at(jnp.maximum(s // 2, 0))
      else:
        srt = jnp.sort(jnp.where(chosen[:, None], flat, jnp.inf), axis=0)
        lo = jnp.take(srt, jnp.maximum((s - 1) // 2, 0), axis=0)
        hi = jnp.take(srt, jnp.maximum(s // 2, 0), axis=0)
      gap = jnp.where(chosen[:, None], jnp.abs(flat - 0.5 * (lo + hi)[None]), jnp.inf)
      if x.shape[0] <= PAIRWISE_MAX_ROWS:
        near, vals = chosen[:, None] & (weight_before(gap, chosen) < beta), flat
      else:
        near = jnp.arange(x.shape[0])[:, None] < beta
        vals = jnp.take_along_axis(flat, jnp.argsort(gap, axis=0, stable=True), axis=0)
      mean = jnp.sum(jnp.where(near, vals, 0.0), axis=0) / beta
      return jnp.where(s > 0, mean, old.reshape(-1)).reshape(old.shape).astype(old.dtype)

    return jax.tree.map(one, stacked, fallback)

  return _skip_empty(reducer)


def centered_clipping(radius: float, iterations: int = 3) -> Reducer:
  """Centered clipping (Karimireddy, He and Jaggi 2021) of the whole updates.

  ``v <- v + sum_k w_k clip(u_k - v, radius) / sum_k w_k`` for ``iterations`` steps, with
  ``clip(z, r) = z min(1, r / ||z||)``. The paper centres on the previous round's aggregate momentum; a
  :data:`Reducer` is stateless, so here the centre starts at the round's global params (``v = 0``: the previous
  aggregate the clients started from). Server momentum, if wanted, belongs to the server optimizer
  (``mean_aggregator(optax.sgd(1.0, momentum=...), reducer=...)``). Breakdown: each attacker moves the result by at
  most ``radius * w_k / sum w`` per iteration, so a fraction ``delta < 1/2`` of the weight shifts it by at most
  ``iterations * radius * delta``. Memory ``O(M * D)``.

  Args:
    radius: the clipping radius ``tau`` (> 0), in the units of an update's L2 norm.
    iterations: clipping steps (>= 1).
  """
  if not radius > 0 or iterations < 1:
    raise ValueError(f'centered_clipping needs radius > 0 and iterations >= 1; got {radius}, {iterations}.')

  def reducer(stacked, weights, fallback):
    d = _update_rows(stacked, fallback)
    w = jnp.where(weights > 0, weights, 0).astype(jnp.float32)

    def step(_, v):
      z = d - v[None]
      norm = jnp.linalg.norm(z, axis=1)
      scale = jnp.minimum(1.0, radius / jnp.where(norm > 0, norm, 1.0))
      return v + _mean_rows(z * scale[:, None], w)

    v = jax.lax.fori_loop(0, iterations, step, jnp.zeros(d.shape[1], jnp.float32))
    return _finish(v, jnp.sum(w) > 0, fallback)

  return _skip_empty(reducer)


def norm_bounded_mean(quantile: float = 0.5) -> Reducer:
  """Weighted mean of the whole updates after each is scaled to at most the ``quantile`` of this round's live norms.

  The bound is ``np.quantile(norms of live updates, quantile)`` (linear interpolation); these norms are the
  ``RoundInfo.update_norms`` the screen measured, recomputed from the stacked updates so this stays a
  :data:`Reducer`. An attacker can no longer outweigh its share by scale: with a fraction ``delta`` of the weight it
  moves the mean by at most ``delta`` times the bound; it does not resist attackers of small norm (breakdown point 0
  in the robust-statistics sense; use it with a coordinate- or distance-based reducer against direction attacks).
  Memory ``O(M * D)``.

  Args:
    quantile: in ``(0, 1]``; 0.5 bounds every update by the median norm.
  """
  if not 0.0 < quantile <= 1.0:
    raise ValueError(f'norm_bounded_mean quantile must be in (0, 1]; got {quantile}.')

  def reducer(stacked, weights, fallback):
    d = _update_rows(stacked, fallback)
    live = weights > 0
    norm = jnp.linalg.norm(d, axis=1)
    bound = jnp.nanquantile(jnp.where(live, norm, jnp.nan), quantile)
    scale = jnp.minimum(1.0, bound / jnp.where(norm > 0, norm, 1.0))
    w = jnp.where(live, weights, 0).astype(jnp.float32)
    return _finish(_mean_rows(d * scale[:, None], w), jnp.any(live), fallback)

  return _skip_empty(reducer)


# name -> (factory, name of its one numeric parameter or None, default): what --aggregator NAME[:param] builds.
REDUCERS = {
    'mean': (None, None, None),
    'median': (None, None, None),
    'trimmed_mean': (trimmed_mean, 'fraction', 0.1),
    'geomed': (geometric_median, 'iterations', 8),
    'krum': (krum, 'num_byzantine', 1),
    'multikrum': (lambda f: krum(f, num_selected=None), 'num_byzantine', 1),
    'bulyan': (bulyan, 'num_byzantine', 1),
    'centered_clip': (centered_clipping, 'radius', 1.0),
    'norm_bound': (norm_bounded_mean, 'quantile', 0.5),
}


def reducer_from_name(name: str, param: float | None = None) -> Reducer:
  """The :data:`Reducer` called ``name`` (a key of :data:`REDUCERS`) with its one parameter (``None``: default)."""
  from fedjax_adapters.federated.aggregators import coordinate_median, weighted_mean
  if name not in REDUCERS:
    raise ValueError(f'unknown aggregator {name!r}; choose one of {", ".join(REDUCERS)}.')
  if name == 'mean':
    return weighted_mean
  if name == 'median':
    return coordinate_median
  factory, pname, default = REDUCERS[name]
  value = default if param is None else param
  if isinstance(default, int):
    if value != math.floor(value):
      raise ValueError(f'aggregator {name}: {pname} must be an integer; got {value}.')
    value = int(value)
  return factory(value)

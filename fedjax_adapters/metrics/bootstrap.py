"""Paired, stratified bootstrap confidence intervals for averages of per-example scores.

A test pool is split into strata (FedDPA: one per task category, 200 prompts each in the paper). A statistic of
per-example scores (an average ROUGE, or the difference between two methods' averages) gets a percentile interval
from ``B`` bootstrap resamples of the pool:

1. each stratum is resampled with replacement to its own size (so every resample keeps the pool's task mix);
2. every method is scored on the **same** resampled examples, so a difference between two methods is computed
   draw by draw (a paired bootstrap). Score noise that two methods share (a hard prompt is hard for both) cancels,
   and the interval of a difference is narrower than the two separate intervals suggest;
3. the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the statistic over the draws; the
   point estimate is the statistic on the full pool.

The functions work on scores ``[K, T]`` (``K`` clients, or models, each scoring all ``T`` examples) and go through
per-stratum means ``[..., K, C]``, the table every FedDPA statistic is computed from.

Example::

  draws = stratified_draws([np.arange(0, 50), np.arange(50, 100)], num_samples=2000, seed=0)
  mean = lambda m: m.mean(axis=(-1, -2))                     # [..., K, C] -> [...]
  ci = paired_interval(mean, scores_a, [np.arange(0, 50), np.arange(50, 100)], draws, baseline=scores_b)
  print(ci.estimate, ci.low, ci.high)
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

# Resamples handled per chunk in `stratum_means` (bounds memory at K x chunk x stratum size floats).
_CHUNK = 1000


class Interval(NamedTuple):
  """A bootstrap estimate with its percentile interval.

  Attributes:
    estimate: the statistic on the full (not resampled) data.
    low, high: the interval's bounds (quantiles ``(1 - level) / 2`` and ``(1 + level) / 2`` of the draws).
    std: the standard deviation of the statistic over the draws (bootstrap standard error).
    level: the interval's coverage, e.g. 0.95.
    num_samples: the number of bootstrap draws.
  """
  estimate: float
  low: float
  high: float
  std: float
  level: float
  num_samples: int

  def as_dict(self) -> dict:
    return self._asdict()


def _check_strata(strata: Sequence[np.ndarray], num_examples: int | None = None) -> list[np.ndarray]:
  if isinstance(strata, np.ndarray) or not len(strata):
    raise ValueError('strata must be a non-empty sequence of index arrays (one per stratum).')
  out = [np.asarray(s) for s in strata]
  for c, s in enumerate(out):
    if s.ndim < 1 or s.shape[-1] == 0 or not np.issubdtype(s.dtype, np.integer):
      raise ValueError(f'stratum {c} must be a non-empty integer index array; got dtype {s.dtype}, shape {s.shape}.')
    if num_examples is not None and (s.min() < 0 or s.max() >= num_examples):
      raise ValueError(f'stratum {c} holds indices outside [0, {num_examples}): range [{s.min()}, {s.max()}].')
  return out


def stratified_draws(strata: Sequence[np.ndarray], num_samples: int, *, seed: int = 0) -> list[np.ndarray]:
  """Bootstrap resamples of a stratified pool: for each stratum, ``[B, n_c]`` indices drawn from it with replacement.

  Args:
    strata: ``C`` index arrays ``[n_c]`` into the pool (e.g. ``FedDPAData.test_indices.values()``).
    num_samples: ``B``, the number of resamples.
    seed: seed of the ``np.random.default_rng`` the draws come from (stratum by stratum, in order).

  Returns:
    ``C`` arrays ``[B, n_c]`` of pool indices; row ``b`` of every array together is resample ``b``.
  """
  strata = _check_strata(strata)
  if num_samples < 1:
    raise ValueError(f'num_samples must be >= 1; got {num_samples}.')
  rng = np.random.default_rng(seed)
  return [s[rng.integers(0, s.shape[-1], size=(num_samples, s.shape[-1]))] for s in strata]


def stratum_means(scores: np.ndarray, strata: Sequence[np.ndarray]) -> np.ndarray:
  """Mean score of every row of ``scores`` in every stratum, for the full pool or for every resample.

  Args:
    scores: ``[K, T]`` per-example scores of ``K`` clients (or models) on the same ``T`` examples.
    strata: ``C`` pool-index arrays, either ``[n_c]`` (the full pool: ``FedDPAData.test_indices.values()``) or
      ``[B, n_c]`` (resamples from :func:`stratified_draws`).

  Returns:
    ``[K, C]`` for ``[n_c]`` strata, ``[B, K, C]`` for ``[B, n_c]`` draws: ``out[..., k, c]`` is the mean of
    ``scores[k]`` over stratum ``c`` (of that resample).
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f'scores must be [K, T] (clients x examples); got shape {scores.shape}.')
  strata = _check_strata(strata, scores.shape[1])
  batch = {s.shape[:-1] for s in strata}
  if len(batch) != 1 or len(next(iter(batch))) > 1:
    raise ValueError(f'strata must all be [n_c] or all [B, n_c] with one B; got shapes {[s.shape for s in strata]}.')
  if strata[0].ndim == 1:
    return np.stack([scores[:, s].mean(-1) for s in strata], axis=-1)
  columns = []
  for s in strata:  # [B, n_c]; chunks keep scores[:, chunk] at K x chunk x n_c floats
    parts = [scores[:, s[i:i + _CHUNK]].mean(-1) for i in range(0, s.shape[0], _CHUNK)]  # [K, b]
    columns.append(np.concatenate(parts, axis=1).T)  # [B, K]
  return np.stack(columns, axis=-1)


def percentile_interval(estimate: float, draws: np.ndarray, *, level: float = 0.95) -> Interval:
  """The percentile interval of a statistic's bootstrap draws ``[B]`` around its full-data ``estimate``."""
  if not 0.0 < level < 1.0:
    raise ValueError(f'level must lie in (0, 1); got {level}.')
  draws = np.asarray(draws, np.float64).reshape(-1)
  if draws.size == 0 or not np.all(np.isfinite(draws)):
    raise ValueError(f'bootstrap draws must be finite and non-empty; got {draws.size} draws, '
                     f'{int(np.sum(~np.isfinite(draws)))} non-finite.')
  low, high = np.quantile(draws, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return Interval(float(estimate), float(low), float(high), float(draws.std()), float(level), int(draws.size))


def paired_interval(statistic: Callable[[np.ndarray], np.ndarray], scores: np.ndarray,
                    strata: Sequence[np.ndarray], draws: Sequence[np.ndarray], *, baseline: np.ndarray | None = None,
                    level: float = 0.95) -> Interval:
  """Bootstrap interval of ``statistic(scores)``, or of ``statistic(scores) - statistic(baseline)`` (paired).

  Args:
    statistic: ``[..., K, C]`` stratum means -> ``[...]`` (e.g. FedDPA's personalization average). It must treat
      leading axes as independent (it is called on ``[K, C]`` and on ``[B, K, C]``).
    scores: ``[K, T]`` per-example scores.
    strata: ``C`` index arrays ``[n_c]`` (the full pool).
    draws: the resamples of ``strata`` from :func:`stratified_draws` (``C`` arrays ``[B, n_c]``). Pass the same
      draws for every method and comparison, so that all intervals rest on the same resampled examples.
    baseline: ``[K', T]`` scores of a second method on the same examples; the statistic becomes the difference.
    level: the interval's coverage.

  Returns:
    An :class:`Interval`.
  """
  def stat(s):
    return np.asarray(statistic(stratum_means(s, strata))), np.asarray(statistic(stratum_means(s, draws)))

  estimate, samples = stat(scores)
  if baseline is not None:
    base_estimate, base_samples = stat(baseline)
    estimate, samples = estimate - base_estimate, samples - base_samples
  if estimate.shape != () or samples.shape != (draws[0].shape[0],):
    raise ValueError(f'statistic must map [..., K, C] to [...]; got shapes {estimate.shape} (full data) and '
                     f'{samples.shape} (draws).')
  return percentile_interval(float(estimate), samples, level=level)

"""ROUGE for generated answers, and FedDPA's (test-time) personalization report.

This module matches the official FedDPA ``code/metric.py`` (Lydia-yang/FedDPA), which calls
``t5.evaluation.metrics.rouge`` once per ``category`` and once on the whole pool (``total``). That function:

* builds ``rouge_score.rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeLsum'])`` with the default
  ``use_stemmer=False``. **No stemming.** Every released version of ``t5`` leaves the stemmer off, although
  ``reference/feddpa.md`` says "with stemming". Here ``use_stemmer=False`` is the default, and ``use_stemmer=True``
  is available;
* rewrites ``" . "`` as ``" .\\n"`` in targets and predictions, so that rougeLsum splits sentences. This changes
  nothing for rouge1/rouge2/rougeL;
* reports the F-measure ``x 100``, as the ``mid`` of a ``BootstrapAggregator`` (the median of 1,000 unseeded
  bootstrap means, close to the plain mean).

``metric.py`` also cuts a text at ``</s>`` when it ends with ``</s>``. A line doing exact match for paraphrase and
question classification is commented out, so **every category is scored with ROUGE**: there is no accuracy or exact
match.

This module makes these choices:

* scores are fractions in ``[0, 1]``. Multiply by 100 to compare with the paper's tables;
* the aggregate is the plain mean over examples (deterministic). ``bootstrap_samples=1000`` gives the bootstrap
  median instead, drawn from a seeded generator;
* ``rouge1`` is the headline number (``personalization_report(rouge_type=...)`` can change it). The paper does not
  say which variant its tables use. For the mostly one-word labels, rouge1 ≈ rougeL ≈ rougeLsum;
* ``rougeL`` (no sentence splitting) is computed alongside the three types that t5 reports.

Note that rouge2 of two one-word strings is 0 even when they are equal, because there is no bigram to match. On the
label tasks (most of Dataset 1), rouge2 is therefore near 0 whatever the model does, and only rouge1/rougeL are
informative there.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from rouge_score import rouge_scorer

from fedjax_adapters.data.feddpa import FedDPAData
from fedjax_adapters.metrics import bootstrap

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')
_EOS = '</s>'


def _prepare(text: str) -> str:
  """The text clean-up of the official ``metric.py`` (``</s>`` cut) and of t5 (sentence newlines for rougeLsum)."""
  if text.endswith(_EOS):
    text = text.split(_EOS)[0]
  return text.replace(' . ', ' .\n')


def _check_types(rouge_types: Sequence[str]) -> tuple[str, ...]:
  if isinstance(rouge_types, str):
    rouge_types = (rouge_types,)
  bad = [t for t in rouge_types if t not in ROUGE_TYPES]
  if bad or not rouge_types:
    raise ValueError(f'rouge_types must be a non-empty subset of {ROUGE_TYPES}, got {list(rouge_types)}.')
  return tuple(rouge_types)


def rouge_per_example(predictions: Sequence[str],
                      references: Sequence[str],
                      *,
                      rouge_types: Sequence[str] = ROUGE_TYPES,
                      use_stemmer: bool = False) -> dict[str, np.ndarray]:
  """Per-example ROUGE F-measures.

  Args:
    predictions: ``N`` generated answers.
    references: ``N`` reference outputs, aligned with ``predictions``.
    rouge_types: which of ``ROUGE_TYPES`` to compute.
    use_stemmer: apply the Porter stemmer. The official metric does not.

  Returns:
    rouge type -> ``[N]`` float64 F-measures in ``[0, 1]``.
  """
  rouge_types = _check_types(rouge_types)
  if isinstance(predictions, str) or isinstance(references, str):
    raise ValueError('predictions and references must be sequences of strings, not a single string.')
  if len(predictions) != len(references):
    raise ValueError(f'got {len(predictions)} predictions but {len(references)} references; they must be aligned.')
  for name, texts in (('predictions', predictions), ('references', references)):
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise ValueError(f'{name}[{i}] is a {type(t).__name__}, not a string.')
  scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
  out = {t: np.zeros(len(predictions), dtype=np.float64) for t in rouge_types}
  for i, (pred, ref) in enumerate(zip(predictions, references)):
    scores = scorer.score(target=_prepare(ref), prediction=_prepare(pred))
    for t in rouge_types:
      out[t][i] = scores[t].fmeasure
  return out


def _aggregate(values: np.ndarray, bootstrap_samples: int, rng: np.random.Generator) -> float:
  """The mean of `values`, or, with `bootstrap_samples` > 0, the median of bootstrap means (rouge_score's `mid`)."""
  if values.size == 0:
    raise ValueError('cannot aggregate ROUGE over zero examples.')
  if bootstrap_samples <= 0:
    return float(values.mean())
  idx = rng.integers(0, values.size, size=(bootstrap_samples, values.size))
  return float(np.percentile(values[idx].mean(axis=1), 50))


def rouge_scores(predictions: Sequence[str],
                 references: Sequence[str],
                 *,
                 rouge_types: Sequence[str] = ROUGE_TYPES,
                 use_stemmer: bool = False,
                 bootstrap_samples: int = 0,
                 seed: int = 0) -> dict[str, float]:
  """Corpus ROUGE F-measure, averaged over examples.

  Args:
    predictions: ``N >= 1`` generated answers.
    references: ``N`` reference outputs, aligned with ``predictions``.
    rouge_types: which of ``('rouge1', 'rouge2', 'rougeL', 'rougeLsum')`` to compute.
    use_stemmer: apply the Porter stemmer. The official FedDPA metric (t5's rouge) does not.
    bootstrap_samples: 0 gives the plain mean. ``k > 0`` gives the median of ``k`` bootstrap means, like the ``mid``
      of t5's ``BootstrapAggregator`` (which uses k = 1000), but seeded.
    seed: seed of the bootstrap.

  Returns:
    rouge type -> F-measure in ``[0, 1]`` (the paper reports ``x 100``).
  """
  per_example = rouge_per_example(predictions, references, rouge_types=rouge_types, use_stemmer=use_stemmer)
  rng = np.random.default_rng(seed)
  return {t: _aggregate(v, bootstrap_samples, rng) for t, v in per_example.items()}


def personalization_report(predictions_by_client: Mapping[int, Sequence[str]] | Sequence[Sequence[str]],
                           data: FedDPAData,
                           *,
                           rouge_type: str = 'rouge1',
                           use_stemmer: bool = False,
                           bootstrap_samples: int = 0,
                           seed: int = 0) -> dict[str, dict]:
  """FedDPA's personalization (P) and test-time personalization (TTP) scores.

  This is the protocol of the official ``GlobalModel_generated.py`` and ``metric.py``. Each client's personalized
  model answers the **whole** test pool. ``score[k][c]`` is the ROUGE of client ``k``'s answers on category ``c``.
  The paper's tables have one column per task, meaning the client that owns the task:

  * ``personalization[c] = score[k(c)][c]``: the owner's score on its own task (the distribution it trained on);
  * ``test_time[c] = mean over all categories u of score[k(c)][u]``: the owner's score over every task, **its own
    included**. This follows the secondary summary of the paper cited in ``reference/feddpa.md`` (TTP = "average over
    all tasks, including the client's own") and the reference pseudocode. When all categories have the same size
    (200 each in Dataset 1), this also equals the owner's ROUGE over the pooled test set (``metric.py``'s ``total``).
    ``test_time_others`` leaves the client's own task out, for comparison;
  * ``avg`` is the mean over the reported columns.

  When several clients own the same category, that column is the mean over those clients.

  Args:
    predictions_by_client: client id -> ``T`` answers aligned with ``data.test`` (``predictions[k][i]`` answers
      ``data.test[i]``). This is a mapping (any subset of clients) or a sequence of length ``K``. Answers should
      already be cleaned (see ``fedjax_adapters.data.feddpa.extract_response``).
    data: the dataset the predictions were made on.
    rouge_type: the ROUGE variant to report (``rouge1`` by default, see the module docstring).
    use_stemmer: apply the Porter stemmer (off in the official metric).
    bootstrap_samples: 0 for the plain mean per (client, category), or ``k`` for the bootstrap median.
    seed: seed of the bootstrap.

  Returns:
    A dict with these keys:
      ``'personalization'``: {category: score, ..., 'avg': mean}, for the categories of the clients given.
      ``'test_time'``: {category: score, ..., 'avg': mean}, the same columns.
      ``'test_time_others'``: like ``test_time``, but without the client's own category.
      ``'per_client'``: {client id: {category: score for every test category}}.
    Every score is a fraction in ``[0, 1]``.
  """
  (rouge_type,) = _check_types((rouge_type,))
  if isinstance(predictions_by_client, Mapping):
    preds = dict(predictions_by_client)
  else:
    preds = dict(enumerate(predictions_by_client))
    if len(preds) != data.num_clients:
      raise ValueError(f'predictions_by_client is a sequence of {len(preds)} clients, but the data has '
                       f'{data.num_clients}; pass a mapping {{client_id: predictions}} to report a subset.')
  if not preds:
    raise ValueError('predictions_by_client is empty.')
  if 'avg' in data.test_indices:
    raise ValueError("a category is named 'avg', which clashes with the report's average key.")
  references = [ex.output for ex in data.test]
  for k, p in preds.items():
    if not isinstance(k, (int, np.integer)) or not 0 <= k < data.num_clients:
      raise ValueError(f'client id {k!r} is not in range(0, {data.num_clients}).')
    if isinstance(p, str) or len(p) != len(references):
      raise ValueError(f'client {k} has {1 if isinstance(p, str) else len(p)} predictions, but the test pool has '
                       f'{len(references)}; predictions_by_client[k] must be aligned with data.test.')

  rng = np.random.default_rng(seed)
  per_client: dict[int, dict[str, float]] = {}
  for k in sorted(preds):
    values = rouge_per_example(list(preds[k]), references, rouge_types=(rouge_type,), use_stemmer=use_stemmer)
    values = values[rouge_type]
    per_client[int(k)] = {c: _aggregate(values[idx], bootstrap_samples, rng) for c, idx in data.test_indices.items()}

  personalization: dict[str, float] = {}
  test_time: dict[str, float] = {}
  test_time_others: dict[str, float] = {}
  for c in data.categories:
    owners = [k for k in data.clients_of(c) if k in per_client]
    if not owners:
      continue
    personalization[c] = float(np.mean([per_client[k][c] for k in owners]))
    test_time[c] = float(np.mean([np.mean(list(per_client[k].values())) for k in owners]))
    others = [[v for u, v in per_client[k].items() if u != c] for k in owners]
    # With a single category there is no "other" task; report nan instead of a misleading number.
    test_time_others[c] = float(np.mean([np.mean(o) for o in others])) if all(others) else float('nan')
  for table in (personalization, test_time, test_time_others):
    table['avg'] = float(np.mean(list(table.values())))
  return {
      'personalization': personalization,
      'test_time': test_time,
      'test_time_others': test_time_others,
      'per_client': per_client,
  }


# ---------------------------------------------------------------------------------------------------------------------
# Per-prompt scores, and P / TTP with paired bootstrap intervals.
# ---------------------------------------------------------------------------------------------------------------------

# The paper's claims, as (method, baseline, block): FedDPA-F beats FedIT and Local at test-time personalization, and
# FedDPA-T beats FedIT at both.
PAPER_COMPARISONS = (('feddpa_f', 'fedit', 'test_time'), ('feddpa_f', 'local', 'test_time'),
                     ('feddpa_t', 'fedit', 'personalization'), ('feddpa_t', 'fedit', 'test_time'))
BLOCKS = ('personalization', 'test_time')


def per_prompt_scores(predictions_by_client: Sequence[Sequence[str]], data: FedDPAData, *,
                      rouge_type: str = 'rouge1', use_stemmer: bool = False) -> np.ndarray:
  """``[K, T]`` ROUGE F-measure of every client's answer to every test prompt (aligned with ``data.test``)."""
  (rouge_type,) = _check_types((rouge_type,))
  references = [ex.output for ex in data.test]
  if isinstance(predictions_by_client, (str, Mapping)) or len(predictions_by_client) != data.num_clients:
    raise ValueError(f'predictions_by_client must be a sequence of {data.num_clients} clients\' answers.')
  return np.stack([rouge_per_example(list(p), references, rouge_types=(rouge_type,), use_stemmer=use_stemmer)
                   [rouge_type] for p in predictions_by_client])


def owner_weights(client_categories: Sequence[str], categories: Sequence[str]) -> np.ndarray:
  """``[C, K]``: row ``c`` averages the clients whose own task is ``categories[c]`` (uniform weights)."""
  w = np.array([[float(own == c) for own in client_categories] for c in categories])
  missing = [c for c, row in zip(categories, w) if not row.any()]
  if missing:
    raise ValueError(f'categories {missing} have no client; clients hold {list(client_categories)}.')
  return w / w.sum(axis=1, keepdims=True)


def personalization_table(means: np.ndarray, owners: np.ndarray) -> np.ndarray:
  """P per category, ``[..., C]``: the owners' mean score on their own task, from stratum means ``[..., K, C]``."""
  return np.einsum('ck,...kc->...c', owners, means)


def test_time_table(means: np.ndarray, owners: np.ndarray) -> np.ndarray:
  """TTP per category, ``[..., C]``: the owners' score averaged over every task (their own included)."""
  return np.einsum('ck,...k->...c', owners, means.mean(axis=-1))


def personalization_intervals(per_prompt: Mapping[str, np.ndarray], prompt_categories: Sequence[str],
                              client_categories: Sequence[str], *,
                              comparisons: Sequence[tuple[str, str, str]] = PAPER_COMPARISONS,
                              num_samples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
  """P and TTP (per task and average) of every method with paired, category-stratified bootstrap intervals.

  Every method is scored on the same resampled test prompts (``fedjax_adapters.metrics.bootstrap``: each category
  resampled with replacement to its size), so the differences in ``comparisons`` are paired. Everything needed is
  plain data, so a finished run's stored per-prompt scores can be re-analysed later.

  Args:
    per_prompt: method -> ``[K, T]`` per-prompt scores (:func:`per_prompt_scores`).
    prompt_categories: ``[T]`` category of every test prompt (``[ex.category for ex in data.test]``).
    client_categories: ``[K]`` each client's own category (``data.client_categories``); the categories' order
      (first appearance here) is the order of the per-task columns.
    comparisons: ``(method, baseline, block)`` triples; those whose methods are both present are reported.
    num_samples, level, seed: the bootstrap's draws, coverage and seed.

  Returns:
    ``{'methods': {method: {block: {category: Interval dict, ..., 'avg': Interval dict}}},
    'differences': [{'method', 'baseline', 'block', **Interval dict}, ...], 'num_samples', 'level', 'seed'}``;
    ``block`` is ``'personalization'`` or ``'test_time'``.
  """
  categories = tuple(dict.fromkeys(client_categories))
  prompt_categories = np.asarray(prompt_categories)
  unknown = sorted(set(prompt_categories.tolist()) - set(categories))
  if unknown:
    raise ValueError(f'test prompts of categories {unknown} belong to no client; clients hold {list(categories)}.')
  strata = [np.flatnonzero(prompt_categories == c) for c in categories]
  owners = owner_weights(client_categories, categories)
  draws = bootstrap.stratified_draws(strata, num_samples, seed=seed)
  # Each method's stratum means, on the full pool and on every resample, computed once and shared by all statistics.
  means = {m: (bootstrap.stratum_means(s, strata), bootstrap.stratum_means(s, draws)) for m, s in per_prompt.items()}
  tables = {'personalization': personalization_table, 'test_time': test_time_table}

  def interval(method, block, column=None, baseline=None):
    def stat(m):
      t = tables[block](m, owners)
      return t[..., column] if column is not None else t.mean(-1)
    full, drawn = means[method]
    estimate, samples = stat(full), stat(drawn)
    if baseline is not None:
      estimate, samples = estimate - stat(means[baseline][0]), samples - stat(means[baseline][1])
    return bootstrap.percentile_interval(float(estimate), samples, level=level).as_dict()

  methods = {name: {b: {**{c: interval(name, b, i) for i, c in enumerate(categories)}, 'avg': interval(name, b)}
                    for b in BLOCKS} for name in per_prompt}
  differences = []
  for method, base, block in comparisons:
    if block not in BLOCKS:
      raise ValueError(f'comparison block must be one of {BLOCKS}; got {block!r}.')
    if method in per_prompt and base in per_prompt:
      differences.append({'method': method, 'baseline': base, 'block': block,
                          **interval(method, block, baseline=base)})
  return {'methods': methods, 'differences': differences, 'num_samples': num_samples, 'level': level, 'seed': seed}

"""FedDPA's P / TTP statistics from per-prompt scores, with paired bootstrap intervals (Dataset 1's test pool)."""
import os

import numpy as np
import pytest

from fedjax_adapters.data import feddpa
from fedjax_adapters.metrics import bootstrap, rouge

DATASET1 = os.environ.get(
    'FEDDPA_DATASET1',
    os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data', 'feddpa', 'dataset1'))


@pytest.fixture(scope='module')
def data():
  return feddpa.load_feddpa(DATASET1).subset_test(6)


def answers(data, seed, p_right):
  """Each client answers each prompt with the reference (ROUGE-1 = 1) or a word not in it (0) at random."""
  rng = np.random.default_rng(seed)
  return [[ex.output if rng.random() < p else 'zzzq' for ex in data.test] for p in p_right]


def test_per_prompt_scores_give_personalization_report(data):
  preds = answers(data, 0, np.linspace(0.2, 0.9, data.num_clients))
  s = rouge.per_prompt_scores(preds, data)
  assert s.shape == (8, len(data.test)) and set(np.unique(s)) <= {0.0, 1.0}
  report = rouge.personalization_report(preds, data)
  owners = rouge.owner_weights(data.client_categories, data.categories)
  means = bootstrap.stratum_means(s, list(data.test_indices.values()))
  p = rouge.personalization_table(means, owners)
  ttp = rouge.test_time_table(means, owners)
  for i, c in enumerate(data.categories):
    assert p[i] == pytest.approx(report['personalization'][c])
    assert ttp[i] == pytest.approx(report['test_time'][c])
  assert p.mean() == pytest.approx(report['personalization']['avg'])
  assert ttp.mean() == pytest.approx(report['test_time']['avg'])


def test_owner_weights_average_shared_owners():
  w = rouge.owner_weights(['a', 'b', 'a'], ['a', 'b'])
  np.testing.assert_allclose(w, [[0.5, 0, 0.5], [0, 1, 0]])
  with pytest.raises(ValueError, match=r"categories \['c'\] have no client"):
    rouge.owner_weights(['a', 'b'], ['a', 'b', 'c'])


def test_intervals_equal_a_direct_loop_and_differences_are_paired(data):
  per_prompt = {'fedit': rouge.per_prompt_scores(answers(data, 1, [0.4] * 8), data),
                'feddpa_f': rouge.per_prompt_scores(answers(data, 2, [0.6] * 8), data)}
  out = rouge.personalization_intervals(per_prompt, [ex.category for ex in data.test], data.client_categories,
                                       num_samples=300, seed=4)
  assert [(d['method'], d['baseline'], d['block']) for d in out['differences']] == [('feddpa_f', 'fedit', 'test_time')]
  # Reference: the same resamples (same seed, categories in order), statistics by plain loops.
  cats = list(data.categories)
  draws = bootstrap.stratified_draws(list(data.test_indices.values()), 300, seed=4)
  owner = [data.client_categories.index(c) for c in cats]

  def ttp_avg(s, b):
    return np.mean([np.mean([s[owner[c]][draws[u][b]].mean() for u in range(8)]) for c in range(8)])

  def p_task(s, b, c):
    return s[owner[c]][draws[c][b]].mean()

  f, g = per_prompt['feddpa_f'], per_prompt['fedit']
  diffs = [ttp_avg(f, b) - ttp_avg(g, b) for b in range(300)]
  d = out['differences'][0]
  assert (d['low'], d['high']) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
  assert d['estimate'] == pytest.approx(out['methods']['feddpa_f']['test_time']['avg']['estimate']
                                        - out['methods']['fedit']['test_time']['avg']['estimate'])
  p2 = [p_task(f, b, 2) for b in range(300)]
  cell = out['methods']['feddpa_f']['personalization'][cats[2]]
  assert (cell['low'], cell['high']) == pytest.approx(tuple(np.quantile(p2, [0.025, 0.975])))
  assert set(out['methods']['fedit']['test_time']) == set(cats) | {'avg'}
  assert (out['num_samples'], out['level'], out['seed']) == (300, 0.95, 4)
  with pytest.raises(ValueError, match='comparison block must be one of'):
    rouge.personalization_intervals(per_prompt, [ex.category for ex in data.test], data.client_categories,
                                    comparisons=[('feddpa_f', 'fedit', 'ttp')], num_samples=5)
  with pytest.raises(ValueError, match=r"categories \['other'\] belong to no client"):
    rouge.personalization_intervals(per_prompt, ['other'] + [ex.category for ex in data.test][1:],
                                    data.client_categories, num_samples=5)

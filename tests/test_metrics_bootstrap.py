"""The stratified, paired bootstrap: against a direct loop over resamples, a known-variance case, pairing, golden."""
import numpy as np
import pytest

from fedjax_adapters.metrics import bootstrap

STRATA = [np.arange(0, 7), np.arange(7, 12), np.arange(12, 20)]


def scores(seed, k=3, t=20):
  return np.random.default_rng(seed).random((k, t))


def test_draws_stay_in_their_stratum_and_are_seeded():
  draws = bootstrap.stratified_draws(STRATA, 50, seed=1)
  assert [d.shape for d in draws] == [(50, 7), (50, 5), (50, 8)]
  for s, d in zip(STRATA, draws):
    assert np.isin(d, s).all()
  again = bootstrap.stratified_draws(STRATA, 50, seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(draws, again))
  other = bootstrap.stratified_draws(STRATA, 50, seed=2)
  assert not all(np.array_equal(a, b) for a, b in zip(draws, other))
  # Every index of a stratum turns up over many draws (sampling with replacement from the whole stratum).
  assert all(set(np.unique(d)) == set(s) for s, d in zip(STRATA, draws))


def test_stratum_means_equal_a_direct_loop():
  s = scores(0)
  full = bootstrap.stratum_means(s, STRATA)
  np.testing.assert_allclose(full, [[row[idx].mean() for idx in STRATA] for row in s])
  draws = bootstrap.stratified_draws(STRATA, 2500, seed=0)  # more than one chunk of resamples
  means = bootstrap.stratum_means(s, draws)
  assert means.shape == (2500, 3, 3)
  for b in (0, 999, 1000, 2499):
    np.testing.assert_allclose(means[b], [[row[d[b]].mean() for d in draws] for row in s])


def test_paired_interval_equals_a_numpy_loop_over_resamples():
  a, base = scores(1), scores(2)
  draws = bootstrap.stratified_draws(STRATA, 400, seed=3)
  stat = lambda m: m[..., 0, :].mean(-1) + 0.5 * m[..., 2, 1]  # any statistic of the [K, C] table
  ci = bootstrap.paired_interval(stat, a, STRATA, draws, baseline=base, level=0.9)

  def by_hand(x, b=None):
    pick = (lambda d: d[b]) if b is not None else (lambda d: d)
    table = np.array([[x[k][pick(d)].mean() for d in (draws if b is not None else STRATA)] for k in range(3)])
    return table[0].mean() + 0.5 * table[2, 1]

  diffs = np.array([by_hand(a, b) - by_hand(base, b) for b in range(400)])
  assert ci.estimate == pytest.approx(by_hand(a) - by_hand(base))
  assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(diffs, [0.05, 0.95])))
  assert ci.std == pytest.approx(diffs.std())
  assert (ci.level, ci.num_samples) == (0.9, 400)


def test_known_variance_of_a_mean():
  # The bootstrap variance of a mean of n values is the population variance / n (sum of squares / n, not n - 1).
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 400))
  strata = [np.arange(400)]
  draws = bootstrap.stratified_draws(strata, 20_000, seed=5)
  ci = bootstrap.paired_interval(lambda m: m[..., 0, 0], x, strata, draws)
  se = x.std() / np.sqrt(400)
  # Monte-Carlo error of a standard deviation from 20,000 draws is about 1 / sqrt(2 * 20000) = 0.5 % (relative).
  assert ci.std == pytest.approx(se, rel=0.03)
  assert ci.estimate == pytest.approx(x.mean())
  # The mean of 400 normals is normal: the 95 % percentile interval is mean +- 1.96 se.
  assert ci.low == pytest.approx(x.mean() - 1.96 * se, abs=0.1 * se)
  assert ci.high == pytest.approx(x.mean() + 1.96 * se, abs=0.1 * se)


def test_stratification_removes_between_stratum_variance():
  # Two strata with constant scores 0 and 1: the stratified mean never moves; a pooled bootstrap would.
  x = np.concatenate([np.zeros(10), np.ones(10)])[None]
  strata = [np.arange(10), np.arange(10, 20)]
  ci = bootstrap.paired_interval(lambda m: m.mean(axis=(-1, -2)), x, strata,
                                 bootstrap.stratified_draws(strata, 300, seed=0))
  assert (ci.estimate, ci.low, ci.high, ci.std) == (0.5, 0.5, 0.5, 0.0)


def test_pairing_cancels_shared_noise():
  # b = a + 0.1 on every example: the paired difference is exactly -0.1 in every resample, while each method's own
  # interval is wide.
  a = scores(6)
  b = a + 0.1
  draws = bootstrap.stratified_draws(STRATA, 500, seed=0)
  mean = lambda m: m.mean(axis=(-1, -2))
  diff = bootstrap.paired_interval(mean, a, STRATA, draws, baseline=b)
  assert diff.estimate == pytest.approx(-0.1)
  assert diff.low == pytest.approx(-0.1) and diff.high == pytest.approx(-0.1) and diff.std < 1e-12
  alone = bootstrap.paired_interval(mean, a, STRATA, draws)
  assert alone.high - alone.low > 0.1


def test_seeded_golden_interval():
  # Pins the draw order (stratum by stratum from one default_rng(seed)): stored results must stay reproducible.
  x = np.array([[0., 1., 1., 0., 1., 0.5, 0., 1.]])
  strata = [np.arange(0, 5), np.arange(5, 8)]
  draws = bootstrap.stratified_draws(strata, 8, seed=7)
  rng = np.random.default_rng(7)
  assert np.array_equal(draws[0], rng.integers(0, 5, size=(8, 5)))
  assert np.array_equal(draws[1], 5 + rng.integers(0, 3, size=(8, 3)))
  ci = bootstrap.paired_interval(lambda m: m.mean(axis=(-1, -2)), x, strata, draws, level=0.5)
  means = [(x[0, d0].mean() + x[0, d1].mean()) / 2 for d0, d1 in zip(*draws)]
  assert ci.estimate == pytest.approx((0.6 + 0.5) / 2)
  assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(means, [0.25, 0.75])))


def test_bad_input_errors():
  with pytest.raises(ValueError, match='num_samples must be >= 1'):
    bootstrap.stratified_draws(STRATA, 0)
  with pytest.raises(ValueError, match='non-empty sequence of index arrays'):
    bootstrap.stratified_draws(np.arange(4), 3)
  with pytest.raises(ValueError, match='stratum 1 must be a non-empty integer index array'):
    bootstrap.stratified_draws([np.arange(3), np.array([], np.int64)], 3)
  with pytest.raises(ValueError, match=r'stratum 0 holds indices outside \[0, 20\)'):
    bootstrap.stratum_means(scores(0), [np.arange(15, 25)])
  with pytest.raises(ValueError, match=r'scores must be \[K, T\]'):
    bootstrap.stratum_means(np.zeros(20), STRATA)
  with pytest.raises(ValueError, match='level must lie in'):
    bootstrap.percentile_interval(0.0, np.zeros(3), level=95)
  with pytest.raises(ValueError, match='1 non-finite'):
    bootstrap.percentile_interval(0.0, np.array([0.0, np.nan]))
  draws = bootstrap.stratified_draws(STRATA, 5)
  with pytest.raises(ValueError, match=r'statistic must map \[..., K, C\] to \[...\]'):
    bootstrap.paired_interval(lambda m: m, scores(0), STRATA, draws)

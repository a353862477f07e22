"""pgf.study.stats on hand-made numbers, against hand computations, scipy
and a brute-force reference."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pgf.study import stats

# Paired values whose differences d = (0.02, 0.01, 0.03, 0.01, 0.01) give
# round numbers: mean 0.016, squared deviations summing to 3.2e-4, so
# sd = sqrt(3.2e-4 / 4) = sqrt(8e-5), se = sd / sqrt(5) = 0.004, t = 4.
X = [0.90, 0.85, 0.88, 0.91, 0.87]
Y = [0.88, 0.84, 0.85, 0.90, 0.86]


def test_summarize_by_hand():
  s = stats.summarize([1.0, 2.0, 3.0, 4.0])
  assert (s.n, s.mean, s.min, s.max) == (4, 2.5, 1.0, 4.0)
  assert s.sd == pytest.approx(math.sqrt(5 / 3))  # 5 = sum of (x-2.5)^2.
  one = stats.summarize([0.7])
  assert (one.n, one.mean, one.sd) == (1, 0.7, None)
  assert stats.summarize([]).n == 0


def test_paired_test_by_hand():
  r = stats.paired_test(X, Y)
  assert r.n == 5 and r.df == 4
  assert r.mean == pytest.approx(0.016)
  assert r.sd == pytest.approx(math.sqrt(8e-5))
  assert r.se == pytest.approx(0.004)
  assert r.t == pytest.approx(4.0)
  # Student t with 4 df has a closed-form CDF:
  # F(t) = 1/2 + 3/8 * u * (1 - u^2 / 12), u = t / sqrt(1 + t^2 / 4);
  # t = 4: u = 4 / sqrt(5).
  u = 4 / math.sqrt(5)
  p = 2 * (1 - (0.5 + 3 / 8 * u * (1 - u * u / 12)))
  assert r.p_t == pytest.approx(p, rel=1e-9)
  assert r.p_t == pytest.approx(0.0161301, rel=1e-5)
  # t_{0.975, 4} = 2.776445 (printed tables): 0.016 +- 2.776445 * 0.004.
  assert r.low == pytest.approx(0.016 - 2.776445 * 0.004, abs=1e-8)
  assert r.high == pytest.approx(0.016 + 2.776445 * 0.004, abs=1e-8)
  # Every difference positive: the sign-flip p is its smallest, 2 / 2^5.
  assert r.p_perm == r.p_perm_min == pytest.approx(2 / 32)


def test_paired_test_matches_scipy():
  rng = np.random.default_rng(0)
  for n in (2, 3, 7):
    x = rng.normal(0.9, 0.01, n)
    y = x - rng.normal(0.003, 0.01, n)
    r = stats.paired_test(x, y)
    ref = scipy_stats.ttest_rel(x, y)
    assert r.t == pytest.approx(ref.statistic, rel=1e-10)
    assert r.p_t == pytest.approx(ref.pvalue, rel=1e-10)
    ci = ref.confidence_interval(0.95)
    assert (r.low, r.high) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_paired_test_edge_cases():
  one = stats.paired_test([0.9], [0.8])
  assert one.mean == pytest.approx(0.1)
  assert (one.sd, one.p_t, one.low) == (None, None, None)
  assert one.p_perm == 1.0  # Both sign patterns reach |0.1|.
  same = stats.paired_test([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
  assert (same.t, same.p_t, same.p_perm) == (0.0, 1.0, 1.0)
  # Identical non-zero differences: infinite t, as scipy's p of ~0.
  shift = stats.paired_test([0.5, 1.0, 2.0], [0.25, 0.75, 1.75])
  assert shift.t == math.inf and shift.p_t == 0.0
  assert shift.low == shift.high == 0.25
  with pytest.raises(ValueError):
    stats.paired_test([1.0, 2.0], [1.0])


def test_sign_flip_by_hand():
  # n = 3, all positive: of the 8 sums +-1 +-2 +-3 only 6 and -6 reach 6.
  assert stats.sign_flip_p([1.0, 2.0, 3.0]) == (0.25, 0.25)
  # +-1 +-1 +-1 +-2 (the sign of -1 does not matter): |sum| >= 3 for
  # 2 + {3, 1, 1, 1} -> 5, 3, 3, 3 and their mirrors: 8 of 16.
  p, smallest = stats.sign_flip_p([1.0, 1.0, -1.0, 2.0])
  assert (p, smallest) == (0.5, 0.125)
  # A zero flips to itself: 0 +-1 +-2 reaches 3 in 4 of 8 patterns, and
  # no data with one zero among three could do better.
  assert stats.sign_flip_p([0.0, 1.0, 2.0]) == (0.5, 0.5)
  assert stats.sign_flip_p([0.0, 0.0]) == (1.0, 1.0)


def _brute_force_sign_flip(d):
  observed = abs(sum(d))
  hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-12
             for signs in itertools.product((1, -1), repeat=len(d)))
  return hits / 2 ** len(d)


def test_sign_flip_matches_brute_force():
  rng = np.random.default_rng(1)
  for n in (1, 4, 9, 17):  # 17 crosses the enumeration's chunk of 2^16.
    d = list(np.round(rng.normal(0.2, 1.0, n), 2))
    assert stats.sign_flip_p(d)[0] == pytest.approx(
        _brute_force_sign_flip(d))


def test_holm_by_hand():
  # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06,
  # 0.04 -> running maximum 0.02, 0.03, 0.06, 0.06.
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx(
      [0.03, 0.06, 0.06, 0.02])
  # None is outside the family (m = 2) and stays None.
  out = stats.holm([0.2, None, 0.6])
  assert out[1] is None and out[0] == pytest.approx(0.4)
  assert out[2] == pytest.approx(0.6)
  assert stats.holm([0.5, 0.9]) == [1.0, 1.0]  # Capped at 1.
  assert stats.holm([]) == []


def test_test_names_are_exported():
  assert set(stats.TEST_NAMES) >= {'p_t', 'p_perm', 'interval', 'holm'}
  assert 'sign-flip' in stats.TEST_NAMES['p_perm']

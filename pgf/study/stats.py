"""Statistics of a seeded study: summaries and paired comparisons.

Seeds are the unit of replication: a cell's runs differ only in
`config.seed`, and two cells are compared seed by seed (run s of a cell
against run s of its reference), which removes the part of the seed noise
that both cells share (same initial weights and data order).

Definitions (d_i = x_i - y_i, i = 1..n, the paired differences):
  mean      d_bar = sum(d_i) / n
  sd        s = sqrt(sum((d_i - d_bar)^2) / (n - 1))
  se        s / sqrt(n)
  t         d_bar / se, Student t with n - 1 degrees of freedom
  interval  d_bar +- t_{0.975, n-1} * se (95 % t-interval)
  p_t       2 * P(T_{n-1} >= |t|) (paired t-test, two-sided)
  p_perm    exact sign-flip permutation test, two-sided: the fraction of
            the 2^n sign patterns e in {-1, 1}^n with
            |mean(e_i * d_i)| >= |d_bar|; under the null hypothesis that
            each difference is symmetric about 0 every pattern is equally
            likely. Its smallest attainable value is 2 / 2^n (n = 3: 0.25;
            n = 5: 0.0625; n = 6: 0.03125) when no difference is 0.
  Holm      step-down adjustment of a family of m p-values: sorted
            ascending, p_(k) becomes max_{j <= k} min(1, (m - j + 1) p_(j));
            controls the family-wise error rate.

scipy is used only for the Student t quantile and CDF.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

# The names a study's README quotes; exported with every report.
TEST_NAMES = {
    'p_t': 'paired t-test, two-sided (Student t, n - 1 degrees of freedom)',
    'p_perm': 'exact sign-flip permutation test of the mean paired '
              'difference, two-sided (all 2^n sign patterns)',
    'interval': '95 % t-interval of the mean paired difference',
    'holm': 'Holm step-down adjustment over the comparisons the grid '
            'declares, per metric and per test',
}

# Exact enumeration holds 2^n patterns; beyond this many seeds use p_t.
MAX_PERMUTATION_N = 24


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean, spread and range of one cell's values over its seeds."""

  n: int
  mean: float | None
  sd: float | None  # Sample standard deviation (n - 1); None for n < 2.
  min: float | None
  max: float | None


def summarize(values: Sequence[float]) -> Summary:
  x = np.asarray(values, dtype=np.float64)
  if not x.size:
    return Summary(n=0, mean=None, sd=None, min=None, max=None)
  sd = float(np.std(x, ddof=1)) if x.size > 1 else None
  return Summary(n=int(x.size), mean=float(x.mean()), sd=sd,
                 min=float(x.min()), max=float(x.max()))


@dataclasses.dataclass(frozen=True)
class PairedTest:
  """A paired comparison x - y over n seeds (see the module docstring).

  Fields that need more seeds than there are (sd, interval and p_t need
  n >= 2) are None. p_perm_min is the smallest p_perm these n differences
  could give (all 2^n patterns; zeros cannot be flipped).
  """

  n: int
  mean: float
  sd: float | None
  se: float | None
  t: float | None
  df: int
  low: float | None   # 95 % t-interval.
  high: float | None
  p_t: float | None
  p_perm: float
  p_perm_min: float


def t_quantile(q: float, df: int) -> float:
  return float(scipy_stats.t.ppf(q, df))


def t_two_sided_p(t: float, df: int) -> float:
  """2 * P(T_df >= |t|)."""
  return float(2.0 * scipy_stats.t.sf(abs(t), df))


def sign_flip_p(diffs: Sequence[float]) -> tuple[float, float]:
  """(p, smallest attainable p) of the exact two-sided sign-flip test.

  Counts the sign patterns whose mean is at least as far from 0 as the
  observed mean; the observed pattern is one of them, so p >= 1 / 2^n.
  """
  d = np.asarray(diffs, dtype=np.float64)
  n = d.size
  if not n:
    raise ValueError('sign_flip_p needs at least one difference.')
  if n > MAX_PERMUTATION_N:
    raise ValueError(f'{n} differences: exact enumeration of 2^{n} sign '
                     f'patterns is too large (at most {MAX_PERMUTATION_N}).')
  observed = abs(d.sum())
  # Sums equal up to rounding count as ties (e.g. 0.1 + 0.2 vs 0.3).
  tol = 1e-9 * max(float(np.abs(d).sum()), 1e-300)
  count = 0
  chunk = 1 << 16
  bits = np.arange(n)
  for start in range(0, 1 << n, chunk):
    codes = np.arange(start, min(start + chunk, 1 << n))
    signs = 1 - 2 * ((codes[:, None] >> bits) & 1)
    count += int(np.sum(np.abs(signs @ d) >= observed - tol))
  # The smallest p: only the observed pattern and its mirror image reach
  # |sum| when every non-zero difference keeps its sign; flipping a zero
  # changes nothing, so each zero doubles that count.
  zeros = int(np.sum(d == 0))
  mirror = 1 if zeros == n else 2
  smallest = min(1.0, mirror * 2.0 ** zeros / 2.0 ** n)
  return count / 2.0 ** n, smallest


def paired_test(x: Sequence[float], y: Sequence[float]) -> PairedTest:
  """The paired comparison of x against y (same seed at each position)."""
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.shape != y.shape or x.ndim != 1 or not x.size:
    raise ValueError(f'paired_test needs two equal, non-empty 1-D '
                     f'sequences; got shapes {x.shape} and {y.shape}.')
  d = x - y
  n = int(d.size)
  mean = float(d.mean())
  p_perm, p_min = sign_flip_p(d)
  if n < 2:
    return PairedTest(n=n, mean=mean, sd=None, se=None, t=None, df=0,
                      low=None, high=None, p_t=None, p_perm=p_perm,
                      p_perm_min=p_min)
  sd = float(np.std(d, ddof=1))
  se = sd / math.sqrt(n)
  df = n - 1
  half = t_quantile(0.975, df) * se
  if se > 0:
    t = mean / se
    p_t = t_two_sided_p(t, df)
  else:
    # Identical differences: the t statistic is infinite unless they are
    # all 0 (no evidence either way).
    t = math.copysign(math.inf, mean) if mean else 0.0
    p_t = 0.0 if mean else 1.0
  return PairedTest(n=n, mean=mean, sd=sd, se=se, t=t, df=df,
                    low=mean - half, high=mean + half, p_t=p_t,
                    p_perm=p_perm, p_perm_min=p_min)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
  """Holm-adjusted p-values, in the input order; None entries (tests that
  could not be done) are left out of the family and stay None."""
  index = [i for i, p in enumerate(p_values) if p is not None]
  m = len(index)
  out: list[float | None] = [None] * len(p_values)
  running = 0.0
  for rank, i in enumerate(sorted(index, key=lambda i: p_values[i])):
    running = max(running, min(1.0, (m - rank) * p_values[i]))
    out[i] = running
  return out

"""Tests of pgf.durations.to_steps: steps, fractions, percentages, epochs."""

from fractions import Fraction
import math
import re

import numpy as np
import pytest

from pgf.durations import to_steps


@pytest.mark.parametrize('value,total,spe,want', [
    ('1000', None, None, 1000),
    (1000, None, None, 1000),
    ('0', 10, None, 0),
    (' 42 ', 10, None, 42),        # steps may exceed the run; callers check
    ('0.1', 1000, None, 100),
    ('.25', 1000, None, 250),
    ('1.0', 77, None, 77),         # '1' is one step, '1.0' the whole run
    ('0.0', 77, None, 0),
    ('0.25', 10, None, 3),         # 2.5 rounds half up
    ('10%', 1000, None, 100),
    ('12.5%', 1000, None, 125),
    ('100%', 33, None, 33),
    ('0%', 33, None, 0),
    ('5ep', None, 100, 500),
    ('1.5ep', None, 100, 150),
    ('2 epochs', None, 7, 14),
    ('1epoch', None, 7, 7),
    ('0.5ep', None, 5, 3),         # 2.5 rounds half up, as fractions do
    ('0.3ep', None, 5, 2),         # 1.5 -> 2
])
def test_to_steps(value, total, spe, want):
  got = to_steps(value, total_steps=total, steps_per_epoch=spe, key='k')
  assert got == want and isinstance(got, int)


def test_random_steps_fractions_and_percentages():
  rng = np.random.default_rng(0)
  for _ in range(300):
    total = int(rng.integers(1, 10**6))
    n = int(rng.integers(0, 10**7))
    assert to_steps(str(n), total_steps=total) == n
    k = int(rng.integers(0, 10**4 + 1))
    exact = Fraction(k, 10**4) * total
    for text in (f'{k / 10**4:.4f}', f'{k / 100:.2f}%'):
      got = to_steps(text, total_steps=total, key='x')
      assert abs(got - exact) <= Fraction(1, 2), (text, total)
      if abs(exact - math.floor(exact) - Fraction(1, 2)) > Fraction(1, 10**6):
        assert got == math.floor(exact + Fraction(1, 2)), (text, total)
    epochs = int(rng.integers(0, 500))
    spe = int(rng.integers(1, 5000))
    assert to_steps(f'{epochs}ep', total_steps=None,
                    steps_per_epoch=spe) == epochs * spe


@pytest.mark.parametrize('value,match', [
    ('abc', "sparsity.dense_warmup='abc' is not a duration; allowed:"),
    ('-3', "sparsity.dense_warmup='-3' is not a duration"),
    ('', "sparsity.dense_warmup='' is not a duration"),
    ('.', "sparsity.dense_warmup='.' is not a duration"),
    ('1e3', "sparsity.dense_warmup='1e3' is not a duration"),
    ('5 steps', "sparsity.dense_warmup='5 steps' is not a duration"),
    ('1.5', re.escape("sparsity.dense_warmup='1.5': a fraction must lie in "
                      '[0, 1]')),
    ('150%', re.escape("sparsity.dense_warmup='150%': a fraction must lie")),
])
def test_errors_name_the_key_and_value(value, match):
  with pytest.raises(ValueError, match=match):
    to_steps(value, total_steps=100, steps_per_epoch=10,
             key='sparsity.dense_warmup')


def test_unknown_epoch_length_or_total():
  for spe in (None, 0):
    with pytest.raises(ValueError, match=re.escape(
        "optimizer.warmup='5ep' is in epochs but the number of steps per "
        'epoch is not known')):
      to_steps('5ep', total_steps=100, steps_per_epoch=spe,
               key='optimizer.warmup')
  with pytest.raises(ValueError, match=re.escape(
      "total_steps='0.5' is a fraction but the total number of steps is not "
      'known')):
    to_steps('0.5', total_steps=None, key='total_steps')
  with pytest.raises(ValueError, match="total_steps='10%' is a fraction"):
    to_steps('10%', total_steps=None, key='total_steps')
  # Plain steps and epochs need no total.
  assert to_steps('3ep', total_steps=None, steps_per_epoch=4) == 12

"""The one place where durations in configs become step counts.

A duration is a string (so one config key can hold any form):
  '1000'     -> 1000 steps
  '0.1'      -> a fraction of the whole run (here 10 %)
  '10%'      -> the same fraction, written as a percentage
  '5ep'      -> 5 epochs (needs steps_per_epoch)
Nothing else in pgf deals in epochs or fractions.
"""

from __future__ import annotations

import math
import re


def to_steps(value: str | int, *, total_steps: int | None,
             steps_per_epoch: int | None = None, key: str = 'duration') -> int:
  """Converts a duration (see module doc) to a whole number of steps.

  Raises ValueError naming `key` and the value when it cannot be parsed, is
  negative, or needs a total/epoch length that is not known.
  """
  text = str(value).strip()
  allowed = ("steps ('1000'), a fraction of the run ('0.1'), a percentage "
             "('10%') or epochs ('5ep')")
  try:
    if re.fullmatch(r'\d+', text):
      return int(text)
    if match := re.fullmatch(r'(\d+(?:\.\d*)?)\s*ep(?:ochs?)?', text):
      if not steps_per_epoch:
        raise ValueError(f'{key}={text!r} is in epochs but the number of '
                         'steps per epoch is not known here.')
      return int(math.floor(float(match.group(1)) * steps_per_epoch + 0.5))
    if match := re.fullmatch(r'(\d+(?:\.\d*)?)\s*%', text):
      fraction = float(match.group(1)) / 100
    elif re.fullmatch(r'\d*\.\d*', text) and text != '.':
      fraction = float(text)
    else:
      raise ValueError(f'{key}={text!r} is not a duration; allowed: {allowed}.')
  except (TypeError, OverflowError) as e:
    raise ValueError(f'{key}={text!r} is not a duration: {e}') from None
  if not 0 <= fraction <= 1:
    raise ValueError(f'{key}={text!r}: a fraction must lie in [0, 1].')
  if total_steps is None:
    raise ValueError(f'{key}={text!r} is a fraction but the total number of '
                     'steps is not known here.')
  return int(math.floor(fraction * total_steps + 0.5))

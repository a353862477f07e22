"""'/'-joined paths of parameter trees (boxes count as leaves)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn


def flatten(tree) -> dict[str, Any]:
  """'/'-joined paths -> leaves (`nn.Partitioned` boxes count as leaves)."""
  return flax.traverse_util.flatten_dict(
      flax.core.unfreeze(tree), sep='/',
      is_leaf=lambda _, x: isinstance(x, nn.Partitioned))


def unflatten(flat: Mapping[str, Any]) -> dict:
  """The nested dict of '/'-joined paths -> leaves."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep='/')

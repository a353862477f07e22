"""Pieces every model family shares."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """The jnp dtype of config key model.dtype."""
  if name not in DTYPES:
    raise ValueError(f'model.dtype={name!r} is not allowed; choose one of '
                     f'{tuple(DTYPES)}.')
  return DTYPES[name]


def drop_path(x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth per example (timm's DropPath, scaled by 1 / keep).

  Call inside a compact method; uses the 'dropout' rng when training.
  """
  if not rate:
    return x
  return nn.Dropout(rate, broadcast_dims=tuple(range(1, x.ndim)),
                    deterministic=not train)(x)

"""Pieces every model family shares."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgf.sparsity import SparseDense
from pgf.sparsity import SparsityPlan

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


class Mlp(nn.Module):
  """wi -> GELU (exact erf, as torch's nn.GELU) -> dropout -> wo -> dropout.

  On (B, L, D); both matrices are sparse-capable ('mlp/wi', 'mlp/wo' when
  named 'mlp' by the parent), with biases.
  """

  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = x.shape[-1]
    x = SparseDense(self.mlp_dim, dtype=self.dtype,
                    kernel_init=self.kernel_init, bias_init=self.bias_init,
                    kernel_axes=('embed', 'mlp'), sparsity=self.sparsity,
                    name='wi')(x)
    x = nn.gelu(x, approximate=False)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'mlp'))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = SparseDense(width, dtype=self.dtype, kernel_init=self.kernel_init,
                    bias_init=self.bias_init, kernel_axes=('mlp', 'embed'),
                    sparsity=self.sparsity, name='wo')(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)

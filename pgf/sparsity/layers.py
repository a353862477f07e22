"""Flax layers whose kernels carry an N:M mask.

Every sparse layer of every pgf model is one of these (one code path). A
layer asks the static `SparsityPlan` (a module attribute, threaded down by the
model) whether its kernel's parameter path is sparse and with which N:M; the
traced alpha of its group comes from the `sparsity` variable collection that
the train step fills from the step (`layer_collection`). Without a plan the
layer is exactly a dense layer. Biases are kept (the authors' code drops
them). The product with the kernel is `core.sparse_product(...)`: the
effective kernel of `core.effective_kernel` (the one place where the mask
meets alpha, shared with the model-agnostic `Sparsifier`), rebuilt in the
backward pass from the weight and the mask's bits instead of kept
(`SparsityPlan.recompute`).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import flax
import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

from pgf.sparsity import core
from pgf.sparsity.schedules import SparsityPlan

Initializer = Any
SCHEDULE_COLLECTION = 'sparsity'


class SparseKernel(nn.LogicallyPartitioned):
  """A kernel's logical partitioning plus its static group axes.

  `in_axes` are the contraction axes and `out_axes` the output axes of the
  kernel: the two ways N:M groups can run (docs/recipes.md section 1). Code
  outside the layer (`Sparsifier`: placement and sharding checks, statistics,
  export, the optax transforms) reads them from the boxed parameters of
  `jax.eval_shape(model.init, ...)` without running the model.
  """

  in_axes: tuple[int, ...] = flax.struct.field(default=(), pytree_node=False)
  out_axes: tuple[int, ...] = flax.struct.field(default=(), pytree_node=False)


def _kernel_init(fn: Initializer, names: tuple, in_axes: tuple[int, ...],
                 out_axes: tuple[int, ...]) -> Initializer:
  def init(*args, **kwargs):
    return SparseKernel(fn(*args, **kwargs), names, in_axes=in_axes,
                        out_axes=out_axes)
  return init


class _SparseKernelMixin:
  """Shared by the layers: apply the kernel, masked according to the plan."""

  def _apply_kernel(self, op, x: jax.Array, kernel: jax.Array, names: tuple,
                    in_axes: tuple[int, ...],
                    out_axes: tuple[int, ...]) -> jax.Array:
    """op(x, kernel) with the kernel's effective N:M form when it is sparse.

    With `plan.recompute` (the default) the product is
    `core.sparse_product`: no effective kernel is kept for the backward
    pass, which rebuilds it from the kernel and the mask's bits.
    """
    rule = None
    if self.sparsity:
      path = '/'.join(self.scope.path) + '/kernel'
      rule = self.sparsity.lookup(path)
    if rule is None:
      return op(x, kernel)
    axes = core.resolve_axes(rule.axis, rule.group_axes, shape=kernel.shape,
                             names=names, in_axes=in_axes, out_axes=out_axes,
                             path=path)
    # Without schedule values (e.g. a user applying params by hand) the
    # layer uses the hard mask, as evaluation and export do.
    alpha = (self.get_variable(SCHEDULE_COLLECTION, 'alpha')
             if self.has_variable(SCHEDULE_COLLECTION, 'alpha') else None)
    if self.sparsity.recompute:
      return core.sparse_product(op, x, kernel, rule.nm, axes, alpha=alpha,
                                 name=path)
    kernel, _ = core.effective_kernel(kernel, rule.nm, axes, alpha=alpha,
                                      name=path)
    return op(x, kernel)


def _compute_dtype(dtype, *arrays):
  """The dtype flax's `promote_dtype` would give `arrays`."""
  return dtype or jnp.result_type(*(a for a in arrays if a is not None))


class SparseDenseGeneral(_SparseKernelMixin, nn.Module):
  """DenseGeneral over the last `len(axis)` input axes, maybe N:M sparse.

  kernel: `in_shape + features`, e.g. `(embed, heads, head_dim)` for Q/K/V
  (contraction axis 0) or `(heads, head_dim, embed)` for an attention output
  projection (contraction axes 0 and 1).

  Attributes:
    features: output feature shape.
    axis: input axes contracted; must be the trailing axes.
    kernel_axes: logical axis names of the kernel, for sharding.
    sparsity: the static plan, or None for a dense layer.
  """

  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  kernel_axes: tuple[str, ...] = ()
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = ((self.features,) if isinstance(self.features, int)
                else tuple(self.features))
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(sorted(a % x.ndim for a in axis))
    if axis != tuple(range(x.ndim - len(axis), x.ndim)):
      raise ValueError(f'{self.name}: contracted axes {self.axis} must be the '
                       f'trailing axes of inputs of rank {x.ndim}.')
    in_shape = tuple(x.shape[a] for a in axis)
    kernel_shape = in_shape + features
    n_in = len(in_shape)
    names = self.kernel_axes or (None,) * len(kernel_shape)
    if len(names) != len(kernel_shape):
      raise ValueError(f'{self.name}: kernel_axes {self.kernel_axes} do not '
                       f'match the kernel shape {kernel_shape}.')

    def init(key, shape, dtype):
      # Initialise as a 2-D (fan_in, fan_out) matrix, like flax DenseGeneral.
      flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
      return self.kernel_init(key, flat, dtype).reshape(shape)

    in_axes = tuple(range(n_in))
    out_axes = tuple(range(n_in, len(kernel_shape)))
    kernel = self.param('kernel', _kernel_init(init, names, in_axes, out_axes),
                        kernel_shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          self.bias_init, names[n_in:]), features, self.param_dtype)
    dtype = _compute_dtype(self.dtype, x, kernel, bias)
    x, bias = promote_dtype(x, bias, dtype=dtype)

    def op(x, kernel):
      return jax.lax.dot_general(
          x, kernel.astype(dtype), ((axis, tuple(range(n_in))), ((), ())),
          precision=self.precision)

    y = self._apply_kernel(op, x, kernel, names, in_axes, out_axes)
    if bias is not None:
      y = y + bias
    return y


class SparseDense(SparseDenseGeneral):
  """Dense layer `(in, out)`, maybe N:M sparse along `in` (axis 0)."""

  features: int = 0
  axis: int = -1


class SparseConv(_SparseKernelMixin, nn.Module):
  """Convolution `(*window, in, out)`; groups run along input channels.

  Used for patch embeddings (dense by default; sparse when a rule matches).
  """

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: str | Sequence[tuple[int, int]] = 'VALID'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  kernel_axes: tuple[str, ...] = ()
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    window = tuple(self.kernel_size)
    kernel_shape = window + (x.shape[-1], self.features)
    names = self.kernel_axes or (None,) * len(kernel_shape)
    nd = len(kernel_shape)
    kernel = self.param(
        'kernel', _kernel_init(self.kernel_init, names, (nd - 2,), (nd - 1,)),
        kernel_shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          self.bias_init, names[-1:]), (self.features,), self.param_dtype)
    dtype = _compute_dtype(self.dtype, x, kernel, bias)
    x, bias = promote_dtype(x, bias, dtype=dtype)
    dn = jax.lax.conv_dimension_numbers(
        x.shape, kernel.shape, ('NHWC', 'HWIO', 'NHWC') if len(window) == 2
        else ('NWC', 'WIO', 'NWC'))

    def op(x, kernel):
      return jax.lax.conv_general_dilated(
          x, kernel.astype(dtype), self.strides or (1,) * len(window),
          self.padding, dimension_numbers=dn, precision=self.precision)

    y = self._apply_kernel(op, x, kernel, names, (nd - 2,), (nd - 1,))
    if bias is not None:
      y = y + bias
    return y

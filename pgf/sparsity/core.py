"""The one place where a kernel's N:M mask meets alpha.

Both ways into pgf's recipes call `effective_kernel`: the sparse layers
(`SparseDense`, `SparseDenseGeneral`, `SparseConv`, which read alpha from the
`sparsity` variable collection) and the model-agnostic `Sparsifier`, which
maps it over any model's parameter tree. It computes

  w_eff = w * (m + (1 - m) alpha),   m = nm_mask(w)      (forward)
  dL/dw = dL/dw_eff                                       (straight-through)

so the dense weight receives the gradient of the effective weight unchanged,
pruned entries included (docs/recipes.md section 2). Recipe-specific changes
of that gradient (SR-STE's refill, MdGf 'scaled') are optax transforms
(`pgf.sparsity.transforms`) that act on the raw gradient.

Memory: the mask and w_eff are named (`jax.ad_checkpoint.checkpoint_name`), so
a loss wrapped in `jax.checkpoint(loss, policy=remat_policy())` keeps neither
for the backward pass: both are recomputed from the dense weight there (the
same pure function of the same weights; results agree to float rounding).
Measured on CPU (experiments/bench/memory_cpu_remat.md), XLA still holds one
float32 copy of the sparse kernels at the step's peak against a dense step
under the same wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from pgf.sparsity.masks import NM
from pgf.sparsity.masks import nm_mask

MASK_NAME = 'pgf_nm_mask'
KERNEL_NAME = 'pgf_effective_kernel'


def remat_policy():
  """A `jax.checkpoint` policy that saves every residual except the N:M masks
  and effective kernels, which the backward pass recomputes."""
  return jax.checkpoint_policies.save_anything_except_these_names(
      MASK_NAME, KERNEL_NAME)


@jax.custom_vjp
def straight_through_scale(w: jax.Array, scale: jax.Array) -> jax.Array:
  """w * scale in the forward pass; the gradient reaches `w` unchanged."""
  return w * scale


def _st_fwd(w, scale):
  return w * scale, None


def _st_bwd(_, g):
  return g, None


straight_through_scale.defvjp(_st_fwd, _st_bwd)


def resolve_axes(axis: str, group_axes: Sequence[int | str] | None, *,
                 shape: Sequence[int], names: Sequence[str | None],
                 in_axes: Sequence[int] | None,
                 out_axes: Sequence[int] | None, path: str
                 ) -> tuple[int, ...]:
  """The axes along which a kernel's groups of M run.

  Args:
    axis: 'in' (contraction axes) or 'out' (output axes).
    group_axes: explicit axes (numbers, or logical axis names looked up in
      `names`); overrides `axis`.
    shape: the kernel's shape.
    names: its logical axis names (None where unknown).
    in_axes / out_axes: its contraction / output axes when the layer that
      owns it knows them (pgf's layers do), else None.
    path: the kernel's parameter path, for error messages.

  Returns:
    Sorted axis numbers (contiguity is checked by the mask).
  """
  ndim = len(shape)
  if group_axes is not None:
    out = []
    for a in group_axes:
      if isinstance(a, str):
        if a not in names:
          raise ValueError(
              f'{path}: group axis name {a!r} is not one of the kernel\'s '
              f'logical axis names {tuple(names)}.')
        out.append(list(names).index(a))
      elif -ndim <= a < ndim:
        out.append(a % ndim)
      else:
        raise ValueError(f'{path}: group axis {a} does not exist for a kernel '
                         f'of shape {tuple(shape)}.')
    return tuple(sorted(out))
  known = in_axes if axis == 'in' else out_axes
  if known is not None:
    return tuple(known)
  if ndim == 2:
    # A plain (in, out) matrix, the layout of flax.linen.Dense.
    return (0,) if axis == 'in' else (1,)
  raise ValueError(
      f'{path}: cannot tell the {"contraction" if axis == "in" else "output"} '
      f'axes of a kernel of shape {tuple(shape)}; give the group axes '
      'explicitly (GroupSpec.group_axes, as axis numbers or logical names).')


def effective_kernel(w: jax.Array, nm: NM, axes: Sequence[int], *,
                     alpha: jax.Array | float | None,
                     name: str = 'kernel') -> tuple[jax.Array, jax.Array]:
  """(w_eff, mask): the kernel as the forward pass uses it, and its mask.

  Args:
    w: the dense kernel, any shape.
    nm: its current pattern.
    axes: group axes (see `resolve_axes`).
    alpha: the mask value of pruned weights (a traced scalar); None or 0 for
      the hard mask.
    name: for error messages.

  Returns:
    w_eff of w's shape and dtype (straight-through gradient to w) and the
    boolean N:M mask.
  """
  mask = checkpoint_name(nm_mask(w, nm, axes, name=name), MASK_NAME)
  alpha = jnp.zeros((), w.dtype) if alpha is None else jnp.asarray(
      alpha, w.dtype)
  scale = jnp.where(mask, jnp.ones((), w.dtype), alpha)
  return checkpoint_name(straight_through_scale(w, scale), KERNEL_NAME), mask


def hard_kernel(w: jax.Array, nm: NM, axes: Sequence[int], *,
                name: str = 'kernel') -> jax.Array:
  """The true N:M kernel (pruned weights set to 0), as evaluation and export
  use it; no gradient path is implied."""
  mask = nm_mask(w, nm, axes, name=name)
  return jnp.where(mask, w, jnp.zeros((), w.dtype))

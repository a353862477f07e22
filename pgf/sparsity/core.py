"""The one place where a kernel's N:M mask meets alpha.

Both ways into pgf's recipes compute

  w_eff = w * (m + (1 - m) alpha),   m = nm_mask(w)      (forward)
  dL/dw = dL/dw_eff                                       (straight-through)

so the dense weight receives the gradient of the effective weight unchanged,
pruned entries included (docs/recipes.md section 2). Recipe-specific changes
of that gradient (SR-STE's refill, MdGf 'scaled') are optax transforms
(`pgf.sparsity.transforms`) that act on the raw gradient.

* `sparse_product(op, x, w, ...)`: what pgf's sparse layers (`SparseDense`,
  `SparseDenseGeneral`, `SparseConv`) call. It owns the layer's product, so
  it keeps what a dense layer keeps (x, and the kernel w, a parameter) and
  the mask as bits (`pack_mask`: 1/32 of a float32 kernel), and rebuilds
  w_eff from w and the bits in the backward pass: the sparse step needs
  almost no more memory than the dense one (`python -m pgf.bench.memory`).
* `effective_kernel(w, ...)`: w_eff alone, for the model-agnostic
  `Sparsifier`, which maps it over any model's parameter tree before the
  model runs. The model's own matmuls then keep w_eff for their backward
  pass, one float32 copy of each sparse kernel, as `sparsity.recompute=False`
  does in pgf's layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pgf.sparsity.masks import NM
from pgf.sparsity.masks import nm_mask


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
  alpha = jnp.zeros((), w.dtype) if alpha is None else jnp.asarray(
      alpha, w.dtype)
  mask, scale = _mask_and_scale(w, nm, axes, alpha, name)
  return straight_through_scale(w, scale), mask


def _mask_and_scale(w, nm, axes, alpha, name):
  """The mask and m + (1 - m) alpha, as a select."""
  mask = nm_mask(w, nm, axes, name=name)
  return mask, jnp.where(mask, jnp.ones((), w.dtype), alpha)


def hard_kernel(w: jax.Array, nm: NM, axes: Sequence[int], *,
                name: str = 'kernel') -> jax.Array:
  """The true N:M kernel (pruned weights set to 0), as evaluation and export
  use it; no gradient path is implied."""
  mask = nm_mask(w, nm, axes, name=name)
  return jnp.where(mask, w, jnp.zeros((), w.dtype))


def sparse_product(op: Callable[[jax.Array, jax.Array], jax.Array],
                   x: jax.Array, w: jax.Array, nm: NM, axes: Sequence[int], *,
                   alpha: jax.Array | float | None,
                   name: str = 'kernel') -> jax.Array:
  """op(x, w_eff) that keeps no effective kernel for the backward pass.

  The forward pass is `op(x, effective_kernel(w, ...)[0])`. Its residuals are
  what a dense layer keeps, x and the dense kernel w (which is a parameter,
  alive anyway), and the mask's bits (one per weight), so the step holds no
  effective kernel between the forward and the backward pass. The backward
  pass rebuilds w_eff from w and the bits once its incoming gradient exists
  (`_after`: XLA can neither reuse the forward's copy nor compute every
  layer's at the start of the backward pass), an elementwise pass instead
  of a second mask, then is op's own backward: dx = op's dx at w_eff, dw =
  op's dw_eff (straight-through, as `effective_kernel`). Results are
  bit-equal to keeping w_eff (`sparsity.recompute=False`).

  Args:
    op: the layer's product, (x, kernel) -> y, e.g. a `dot_general` or a
      convolution (casts to the compute dtype belong in it).
    x: the layer input.
    w: the dense kernel.
    nm, axes, alpha, name: as `effective_kernel`.
  """
  alpha = jnp.zeros((), w.dtype) if alpha is None else jnp.asarray(
      alpha, w.dtype)
  return _sparse_product(op, nm, tuple(axes), name, x, w, alpha)


def _after(w: jax.Array, g: jax.Array) -> jax.Array:
  """w, as a value XLA can compute only once `g` exists.

  An optimization barrier where XLA keeps it until scheduling (GPU, TPU).
  XLA:CPU drops barriers before its late common-subexpression passes, which
  would then merge the backward's recomputation with the forward's kernel
  and keep that alive: there, a data dependence does it, w * (1 + 0 g_0),
  which is w bit for bit whenever g_0 is finite (a non-finite cotangent
  makes the step's gradients non-finite anyway).
  """
  def barrier(w, g):
    return jax.lax.optimization_barrier((w, g))[0]

  def tie(w, g):
    g0 = jax.lax.convert_element_type(g.reshape(-1)[0], w.dtype)
    return w * (1 + 0 * g0)

  return jax.lax.platform_dependent(w, g, cpu=tie, default=barrier)


def _weff(w, nm, axes, alpha, name):
  return w * _mask_and_scale(w, nm, axes, alpha, name)[1]


def pack_mask(mask: jax.Array) -> jax.Array:
  """A kernel's bool mask as bits: uint32 [ceil(A / 32), B] for the mask seen
  as [A, B] (B its last axis), bit i of word [a, b] the mask at
  [32 a + i, b]; 1/32 of a float32 kernel's bytes. Packed along the major
  axis, so both directions are elementwise along the contiguous one."""
  b = mask.shape[-1] if mask.ndim else 1
  flat = mask.reshape(-1, b)
  flat = jnp.pad(flat, ((0, -flat.shape[0] % 32), (0, 0)))
  rows = flat.reshape(-1, 32, b).astype(jnp.uint32)
  # A sum of distinct powers of two: the OR. One reduction over the middle
  # axis: 2-3x faster on XLA:CPU than 32 slices shifted and OR-ed, and its
  # result is stored where it is computed (`kernel_and_bits`).
  shift = jnp.arange(32, dtype=jnp.uint32)[None, :, None]
  return jnp.sum(rows << shift, axis=1, dtype=jnp.uint32)


def unpack_mask(bits: jax.Array, shape: Sequence[int]) -> jax.Array:
  """The bool mask of `shape` that `pack_mask` turned into `bits`."""
  shift = jnp.arange(32, dtype=jnp.uint32)[None, :, None]
  flat = ((bits[:, None, :] >> shift) & 1).astype(bool).reshape(
      -1, bits.shape[-1])
  return flat[:int(np.prod(shape)) // bits.shape[-1]].reshape(shape)


def kernel_from_bits(w: jax.Array, bits: jax.Array,
                     alpha: jax.Array) -> jax.Array:
  """w_eff from the packed mask: w * (m + (1 - m) alpha), as `_weff`."""
  mask = unpack_mask(bits, w.shape)
  return w * jnp.where(mask, jnp.ones((), w.dtype), alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _sparse_product(op, nm, axes, name, x, w, alpha):
  # Not before x exists: else XLA may compute every layer's effective kernel
  # at the start of the step and hold them all.
  return op(x, _weff(_after(w, x), nm, axes, alpha, name))


def kernel_and_bits(w: jax.Array, nm: NM, axes: Sequence[int],
                    alpha: jax.Array, *, name: str = 'kernel'
                    ) -> tuple[jax.Array, jax.Array]:
  """(w_eff, the mask's bits), as the forward pass of `sparse_product` makes
  them. The packing is a reduction (XLA stores its result) and w_eff is
  tied to the bits (a factor 1 + 0 * bit, exactly 1), so they are packed
  before the product and the mask's larger intermediates die with the
  layer's forward pass. Packed by an elementwise fusion instead, XLA:CPU
  moved it to the backward pass and kept a word per group of every layer
  until then (7 MiB instead of 0.9 on the test's eight 1024x1024 kernels
  at 1:4)."""
  mask, scale = _mask_and_scale(w, nm, axes, alpha, name)
  bits = pack_mask(mask)
  tie = 1 + 0 * bits[0, 0].astype(w.dtype)
  return w * (scale * tie), bits


def _sp_fwd(op, nm, axes, name, x, w, alpha):
  # The primal's product (the same w_eff), keeping the mask's bits.
  w_eff, bits = kernel_and_bits(_after(w, x), nm, axes, alpha, name=name)
  return op(x, w_eff), (x, w, alpha, bits)


def _sp_bwd(op, nm, axes, name, res, g):
  del nm, axes, name
  x, w, alpha, bits = res
  w = _after(w, g)
  w_eff = kernel_from_bits(w, bits, alpha)
  _, vjp = jax.vjp(op, x, w_eff)
  dx, dw = vjp(g)
  # The optimizer writes the new kernel over the old one (the state is
  # donated); a gradient that comes after every read of the old one lets it
  # do so without first copying each kernel.
  return dx, _after(dw, w_eff), jnp.zeros_like(alpha)


_sparse_product.defvjp(_sp_fwd, _sp_bwd)

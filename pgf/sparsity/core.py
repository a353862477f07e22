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
  On one CPU device its forward pass makes w_eff and the bits in one
  kernel (`kernel_and_bits`).
* `effective_kernel(w, ...)`: w_eff alone, for the model-agnostic
  `Sparsifier`, which maps it over any model's parameter tree before the
  model runs. The model's own matmuls then keep w_eff for their backward
  pass, one float32 copy of each sparse kernel, as `sparsity.recompute=False`
  does in pgf's layers.
* `srste_gradient(g, w, ...)`: SR-STE's refill of one kernel's gradient,
  g + lambda (1 - m) w, which `transforms.srste_refill` applies.

On one CPU device the mask work of all three runs in CPU kernels
(`pgf.sparsity.mask_kernel`) that read each kernel once, where XLA's ops
need a bool mask written and read back; `_fused_applies` says where, and
PGF_MASK_KERNEL switches them with the mask kernel. Their results are the
same bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools

import jax
import jax.numpy as jnp

from pgf.sparsity import masks as masks_lib
from pgf.sparsity.masks import NM
from pgf.sparsity.masks import check_groupable
from pgf.sparsity.masks import group_view
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

  Where `kernel_and_bits` takes its CPU kernel, w_eff comes from it (one
  pass; its bits are dropped) and the mask is computed only if the caller
  uses it (XLA drops unused results). Either way w_eff is the same.
  """
  alpha = jnp.zeros((), w.dtype) if alpha is None else jnp.asarray(
      alpha, w.dtype)
  mask = nm_mask(w, nm, axes, name=name)
  if _fused_pack(w, nm, check_groupable(w.shape, nm, axes, name=name)):
    w_eff, _ = kernel_and_bits(jax.lax.stop_gradient(w), nm, axes,
                               jax.lax.stop_gradient(alpha), name=name)
    return _straight_through(w, w_eff), mask
  return _straight_through(w, _masked(w, mask, alpha)), mask


@jax.custom_jvp
def _straight_through(w: jax.Array, w_eff: jax.Array) -> jax.Array:
  """w_eff, with the tangent (and so the gradient) of w."""
  del w
  return w_eff


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
  return primals[1], tangents[0]


def _masked(w: jax.Array, mask: jax.Array, alpha: jax.Array) -> jax.Array:
  """w * (m + (1 - m) alpha), kept weights passed through as they are: XLA:CPU
  runs with denormals flushed to zero, and where it does multiply kept
  weights by 1 (AVX2 code, e.g. --xla_cpu_max_isa=AVX2) a denormal weight
  would become 0, unlike the CPU kernels' result."""
  return jnp.where(mask, w, w * alpha)


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
  makes the step's gradients non-finite anyway) and w is not denormal:
  XLA:CPU flushes denormals to zero, so with AVX2 code (where it does
  multiply) a denormal weight reaches XLA's route of `sparse_product` as 0.
  (A select of w on g_0 != g_0 keeps denormals too, but changed XLA:CPU's
  code for the step: the default run's loss moved from 0.1923 to 0.1694,
  2026-12-07; kept as it was.)
  """
  def barrier(w, g):
    return jax.lax.optimization_barrier((w, g))[0]

  def tie(w, g):
    # One element by index, not of g.reshape(-1): flattening a sharded g
    # would gather all of it onto every device.
    g0 = jax.lax.convert_element_type(g[(0,) * g.ndim], w.dtype)
    return w * (1 + 0 * g0)

  return jax.lax.platform_dependent(w, g, cpu=tie, default=barrier)


def _weff(w, nm, axes, alpha, name):
  return _masked(w, nm_mask(w, nm, axes, name=name), alpha)


def _pack_axis(shape: Sequence[int]) -> int:
  """The axis `pack_mask` packs: the first, unless only the last is a
  multiple of 32 (attention output kernels [heads, head_dim, embed],
  convolutions [h, w, in, out])."""
  if len(shape) > 1 and shape[0] % 32 and not shape[-1] % 32:
    return len(shape) - 1
  return 0


def pack_mask(mask: jax.Array) -> jax.Array:
  """A kernel's bool mask as bits, uint32, 1/32 of a float32 kernel's bytes.

  Packed along one axis (`_pack_axis`), 32 entries to a word, bit i of word
  j the mask at index 32 j + i of that axis (zero-padded to a multiple of
  32); every other axis is kept. So the bits of a sharded kernel are sharded
  like it, and packing and unpacking need no data from other devices (a
  flattened kernel would have to be gathered where a minor axis is sharded,
  e.g. the heads of a [embed, heads, head_dim] kernel).
  """
  mask = mask.reshape(mask.shape or (1,))
  axis = _pack_axis(mask.shape)
  pad = [(0, 0)] * mask.ndim
  pad[axis] = (0, -mask.shape[axis] % 32)
  padded = jnp.pad(mask, pad)
  shape = list(padded.shape)
  shape[axis:axis + 1] = [shape[axis] // 32, 32]
  words = padded.reshape(shape).astype(jnp.uint32)
  # A sum of distinct powers of two: the OR. One reduction over the 32-axis:
  # 2-3x faster on XLA:CPU than 32 slices shifted and OR-ed.
  return jnp.sum(words << _shifts(len(shape), axis + 1), axis=axis + 1,
                 dtype=jnp.uint32)


def _shifts(ndim: int, axis: int) -> jax.Array:
  shape = [1] * ndim
  shape[axis] = 32
  return jnp.arange(32, dtype=jnp.uint32).reshape(shape)


def unpack_mask(bits: jax.Array, shape: Sequence[int]) -> jax.Array:
  """The bool mask of `shape` that `pack_mask` turned into `bits`."""
  full = tuple(shape) or (1,)
  axis = _pack_axis(full)
  words = jnp.expand_dims(bits, axis + 1)
  flags = ((words >> _shifts(words.ndim, axis + 1)) & 1).astype(bool)
  wide = list(bits.shape)
  wide[axis] *= 32
  flags = flags.reshape(wide)
  return jax.lax.slice_in_dim(flags, 0, full[axis], axis=axis).reshape(
      tuple(shape))


def kernel_from_bits(w: jax.Array, bits: jax.Array,
                     alpha: jax.Array) -> jax.Array:
  """w_eff from the packed mask: w * (m + (1 - m) alpha), as `_weff`."""
  return _masked(w, unpack_mask(bits, w.shape), alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _sparse_product(op, nm, axes, name, x, w, alpha):
  # Not before x exists: else XLA may compute every layer's effective kernel
  # at the start of the step and hold them all.
  return op(x, _weff(_after(w, x), nm, axes, alpha, name))


def kernel_and_bits(w: jax.Array, nm: NM, axes: Sequence[int],
                    alpha: jax.Array, *, name: str = 'kernel',
                    after: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """(w_eff, the mask's bits), as the forward pass of `sparse_product` makes
  them (not differentiable; `sparse_product` owns the gradient).

  On a process with one CPU device, float32 kernels with groups along a
  major axis take one CPU kernel (`mask_kernel.kernel_and_bits`, chosen by
  `_fused_pack`): it reads each group once and writes w_eff and the packed
  bits, where XLA's route writes a bool mask, packs it, and reads the
  kernel again for w_eff. Both routes give the same arrays bit for bit.

  On XLA's route w_eff is built from the bits (`kernel_from_bits`), as the
  backward pass rebuilds it, so the bits are packed before the product and
  the mask's larger intermediates die with the layer's forward pass. Packed
  beside w_eff instead (an elementwise fusion), XLA:CPU moved the packing to
  the backward pass and kept a word per group of every layer until then (7
  MiB instead of 0.9 on the test's eight 1024x1024 kernels at 1:4). The
  dependence is elementwise, so a sharded kernel needs no data from other
  devices for it.

  Args:
    w, nm, axes, alpha, name: as `effective_kernel` (alpha a scalar).
    after: an array the result must wait for (`_after`), or None.
  """
  alpha = jnp.asarray(alpha, w.dtype)
  axes = check_groupable(w.shape, nm, axes, name=name)
  pack = _fused_pack(w, nm, axes)

  def xla(w, alpha, after):
    if after is not None:
      w = _after(w, after)
    bits = pack_mask(nm_mask(w, nm, axes, name=name, impl='xla'
                             if pack else None))
    return kernel_from_bits(w, bits, alpha), bits

  if pack is None:
    return xla(w, alpha, after)

  from pgf.sparsity import mask_kernel  # numba: imported on first use.

  def cpu(w, alpha, after):
    dep = after[(0,) * after.ndim] if after is not None else alpha
    g = w.reshape(group_view(w.shape, nm.m, axes))
    w_eff, bits = mask_kernel.kernel_and_bits(g, nm.n, alpha, dep, pack)
    return w_eff.reshape(w.shape), bits.reshape(_bits_shape(w.shape))

  return jax.lax.platform_dependent(w, alpha, after, cpu=cpu, default=xla)


# K = min(N, M - N) up to which 'auto' takes the fused CPU kernels. Over
# T5-Base's 72 FF kernels (`python experiments/bench/ff_passes.py
# --pattern=P`, PGF_MASK_KERNEL=kernel against =xla, min of 5, float32,
# 2-core Xeon, 2026-12-07), w_eff and bits took 63 instead of XLA's route's
# 74 ms at 16:32 and 99 / 123 ms at 32:64 (0.55-0.85x at K <= 8, measured
# earlier); SR-STE's refill took 90 / 81 ms at 16:32 and 104 / 97 at 32:64,
# so it stays with XLA past K = 8.
_FUSED_MAX_K = 32
_REFILL_MAX_K = 8


def _fused_pack(w: jax.Array, nm: NM, axes: tuple[int, ...]) -> str | None:
  """How the fused CPU kernel packs w's bits ('rows': along the kernel's
  first axis, when that is the only group axis; 'cols': along its last
  axis, outside the group axes), or None where XLA's route runs: where
  `_fused_applies` says no, and for shapes whose bits the kernel cannot
  lay out (`mask_kernel.fused_applies`)."""
  if not _fused_applies(w, nm, axes, _FUSED_MAX_K):
    return None
  shape = group_view(w.shape, nm.m, axes)
  axis = _pack_axis(w.shape)
  if axis == 0 and axes == (0,):
    pack = 'rows'
  elif axis == w.ndim - 1 and axes[-1] < w.ndim - 1:
    pack = 'cols'
  else:
    return None
  from pgf.sparsity import mask_kernel  # numba: imported on first use.
  return pack if mask_kernel.fused_applies(shape, nm.m, pack) else None


def srste_gradient(g: jax.Array, w: jax.Array, nm: NM, axes: Sequence[int],
                   lam: jax.Array | float, *, name: str = 'kernel',
                   after: jax.Array | None = None) -> jax.Array:
  """SR-STE's gradient of a kernel: g + lam * (1 - m) * w, m = w's N:M mask
  (Zhou et al. 2021; `transforms.srste_refill` applies it).

  On a process with one CPU device, float32 kernels with groups along a
  major axis and K = min(N, M - N) up to _REFILL_MAX_K take one CPU kernel
  (`mask_kernel.refill`): it reads each group of w once and g once and
  writes the result, where XLA's route writes a bool mask and reads it back
  beside g and w. Both give the same array bit for bit. Where N <= M - N
  the kernel writes over g's buffer; `after` (a scalar the kernel waits
  for, such as a norm of the raw gradients) lets XLA do so without copying
  g for that other reader (`mask_kernel.refill`).
  """
  lam = jnp.asarray(lam, g.dtype)
  axes = check_groupable(w.shape, nm, axes, name=name)
  fused = (g.dtype == jnp.float32
           and _fused_applies(w, nm, axes, _REFILL_MAX_K)
           and g.shape == w.shape)

  def xla(g, w, lam):
    mask = nm_mask(w, nm, axes, name=name, impl='xla' if fused else None)
    return g + jnp.where(mask, jnp.zeros((), g.dtype),
                         lam * w.astype(g.dtype))

  if not fused:
    return xla(g, w, lam)

  from pgf.sparsity import mask_kernel  # numba: imported on first use.

  def cpu(g, w, lam):
    view = group_view(w.shape, nm.m, axes)
    return mask_kernel.refill(g, w.reshape(view), nm.n, lam,
                              0.0 if after is None else after)

  return jax.lax.platform_dependent(g, w, lam, cpu=cpu, default=xla)


def _fused_applies(w: jax.Array, nm: NM, axes: tuple[int, ...],
                   max_k: int) -> bool:
  """Whether the CPU kernels of `kernel_and_bits` or `srste_gradient` can
  and, under 'auto', should take w: one CPU device (unless 'kernel'),
  float32, groups along a major axis, 1 <= K <= max_k under 'auto' (up to
  the kernel's limit under 'kernel'); never under 'xla'."""
  impl = masks_lib.implementation(None)
  shape = group_view(w.shape, nm.m, axes)
  if (nm.n == nm.m or w.dtype != jnp.float32
      or not masks_lib.kernel_possible(shape, w.dtype, nm.n, impl)):
    return False
  return impl == 'kernel' or min(nm.n, nm.m - nm.n) <= max_k


def _bits_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """The shape of `pack_mask`'s bits for a kernel of `shape`."""
  full = list(shape) or [1]
  axis = _pack_axis(full)
  full[axis] = -(-full[axis] // 32)
  return tuple(full)


def _sp_fwd(op, nm, axes, name, x, w, alpha):
  # The primal's product (the same w_eff), keeping the mask's bits.
  w_eff, bits = kernel_and_bits(w, nm, axes, alpha, name=name, after=x)
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

"""Optax transforms for the recipes' gradient changes (method.md section 2).

Both read two extra arguments of `update` (optax's GradientTransformation-
ExtraArgs protocol, so they chain with clipping and AdamW):

  masks:    the `sparse_masks` collection sown by the sparse layers: a tree
            mirroring params with a boolean mask at each sparse kernel.
  sparsity: the `sparsity` collection (`layer_collection`): per sparse layer
            {'alpha', 'grad_scale', 'srste_lambda'}.

Parameters that are not sparse kernels pass through unchanged. Place both
first in the chain so they act on the raw gradient, before clipping and the
optimizer (SR-STE's term is not decoupled weight decay).
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import optax


def _map_sparse(fn: Callable, updates, params, masks, sparsity):
  """Applies fn(g, w, mask, layer_values) at every sparse kernel."""
  flat_masks = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(masks or {}), sep='/')
  flat_vals = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(sparsity or {}), sep='/')
  # A sparse kernel is one with a sown mask. Its layer's schedule values
  # hold only what its recipe uses (`needed_values`): a missing value means
  # the transform has nothing to do for that layer.

  def one(path, g, w):
    key = '/'.join(str(getattr(k, 'key', k)) for k in path)
    if key not in flat_masks:
      return g
    layer = key.rsplit('/', 1)[0]
    vals = {name: flat_vals[f'{layer}/{name}']
            for name in ('alpha', 'grad_scale', 'srste_lambda')
            if f'{layer}/{name}' in flat_vals}
    return fn(g, w, flat_masks[key], vals)

  return jax.tree_util.tree_map_with_path(one, updates, params)


def decaying_mask_flow() -> optax.GradientTransformationExtraArgs:
  """Scales the gradient of pruned weights by the group's `grad_scale`.

  For MdGf with mdgf_grad='scaled' this is alpha (the gradient autodiff of
  w * (m + (1 - m) alpha) gives); otherwise grad_scale is 1 and the gradient
  is straight-through, as in the authors' released code.
  """

  def update_fn(updates, state, params=None, *, masks=None, sparsity=None,
                **_):
    def fn(g, w, mask, vals):
      del w
      if 'grad_scale' not in vals:
        return g
      scale = vals['grad_scale'].astype(g.dtype)
      return jnp.where(mask, g, g * scale)
    if params is None:
      raise ValueError('decaying_mask_flow needs params in update().')
    return _map_sparse(fn, updates, params, masks, sparsity), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def srste_refill() -> optax.GradientTransformationExtraArgs:
  """Adds SR-STE's refill term lambda * (1 - m) * w to the raw gradient."""

  def update_fn(updates, state, params=None, *, masks=None, sparsity=None,
                **_):
    def fn(g, w, mask, vals):
      if 'srste_lambda' not in vals:
        return g
      lam = vals['srste_lambda'].astype(g.dtype)
      return g + jnp.where(mask, jnp.zeros((), g.dtype),
                           lam * w.astype(g.dtype))
    if params is None:
      raise ValueError('srste_refill needs params in update().')
    return _map_sparse(fn, updates, params, masks, sparsity), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def sparse_gradients() -> optax.GradientTransformationExtraArgs:
  """Both recipe transforms, in order: the decaying-mask flow, then SR-STE."""
  return optax.chain(decaying_mask_flow(), srste_refill())

"""Optax transforms for the recipes' gradient changes (docs/recipes.md
section 2).

Each is built from a `pgf.sparsity.Sparsifier` (which kernels, which groups,
the schedule) and takes the step as an extra argument of `update` (optax's
GradientTransformationExtraArgs protocol, so they chain with clipping and
AdamW):

  tx = optax.chain(sparsifier.gradient_transform(), optax.adamw(lr))
  updates, opt_state = tx.update(grads, opt_state, params, step=step)

`plan=` (the static SparsityPlan of the step) may be passed too; without it
the plan is chosen inside the computation (`Sparsifier.switch`). `after=`,
a scalar computed from the raw gradients (the step passes its gradient
norm), is waited for by SR-STE's CPU kernel, which then writes over the
gradient's buffer without XLA copying it for that reader. The masks
they need are recomputed from `params` (the same pure function of the same
weights the forward pass used), so no mask is carried from the forward pass
to the optimizer. Parameters that are not sparse kernels pass through
unchanged. Place them first in the chain so they act on the raw gradient,
before clipping and the optimizer (SR-STE's term is not decoupled weight
decay).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from pgf.sparsity import core
from pgf.sparsity import trees
from pgf.sparsity.masks import nm_mask


def _transform(sparsifier, uses: Callable, fn: Callable, name: str
               ) -> optax.GradientTransformationExtraArgs:
  """A stateless transform applying fn(g, w, rule, axes, path, group
  values, after) at every sparse kernel whose group `uses(group_spec)`."""
  groups = {g.name for g in sparsifier.schedule.sparse_groups if uses(g)}

  def update_fn(updates, state, params=None, *, step=None, plan=None,
                after=None, **_):
    if not groups:
      return updates, state
    if params is None or step is None:
      raise ValueError(f'{name} needs params and step= in update().')
    values = sparsifier.schedule.values(step)

    def with_plan(p, updates, params):
      flat_u = trees.flatten(updates)
      flat_w = trees.flatten(params)
      for path, (rule, axes) in sparsifier.matched(p).items():
        if rule.group in groups:
          flat_u[path] = fn(flat_u[path], flat_w[path], rule, axes, path,
                            values[rule.group], after)
      return trees.unflatten(flat_u)

    if plan is not None:
      out = with_plan(plan, updates, params)
    else:
      out = sparsifier.switch(step, with_plan, updates, params)
    # Keep the container type of the updates (FrozenDict or dict).
    return jax.tree.unflatten(jax.tree.structure(updates),
                              jax.tree.leaves(out)), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def decaying_mask_flow(sparsifier) -> optax.GradientTransformationExtraArgs:
  """MdGf 'scaled': the gradient of pruned weights times alpha (what
  autodiff of w * (m + (1 - m) alpha) gives). Groups with the default
  'straight_through' (the authors' released code) are left alone."""

  def fn(g, w, rule, axes, path, vals, after):
    del after
    mask = nm_mask(w, rule.nm, axes, name=path)
    return jnp.where(mask, g, g * vals['grad_scale'].astype(g.dtype))

  return _transform(sparsifier, lambda g: g.scales_gradient, fn,
                    'decaying_mask_flow')


def srste_refill(sparsifier) -> optax.GradientTransformationExtraArgs:
  """SR-STE: adds lambda * (1 - m) * w to the raw gradient (Zhou et al.
  2021), lambda from the schedule (0 outside the sparse phase)."""

  def fn(g, w, rule, axes, path, vals, after):
    return core.srste_gradient(g, w, rule.nm, axes, vals['srste_lambda'],
                               name=path, after=after)

  return _transform(sparsifier, lambda g: g.recipe_def.refill, fn,
                    'srste_refill')


def recipe_gradients(sparsifier) -> optax.GradientTransformationExtraArgs:
  """Both transforms, in order: the decaying-mask flow, then SR-STE. A
  transform no group needs does nothing (no mask is computed for it)."""
  return optax.chain(decaying_mask_flow(sparsifier), srste_refill(sparsifier))

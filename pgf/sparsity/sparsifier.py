"""pgf's recipes on any model's parameters, and the facts about kernels.

A `Sparsifier` holds a `SparsitySchedule` and the *sites* it acts on: the
kernels (parameter paths, shapes, logical axis names, group axes) that its
groups' regexes select. It is the model-agnostic way in:

  sparsifier = sp.Sparsifier.create(params, groups, total_steps=10_000)
  tx = optax.chain(sparsifier.gradient_transform(), optax.adamw(1e-3))

  def loss_fn(params, batch, step):
    return loss(model.apply({'params': sparsifier.apply(params, step)},
                            batch))
  grads = jax.grad(loss_fn)(params, batch, step)
  updates, opt_state = tx.update(grads, opt_state, params, step=step)

and the engine behind pgf's own layers: the train loop builds one from its
model's boxed parameters (`kernel_sites`) for placement and sharding checks,
the optax transforms, sparsity statistics, hard-mask evaluation and export.
Both ways in compute the same effective kernel (`core.effective_kernel`
here; `core.sparse_product` in pgf's layers, which recomputes it in the
backward pass instead of keeping it), so a model written with pgf's
`SparseDense` and the same model written with `flax.linen.Dense` plus a
Sparsifier get equal gradients. Memory differs: the stock model's matmuls
keep the effective kernels for their backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgf.sparsity import core
from pgf.sparsity import transforms
from pgf.sparsity.layers import SparseKernel
from pgf.sparsity.masks import NM
from pgf.sparsity.masks import check_groupable
from pgf.sparsity.masks import nm_mask
from pgf.sparsity.schedules import GroupSpec
from pgf.sparsity.schedules import LayerRule
from pgf.sparsity.schedules import SparsityPlan
from pgf.sparsity.schedules import SparsitySchedule
from pgf.sparsity.trees import flatten
from pgf.sparsity.trees import unflatten


@dataclasses.dataclass(frozen=True)
class KernelSite:
  """One kernel that a sparsity rule may select.

  Attributes:
    path: '/'-joined parameter path, e.g. 'encoder/layers_0/mlp/wi/kernel'.
    shape: its shape.
    names: its logical axis names (None where the model gives none).
    in_axes / out_axes: its contraction / output axes when known (pgf's
      layers record them); None for other models' kernels.
  """

  path: str
  shape: tuple[int, ...]
  names: tuple[str | None, ...]
  in_axes: tuple[int, ...] | None = None
  out_axes: tuple[int, ...] | None = None

  @property
  def layer(self) -> str:
    """The module path (the parameter path without its last name)."""
    return self.path.rsplit('/', 1)[0]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def axes(self, rule: LayerRule) -> tuple[int, ...]:
    """The group axes of this kernel under `rule`."""
    return core.resolve_axes(rule.axis, rule.group_axes, shape=self.shape,
                             names=self.names, in_axes=self.in_axes,
                             out_axes=self.out_axes, path=self.path)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _site(path: str, leaf) -> KernelSite:
  value = leaf.value if _is_box(leaf) else leaf
  shape = tuple(value.shape)
  names = tuple(leaf.names) if _is_box(leaf) else (None,) * len(shape)
  if isinstance(leaf, SparseKernel):
    return KernelSite(path, shape, names, leaf.in_axes, leaf.out_axes)
  return KernelSite(path, shape, names)


def kernel_sites(boxed_params: Mapping) -> dict[str, KernelSite]:
  """Every sparse-capable kernel of a pgf model (its `SparseKernel` boxes in
  the params of `jax.eval_shape(model.init, ...)`)."""
  return {p: _site(p, x) for p, x in flatten(boxed_params).items()
          if isinstance(x, SparseKernel)}


def param_sites(params: Mapping, patterns: Sequence[str]
                ) -> dict[str, KernelSite]:
  """The leaves of any parameter tree whose path one of `patterns` (regexes)
  is found in; logical names come from `nn.Partitioned` boxes if present."""
  return {p: _site(p, x) for p, x in flatten(params).items()
          if any(re.search(pat, p) for pat in patterns)}


def _pack(mask: jax.Array) -> jax.Array:
  """bool mask -> uint8 bits (1/8 of the bool's bytes)."""
  return jnp.packbits(mask.reshape(-1))


class Sparsifier:
  """A schedule and the kernels it acts on (see the module docstring)."""

  def __init__(self, schedule: SparsitySchedule,
               sites: Mapping[str, KernelSite]):
    self.schedule = schedule
    self.sites = dict(sites)
    self.check_placement()

  @classmethod
  def create(cls, params: Mapping, groups: Sequence[GroupSpec], *,
             total_steps: int, dense_steps: int = 0,
             fine_tune_steps: int = 0) -> Sparsifier:
    """For any parameter tree (plain arrays, or boxed with logical names).

    Args:
      params: the model's parameters (or their `jax.eval_shape`).
      groups: which kernels (GroupSpec.layers regexes on parameter paths),
        with which pattern, recipe and group axes.
      total_steps, dense_steps, fine_tune_steps: the run's phases, in steps.
    """
    schedule = SparsitySchedule(tuple(groups), total_steps=total_steps,
                                dense_steps=dense_steps,
                                fine_tune_steps=fine_tune_steps)
    patterns = [g.layers for g in schedule.sparse_groups]
    return cls(schedule, param_sites(params, patterns))

  # -- static facts ---------------------------------------------------------

  def matched(self, plan: SparsityPlan
              ) -> dict[str, tuple[LayerRule, tuple[int, ...]]]:
    """path -> (rule, group axes) of every kernel `plan` makes sparse."""
    out = {}
    for path, site in self.sites.items():
      rule = plan.lookup(path)
      if rule is not None:
        out[path] = (rule, site.axes(rule))
    return out

  def sparse_sites(self) -> dict[str, str]:
    """path -> group of every kernel sparse under the final plan."""
    return {p: r.group for p, (r, _) in
            self.matched(self.schedule.final_plan()).items()}

  def check_placement(self) -> None:
    """Every rule selects a kernel; no kernel is selected twice; every
    pattern divides its group length (the authors' code lets groups straddle
    rows; pgf refuses, naming the kernel, its shape and M)."""
    plans = self.schedule.distinct_plans() + (self.schedule.final_plan(),)
    examples = sorted(self.sites)[:4]
    for plan in plans:
      for path in self.sites:
        hits = [r.group for r in plan.rules if re.search(r.layers, path)]
        if len(hits) > 1:
          raise ValueError(
              f'{path} is selected by several sparsity groups {hits}; make '
              'their sparsity.<group>.layers regexes disjoint.')
      for rule in plan.rules:
        if not any(plan.lookup(p) == rule for p in self.sites):
          raise ValueError(
              f'sparsity.{rule.group}.layers={rule.layers!r} matches no '
              f'sparse-capable kernel of this model; kernels are e.g. '
              f'{examples}.')
      for path, (rule, axes) in self.matched(plan).items():
        check_groupable(self.sites[path].shape, rule.nm, axes,
                        name=f'{path} (sparsity.{rule.group}, {rule.nm})')

  def check_sharding(self, mesh_shape: Mapping[str, int],
                     rules: Sequence[tuple[str, Any]]) -> None:
    """Each shard of a sparse kernel must hold whole groups of M.

    The mesh axes of a kernel come from Flax's own resolution of its logical
    names under `rules` (`nn.logical_to_mesh_axes`), which picks, for a name
    with several candidate mesh axes, the first one not already used. The
    groups run over the flattened group axes; sharding the innermost sharded
    group axis by s leaves contiguous blocks of (size / s) * (product of the
    inner axes), which must be divisible by M.
    """
    for plan in self.schedule.distinct_plans():
      for path, (rule, axes) in self.matched(plan).items():
        site = self.sites[path]
        spec = mesh_axes(site.names, rules)
        block = None
        for a in reversed(axes):
          shards = _shards(spec[a], mesh_shape)
          if shards > 1:
            inner = int(np.prod([site.shape[b] for b in axes if b > a]))
            block = site.shape[a] // shards * inner
            break
        if block is not None and block % rule.nm.m:
          raise ValueError(
              f'{path} {site.shape}: sharding over the mesh '
              f'({dict(mesh_shape)}) leaves blocks of {block} weights along '
              f'the N:M group axes, not a multiple of M={rule.nm.m} '
              f'(sparsity.{rule.group}); change mesh.model or mesh.rules.')

  def export_patterns(self, plan: SparsityPlan | None = None
                      ) -> dict[str, tuple[NM, tuple[int, ...]]]:
    """path -> (pattern, group axes), the input of `verify_nm`."""
    plan = self.schedule.final_plan() if plan is None else plan
    return {p: (r.nm, axes) for p, (r, axes) in self.matched(plan).items()}

  # -- functions of the weights ----------------------------------------------

  def masks(self, params: Mapping, plan: SparsityPlan) -> dict[str, jax.Array]:
    """path -> boolean N:M mask of the kernel under `plan`."""
    flat = flatten(params)
    return {p: nm_mask(flat[p], r.nm, axes, name=p)
            for p, (r, axes) in self.matched(plan).items()}

  def hard_masked(self, params: Mapping,
                  plan: SparsityPlan | None = None) -> dict:
    """Params with every sparse kernel replaced by its hard N:M version (the
    final plan by default): the true N:M model of evaluation and export."""
    plan = self.schedule.final_plan() if plan is None else plan
    flat = flatten(params)
    for p, (r, axes) in self.matched(plan).items():
      flat[p] = core.hard_kernel(flat[p], r.nm, axes, name=p)
    return unflatten(flat)

  def apply(self, params: Mapping, step, *, plan: SparsityPlan | None = None,
            train: bool = True) -> dict:
    """The effective parameters at `step`: every selected kernel becomes
    w * (m + (1 - m) alpha) with a straight-through gradient to w.

    Args:
      params: unboxed parameters.
      step: the training step (traced or an int).
      plan: the static plan at `step` (`self.schedule.plan(step)`); when None,
        the plan is chosen inside the computation (`jax.lax.switch` over the
        run's SdGf frames), so a traced step needs nothing else.
      train: False gives the hard mask of the current pattern (evaluation).
    """
    values = self.schedule.values(step, train=train)

    def with_plan(p: SparsityPlan, params):
      flat = flatten(params)
      for path, (r, axes) in self.matched(p).items():
        flat[path], _ = core.effective_kernel(
            flat[path], r.nm, axes, alpha=values[r.group]['alpha'], name=path)
      return unflatten(flat)

    if plan is not None:
      return with_plan(plan, params)
    return self.switch(step, with_plan, params, train=train)

  def switch(self, step, fn, *args, train: bool = True):
    """fn(plan, *args) with the plan of a traced `step`: one branch per plan
    of the run (`jax.lax.switch`), so it compiles once for the whole run.
    With train=False the evaluation plan (`schedule.eval_plan`) is used."""
    starts, plans = self.plan_segments(train=train)
    branches = [lambda *a, p=p: fn(p, *a) for p in plans]
    if len(branches) == 1 or not isinstance(step, jax.Array):
      if not isinstance(step, jax.Array):
        idx = int(np.searchsorted(starts, int(step), side='right')) - 1
        return branches[max(idx, 0)](*args)
      return branches[0](*args)
    idx = jnp.searchsorted(jnp.asarray(starts), step, side='right') - 1
    return jax.lax.switch(jnp.clip(idx, 0, len(branches) - 1), branches,
                          *args)

  def plan_segments(self, *, train: bool = True
                    ) -> tuple[tuple[int, ...], tuple[SparsityPlan, ...]]:
    """(first step, plan) of every stretch of the run with one plan."""
    s = self.schedule
    get = s.plan if train else s.eval_plan
    starts, plans = [], []
    for step in s.plan_boundaries():
      p = get(step)
      if not plans or p != plans[-1]:
        starts.append(step)
        plans.append(p)
    return tuple(starts), tuple(plans)

  # -- statistics -------------------------------------------------------------

  def initial_log_masks(self) -> dict:
    """Packed all-True masks of every kernel sparse under the final plan (the
    'previous' masks of the first mask-change measurement)."""
    return unflatten({p: _pack(jnp.ones(self.sites[p].shape, bool))
                      for p in self.sparse_sites()})

  def log_mask_shapes(self) -> dict:
    return unflatten({
        p: jax.ShapeDtypeStruct(((self.sites[p].size + 7) // 8,), jnp.uint8)
        for p in self.sparse_sites()})

  def stats(self, params: Mapping, *, step, plan: SparsityPlan,
            prev_masks: Mapping | None = None
            ) -> tuple[dict[str, jax.Array], dict, dict[str, jax.Array]]:
    """Sparsity metrics of `params` trained under `plan` at `step`.

    Returns:
      (group metrics, new packed masks, per-kernel mask change), where the
      group metrics are, per group of the final plan:
        sparsity/<g>/density       fraction of non-zero effective weights
                                   (1 while MdGf's alpha > 0: a soft mask)
        sparsity/<g>/mask_density  fraction of weights the hard N:M mask keeps
                                   (N/M; 1 during the dense warm-up)
        sparsity/<g>/mask_change   fraction of mask entries that changed since
                                   `prev_masks` (all True before the first)
      and the per-kernel change is path -> fraction (the authors' 'sparse
      architecture divergence' per layer).
    """
    values = self.schedule.values(step)
    flat = flatten(params)
    prev = flatten(prev_masks) if prev_masks is not None else {}
    matched = self.matched(plan)
    sums: dict[str, list] = {}
    new, changes = {}, {}
    for path, group in self.sparse_sites().items():
      w = flat[path]
      if path in matched:
        rule, axes = matched[path]
        m = nm_mask(w, rule.nm, axes, name=path)
      else:  # Dense warm-up: no mask yet.
        m = jnp.ones(w.shape, bool)
      alpha = values[group]['alpha']
      nonzero = jnp.where(m, w != 0, (w != 0) & (alpha != 0))
      packed = _pack(m)
      old = prev.get(path, _pack(jnp.ones(w.shape, bool)))
      changed = jax.lax.population_count(packed ^ old).astype(
          jnp.int32).sum()
      acc = sums.setdefault(group, [0, 0, 0, 0])
      acc[0] = acc[0] + nonzero.sum()
      acc[1] = acc[1] + m.sum()
      acc[2] = acc[2] + changed
      acc[3] += w.size
      changes[path] = changed / w.size
      new[path] = packed
    out = {}
    for group, (nz, kept, changed, size) in sums.items():
      out[f'sparsity/{group}/density'] = nz / size
      out[f'sparsity/{group}/mask_density'] = kept / size
      out[f'sparsity/{group}/mask_change'] = changed / size
    return out, unflatten(new), changes

  def step_metrics(self, values: Mapping[str, Mapping[str, jax.Array]]
                   ) -> dict[str, jax.Array]:
    """sparsity/<group>/alpha of every group, from `schedule.values(step)`
    (a training step's metric: logs show its mean since the last log)."""
    return {f'sparsity/{g}/alpha': v['alpha'] for g, v in values.items()}

  def pattern_metrics(self, plan: SparsityPlan) -> dict[str, int]:
    """sparsity/<group>/n and /m of the current plan (host side)."""
    out = {}
    for rule in plan.rules:
      out[f'sparsity/{rule.group}/n'] = rule.nm.n
      out[f'sparsity/{rule.group}/m'] = rule.nm.m
    return out

  # -- optimizer ---------------------------------------------------------------

  def gradient_transform(self):
    """The recipes' gradient changes as one optax transform (SR-STE refill,
    MdGf 'scaled'); `update(..., step=, plan=None)`. Place it first in the
    chain, on the raw gradient."""
    return transforms.recipe_gradients(self)


def mesh_axes(names: Sequence[str | None],
              rules: Sequence[tuple[str, Any]]) -> tuple:
  """Mesh axis (or None, or a tuple of axes) per dimension of an array with
  logical axis `names`, resolved by Flax itself."""
  if all(n is None for n in names):
    return (None,) * len(names)
  spec = nn.logical_to_mesh_axes(tuple(names), tuple(rules))
  return tuple(spec) + (None,) * (len(names) - len(spec))


def _shards(axis, mesh_shape: Mapping[str, int]) -> int:
  if axis is None:
    return 1
  axes = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh_shape.get(a, 1) for a in axes]))

"""Static facts about a model's kernels, read from its boxed abstract params.

`jax.eval_shape(model.init, ...)` returns params boxed with logical axis
names; sparse-capable kernels are `SparseKernel` boxes that also carry their
contraction/output axes. From those, without running the model, pgf checks
placement and sharding at startup, measures sparsity and exports N:M weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pgf.sparsity.layers import SparseKernel
from pgf.sparsity.masks import NM
from pgf.sparsity.masks import check_groupable
from pgf.sparsity.masks import nm_mask
from pgf.sparsity.schedules import LayerRule
from pgf.sparsity.schedules import SparsityPlan


@dataclasses.dataclass(frozen=True)
class KernelInfo:
  """One sparse-capable kernel: where it is and how its groups run."""

  layer: str                       # '/'-joined module path
  shape: tuple[int, ...]
  names: tuple[str | None, ...]    # logical axis names
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]

  def group_axes(self, axis: str) -> tuple[int, ...]:
    return self.in_axes if axis == 'in' else self.out_axes


def kernel_infos(boxed_params: Mapping) -> dict[str, KernelInfo]:
  """layer path -> KernelInfo for every SparseKernel in boxed params."""
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(boxed_params), sep='/',
      is_leaf=lambda _, x: isinstance(x, flax.linen.Partitioned))
  out = {}
  for key, box in flat.items():
    if isinstance(box, SparseKernel):
      layer = key.rsplit('/', 1)[0]
      out[layer] = KernelInfo(
          layer=layer, shape=tuple(box.value.shape), names=tuple(box.names),
          in_axes=box.in_axes, out_axes=box.out_axes)
  return out


def kernel_layer_paths(params: Mapping) -> tuple[str, ...]:
  """'/'-joined module paths of every layer that owns a 'kernel' param."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return tuple(sorted(k.rsplit('/', 1)[0] for k in flat
                      if k.rsplit('/', 1)[-1] == 'kernel'))


def matched_layers(plan: SparsityPlan, infos: Mapping[str, KernelInfo]
                   ) -> dict[str, LayerRule]:
  """layer path -> rule, for the layers the plan makes sparse."""
  return {p: r for p in infos if (r := plan.lookup(p)) is not None}


def check_placement(plans: Sequence[SparsityPlan],
                    infos: Mapping[str, KernelInfo]) -> None:
  """Every rule matches a layer; every pattern divides its group length.

  Raises ValueError naming the group, its regex or the layer, the shape and
  M (method.md section 1: the authors' code lets groups straddle rows).
  """
  for plan in plans:
    for path in infos:
      hits = [r.group for r in plan.rules if re.search(r.layers, path)]
      if len(hits) > 1:
        raise ValueError(
            f'Layer {path} is selected by several sparsity roles {hits}; '
            'make their sparsity.<role>.layers regexes disjoint.')
    for rule in plan.rules:
      if not any(plan.lookup(p) == rule for p in infos):
        raise ValueError(
            f'sparsity.{rule.group}.layers={rule.layers!r} matches no sparse-'
            f'capable layer of this model; layers are e.g. '
            f'{sorted(infos)[:4]}.')
    for path, rule in matched_layers(plan, infos).items():
      info = infos[path]
      check_groupable(info.shape, rule.nm, info.group_axes(rule.axis),
                      name=f'{path}/kernel (sparsity.{rule.group}, '
                      f'{rule.nm})')


def check_sharding(plans: Sequence[SparsityPlan],
                   infos: Mapping[str, KernelInfo],
                   mesh_axis_of: Mapping[str, str | None],
                   mesh_shape: Mapping[str, int]) -> None:
  """Each shard of a sparse kernel must hold whole groups of M.

  The groups run over the flattened group axes; sharding the innermost
  sharded group axis by s leaves contiguous blocks of
  (size / s) * (product of the inner axes), which must be divisible by M.
  """
  for plan in plans:
    for path, rule in matched_layers(plan, infos).items():
      info = infos[path]
      axes = info.group_axes(rule.axis)
      block = None
      for a in reversed(axes):
        mesh_axis = mesh_axis_of.get(info.names[a]) if info.names[a] else None
        shards = mesh_shape.get(mesh_axis, 1) if mesh_axis else 1
        if shards > 1:
          inner = int(np.prod([info.shape[b] for b in axes if b > a]))
          block = info.shape[a] // shards * inner
          break
      if block is not None and block % rule.nm.m:
        raise ValueError(
            f'{path}/kernel {info.shape}: sharding over the mesh leaves '
            f'blocks of {block} weights along the N:M group axes, not a '
            f'multiple of M={rule.nm.m} (sparsity.{rule.group}); change '
            'mesh.model or mesh.rules.')


def masks_from_params(params: Mapping, plan: SparsityPlan,
                      infos: Mapping[str, KernelInfo]) -> dict[str, jax.Array]:
  """layer path -> boolean N:M mask of its kernel under `plan`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return {path: nm_mask(flat[f'{path}/kernel'], rule.nm,
                        infos[path].group_axes(rule.axis),
                        name=f'{path}/kernel')
          for path, rule in matched_layers(plan, infos).items()}


def hard_masked_params(params: Mapping, plan: SparsityPlan,
                       infos: Mapping[str, KernelInfo]) -> dict:
  """Params with every sparse kernel replaced by its hard N:M version.

  This is the true N:M model that evaluation and export use (alpha = 0).
  """
  masks = masks_from_params(params, plan, infos)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  for path, mask in masks.items():
    w = flat[f'{path}/kernel']
    flat[f'{path}/kernel'] = jnp.where(mask, w, jnp.zeros((), w.dtype))
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def export_patterns(plan: SparsityPlan, infos: Mapping[str, KernelInfo]
                    ) -> dict[str, tuple[NM, tuple[int, ...]]]:
  """'layer/kernel' -> (pattern, group axes), the input of `verify_nm`."""
  return {f'{path}/kernel': (rule.nm, infos[path].group_axes(rule.axis))
          for path, rule in matched_layers(plan, infos).items()}

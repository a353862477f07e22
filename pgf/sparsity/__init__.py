"""N:M sparsity for Flax: masks, schedules, layers and optax transforms.

Where things are:
  masks.py       nm_mask(w, nm, axes): where the N:M mask is computed.
  schedules.py   SparsitySchedule: where the step turns into alpha, pattern
                 and phase (all pure functions of the step).
  layers.py      SparseDense / SparseDenseGeneral / SparseConv.
  transforms.py  optax: SR-STE refill and the decaying-mask gradient flow.
"""

from collections.abc import Mapping

import flax

from pgf.sparsity.layers import MASK_COLLECTION
from pgf.sparsity.layers import SCHEDULE_COLLECTION
from pgf.sparsity.layers import SparseConv
from pgf.sparsity.layers import SparseDense
from pgf.sparsity.layers import SparseDenseGeneral
from pgf.sparsity.layers import straight_through_scale
from pgf.sparsity.masks import LayerReport
from pgf.sparsity.masks import NM
from pgf.sparsity.masks import nm_mask
from pgf.sparsity.masks import nm_mask_reference
from pgf.sparsity.masks import verify_nm
from pgf.sparsity.schedules import GroupSpec
from pgf.sparsity.schedules import layer_collection
from pgf.sparsity.schedules import LayerRule
from pgf.sparsity.schedules import sdgf_frames
from pgf.sparsity.schedules import SparsityPlan
from pgf.sparsity.schedules import SparsitySchedule
from pgf.sparsity.transforms import decaying_mask_flow
from pgf.sparsity.transforms import sparse_gradients
from pgf.sparsity.transforms import srste_refill


def kernel_layer_paths(params: Mapping) -> tuple[str, ...]:
  """'/'-joined module paths of every layer that owns a 'kernel' param."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return tuple(sorted(k.rsplit('/', 1)[0] for k in flat
                      if k.rsplit('/', 1)[-1] == 'kernel'))


def matched_layers(plan: SparsityPlan,
                   layer_paths: tuple[str, ...]) -> dict[str, LayerRule]:
  """module path -> rule, for the layers the plan makes sparse."""
  out = {}
  for path in layer_paths:
    rule = plan.lookup(path)
    if rule is not None:
      out[path] = rule
  return out

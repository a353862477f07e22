"""N:M sparsity for Flax and any JAX model: masks, recipes, schedules,
layers, the model-agnostic Sparsifier and optax transforms.

Where things are:
  masks.py       nm_mask(w, nm, axes): where the N:M mask is computed.
  mask_kernel.py the CPU kernels of one CPU device (numba, XLA FFI custom
                 calls): nm_mask's where it was measured faster, and the
                 one-pass w_eff + bits and SR-STE refill of core.py.
  recipes.py     every recipe, defined once: alpha(t), gradient rule, frames.
  schedules.py   SparsitySchedule: where the step turns into alpha, pattern
                 and phase (all pure functions of the step).
  core.py        where the mask meets alpha (straight-through gradient):
                 sparse_product (pgf's layers; rebuilds the effective kernel
                 from the mask's bits in the backward pass), effective_kernel
                 and srste_gradient (SR-STE's refill).
  layers.py      SparseDense / SparseDenseGeneral / SparseConv (pgf's models).
  sparsifier.py  Sparsifier: the recipes on any model's parameter tree; the
                 checks, statistics and hard masks pgf's loop uses too.
  transforms.py  optax: SR-STE refill and the decaying-mask gradient flow.
"""

from pgf.sparsity.core import effective_kernel
from pgf.sparsity.core import hard_kernel
from pgf.sparsity.core import sparse_product
from pgf.sparsity.core import straight_through_scale
from pgf.sparsity.layers import SCHEDULE_COLLECTION
from pgf.sparsity.layers import SparseConv
from pgf.sparsity.layers import SparseDense
from pgf.sparsity.layers import SparseDenseGeneral
from pgf.sparsity.layers import SparseKernel
from pgf.sparsity.masks import NM
from pgf.sparsity.masks import LayerReport
from pgf.sparsity.masks import nm_mask
from pgf.sparsity.masks import nm_mask_reference
from pgf.sparsity.masks import verify_nm
from pgf.sparsity.recipes import RECIPES
from pgf.sparsity.recipes import Recipe
from pgf.sparsity.schedules import GroupSpec
from pgf.sparsity.schedules import LayerRule
from pgf.sparsity.schedules import SparsityPlan
from pgf.sparsity.schedules import SparsitySchedule
from pgf.sparsity.schedules import layer_collection
from pgf.sparsity.schedules import sdgf_frames
from pgf.sparsity.sparsifier import KernelSite
from pgf.sparsity.sparsifier import Sparsifier
from pgf.sparsity.sparsifier import kernel_sites
from pgf.sparsity.sparsifier import param_sites
from pgf.sparsity.transforms import decaying_mask_flow
from pgf.sparsity.transforms import recipe_gradients
from pgf.sparsity.transforms import srste_refill

"""N:M sparsity for Flax: masks, schedules, layers and optax transforms.

Where things are:
  masks.py       nm_mask(w, nm, axes): where the N:M mask is computed.
  schedules.py   SparsitySchedule: where the step turns into alpha, pattern
                 and phase (all pure functions of the step).
  layers.py      SparseDense / SparseDenseGeneral / SparseConv.
  transforms.py  optax: SR-STE refill and the decaying-mask gradient flow.
"""

from pgf.sparsity.kernels import KernelInfo
from pgf.sparsity.kernels import check_placement
from pgf.sparsity.kernels import check_sharding
from pgf.sparsity.kernels import export_patterns
from pgf.sparsity.kernels import hard_masked_params
from pgf.sparsity.kernels import kernel_infos
from pgf.sparsity.kernels import kernel_layer_paths
from pgf.sparsity.kernels import masks_from_params
from pgf.sparsity.kernels import matched_layers
from pgf.sparsity.layers import MASK_COLLECTION
from pgf.sparsity.layers import SCHEDULE_COLLECTION
from pgf.sparsity.layers import SparseConv
from pgf.sparsity.layers import SparseDense
from pgf.sparsity.layers import SparseDenseGeneral
from pgf.sparsity.layers import SparseKernel
from pgf.sparsity.layers import straight_through_scale
from pgf.sparsity.masks import NM
from pgf.sparsity.masks import LayerReport
from pgf.sparsity.masks import nm_mask
from pgf.sparsity.masks import nm_mask_reference
from pgf.sparsity.masks import verify_nm
from pgf.sparsity.schedules import GroupSpec
from pgf.sparsity.schedules import LayerRule
from pgf.sparsity.schedules import SparsityPlan
from pgf.sparsity.schedules import SparsitySchedule
from pgf.sparsity.schedules import layer_collection
from pgf.sparsity.schedules import needed_values
from pgf.sparsity.schedules import sdgf_frames
from pgf.sparsity.transforms import decaying_mask_flow
from pgf.sparsity.transforms import sparse_gradients
from pgf.sparsity.transforms import srste_refill


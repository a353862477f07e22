"""Every sparse-training recipe, defined once (docs/recipes.md section 2).

A recipe says, for the sparse phase of a run:
  * alpha(t): the value of pruned weights' mask entries in the forward pass,
    w_eff = w * (m + (1 - m) alpha), as a function of the steps t since the
    sparse phase started (0 for hard-mask recipes, decaying from 1 for MdGf);
  * its gradient rule: straight-through to the dense weight (all recipes), plus
    SR-STE's refill term lambda (1 - m) w on the raw gradient (`refill`), and
    for decaying recipes the option of scaling pruned gradients by alpha
    (`GroupSpec.mdgf_grad='scaled'`);
  * its N:M frame map (SdGf: the pattern changes along the sparse phase);
  * its FLOPs profile, read off alpha: a step costs dense while alpha exceeds
    the accounting threshold (the forward is effectively dense), else the
    hard-mask cost (pgf.flops).

`schedules.py` (alpha inside the jitted step), `flops.py` (the run's cost),
the optax transforms and the config argument (`configs/common.py`) all read
recipes from `RECIPES`. Adding a recipe is one `Recipe(...)` below plus its
tests.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

# alpha(t, c, xp): t steps since the sparse phase began (t >= 0), c the
# group's decay coefficient, xp the array module (jax.numpy inside the
# jitted step, numpy on the host for FLOPs accounting).
AlphaFn = Callable[[Any, float, Any], Any]


def _zero(t, c, xp):
  del c
  return xp.zeros_like(xp.asarray(t, dtype=xp.float32))


def _linear(t, c, xp):
  # MdGf-Linear: alpha = max(1 - c t, 0).
  return xp.maximum(1.0 - c * xp.asarray(t, dtype=xp.float32), 0.0)


def _exponential(t, c, xp):
  # MdGf-Exponential: alpha = exp(-c t); c = 1e-4 in the released ViT-B
  # config gives alpha(10k) = 0.37, alpha(30k) = 0.05, alpha(50k) = 0.007.
  return xp.exp(-c * xp.maximum(xp.asarray(t, dtype=xp.float32), 0.0))


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One recipe: see the module docstring.

  Attributes:
    name: the config name (`sparsity.<role>.recipe`, config arguments).
    summary: one line for listings and errors.
    alpha_fn: alpha(t, c, xp) during the sparse phase.
    decays: alpha decays from 1 (MdGf); such recipes accept
      mdgf_grad='scaled' and have a decay coefficient.
    refill: add SR-STE's lambda (1 - m) w to the raw gradient.
    frames: the SdGf frame map the recipe implies ('none', 'stepwise',
      'geometric'); `GroupSpec.sdgf` may add one to a recipe that has none.
    masked: False only for dense (no mask at all).
  """

  name: str
  summary: str
  alpha_fn: AlphaFn = _zero
  decays: bool = False
  refill: bool = False
  frames: str = 'none'
  masked: bool = True

  def alpha(self, t, decay: float, xp=jnp):
    """alpha at t steps into the sparse phase (traced or host)."""
    return self.alpha_fn(t, decay, xp)

  def alpha_host(self, t: int, decay: float) -> float:
    """alpha as a Python float (FLOPs accounting, logs): the same formula in
    NumPy, float32 like the jitted step."""
    return float(self.alpha_fn(t, np.float32(decay), np))

  def steps_until(self, alpha: float, decay: float) -> int | None:
    """First t with alpha(t) <= `alpha` (None: alpha never gets there).

    Found by doubling then bisection on the recipe's own alpha(t), so it
    holds for any monotone decay a recipe defines.
    """
    if self.alpha_host(0, decay) <= alpha:
      return 0
    hi = 1
    while self.alpha_host(hi, decay) > alpha:
      hi *= 2
      if hi > 2**62:
        return None
    lo = hi // 2
    while lo < hi:
      mid = (lo + hi) // 2
      if self.alpha_host(mid, decay) <= alpha:
        hi = mid
      else:
        lo = mid + 1
    return lo


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe('dense', 'no mask: the dense baseline', masked=False),
    Recipe('ste', 'fixed N:M hard mask, straight-through gradient'),
    Recipe('srste', 'hard mask + refill lambda (1 - m) w (Zhou et al. 2021)',
           refill=True),
    Recipe('mdgf_linear', 'MdGf: mask value alpha = max(1 - c t, 0)',
           alpha_fn=_linear, decays=True),
    Recipe('mdgf_exp', 'MdGf: mask value alpha = exp(-c t)',
           alpha_fn=_exponential, decays=True),
    Recipe('sdgf_stepwise', 'SdGf: hard mask, (M-1):M then M/2^i:M frames',
           frames='stepwise'),
    Recipe('sdgf_geometric', 'SdGf: hard mask, (N 2^k):(M 2^k) frames at '
           'constant density', frames='geometric'),
)}

SDGF_MODES = ('none', 'stepwise', 'geometric', 'custom')
MDGF_GRADS = ('straight_through', 'scaled')


def get(name: str, *, key: str = 'recipe') -> Recipe:
  """The recipe called `name`; ValueError naming `key` and the choices."""
  if name not in RECIPES:
    raise ValueError(f'{key}={name!r} is not a recipe; choose one of '
                     f'{tuple(RECIPES)}.')
  return RECIPES[name]


def describe() -> str:
  """One line per recipe, for help texts."""
  return '\n'.join(f'  {r.name:<15} {r.summary}' for r in RECIPES.values())

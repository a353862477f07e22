"""Where the step clock turns into alpha, the N:M pattern and the phase.

Everything here is a pure function of the integer training step
(docs/recipes.md sections 2-3); the recipes themselves (alpha(t), gradient
rule, frames) are defined once in `recipes.py`:

* `phase(step)`: 'dense' (warm-up, no mask), 'sparse' (the recipe) or
  'fine_tune' (hard binary mask, STE). Host-side, on Python ints.
* `pattern(step)` / `plan(step)`: the static N:M of each group for the current
  SdGf frame. Host-side: a change of pattern changes shapes inside the mask
  computation, so the jitted step is compiled once per distinct plan.
* `values(step)`: traced scalars per group (alpha, the pruned-gradient scale,
  the SR-STE lambda), computed inside the jitted step.

The MdGf clock counts from the start of the sparse phase (not the authors'
defect 5.1, which subtracted 1 % of the dense phase).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
import re

import jax.numpy as jnp

from pgf.sparsity import recipes as recipes_lib
from pgf.sparsity.masks import NM

GROUP_AXES = ('in', 'out')


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """Static sparsity settings of one group of kernels (e.g. 'ff' or 'q').

  Attributes:
    name: group name, used in metrics ('sparsity/ff/alpha').
    layers: regex searched in '/'-joined parameter paths to select kernels,
      e.g. r'/mlp/(wi|wo)/kernel$'.
    nm: the target pattern (the pattern of the last frame).
    recipe: a name in `pgf.sparsity.recipes.RECIPES`.
    sdgf: an SdGf frame map added to the recipe ('none', 'stepwise',
      'geometric', 'custom'); the sdgf_* recipes imply theirs.
    custom_frames: for sdgf='custom': ((start, NM), ...) with start in steps
      from the beginning of the sparse phase; the first start is 0 and the
      last pattern is `nm`.
    decay: MdGf coefficient c (alpha = exp(-c t) or max(1 - c t, 0)).
    mdgf_grad: 'straight_through' (the released code: pruned weights receive
      the full gradient g) or 'scaled' (autodiff of the forward: alpha * g);
      decaying recipes only.
    srste_lambda: SR-STE refill coefficient (Zhou et al. 2021: 2e-4).
    axis: 'in' groups along the contraction axes, 'out' along the output axes
      (of a pgf layer's kernel, or axis 0 / 1 of any 2-D kernel).
    group_axes: explicit group axes, as axis numbers or logical axis names
      (e.g. ('embed',)); overrides `axis` (any model's kernels).
  """

  name: str
  layers: str
  nm: NM
  recipe: str = 'ste'
  sdgf: str = 'none'
  custom_frames: tuple[tuple[int, NM], ...] = ()
  decay: float = 1e-4
  mdgf_grad: str = 'straight_through'
  srste_lambda: float = 2e-4
  axis: str = 'in'
  group_axes: tuple[int | str, ...] | None = None

  def __post_init__(self):
    key = f'sparsity.{self.name}'

    def bad(field, value, allowed):
      raise ValueError(f'{key}.{field}={value!r} is not allowed; choose one '
                       f'of {tuple(allowed)}.')
    if self.recipe not in recipes_lib.RECIPES:
      bad('recipe', self.recipe, recipes_lib.RECIPES)
    if self.sdgf not in recipes_lib.SDGF_MODES:
      bad('sdgf', self.sdgf, recipes_lib.SDGF_MODES)
    if self.mdgf_grad not in recipes_lib.MDGF_GRADS:
      bad('mdgf_grad', self.mdgf_grad, recipes_lib.MDGF_GRADS)
    if self.axis not in GROUP_AXES:
      bad('axis', self.axis, GROUP_AXES)
    r = self.recipe_def
    if not r.masked:
      return
    if self.sdgf != 'none' and r.frames != 'none' and self.sdgf != r.frames:
      raise ValueError(
          f'{key}.recipe={self.recipe!r} implies sdgf={r.frames!r}, but '
          f'{key}.sdgf={self.sdgf!r}; leave sdgf at \'none\' or pick another '
          'recipe.')
    if self.mdgf_grad == 'scaled' and not r.decays:
      raise ValueError(
          f"{key}.mdgf_grad='scaled' scales pruned gradients by alpha, which "
          f'only decaying recipes have '
          f'({[n for n, x in recipes_lib.RECIPES.items() if x.decays]}); '
          f'{key}.recipe={self.recipe!r}.')
    try:
      re.compile(self.layers)
    except re.error as e:
      raise ValueError(f'{key}.layers={self.layers!r} is not a valid regex: '
                       f'{e}') from None
    if self.decay < 0:
      raise ValueError(f'{key}.decay={self.decay} must be >= 0.')
    if self.srste_lambda < 0:
      raise ValueError(f'{key}.srste_lambda={self.srste_lambda} must be '
                       '>= 0.')
    sdgf_frames(self)  # Validates the frame map.

  @property
  def recipe_def(self) -> recipes_lib.Recipe:
    return recipes_lib.RECIPES[self.recipe]

  @property
  def frames_mode(self) -> str:
    """The SdGf frame map in effect: the recipe's, or the one added."""
    return self.recipe_def.frames if self.sdgf == 'none' else self.sdgf

  @property
  def is_mdgf(self) -> bool:
    return self.recipe_def.decays

  @property
  def scales_gradient(self) -> bool:
    """Pruned gradients are multiplied by alpha (MdGf 'scaled')."""
    return self.recipe_def.decays and self.mdgf_grad == 'scaled'


def sdgf_frames(spec: GroupSpec) -> tuple[NM, ...]:
  """The N:M of each SdGf frame, in order; the last is the target.

  stepwise ('sparsify'): F = log2(M/N) + 1 frames, (M-1):M then (M/2^i):M.
  geometric ('fine'): 4 frames, (N 2^(3-i)):(M 2^(3-i)), constant density.
  """
  nm, key, mode = spec.nm, f'sparsity.{spec.name}', spec.frames_mode
  if mode == 'none':
    return (nm,)
  if mode == 'stepwise':
    ratio = nm.m // nm.n
    if nm.m % nm.n or ratio & (ratio - 1) or ratio < 2:
      raise ValueError(
          f'{key}: stepwise SdGf needs M/N to be a power of two >= 2; got '
          f'{nm} (M/N={nm.m / nm.n:g}).')
    num = int(math.log2(ratio)) + 1
    return (NM(nm.m - 1, nm.m),) + tuple(
        NM(nm.m // 2**i, nm.m) for i in range(1, num))
  if mode == 'geometric':
    return tuple(NM(nm.n * 2**(3 - i), nm.m * 2**(3 - i)) for i in range(4))
  # custom
  frames = spec.custom_frames
  if not frames:
    raise ValueError(f'{key}.sdgf=custom needs {key}.custom_frames, e.g. '
                     '"0:4:8,25%:2:8,50%:1:8".')
  starts = [s for s, _ in frames]
  if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
    raise ValueError(f'{key}.custom_frames starts {starts} must begin at 0 '
                     'and strictly increase.')
  if frames[-1][1] != nm:
    raise ValueError(f'{key}.custom_frames ends with {frames[-1][1]} but the '
                     f'target pattern is {nm}.')
  return tuple(p for _, p in frames)


@dataclasses.dataclass(frozen=True)
class LayerRule:
  """The current pattern of one group, as seen by a kernel (static)."""

  group: str
  layers: str
  nm: NM
  axis: str
  group_axes: tuple[int | str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SparsityPlan:
  """Static description of which layers are sparse and how, right now.

  Hashable: the jitted train step takes it as a static argument, so it is
  compiled once per distinct plan (once per SdGf frame, never per step).
  The first rule whose regex is found in a parameter path applies.
  """

  rules: tuple[LayerRule, ...] = ()
  # Rebuild effective kernels in the backward pass from the kernel and the
  # mask's bits instead of keeping them (`core.sparse_product`; config key
  # sparsity.recompute).
  recompute: bool = True

  def lookup(self, path: str) -> LayerRule | None:
    """The rule of the kernel at '/'-joined parameter path `path`."""
    for rule in self.rules:
      if re.search(rule.layers, path):
        return rule
    return None

  def __bool__(self) -> bool:
    return bool(self.rules)

  def describe(self) -> str:
    return ', '.join(f'{r.group}={r.nm}' for r in self.rules) or 'dense'


@dataclasses.dataclass(frozen=True)
class SparsitySchedule:
  """All groups and phases of one run; every method is a function of step."""

  groups: tuple[GroupSpec, ...]
  total_steps: int
  dense_steps: int = 0
  fine_tune_steps: int = 0

  def __post_init__(self):
    if self.total_steps < 1:
      raise ValueError(f'total_steps={self.total_steps} must be >= 1.')
    if self.dense_steps < 0 or self.fine_tune_steps < 0 or (
        self.dense_steps + self.fine_tune_steps > self.total_steps):
      raise ValueError(
          f'sparsity.dense_warmup ({self.dense_steps} steps) plus '
          f'sparsity.fine_tune ({self.fine_tune_steps} steps) must be '
          f'non-negative and fit in the run ({self.total_steps} steps).')
    names = [g.name for g in self.groups]
    if len(set(names)) != len(names):
      raise ValueError(f'sparsity groups have duplicate names: {names}.')
    length = self.fine_tune_start - self.sparse_start
    for g in self.sparse_groups:
      # A sparse phase shorter than the SdGf frame map would silently skip
      # frames (possibly the target): refuse it.
      frames = sdgf_frames(g)
      last_start = g.custom_frames[-1][0] if g.frames_mode == 'custom' else (
          len(frames) - 1)
      if length and last_start >= length:
        raise ValueError(
            f'sparsity.{g.name}: the sparse phase has {length} steps, too '
            f'few for its {len(frames)} SdGf frames '
            f'({", ".join(map(str, frames))}; the last starts at step '
            f'{last_start} of the phase). Lengthen total_steps or shorten '
            'sparsity.dense_warmup / sparsity.fine_tune.')

  @property
  def sparse_groups(self) -> tuple[GroupSpec, ...]:
    return tuple(g for g in self.groups if g.recipe_def.masked)

  @property
  def sparse_start(self) -> int:
    return self.dense_steps

  @property
  def fine_tune_start(self) -> int:
    return self.total_steps - self.fine_tune_steps

  # -- host side (Python ints) -------------------------------------------

  def phase(self, step: int) -> str:
    if not self.sparse_groups or step < self.sparse_start:
      return 'dense'
    return 'sparse' if step < self.fine_tune_start else 'fine_tune'

  def frame_index(self, step: int, group: GroupSpec) -> int:
    """Index into `sdgf_frames(group)` at `step` (last frame in fine-tune)."""
    frames = sdgf_frames(group)
    if step >= self.fine_tune_start:
      return len(frames) - 1
    t = max(step - self.sparse_start, 0)
    if group.frames_mode == 'custom':
      return sum(1 for s, _ in group.custom_frames if s <= t) - 1
    length = self.fine_tune_start - self.sparse_start
    return min(len(frames) - 1, t * len(frames) // max(length, 1))

  def pattern(self, step: int, group: GroupSpec) -> NM | None:
    """The group's N:M at `step`; None while its layers are dense."""
    if group.recipe == 'dense' or self.phase(step) == 'dense':
      return None
    return sdgf_frames(group)[self.frame_index(step, group)]

  def plan(self, step: int) -> SparsityPlan:
    """The static plan of the training step at `step`."""
    rules = []
    for g in self.sparse_groups:
      nm = self.pattern(step, g)
      if nm is not None:
        rules.append(LayerRule(g.name, g.layers, nm, g.axis, g.group_axes))
    return SparsityPlan(tuple(rules))

  def eval_plan(self, step: int) -> SparsityPlan:
    """Hard-mask plan for evaluation: the current pattern, or the final one
    during the dense warm-up, so a reported accuracy is that of an N:M model.
    """
    if self.phase(step) == 'dense':
      return self.final_plan()
    return self.plan(step)

  def final_plan(self) -> SparsityPlan:
    """The target pattern of every sparse group (the last SdGf frame), even
    when the run is too short to reach it; what export and the final
    evaluation use."""
    return SparsityPlan(tuple(
        LayerRule(g.name, g.layers, sdgf_frames(g)[-1], g.axis, g.group_axes)
        for g in self.sparse_groups))

  def plan_boundaries(self) -> tuple[int, ...]:
    """Sorted steps at which the plan may change: 0, the phase boundaries
    and the first step of every SdGf frame."""
    boundaries = {0, self.sparse_start, self.fine_tune_start}
    length = self.fine_tune_start - self.sparse_start
    for g in self.sparse_groups:
      frames = sdgf_frames(g)
      if g.frames_mode == 'custom':
        starts = [self.sparse_start + s for s, _ in g.custom_frames]
      else:
        starts = [self.sparse_start + -(-i * length // len(frames))
                  for i in range(len(frames))]
      boundaries.update(starts)
    return tuple(sorted(b for b in boundaries if 0 <= b < self.total_steps))

  def distinct_plans(self) -> tuple[SparsityPlan, ...]:
    """Every training plan of the run, in order (bounded: one per frame)."""
    plans = []
    for step in self.plan_boundaries():
      p = self.plan(step)
      if p not in plans:
        plans.append(p)
    return tuple(plans)

  # -- traced (inside jit) -------------------------------------------------

  def values(self, step, *, train: bool = True
             ) -> dict[str, dict[str, jnp.ndarray]]:
    """Per-group float32 scalars at `step` (a traced int), for the layers and
    the optax transforms.

    alpha: mask value of pruned weights in the forward pass
      (w_eff = w * (m + (1 - m) alpha)): 1 (no mask) in the dense warm-up,
      the recipe's alpha(t) in the sparse phase, 0 in fine-tune and with
      train=False (evaluation always uses the hard mask).
    grad_scale: factor on the gradient of pruned weights: alpha in the sparse
      phase for MdGf 'scaled', else 1.
    srste_lambda: SR-STE refill coefficient, 0 outside its sparse phase.
    """
    step = jnp.asarray(step)
    t = step - self.sparse_start
    in_sparse = (step >= self.sparse_start) & (step < self.fine_tune_start)
    out = {}
    for g in self.sparse_groups:
      decayed = g.recipe_def.alpha(t, g.decay)
      alpha = jnp.where(step < self.sparse_start, 1.0,
                        jnp.where(in_sparse, decayed, 0.0))
      alpha = alpha if train else jnp.zeros(())
      grad_scale = (jnp.where(in_sparse, alpha, 1.0) if g.scales_gradient
                    else jnp.ones(()))
      lam = (jnp.where(in_sparse, g.srste_lambda, 0.0)
             if g.recipe_def.refill and train else jnp.zeros(()))
      out[g.name] = dict(alpha=alpha.astype(jnp.float32),
                         grad_scale=grad_scale.astype(jnp.float32),
                         srste_lambda=lam.astype(jnp.float32))
    return out

  def alpha_host(self, step: int, group: GroupSpec) -> float:
    """The training alpha of `group` at `step`, as a Python float."""
    if step < self.sparse_start:
      return 1.0
    if step >= self.fine_tune_start:
      return 0.0
    return group.recipe_def.alpha_host(step - self.sparse_start, group.decay)


def layer_collection(values: Mapping[str, Mapping[str, jnp.ndarray]],
                     plan: SparsityPlan,
                     kernel_paths: Sequence[str]) -> dict:
  """Builds the `sparsity` variable collection for `model.apply`.

  Args:
    values: `SparsitySchedule.values(step)`.
    plan: the current plan.
    kernel_paths: '/'-joined parameter paths of the model's sparse-capable
      kernels, e.g. 'Transformer/encoderblock_0/mlp/wi/kernel'.

  Returns:
    A nested dict mirroring the module tree: {'alpha': scalar} at the module
    of each kernel the plan makes sparse (the layers read nothing else).
  """
  tree: dict = {}
  for path in kernel_paths:
    rule = plan.lookup(path)
    if rule is None:
      continue
    node = tree
    for part in path.split('/')[:-1]:
      node = node.setdefault(part, {})
    node['alpha'] = values[rule.group]['alpha']
  return tree

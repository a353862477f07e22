"""Where the step clock turns into alpha, the N:M pattern and the phase.

Everything here is a pure function of the integer training step
(method.md sections 2-3):

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

from collections.abc import Mapping
import dataclasses
import math
import re

import jax.numpy as jnp

from pgf.sparsity.masks import NM

RECIPES = ('dense', 'ste', 'srste', 'mdgf_linear', 'mdgf_exp')
SDGF_MODES = ('none', 'stepwise', 'geometric', 'custom')
MDGF_GRADS = ('straight_through', 'scaled')
GROUP_AXES = ('in', 'out')
PHASES = ('dense', 'sparse', 'fine_tune')


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """Static sparsity settings of one group of layers (e.g. 'ff' or 'q').

  Attributes:
    name: group name, used in metrics ('sparsity/ff/alpha').
    layers: regex searched in '/'-joined module paths to select the layers.
    nm: the target pattern (the pattern of the last frame).
    recipe: one of RECIPES.
    sdgf: one of SDGF_MODES.
    custom_frames: for sdgf='custom': ((start, NM), ...) with start in steps
      from the beginning of the sparse phase; the first start is 0 and the
      last pattern is `nm`.
    decay: MdGf coefficient c (alpha = exp(-c t) or max(1 - c t, 0)).
    mdgf_grad: 'straight_through' (the released code: pruned weights receive
      the full gradient g) or 'scaled' (autodiff of the forward: alpha * g).
    srste_lambda: SR-STE refill coefficient (Zhou et al. 2021: 2e-4).
    axis: 'in' groups along the contraction axes, 'out' along the output axes.
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

  def __post_init__(self):
    def bad(key, value, allowed):
      raise ValueError(f'sparsity.{self.name}.{key}={value!r} is not allowed; '
                       f'choose one of {allowed}.')
    if self.recipe not in RECIPES:
      bad('recipe', self.recipe, RECIPES)
    if self.sdgf not in SDGF_MODES:
      bad('sdgf', self.sdgf, SDGF_MODES)
    if self.mdgf_grad not in MDGF_GRADS:
      bad('mdgf_grad', self.mdgf_grad, MDGF_GRADS)
    if self.axis not in GROUP_AXES:
      bad('axis', self.axis, GROUP_AXES)
    if self.recipe == 'dense':
      return
    try:
      re.compile(self.layers)
    except re.error as e:
      raise ValueError(f'sparsity.{self.name}.layers={self.layers!r} is not '
                       f'a valid regex: {e}') from None
    if self.decay < 0:
      raise ValueError(f'sparsity.{self.name}.decay={self.decay} must be >= 0.')
    if self.srste_lambda < 0:
      raise ValueError(f'sparsity.{self.name}.srste_lambda='
                       f'{self.srste_lambda} must be >= 0.')
    sdgf_frames(self)  # Validates the frame map.

  @property
  def is_mdgf(self) -> bool:
    return self.recipe in ('mdgf_linear', 'mdgf_exp')


def sdgf_frames(spec: GroupSpec) -> tuple[NM, ...]:
  """The N:M of each SdGf frame, in order; the last is the target.

  stepwise ('sparsify'): F = log2(M/N) + 1 frames, (M-1):M then (M/2^i):M.
  geometric ('fine'): 4 frames, (N 2^(3-i)):(M 2^(3-i)), constant density.
  """
  nm, key = spec.nm, f'sparsity.{spec.name}'
  if spec.sdgf == 'none':
    return (nm,)
  if spec.sdgf == 'stepwise':
    ratio = nm.m // nm.n
    if nm.m % nm.n or ratio & (ratio - 1) or ratio < 2:
      raise ValueError(
          f'{key}.sdgf=stepwise needs M/N to be a power of two >= 2; got '
          f'{nm} (M/N={nm.m / nm.n:g}).')
    num = int(math.log2(ratio)) + 1
    return (NM(nm.m - 1, nm.m),) + tuple(
        NM(nm.m // 2**i, nm.m) for i in range(1, num))
  if spec.sdgf == 'geometric':
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
  """The current pattern of one group, as seen by layers (static)."""

  group: str
  layers: str
  nm: NM
  axis: str


@dataclasses.dataclass(frozen=True)
class SparsityPlan:
  """Static description of which layers are sparse and how, right now.

  Hashable: the jitted train step takes it as a static argument, so it is
  compiled once per distinct plan (once per SdGf frame, never per step).
  The first rule whose regex is found in a module path applies.
  """

  rules: tuple[LayerRule, ...] = ()

  def lookup(self, module_path: str) -> LayerRule | None:
    for rule in self.rules:
      if re.search(rule.layers, module_path):
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
      last_start = g.custom_frames[-1][0] if g.sdgf == 'custom' else (
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
    return tuple(g for g in self.groups if g.recipe != 'dense')

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
    if group.sdgf == 'custom':
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
        rules.append(LayerRule(g.name, g.layers, nm, g.axis))
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
        LayerRule(g.name, g.layers, sdgf_frames(g)[-1], g.axis)
        for g in self.sparse_groups))

  def distinct_plans(self) -> tuple[SparsityPlan, ...]:
    """Every training plan of the run, in order (bounded: one per frame)."""
    boundaries = {0, self.sparse_start, self.fine_tune_start}
    for g in self.sparse_groups:
      frames = sdgf_frames(g)
      length = self.fine_tune_start - self.sparse_start
      if g.sdgf == 'custom':
        starts = [self.sparse_start + s for s, _ in g.custom_frames]
      else:
        starts = [self.sparse_start + -(-i * length // len(frames))
                  for i in range(len(frames))]
      boundaries.update(starts)
    plans = []
    for step in sorted(b for b in boundaries if 0 <= b < self.total_steps):
      p = self.plan(step)
      if p not in plans:
        plans.append(p)
    return tuple(plans)

  # -- traced (inside jit) -------------------------------------------------

  def values(self, step, *, train: bool = True
             ) -> dict[str, dict[str, jnp.ndarray]]:
    """Per-group scalars at `step` (a traced int), for layers and optax.

    alpha: mask value of pruned weights in the forward pass
      (w_eff = w * (m + (1 - m) alpha)); 0 in evaluation.
    grad_scale: factor on the gradient of pruned weights (MdGf 'scaled').
    srste_lambda: SR-STE refill coefficient, 0 outside its sparse phase.
    """
    step = jnp.asarray(step)
    t = (step - self.sparse_start).astype(jnp.float32)
    in_sparse = (step >= self.sparse_start) & (step < self.fine_tune_start)
    out = {}
    for g in self.sparse_groups:
      if g.recipe == 'mdgf_linear':
        decayed = jnp.maximum(1.0 - g.decay * t, 0.0)
      elif g.recipe == 'mdgf_exp':
        decayed = jnp.exp(-g.decay * jnp.maximum(t, 0.0))
      else:
        decayed = jnp.zeros((), jnp.float32)
      # Mask value of pruned weights: 1 (no mask) in the dense warm-up, the
      # recipe's value in the sparse phase, 0 in fine-tune and evaluation.
      alpha = jnp.where(step < self.sparse_start, 1.0,
                        jnp.where(in_sparse, decayed, 0.0))
      alpha = alpha if train else jnp.zeros(())
      scaled = g.is_mdgf and g.mdgf_grad == 'scaled'
      grad_scale = jnp.where(in_sparse, alpha, 1.0) if scaled else jnp.ones(())
      lam = (jnp.where(in_sparse, g.srste_lambda, 0.0)
             if g.recipe == 'srste' and train else jnp.zeros(()))
      out[g.name] = dict(alpha=alpha.astype(jnp.float32),
                         grad_scale=grad_scale.astype(jnp.float32),
                         srste_lambda=lam.astype(jnp.float32))
    return out


def needed_values(schedule: SparsitySchedule,
                  values: Mapping[str, Mapping[str, jnp.ndarray]]) -> dict:
  """`values` without the entries a group's recipe never uses (the SR-STE
  lambda of a non-SR-STE group, the gradient scale unless MdGf 'scaled'), so
  the optax transforms skip those groups at trace time instead of applying
  a scale of 1 or a term of 0 at every step."""
  out = {}
  for g in schedule.sparse_groups:
    keep = {'alpha'}
    if g.recipe == 'srste':
      keep.add('srste_lambda')
    if g.is_mdgf and g.mdgf_grad == 'scaled':
      keep.add('grad_scale')
    out[g.name] = {k: v for k, v in values[g.name].items() if k in keep}
  return out


def layer_collection(values: Mapping[str, Mapping[str, jnp.ndarray]],
                     plan: SparsityPlan,
                     layer_paths: tuple[str, ...]) -> dict:
  """Builds the `sparsity` variable collection for `model.apply`.

  Args:
    values: `SparsitySchedule.values(step)`.
    plan: the current plan.
    layer_paths: '/'-joined module paths of every layer that owns a kernel
      (see `pgf.sparsity.kernel_layer_paths`).

  Returns:
    A nested dict mirroring the module tree: for each sparse layer,
    {'alpha', 'grad_scale', 'srste_lambda'} of its group.
  """
  tree: dict = {}
  for path in layer_paths:
    rule = plan.lookup(path)
    if rule is None:
      continue
    node = tree
    for part in path.split('/'):
      node = node.setdefault(part, {})
    node.update(values[rule.group])
  return tree

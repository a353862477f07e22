"""FLOPs accounting for iso-FLOPs comparisons (docs/recipes.md section 7).

Let f be the dense forward FLOPs of a sparse layer and d = N/M.
  dense step:            3f  (forward, activation gradient, weight gradient)
  hard-mask step:        (2d + 1) f  (STE, SR-STE, an SdGf frame, MdGf once
                         alpha <= alpha_threshold): the forward and the
                         activation gradient use the N:M weights, the dense
                         weight still needs its full gradient.
  MdGf, alpha > thresh:  3f  (the forward is effectively dense).
  inference:             d f.
Layers that are not sparse always cost dense (3x forward to train). This is
a reconstruction, not the paper's stated formula: the conventions are the
arguments of `flops_report` (alpha_threshold, backward_factor).

The forward FLOPs of the whole model come from XLA's cost analysis of the
lowered (not compiled) forward pass; the share of each sparse layer is
2 * rows * kernel size, measured by intercepting the layers abstractly.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax

from pgf import config_lib
from pgf import sparsity as sp


def sparse_layer_forward_flops(model: nn.Module, inputs: tuple,
                               kwargs: dict | None = None, *,
                               train: bool = False) -> dict[str, float]:
  """Dense forward FLOPs of every sparse-capable kernel, for one call.

  Args:
    model: a pgf model.
    inputs: positional model inputs (arrays or ShapeDtypeStructs).
    kwargs: keyword model inputs.

  Returns:
    '/'-joined kernel path -> 2 * (output positions) * (kernel size).
  """
  kwargs = kwargs or {}
  records: dict[str, float] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(
        module, (sp.SparseDenseGeneral, sp.SparseConv)):
      kernel = module.get_variable('params', 'kernel')
      kernel = getattr(kernel, 'value', kernel)
      if isinstance(module, sp.SparseConv):
        features = kernel.shape[-1]
      else:
        f = module.features
        features = math.prod((f,) if isinstance(f, int) else f)
      rows = math.prod(out.shape) // features
      path = '/'.join(module.scope.path) + '/kernel'
      records[path] = records.get(path, 0.0) + 2.0 * rows * math.prod(
          kernel.shape)
    return out

  def fwd(rng):
    variables = model.init(rng, *inputs, train=False, **kwargs)
    with nn.intercept_methods(interceptor):
      return model.apply(variables, *inputs, train=train, **kwargs)

  jax.eval_shape(fwd, jax.random.key(0))
  return records


def model_forward_flops(model: nn.Module, inputs: tuple,
                        kwargs: dict | None = None) -> float:
  """Forward FLOPs of the whole model from XLA's cost analysis (lowered)."""
  kwargs = kwargs or {}
  variables = jax.eval_shape(
      lambda r: model.init(r, *inputs, train=False, **kwargs),
      jax.random.key(0))
  lowered = jax.jit(lambda v, x, kw: model.apply(v, *x, train=False, **kw)
                    ).lower(variables, inputs, kwargs)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


@dataclasses.dataclass(frozen=True)
class FlopsReport:
  """Per-example FLOPs of one run (multiply by the batch for a step)."""

  batch_size: int
  forward_dense: float              # whole model, dense, per example
  sparse_forward_dense: float       # the sparse layers' share (f, summed)
  inference: float                  # with N:M sparse layers, final plan
  step_by_phase: dict               # label -> per-example train FLOPs
  steps_by_phase: dict              # label -> number of steps
  total_train: float                # the whole run, all steps, all examples
  total_train_dense: float          # the same run trained dense

  def describe(self) -> str:
    b, fwd, sparse = self.batch_size, self.forward_dense, (
        self.sparse_forward_dense)
    lines = [
        f'FLOPs (per example; x{b} per step): forward dense {fwd:.4g} '
        f'(sparse layers {sparse:.4g}, {sparse / max(fwd, 1):.1%}); '
        f'inference with N:M {self.inference:.4g} '
        f'({self.inference / max(self.forward_dense, 1):.3f}x dense)']
    for label, flops in self.step_by_phase.items():
      lines.append(f'  train step, {label}: {flops * b:.4g} per step '
                   f'({flops / (3 * self.forward_dense):.3f}x dense), '
                   f'{self.steps_by_phase[label]} steps')
    lines.append(f'  whole run: {self.total_train:.4g} training FLOPs '
                 f'({self.total_train / max(self.total_train_dense, 1):.3f}x '
                 'the dense run)')
    return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class ModelCosts:
  """Dense forward FLOPs of one example: the whole model and each sparse-
  capable kernel ('/'-joined parameter path -> f)."""

  forward: float
  kernels: dict[str, float]


def model_costs(task) -> ModelCosts:
  """ModelCosts of the task's model (lowers its forward pass once)."""
  model = task.build_model(None)
  inputs, kwargs = task.model_inputs(task.dummy_batch(1))
  return ModelCosts(forward=model_forward_flops(model, inputs, kwargs),
                    kernels=sparse_layer_forward_flops(model, inputs, kwargs))


def flops_report(config, task, schedule: sp.SparsitySchedule, run,
                 *, costs: ModelCosts | None = None,
                 alpha_threshold: float = 1e-2,
                 backward_factor: float = 2.0) -> FlopsReport:
  """FLOPs of every phase of a run under the recipe (docs/recipes.md
  section 7).

  Args:
    costs: the model's `model_costs(task)` (computed if None).
    alpha_threshold: steps whose alpha exceeds this count as dense (MdGf
      early on: the forward is effectively dense).
    backward_factor: backward FLOPs / forward FLOPs of a dense layer (2).
  """
  costs = model_costs(task) if costs is None else costs
  layer_f, total_f = costs.kernels, costs.forward
  fwd_bwd = 1.0 + backward_factor

  def cost(plan: sp.SparsityPlan, dense_groups: set) -> tuple[float, float]:
    """(train, inference) per-example FLOPs under `plan`."""
    train, infer = fwd_bwd * total_f, total_f
    for path, f in layer_f.items():
      rule = plan.lookup(path)
      if rule is None:
        continue
      d = rule.nm.density
      infer -= (1 - d) * f
      if rule.group not in dense_groups:
        # forward d f + activation gradient d f + weight gradient f.
        train -= fwd_bwd * f - (2 * d + (backward_factor - 1)) * f
    return train, infer

  # The cost changes only where the plan changes or an MdGf alpha crosses
  # the threshold: evaluate one step per segment between such boundaries.
  bounds = {0, run.total, schedule.sparse_start, schedule.fine_tune_start}
  for g in schedule.sparse_groups:
    bounds.update(_sdgf_starts(schedule, g))
    # A step costs dense while the recipe's alpha exceeds the threshold.
    t = g.recipe_def.steps_until(alpha_threshold, g.decay)
    if t is not None:
      bounds.add(schedule.sparse_start + t)
  bounds = sorted(b for b in bounds if 0 <= b <= run.total)
  step_by_phase, steps_by_phase = {}, {}
  total = 0.0
  for start, stop in zip(bounds, bounds[1:]):
    plan = schedule.plan(start)
    phase = schedule.phase(start)
    dense_groups = {
        g.name for g in schedule.sparse_groups
        if phase == 'sparse'
        and schedule.alpha_host(start, g) > alpha_threshold}
    label = f'{phase} {plan.describe()}' + (
        f' (alpha > {alpha_threshold:g}: dense for '
        f'{",".join(sorted(dense_groups))})' if dense_groups else '')
    if label not in step_by_phase:
      step_by_phase[label] = cost(plan, dense_groups)[0]
      steps_by_phase[label] = 0
    steps_by_phase[label] += stop - start
    total += step_by_phase[label] * (stop - start)
  return FlopsReport(
      batch_size=config.batch_size, forward_dense=total_f,
      sparse_forward_dense=sum(
          f for p, f in layer_f.items()
          if schedule.final_plan().lookup(p) is not None),
      inference=cost(schedule.final_plan(), set())[1],
      step_by_phase=step_by_phase, steps_by_phase=steps_by_phase,
      total_train=total * config.batch_size,
      total_train_dense=fwd_bwd * total_f * run.total * config.batch_size)


def _sdgf_starts(schedule: sp.SparsitySchedule, group: sp.GroupSpec):
  """First step of every SdGf frame of `group` (bisection on frame_index)."""
  frames = sp.sdgf_frames(group)
  starts = []
  for i in range(1, len(frames)):
    lo, hi = schedule.sparse_start, schedule.fine_tune_start
    while lo < hi:
      mid = (lo + hi) // 2
      if schedule.frame_index(mid, group) >= i:
        hi = mid
      else:
        lo = mid + 1
    starts.append(lo)
  return starts


def iso_flops_config(config, target_train_flops: float, *, costs: ModelCosts,
                     task, num_train_examples: int,
                     alpha_threshold: float = 1e-2):
  """A copy of `config` whose run costs `target_train_flops` training FLOPs.

  Only the run length changes: `total_steps` becomes the smallest number of
  steps whose training FLOPs reach the target. Durations written as
  fractions or percentages (warm-up, phases, SdGf frames) stretch with it,
  and every decaying recipe's coefficient is rescaled by old / new length,
  so alpha is the same function of the fraction of the run (its dense-cost
  share stays the same). Durations in steps or epochs do not change.

  Args:
    config: the config to stretch or shrink (e.g. SR-STE at 1:32).
    target_train_flops: e.g. `flops_report(...).total_train` of another run.
    costs: `model_costs(task)` of the model (the same model as `config`'s).
    task: `config`'s task.
    num_train_examples: the dataset size (for epochs).

  Returns:
    (new config, its FlopsReport).
  """
  base_run = config_lib.resolve_run(config,
                                    num_train_examples=num_train_examples)

  def at(total: int):
    c = config.copy_and_resolve_references()
    c.total_steps = str(total)
    for role in config_lib.ROLES:
      g = c.sparsity[role]
      if sp.RECIPES[g.recipe].decays:
        g.decay = config.sparsity[role].decay * base_run.total / total
    run = config_lib.resolve_run(c, num_train_examples=num_train_examples)
    schedule = config_lib.build_schedule(c, run)
    return c, flops_report(c, task, schedule, run, costs=costs,
                           alpha_threshold=alpha_threshold)

  lo, hi = 1, max(base_run.total, 1)
  while at(hi)[1].total_train < target_train_flops:
    lo, hi = hi, hi * 2
  while lo < hi:
    mid = (lo + hi) // 2
    if at(mid)[1].total_train >= target_train_flops:
      hi = mid
    else:
      lo = mid + 1
  return at(lo)

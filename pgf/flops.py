"""FLOPs accounting for iso-FLOPs comparisons (method.md section 7).

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

from pgf import sparsity as sp


def sparse_layer_forward_flops(model: nn.Module, inputs: tuple,
                               *, train: bool = False) -> dict[str, float]:
  """Dense forward FLOPs of every sparse-capable layer, for one call.

  Args:
    model: a pgf model.
    inputs: positional model inputs (arrays or ShapeDtypeStructs).

  Returns:
    '/'-joined layer path -> 2 * (output positions) * (kernel size).
  """
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
      path = '/'.join(module.scope.path)
      records[path] = records.get(path, 0.0) + 2.0 * rows * math.prod(
          kernel.shape)
    return out

  def fwd(rng):
    variables = model.init(rng, *inputs, train=False)
    with nn.intercept_methods(interceptor):
      return model.apply(variables, *inputs, train=train)

  jax.eval_shape(fwd, jax.random.key(0))
  return records


def model_forward_flops(model: nn.Module, inputs: tuple) -> float:
  """Forward FLOPs of the whole model from XLA's cost analysis (lowered)."""
  variables = jax.eval_shape(
      lambda r: model.init(r, *inputs, train=False), jax.random.key(0))
  lowered = jax.jit(lambda v, *x: model.apply(v, *x, train=False)).lower(
      variables, *inputs)
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


def flops_report(config, task, schedule: sp.SparsitySchedule, run,
                 *, alpha_threshold: float = 1e-2,
                 backward_factor: float = 2.0) -> FlopsReport:
  """FLOPs of every phase of a run under the recipe (method.md section 7).

  Args:
    alpha_threshold: MdGf steps with alpha above this count as dense.
    backward_factor: backward FLOPs / forward FLOPs of a dense layer (2).
  """
  batch = task.dummy_batch(1)
  model = task.build_model(None)
  if config.model.name == 't5':
    inputs = (batch['encoder_input_tokens'], batch['decoder_input_tokens'])
  else:
    inputs = (batch['image'],)
  layer_f = sparse_layer_forward_flops(model, inputs)
  total_f = model_forward_flops(model, inputs)
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
    if g.is_mdgf and g.decay > 0:
      t = (math.log(1 / alpha_threshold) if g.recipe == 'mdgf_exp'
           else 1 - alpha_threshold) / g.decay
      bounds.add(schedule.sparse_start + math.floor(t) + 1)
  bounds = sorted(b for b in bounds if 0 <= b <= run.total)
  step_by_phase, steps_by_phase = {}, {}
  total = 0.0
  for start, stop in zip(bounds, bounds[1:]):
    plan = schedule.plan(start)
    phase = schedule.phase(start)
    dense_groups = {
        g.name for g in schedule.sparse_groups
        if g.is_mdgf and phase == 'sparse'
        and _alpha(g, start - schedule.sparse_start) > alpha_threshold}
    label = f'{phase} {plan.describe()}' + (
        f' (MdGf alpha > {alpha_threshold:g}: dense for '
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


def _alpha(group: sp.GroupSpec, t: int) -> float:
  if group.recipe == 'mdgf_linear':
    return max(1.0 - group.decay * t, 0.0)
  return math.exp(-group.decay * t)


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

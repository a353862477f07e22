"""Startup validation and the conversion of a config into run quantities.

`validate_config` runs before any compile or data work and raises ValueError
naming the key, the bad value and what is allowed; the task
(`pgf.tasks.<config.task>`) checks its own keys. `resolve_run` turns
durations into steps once the dataset size is known, and `build_schedule`
makes the `SparsitySchedule` (docs/recipes.md sections 2-3).
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections

from pgf import durations
from pgf import tasks
from pgf.models import available as available_models
from pgf.models import get_model_module
from pgf.sparsity import NM
from pgf.sparsity import GroupSpec
from pgf.sparsity import SparsitySchedule
from pgf.sparsity import recipes
from pgf.sparsity.schedules import GROUP_AXES

ROLES = ('ff', 'q', 'k', 'v', 'o')


def _choice(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{key}={value!r} is not allowed; choose one of '
                     f'{tuple(allowed)}.')


def _positive(key: str, value, *, zero_ok: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      value < 0 if zero_ok else value <= 0):
    raise ValueError(f'{key}={value!r} must be '
                     f'{">= 0" if zero_ok else "> 0"}.')


def _duration(key: str, value) -> None:
  # Parse with dummy totals so only the syntax is checked here.
  durations.to_steps(value, total_steps=1, steps_per_epoch=1, key=key)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every setting that needs neither data nor devices."""
  m = config.model
  _choice('model.name', m.name, available_models())
  module = get_model_module(m.name)
  try:
    module.decode_variant(m.variant)
  except ValueError as e:
    raise ValueError(f'model.variant={m.variant!r}: {e}') from None
  _choice('model.dtype', m.dtype, ('float32', 'bfloat16'))
  _choice('model.pool', m.pool, ('tok', 'gap'))
  for key in ('dropout', 'drop_path'):
    if not 0 <= m[key] < 1:
      raise ValueError(f'model.{key}={m[key]!r} must lie in [0, 1).')
  tasks.task_class(config.task).validate(config)

  d = config.data
  if not d.name:
    raise ValueError("data.name='' : name a TFDS dataset, e.g. 'pgf_digits'.")
  _positive('data.num_workers', d.num_workers, zero_ok=True)
  if not isinstance(d.shuffle_seed, int) or d.shuffle_seed < -1:
    raise ValueError(f'data.shuffle_seed={d.shuffle_seed!r} must be -1 (use '
                     'the config seed) or an integer >= 0.')

  _positive('batch_size', config.batch_size)
  _positive('eval_batch_size', config.eval_batch_size)
  _positive('grad_accum_steps', config.grad_accum_steps)
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by '
                     f'grad_accum_steps={config.grad_accum_steps}.')
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f'label_smoothing={config.label_smoothing} must lie in '
                     '[0, 1).')
  for key in ('total_steps', 'log_every', 'eval_every', 'checkpoint_every',
              'optimizer.warmup', 'optimizer.cooldown', 'sparsity.dense_warmup',
              'sparsity.fine_tune'):
    section, _, name = key.rpartition('.')
    _duration(key, (config[section] if section else config)[name])
  _positive('keep_checkpoints', config.keep_checkpoints)

  o = config.optimizer
  _choice('optimizer.name', o.name, ('adamw', 'adafactor'))
  _choice('optimizer.schedule', o.schedule, ('cosine', 'rsqrt', 'constant'))
  _choice('optimizer.lr_batch_scaling', o.lr_batch_scaling,
          ('none', 'sqrt', 'linear'))
  _positive('optimizer.lr', o.lr)
  _positive('optimizer.min_lr', o.min_lr, zero_ok=True)
  for key in ('b1', 'b2'):
    if not 0 <= o[key] < 1:
      raise ValueError(f'optimizer.{key}={o[key]} must lie in [0, 1).')
  _positive('optimizer.eps', o.eps)
  _positive('optimizer.weight_decay', o.weight_decay, zero_ok=True)
  _positive('optimizer.clip_norm', o.clip_norm, zero_ok=True)

  s = config.sparsity
  for role in ROLES:
    g = s[role]
    key = f'sparsity.{role}'
    _choice(f'{key}.recipe', g.recipe, recipes.RECIPES)
    _choice(f'{key}.sdgf', g.sdgf, recipes.SDGF_MODES)
    _choice(f'{key}.mdgf_grad', g.mdgf_grad, recipes.MDGF_GRADS)
    _choice(f'{key}.axis', g.axis, GROUP_AXES)
    if not recipes.RECIPES[g.recipe].masked:
      continue
    try:
      NM(g.n, g.m)
    except ValueError as e:
      raise ValueError(f'{key}.n={g.n}, {key}.m={g.m}: {e}') from None
    if g.layers:
      try:
        re.compile(g.layers)
      except re.error as e:
        raise ValueError(f'{key}.layers={g.layers!r} is not a regex: '
                         f'{e}') from None
    if g.sdgf == 'custom':
      _parse_frames(key, g.custom_frames, total_steps=1, steps_per_epoch=1)
    # GroupSpec validates the remaining combinations (frame maps, signs).
    _group_spec(role, g, layers='.', total_steps=1, steps_per_epoch=1)

  dg = config.diagnostics
  if dg.enabled:
    _positive('diagnostics.sub_batches', dg.sub_batches)
    if dg.sub_batches < 2 or (config.batch_size // config.grad_accum_steps
                              ) % dg.sub_batches:
      raise ValueError(
          f'diagnostics.sub_batches={dg.sub_batches} must be >= 2 and divide '
          f'the micro-batch ({config.batch_size // config.grad_accum_steps} '
          'examples).')
    try:
      re.compile(dg.layers)
    except re.error as e:
      raise ValueError(f'diagnostics.layers={dg.layers!r} is not a regex: '
                       f'{e}') from None

  mesh = config.mesh
  if not (mesh.data == -1 or (isinstance(mesh.data, int) and mesh.data >= 1)):
    raise ValueError(f'mesh.data={mesh.data} must be -1 (all) or >= 1.')
  _positive('mesh.model', mesh.model)
  for rule in mesh.rules:
    if len(rule) != 2 or not _mesh_axes_ok(rule[1]):
      raise ValueError(f'mesh.rules entry {rule!r} must be (logical name, '
                       "mesh axes), the axes 'data', 'model', None or a tuple "
                       'of those.')


def _mesh_axes_ok(axes) -> bool:
  if axes is None or axes in ('data', 'model'):
    return True
  return isinstance(axes, tuple) and all(a in ('data', 'model') for a in axes)


def _parse_frames(key: str, text: str, *, total_steps: int,
                  steps_per_epoch: int | None) -> tuple[tuple[int, NM], ...]:
  frames = []
  for item in filter(None, (t.strip() for t in text.split(','))):
    parts = item.split(':')
    if len(parts) != 3:
      raise ValueError(f'{key}.custom_frames item {item!r} must be '
                       "'start:N:M', e.g. '25%:2:8'.")
    start = durations.to_steps(parts[0], total_steps=total_steps,
                               steps_per_epoch=steps_per_epoch,
                               key=f'{key}.custom_frames')
    try:
      nm = NM(int(parts[1]), int(parts[2]))
    except ValueError as e:
      raise ValueError(f'{key}.custom_frames item {item!r}: {e}') from None
    frames.append((start, nm))
  return tuple(frames)


def _group_axes(key: str, text: str) -> tuple[int | str, ...] | None:
  """'' -> None; '0' or '0,1' -> axis numbers; 'embed' -> logical names."""
  items = [t.strip() for t in text.split(',') if t.strip()]
  if not items:
    return None
  out = []
  for item in items:
    if re.fullmatch(r'-?\d+', item):
      out.append(int(item))
    elif re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', item):
      out.append(item)
    else:
      raise ValueError(f'{key}.group_axes={text!r}: {item!r} is neither an '
                       'axis number nor a logical axis name.')
  return tuple(out)


def _group_spec(role: str, g, *, layers: str, total_steps: int,
                steps_per_epoch: int | None) -> GroupSpec:
  key = f'sparsity.{role}'
  return GroupSpec(
      name=role, layers=layers, nm=NM(g.n, g.m), recipe=g.recipe,
      sdgf=g.sdgf, custom_frames=_parse_frames(
          key, g.custom_frames, total_steps=total_steps,
          steps_per_epoch=steps_per_epoch) if g.sdgf == 'custom' else (),
      decay=g.decay, mdgf_grad=g.mdgf_grad, srste_lambda=g.srste_lambda,
      axis=g.axis, group_axes=_group_axes(key, g.group_axes))


@dataclasses.dataclass(frozen=True)
class RunSteps:
  """Every duration of a run, in steps."""

  total: int
  steps_per_epoch: int
  warmup: int
  cooldown: int
  log_every: int
  eval_every: int
  checkpoint_every: int


def resolve_run(config, *, num_train_examples: int) -> RunSteps:
  """Converts the run's durations into steps (needs the dataset size)."""
  steps_per_epoch = max(num_train_examples // config.batch_size, 1)
  total = durations.to_steps(config.total_steps, total_steps=None,
                             steps_per_epoch=steps_per_epoch,
                             key='total_steps')
  if total < 1:
    raise ValueError(f'total_steps={config.total_steps!r} gives {total} '
                     'steps; a run needs at least 1.')

  def conv(key, value, minimum=0):
    steps = durations.to_steps(value, total_steps=total,
                               steps_per_epoch=steps_per_epoch, key=key)
    return max(steps, minimum)

  return RunSteps(
      total=total, steps_per_epoch=steps_per_epoch,
      warmup=conv('optimizer.warmup', config.optimizer.warmup),
      cooldown=conv('optimizer.cooldown', config.optimizer.cooldown),
      log_every=conv('log_every', config.log_every, 1),
      eval_every=conv('eval_every', config.eval_every, 1),
      checkpoint_every=conv('checkpoint_every', config.checkpoint_every, 1))


def build_schedule(config, run: RunSteps) -> SparsitySchedule:
  """The run's SparsitySchedule; roles use the model's default regexes."""
  defaults = get_model_module(config.model.name).SPARSITY_LAYERS
  groups = []
  for role in ROLES:
    g = config.sparsity[role]
    if not recipes.RECIPES[g.recipe].masked:
      continue
    groups.append(_group_spec(role, g, layers=g.layers or defaults[role],
                              total_steps=run.total,
                              steps_per_epoch=run.steps_per_epoch))
  conv = lambda key, v: durations.to_steps(
      v, total_steps=run.total, steps_per_epoch=run.steps_per_epoch, key=key)
  return SparsitySchedule(
      groups=tuple(groups), total_steps=run.total,
      dense_steps=conv('sparsity.dense_warmup', config.sparsity.dense_warmup),
      fine_tune_steps=conv('sparsity.fine_tune', config.sparsity.fine_tune))

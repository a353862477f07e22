r"""Train and evaluate an N:M sparse Transformer: one linear loop.

  python -m pgf.train --config=configs/vit_base_1to16_mdgf.py --workdir=DIR
  python -m pgf.train                      # the embedded default, offline
  python -m pgf.train --config=... --dry_run

Rerunning with the same workdir resumes from the latest checkpoint (train
state and data iterator position), so an interrupted run ends where an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import tensorflow_datasets as tfds

from pgf import checkpointing
from pgf import config_lib
from pgf import data as data_lib
from pgf import metrics as metrics_lib
from pgf import optim
from pgf import sharding
from pgf import sparsity as sp
from pgf import tasks

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs', 'default.py')


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; all of it is checkpointed.

  log_masks: the N:M masks of the sparse kernels at the last log (all True
    before the first), for the 'mask change since the last log' metric.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  log_masks: Any


def _nest(flat: dict[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in flat.items()})


def _flat(tree) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


@dataclasses.dataclass
class Setup:
  """What the loop needs, built and checked before any compile."""

  config: Any
  info: Any
  run: config_lib.RunSteps
  schedule: sp.SparsitySchedule
  task: Any
  mesh: Any
  rules: tuple
  tx: Any
  lr_fn: Any
  infos: dict
  layer_paths: tuple
  abstract_state: Any        # boxed, from eval_shape
  state_sharding: Any
  sparse_layers: dict        # layer path -> group, under the final plan


def plan_run(config, *, info=None):
  """Validation and the run's quantities: no devices, compile or data work
  beyond reading the dataset's metadata (or `info`, given by a dry run)."""
  config_lib.validate_config(config)
  if info is None:
    data_lib.check_available(config)
    info = data_lib.dataset_info(config)
  run = config_lib.resolve_run(config,
                               num_train_examples=info.num_train_examples)
  schedule = config_lib.build_schedule(config, run)
  task = tasks.get_task(config, info)
  return info, run, schedule, task


def abstract_model(config, run, schedule, task):
  """Abstract (eval_shape) boxed train state and kernel facts; checks that
  every sparsity rule matches layers whose group lengths M divides."""
  tx, lr_fn = optim.make_optimizer(config, run)
  final = schedule.final_plan()
  model = task.build_model(final)
  batch = task.dummy_batch(1)

  def init_boxed(rng):
    params = model.init(rng, *_init_args(task, batch), train=False)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(nn.unbox(params)), log_masks={})

  abstract = jax.eval_shape(init_boxed, jax.random.key(0))
  infos = sp.kernel_infos(abstract.params)
  plans = schedule.distinct_plans() + (final,)
  sp.check_placement(plans, infos)
  sparse_layers = {p: r.group for p, r in sp.matched_layers(final,
                                                            infos).items()}
  mask_template = _nest({
      f'{p}/kernel': jax.ShapeDtypeStruct(infos[p].shape, jnp.bool_)
      for p in sparse_layers})
  abstract = abstract.replace(log_masks=mask_template)
  return abstract, infos, sparse_layers, tx, lr_fn


def setup(config, *, devices=None) -> Setup:
  """Validates everything that can be checked without compiling."""
  info, run, schedule, task = plan_run(config)
  mesh = sharding.make_mesh(config, devices)
  rules = sharding.logical_rules(config)
  processes = jax.process_count()
  for key in ('batch_size', 'eval_batch_size'):
    size = config[key] // (config.grad_accum_steps if key == 'batch_size'
                           else 1)
    if size % mesh.shape['data'] or config[key] % processes:
      raise ValueError(
          f'{key}={config[key]} (per micro-batch {size}) must be divisible '
          f'by the data axis ({mesh.shape["data"]} devices) and the '
          f'{processes} processes.')
  abstract, infos, sparse_layers, tx, lr_fn = abstract_model(
      config, run, schedule, task)
  sp.check_sharding(schedule.distinct_plans(), infos,
                    sharding.logical_to_mesh_axis(config), dict(mesh.shape))
  state_sharding = sharding.shardings_of(abstract, mesh, rules)
  state_sharding = state_sharding.replace(
      opt_state=sharding.optimizer_state_shardings(
          tx, abstract.opt_state, nn.unbox(abstract.params),
          state_sharding.params, mesh))
  # Masks follow their kernel's sharding.
  kernel_sh = _flat(state_sharding.params)
  mask_sh = _nest({f'{p}/kernel': kernel_sh[f'{p}/kernel']
                   for p in sparse_layers})
  state_sharding = state_sharding.replace(log_masks=mask_sh)
  return Setup(config=config, info=info, run=run, schedule=schedule,
               task=task, mesh=mesh, rules=rules, tx=tx, lr_fn=lr_fn,
               infos=infos, layer_paths=tuple(sorted(infos)),
               abstract_state=abstract, state_sharding=state_sharding,
               sparse_layers=sparse_layers)


def _init_args(task, batch):
  if isinstance(task, tasks.SpanCorruption):
    return batch['encoder_input_tokens'], batch['decoder_input_tokens']
  return (batch['image'],)


def init_state(s: Setup, rng) -> TrainState:
  """Initialises parameters directly in their shardings."""
  model = s.task.build_model(s.schedule.final_plan())
  batch = s.task.dummy_batch(1)

  def init(rng):
    variables = model.init(rng, *_init_args(s.task, batch), train=False)
    params = nn.unbox(variables['params'])
    masks = _nest({f'{p}/kernel': jnp.ones(s.infos[p].shape, jnp.bool_)
                   for p in s.sparse_layers})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=s.tx.init(params), log_masks=masks)

  with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
    return jax.jit(init, out_shardings=s.state_sharding)(rng)


def make_train_step(s: Setup):
  """The jitted step, compiled once per distinct SparsityPlan."""
  task, schedule, accum = s.task, s.schedule, s.config.grad_accum_steps
  base_rng = jax.random.key(s.config.seed + 1)

  def step_fn(state: TrainState, batch, plan: sp.SparsityPlan):
    model = task.build_model(plan)
    values = schedule.values(state.step)
    coll = sp.layer_collection(sp.needed_values(schedule, values), plan,
                               s.layer_paths)
    rng = jax.random.fold_in(base_rng, state.step)

    def loss_fn(params, mb, rng):
      variables = {'params': params, sp.SCHEDULE_COLLECTION: coll}
      logits, mutated = task.apply(model, variables, mb, train=True,
                                   rngs={'dropout': rng},
                                   mutable=[sp.MASK_COLLECTION])
      loss, metrics = task.loss(logits, mb)
      return loss, (metrics, mutated.get(sp.MASK_COLLECTION, {}))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (_, (metrics, masks)), grads = grad_fn(state.params, batch, rng)
    else:
      # Micro-batch i takes examples i, i + accum, ...: every micro-batch
      # stays spread over the data axis.
      mbs = jax.tree.map(
          lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
      first = jax.tree.map(lambda x: x[0], mbs)
      (_, (metrics, masks)), grads = grad_fn(state.params, first, rng)

      def body(carry, mb_i):
        mb, i = mb_i
        g_acc, m_acc = carry
        (_, (m, _)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_acc, g),
                jax.tree.map(jnp.add, m_acc, m)), None

      rest = jax.tree.map(lambda x: x[1:], mbs)
      (grads, metrics), _ = jax.lax.scan(
          body, (grads, metrics), (rest, jnp.arange(1, accum)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(lambda m: m / accum, metrics)
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params,
                                     masks=masks, sparsity=coll)
    params = jax.tree.map(jnp.add, state.params, updates)
    metrics = dict(metrics)
    metrics['grad_norm'] = optax_global_norm(grads)
    metrics['lr'] = s.lr_fn(state.step)
    for group, vals in values.items():
      metrics[f'{group}/alpha'] = vals['alpha']
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
    return new_state, metrics

  batch_sh = sharding.batch_sharding(s.mesh)
  jitted = jax.jit(step_fn, static_argnums=2, donate_argnums=0,
                   in_shardings=(s.state_sharding, batch_sh),
                   out_shardings=(s.state_sharding,
                                  sharding.replicated(s.mesh)))

  def train_step(state, batch, plan):
    with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
      return jitted(state, batch, plan)

  train_step.jitted = jitted
  return train_step


def optax_global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def make_sparsity_stats(s: Setup):
  """Per group: density of the effective weights and the fraction of mask
  entries that changed since the last log; stores the masks as log masks.

  Runs only at log steps, so the train step itself carries no masks: they
  are recomputed here from the params (the same pure function of the
  weights the layers use).
  """
  schedule = s.schedule

  def stats_fn(state: TrainState, plan: sp.SparsityPlan):
    values = schedule.values(state.step - 1)
    params, old = _flat(state.params), _flat(state.log_masks)
    masks = sp.masks_from_params(state.params, plan, s.infos)
    new_log = dict(old)
    out, sums = {}, {}
    for path, group in s.sparse_layers.items():
      w, o = params[f'{path}/kernel'], old[f'{path}/kernel']
      m = masks.get(path, jnp.ones(w.shape, bool))  # Dense phase: no mask.
      alpha = values[group]['alpha']
      nonzero = jnp.where(m, w != 0, (w != 0) & (alpha != 0))
      acc = sums.setdefault(group, [0.0, 0.0, 0])
      acc[0] = acc[0] + nonzero.sum()
      acc[1] = acc[1] + (m != o).sum()
      acc[2] += w.size
      new_log[f'{path}/kernel'] = m
    for group, (nz, changed, size) in sums.items():
      out[f'sparsity/{group}/density'] = nz / size
      out[f'sparsity/{group}/mask_change'] = changed / size
    return out, state.replace(log_masks=_nest(new_log))

  jitted = jax.jit(stats_fn, static_argnums=1, donate_argnums=0,
                   out_shardings=(sharding.replicated(s.mesh),
                                  s.state_sharding))

  def stats(state, plan):
    with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
      return jitted(state, plan)

  return stats


def make_eval_step(s: Setup):
  task, schedule = s.task, s.schedule

  def eval_fn(params, batch, plan):
    model = task.build_model(plan)
    coll = sp.layer_collection(schedule.values(0, train=False), plan,
                               s.layer_paths)
    logits = task.apply(model, {'params': params,
                                sp.SCHEDULE_COLLECTION: coll}, batch,
                        train=False)
    return task.eval_sums(logits, batch)

  jitted = jax.jit(eval_fn, static_argnums=2,
                   in_shardings=(s.state_sharding.params,
                                 sharding.batch_sharding(s.mesh)),
                   out_shardings=sharding.replicated(s.mesh))

  def eval_step(params, batch, plan):
    with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
      return jitted(params, batch, plan)

  return eval_step


def evaluate(s: Setup, eval_step, state: TrainState, workdir: str
             ) -> dict[str, float]:
  """One pass over the eval split with the hard mask of the current plan."""
  step = int(state.step)
  plan = s.schedule.eval_plan(max(step - 1, 0))
  totals: dict[str, float] = {}
  first = None
  for local in data_lib.make_eval_iterable(
      s.config, global_batch_size=s.config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count()):
    batch = sharding.global_batch(local, sharding.batch_sharding(s.mesh))
    sums = jax.device_get(eval_step(state.params, batch, plan))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    if first is None:
      first = local
  out = {f'eval/{k}': v for k, v in tasks.mean_of_sums(totals).items()}
  if first is not None and jax.process_index() == 0:
    model = s.task.build_model(plan)
    params = sp.hard_masked_params(jax.device_get(state.params), plan,
                                   s.infos)
    s.task.eval_examples(model, {'params': params}, first, workdir, step)
  return out


class NonFiniteLossError(FloatingPointError):
  pass


def _check_finite(pending: list[tuple[int, dict]]) -> None:
  for step, m in pending:
    loss = float(m['loss'])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f'Training loss became {loss} at step {step}; stopping without '
          'writing a checkpoint of this state. Lower optimizer.lr, enable '
          'optimizer.clip_norm, or resume from the last checkpoint.')


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains, evaluates and checkpoints; returns the final metrics."""
  s = setup(config)
  logging.info('Mesh %s; %d processes; run of %d steps (%d per epoch).',
               dict(s.mesh.shape), jax.process_count(), s.run.total,
               s.run.steps_per_epoch)
  logging.info('Sparsity plans: %s', [p.describe() for p in
                                      s.schedule.distinct_plans()])
  state = init_state(s, jax.random.key(config.seed))
  train_iter = data_lib.make_train_iterator(
      config, global_batch_size=config.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  start = ckpt.latest_step()
  host = {'pending': []}
  if start is not None:
    logging.info('Resuming from checkpoint at step %d in %s.', start,
                 ckpt.directory)
    state, host = ckpt.restore(start, state, train_iter)
  start = int(state.step)
  writer = metrics_lib.MetricWriter(
      workdir, enabled=jax.process_index() == 0, resume_step=start)
  if start == 0:
    _write_run_info(s, workdir)

  train_step = make_train_step(s)
  stats_step = make_sparsity_stats(s)
  eval_step = make_eval_step(s)
  progress = metrics_lib.Progress(s.run.total, start)
  batch_sh = sharding.batch_sharding(s.mesh)
  # Per-step train metrics since the last log; saved with checkpoints so
  # that a resumed run logs the same means as an uninterrupted one.
  pending: list[tuple[int, dict]] = [
      (st, m) for st, m in host['pending']]
  final: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  t0 = time.monotonic()
  if start == 0:
    # The untrained model's evaluation: the baseline every curve starts at.
    writer.write(0, evaluate(s, eval_step, state, workdir))
  for step in range(start, s.run.total):
    plan = s.schedule.plan(step)
    batch = sharding.global_batch(next(train_iter), batch_sh)
    state, metrics = train_step(state, batch, plan)
    done = step + 1
    pending.append((done, metrics))
    is_last = done == s.run.total
    if done % s.run.log_every == 0 or is_last:
      pending = jax.device_get(pending)
      _check_finite(pending)
      summary = {f'train/{k}': float(np.mean([m[k] for _, m in pending]))
                 for k in pending[-1][1]}
      summary = {k.replace('train/', 'sparsity/') if k.endswith('/alpha')
                 else k: v for k, v in summary.items()}
      if s.sparse_layers:
        stats, state = stats_step(state, plan)
        summary.update(jax.device_get(stats))
        for rule in plan.rules:
          summary[f'sparsity/{rule.group}/n'] = rule.nm.n
          summary[f'sparsity/{rule.group}/m'] = rule.nm.m
      summary['sparsity/phase'] = ('dense', 'sparse', 'fine_tune').index(
          s.schedule.phase(step))
      summary.update(progress.report(done))
      writer.write(done, summary)
      pending = []
    t = time.monotonic()
    if done % s.run.eval_every == 0 or is_last:
      last_eval = evaluate(s, eval_step, state, workdir)
      writer.write(done, last_eval)
    if done % s.run.checkpoint_every == 0 or is_last:
      pending = jax.device_get(pending)
      _check_finite(pending)
      ckpt.save(done, state, train_iter, {'pending': [
          (st, {k: float(v) for k, v in m.items()}) for st, m in pending]})
    progress.exclude(time.monotonic() - t)
  ckpt.wait()
  ckpt.close()
  final.update(last_eval)
  if jax.process_index() == 0:
    final['train_seconds_this_run'] = time.monotonic() - t0
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump({'step': int(state.step), **final}, f, indent=2)
  writer.close()
  return final


def _write_run_info(s: Setup, workdir: str) -> None:
  if jax.process_index():
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(s.config.to_json_best_effort(indent=2))


def dry_run(config) -> str:
  """Checks a config and describes the run without allocating the model.

  Works on a laptop for a pod config: the dataset need not be prepared (its
  published size is used) and the mesh is described, not built.
  """
  from pgf import flops as flops_lib  # Only the dry run needs it.
  try:
    info, run, schedule, task = plan_run(config)
    data_note = 'prepared'
  except data_lib.DatasetNotPreparedError as e:
    info = data_lib.published_info(config)
    if info is None:
      raise
    info, run, schedule, task = plan_run(config, info=info)
    data_note = f'not prepared here ({e.args[0].splitlines()[0]})'
  abstract, infos, sparse_layers, _, _ = abstract_model(
      config, run, schedule, task)
  axis_of = sharding.logical_to_mesh_axis(config)
  sp.check_sharding(schedule.distinct_plans(), infos, axis_of,
                    {'data': 1, 'model': config.mesh.model})
  lines = [f'config: model={config.model.name} {config.model.variant}, '
           f'data={config.data.name} ({data_note}), '
           f'{info.num_train_examples} train examples',
           f'run: {run.total} steps of batch {config.batch_size} '
           f'({run.steps_per_epoch} steps/epoch)']
  params = nn.unbox(abstract.params)
  sizes = {k: int(np.prod(v.shape)) for k, v in _flat(params).items()}
  total = sum(sizes.values())
  final = schedule.final_plan()
  sparse = sum(int(np.prod(infos[p].shape)) for p in sparse_layers)
  nonzero = total - sparse + sum(
      int(np.prod(infos[p].shape)) * r.nm.density
      for p, r in sp.matched_layers(final, infos).items())
  lines += [f'parameters: {total:,} total, {sparse:,} in sparse kernels '
            f'({len(sparse_layers)} layers), {int(nonzero):,} non-zero '
            f'after sparsity (density {nonzero / total:.4f})',
            f'sparsity: {final.describe()}; plans over the run: '
            f'{[p.describe() for p in schedule.distinct_plans()]}']
  report = flops_lib.flops_report(config, task, schedule, run)
  lines.append(report.describe())
  data = (config.mesh.data if config.mesh.data != -1 else
          f'-1 (device count / {config.mesh.model})')
  lines.append(f'mesh: data={data} x model={config.mesh.model}; '
               f'{jax.device_count()} device(s) on this machine')
  specs = _flat(nn.get_partition_spec(abstract.params))
  lines.append('largest parameters (logical -> mesh sharding):')
  for key in sorted(sizes, key=sizes.get, reverse=True)[:8]:
    logical = tuple(specs[key]) if specs[key] is not None else ()
    mesh_axes = tuple(axis_of.get(n) if n else None for n in logical)
    lines.append(f'  {key}: {tuple(_flat(params)[key].shape)} '
                 f'{logical} -> PartitionSpec{mesh_axes}')
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when pgf.train is the program, so
  that other programs can import it as a library)."""
  config_flags.DEFINE_config_file(
      'config', DEFAULT_CONFIG, 'Experiment config file (configs/*.py), '
      'optionally with an argument: file.py:runlocal.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and results; '
                      'default: workdirs/<config file name>[_<arg>].')
  flags.DEFINE_bool('dry_run', False, 'Validate the config, describe the run '
                    '(parameters, FLOPs, mesh) and exit without training.')
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() '
                    'first (multi-host GPU clusters and TPU pods).')


def _default_workdir() -> str:
  path = FLAGS['config'].config_filename
  name = os.path.splitext(os.path.basename(path.split(':')[0]))[0]
  arg = path.split(':', 1)[1] if ':' in path else ''
  return os.path.join('workdirs', name + (f'_{arg}' if arg else ''))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.distributed:
    jax.distributed.initialize()
  tfds.disable_progress_bar()  # Preparing pgf's own datasets is quick.
  quiet = metrics_lib.QuietLibraries()
  for handler in logging.get_absl_logger().handlers + [
      logging.get_absl_handler()]:
    handler.addFilter(quiet)
  config = FLAGS.config
  try:
    if FLAGS.dry_run:
      print(dry_run(config))
      return
    workdir = FLAGS.workdir or _default_workdir()
    final = train_and_evaluate(config, workdir)
  except (ValueError, NonFiniteLossError) as e:
    # One clear message, no traceback, non-zero exit.
    raise app.UsageError(str(e)) from None
  if jax.process_index() == 0:
    print(f'Done. Results in {os.path.abspath(workdir)}: metrics.jsonl, '
          'final_metrics.json, tensorboard/, checkpoints/.')
    print('Final: ' + ', '.join(f'{k}={v:.4f}' for k, v in final.items()))


if __name__ == '__main__':
  define_flags()
  jax.config.config_with_absl()
  app.run(main)

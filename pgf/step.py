"""The pieces of a training run: setup, state, and the jitted steps.

  s = setup(config)                      # validation, model facts, mesh
  state = init_state(s, rng)             # parameters in their shardings
  state, metrics = train_step(s, state, batch, plan)     # pure; jit it
  step_fn = make_train_step(s)           # jitted, sharded, donating
  sums = eval_step(s, params, batch, plan)

`train_step` is the one definition of a training step: `pgf.train`'s loop,
the benchmarks and the studies call it (through `make_train_step`). It takes
the static `SparsityPlan` of the step (one compile per distinct plan: once
per SdGf frame, never per step) and, on log steps with diagnostics on,
`diagnose=True` (a second compile) for the gradient-noise metrics.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgf import config_lib
from pgf import data as data_lib
from pgf import optim
from pgf import sharding
from pgf import sparsity as sp
from pgf import tasks


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; all of it is checkpointed.

  log_masks: the N:M masks of the sparse kernels at the last log, bit-packed
    (uint8, 1 bit per weight; all True before the first log), for the 'mask
    change since the last log' metric.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  log_masks: Any


@dataclasses.dataclass
class Setup:
  """What the loop needs, built and checked before any compile."""

  config: Any
  info: data_lib.DataInfo
  run: config_lib.RunSteps
  schedule: sp.SparsitySchedule
  task: tasks.Task
  mesh: Any
  rules: tuple
  tx: Any
  lr_fn: Any
  sparsifier: sp.Sparsifier
  abstract_state: Any        # boxed, from eval_shape
  state_sharding: Any

  @property
  def kernel_paths(self) -> tuple[str, ...]:
    return tuple(sorted(self.sparsifier.sites))

  @property
  def diagnosed(self) -> tuple[str, ...]:
    """Kernels whose gradient-noise diagnostics are logged: those of
    diagnostics.layers, by default the FF kernels (sparsity.ff's regex,
    whether or not they are sparse, so a dense run has the curves too)."""
    d = self.config.diagnostics
    if not d.enabled:
      return ()
    regex = d.layers or self.config.sparsity.ff.layers or (
        self.task.module.SPARSITY_LAYERS['ff'])
    return tuple(p for p in sorted(self.sparsifier.sites)
                 if re.search(regex, p))


def plan_run(config, *, info=None):
  """Validation and the run's quantities: no devices, compile or data work
  beyond reading the dataset's metadata (or `info`, given by a dry run)."""
  config_lib.validate_config(config)
  pipeline = tasks.task_class(config.task).pipeline
  if info is None:
    pipeline.check_available(config)
    info = pipeline.dataset_info(config)
  run = config_lib.resolve_run(config,
                               num_train_examples=info.num_train_examples)
  schedule = config_lib.build_schedule(config, run)
  task = tasks.get_task(config, info)
  return info, run, schedule, task


def abstract_model(config, run, schedule, task):
  """Abstract (eval_shape) boxed train state and the run's Sparsifier, which
  checks that every sparsity rule selects kernels whose group lengths M
  divides."""
  model = task.build_model(schedule.final_plan())
  batch = task.dummy_batch(1)
  abstract_params = jax.eval_shape(
      lambda rng: task.init(model, rng, batch)['params'], jax.random.key(0))
  sparsifier = sp.Sparsifier(schedule, sp.kernel_sites(abstract_params))
  tx, lr_fn = optim.make_optimizer(config, run, sparsifier)

  def init_boxed(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(nn.unbox(params)), log_masks={})

  abstract = jax.eval_shape(init_boxed, abstract_params)
  abstract = abstract.replace(log_masks=sparsifier.log_mask_shapes())
  return abstract, sparsifier, tx, lr_fn


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
  abstract, sparsifier, tx, lr_fn = abstract_model(config, run, schedule,
                                                   task)
  sparsifier.check_sharding(dict(mesh.shape), rules)
  state_sharding = sharding.shardings_of(abstract, mesh, rules)
  state_sharding = state_sharding.replace(
      opt_state=sharding.optimizer_state_shardings(
          tx, abstract.opt_state, nn.unbox(abstract.params),
          state_sharding.params, mesh),
      # Packed masks are 1/32 of their float32 kernels: replicated.
      log_masks=jax.tree.map(lambda _: sharding.replicated(mesh),
                             abstract.log_masks))
  return Setup(config=config, info=info, run=run, schedule=schedule,
               task=task, mesh=mesh, rules=rules, tx=tx, lr_fn=lr_fn,
               sparsifier=sparsifier, abstract_state=abstract,
               state_sharding=state_sharding)


def init_state(s: Setup, rng) -> TrainState:
  """Initialises parameters directly in their shardings."""
  model = s.task.build_model(s.schedule.final_plan())
  batch = s.task.dummy_batch(1)

  def init(rng):
    params = nn.unbox(s.task.init(model, rng, batch)['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=s.tx.init(params),
                      log_masks=s.sparsifier.initial_log_masks())

  with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
    return jax.jit(init, out_shardings=s.state_sharding)(rng)


def step_rng(config, step) -> jax.Array:
  """The randomness of training step `step` (dropout, augmentation)."""
  return jax.random.fold_in(jax.random.key(config.seed + 1), step)


def _loss_and_grad(s: Setup, plan: sp.SparsityPlan, values):
  """value_and_grad of the task's loss under `plan` at `values`."""
  # With sparsity.recompute the sparse layers keep no masks or effective
  # kernels for the backward pass (pgf.sparsity.core.sparse_product).
  plan = dataclasses.replace(plan, recompute=s.config.sparsity.recompute)
  model = s.task.build_model(plan)
  coll = sp.layer_collection(values, plan, s.kernel_paths)

  def loss_fn(params, batch, rng):
    variables = {'params': params, sp.SCHEDULE_COLLECTION: coll}
    outputs = s.task.apply(model, variables, batch, train=True,
                           rngs={'dropout': rng})
    return s.task.loss(outputs, batch)

  return jax.value_and_grad(loss_fn, has_aux=True)


def train_step(s: Setup, state: TrainState, batch, plan: sp.SparsityPlan,
               *, diagnose: bool = False) -> tuple[TrainState, dict]:
  """One optimizer step on `batch` (the global batch) under `plan`.

  Returns the new state and the step's metrics ('train/loss', 'train/lr',
  'sparsity/<group>/alpha', ...; with `diagnose`, 'diag/<kernel>/...').
  """
  accum = s.config.grad_accum_steps
  values = s.schedule.values(state.step)
  grad_fn = _loss_and_grad(s, plan, values)
  rng = step_rng(s.config, state.step)
  batch = s.task.augment(batch, jax.random.fold_in(rng, 2**31 - 1))
  if accum == 1:
    (_, metrics), grads = grad_fn(state.params, batch, rng)
  else:
    # Micro-batch i takes examples i, i + accum, ...: every micro-batch
    # stays spread over the data axis.
    mbs = jax.tree.map(
        lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    first = jax.tree.map(lambda x: x[0], mbs)
    (_, metrics), grads = grad_fn(state.params, first, rng)

    def body(carry, mb_i):
      mb, i = mb_i
      g_acc, m_acc = carry
      (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, g_acc, g),
              jax.tree.map(jnp.add, m_acc, m)), None

    rest = jax.tree.map(lambda x: x[1:], mbs)
    (grads, metrics), _ = jax.lax.scan(
        body, (grads, metrics), (rest, jnp.arange(1, accum)))
    grads = jax.tree.map(lambda g: g / accum, grads)
    metrics = jax.tree.map(lambda m: m / accum, metrics)
  # The raw gradients' norm, passed as `after`: SR-STE's CPU kernel waits
  # for it and then writes over the gradients. Without it XLA copies a
  # gradient that is a dot's own output for the norm's read (a gradient a
  # fusion makes, as in pgf's layers, gets the copy fused in either way).
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = s.tx.update(grads, state.opt_state, state.params,
                                   step=state.step, plan=plan,
                                   after=grad_norm)
  params = optax.apply_updates(state.params, updates)
  out = {f'train/{k}': v for k, v in metrics.items()}
  out['train/grad_norm'] = grad_norm
  out['train/lr'] = s.lr_fn(state.step)
  out.update(s.sparsifier.step_metrics(values))
  if diagnose:
    out.update(_diagnostics(s, grad_fn, state, batch, rng, grads, opt_state))
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), out


def _diagnostics(s: Setup, grad_fn, state, batch, rng, grads,
                 opt_state) -> dict[str, jax.Array]:
  """Gradient-noise metrics of the diagnosed kernels at this step.

    diag/<layer>/grad_std         std over the kernel's entries of its loss
                                  gradient (the authors' summary.py)
    diag/<layer>/nu_var           variance over the entries of AdamW's
                                  second-moment estimate after the update
    diag/<layer>/noise_to_signal  sum_k |g_k - g|^2 / ((K - 1) |g|^2), g_k the
                                  gradients of K equal sub-batches and g their
                                  mean: a scale-free minibatch noise ratio
  """
  paths = s.diagnosed
  flat_g = sp.trees.flatten(grads)
  nus = optax.tree_utils.tree_get_all_with_path(opt_state, 'nu')
  flat_nu = sp.trees.flatten(nus[0][1]) if nus else {}
  k = s.config.diagnostics.sub_batches
  subs = jax.tree.map(lambda x: x.reshape(k, -1, *x.shape[1:]), batch)

  def body(carry, sub_i):
    sub, i = sub_i
    _, g = grad_fn(state.params, sub, jax.random.fold_in(rng, i + 1000))
    g = sp.trees.flatten(g)
    total, sq = carry
    total = {p: total[p] + g[p] for p in paths}
    sq = {p: sq[p] + jnp.sum(jnp.square(g[p])) for p in paths}
    return (total, sq), None

  zero = ({p: jnp.zeros_like(flat_g[p]) for p in paths},
          {p: jnp.zeros((), jnp.float32) for p in paths})
  (total, sq), _ = jax.lax.scan(body, zero, (subs, jnp.arange(k)))
  out = {}
  for p in paths:
    layer = p.rsplit('/', 1)[0]
    mean_sq = jnp.sum(jnp.square(total[p] / k))
    noise = (sq[p] - k * mean_sq) / (k - 1)
    out[f'diag/{layer}/grad_std'] = jnp.std(flat_g[p])
    out[f'diag/{layer}/noise_to_signal'] = noise / jnp.maximum(mean_sq,
                                                               1e-30)
    if p in flat_nu:
      out[f'diag/{layer}/nu_var'] = jnp.var(flat_nu[p])
  return out


def make_train_step(s: Setup):
  """`train_step` jitted with the run's shardings, donating the state;
  called as fn(state, batch, plan, diagnose=False)."""
  batch_sh = sharding.batch_sharding(s.mesh)

  def fn(state, batch, plan, diagnose):
    return train_step(s, state, batch, plan, diagnose=diagnose)

  jitted = jax.jit(fn, static_argnums=(2, 3), donate_argnums=0,
                   in_shardings=(s.state_sharding, batch_sh),
                   out_shardings=(s.state_sharding,
                                  sharding.replicated(s.mesh)))

  def call(state, batch, plan, diagnose=False):
    with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
      return jitted(state, batch, plan, diagnose)

  call.jitted = jitted
  return call


def sparsity_stats(s: Setup, state: TrainState, plan: sp.SparsityPlan
                   ) -> tuple[dict, TrainState]:
  """Sparsity statistics after the step that `plan` trained (at log steps:
  recomputed from the weights, so the step itself carries no masks); stores
  the masks as the new log masks."""
  metrics, new_masks, changes = s.sparsifier.stats(
      state.params, step=state.step - 1, plan=plan,
      prev_masks=state.log_masks)
  for p in s.diagnosed:
    if p in changes:  # Sparse kernels only: a dense kernel has no mask.
      metrics[f'diag/{p.rsplit("/", 1)[0]}/mask_change'] = changes[p]
  return metrics, state.replace(log_masks=new_masks)


def make_stats_step(s: Setup):
  jitted = jax.jit(lambda state, plan: sparsity_stats(s, state, plan),
                   static_argnums=1, donate_argnums=0,
                   out_shardings=(sharding.replicated(s.mesh),
                                  s.state_sharding))

  def call(state, plan):
    with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
      return jitted(state, plan)

  return call


def eval_step(s: Setup, params, batch, plan: sp.SparsityPlan) -> dict:
  """Evaluation sums of `batch` with the hard mask of `plan`."""
  model = s.task.build_model(plan)
  coll = sp.layer_collection(s.schedule.values(0, train=False), plan,
                             s.kernel_paths)
  outputs = s.task.apply(model, {'params': params,
                                 sp.SCHEDULE_COLLECTION: coll}, batch,
                         train=False)
  return s.task.eval_sums(outputs, batch)


def make_eval_step(s: Setup):
  jitted = jax.jit(lambda p, b, plan: eval_step(s, p, b, plan),
                   static_argnums=2,
                   in_shardings=(s.state_sharding.params,
                                 sharding.batch_sharding(s.mesh)),
                   out_shardings=sharding.replicated(s.mesh))

  def call(params, batch, plan):
    with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
      return jitted(params, batch, plan)

  return call


def evaluate(s: Setup, eval_fn, state: TrainState, workdir: str
             ) -> dict[str, float]:
  """One pass over the eval split with the hard mask of the current plan;
  the task may then write examples (it fetches parameters only if it does).
  """
  step = int(state.step)
  plan = s.schedule.eval_plan(max(step - 1, 0))
  totals: dict[str, float] = {}
  first = None
  batch_sh = sharding.batch_sharding(s.mesh)
  for local in s.task.pipeline.make_eval_iterable(
      s.config, global_batch_size=s.config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count()):
    sums = jax.device_get(eval_fn(state.params,
                                  sharding.global_batch(local, batch_sh),
                                  plan))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    if first is None:
      first = local
  out = {f'eval/{k}': v for k, v in s.task.eval_metrics(
      tasks.mean_of_sums(totals)).items()}
  if first is not None and jax.process_index() == 0:
    s.task.eval_examples(
        s.task.build_model(plan),
        lambda: s.sparsifier.hard_masked(jax.device_get(state.params), plan),
        first, workdir, step)
  return out


def param_count(abstract_params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(
      nn.unbox(abstract_params))))

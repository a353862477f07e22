r"""Gradient-noise diagnostics per recipe, like the paper's Figure 3.

  python experiments/grad_noise/run.py --data_dir=/tmp/tfds_fresh

The paper (method.md section 8) attributes the accuracy loss of existing
recipes (SR-STE) at high sparsity to gradient noise: its Figure 3 (ViT-tiny
on CIFAR-10, 1:16) plots, during training, the running average of the
variance of AdamW's second moment and the gradient variance. The authors'
code also logs the change of the mask between logs ("sparse architecture
divergence").

Here: the 'tiny/2' ViT of configs/default.py on pgf_digits, FF layers 1:16,
one run per recipe with the same seed, data order and steps. The training
step is pgf's own jitted step (`pgf.train.make_train_step`); before each
step a separate jitted function reads, from the same state and batch:

  nu_var       variance over the elements of all FF kernels (pooled) of
               AdamW's second-moment estimate nu, after the update (nu_mean:
               their mean, so that var / mean^2 is scale-free);
  grad_var     variance over the same elements of the gradient that reaches
               the optimizer chain for this step: the task-loss gradient
               with the step's plan and schedule values, after the recipe's
               transforms (SR-STE refill; MdGf 'scaled'), before global-norm
               clipping;
  noise_ratio  minibatch gradient noise, which grad_var is not: the batch is
               cut into --chunks equal slices; sum over FF elements of the
               variance of the raw loss gradient across slices, over the
               sum of the squared full-batch gradient (0 = every slice
               agrees; 1 = the noise of a slice is as large as the signal);
  mask_change  fraction of FF kernel mask entries that changed in this step
               (the current plan's N:M; for dense, the 1:16 mask the FF
               kernels would have: how much the top-1-of-16 choice moves).

Records are indexed by update k = 1..T: nu after k updates, the gradient
that update k used, and the masks of the weights before vs after update k.
Running means are cumulative means over k. Writes results.json and
grad_noise.png here; README.md holds the command, machine and reading.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

from configs import common  # noqa: E402
from configs import default  # noqa: E402
from pgf import config_lib  # noqa: E402
from pgf import data as data_lib  # noqa: E402
from pgf import sharding  # noqa: E402
from pgf import sparsity as sp  # noqa: E402
from pgf import train as train_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'experiments/grad_noise', 'Output folder.')
flags.DEFINE_string('data_dir', '/tmp/tfds_fresh', 'TFDS data_dir with '
                    'pgf_digits (prepared there on first use).')
flags.DEFINE_integer('steps', 600, 'Training steps per run.')
flags.DEFINE_string('nm', '1:16', 'Target N:M of the FF layers.')
flags.DEFINE_list('recipes', ['dense', 'ste', 'srste', 'mdgf_exp',
                              'sdgf_stepwise'], 'Recipes (configs.common).')
flags.DEFINE_integer('seed', 0, 'Seed of every run.')
flags.DEFINE_integer('chunks', 4, 'Batch slices for noise_ratio.')


def make_config(recipe: str, nm: str):
  """configs/default.py with the FF role set to `recipe` at `nm`."""
  c = default.get_config()
  c.seed = FLAGS.seed
  c.data.data_dir = FLAGS.data_dir
  c.total_steps = str(FLAGS.steps)
  # One log/eval/checkpoint setting: this loop does not use them.
  c.log_every = c.eval_every = c.checkpoint_every = str(FLAGS.steps)
  n, m = (int(x) for x in nm.split(':'))
  common.set_recipe(c.sparsity.ff, recipe, n, m)
  # As in experiments/recipes_digits: MdGf-Exponential's alpha reaches 0.01
  # at 60 % of the run, so the last 40 % trains the hard N:M mask.
  c.sparsity.ff.decay = 4.6 / (0.6 * FLAGS.steps)
  return c


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def make_diagnostics(s: train_lib.Setup, ff_plan: sp.SparsityPlan, *,
                     chunks: int):
  """Jitted (state, batch, plan, prev_masks) -> (scalars, masks).

  Mirrors the loss of `make_train_step` (accumulation of 1 only; dropout
  keys match the step's only without dropout, the default here). `ff_plan`
  (the target FF plan) selects the FF kernels and gives dense runs their
  reference mask; sparse runs use the training plan's masks.
  """
  task, schedule = s.task, s.schedule
  base_rng = jax.random.key(s.config.seed + 1)  # As make_train_step.
  ff_layers = tuple(sorted(sp.matched_layers(ff_plan, s.infos)))
  recipe_tx = sp.sparse_gradients()

  def pooled(flat_tree):
    return jnp.concatenate([flat_tree[f'{p}/kernel'].reshape(-1)
                            for p in ff_layers]).astype(jnp.float32)

  def diag_fn(state, batch, plan, prev_masks):
    model = task.build_model(plan)
    values = schedule.values(state.step)
    coll = sp.layer_collection(sp.needed_values(schedule, values), plan,
                               s.layer_paths)
    rng = jax.random.fold_in(base_rng, state.step)

    def loss_fn(params, mb):
      variables = {'params': params, sp.SCHEDULE_COLLECTION: coll}
      logits, mutated = task.apply(model, variables, mb, train=True,
                                   rngs={'dropout': rng},
                                   mutable=[sp.MASK_COLLECTION])
      loss, _ = task.loss(logits, mb)
      return loss, mutated.get(sp.MASK_COLLECTION, {})

    # Gradients of `chunks` equal slices of the batch; the loss is a batch
    # mean, so their mean is the full-batch gradient of the train step.
    chunked = jax.tree.map(
        lambda x: x.reshape(chunks, -1, *x.shape[1:]), batch)
    (losses, sown), chunk_grads = jax.vmap(
        jax.value_and_grad(loss_fn, has_aux=True), in_axes=(None, 0))(
            state.params, chunked)
    sown = jax.tree.map(lambda x: x[0], sown)  # Masks depend on params only.
    grads = jax.tree.map(lambda g: g.mean(0), chunk_grads)
    # Minibatch noise of the raw loss gradient: summed over FF elements, the
    # variance across chunks over the squared full-batch gradient.
    flat_cg, flat_g = _flat(chunk_grads), _flat(grads)
    noise = sum(jnp.var(flat_cg[f'{p}/kernel'], axis=0, ddof=1).sum()
                for p in ff_layers)
    signal = sum(jnp.square(flat_g[f'{p}/kernel']).sum() for p in ff_layers)
    # The recipe's gradient changes, as the optimizer chain's first part.
    grads, _ = recipe_tx.update(grads, recipe_tx.init(state.params),
                                state.params, masks=sown, sparsity=coll)
    nu = optax.tree_utils.tree_get(state.opt_state, 'nu')
    masks = sp.masks_from_params(state.params, plan if plan else ff_plan,
                                 s.infos)
    changed = sum((masks[p] != prev_masks[p]).sum() for p in ff_layers)
    size = sum(masks[p].size for p in ff_layers)
    nu = pooled(_flat(nu))
    out = {'loss': losses.mean(),
           'grad_var': jnp.var(pooled(_flat(grads))),
           'noise_ratio': noise / jnp.maximum(signal, 1e-30),
           'nu_var': jnp.var(nu),
           'nu_mean': jnp.mean(nu),
           'mask_change': changed / size}
    return out, {p: masks[p] for p in ff_layers}

  jitted = jax.jit(diag_fn, static_argnums=2)

  def diagnostics(state, batch, plan, prev_masks):
    with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
      return jitted(state, batch, plan, prev_masks)

  return diagnostics, ff_layers


def run_one(recipe: str) -> dict:
  """Trains one recipe with pgf's step and records the diagnostics."""
  c = make_config(recipe, FLAGS.nm)
  s = train_lib.setup(c)
  # The FF layers and their target mask, from the same config at STE 1:16
  # (a dense run's schedule has no sparse group to ask).
  ref = make_config('ste', FLAGS.nm)
  ff_plan = config_lib.build_schedule(ref, s.run).final_plan()
  state = train_lib.init_state(s, jax.random.key(c.seed))
  train_iter = data_lib.make_train_iterator(
      c, global_batch_size=c.batch_size, process_index=0, process_count=1)
  train_step = train_lib.make_train_step(s)
  diagnostics, ff_layers = make_diagnostics(s, ff_plan,
                                            chunks=FLAGS.chunks)
  batch_sh = sharding.batch_sharding(s.mesh)
  eval_step = train_lib.make_eval_step(s)

  rows, plans = [], []
  # Row 0's mask change (against all False) is dropped below.
  prev = {p: jnp.zeros(s.infos[p].shape, bool) for p in ff_layers}
  t0 = time.monotonic()
  for step in range(s.run.total + 1):
    last = step == s.run.total
    # After the last update: nu and masks only (the batch is not trained).
    plan = s.schedule.plan(min(step, s.run.total - 1))
    batch = sharding.global_batch(next(train_iter), batch_sh)
    out, masks = diagnostics(state, batch, plan, prev)
    rows.append(out)
    plans.append(plan.describe())
    prev = masks
    if not last:
      state, _ = train_step(state, batch, plan)
  rows = jax.device_get(rows)
  seconds = time.monotonic() - t0
  final_eval = train_lib.evaluate(s, eval_step, state, '/tmp/pgf_grad_noise')
  # Row j holds grad_j (used by update j + 1), nu_j (after j updates) and
  # masks_j vs masks_{j-1}: shift to index by update k = 1..T.
  get = lambda key, rs: np.array([float(r[key]) for r in rs])
  # Five significant digits keep results.json small.
  tolist = lambda x: [float(f'{v:.5g}') for v in x]
  nu_var = get('nu_var', rows[1:])
  nu_mean = get('nu_mean', rows[1:])
  grad_var = get('grad_var', rows[:-1])
  mask_change = get('mask_change', rows[1:])
  k = np.arange(1, len(nu_var) + 1)
  # Rows i and i - 1 hold masks under plans i and i - 1 (the plans of the
  # steps with index i and i - 1): at a new SdGf frame the pattern changes.
  frames = [i for i in range(1, len(plans)) if plans[i] != plans[i - 1]]
  return {
      'recipe': recipe, 'nm': FLAGS.nm if recipe != 'dense' else '-',
      'ff_layers': list(ff_layers),
      'steps': k.tolist(),
      'loss': tolist(get('loss', rows[:-1])),
      'nu_var': tolist(nu_var),
      'nu_var_running_mean': tolist(np.cumsum(nu_var) / k),
      'nu_mean': tolist(nu_mean),
      'grad_var': tolist(grad_var),
      'grad_var_running_mean': tolist(np.cumsum(grad_var) / k),
      'noise_ratio': tolist(get('noise_ratio', rows[:-1])),
      'mask_change': tolist(mask_change),
      'plan_change_steps': frames,
      'eval_accuracy': final_eval['eval/accuracy'],
      'seconds': seconds,
  }


def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  results = {'steps': FLAGS.steps, 'nm': FLAGS.nm, 'seed': FLAGS.seed,
             'jax_backend': jax.default_backend(), 'runs': {}}
  for recipe in FLAGS.recipes:
    print(f'{recipe} ...', flush=True)
    results['runs'][recipe] = run_one(recipe)
    print(f'  {results["runs"][recipe]["seconds"]:.0f} s', flush=True)
  path = os.path.join(FLAGS.out, 'results.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(results, f)
  os.replace(path + '.tmp', path)
  print_table(results)
  write_plot(results)


def _tail_mean(x, frac=0.2):
  x = np.asarray(x)
  return float(x[-max(int(len(x) * frac), 1):].mean())


def _divergence(run) -> np.ndarray:
  """Per-step mask change with SdGf frame starts (a change of pattern, not
  a divergence of the architecture) set to NaN."""
  x = np.asarray(run['mask_change'], float).copy()
  for k in run['plan_change_steps']:
    x[k - 1] = np.nan
  return x


def print_table(results):
  lines = ['| recipe | nu var, running mean | grad var, running mean | '
           'noise ratio, mean of all / last 20 % | '
           'mask change, mean of all / last 20 % | train loss, last 20 % | '
           'nu var / nu mean^2, last 20 % | test acc. (%) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r, run in results['runs'].items():
    div = _divergence(run)
    nu_mean = np.asarray(run['nu_mean'])
    nu_rel = np.asarray(run['nu_var']) / np.where(nu_mean > 0, nu_mean, 1)**2
    lines.append(
        f'| {r} | {run["nu_var_running_mean"][-1]:.2e} | '
        f'{run["grad_var_running_mean"][-1]:.2e} | '
        f'{np.mean(run["noise_ratio"]):.2f} / '
        f'{_tail_mean(run["noise_ratio"]):.2f} | '
        f'{np.nanmean(div):.1e} / {_tail_mean(div[~np.isnan(div)]):.1e} | '
        f'{_tail_mean(run["loss"]):.4f} | '
        f'{_tail_mean(nu_rel):.1f} | '
        f'{100 * run["eval_accuracy"]:.1f} |')
  print('\n'.join(lines))


def _smooth(x, window):
  """Trailing moving average that skips NaNs."""
  x = np.asarray(x, float)
  ok = ~np.isnan(x)
  kernel = np.ones(window)
  num = np.convolve(np.where(ok, x, 0.0), kernel)[:len(x)]
  den = np.convolve(ok.astype(float), kernel)[:len(x)]
  return num / np.maximum(den, 1)


def write_plot(results):
  import matplotlib  # Only the study needs it.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  axes = axes.ravel()
  window, skip = 20, 50
  panels = [
      ('nu_var_running_mean', "variance of AdamW's nu, running mean"),
      ('grad_var_running_mean', 'gradient variance, running mean'),
      ('noise_ratio', f'minibatch noise / signal ({window}-step mean)'),
      ('mask_change', f'mask change per step ({window}-step mean)'),
  ]
  for r, run in results['runs'].items():
    steps = np.asarray(run['steps'])
    style = dict(color='k', ls='--') if r == 'dense' else {}
    for ax, (key, _) in zip(axes, panels):
      y = np.asarray(run[key], float)
      if key == 'mask_change':
        y = _divergence(run)
      if not key.endswith('running_mean'):
        y = _smooth(y, window)
      ax.plot(steps, y, label=r, **style)
    if run['plan_change_steps']:
      for k in run['plan_change_steps']:
        axes[3].axvline(k, color='tab:red', ls=':', lw=0.8)
  for ax, (key, title) in zip(axes, panels):
    ax.set_title(title, fontsize=10)
    if key != 'noise_ratio':
      ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if key.endswith('running_mean'):
      # The first steps (zero-initialised head, lr warm-up from 0) span
      # decades below the rest; start the axis at step `skip`.
      lo = min(run[key][skip] for run in results['runs'].values())
      hi = max(max(run[key]) for run in results['runs'].values())
      ax.set_ylim(lo / 2, hi * 2)
  axes[2].set_ylim(bottom=0)
  axes[3].set_ylim(bottom=1e-6)
  axes[0].legend(fontsize=8)
  fig.suptitle(f'ViT tiny/2 on pgf_digits, FF kernels {results["nm"]}, '
               f'seed {results["seed"]}, {results["steps"]} steps '
               f'(dotted: SdGf frame starts, excluded from mask change)',
               fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.out, 'grad_noise.png'), dpi=110)


if __name__ == '__main__':
  app.run(main)

r"""Times the training step of every recipe against dense, in one process.

  python -m pgf.bench --config=configs/vit_base.py:runlocal
  python -m pgf.bench --config=configs/vit_base.py --config.batch_size=64 \
      --config.data.name=pgf_digits ... --out=bench.json

For each row the same model, batch and optimizer are used; only the sparsity
plan and schedule change. Compile time is measured separately (first call)
and excluded from the step time: median over `--repeats` timed windows of
`--steps` steps each. Rows: dense, a plain Flax train step (value_and_grad +
the same optax chain, no pgf sparsity or metrics: the floor), and every
recipe at every pattern of --patterns, plus each frame of SdGf-Stepwise and
SdGf-Geometric. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import optax

from pgf import sharding
from pgf import step as step_lib
from pgf import train as train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', train_lib.DEFAULT_CONFIG,
                                'Experiment config.', lock_config=True)
flags.DEFINE_list('patterns', ['2:4', '1:16'], 'N:M patterns to time.')
flags.DEFINE_list('recipes', ['ste', 'srste', 'mdgf_linear', 'mdgf_exp'],
                  'Recipes to time at every pattern.')
flags.DEFINE_string('sdgf_target', '1:8', 'Target of the SdGf rows '
                    '(stepwise frames and geometric frames, e.g. 8:64).')
flags.DEFINE_string('role', 'ff', 'Sparsity role the recipes are put on.')
flags.DEFINE_integer('steps', 20, 'Steps per timed window.')
flags.DEFINE_integer('repeats', 5, 'Timed windows per row (median).')
flags.DEFINE_string('out', '', 'JSON output path ('' = no file).')


def _config_for(base, role, recipe, sdgf, n, m):
  c = base.copy_and_resolve_references()
  c.unlock()
  for r in ('ff', 'q', 'k', 'v', 'o'):
    c.sparsity[r].recipe = 'dense'
  if recipe != 'dense':
    g = c.sparsity[role]
    g.recipe, g.sdgf, g.n, g.m = recipe, sdgf, n, m
  c.lock()
  return c


def _peak_memory():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def bench_rows(config, *, role, patterns, recipes, sdgf_target, steps,
               repeats):
  """Builds every row, compiles each, then times them round-robin.

  Timing windows of all rows are interleaved (row 1, row 2, ..., row 1, ...)
  so that a slow drift of the machine's load affects every row alike; each
  row reports the median of its windows.
  """
  rows = []  # dicts with name, pattern, fn, state
  batch_local = None

  def run_setup(c):
    nonlocal batch_local
    s = step_lib.setup(c)
    if batch_local is None:
      it = s.task.pipeline.make_train_iterator(
          c, global_batch_size=c.batch_size,
          process_index=jax.process_index(),
          process_count=jax.process_count())
      batch_local = next(it)
    batch = sharding.global_batch(batch_local,
                                  sharding.batch_sharding(s.mesh))
    state = step_lib.init_state(s, jax.random.key(0))
    return s, state, batch

  def add(name, pattern, fn, state, batch):
    t = time.perf_counter()
    state, m = fn(state, batch)
    jax.block_until_ready((state, m))
    rows.append(dict(row=name, pattern=pattern, fn=fn, state=state,
                     batch=batch, first_call_s=time.perf_counter() - t,
                     times=[]))
    logging.info('compiled %s %s', name, pattern)

  s, state, batch = run_setup(_config_for(config, role, 'dense', 'none', 1, 1))
  step = step_lib.make_train_step(s)
  plan = s.schedule.plan(0)
  add('dense', '-', lambda st, b: step(st, b, plan), state, batch)
  _, state2, _ = run_setup(_config_for(config, role, 'dense', 'none', 1, 1))
  add('plain_flax', '-', _plain_step(s), state2.params, batch)

  def sparse_rows(name, recipe, sdgf, n, m, all_frames):
    c = _config_for(config, role, recipe, sdgf, n, m)
    s, state, batch = run_setup(c)
    step = step_lib.make_train_step(s)
    plans = s.schedule.distinct_plans() if all_frames else (
        s.schedule.plan(s.schedule.sparse_start),)
    for i, plan in enumerate(plans):
      if plan:
        # Every row owns its state: the step donates it.
        own = state if i == 0 else step_lib.init_state(s, jax.random.key(0))
        add(name, plan.describe(), lambda st, b, p=plan: step(st, b, p),
            own, batch)

  for pattern in patterns:
    n, m = (int(x) for x in pattern.split(':'))
    for recipe in recipes:
      sparse_rows(recipe, recipe, 'none', n, m, all_frames=False)
  n, m = (int(x) for x in sdgf_target.split(':'))
  for sdgf in ('stepwise', 'geometric'):
    sparse_rows(f'sdgf_{sdgf}', 'ste', sdgf, n, m, all_frames=True)

  for _ in range(repeats):
    for r in rows:
      state = r['state']
      t = time.perf_counter()
      for _ in range(steps):
        state, m = r['fn'](state, r['batch'])
      jax.block_until_ready((state, m))
      r['times'].append((time.perf_counter() - t) / steps)
      r['state'] = state
  out = []
  for r in rows:
    ms = 1e3 * statistics.median(r['times'])
    out.append(dict(row=r['row'], pattern=r['pattern'], ms_per_step=ms,
                    ms_min=1e3 * min(r['times']),
                    first_call_s=r['first_call_s'],
                    peak_bytes=_peak_memory()))
  for r in out:
    r['ratio_to_dense'] = r['ms_per_step'] / out[0]['ms_per_step']
  return out


def _plain_step(s):
  """value_and_grad + the run's optax chain over the dense model, as a plain
  Flax loop would write it: no sparsity collection, metrics or rng folding
  (pgf's sparse transforms are identities without masks)."""
  model = s.task.build_model(None)
  tx = s.tx

  def step(carry, batch):
    params, opt_state = carry

    def loss_fn(p):
      logits = s.task.apply(model, {'params': p}, batch, train=True,
                            rngs={'dropout': jax.random.key(0)})
      return s.task.loss(logits, batch)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, step=0)
    return (optax.apply_updates(params, updates), opt_state), loss

  jitted = jax.jit(step, donate_argnums=0)
  holder = {}

  def fn(params, batch):
    if 'carry' not in holder:
      holder['carry'] = (params, tx.init(params))
    holder['carry'], loss = jitted(holder['carry'], batch)
    return holder['carry'][0], loss

  return fn


def format_table(rows, device: str) -> str:
  lines = [f'device: {device}',
           f'{"row":<16} {"pattern":<22} {"ms/step":>9} {"x dense":>8} '
           f'{"1st call s":>10} {"peak MiB":>9}',
           '-' * 79]
  for r in rows:
    peak = (f'{r["peak_bytes"] / 2**20:9.0f}' if r['peak_bytes']
            else f'{"n/a":>9}')
    lines.append(f'{r["row"]:<16} {r["pattern"]:<22} '
                 f'{r["ms_per_step"]:9.3f} {r["ratio_to_dense"]:8.3f} '
                 f'{r["first_call_s"]:10.2f} {peak}')
  return '\n'.join(lines)


def device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', d.platform)
  cpu = f', {os.cpu_count()} CPU cores, {platform.processor() or "cpu"}'
  return f'{jax.device_count()} x {kind} ({d.platform}){cpu}'


def main(argv):
  del argv
  rows = bench_rows(FLAGS.config, role=FLAGS.role, patterns=FLAGS.patterns,
                    recipes=FLAGS.recipes, sdgf_target=FLAGS.sdgf_target,
                    steps=FLAGS.steps, repeats=FLAGS.repeats)
  device = device_name()
  print(format_table(rows, device))
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump({'device': device, 'jax': jax.__version__,
                 'config': FLAGS['config'].config_filename,
                 'batch_size': FLAGS.config.batch_size, 'steps': FLAGS.steps,
                 'repeats': FLAGS.repeats, 'rows': rows}, f, indent=2)
    print(f'Wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)

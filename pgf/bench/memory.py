r"""XLA temporary memory of the training step per recipe, recompute on / off.

  python -m pgf.bench.memory --out=experiments/bench/memory_cpu.json

For each model (T5 v1.1 Small and ViT-B/16 by default) and batch, compiles
`pgf.step.make_train_step`'s step for every row (dense; STE, SR-STE and
MdGf-Exponential at --pattern; every SdGf-Stepwise and SdGf-Geometric frame
of --sdgf_target), with `sparsity.recompute` True (the default: effective
kernels rebuilt in the backward pass from the kernels and the masks' bits)
and False (kept), and
reads the compiled step's `memory_analysis()`. Nothing is run: the inputs
are abstract, so large batches cost only compile time. The overhead of a
row is its XLA temporary bytes over dense's, in MiB and in percent.

With recompute on, a sparse layer keeps what a dense layer keeps and its
mask's bits (`pgf.sparsity.core.sparse_product`), so its rows should be
within 1/32 of the sparse kernels' float32 bytes (and a transient mask) of
dense; with it off, one float32 copy of the sparse kernels over dense.
Also checks that recompute does not change the result: a tiny model
trained a few steps with recompute on and off must end with bit-equal
parameters (`recompute_equal`; tests/test_bench.py runs it too).
"""

from __future__ import annotations

import datetime
import json
import os
import sys

from absl import app
from absl import flags
import flax.linen as nn
import jax
import numpy as np

from pgf import sharding
from pgf import step as step_lib
from pgf.bench import steps as bench_steps
from pgf.configs import t5_base
from pgf.configs import vit_base

# name -> (config module, config argument, model.variant).
MODELS = {
    't5_small': (t5_base, '', 'small'),
    'vit_b16': (vit_base, '', 'B/16'),
    't5_mu': (t5_base, 'runlocal', 'mu'),
    'vit_mu': (vit_base, 'runlocal', 'mu/2'),
}
FULL_ROWS = ('dense', 'ste', 'srste', 'mdgf_exp', 'sdgf_stepwise',
             'sdgf_geometric')


def model_config(name: str, *, batch_size: int, dtype: str = 'float32'):
  module, arg, variant = MODELS[name]
  c = module.get_config(arg or None)
  c.unlock()
  c.model.variant = variant
  c.batch_size = batch_size
  c.model.dtype = dtype
  c.lock()
  return c


def abstract_batch(s: step_lib.Setup, batch_size: int) -> dict:
  return {k: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
          for k, (shape, dtype) in s.info.train_spec.items()}


def abstract_state(s: step_lib.Setup) -> step_lib.TrainState:
  """The train state as ShapeDtypeStructs in their shardings (no boxes, no
  allocation)."""
  boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
  plain = jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if boxed(x) else x,
      s.abstract_state, is_leaf=boxed)
  return jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      plain, s.state_sharding)


def step_memory(s: step_lib.Setup, plan) -> dict[str, int]:
  """memory_dict of the compiled step of `s` under `plan` (not run)."""
  fn = step_lib.make_train_step(s)
  with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
    compiled = fn.jitted.lower(abstract_state(s),
                               abstract_batch(s, s.config.batch_size), plan,
                               False).compile()
  return bench_steps.memory_dict(compiled)


def _row_setups(base, row: str, pattern: str, sdgf_target: str,
                recompute: bool):
  """(Setup, plans) of one row name."""
  if row == 'dense':
    s = bench_steps.bench_setup(bench_steps.row_config(base))
    return s, [s.schedule.plan(0)]
  if row.startswith('sdgf_'):
    s = bench_steps.bench_setup(bench_steps.row_config(
        base, recipe='ste', sdgf=row[len('sdgf_'):],
        nm=bench_steps.parse_nm(sdgf_target), recompute=recompute))
    return s, list(s.schedule.distinct_plans())
  s = bench_steps.bench_setup(bench_steps.row_config(
      base, recipe=row, nm=bench_steps.parse_nm(pattern),
      recompute=recompute))
  return s, [s.schedule.plan(s.schedule.sparse_start)]


def memory_rows(base, *, rows=FULL_ROWS, pattern: str = '1:16',
                sdgf_target: str = '1:8', label: str = '') -> list[dict]:
  """One dict per (row, plan, recompute), with the overhead over dense."""
  out = []
  dense_temp = None
  for row in rows:
    for recompute in ((None,) if row == 'dense' else (True, False)):
      s, plans = _row_setups(base, row, pattern, sdgf_target,
                             recompute is not False)
      sparse_bytes = 4 * sum(s.sparsifier.sites[p].size
                             for p in s.sparsifier.sparse_sites())
      for plan in plans:
        mem = step_memory(s, plan)
        if row == 'dense':
          dense_temp = mem['temp_bytes']
        d = dict(model=label, batch_size=s.config.batch_size, row=row,
                 pattern=plan.describe() if plan else '-',
                 recompute=recompute, sparse_kernel_bytes=sparse_bytes,
                 **mem)
        d['temp_over_dense_bytes'] = mem['temp_bytes'] - dense_temp
        d['temp_over_dense'] = mem['temp_bytes'] / dense_temp - 1
        out.append(d)
        print(f"{label} b={d['batch_size']} {row} {d['pattern']} recompute="
              f"{recompute}: temp {mem['temp_bytes'] / 2**20:,.1f} MiB "
              f"({d['temp_over_dense']:+.2%})", flush=True)
  return out


def recompute_equal(base, *, recipes=('ste', 'srste', 'mdgf_exp',
                                      'sdgf_stepwise'),
                    steps: int = 3, nm: str = '2:8') -> list[dict]:
  """Trains `base` (a tiny config) `steps` steps per recipe with recompute
  on and off from the same initial state and batch; reports whether the
  final parameters are bit-equal (and the largest difference)."""
  out = []
  for recipe in recipes:
    finals = []
    for recompute in (True, False):
      s = bench_steps.bench_setup(bench_steps.row_config(
          base, recipe=recipe, nm=bench_steps.parse_nm(nm),
          recompute=recompute))
      batch = bench_steps.synthetic_batch(s.config, s.info,
                                          s.config.batch_size)
      fn = step_lib.make_train_step(s)
      state = step_lib.init_state(s, jax.random.key(0))
      plans = s.schedule.distinct_plans()
      for i in range(steps):
        state, _ = fn(state, batch, plans[min(i, len(plans) - 1)])
      finals.append(jax.device_get(state.params))
    on, off = (jax.tree.leaves(f) for f in finals)
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64)
                                   - np.asarray(b, np.float64))))
               for a, b in zip(on, off))
    equal = all(np.array_equal(a, b) for a, b in zip(on, off))
    out.append(dict(recipe=recipe, pattern=nm, steps=steps,
                    bit_equal=bool(equal), max_abs_diff=diff))
  return out


def _mib(x: int) -> str:
  return f'{x / 2**20:,.1f}'


def markdown(meta: dict, rows: list[dict], equal: list[dict]) -> str:
  lines = ['# XLA temporary memory of the training step, recompute on / off',
           '', f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ",
           f"Device: {meta['device']}  ", f"JAX {meta['jax']}; dtype "
           f"{meta['dtype']}; compiled, not run (abstract inputs)", '',
           'temp = XLA temporary bytes of the compiled step; over dense = '
           "temp minus dense's at the same model and batch (pgf's dense "
           'step, the same layers without a plan); kernels = that overhead '
           'in float32 copies of the sparse kernels (1.00 = one effective '
           'kernel per sparse kernel kept for the backward pass).', '']
  groups = {}
  for r in rows:
    groups.setdefault((r['model'], r['batch_size']), []).append(r)
  for (model, batch), rs in groups.items():
    dense = next(r for r in rs if r['row'] == 'dense')
    kept = max(r['sparse_kernel_bytes'] for r in rs)
    lines += [f"## {model}, batch {batch}", '',
              f"dense: temp {_mib(dense['temp_bytes'])} MiB, arguments "
              f"{_mib(dense['argument_bytes'])} MiB; sparse kernels "
              f"{_mib(kept)} MiB in float32", '',
              '| row | pattern | temp MiB, recompute on | over dense | '
              'kernels | temp MiB, recompute off | over dense | kernels |',
              '| --- | --- | --- | --- | --- | --- | --- | --- |']
    on = {(r['row'], r['pattern']): r for r in rs if r['recompute'] is True}
    off = {(r['row'], r['pattern']): r for r in rs
           if r['recompute'] is False}

    def cells(r):
      if r is None:
        return ['', '', '']
      return [f"{_mib(r['temp_bytes'])}",
              f"{_mib(r['temp_over_dense_bytes'])} MiB "
              f"({r['temp_over_dense']:+.1%})",
              f"{r['temp_over_dense_bytes'] / r['sparse_kernel_bytes']:+.2f}"]

    for key, a in on.items():
      lines.append(f"| {key[0]} | {key[1]} | "
                   + ' | '.join(cells(a) + cells(off.get(key))) + ' |')
    lines.append('')
  if equal:
    lines += ['## Same results', '',
              f"{meta['equal_model']}: parameters after the steps below, "
              'recompute on vs off, same initial state and batch.', '',
              '| recipe | pattern | steps | bit-equal | max abs diff |',
              '| --- | --- | --- | --- | --- |']
    lines += [f"| {e['recipe']} | {e['pattern']} | {e['steps']} | "
              f"{'yes' if e['bit_equal'] else 'NO'} | "
              f"{e['max_abs_diff']:.3g} |" for e in equal]
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  f = flags.FLAGS
  rows = []
  for spec in f.models:
    name, batch, which = (spec.split(':') + ['full'])[:3]
    base = model_config(name, batch_size=int(batch), dtype=f.dtype)
    names = FULL_ROWS if which == 'full' else ('dense', 'ste', 'srste',
                                               'mdgf_exp')
    rows += memory_rows(base, rows=names, pattern=f.pattern,
                        sdgf_target=f.sdgf_target, label=name)
  equal_model = 'vit_base.py:runlocal, variant mu/2, batch 8'
  equal = recompute_equal(model_config('vit_mu', batch_size=8)) if (
      f.check_equal) else []
  meta = dict(command='python -m pgf.bench.memory ' + ' '.join(sys.argv[1:]),
              date=datetime.date.today().isoformat(),
              device=bench_steps.device_name(), jax=jax.__version__,
              dtype=f.dtype, equal_model=equal_model)
  text = markdown(meta, rows, equal)
  print(text)
  if f.out:
    with open(f.out, 'w') as fh:
      json.dump(dict(meta=meta, rows=rows, recompute_equal=equal), fh,
                indent=1)
    with open(os.path.splitext(f.out)[0] + '.md', 'w') as fh:
      fh.write(text)


if __name__ == '__main__':
  flags.DEFINE_list('models', ['t5_small:8', 't5_small:128:short',
                               'vit_b16:8', 'vit_b16:256:short'],
                    'NAME:BATCH[:short]; short = dense, ste, srste, '
                    'mdgf_exp only.')
  flags.DEFINE_string('pattern', '1:16', 'Pattern of the recipe rows.')
  flags.DEFINE_string('sdgf_target', '1:8', 'Target of the SdGf rows.')
  flags.DEFINE_string('dtype', 'float32', 'model.dtype.')
  flags.DEFINE_bool('check_equal', True, 'Run recompute_equal too.')
  flags.DEFINE_string('out', '', 'JSON output (.md beside it).')
  app.run(main)

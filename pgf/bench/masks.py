r"""Times N:M masks against a one-pass floor, in one process.

  python -m pgf.bench.masks --out=experiments/bench/masks_cpu.json
  python -m pgf.bench.masks --shapes=vit_b --patterns=2:4,8:64 --repeats=5
  python -m pgf.bench.masks --render=experiments/bench/masks_cpu.json

Kernels: the ViT-B/16 and T5-Base shapes (T5-Base's attention kernels have
ViT-B's shapes and are timed once), groups along the contraction axes ('in',
the default of pgf's layers) and along the output axes ('out'), float32 and
bfloat16. For each kernel and dtype the jitted masks of every pattern are
timed round-robin against these references, so that all rows of a kernel
share the machine's state:

* floor: a jitted `jnp.abs(w) > c`, which reads the kernel and writes a bool
  array: the same I/O as the mask, one elementwise pass. It is timed just
  before every sample of every row: `x floor` is a row's min time over the
  floor's min (over all its samples), `paired` the median over rounds of a
  row's sample over the floor sample just before it. On the project's
  2-core VM the floor's time swings 2-4x with the machine's state (0.09-0.54
  ms on ViT-B's 768x3072 kernel, idle); a floor timed once per round among
  many rows in short samples (this benchmark before 2026-12-03) could be
  caught in its slow state and make masks look faster than one pass.
* two passes: a reduction over groups of 16 on the integer keys (reads the
  kernel, writes 1/16 of it) plus a bool mask from one stored index per
  group (writes the mask), min times summed. Every exact mask made of XLA
  ops needs both: a loop fusion computes each output element alone, so a
  group's mask bits can be written only after a pass over the group has
  stored its result. Printed per kernel (`two_pass_ms` in the JSON).
* copy: a large jitted elementwise op (`x * 2 + 1` on 256 MiB, in place),
  the machine's memory bandwidth (the kernels themselves fit in its L3).

Implementations: `pgf` (pgf.sparsity.nm_mask as it runs here: on one CPU
device it takes the CPU mask kernel where that was measured faster), `xla`
(nm_mask from XLA ops alone, `impl='xla'`, as on GPU and TPU), `kernel`
(the CPU kernel wherever it can run, `impl='kernel'`: the data for the
choice 'auto' makes; not in the default list), `main` (the
implementation it replaced, kept here as a private copy) and `jaxpruner`
(jaxpruner's N:M formulation, a double argsort of -|w| along the group axis;
its time does not depend on N, so it is timed once per M). Compile time is
excluded (reported separately); each sample is the mean of enough
back-to-back calls to last --min_sample_ms, after half as many untimed calls
(the first calls after other work are 2-10x slower); min and median over
--repeats samples (3 for calls over 0.1 s). GB/s = (kernel bytes
+ mask bytes) / min time. `agree` checks pgf's mask against jaxpruner's
(both exact with the lower-index tie rule on these NaN-free kernels).
The optional `vit_ti_ff` row masks the 24 FF kernels of ViT-Ti/16 (12
blocks, mlp/wi and mlp/wo) in one jitted call, against one floor over them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numba
import numpy as np

from pgf.bench import timing
from pgf.sparsity import masks as masks_lib
from pgf.sparsity.masks import NM

FLAGS = flags.FLAGS
flags.DEFINE_list('shapes', ['vit_b', 't5_base'],
                  'Kernel sets: vit_b, t5_base, vit_ti_ff.')
flags.DEFINE_list(
    'patterns',
    ['2:4', '1:4', '3:4', '1:8', '2:8', '4:8', '7:8', '1:16', '2:16', '4:16',
     '8:16', '15:16', '1:32', '4:32', '16:32', '31:32', '1:64', '4:64', '8:64',
     '32:64', '63:64', '1:128', '8:128', '8:256'],
    'N:M patterns.')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Kernel dtypes.')
flags.DEFINE_list('groups', ['in', 'out'],
                  "Group axes: 'in' (contraction) and/or 'out' (output).")
flags.DEFINE_list('impls', ['pgf', 'xla', 'main', 'jaxpruner'],
                  'Implementations.')
flags.DEFINE_integer('repeats', 7, 'Interleaved samples per row.')
flags.DEFINE_float('min_sample_ms', 10.0,
                   'Minimum duration of one sample.')
flags.DEFINE_string('out', '', "JSON output path ('' = no file); the "
                    'tables go beside it as Markdown (.md).')
flags.DEFINE_string('render', '', 'Only write the Markdown of this JSON (a '
                    'run of this benchmark) beside it, timing nothing.')
flags.DEFINE_string('note', '', 'A sentence on the machine and its load for '
                    'the Markdown (kept in the JSON).')

# set -> {kernel name: (shape, contraction axes, output axes)}.
KERNELS = {
    'vit_b': {
        'mlp/wi': ((768, 3072), (0,), (1,)),
        'mlp/wo': ((3072, 768), (0,), (1,)),
        'attn/qkv': ((768, 12, 64), (0,), (1, 2)),
        'attn/out': ((12, 64, 768), (0, 1), (2,)),
    },
    't5_base': {
        'mlp/wi_0,wi_1': ((768, 2048), (0,), (1,)),
        'mlp/wo': ((2048, 768), (0,), (1,)),
        'attn/q,k,v': ((768, 12, 64), (0,), (1, 2)),
        'attn/o': ((12, 64, 768), (0, 1), (2,)),
    },
}
VIT_TI_FF = [((192, 768), (0,)), ((768, 192), (0,))] * 12


# -- the implementation pgf replaced (main branch), kept for comparison -------


def _main_nm_mask(w, nm, axes=0):
  """pgf's nm_mask before the exact narrow-reduction rewrite."""
  axes = masks_lib.check_groupable(w.shape, nm, axes)
  n, m = nm.n, nm.m
  if n == m:
    return jnp.ones(w.shape, bool)
  mag = jax.lax.stop_gradient(jnp.abs(w)).astype(jnp.float32)
  mag = jnp.minimum(mag, jnp.finfo(jnp.float32).max)
  g = masks_lib._grouped(mag, axes, m)
  gaxis = axes[0] + 1
  if m >= 32 and min(n, m - n) > 2:
    fast, exact = _main_select_by_value(g, n, m, gaxis)
    keep = jax.lax.cond(exact, lambda: fast,
                        lambda: _main_select_by_index(g, n, m, gaxis))
  else:
    keep = _main_select_by_index(g, n, m, gaxis)
  return keep.reshape(w.shape)


def _main_select_by_index(g, n, m, gaxis):
  iota_shape = [1] * g.ndim
  iota_shape[gaxis] = m
  iota = jnp.arange(m).reshape(iota_shape)
  if n <= m - n:
    keep = jnp.zeros(g.shape, bool)
    for _ in range(n):
      idx = jnp.argmax(jnp.where(keep, -jnp.inf, g), axis=gaxis,
                       keepdims=True)
      keep = keep | (iota == idx)
    return keep
  drop = jnp.zeros(g.shape, bool)
  for _ in range(m - n):
    rev = jnp.flip(jnp.where(drop, jnp.inf, g), axis=gaxis)
    idx = m - 1 - jnp.argmin(rev, axis=gaxis, keepdims=True)
    drop = drop | (iota == idx)
  return ~drop


def _main_select_by_value(g, n, m, gaxis):
  if n <= m - n:
    keep = jnp.zeros(g.shape, bool)
    for _ in range(n):
      top = jnp.max(jnp.where(keep, -jnp.inf, g), axis=gaxis, keepdims=True)
      keep = keep | (g == top)
  else:
    drop = jnp.zeros(g.shape, bool)
    for _ in range(m - n):
      low = jnp.min(jnp.where(drop, jnp.inf, g), axis=gaxis, keepdims=True)
      drop = drop | (g == low)
    keep = ~drop
  return keep, jnp.all(jnp.sum(keep, axis=gaxis) == n)


def _jaxpruner_ranks(w, m, axes=0):
  """Rank of every |w| in its group: argsort(argsort(-|w|)) (stable)."""
  axes = masks_lib.check_groupable(w.shape, NM(1, m), axes)
  g = masks_lib._grouped(jnp.abs(w), axes, m)
  g = jnp.moveaxis(g, axes[0] + 1, -1)
  ranks = jnp.argsort(jnp.argsort(-g, axis=-1), axis=-1)
  return jnp.moveaxis(ranks, -1, axes[0] + 1).reshape(w.shape)


def _jaxpruner_nm_mask(w, nm, axes=0):
  """jaxpruner's N:M formulation: argsort(argsort(-|w|)) < N per group."""
  return _jaxpruner_ranks(w, nm.m, axes) < nm.n


def _xla_nm_mask(w, nm, axes=0):
  """pgf's mask from XLA ops alone (without the CPU kernel)."""
  return masks_lib.nm_mask(w, nm, axes, impl='xla')


def _kernel_nm_mask(w, nm, axes=0):
  """pgf's mask on the CPU kernel wherever it can run (`impl='kernel'`;
  XLA ops where it cannot), whether or not 'auto' would take it."""
  return masks_lib.nm_mask(w, nm, axes, impl='kernel')


IMPLS = {'pgf': masks_lib.nm_mask, 'xla': _xla_nm_mask,
         'kernel': _kernel_nm_mask, 'main': _main_nm_mask,
         'jaxpruner': _jaxpruner_nm_mask}


# -- timing --------------------------------------------------------------------


_SLOW_S = 0.1
_SLOW_REPEATS = 3


def _compile(fn, *args):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _round_robin(calls, repeats, min_sample_s, reference='floor'):
  """calls: name -> (compiled, args). Returns (name -> list of seconds,
  name -> list of (reference seconds, seconds)).

  In every round each call's sample is preceded by a sample of
  `reference`, so that every row is paired with a floor measured just
  before it, in the machine's state of that moment (on the shared 2-core
  machine a one-pass op's time swings 2-4x with what else runs), and the
  reference gets as many samples as all rows together.
  """
  inner = {}
  for name, (fn, args) in calls.items():
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - start
    inner[name] = int(min(200, max(1, min_sample_s / max(once, 1e-7))))

  def sample(name):
    fn, args = calls[name]
    return timing.sample(lambda: fn(*args), inner[name],
                         untimed=max(2, inner[name] // 2))

  samples = {name: [] for name in calls}
  pairs = {name: [] for name in calls if name != reference}
  for r in range(repeats):
    for name in pairs:
      if r >= _SLOW_REPEATS and min(samples[name]) > _SLOW_S:
        continue   # seconds per call (the argsorts): fewer samples
      ref = sample(reference)
      samples[reference].append(ref)
      samples[name].append(sample(name))
      pairs[name].append((ref, samples[name][-1]))
  return samples, pairs


def _paired_ratio(pairs):
  """Median over rounds of a row's time over the floor timed just before
  it (and the range)."""
  ratios = [x / ref for ref, x in pairs]
  return statistics.median(ratios), min(ratios), max(ratios)


def _stats(seconds):
  return min(seconds) * 1e3, statistics.median(seconds) * 1e3


def _memory_bandwidth(repeats):
  """GB/s of a jitted elementwise op over 256 MiB (read + write), in place
  (a fresh 256 MiB output per call would time the page faults)."""
  x = jnp.arange(64 * 2**20, dtype=jnp.float32)
  fn = jax.jit(lambda x: x * 2 + 1, donate_argnums=0)
  x = jax.block_until_ready(fn(x))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    x = jax.block_until_ready(fn(x))
    samples.append(time.perf_counter() - start)
  return 2 * x.nbytes / min(samples) / 1e9


def _unique_kernels(sets):
  """(shape, axes, group kind) -> names, over the requested kernel sets."""
  kernels = {}
  for set_name in sets:
    for name, (shape, axes_in, axes_out) in KERNELS[set_name].items():
      for kind, axes in (('in', axes_in), ('out', axes_out)):
        if kind in FLAGS.groups:
          kernels.setdefault((shape, axes, kind), []).append(
              f'{set_name}:{name}')
  return kernels


# Group length of the two-pass bound's passes.
_BOUND_M = 16


def _two_passes(w, axes):
  """The two passes every exact mask XLA can build needs (one loop fusion
  computes each output element alone, so a group's mask bits can only be
  written once a pass over the whole group has stored its result): a
  reduction over groups of 16 (reads the kernel, writes 1/16 of it) and a
  mask from one stored index per group (reads 1/16, writes the bool mask).
  Returns the two jitted callables with their arguments."""
  axes = masks_lib.check_groupable(w.shape, NM(1, _BOUND_M), axes)
  shape = masks_lib._grouped(w, axes, _BOUND_M).shape
  gaxis = axes[0] + 1
  # On the integer keys nm_mask compares (a float max is slower on CPU).
  read, _ = _compile(lambda w: jnp.max(masks_lib._keys(masks_lib._grouped(
      w, axes, _BOUND_M)), axis=gaxis), w)
  index = jnp.zeros(shape[:gaxis] + shape[gaxis + 1:], jnp.int32)

  def write_fn(index):
    pos = jax.lax.broadcasted_iota(jnp.int32, shape, gaxis)
    return (pos == jnp.expand_dims(index, gaxis)).reshape(w.shape)
  write, _ = _compile(write_fn, index)
  return (read, (w,)), (write, (index,))


def _bench_kernel(shape, axes, dtype, patterns, impls, rng):
  w = jnp.asarray(rng.normal(size=shape), dtype)
  calls, compile_s = {}, {}
  calls['floor'], _ = _compile(lambda w: jnp.abs(w) > 0.5, w)
  calls['floor'] = (calls['floor'], (w,))
  calls['read'], calls['write'] = _two_passes(w, axes)
  done_m = set()
  for nm in patterns:
    for impl in impls:
      if impl == 'jaxpruner':
        if nm.m in done_m:
          continue
        done_m.add(nm.m)
      key = (impl, str(nm) if impl != 'jaxpruner' else f'*:{nm.m}')
      fn, compile_s[key] = _compile(
          lambda w, f=IMPLS[impl], nm=nm: f(w, nm, axes), w)
      calls[key] = (fn, (w,))
  samples, pairs = _round_robin(calls, FLAGS.repeats,
                                FLAGS.min_sample_ms / 1e3)
  floor = _stats(samples['floor'])
  nbytes = w.nbytes + w.size   # kernel read + bool mask written
  ranks = {}
  rows = []
  for nm in patterns:
    row = {'pattern': str(nm), 'floor_ms': floor}
    for impl in impls:
      key = (impl, str(nm) if impl != 'jaxpruner' else f'*:{nm.m}')
      lo, med = _stats(samples[key])
      paired = _paired_ratio(pairs[key])
      row[impl] = {'min_ms': lo, 'median_ms': med, 'x_floor': lo / floor[0],
                   'x_floor_median': med / floor[1],
                   'x_floor_paired': paired[0],
                   'x_floor_paired_range': paired[1:],
                   'gb_per_s': nbytes / lo / 1e6,
                   'compile_s': compile_s[key]}
    if 'pgf' in impls and 'jaxpruner' in impls:
      if nm.m not in ranks:
        ranks[nm.m] = jax.jit(_jaxpruner_ranks, static_argnums=(1, 2))(
            w, nm.m, axes)
      got = calls[('pgf', str(nm))][0](w)
      row['agree'] = bool(jnp.array_equal(got, ranks[nm.m] < nm.n))
    rows.append(row)
  bound = min(samples['read']) * 1e3 + min(samples['write']) * 1e3
  return {'floor_ms': floor, 'floor_gb_per_s': nbytes / floor[0] / 1e6,
          'two_pass_ms': bound, 'two_pass_x_floor': bound / floor[0],
          'rows': rows}


def _vit_ti_fits(nm) -> bool:
  """Whether M divides every ViT-Ti FF kernel's group length (192 or 768:
  not 1:128 or 8:256)."""
  return all(math.prod(shape[a] for a in axes) % nm.m == 0
             for shape, axes in VIT_TI_FF)


def _not_run(skipped) -> str:
  """The note on the ViT-Ti patterns `_vit_ti_fits` left out, or ''."""
  return (f'Not run: {", ".join(skipped)} (M does not divide 192).'
          if skipped else '')


def _bench_vit_ti_ff(dtype, patterns, rng):
  skipped = [str(nm) for nm in patterns if not _vit_ti_fits(nm)]
  patterns = [nm for nm in patterns if _vit_ti_fits(nm)]
  ws = [jnp.asarray(rng.normal(size=s), dtype) for s, _ in VIT_TI_FF]
  floor, _ = _compile(lambda ws: [jnp.abs(w) > 0.5 for w in ws], ws)
  calls = {'floor': (floor, (ws,))}
  for nm in patterns:
    fn, _ = _compile(lambda ws, nm=nm: [
        masks_lib.nm_mask(w, nm, a) for w, (_, a) in zip(ws, VIT_TI_FF)], ws)
    calls[str(nm)] = (fn, (ws,))
  samples, pairs = _round_robin(calls, FLAGS.repeats,
                                FLAGS.min_sample_ms / 1e3)
  lo, med = _stats(samples['floor'])
  return {'floor_ms': (lo, med), 'skipped': skipped, 'rows': [
      {'pattern': str(nm), 'min_ms': _stats(samples[str(nm)])[0],
       'median_ms': _stats(samples[str(nm)])[1],
       'x_floor': _stats(samples[str(nm)])[0] / lo,
       'x_floor_paired': _paired_ratio(pairs[str(nm)])[0]}
      for nm in patterns]}


def _print_kernel(names, shape, axes, dtype, result, impls):
  print(f'\n{" = ".join(names)}  {shape} groups on axes {axes}  {dtype}  '
        f'floor {result["floor_ms"][0]:.3f} ms (median '
        f'{result["floor_ms"][1]:.3f}), {result["floor_gb_per_s"]:.1f} GB/s; '
        f'two passes {result["two_pass_ms"]:.3f} ms = '
        f'{result["two_pass_x_floor"]:.2f} x floor')
  head = f'{"pattern":>8} '
  for impl in impls:
    head += f' {impl + " ms min/med":>19} {"x floor":>8} {"paired":>7}'
  print(head + f' {"pgf GB/s":>9} agree')
  for row in result['rows']:
    line = f'{row["pattern"]:>8} '
    for impl in impls:
      r = row[impl]
      line += (f' {r["min_ms"]:9.3f}/{r["median_ms"]:<9.3f} '
               f'{r["x_floor"]:8.2f} {r["x_floor_paired"]:7.2f}')
    gbs = row['pgf']['gb_per_s'] if 'pgf' in impls else float('nan')
    print(line + f' {gbs:9.1f} {row.get("agree", "")}')


# -- the Markdown tables -------------------------------------------------------

GOAL_X_FLOOR = 2.0   # Issue 10: a mask within 2x of one elementwise pass.

_COLUMNS = """\
Columns: min/median ms of the jitted mask over the samples (each at least
--min_sample_ms of back-to-back calls, after untimed calls); `x floor`: min
time over the min time of a jitted `jnp.abs(w) > c` on the same kernel (the
same I/O, one elementwise pass), timed just before every sample of every
row; `paired`: the median over rounds of a row's sample over the floor
sample just before it. `pgf`: `nm_mask` as it runs here (on one CPU device
the CPU mask kernel where `masks._kernel_applies` takes it); `xla`: XLA ops
alone (`impl='xla'`, as on GPU and TPU); `kernel`: the CPU mask kernel
wherever it can run (`impl='kernel'`); `main`: the implementation before
issue 10; `jaxpruner`: a double argsort of -|w| (timed once per M);
`agree`: pgf's mask equals jaxpruner's. `two passes`: a reduction over
groups of 16 plus a bool mask from one index per group, the two passes any
mask made of XLA ops needs. Goal (issue 10): within 2x of the floor."""


def _impls_of(out: dict) -> list[str]:
  rows = [r for res in out['results'] for r in res['rows']]
  return [i for i in IMPLS if rows and i in rows[0]]


def _summary(out: dict) -> list[str]:
  """Counts against the goal per implementation, the patterns that miss it,
  and the kernel against XLA's ops."""
  impls = _impls_of(out)
  rows = [r for res in out['results'] for r in res['rows']]
  counts = []
  for impl in impls:
    by_min = sum(r[impl]['x_floor'] <= GOAL_X_FLOOR for r in rows)
    paired = sum(r[impl]['x_floor_paired'] <= GOAL_X_FLOOR for r in rows)
    counts.append(f'`{impl}` {by_min} / {paired}')
  lines = [f'Summary: within {GOAL_X_FLOOR:g}x of the floor by min times / '
           f'by the paired median, of {len(rows)} rows: '
           + ', '.join(counts) + '.']
  fast = [i for i in ('pgf', 'kernel') if i in impls]
  if fast:
    missed = []
    for pattern in dict.fromkeys(r['pattern'] for r in rows):
      best = [min(r[i]['x_floor_paired'] for i in fast)
              for r in rows if r['pattern'] == pattern]
      if min(best) > GOAL_X_FLOOR:
        missed.append(pattern)
    lines.append(f'Patterns where {" and ".join(f"`{i}`" for i in fast)} '
                 f'never come within {GOAL_X_FLOOR:g}x (paired): '
                 + (', '.join(missed) or 'none') + '.')
  if 'kernel' in impls and 'xla' in impls:
    for res in out['results']:
      ratios = sorted(r['kernel']['min_ms'] / r['xla']['min_ms']
                      for r in res['rows'])
      lines.append(
          f'{" = ".join(res["kernels"])}: the kernel took '
          f'{ratios[0]:.2f}-{ratios[-1]:.2f}x the XLA ops\' min time, '
          f'median {statistics.median(ratios):.2f}x.')
  return lines


def markdown(out: dict) -> str:
  """The Markdown of a run (the JSON `main` writes)."""
  machine = out['machine']
  start = ', '.join(f'{x:.2f}' for x in machine['load_average_start'])
  end = ', '.join(f'{x:.2f}' for x in machine['load_average_end'])
  versions = f'JAX {out["jax"]}'
  if out.get('numba_threading'):
    versions += f', {out["numba_threading"]}'
  elif out.get('numba'):
    versions += f', numba {out["numba"]}'
  text = [
      f'# N:M masks vs a one-pass floor, {out["device"]}', '',
      f'Command: `{out["command"]}`  ',
      f'Date: {out["date_utc"]} UTC; '
      f'{machine.get("cpu", machine["processor"])}, {machine["cpus"]} '
      f'CPUs; {versions}. Load average before / after: {start} / {end}. '
      f'Memory bandwidth (256 MiB `x * 2 + 1`, in place): '
      f'{machine["memory_gb_per_s"]:.1f} GB/s.'
      + (f' {out["note"]}' if out.get('note') else ''), '',
      _COLUMNS, '', *_summary(out)]
  impls = _impls_of(out)
  for res in out['results']:
    text += ['', f'## {", ".join(res["kernels"])}: {tuple(res["shape"])}, '
             f'groups on axes {tuple(res["axes"])}, {res["dtype"]}', '',
             f'Floor {res["floor_ms"][0]:.3f} ms (median '
             f'{res["floor_ms"][1]:.3f}), {res["floor_gb_per_s"]:.1f} GB/s; '
             f'two passes {res["two_pass_ms"]:.3f} ms = '
             f'{res["two_pass_x_floor"]:.2f}x the floor.', '']
    head = ['pattern']
    for impl in impls:
      head += ([f'{impl} ms'] if impl == 'jaxpruner' else
               [f'{impl} ms min/med', 'x floor', 'paired'])
    if any('agree' in r for r in res['rows']):
      head.append('agree')
    text += ['| ' + ' | '.join(head) + ' |',
             '|' + ' --- |' * len(head)]
    for row in res['rows']:
      cells = [row['pattern']]
      for impl in impls:
        r = row[impl]
        if impl == 'jaxpruner':
          cells.append(f'{r["min_ms"]:.2f}')
        else:
          cells += [f'{r["min_ms"]:.3f} / {r["median_ms"]:.3f}',
                    f'{r["x_floor"]:.2f}', f'{r["x_floor_paired"]:.2f}']
      if 'agree' in row:
        cells.append(str(row['agree']))
      text.append('| ' + ' | '.join(cells) + ' |')
  small = out.get('vit_ti_ff')
  for dtype, res in (small or {}).items():
    text += ['', f'## ViT-Ti/16 FF kernels (12 blocks x mlp/wi, mlp/wo), '
             f'{dtype}, one call', '',
             f'Floor {res["floor_ms"][0]:.3f} ms. '
             f'{_not_run(res.get("skipped"))}'.rstrip(), '',
             '| pattern | ms min/med | x floor | paired |',
             '| --- | --- | --- | --- |']
    text += [f'| {r["pattern"]} | {r["min_ms"]:.3f} / {r["median_ms"]:.3f} '
             f'| {r["x_floor"]:.2f} | {r["x_floor_paired"]:.2f} |'
             for r in res['rows']]
  return '\n'.join(text) + '\n'


def write_markdown(json_path: str) -> str:
  """Writes the Markdown of the run in json_path beside it; its path."""
  with open(json_path) as f:
    out = json.load(f)
  path = os.path.splitext(json_path)[0] + '.md'
  with open(path, 'w') as f:
    f.write(markdown(out))
  return path


def main(argv):
  del argv
  if FLAGS.render:
    print(f'Wrote {write_markdown(FLAGS.render)}')
    return
  patterns = [NM.parse(p) for p in FLAGS.patterns]
  impls = [i for i in FLAGS.impls if i in IMPLS]
  rng = np.random.default_rng(0)
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = os.getloadavg()
  bandwidth = _memory_bandwidth(FLAGS.repeats)
  print(f'Machine: {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs, load average {load_start}, JAX '
        f'{jax.__version__} on {jax.devices()[0].device_kind}; memory '
        f'bandwidth (256 MiB x*2+1) {bandwidth:.1f} GB/s')
  results = []
  sets = [s for s in FLAGS.shapes if s in KERNELS]
  for (shape, axes, kind), names in _unique_kernels(sets).items():
    for dtype in FLAGS.dtypes:
      result = _bench_kernel(shape, axes, jnp.dtype(dtype), patterns, impls,
                             rng)
      _print_kernel(names, shape, axes, dtype, result, impls)
      results.append({'kernels': names, 'shape': shape, 'axes': axes,
                      'groups': kind, 'dtype': dtype, **result})
      sys.stdout.flush()
  small = None
  if 'vit_ti_ff' in FLAGS.shapes:
    small = {}
    for dtype in FLAGS.dtypes:
      small[dtype] = _bench_vit_ti_ff(jnp.dtype(dtype), patterns, rng)
      print(f'\nViT-Ti/16 FF kernels (12 blocks x mlp/wi, mlp/wo) {dtype}: '
            f'floor {small[dtype]["floor_ms"][0]:.3f} ms. '
            f'{_not_run(small[dtype]["skipped"])}'.rstrip())
      for row in small[dtype]['rows']:
        print(f'{row["pattern"]:>8}  {row["min_ms"]:8.3f}/'
              f'{row["median_ms"]:<8.3f} ms  {row["x_floor"]:6.2f} x floor'
              f'  {row["x_floor_paired"]:6.2f} paired')
  out = {
      'command': 'python -m pgf.bench.masks ' + ' '.join(sys.argv[1:]),
      'date_utc': started.isoformat(timespec='seconds'),
      'machine': {'processor': platform.processor() or platform.machine(),
                  'cpu': timing.cpu_name(), 'cpus': os.cpu_count(),
                  'platform': platform.platform(),
                  'load_average_start': load_start,
                  'load_average_end': os.getloadavg(),
                  'memory_gb_per_s': bandwidth},
      'jax': jax.__version__, 'numba': numba.__version__,
      'numba_threading': timing.numba_threading(),
      'device': jax.devices()[0].device_kind, 'note': FLAGS.note,
      'repeats': FLAGS.repeats, 'results': results, 'vit_ti_ff': small,
  }
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(out, f, indent=1)
    print(f'\nWrote {FLAGS.out} and {write_markdown(FLAGS.out)}')


if __name__ == '__main__':
  app.run(main)

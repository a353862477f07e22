r"""Times pgf's training step of every recipe against dense, in one process.

  python -m pgf.bench.steps --config=configs/vit_base.py --batch_size=2 \
      --dtype=float32 --out=experiments/bench/steps_cpu_vit_b16.json
  python -m pgf.bench --config=configs/vit_base.py:runlocal   # the same

Every row runs `pgf.step.make_train_step` (the step `pgf.train` runs) on the
same synthetic batch (random arrays of the task's training spec: no dataset
is read) and the same optimizer chain; only the sparsity plan changes. Rows:

  dense           pgf's dense path (no sparse kernel)
  stock_flax      an independent plain flax.linen model of the same sizes
                  (`pgf.bench.stock`), value_and_grad + the same optax chain
  RECIPE          every --recipes at every --patterns, on --role's layers
  sdgf_stepwise   every frame of the SdGf-Stepwise schedule to --sdgf_target
  sdgf_geometric  every frame of SdGf-Geometric to --sdgf_target
  ... recompute=off  every recipe at --recompute_off patterns with
                  sparsity.recompute=False (masks and effective kernels kept
                  for the backward pass instead of recomputed)

Timing: every row is compiled and run --warmup times first (compile and
first-call seconds are reported apart). Then --rounds rounds; a round times
every row once (a sample = --steps consecutive steps, blocked on), the order
rotating by one row per round, so that drifts of the machine's load fall on
every row alike. Each row reports min/median/max ms per step over the
rounds, and its ratio to dense (and to stock_flax) computed within each
round, summarised by the median and the range over rounds. `overhead_ms`
is the median within-round difference to dense: the sparse step's extra
work, which does not grow with the batch (masks are a function of the
weights), so ratios at a reduced batch overstate the full-batch ratio.

Memory: per row, the compiled step's `memory_analysis()` (argument, output,
alias and XLA temporary bytes; peak_bytes = argument + output - alias +
temp), and on backends that have them the device's `memory_stats()` after
the row's first call (peak_bytes_in_use is process-wide and only grows, so
it is attributed to a row only when it grew during that row).

Writes JSON (--out) and a Markdown table beside it.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any
from unittest import mock

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from pgf import data as data_lib
from pgf import sharding
from pgf import step as step_lib
from pgf import tasks
from pgf.bench import stock
import pgf.configs as pgf_configs

FLAGS = flags.FLAGS
ROLES = ('ff', 'q', 'k', 'v', 'o')
DEFAULT_RECIPES = ('ste', 'srste', 'mdgf_linear', 'mdgf_exp')
DEFAULT_PATTERNS = ('2:4', '1:16', '1:32', '1:64')


# ---- setup and data ---------------------------------------------------------


def bench_setup(config) -> step_lib.Setup:
  """`pgf.step.setup` without reading the dataset where its size is
  published (ImageNet, C4): the benchmark needs only the data's shapes.

  pgf's own small datasets (pgf_digits, pgf_pydoc) are prepared on the spot
  as in training. `step.setup` takes no DataInfo, so its `plan_run` is given
  the published one for the duration of the call.
  """
  counts = data_lib.published_counts(config.data.name)
  if counts is None:
    return step_lib.setup(config)
  pipeline = tasks.task_class(config.task).pipeline
  info = pipeline.published_info(config, *counts)
  plan_run = functools.partial(step_lib.plan_run, info=info)
  with mock.patch.object(step_lib, 'plan_run', plan_run):
    return step_lib.setup(config)


def synthetic_batch(config, info, batch_size: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
  """Random arrays with the shapes and dtypes of a training batch.

  Images are standard normal, labels one-hot, tokens uniform over the
  model's vocabulary (never 0, the padding id), one packing segment per row,
  every target token weighted.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for key, (shape, dtype) in info.train_spec.items():
    full = (batch_size, *shape)
    if key == 'label':
      classes = rng.integers(0, shape[-1], batch_size)
      out[key] = np.eye(shape[-1], dtype=dtype)[classes]
    elif key.endswith('_segment_ids') or key.endswith('_loss_weights'):
      out[key] = np.ones(full, dtype)
    elif key.endswith('_positions'):
      out[key] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), full)
    elif np.issubdtype(dtype, np.integer):
      out[key] = rng.integers(1, config.model.vocab_size, full).astype(dtype)
    else:
      out[key] = rng.standard_normal(full).astype(dtype)
  return out


def row_config(base, *, recipe: str = 'dense', sdgf: str = 'none',
               nm: tuple[int, int] = (1, 16), role: str = 'ff',
               recompute: bool = True, batch_size: int | None = None,
               dtype: str | None = None):
  """`base` with every role dense except `role` (recipe, frames, N:M)."""
  c = base.copy_and_resolve_references()
  c.unlock()
  for r in ROLES:
    c.sparsity[r].recipe = 'dense'
  if recipe != 'dense':
    g = c.sparsity[role]
    g.recipe, g.sdgf, (g.n, g.m) = recipe, sdgf, nm
  c.sparsity.recompute = recompute
  # Diagnostics add a second compile of log steps; the benchmark times the
  # plain step.
  c.diagnostics.enabled = False
  if batch_size:
    c.batch_size = batch_size
  if dtype:
    c.model.dtype = dtype
  if c.task == 'span_corruption' and c.data.vocab == 'sentencepiece':
    # The vocabulary file only names text ids; synthetic tokens need none.
    # model.vocab_size (the embedding and logits) is unchanged.
    c.data.vocab = 'byte'
  c.lock()
  return c


def parse_nm(text: str) -> tuple[int, int]:
  n, m = (int(x) for x in text.split(':'))
  return n, m


# ---- rows -------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  """One timed configuration.

  run(steps) runs `steps` steps and blocks; `memory` is filled at compile.
  """

  row: str
  pattern: str
  recompute: bool | None
  run: Callable[[int], None]
  compile_fn: Callable[[], Any]
  jitted: Any = None
  call: Any = None          # pgf rows: the make_train_step function
  compile_s: float = 0.0
  first_call_s: float = 0.0
  memory: dict = dataclasses.field(default_factory=dict)
  times: list = dataclasses.field(default_factory=list)

  @property
  def label(self) -> str:
    off = '' if self.recompute in (None, True) else ' (recompute off)'
    return f'{self.row}{off} {self.pattern}'


def memory_dict(compiled) -> dict[str, int]:
  """The compiled step's XLA memory: argument, output, alias, temp and
  peak = argument + output - alias + temp (donated outputs alias their
  inputs), in bytes."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(argument_bytes=int(m.argument_size_in_bytes),
             output_bytes=int(m.output_size_in_bytes),
             alias_bytes=int(m.alias_size_in_bytes),
             temp_bytes=int(m.temp_size_in_bytes))
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes']
                       - out['alias_bytes'] + out['temp_bytes'])
  return out


def device_memory() -> dict[str, int]:
  stats = jax.devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ('bytes_in_use', 'peak_bytes_in_use')
          if k in stats}


class _Shared:
  """Parameters and optimizer state shared by the pgf rows of one model.

  Rows of every recipe have the same parameter and optimizer-state trees
  (the recipe transforms are stateless), so one copy serves all: a row's
  step consumes it (donation) and the next row continues from the result.
  Only the bit-packed log masks are per row. This keeps one model's state
  in memory however many rows there are (ViT-B/16: 1 GB).
  """

  def __init__(self, state: step_lib.TrainState):
    self.step, self.params, self.opt_state = (state.step, state.params,
                                              state.opt_state)

  def state(self, log_masks) -> step_lib.TrainState:
    return step_lib.TrainState(step=self.step, params=self.params,
                               opt_state=self.opt_state, log_masks=log_masks)

  def update(self, state: step_lib.TrainState) -> None:
    self.step, self.params, self.opt_state = (state.step, state.params,
                                              state.opt_state)


def _mesh(s: step_lib.Setup):
  stack = contextlib.ExitStack()
  stack.enter_context(sharding.mesh_context(s.mesh))
  stack.enter_context(nn.logical_axis_rules(s.rules))
  return stack


def pgf_rows(s: step_lib.Setup, shared: _Shared, batch, *, name: str,
             plans, recompute: bool | None) -> list[Row]:
  """One row per plan, all through one `make_train_step(s)`."""
  fn = step_lib.make_train_step(s)
  rows = []
  for plan in plans:
    # Committed to their shardings like the step's outputs: an uncommitted
    # first argument would give the jitted step a second cache entry.
    holder = {'log_masks': jax.device_put(s.sparsifier.initial_log_masks(),
                                          s.state_sharding.log_masks)}

    def run(steps, plan=plan, holder=holder):
      state = shared.state(holder['log_masks'])
      for _ in range(steps):
        state, metrics = fn(state, batch, plan)
      jax.block_until_ready((state, metrics))
      shared.update(state)
      holder['log_masks'] = state.log_masks

    def compile_fn(plan=plan, holder=holder):
      # Lowered with the concrete arguments the calls use, so the call
      # finds this executable in JAX's cache instead of compiling again.
      with _mesh(s):
        return fn.jitted.lower(shared.state(holder['log_masks']), batch,
                               plan, False).compile()

    rows.append(Row(row=name, pattern=plan.describe() if plan else '-',
                    recompute=recompute if plan else None, run=run,
                    compile_fn=compile_fn, jitted=fn.jitted, call=fn))
  return rows


def stock_row(s: step_lib.Setup, batch) -> Row:
  """The stock Flax model of the same sizes, trained with s.tx."""
  params = stock.init_params(s.config, batch)
  # Committed, as the step's outputs are (one cache entry, not two).
  carry = jax.device_put(
      {'params': params, 'opt_state': s.tx.init(params),
       'step': jnp.zeros((), jnp.int32)}, sharding.replicated(s.mesh))
  step_fn = stock.make_stock_step(s.config, s.tx)

  def run(steps):
    for _ in range(steps):
      (carry['params'], carry['opt_state'], carry['step'],
       loss) = step_fn(carry['params'], carry['opt_state'], carry['step'],
                       batch)
    jax.block_until_ready((carry['params'], loss))

  def compile_fn():
    return step_fn.lower(carry['params'], carry['opt_state'], carry['step'],
                         batch).compile()

  row = Row(row='stock_flax', pattern='-', recompute=None, run=run,
            compile_fn=compile_fn, jitted=step_fn)
  row.memory['params'] = int(sum(x.size for x in jax.tree.leaves(params)))
  return row


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """A row name and its recipe; all_frames: one row per SdGf frame."""

  name: str
  recipe: str
  sdgf: str = 'none'
  nm: tuple[int, int] = (1, 16)
  recompute: bool = True
  all_frames: bool = False


def default_specs(*, recipes=DEFAULT_RECIPES, patterns=DEFAULT_PATTERNS,
                  sdgf_target: str = '1:8', sdgf=('stepwise', 'geometric'),
                  recompute_off=('1:16',)) -> list[RowSpec]:
  """Every recipe at every pattern, every SdGf frame, then the recipes at
  `recompute_off` patterns with recompute off."""
  specs = [RowSpec(r, r, nm=parse_nm(p)) for p in patterns for r in recipes]
  specs += [RowSpec(f'sdgf_{mode}', 'ste', mode, parse_nm(sdgf_target),
                    all_frames=True) for mode in sdgf]
  specs += [RowSpec(r, r, nm=parse_nm(p), recompute=False)
            for p in recompute_off for r in recipes]
  return specs


class Bench:
  """The rows of one model (one base config), sharing one state and batch.

  The dense row (and the stock model's) exist from the start; `add` sets
  up the rows of a RowSpec (not compiled).
  """

  def __init__(self, base, *, role: str = 'ff', batch_size: int | None = None,
               dtype: str | None = None, stock_model: bool = True,
               seed: int = 0):
    self.base, self.kw = base, dict(role=role, batch_size=batch_size,
                                    dtype=dtype)
    dense = bench_setup(row_config(base, **self.kw))
    self.config = dense.config
    local = synthetic_batch(dense.config, dense.info,
                            dense.config.batch_size, seed)
    self.batch = sharding.global_batch(local,
                                       sharding.batch_sharding(dense.mesh))
    self.shared = _Shared(step_lib.init_state(dense, jax.random.key(seed)))
    self.setups = {'dense': dense}
    self.rows = pgf_rows(dense, self.shared, self.batch, name='dense',
                         plans=[dense.schedule.plan(0)], recompute=None)
    if stock_model:
      self.rows.append(stock_row(dense, self.batch))
    self.param_count = step_lib.param_count(dense.abstract_state.params)

  def add(self, spec: RowSpec) -> list[Row]:
    s = bench_setup(row_config(self.base, recipe=spec.recipe, sdgf=spec.sdgf,
                               nm=spec.nm, recompute=spec.recompute,
                               **self.kw))
    plans = s.schedule.distinct_plans() if spec.all_frames else (
        s.schedule.plan(s.schedule.sparse_start),)
    key = spec.name + ('' if spec.recompute else ' (recompute off)')
    self.setups[key] = s
    rows = pgf_rows(s, self.shared, self.batch, name=spec.name,
                    plans=[p for p in plans if p], recompute=spec.recompute)
    self.rows.extend(rows)
    return rows


def compile_rows(rows: list[Row], *, warmup: int = 1) -> None:
  """Compiles every row (memory analysis) and runs it `warmup` times."""
  for r in rows:
    before = device_memory()
    t = time.perf_counter()
    compiled = r.compile_fn()
    r.compile_s = time.perf_counter() - t
    r.memory.update(memory_dict(compiled))
    del compiled
    t = time.perf_counter()
    r.run(1)
    r.first_call_s = time.perf_counter() - t
    after = device_memory()
    if after:
      r.memory['device_bytes_in_use'] = after.get('bytes_in_use')
      if after.get('peak_bytes_in_use', 0) > before.get('peak_bytes_in_use',
                                                        0):
        r.memory['device_peak_bytes'] = after['peak_bytes_in_use']
    if warmup > 1:
      r.run(warmup - 1)
    print(f'compiled {r.label}: {r.compile_s:.1f} s, first call '
          f'{r.first_call_s:.2f} s', flush=True)


def prepare(bench: Bench, specs, *, warmup: int = 1,
            budget_s: float | None = None) -> list[RowSpec]:
  """Compiles the dense (and stock) rows, then adds and compiles the rows
  of `specs` in order until `budget_s` seconds have passed; returns the
  specs left out."""
  start = time.perf_counter()
  compile_rows(bench.rows, warmup=warmup)
  skipped = []
  for spec in specs:
    if budget_s is not None and time.perf_counter() - start > budget_s:
      skipped.append(spec)
      continue
    compile_rows(bench.add(spec), warmup=warmup)
  if skipped:
    print(f'left out for time: {[x.name for x in skipped]}', flush=True)
  return skipped


def time_rows(rows: list[Row], *, rounds: int, steps: int,
              budget_s: float | None = None, min_rounds: int = 3) -> int:
  """Up to `rounds` rounds; each times every row once, the order rotating
  by one row per round. With `budget_s`, stops after the round that would
  let the next one end past it (but runs at least `min_rounds`). Returns
  the number of rounds run."""
  start = time.perf_counter()
  for k in range(rounds):
    t_round = time.perf_counter()
    order = rows[k % len(rows):] + rows[:k % len(rows)]
    for r in order:
      t = time.perf_counter()
      r.run(steps)
      r.times.append((time.perf_counter() - t) / steps)
    now = time.perf_counter()
    print(f'round {k + 1}/{rounds} done', flush=True)
    if (budget_s is not None and k + 1 >= min_rounds
        and now - start + (now - t_round) > budget_s):
      return k + 1
  return rounds


def run_schedule(bench: Bench, name: str) -> dict:
  """Runs row `name`'s jitted step at the first and last step of every
  plan of its schedule (the steps where a run changes frames) and counts
  its executables: one per SdGf frame if the plan is the only static
  argument that changes."""
  s = bench.setups[name]
  row = next(r for r in bench.rows if r.label.startswith(name + ' '))
  fn = row.call
  bounds = s.schedule.plan_boundaries()
  ends = [b - 1 for b in bounds[1:]] + [s.schedule.total_steps - 1]
  points = sorted(set(bounds) | set(ends))
  log_masks = jax.device_put(s.sparsifier.initial_log_masks(),
                             s.state_sharding.log_masks)
  state = bench.shared.state(log_masks)
  for t in points:
    state, metrics = fn(state, bench.batch, s.schedule.plan(t))
  jax.block_until_ready((state, metrics))
  bench.shared.update(state)
  return dict(row=name, frames=len(s.schedule.distinct_plans()),
              steps_run=len(points), executables=int(fn.jitted._cache_size()))


def _spread(values) -> dict[str, float]:
  return dict(min=min(values), median=statistics.median(values),
              max=max(values))


def summarize(rows: list[Row]) -> list[dict]:
  """Per row: ms min/median/max; within-round ratios to dense and stock."""
  dense = next(r for r in rows if r.row == 'dense')
  ref_stock = next((r for r in rows if r.row == 'stock_flax'), None)
  out = []
  for r in rows:
    ms = _spread([1e3 * t for t in r.times])
    ratio = _spread([a / b for a, b in zip(r.times, dense.times)])
    d = dict(row=r.row, pattern=r.pattern, recompute=r.recompute,
             ms_min=ms['min'], ms_median=ms['median'], ms_max=ms['max'],
             ratio_median=ratio['median'], ratio_min=ratio['min'],
             ratio_max=ratio['max'],
             overhead_ms=1e3 * statistics.median(
                 [a - b for a, b in zip(r.times, dense.times)]),
             compile_s=r.compile_s, first_call_s=r.first_call_s,
             samples_ms=[1e3 * t for t in r.times], **r.memory)
    if ref_stock is not None:
      d['ratio_to_stock_median'] = statistics.median(
          [a / b for a, b in zip(r.times, ref_stock.times)])
    out.append(d)
  return out


def compile_counts(bench: 'Bench') -> dict[str, int]:
  """Executables in each row name's jitted step (SdGf: one per frame)."""
  seen = {}
  for r in bench.rows:
    key = r.label.rsplit(' ', 1)[0]
    size = getattr(r.jitted, '_cache_size', None)
    if size is not None:
      seen[key] = int(size())
  return seen


# ---- report -----------------------------------------------------------------


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as fh:
      for line in fh:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', d.platform)
  return (f'{jax.device_count()} x {kind} ({d.platform}); host '
          f'{cpu_name()}, {os.cpu_count()} cores')


def load_text() -> str:
  return 'load average %.2f %.2f %.2f' % os.getloadavg()


def _mib(x) -> str:
  return f'{x / 2**20:,.0f}' if x else 'n/a'


def markdown(meta: dict, rows: list[dict]) -> str:
  """The table of one model as Markdown, with how it was measured."""
  lines = [
      f"# Training step per recipe vs dense: {meta['model']}", '',
      f"Command: `{meta['command']}`  ",
      f"Date: {meta['date']}  ",
      f"Device: {meta['device']}  ",
      f"Load: {meta['load_before']} before, {meta['load_after']} after  ",
      f"JAX {meta['jax']}; batch {meta['batch_size']} ({meta['batch_note']})"
      f"; dtype {meta['dtype']}; {meta['rounds']} rounds of "
      f"{meta['steps']} step(s) per row; parameters "
      f"{meta['param_count']:,} (stock model "
      f"{meta.get('stock_param_count') or 0:,})", '',
      'ms per step over rounds (min / median / max); x dense = the ratio '
      'to the dense row within each round, median [min, max] over rounds; '
      'x stock likewise against the stock Flax model; overhead = median '
      'within-round ms over dense; memory from the compiled step '
      '(XLA temp; peak = arguments + outputs - aliased + temp).', '',
      '| row | pattern | ms min / med / max | x dense med [min, max] | '
      'x stock | overhead ms | temp MiB | peak MiB | compile s |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    name = r['row'] + (' (recompute off)' if r['recompute'] is False else '')
    lines.append(
        f"| {name} | {r['pattern']} | {r['ms_min']:.1f} / "
        f"{r['ms_median']:.1f} / {r['ms_max']:.1f} | "
        f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, "
        f"{r['ratio_max']:.3f}] | {r.get('ratio_to_stock_median', 0):.3f} | "
        f"{r['overhead_ms']:+.1f} | {_mib(r.get('temp_bytes'))} | "
        f"{_mib(r.get('peak_bytes'))} | {r['compile_s']:.0f} |")
  counts = meta.get('compile_counts')
  if counts:
    lines += ['', 'Executables per jitted step after the run (one per '
              'distinct plan): ' + ', '.join(
                  f'{k}: {v}' for k, v in counts.items()
                  if k.startswith('sdgf'))]
  return '\n'.join(lines) + '\n'


def run_bench(base, *, config_name: str, command: str, rounds: int,
              steps: int, warmup: int, batch_note: str, specs,
              compile_budget_s: float | None = None,
              time_budget_s: float | None = None, **kw
              ) -> tuple[dict, list[dict], Bench]:
  """Builds, compiles and times every row; returns (meta, rows, bench)."""
  load_before = load_text()
  bench = Bench(base, **kw)
  skipped = prepare(bench, specs, warmup=warmup, budget_s=compile_budget_s)
  done = time_rows(bench.rows, rounds=rounds, steps=steps,
                   budget_s=time_budget_s)
  rows = summarize(bench.rows)
  c = bench.config
  meta = dict(
      command=command, date=datetime.date.today().isoformat(),
      device=device_name(), load_before=load_before, load_after=load_text(),
      jax=jax.__version__, config=config_name,
      model=f'{c.model.name} {c.model.variant}', batch_size=c.batch_size,
      batch_note=batch_note, dtype=c.model.dtype, rounds=done,
      steps=steps, param_count=bench.param_count,
      stock_param_count=next((r.get('params') for r in rows
                              if r['row'] == 'stock_flax'), None),
      compile_counts=compile_counts(bench),
      left_out=[dataclasses.asdict(x) for x in skipped])
  return meta, rows, bench


def write(out: str, meta: dict, rows: list[dict]) -> None:
  """out (JSON) and the Markdown table beside it (.md)."""
  with open(out, 'w') as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  with open(os.path.splitext(out)[0] + '.md', 'w') as f:
    f.write(markdown(meta, rows))
  print(f'Wrote {out} and its .md', flush=True)


def main(argv):
  del argv
  f = FLAGS
  base = f.config
  note = (f'reduced from the config\'s {base.batch_size}'
          if f.batch_size and f.batch_size != base.batch_size
          else 'the config\'s')
  specs = default_specs(recipes=f.recipes, patterns=f.patterns,
                        sdgf_target=f.sdgf_target, sdgf=f.sdgf,
                        recompute_off=f.recompute_off)
  meta, rows, _ = run_bench(
      base, config_name=f['config'].config_filename,
      command='python -m pgf.bench.steps ' + ' '.join(sys.argv[1:]),
      rounds=f.rounds, steps=f.steps, warmup=f.warmup, batch_note=note,
      specs=specs, role=f.role, batch_size=f.batch_size, dtype=f.dtype)
  print(markdown(meta, rows))
  if f.out:
    write(f.out, meta, rows)


def define_flags():
  config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(pgf_configs.__file__),
                             'vit_base.py') + ':runlocal',
      'Experiment config.', lock_config=True)
  flags.DEFINE_list('patterns', list(DEFAULT_PATTERNS), 'N:M patterns.')
  flags.DEFINE_list('recipes', list(DEFAULT_RECIPES),
                    'Recipes timed at every pattern.')
  flags.DEFINE_string('sdgf_target', '1:8', 'Target of the SdGf schedules.')
  flags.DEFINE_list('sdgf', ['stepwise', 'geometric'],
                    'SdGf frame maps whose every frame is a row.')
  flags.DEFINE_list('recompute_off', ['1:16'], 'Patterns at which every '
                    'recipe is also timed with sparsity.recompute=False.')
  flags.DEFINE_string('role', 'ff', 'Sparsity role the recipes are put on.')
  flags.DEFINE_integer('batch_size', 0, 'Global batch (0 = the config\'s).')
  flags.DEFINE_string('dtype', '', 'model.dtype override ("" = config\'s).')
  flags.DEFINE_integer('rounds', 5, 'Timed rounds.')
  flags.DEFINE_integer('steps', 1, 'Steps per sample.')
  flags.DEFINE_integer('warmup', 2, 'Untimed calls per row (the first '
                       'includes compiling).')
  flags.DEFINE_string('out', '', 'JSON output (.md beside it); "" = none.')


if __name__ == '__main__':
  define_flags()
  app.run(main)

r"""Times pgf's training step of every recipe against dense, in one process.

  python -m pgf.bench.steps --config=configs/vit_base.py --batch_size=8 \
      --dtype=float32 --rounds=5 \
      --out=experiments/bench/steps_cpu_vit_b16_b8.json
  python -m pgf.bench.steps --config=configs/vit_base.py --batch_size=8 \
      --dtype=float32 --work_only   # dense's step and the sparse work only
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
The pooled line compares all sparse rows with dense over rounds (a paired
t-interval on log ms); the stock model against dense is the same
comparison between two dense models, the noise floor of the machine.

Sparse work: a whole-step ratio cannot resolve a few per cent where steps
vary by 10 % from round to round (2 CPU cores). So the sparse part of each
row's step is also timed alone (`sparse_work_fn`: masks and effective
kernels of the forward and the backward pass, the recipe's gradient
transforms), in many short samples, and reported with the step ratio it
implies, 1 + work / dense ms. --work_only times just that and dense's step.

Memory: per row, the compiled step's `memory_analysis()` (argument, output,
alias and XLA temporary bytes; peak_bytes = argument + output - alias +
temp), and on backends that have them the device's `memory_stats()` after
the row's first call (peak_bytes_in_use is process-wide and only grows, so
it is attributed to a row only when it grew during that row), and the
process's minor page faults per step while the row ran: on CPU, XLA
allocates a step's temporaries on every call, so a step first-touches all
of them (at T5-Base batch 1, 465,000 faults of 4 KiB pages a step;
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` backs them with huge pages where
the kernel's transparent huge pages are 'madvise'). The meta records both
settings.

Writes JSON (--out) and a Markdown table beside it, first after every
timed round (marked partial: what has not run yet) and again at the end, so
that a run killed during its work timing or its later rounds keeps what it
measured. Each file is replaced atomically.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
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
from pgf.bench import timing
import pgf.configs as pgf_configs
from pgf.sparsity import core
from pgf.sparsity import trees
from pgf.study import stats

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
  setup: Any = None         # pgf rows: their Setup and static plan
  plan: Any = None
  compile_s: float = 0.0
  first_call_s: float = 0.0
  memory: dict = dataclasses.field(default_factory=dict)
  times: list = dataclasses.field(default_factory=list)
  faults: list = dataclasses.field(default_factory=list)   # per step
  work_ms: list = dataclasses.field(default_factory=list)

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
                    compile_fn=compile_fn, jitted=fn.jitted, call=fn,
                    setup=s, plan=plan))
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
              budget_s: float | None = None, min_rounds: int = 3,
              on_round: Callable[[int], None] | None = None) -> int:
  """Up to `rounds` rounds; each times every row once, the order rotating
  by one row per round. With `budget_s`, stops after the round that would
  let the next one end past it (but runs at least `min_rounds`). Calls
  `on_round(rounds done)` after each round. Returns the number of rounds
  run."""
  start = time.perf_counter()
  for k in range(rounds):
    t_round = time.perf_counter()
    order = rows[k % len(rows):] + rows[:k % len(rows)]
    for r in order:
      f, t = timing.minor_faults(), time.perf_counter()
      r.run(steps)
      r.times.append((time.perf_counter() - t) / steps)
      r.faults.append((timing.minor_faults() - f) / steps)
    now = time.perf_counter()
    print(f'round {k + 1}/{rounds} done', flush=True)
    if on_round is not None:
      on_round(k + 1)
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


def sparse_work_fn(s: step_lib.Setup, plan) -> Callable | None:
  """The work a sparse step adds to the dense one, alone: a function
  (params, grads, step, out=None) -> arrays, or None if `plan` has no sparse
  kernel.

  It computes what the step computes beyond the dense model: every sparse
  kernel's mask and effective kernel as the forward pass does (with
  sparsity.recompute, the default, also the mask's bits), the effective
  kernel again from the bits as the backward pass does (tied to the first
  pass's output as `core.sparse_product` ties it to the incoming gradient,
  so XLA computes it after), and the recipe's gradient transforms (SR-STE's
  refill, MdGf's scaled flow; a gradient a transform leaves as it is is not
  an output). Every result is materialised, as the step's products need
  their kernel operands.

  The results are written over `out`, the previous call's results, which
  are donated: in the step they are temporaries that reuse memory the step
  has already touched, while fresh output arrays of every sparse kernel
  (453 MiB of effective kernels at T5-Base) would page-fault on every call
  (36,000 minor faults a call on T5-Base's 72 FF kernels, 2026-12-07) and
  time the allocator instead of the work. `out=None` (a first call) makes
  them. The gradient transforms act on the previous call's transformed
  gradients (the first call's: `grads`), donated as the step's gradients
  are temporaries: SR-STE's CPU kernel writes over its input, which a
  non-donated `grads` would make XLA copy on every call.

  Timing it measures the sparse step's overhead without the noise of
  timing two whole steps; what it leaves out are effects on the rest of
  the step's program (fusion, scheduling), which only the step rows show.
  """
  sp = s.sparsifier
  matched = sp.matched(plan)
  paths = sorted(matched)
  if not paths:
    return None
  recompute = s.config.sparsity.recompute
  tx = sp.gradient_transform()

  moved = []   # The paths whose gradients the transforms change.

  def work(params, grads, step, last):
    # `last` is donated: the results reuse its buffers.
    values = s.schedule.values(step)
    flat = trees.flatten(params)
    alphas = {p: jnp.asarray(values[matched[p][0].group]['alpha'],
                             flat[p].dtype) for p in paths}
    kernels, bits = [], []
    for p in paths:
      rule, axes = matched[p]
      if recompute:
        w_eff, b = core.kernel_and_bits(flat[p], rule.nm, axes, alphas[p],
                                        name=p)
        bits.append(b)
      else:
        w_eff, _ = core.effective_kernel(flat[p], rule.nm, axes,
                                         alpha=alphas[p], name=p)
      kernels.append(w_eff)
    out = [kernels]
    if recompute:
      tie = 1 + 0 * kernels[0][(0,) * kernels[0].ndim]
      out.append([core.kernel_from_bits(flat[p] * tie.astype(flat[p].dtype),
                                        b, alphas[p])
                  for p, b in zip(paths, bits)])
    given = trees.flatten(grads)
    if last is not None:
      given.update(zip(moved, last[-1]))
    updates, _ = tx.update(trees.unflatten(given), tx.init(params), params,
                           step=step, plan=plan)
    flat = trees.flatten(updates)
    changed = [p for p in paths if flat[p] is not given[p]]
    if last is None:
      moved[:] = changed
    out.append([flat[p] for p in changed])
    return out

  # keep_unused: an argument jit prunes would donate nothing.
  jitted = jax.jit(work, donate_argnums=3, keep_unused=True)

  def call(params, grads, step, out=None):
    if out is None:
      shapes = jax.eval_shape(work, params, grads, step, None)
      out = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
      given = trees.flatten(grads)
      out[-1] = [jnp.array(given[p], copy=True) for p in moved]
    return jitted(params, grads, step, out)

  return call


def time_work(rows: list[Row], params, *, repeats: int = 7,
              min_sample_ms: float = 20.0) -> None:
  """Times `sparse_work_fn` of every sparse pgf row (after its steps were
  timed, so it never disturbs them): `repeats` samples, each at least
  `min_sample_ms` of back-to-back calls, each call writing over the
  previous one's results. Sets row.work_ms (ms per call)."""
  grads = jax.tree.map(jnp.ones_like, params)
  for r in rows:
    if r.setup is None or r.plan is None:
      continue
    fn = sparse_work_fn(r.setup, r.plan)
    if fn is None:
      continue
    step = jnp.asarray(r.setup.schedule.sparse_start, jnp.int32)
    with _mesh(r.setup):
      out = jax.block_until_ready(fn(params, grads, step))
      t = time.perf_counter()
      out = jax.block_until_ready(fn(params, grads, step, out))
      calls = max(1, int(min_sample_ms / 1e3 / max(
          time.perf_counter() - t, 1e-6)))
      samples = []
      for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
          out = fn(params, grads, step, out)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / calls)
    del out
    r.work_ms = [1e3 * x for x in samples]
    print(f'sparse work {r.label}: {min(r.work_ms):.2f} ms', flush=True)


def pooled(rows: list[dict]) -> dict[str, dict]:
  """Paired comparisons over rounds (the unit of replication: within a
  round every row shares the dense sample) on log ms per step.

  'sparse': the mean over every sparse row (recompute on) of its log ms,
  per round, against dense's; 'stock': the stock Flax model against
  dense, the ratio of two dense models of the same computation, which
  shows the noise of this machine's step times. Ratios are exp of the
  mean paired log difference, with its 95 % t-interval; None where there
  are fewer than 2 rounds.
  """
  dense = next(r for r in rows if r['row'] == 'dense')
  groups = {
      'sparse': [r for r in rows if r['row'] not in ('dense', 'stock_flax')
                 and r['recompute'] is not False],
      'stock': [r for r in rows if r['row'] == 'stock_flax']}
  base = np.log(dense['samples_ms'])
  out = {}
  for name, members in groups.items():
    # Rows that were not timed (--work_only) have no rounds to pair.
    members = [r for r in members if len(r['samples_ms']) == len(base)]
    if not members or len(base) < 2:
      continue
    x = np.mean([np.log(r['samples_ms']) for r in members], axis=0)
    t = stats.paired_test(x, base)
    out[name] = dict(rows=len(members), rounds=t.n, ratio=math.exp(t.mean),
                     low=math.exp(t.low), high=math.exp(t.high), p_t=t.p_t,
                     test='95 % t-interval over rounds of the mean paired '
                          'log(ms) difference')
  return out


def _spread(values) -> dict[str, float]:
  return dict(min=min(values), median=statistics.median(values),
              max=max(values))


def summarize(rows: list[Row]) -> list[dict]:
  """Per row: ms min/median/max; within-round ratios to dense and stock."""
  dense = next(r for r in rows if r.row == 'dense')
  ref_stock = next((r for r in rows if r.row == 'stock_flax'), None)
  dense_ms = 1e3 * statistics.median(dense.times)
  out = []
  for r in rows:
    d = dict(row=r.row, pattern=r.pattern, recompute=r.recompute,
             compile_s=r.compile_s, first_call_s=r.first_call_s,
             samples_ms=[1e3 * t for t in r.times], **r.memory)
    if r.times:
      ms = _spread([1e3 * t for t in r.times])
      ratio = _spread([a / b for a, b in zip(r.times, dense.times)])
      d.update(ms_min=ms['min'], ms_median=ms['median'], ms_max=ms['max'],
               ratio_median=ratio['median'], ratio_min=ratio['min'],
               ratio_max=ratio['max'],
               overhead_ms=1e3 * statistics.median(
                   [a - b for a, b in zip(r.times, dense.times)]))
    if r.faults:
      d['faults_per_step'] = statistics.median(r.faults)
      if ref_stock is not None:
        d['ratio_to_stock_median'] = statistics.median(
            [a / b for a, b in zip(r.times, ref_stock.times)])
    if r.work_ms:
      # The step ratio the sparse work alone would give.
      d.update(work_ms=r.work_ms, work_ms_min=min(r.work_ms),
               work_ms_median=statistics.median(r.work_ms),
               work_ratio=1 + statistics.median(r.work_ms) / dense_ms)
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


def device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', d.platform)
  return (f'{jax.device_count()} x {kind} ({d.platform}); host '
          f'{timing.cpu_name()}, {os.cpu_count()} cores')


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
      f"Host memory: {meta['host_memory']}  ",
      f"JAX {meta['jax']}; batch {meta['batch_size']} ({meta['batch_note']})"
      f"; dtype {meta['dtype']}; {meta['rounds']} rounds of "
      f"{meta['steps']} step(s) per row; parameters "
      f"{meta['param_count']:,}" + (
          f" (stock model {meta['stock_param_count']:,})"
          if meta.get('stock_param_count') else ' (no stock model)'), '',
      'ms per step over rounds (min / median / max); x dense = the ratio '
      'to the dense row within each round, median [min, max] over rounds; '
      'x stock likewise against the stock Flax model; overhead = median '
      'within-round ms over dense; sparse work = the sparse part of the '
      'step timed alone (masks and effective kernels of the forward and '
      'the backward pass, the recipe\'s gradient transforms: '
      '`sparse_work_fn`), ms median [min] and the step ratio it implies, '
      '1 + work / dense ms (median); memory from the compiled step '
      '(XLA temp; peak = arguments + outputs - aliased + temp); faults = '
      'the process\'s minor page faults per step while the row ran, median '
      'over rounds (on CPU mostly the first touch of the step\'s fresh '
      'temporaries).', '',
      '| row | pattern | ms min / med / max | x dense med [min, max] | '
      'x stock | overhead ms | sparse work ms | x dense from work | '
      'temp MiB | peak MiB | faults / step | compile s |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | '
      '--- |']
  for r in rows:
    name = r['row'] + (' (recompute off)' if r['recompute'] is False else '')
    step = ['-'] * 4
    if 'ms_median' in r:
      step = [f"{r['ms_min']:.1f} / {r['ms_median']:.1f} / {r['ms_max']:.1f}",
              f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, "
              f"{r['ratio_max']:.3f}]",
              f"{r['ratio_to_stock_median']:.3f}"
              if 'ratio_to_stock_median' in r else '-',
              f"{r['overhead_ms']:+.1f}"]
    work = (f"{r['work_ms_median']:.2f} [{r['work_ms_min']:.2f}] | "
            f"{r['work_ratio']:.4f}" if 'work_ms_median' in r else '- | -')
    compile_s = f"{r['compile_s']:.0f}" if r['compile_s'] else '-'
    faults = (f"{r['faults_per_step']:,.0f}" if 'faults_per_step' in r
              else '-')
    lines.append(
        f"| {name} | {r['pattern']} | {' | '.join(step)} | {work} | "
        f"{_mib(r.get('temp_bytes'))} | {_mib(r.get('peak_bytes'))} | "
        f"{faults} | {compile_s} |")
  for name, p in meta.get('pooled', {}).items():
    what = ('every sparse row (recompute on), mean log ms' if name == 'sparse'
            else 'stock Flax (a second dense model: the noise)')
    lines += ['', f"Pooled over rounds, {what} vs dense: "
              f"**{p['ratio']:.3f}** [{p['low']:.3f}, {p['high']:.3f}] "
              f"({p['rows']} rows, {p['rounds']} rounds; {p['test']})."]
  if meta.get('partial'):
    lines += ['', f"**Partial results** (the run stopped or is still "
              f"running): {meta['partial']}."]
  if meta.get('work_only'):
    lines += ['', 'Work-only run: the sparse rows\' steps were not compiled '
              'or timed (`--work_only`).']
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
              time_budget_s: float | None = None, work_repeats: int = 7,
              work_only: bool = False,
              partial: Callable[[dict, list[dict]], None] | None = None,
              **kw) -> tuple[dict, list[dict], Bench]:
  """Builds, compiles and times every row, then times the sparse work of
  every sparse row (`work_repeats` samples; 0: not); returns (meta, rows,
  bench). work_only: times dense's step and the sparse work only.

  partial(meta, rows), if given, receives the results so far after every
  timed round (meta['partial'] says what is missing), so that a run killed
  later (the work timing of a T5-Base run takes minutes) keeps its rounds.
  """
  load_before = load_text()
  if work_only:
    kw['stock_model'] = False
  bench = Bench(base, **kw)
  skipped = []

  def results(done, missing=None):
    rows = summarize(bench.rows)
    c = bench.config
    meta = dict(
        command=command, date=datetime.date.today().isoformat(),
        device=device_name(), load_before=load_before,
        load_after=load_text(), host_memory=timing.host_memory(),
        jax=jax.__version__, config=config_name,
        model=f'{c.model.name} {c.model.variant}', batch_size=c.batch_size,
        batch_note=batch_note, dtype=c.model.dtype, rounds=done,
        steps=steps, param_count=bench.param_count,
        stock_param_count=next((r.get('params') for r in rows
                                if r['row'] == 'stock_flax'), None),
        compile_counts=compile_counts(bench),
        left_out=[dataclasses.asdict(x) for x in skipped],
        pooled=pooled(rows), work_only=work_only)
    if missing:
      meta['partial'] = missing
    return meta, rows

  def on_round(done):
    if partial is not None:
      left = [f'{rounds - done} of {rounds} rounds'] if done < rounds else []
      if work_repeats:
        left.append('the sparse work')
      partial(*results(done, 'not yet run: ' + ', '.join(left)
                       if left else None))

  if work_only:
    # Only dense's step is compiled and timed (the work's reference).
    compile_rows(bench.rows, warmup=warmup)
    done = time_rows(bench.rows, rounds=rounds, steps=steps)
    for spec in specs:
      bench.add(spec)
  else:
    skipped = prepare(bench, specs, warmup=warmup, budget_s=compile_budget_s)
    done = time_rows(bench.rows, rounds=rounds, steps=steps,
                     budget_s=time_budget_s, on_round=on_round)
  if work_repeats:
    time_work(bench.rows, bench.shared.params, repeats=work_repeats)
  meta, rows = results(done)
  return meta, rows, bench


def write(out: str, meta: dict, rows: list[dict]) -> None:
  """out (JSON) and the Markdown table beside it (.md), each replaced
  atomically (a run killed while writing leaves the previous version)."""
  if os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  texts = {out: json.dumps(dict(meta=meta, rows=rows), indent=1),
           os.path.splitext(out)[0] + '.md': markdown(meta, rows)}
  for path, text in texts.items():
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  print(f'Wrote {out} and its .md' + (' (partial)' if meta.get('partial')
                                       else ''), flush=True)


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
      specs=specs, role=f.role, batch_size=f.batch_size, dtype=f.dtype,
      work_repeats=f.work_repeats, work_only=f.work_only,
      partial=(lambda m, r: write(f.out, m, r)) if f.out else None)
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
  flags.DEFINE_integer('work_repeats', 7, 'Samples of each sparse row\'s '
                       'work alone (sparse_work_fn); 0 = not timed.')
  flags.DEFINE_bool('work_only', False, 'Time dense\'s step and every '
                    'sparse row\'s work alone, not the sparse steps.')
  flags.DEFINE_string('out', '', 'JSON output (.md beside it); "" = none.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
